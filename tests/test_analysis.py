"""Analysis package on synthetic arrays with known structure (no checkpoint, no torch model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis import extract as extract_mod
from analysis.depth_curves import feature_depth_metrics, plot_depth_curves
from analysis.kmeans import cluster_depths, cluster_mosaic, nmi_per_depth, plot_cluster_grids, plot_nmi
from analysis.make_figures import make_figures
from analysis.plotting import LPIX_GID, LSEM_GID, data_lines, save_figure
from analysis.tables import ablation_rows, ablation_table
from analysis.tsne import depth_index, plot_tsne, subsample_positions, tsne_embed

N_COLOR, N_SHAPE = 4, 4


def _cos(a, b):
    """Cosine along the last axis by its definition, in float64 (the test's reference for clipsim_pix)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """t-SNE and K-means spin OpenMP/BLAS threads; on a shared 2-core machine one thread is far faster."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def synthetic(L=6, B=160, d=8, P=60, seed=0, hw=4, E=12, W=10, px=8):
    """Features that cluster by colour at depth 1 and by shape at depth L, linearly interpolated between."""
    rng = np.random.default_rng(seed)
    color = rng.integers(0, N_COLOR, B)
    shape = rng.integers(0, N_SHAPE, B)
    # well separated class centres in disjoint halves of the feature space
    c_cent = np.zeros((N_COLOR, d)); c_cent[np.arange(N_COLOR), np.arange(N_COLOR)] = 6.0
    s_cent = np.zeros((N_SHAPE, d)); s_cent[np.arange(N_SHAPE), N_COLOR + np.arange(N_SHAPE)] = 6.0
    pooled = np.empty((L, B, d), np.float32)
    for l in range(L):
        a = l / (L - 1)
        pooled[l] = (1 - a) * c_cent[color] + a * s_cent[shape] + 0.3 * rng.standard_normal((B, d))
    pos_img = np.sort(rng.integers(0, B, P))
    positions = pooled[:, pos_img] + 0.1 * rng.standard_normal((L, P, d)).astype(np.float32)
    orig = rng.standard_normal((B, E)).astype(np.float32)
    recon = np.stack([orig + (L - l) * 0.3 * rng.standard_normal((B, E)) for l in range(L)]).astype(np.float32)
    images = rng.integers(0, 256, (B, px, px, 3), dtype=np.uint8)
    arrays = {
        "pooled_LBd": pooled,
        "positions_LPd": positions.astype(np.float32),
        "position_index_P2": np.stack([pos_img, rng.integers(0, hw * hw, P)], 1),
        "recon_teacher_LBE": recon,
        "orig_teacher_BE": orig,
        "orig_tokens_BW": rng.standard_normal((B, W)).astype(np.float32),
        "sem_LBW": rng.standard_normal((L, B, W)).astype(np.float32),
        "clipsim_sem_LB": np.stack([np.full(B, 0.1 * (l + 1)) for l in range(L)]).astype(np.float32),
        "clipsim_pix_LB": _cos(recon, orig[None]).astype(np.float32),
        "psnr_LB": np.stack([np.full(B, 15.0 + l) for l in range(L)]).astype(np.float32),
        "images_BHWC": images,
        "factors": np.array(["shape", "color"]),
        "label_shape": shape.astype(np.int64),
        "label_color": color.astype(np.int64),
        "lpix": np.array(2), "lsem": np.array(L), "L": np.array(L), "split": np.array("val"),
    }
    return arrays


# ------------------------------------------------------------------------------------ K-means / NMI


def test_nmi_curves_cross_as_constructed():
    a = synthetic()
    labels = {"color": a["label_color"], "shape": a["label_shape"]}
    nmi = nmi_per_depth(a["pooled_LBd"], labels, k=4, seed=0)
    L = a["pooled_LBd"].shape[0]
    assert set(nmi) == {"color", "shape"} and all(len(v) == L for v in nmi.values())
    assert nmi["color"][0] > 0.8 and nmi["color"][-1] < 0.2
    assert nmi["shape"][0] < 0.2 and nmi["shape"][-1] > 0.8
    diff = np.array(nmi["color"]) - np.array(nmi["shape"])
    assert diff[0] > 0 > diff[-1]  # the curves cross
    # deterministic for a seed
    assert nmi_per_depth(a["pooled_LBd"], labels, k=4, seed=0) == nmi


def test_nmi_ignores_unknown_labels():
    a = synthetic()
    color = a["label_color"].copy()
    color[::2] = -1
    nmi = nmi_per_depth(a["pooled_LBd"], {"color": color, "none": np.full(len(color), -1)}, k=4, seed=0)
    assert nmi["color"][0] > 0.8
    assert all(np.isnan(nmi["none"]))


def test_cluster_depths_drops_depths_beyond_L():
    a = synthetic(L=6)
    clusters = cluster_depths(a["pooled_LBd"], depths=(1, 4, 8, 16), k=4, seed=0)
    assert sorted(clusters) == [1, 4]
    B = a["pooled_LBd"].shape[1]
    assert all(c.shape == (B,) and set(np.unique(c)) <= set(range(4)) for c in clusters.values())


def test_cluster_grids_show_cluster_members():
    a = synthetic()
    clusters = cluster_depths(a["pooled_LBd"], depths=(1, 6), k=4, seed=0)
    fig = plot_cluster_grids(a["images_BHWC"], clusters, n_per_cluster=5)
    assert len(fig.axes) == 2
    H = W = a["images_BHWC"].shape[1]
    for ax, l in zip(fig.axes, sorted(clusters)):
        assert ax.get_title() == f"depth {l}"
        shown = np.asarray(ax.images[0].get_array())
        mosaic, members = cluster_mosaic(a["images_BHWC"], clusters[l], 5)
        np.testing.assert_array_equal(shown, mosaic)
        for r, idx in enumerate(members):
            assert np.all(clusters[l][idx] == np.unique(clusters[l])[r])
            for j, b in enumerate(idx):
                y, x = 1 + r * (H + 1), 1 + j * (W + 1)
                np.testing.assert_array_equal(shown[y:y + H, x:x + W], a["images_BHWC"][b])
        sizes = np.bincount(clusters[l])
        assert [t.get_text() for t in ax.get_yticklabels()] == [f"c{c} ({n})" for c, n in enumerate(sizes) if n]


def test_plot_nmi_draws_the_numbers():
    nmi = {"shape": [0.1, 0.5, 0.9], "color": [0.9, 0.4, 0.1], "other": [0.2, 0.2, 0.2]}
    fig = plot_nmi(nmi, lpix=1, lsem=3)
    ax = fig.axes[0]
    lines = data_lines(ax)
    assert len(lines) == 3
    for ln, (f, v) in zip(lines, nmi.items()):
        np.testing.assert_array_equal(ln.get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(ln.get_ydata(), v)
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", ":"]
    marks = {ln.get_gid(): ln.get_xdata()[0] for ln in ax.lines if ln.get_gid() in (LPIX_GID, LSEM_GID)}
    assert marks == {LPIX_GID: 1, LSEM_GID: 3}
    assert ax.get_xlabel() == "depth $l$" and "NMI" in ax.get_ylabel()


# -------------------------------------------------------------------------------------------- t-SNE


def test_tsne_one_point_per_sample_and_plot_shows_them():
    a = synthetic(L=4, P=30)
    pos = a["positions_LPd"]
    emb = tsne_embed(pos, seed=0, max_iter=250)
    assert emb.shape == (4 * 30, 2) and np.isfinite(emb).all()
    depth = depth_index(4, 30)
    assert depth.shape == (120,) and depth[0] == 1 and depth[-1] == 4
    fig = plot_tsne(emb, depth, lpix=2, lsem=4)
    ax = fig.axes[0]
    sc = ax.collections[0]
    np.testing.assert_allclose(np.asarray(sc.get_offsets()), emb)
    np.testing.assert_array_equal(np.asarray(sc.get_array()), depth)
    cent = np.stack([emb[depth == l].mean(0) for l in range(1, 5)])
    np.testing.assert_allclose(ax.lines[0].get_xdata(), cent[:, 0], rtol=1e-6)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), cent[:, 1], rtol=1e-6)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "depth $l$"  # the colour bar
    assert ax.get_xlabel() == "t-SNE 1" and ax.get_ylabel() == "t-SNE 2"


