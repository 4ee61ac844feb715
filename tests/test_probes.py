"""Feature views (analysis.extract) and linear probes / crossover detector (analysis.probes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.extract import POOLINGS, POSITION, VIEW_ARRAYS, VIEWS, available_views, view_array
from analysis.plotting import data_lines
from analysis.probes import (
    CHANCE_GID, analyse_views, chance_rate, crossover, figures_by_pooling, image_split, normalized_score, path,
    plot_probe_views, position_labels, probe_per_depth, to_json,
)

N_CLASS = 8


@pytest.fixture(autouse=True)
def _one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def colour_then_shape(L=4, B=320, d=24, noise=1.0, seed=0):
    """Features whose depth 1 is a one-hot colour embedding, depth L a one-hot shape embedding (disjoint
    coordinates), linearly interpolated between, plus Gaussian noise; ``count`` is in no depth."""
    rng = np.random.default_rng(seed)
    color, shape, count = rng.integers(0, N_CLASS, B), rng.integers(0, N_CLASS, B), rng.integers(0, 3, B)
    c_emb = np.zeros((N_CLASS, d)); c_emb[np.arange(N_CLASS), np.arange(N_CLASS)] = 3.0
    s_emb = np.zeros((N_CLASS, d)); s_emb[np.arange(N_CLASS), N_CLASS + np.arange(N_CLASS)] = 3.0
    x = np.empty((L, B, d), np.float32)
    for l in range(L):
        a = l / (L - 1)
        x[l] = (1 - a) * c_emb[color] + a * s_emb[shape] + noise * rng.standard_normal((B, d))
    return x, {"color": color, "shape": shape, "count": count}


# ------------------------------------------------------------------------------------------ probes


def test_probes_read_colour_at_depth_1_and_shape_at_depth_L():
    x, labels = colour_then_shape()
    test = image_split(x.shape[1])
    probe, not_converged = probe_per_depth(x, labels, test)
    assert not_converged == 0
    col, shp, cnt = probe["color"], probe["shape"], probe["count"]
    assert col["normalized"][0] > 0.6 and shp["normalized"][-1] > 0.6
    assert abs(shp["normalized"][0]) < 0.12 and abs(col["normalized"][-1]) < 0.12  # chance level
    assert max(abs(s) for s in cnt["normalized"]) < 0.15  # in no depth
    # chance is the majority-class rate of the test split, the score its normalisation
    y = labels["shape"][test]
    assert shp["chance"] == pytest.approx(np.bincount(y).max() / len(y))
    assert shp["n_test"] == test.sum() == round(0.3 * x.shape[1]) and shp["n_train"] == (~test).sum()
    for r in probe.values():
        np.testing.assert_allclose(r["normalized"], [(a - r["chance"]) / (1 - r["chance"]) for a in r["acc"]])
    # deterministic
    assert probe_per_depth(x, labels, test)[0] == probe


def test_crossover_detector_reports_colour_to_shape():
    x, labels = colour_then_shape()
    res = analyse_views({"pooled_LBd": x, "labels": labels}, k=N_CLASS, seed=0)
    assert list(res["views"]) == ["z/mean"]
    c = res["views"]["z/mean"]["crossover"]
    assert c["nmi_top"][0] == "color" and c["nmi_top"][-1] == "shape"
    assert c["nmi_path"] == "color -> shape" and c["probe_path"] == "color -> shape"
    assert c["gains"] == ["shape"] and c["losses"] == ["color"]  # count neither gains nor loses
    assert c["probe_delta"]["shape"] > 0.5 > -0.5 > c["probe_delta"]["color"]
    nmi = res["views"]["z/mean"]["nmi"]
    assert nmi["color"][0] > 0.5 > nmi["color"][-1] and nmi["shape"][-1] > 0.5 > nmi["shape"][0]
    # the reverse trajectory is reported the other way round
    rev = crossover({f: v[::-1] for f, v in nmi.items()},
                    {f: {**r, "normalized": r["normalized"][::-1]} for f, r in res["views"]["z/mean"]["probe"].items()})
    assert rev["nmi_path"] == rev["probe_path"] == "shape -> color" and rev["gains"] == ["color"]
    assert path(["a", "a", None, "b", "a"]) == "a -> b -> a"


def test_probes_on_noise_read_chance():
    """Pure noise: 1000 images (test split 300, binomial sd of an accuracy about 0.02-0.03). Stated tolerance:
    accuracy at most 0.05 above chance and 0.12 below it (the majority-class rate sits a little above 1 / classes,
    which a probe that learns nothing reads), within 0.07 of 1 / classes, no gains or losses over depth."""
    rng = np.random.default_rng(3)
    B = 1000
    x = rng.standard_normal((3, B, 32)).astype(np.float32)
    labels = {"shape": rng.integers(0, 8, B), "count": rng.integers(0, 3, B), "texture": rng.integers(0, 4, B)}
    res = analyse_views({"pooled_LBd": x, "labels": labels}, k=8, seed=0)
    v = res["views"]["z/mean"]
    for f, r in v["probe"].items():
        k = r["n_classes"]
        for a, s in zip(r["acc"], r["normalized"]):
            assert -0.12 <= a - r["chance"] <= 0.05, (f, a, r["chance"])
            assert abs(a - 1 / k) <= 0.07, (f, a)
            assert s <= 0.1
        assert all(n < 0.05 for n in v["nmi"][f])
    assert v["crossover"]["gains"] == [] and v["crossover"]["losses"] == []


def test_split_chance_and_unknown_labels():
    t1, t2 = image_split(100, 0.3, seed=0), image_split(100, 0.3, seed=0)
    assert t1.dtype == bool and t1.sum() == 30 and np.array_equal(t1, t2)
    assert not np.array_equal(t1, image_split(100, 0.3, seed=1))
    with pytest.raises(ValueError, match="test_fraction"):
        image_split(10, 1.0)
    assert chance_rate(np.array([2, 2, 5, 7])) == 0.5
    assert normalized_score(0.75, 0.5) == 0.5 and np.isnan(normalized_score(1.0, 1.0))
    x, labels = colour_then_shape(L=2, B=200)
    y = labels["color"].copy()
    y[:100] = -1  # unknown: left out of both splits
    test = image_split(200)
    r = probe_per_depth(x, {"color": y}, test)[0]["color"]
    assert r["n_train"] + r["n_test"] == 100 and r["n_test"] == test[100:].sum()
    assert np.isnan(probe_per_depth(x, {"none": np.full(200, -1)}, test)[0]["none"]["acc"]).all()


def test_position_labels_keep_object_factors_on_objects_and_background_off_them():
    idx = np.array([[0, 0], [0, 5], [1, 2], [1, 3]])
    fg = np.array([0.9, 0.1, np.nan, 0.5])
    lab = {"color": np.array([3, 4]), "background": np.array([1, 2]), "count": np.array([0, 2])}
    out = position_labels(lab, idx, fg)
    assert out["color"].tolist() == [3, -1, 4, 4]
    assert out["background"].tolist() == [-1, 1, 2, -1]
    assert out["count"].tolist() == [0, 0, 2, 2]
    assert position_labels(lab, idx)["color"].tolist() == [3, 3, 4, 4]  # no masks: every position counts


def test_position_probe_splits_by_image():
    """Positions of one image all land in the same split: a probe that could memorise an image's positions from
    training would read a per-image random label above chance; split by image it reads chance."""
    rng = np.random.default_rng(0)
    B, per = 300, 6
    img_code = rng.standard_normal((B, 16)).astype(np.float32)  # an image identity code, no factor
    idx = np.stack([np.repeat(np.arange(B), per), np.tile(np.arange(per), B)], 1)
    x = (img_code[idx[:, 0]] + 0.05 * rng.standard_normal((B * per, 16)))[None].astype(np.float32)
    y = rng.integers(0, 4, B)
    feats = {"positions_LPd": x, "position_index_P2": idx, "labels": {"texture": y}}
    r = analyse_views(feats, views=[("z", POSITION)])["views"]["z/pos"]
    assert r["nmi"] is None and r["crossover"]["nmi_path"] is None
    assert r["probe"]["texture"]["normalized"][0] < 0.1
    assert r["probe"]["texture"]["n_test"] == image_split(B).sum() * per


def test_plot_probe_views_draws_the_numbers_one_panel_per_view(tmp_path):
    x, labels = colour_then_shape(L=3, B=200)
    feats = {"pooled_LBd": x, "q_mean_LBd": -x, "positions_LPd": x[:, :50], "position_index_P2":
             np.stack([np.arange(50), np.zeros(50, int)], 1), "labels": labels}
    assert available_views(feats) == [("z", "mean"), ("z", POSITION), ("q", "mean")]
    res = analyse_views(feats, k=8)
    figs = {stem: fig for stem, fig, _ in figures_by_pooling(res, lpix=1, lsem=3)}
    assert set(figs) == {"probes_mean", "nmi_views_mean", "probes_pos"}
    fig = figs["probes_mean"]
    assert [ax.get_title() for ax in fig.axes] == ["z", "q"]
    ax = fig.axes[1]
    lines = data_lines(ax)
    drawn = [ln for ln in lines if ln.get_gid() != CHANCE_GID]
    probe = res["views"]["q/mean"]["probe"]
    assert len(drawn) == len(probe)
    for ln, (f, r) in zip(drawn, probe.items()):
        np.testing.assert_array_equal(ln.get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(ln.get_ydata(), r["normalized"])
        assert ln.get_label().startswith(f) and f"chance {r['chance']:.2f}" in ln.get_label()
    assert [ln.get_ydata()[0] for ln in lines if ln.get_gid() == CHANCE_GID] == [0.0]
    with pytest.raises(ValueError):
        plot_probe_views({}, 1, 2)
    # strict JSON: NaN becomes null
    text = json.dumps(to_json({"a": [float("nan"), np.float32(0.5)], "b": np.arange(2)}), allow_nan=False)
    assert json.loads(text) == {"a": [None, 0.5], "b": [0, 1]}


def test_view_array_names_missing_views():
    feats = {"pooled_LBd": np.zeros((2, 3, 4))}
    assert view_array(feats, "z", "mean").shape == (2, 3, 4)
    with pytest.raises(KeyError, match="re-extract"):
        view_array(feats, "recon", "fg")
    with pytest.raises(ValueError, match="view"):
        view_array(feats, "nope")


# ------------------------------------------------------------------------- views from a tiny model


@pytest.fixture(scope="module")
def tiny_views(tmp_path_factory):
    """compute_arrays on a random tiny tokenizer (Lpix=2, Lsem=3, codebooks initialised from one batch) and a random
    teacher: no training, no files besides the EvoShapes cache."""
    import torch

    from analysis.extract import _select_items, compute_arrays
    from evotok.config import load_config
    from evotok.data import build_dataset
    from evotok.models.teacher import load_teacher
    from evotok.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("views")
    cfg = load_config(None, ["teacher.random_init=true", f"data.cache_dir={tmp}", "data.train_size=16",
                             "data.val_size=24", "data.test_size=16", "model.lpix=2", "model.lsem=3",
                             "model.quantizer.codebook_size=16"])
    teacher = load_teacher(cfg).eval()
    tok = build_tokenizer(cfg, teacher.width, teacher.token_grid)
    ds = build_dataset(cfg.data, "val")
    B, P = 24, 40
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():  # one training-mode pass initialises the codebooks from the batch's residuals
            tok.train().quantize(torch.stack([ds[i]["image"] for i in range(B)]))
        tok.eval()
        arrays = compute_arrays(tok, teacher, _select_items(ds, B, 0), B, n_positions=P, batch_size=10, device="cpu")
    finally:
        torch.set_num_threads(prev)
    return {"arrays": arrays, "tok": tok, "teacher": teacher, "ds": ds, "B": B, "P": P, "cfg": cfg}


def test_every_view_has_the_documented_shape(tiny_views):
    import torch

    a, tok, B, P = tiny_views["arrays"], tiny_views["tok"], tiny_views["B"], tiny_views["P"]
    L, d, W = tok.depth, tiny_views["cfg"].model.quantizer.dim, tiny_views["teacher"].width
    h, w = tok.grid
    assert set(available_views(a)) == set(VIEW_ARRAYS)
    width = {"z": d, "q": d, "sem": W, "recon": W}
    for view in VIEWS:
        for pooling in POOLINGS:
            assert view_array(a, view, pooling).shape == (L, B, width[view]), (view, pooling)
            assert view_array(a, view, pooling).dtype == np.float32
        assert view_array(a, view, POSITION).shape == (L, P, width[view]), view
    assert a["position_index_P2"].shape == (P, 2) and a["position_fg_P"].shape == (P,)
    assert a["fg_Bhw"].shape == (B, h, w) and a["fg_known_B"].all() and tuple(a["latent_hw"]) == (h, w)
    # the views are what they say: q sums to z, poolings of z_l from the model, positions index z_l
    z, q = view_array(a, "z", "mean"), view_array(a, "q", "mean")
    np.testing.assert_allclose(np.cumsum(q, axis=0), z, atol=1e-5)
    x = torch.stack([tiny_views["ds"][i]["image"] for i in range(B)])
    with torch.no_grad():
        zt = tok.cumulative(x).flatten(-2).numpy()  # (L, B, d, T)
        sem3 = tok.decode_semantic(tok.cumulative(x)[2], 3).numpy()  # (B, T, W)
    np.testing.assert_allclose(view_array(a, "z", "max"), zt.max(-1), atol=1e-5)
    wts = a["fg_Bhw"].reshape(B, -1)
    np.testing.assert_allclose(view_array(a, "z", "fg"), (zt * wts[None, :, None]).sum(-1) / wts.sum(-1)[None, :, None],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(view_array(a, "sem", "mean")[2], sem3.mean(1), rtol=1e-4, atol=1e-5)
    bi, pi = a["position_index_P2"].T
    np.testing.assert_allclose(view_array(a, "z", POSITION), zt[:, bi, :, pi].transpose(1, 0, 2), atol=1e-6)
    np.testing.assert_allclose(view_array(a, "sem", POSITION)[2], sem3[bi, pi], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["position_fg_P"], wts[bi, pi])
    # the recon view differs from the semantic view and from depth to depth (it is the reconstruction's)
    r = view_array(a, "recon", "mean")
    assert not np.allclose(r, view_array(a, "sem", "mean")) and not np.allclose(r[0], r[-1])


def test_foreground_mask_finds_the_objects(tiny_views):
    """The pixel-difference mask is non-empty exactly in the 2x2 cells that hold an object (EvoShapes' own record)
    and covers a plausible share of them (objects span 70-90% of a cell side; a star covers least)."""
    a, ds, B = tiny_views["arrays"], tiny_views["ds"], tiny_views["B"]
    fg = a["fg_Bhw"]
    h, w = fg.shape[1:]
    quad = fg.reshape(B, 2, h // 2, 2, w // 2).mean(axis=(2, 4)).reshape(B, 4)  # TL, TR, BL, BR
    cells = np.asarray(ds.cells_N4[:B])
    assert np.array_equal(quad > 0.05, cells) and quad[~cells].max() == 0.0  # pixel noise is never foreground
    assert 0.15 < quad[cells].min() and quad[cells].max() < 0.8  # 0.18-0.69 over the first 1024 val images
    assert np.all((fg >= 0) & (fg <= 1))