def test_subsample_positions_keeps_the_same_positions_at_every_depth():
    pos = np.arange(3 * 50 * 2, dtype=np.float32).reshape(3, 50, 2)
    pos[:, :, 1] = np.arange(50)[None]  # column 1 = position id, the same at every depth
    sub = subsample_positions(pos, max_points=60, seed=1)
    assert sub.shape == (3, 20, 2)
    assert all(np.array_equal(sub[0, :, 1], sub[l, :, 1]) for l in range(3))
    assert subsample_positions(pos, 10_000).shape == pos.shape


# ------------------------------------------------------------------------------------- depth curves


def _metrics(per_depth, label=None, lpix=2, lsem=4, scalars=None):
    return {"stage": "tokenizer", "step": 10, "scalars": scalars or {}, "per_depth": per_depth,
            "label": label, "lpix": lpix, "lsem": lsem}


def test_depth_curves_single_runs_and_groups():
    r1 = _metrics({"rfid": [9, 5, 3, 2], "psnr": [10, 12, 13, 13.5], "clipsim_pix": [.1, .2, .3, .4],
                   "clipsim_sem": [.2, .3, .5, .7]}, label="a")
    r2 = _metrics({"rfid": [8, 6, 4, 3], "psnr": [11, 13, 14, 14.5]}, label="a")
    r3 = _metrics({"rfid": [7, 5, 4, 3, 2, 1], "psnr": [9, 10, 11, 12, 13, 14]}, label="b", lpix=6, lsem=2)
    fig = plot_depth_curves([r1, r2, r3])
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["rFID (lower is better)", "PSNR (dB)", "CLIPSIM$_{pix}$", "CLIPSIM$_{sem}$"]
    assert all(ax.get_xlabel() == "depth $l$" for ax in axes)
    rfid = data_lines(axes[0])
    assert len(rfid) == 2  # group (r1, r2) as one mean line + r3
    np.testing.assert_allclose(rfid[0].get_ydata(), np.mean([[9, 5, 3, 2], [8, 6, 4, 3]], 0))
    assert rfid[0].get_label() == "a (mean of 2)"
    band = axes[0].collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(2) and band[:, 1].max() == pytest.approx(9)
    np.testing.assert_array_equal(rfid[1].get_xdata(), np.arange(1, 7))
    np.testing.assert_allclose(rfid[1].get_ydata(), r3["per_depth"]["rfid"])
    # markers at each group's Lpix / Lsem
    marks = sorted((ln.get_gid(), ln.get_xdata()[0]) for ln in axes[0].lines if ln.get_gid() in (LPIX_GID, LSEM_GID))
    assert marks == [(LPIX_GID, 2), (LPIX_GID, 6), (LSEM_GID, 2), (LSEM_GID, 4)]
    # clipsim_sem only in r1: a single line, a note naming the runs that lack it
    sem = data_lines(axes[3])
    assert len(sem) == 1 and sem[0].get_label() == "a"
    np.testing.assert_allclose(sem[0].get_ydata(), [.2, .3, .5, .7])
    assert any("missing" in t.get_text() and "b" in t.get_text() for t in axes[3].texts)


def test_depth_curves_std_band_and_missing_metric():
    runs = [_metrics({"psnr": [10.0, 12.0]}), _metrics({"psnr": [12.0, 16.0]})]
    fig = plot_depth_curves(runs, metrics=("psnr", "usage"), spread="std")
    band = fig.axes[0].collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(10.0) and band[:, 1].max() == pytest.approx(16.0)
    assert not data_lines(fig.axes[1])
    assert any("no per-depth 'usage'" in t.get_text() for t in fig.axes[1].texts)
    with pytest.raises(ValueError, match="spread"):
        plot_depth_curves(runs, spread="iqr")


def test_feature_depth_metrics_match_definitions():
    a = synthetic(L=3, B=40)
    m = feature_depth_metrics(a)
    expect = [float(np.mean(_cos(a["recon_teacher_LBE"][l], a["orig_teacher_BE"]))) for l in range(3)]
    np.testing.assert_allclose(m["clipsim_pix"], expect, rtol=1e-9)
    np.testing.assert_allclose(m["clipsim_sem"], [0.1, 0.2, 0.3], rtol=1e-5)
    np.testing.assert_allclose(m["psnr"], [15, 16, 17])
    assert m["rfid"][0] > m["rfid"][-1] > 0  # noisier reconstructions are further away


def test_feature_rfid_is_the_shared_frechet_distance():
    """rfid from cached arrays is evotok.eval.metrics.fid_from_features: 0 for identical sets, ||shift||^2 for a
    shifted copy (same covariance), and the 1-D closed form (mu1 - mu2)^2 + (s1 - s2)^2."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    rec = np.stack([x, x + 2.0])
    m = feature_depth_metrics({"recon_teacher_LBE": rec, "orig_teacher_BE": x})
    assert m["rfid"][0] == pytest.approx(0.0, abs=1e-6)
    assert m["rfid"][1] == pytest.approx(5 * 4.0, rel=1e-6)
    a, b = rng.normal(0, 1, (300, 1)), rng.normal(1, 3, (300, 1))
    m1 = feature_depth_metrics({"recon_teacher_LBE": b[None], "orig_teacher_BE": a})
    assert m1["rfid"][0] == pytest.approx((a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2, rel=1e-9)
    assert "rfid" not in feature_depth_metrics({"recon_teacher_LBE": rec[:, :1], "orig_teacher_BE": x[:1]})


# ------------------------------------------------------------------------------------------- tables


def test_ablation_table_one_row_per_run_with_input_values():
    runs = [
        {**_metrics({"rfid": [5, 1.25, 0.5], "psnr": [20, 24.5, 25], "clipsim_sem": [.1, .2, .875]}, lpix=2, lsem=3,
                    scalars={"vqa_accuracy": 0.625}), "name": "evotok"},
        {**_metrics({}, lpix=4, lsem=4, scalars={"val_rfid": 0.66, "val_clipsim_sem_d1": 0.1, "geneval": 0.64}), "name": "entangled"},
    ]
    header, rows = ablation_rows(runs)
    assert header == ["name", "Lpix", "Lsem", "rFID", "PSNR", "CLIPSIM_sem", "VQA acc", "GenEval"]
    assert rows[0] == ["evotok", 2, 3, 1.25, 24.5, 0.875, 0.625, None]
    assert rows[1] == ["entangled", 4, 4, 0.66, None, None, None, 0.64]
    md, csv_text = ablation_table(runs)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 2
    assert lines[2] == "| evotok | 2 | 3 | 1.25 | 24.5 | 0.875 | 0.625 | – |"
    assert lines[3] == "| entangled | 4 | 4 | 0.66 | – | – | – | 0.64 |"
    csv_lines = csv_text.strip().splitlines()
    assert csv_lines[0] == ",".join(header) and len(csv_lines) == 3
    assert csv_lines[2] == "entangled,4,4,0.66,–,–,–,0.64"
    assert ablation_table(runs, csv_missing="")[1].strip().splitlines()[2] == "entangled,4,4,0.66,,,,0.64"


# ------------------------------------------------------------------------------------------- saving


def test_save_figure_writes_png_and_pdf_and_nothing_in_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fig = plot_nmi({"shape": [0.1, 0.9]}, lpix=1, lsem=2)
    paths = save_figure(fig, tmp_path / "out", "nmi")
    assert [p.name for p in paths] == ["nmi.png", "nmi.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    assert list(cwd.iterdir()) == []
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path, "../escape")


# -------------------------------------------------------------------------------- extract cache + make_figures


def _fake_run(root: Path, name: str, lpix=2, lsem=6, metrics=None) -> Path:
    from evotok.config import Config, to_yaml

    cfg = Config()
    cfg.model.lpix, cfg.model.lsem = lpix, lsem
    run = root / "tokenizer" / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a real checkpoint")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def fake_compute(monkeypatch):
    """Replace the model part of extraction by synthetic arrays; count the calls."""
    calls = []

    def compute(ckpt, cfg, split, n_images, n_positions, seed, batch_size, device, max_image_px):
        calls.append((Path(ckpt), cfg.data.seed))
        a = synthetic(L=max(cfg.model.lpix, cfg.model.lsem), B=n_images, P=n_positions)
        a["lpix"], a["lsem"] = np.array(cfg.model.lpix), np.array(cfg.model.lsem)
        return a

    monkeypatch.setattr(extract_mod, "_compute", compute)
    return calls


def test_extract_cache_reused_and_invalidated(tmp_path, fake_compute):
    run = _fake_run(tmp_path, "r")
    p1 = extract_mod.extract(run, n_images=64, n_positions=20)
    assert p1 == run / "analysis" / "features_val_64.npz" and len(fake_compute) == 1
    mtime = p1.stat().st_mtime_ns
    p2 = extract_mod.extract(run, n_images=64, n_positions=20)
    assert p2 == p1 and len(fake_compute) == 1 and p1.stat().st_mtime_ns == mtime
    feats = extract_mod.load_features(p1)
    assert feats["pooled_LBd"].shape[:2] == (6, 64) and feats["lpix"] == 2 and feats["L"] == 6
    assert set(feats["labels"]) == {"shape", "color"}
    assert json.loads(feats["cache_key"])["n_positions"] == 20
    # a different data config recomputes
    extract_mod.extract(run, n_images=64, n_positions=20, data_overrides=["data.seed=3"])
    assert len(fake_compute) == 2 and fake_compute[-1][1] == 3
    # a changed checkpoint recomputes; the .ckpt path form finds the same run folder
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"a retrained checkpoint, longer")
    assert extract_mod.extract(ckpt, n_images=64, n_positions=20) == p1
    assert len(fake_compute) == 3
    extract_mod.extract(ckpt, n_images=64, n_positions=20)
    assert len(fake_compute) == 3
    with pytest.raises(ValueError, match="nope"):
        extract_mod.extract(run, n_images=64, data_overrides=["data.nope=1"])


@pytest.mark.slow  # part of make test, not of make test-fast
def test_make_figures_on_synthetic_runs(tmp_path, fake_compute):
    full = {"stage": "tokenizer", "step": 5, "scalars": {"vqa_accuracy": 0.5, "val_clipsim_sem": 0.75},
            "per_depth": {"rfid": [9, 5, 3, 2, 2, 2], "psnr": [10, 12, 13, 13, 13, 13]}}
    runs = [_fake_run(tmp_path / "a", "seed0", metrics=full), _fake_run(tmp_path / "b", "seed0", metrics=full),
            _fake_run(tmp_path, "no_metrics", lpix=4, lsem=3)]
    out = tmp_path / "figs"
    kw = dict(n_images=96, n_positions=40, depths=(1, 4, 8, 16), k=4, tsne_points=120, tsne_max_iter=250,
              probes="all")  # with the per-position probes (the default skips them: slow at 512 images)
    index = make_figures(runs, out, **kw)
    assert index == out / "index.html" and len(fake_compute) == 3
    names = ["a_seed0", "b_seed0", "no_metrics"]
    html = index.read_text()
    for n in names:
        for stem in ("tsne", "clusters", "nmi"):
            for ext in ("png", "pdf"):
                f = out / n / f"{stem}.{ext}"
                assert f.is_file() and f.stat().st_size > 1000, f
            assert f'src="{n}/{stem}.png"' in html
    for f in ("depth_curves.png", "depth_curves.pdf", "ablation.md", "ablation.csv", "nmi.json"):
        assert (out / f).stat().st_size > 0, f
    assert 'src="depth_curves.png"' in html and "<table>" in html and "no_metrics" in html
    nmi = json.loads((out / "nmi.json").read_text())
    assert set(nmi) == set(names)
    # probes for every view the features hold (the synthetic ones: z mean and per position, sem mean)
    for n in names:
        for stem in ("probes_mean", "probes_pos", "nmi_views_mean"):
            assert (out / n / f"{stem}.png").stat().st_size > 1000, (n, stem)
            assert f'src="{n}/{stem}.png"' in html
    probes = json.loads((out / "probes.json").read_text())
    assert set(probes) == set(names) and set(probes["a_seed0"]["views"]) == {"z/mean", "z/pos", "sem/mean"}
    z = probes["a_seed0"]["views"]["z/mean"]
    assert z["nmi"] == nmi["a_seed0"]["nmi"]  # the same K-means numbers as nmi.json
    assert z["crossover"]["nmi_path"] == "color -> shape" and z["crossover"]["probe_path"] == "color -> shape"
    assert z["crossover"]["gains"] == ["shape"] and z["crossover"]["losses"] == ["color"]
    assert probes["a_seed0"]["views"]["sem/mean"]["crossover"]["gains"] == []  # random features gain nothing
    assert "Crossover detector" in html and "z/mean: clusters follow color -&gt; shape" in html
    assert nmi["a_seed0"]["nmi"]["color"][0] > 0.8 and nmi["a_seed0"]["nmi"]["shape"][-1] > 0.8
    md = (out / "ablation.md").read_text().strip().splitlines()
    assert len(md) == 2 + 3
    # rFID, PSNR at Lpix=2 from metrics.json per_depth, CLIPSIM_sem from its scalar, not from the features
    assert md[2].startswith("| a_seed0 | 2 | 6 | 5 | 12 | 0.75 | 0.5 |")
    # the run without metrics.json: every number from the cached features (synthetic psnr_LB = 15 + l - 1)
    assert md[4].startswith("| no_metrics | 4 | 3 |") and "| 18 | 0.3 |" in md[4]
    # the run without metrics.json gets feature-computed curves, and the page says so
    assert "no_metrics: rfid, psnr, clipsim_pix, clipsim_sem per depth computed from" in html
    assert "a_seed0: clipsim_pix, clipsim_sem per depth computed from" in html
    # cached features: a second call extracts nothing
    # a features .npz is accepted in place of a run folder (no checkpoint needed)
    npz = runs[0] / "analysis" / "features_val_96.npz"
    again = make_figures([runs[2], npz], tmp_path / "again", **kw)
    assert len(fake_compute) == 3
    assert (again.parent / "seed0" / "nmi.png").is_file() and (again.parent / "no_metrics" / "tsne.pdf").is_file()


def test_vqa_depth_figure_draws_each_type_and_skips_unprobed_depths():
    from analysis.plotting import data_lines
    from analysis.vqa_depth import plot_vqa_depth

    nan = float("nan")
    per = {"vqa_shape": [0.2, nan, 0.9], "vqa_count": [0.5, nan, 0.95], "vqa_latent_shape": [0.1, nan, 0.3],
           "vqa_overall": [0.3, nan, 0.9]}
    fig = plot_vqa_depth(per, lpix=2, lsem=3, chance={"shape": 0.125})
    semantic, latent = fig.axes
    lines = {ln.get_label(): ln for ln in data_lines(semantic) if not ln.get_label().startswith("_")}
    assert set(lines) == {"shape", "count"}  # overall is not a question type
    assert list(lines["shape"].get_xdata()) == [1, 3] and list(lines["shape"].get_ydata()) == [0.2, 0.9]
    assert [ln.get_label() for ln in data_lines(latent) if not ln.get_label().startswith("_")] == ["shape"]
    with pytest.raises(ValueError, match="no vqa_"):
        plot_vqa_depth({"psnr": [1.0]})
