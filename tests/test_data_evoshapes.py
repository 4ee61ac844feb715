"""EvoShapes: determinism, caching, label/text consistency, balance, held-out pairs, visibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from evotok.config import DataConfig
from evotok.data import collate as _collate_mod  # noqa: F401  (lazy export works)
from evotok.data.collate import collate
from evotok.data.evoshapes import (
    BG_RGB, CHUNK, FACTOR_KEYS, FACTORS, FG_RGB, LOWLEVEL_FACTORS, SEMANTIC_FACTORS, SHAPE_PLURALS, EvoShapes,
    EvoShapesParams, allowed_pairs, caption, generate, heldout_pairs, labels_from_row, qa_pairs, semantic_caption,
    zero_shot_prompt_sets, zero_shot_prompts,
)


def _cfg(tmp, **kw) -> DataConfig:
    base = dict(cache_dir=str(tmp), train_size=3000, val_size=600, test_size=600, seed=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("evocache")


@pytest.fixture(scope="module")
def train(cache):
    return EvoShapes(_cfg(cache), "train")


def test_vocabulary():
    assert len(FACTORS["shape"]) >= 8 and len(FACTORS["color"]) >= 8
    assert FACTORS["count"] == ["one", "two", "three"]
    assert set(FACTOR_KEYS) == set(FACTORS) and set(SEMANTIC_FACTORS) | set(LOWLEVEL_FACTORS) == set(FACTORS)
    assert len(FG_RGB) == len(FACTORS["color"]) and len(BG_RGB) == len(FACTORS["background"])
    # every background is far (RGB distance) from every foreground colour
    dist = np.linalg.norm(FG_RGB[:, None] - BG_RGB[None], axis=-1)
    assert dist.min() > 0.3
    for f in FACTORS:
        p = zero_shot_prompts(f)
        assert len(p) == len(FACTORS[f]) and len(set(p)) == len(p)
    assert zero_shot_prompts("shape")[FACTORS["shape"].index("star")] == "stars"
    sets = zero_shot_prompt_sets("count")
    assert len(sets) == 3 and all(len(s) == len(FACTORS["shape"]) for s in sets) and "two stars" in sets[1]
    with pytest.raises(ValueError, match="shape"):
        zero_shot_prompts("size")


def test_generator_determinism():
    p = EvoShapesParams(seed=3)
    a, b = generate(p, "train", 0, 300), generate(p, "train", 0, 300)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = generate(EvoShapesParams(seed=4), "train", 0, 300)
    assert not np.array_equal(a.images_NCHW, c.images_NCHW)
    assert not np.array_equal(a.labels_NF, c.labels_NF)
    v = generate(p, "val", 0, 300)
    assert not np.array_equal(a.images_NCHW, v.images_NCHW)
    # item i does not depend on the requested range (crosses a chunk border)
    lo, hi = CHUNK - 5, CHUNK + 5
    whole = generate(p, "train", 0, hi)
    part = generate(p, "train", lo, hi)
    np.testing.assert_array_equal(whole.images_NCHW[lo:], part.images_NCHW)
    one = generate(p, "train", CHUNK + 2, CHUNK + 3)
    np.testing.assert_array_equal(one.images_NCHW[0], whole.images_NCHW[CHUNK + 2])
    assert a.images_NCHW.dtype == np.uint8 and a.images_NCHW.shape == (300, 3, 32, 32)


def test_cache_reused_and_memory_mapped(cache, train):
    assert isinstance(train.arrays.images_NCHW, np.memmap)
    stamp = (train.path / "images.npy").stat().st_mtime_ns
    again = EvoShapes(_cfg(cache), "train")
    assert again.path == train.path and (again.path / "images.npy").stat().st_mtime_ns == stamp
    other = EvoShapes(_cfg(cache, train_size=100, noise_sigma=0.05), "train")
    assert other.path != train.path
    g = generate(train.params, "train", 0, 100)
    np.testing.assert_array_equal(np.asarray(train.arrays.images_NCHW[:100]), g.images_NCHW)
    # the cache files are generation-only: a different noise changes pixels, not labels
    np.testing.assert_array_equal(other.labels_NF[:100], train.labels_NF[:100])
    assert not np.array_equal(other.images_uint8(slice(0, 100)), g.images_NCHW)


def test_item_schema_and_same_tensor_everywhere(train):
    idx = [5, 17, 1100, 2999]
    alone = [train[i]["image"] for i in idx]
    item = train[5]
    assert set(item) == {"image", "labels", "caption", "caption_sem", "qa", "conversations", "task", "index", "source"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["index"] == 5 and item["source"] == "evoshapes" and item["task"] == ""
    conv = item["conversations"]  # data.conversations=qa: every question, one round each, the image in the first
    assert [t["from"] for t in conv] == ["human", "gpt"] * len(item["qa"]) == ["human", "gpt"] * 5
    assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in conv) == 1
    rounds = [(conv[2 * i]["value"].replace("<image>\n", ""), conv[2 * i + 1]["value"]) for i in range(5)]
    assert sorted(rounds) == sorted((q["question"], q["answer"]) for q in item["qa"])
    # the round order varies between items: every question type comes first (the image's turn) for some
    firsts = {train[i]["conversations"][0]["value"] for i in range(60)}
    assert len(firsts) == 5
    batch = collate([train[i] for i in idx])
    assert torch.equal(batch["image"], torch.stack(alone))
    np.testing.assert_array_equal(train.images_uint8(idx).astype(np.float32) / 255.0, batch["image"].numpy())
    sub = torch.utils.data.Subset(train, idx)
    for workers in (0, 2):
        loader = DataLoader(sub, batch_size=2, num_workers=workers, collate_fn=collate)
        got = torch.cat([b["image"] for b in loader])
        assert torch.equal(got, torch.stack(alone)), f"num_workers={workers}"
        labs = torch.cat([b["labels"]["shape"] for b in loader])
        assert labs.tolist() == [train.labels(i)["shape"] for i in idx]


def test_text_matches_labels(train):
    for i in range(0, 3000, 37):
        lab = train.labels(i)
        item = train[i]
        shape, color = FACTORS["shape"][lab["shape"]], FACTORS["color"][lab["color"]]
        n = lab["count"] + 1
        words = item["caption"].split()
        assert words[0] == FACTORS["count"][lab["count"]]
        assert color in words and FACTORS["texture"][lab["texture"]] in words
        assert (SHAPE_PLURALS[shape] if n > 1 else shape) in words
        assert item["caption"].endswith(f"on a {FACTORS['background'][lab['background']]} background")
        assert item["caption_sem"] == f"{FACTORS['count'][lab['count']]} {SHAPE_PLURALS[shape] if n > 1 else shape}"
        sem = set(item["caption_sem"].split())
        lowlevel_words = set(FACTORS["color"]) | set(FACTORS["texture"]) | set(FACTORS["background"])
        assert not sem & lowlevel_words
        answers = {q["type"]: q["answer"] for q in item["qa"]}
        assert set(answers) == {"shape", "color", "count", "texture", "background"}
        assert answers == {"shape": shape, "color": color, "count": FACTORS["count"][lab["count"]],
                           "texture": FACTORS["texture"][lab["texture"]],
                           "background": FACTORS["background"][lab["background"]]}
        assert item["caption"] == caption(lab) and qa_pairs(lab) == item["qa"]
        assert semantic_caption(lab) == item["caption_sem"]


def test_partial_captions_name_only_their_factors():
    from evotok.data.evoshapes import partial_caption

    lab = {"shape": 3, "count": 0, "color": 0, "texture": 1, "background": 2}
    assert partial_caption(lab, ["shape"]) == "stars"
    assert partial_caption(lab, ["count", "shape"]) == "one star"
    assert partial_caption(lab, ["color", "texture", "shape"]) == "red striped stars"
    assert partial_caption(lab, ["shape", "background"]) == "stars on a gray background"
    assert partial_caption(lab, list(FACTORS)) == caption(lab)
    with pytest.raises(ValueError, match="unknown factor"):
        partial_caption(lab, ["size"])


def test_caption_conversations(cache):
    from evotok.data.evoshapes import CAPTION_QUESTION

    item = EvoShapes(_cfg(cache, conversations="caption"), "train")[5]
    assert item["conversations"] == [{"from": "human", "value": "<image>\n" + CAPTION_QUESTION},
                                     {"from": "gpt", "value": item["caption"]}]


def test_every_factor_balanced(train):
    from scipy.stats import chisquare

    labels = np.asarray(train.labels_NF)
    for j, f in enumerate(FACTOR_KEYS):
        counts = np.bincount(labels[:, j], minlength=len(FACTORS[f]))
        assert counts.min() > 0, f
        assert counts.max() / counts.min() < 1.25, (f, counts)
        if f in ("count", "texture", "background"):  # drawn exactly balanced per chunk
            assert chisquare(counts).pvalue > 0.01, (f, counts)


def test_heldout_pairs(cache, train):
    held = set(heldout_pairs(0, 0.1))
    assert len(held) == round(0.1 * len(FACTORS["color"]) * len(FACTORS["shape"]))
    assert heldout_pairs(0, 0.1) == heldout_pairs(0, 0.1) and set(heldout_pairs(1, 0.1)) != held
    assert len({c for c, _ in held}) == len(held) and len({s for _, s in held}) == len(held)  # spread out
    assert heldout_pairs(0, 0.0) == [] and len(allowed_pairs(0, 0.0, "train")) == 64
    cfg = _cfg(cache)
    for split in ("train", "val", "test"):
        ds = train if split == "train" else EvoShapes(cfg, split)
        pairs = {(int(c), int(s)) for s, c in np.asarray(ds.labels_NF)[:, [0, 2]]}
        assert not pairs & held, split
    ho = EvoShapes(cfg, "heldout")
    assert len(ho) == cfg.test_size
    pairs = {(int(c), int(s)) for s, c in np.asarray(ho.labels_NF)[:, [0, 2]]}
    assert pairs == held


def _foreground(images_NCHW: np.ndarray, labels_NF: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: pixels far from the background colour."""
    bg = BG_RGB[labels_NF[:, 4]] * 255.0
    d = np.abs(images_NCHW.astype(np.float32) - bg[:, :, None, None]).max(axis=1)
    return d > 40


@pytest.mark.parametrize("res", [32, 64])
def test_objects_visible_match_count(res):
    p = EvoShapesParams(resolution=res, noise_sigma=0.0)
    g = generate(p, "train", 0, 400)
    assert g.images_NCHW.shape == (400, 3, res, res)
    fg = _foreground(g.images_NCHW, g.labels_NF)
    c = res // 2
    cells = np.stack([fg[:, :c, :c], fg[:, :c, c:], fg[:, c:, :c], fg[:, c:, c:]], axis=1).mean(axis=(2, 3))
    # occupied cells are covered 15-85% (a star is the thinnest), empty cells are pure background
    assert (cells[g.cells_N4] > 0.15).all() and (cells[g.cells_N4] < 0.85).all()
    assert (cells[~g.cells_N4] == 0).all()
    np.testing.assert_array_equal(g.cells_N4.sum(1), g.labels_NF[:, 1] + 1)
    n_comp = np.array([ndimage.label(m, structure=np.ones((3, 3)))[1] for m in fg])
    assert (n_comp == g.labels_NF[:, 1] + 1).mean() > 0.97


def test_noise_sigma_and_64px_dataset(cache):
    ds = EvoShapes(_cfg(cache, resolution=64, train_size=50), "train")
    assert ds[0]["image"].shape == (3, 64, 64)
    clean = generate(EvoShapesParams(noise_sigma=0.0), "train", 0, 200).images_NCHW.astype(np.float32)
    noisy = generate(EvoShapesParams(noise_sigma=0.02), "train", 0, 200).images_NCHW.astype(np.float32)
    resid = (noisy - clean) / 255.0
    assert 0.015 < resid.std() < 0.025


def test_bad_params():
    with pytest.raises(ValueError, match="data.resolution"):
        EvoShapesParams(resolution=33)
    with pytest.raises(ValueError, match="split"):
        generate(EvoShapesParams(), "dev", 0, 1)
    assert labels_from_row([1, 2, 3, 0, 1]) == {"shape": 1, "count": 2, "color": 3, "texture": 0, "background": 1}


def test_heldout_empty_without_fraction(tmp_path):
    from evotok.data import DataError

    with pytest.raises(DataError, match="data.heldout_fraction"):
        EvoShapes(_cfg(tmp_path, heldout_fraction=0.0, train_size=10), "heldout")


def test_preview_and_bench(tmp_path):
    import json

    from PIL import Image

    from evotok.config import Config
    from evotok.data.bench import bench_data
    from evotok.data.preview import write_preview

    cfg = Config(data=_cfg(tmp_path / "cache", train_size=20))
    out = write_preview(cfg, tmp_path / "prev" / "p.png", n=10)
    assert out.is_file() and Image.open(out).size[0] > 300
    res = bench_data(resolutions=(32,), n=200, out_dir=tmp_path / "results")
    saved = json.loads((tmp_path / "results" / "bench_data.json").read_text())
    assert saved == res and set(res) == {"date", "host", "cpu_count", "rows"}
    row = res["rows"][0]
    assert row["resolution"] == 32 and row["images"] == 200 and row["images_per_s"] > 0


# ------------------------------------------------------------------------------------ presets

P64 = "evoshapes64"


def _digest(g) -> str:
    import hashlib

    m = hashlib.sha256()
    for a in g:
        m.update(np.ascontiguousarray(a).tobytes())
    return m.hexdigest()[:16]


def test_default_preset_unchanged():
    # Pinned from the generator before presets were added (commit e081ca9, `generate` on the items below): the
    # default preset's pixels, labels, cells and cache key must stay byte-identical.
    assert _digest(generate(EvoShapesParams(), "train", 0, 8)) == "3f22eb5973c103a9"
    assert _digest(generate(EvoShapesParams(), "heldout", 0, 8)) == "a1421be682aa195b"
    assert _digest(generate(EvoShapesParams(resolution=64), "val", 0, 8)) == "59fb52d8431e8a01"
    assert EvoShapesParams().key("train", 100) == "4ae25062faa3d9c3"
    assert EvoShapesParams(preset="evoshapes").key("train", 100) == "4ae25062faa3d9c3"


def test_preset_registry_and_config_errors():
    from evotok.config import DATA_PRESETS, ConfigError, load_config
    from evotok.data.evoshapes import PRESETS, factors

    assert set(PRESETS) == set(DATA_PRESETS) and all(PRESETS[p].resolutions == DATA_PRESETS[p] for p in PRESETS)
    assert factors() is FACTORS
    hard = factors(P64)
    assert tuple(hard) == FACTOR_KEYS and len(hard["shape"]) > len(FACTORS["shape"])
    assert all(hard[f] == FACTORS[f] for f in FACTOR_KEYS if f != "shape")
    assert len(zero_shot_prompts("shape", P64)) == len(hard["shape"]) == len(set(zero_shot_prompts("shape", P64)))
    assert EvoShapesParams(preset=P64, resolution=64).key("train", 100) != EvoShapesParams(resolution=64).key("train", 100)
    with pytest.raises(ValueError, match="did you mean 'evoshapes64'"):
        EvoShapesParams(preset="evoshape64", resolution=64)
    with pytest.raises(ValueError, match="data.resolution.*evoshapes64"):
        EvoShapesParams(preset=P64, resolution=32)
    with pytest.raises(ConfigError, match="data.preset.*did you mean 'evoshapes64'"):
        load_config(None, ["data.preset=evoshapes_64", "data.resolution=64"])
    with pytest.raises(ConfigError, match="data.resolution.*supported: 64"):
        load_config(None, ["data.preset=evoshapes64"])
    for name in ("teacher/tiny64", "tokenizer/evotok_tiny64"):
        cfg = load_config(name, stage=name.split("/")[0])
        assert (cfg.data.preset, cfg.data.resolution) == (P64, 64), name


@pytest.fixture(scope="module")
def train64(cache):
    return EvoShapes(_cfg(cache, preset=P64, resolution=64, train_size=2048, val_size=1024, test_size=1024), "train")


def test_preset64_determinism(train64):
    p = train64.params
    # a fresh range across a chunk border equals the cached split (generated chunk by chunk, earlier)
    g = generate(p, "train", CHUNK - 5, CHUNK + 3)
    np.testing.assert_array_equal(g.images_NCHW, train64.images_uint8(slice(CHUNK - 5, CHUNK + 3)))
    np.testing.assert_array_equal(g.labels_NF, train64.labels_NF[CHUNK - 5:CHUNK + 3])
    other = generate(EvoShapesParams(preset=P64, resolution=64, seed=3), "train", 0, 8)
    assert not np.array_equal(other.images_NCHW, train64.images_uint8(slice(0, 8)))
    assert not np.array_equal(other.labels_NF, train64.labels_NF[:8])


def test_preset64_schema_text_and_workers(train64):
    from evotok.data.evoshapes import factors

    fac = factors(P64)
    item = train64[7]
    assert set(item) == {"image", "labels", "caption", "caption_sem", "qa", "conversations", "task", "index", "source"}
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32 and item["source"] == "evoshapes"
    new_shapes = set(fac["shape"]) - set(FACTORS["shape"])
    seen = set()
    for i in range(0, 2048, 41):
        lab, it = train64.labels(i), train64[i]
        assert it["caption"] == caption(lab, P64) and it["caption_sem"] == semantic_caption(lab, P64)
        answers = {q["type"]: q["answer"] for q in it["qa"]}
        assert answers == {f: fac[f][lab[f]] for f in ("shape", "color", "count", "texture", "background")}
        seen.add(answers["shape"])
    assert seen & new_shapes  # the extra classes appear and are named
    idx = [3, 1500, 2047]
    alone = torch.stack([train64[i]["image"] for i in idx])
    for workers in (0, 2):
        got = torch.cat([b["image"] for b in DataLoader(torch.utils.data.Subset(train64, idx), batch_size=2,
                                                        num_workers=workers, collate_fn=collate)])
        assert torch.equal(got, alone), f"num_workers={workers}"


def test_preset64_balance(train64):
    from scipy.stats import chisquare

    from evotok.data.evoshapes import factors

    labels = np.asarray(train64.labels_NF)
    for j, f in enumerate(FACTOR_KEYS):
        counts = np.bincount(labels[:, j], minlength=len(factors(P64)[f]))
        assert counts.min() > 0 and counts.max() / counts.min() < 1.25, (f, counts)
        if f in ("count", "texture", "background", "color"):  # color: whole held-out diagonals keep it exact
            assert chisquare(counts).pvalue > 0.01, (f, counts)


def test_preset64_heldout_pairs(cache, train64):
    held = set(heldout_pairs(0, 0.1, P64))
    assert len(held) == len(FACTORS["color"])  # one whole diagonal: every colour loses one shape
    assert len({c for c, _ in held}) == len(held) and len({s for _, s in held}) == len(held)
    assert held != set(heldout_pairs(0, 0.1))  # the preset has its own pairs
    cfg = _cfg(cache, preset=P64, resolution=64, train_size=2048, val_size=1024, test_size=1024)
    for ds in (train64, EvoShapes(cfg, "val")):
        assert not {(int(c), int(s)) for s, c in np.asarray(ds.labels_NF)[:, [0, 2]]} & held
    ho = EvoShapes(cfg, "heldout")
    assert {(int(c), int(s)) for s, c in np.asarray(ho.labels_NF)[:, [0, 2]]} == held


def test_preset64_shapes_equal_area_differ_in_outline():
    from evotok.data.evoshapes import _outline_cover, factors

    names = factors(P64)["shape"]
    k = len(names)
    one = np.ones(k, np.float32)
    cover = _outline_cover(P64, np.arange(k), 16 * one, 16 * one, 15 * one, 0 * one, 32)
    area = cover.sum(axis=(1, 2))
    assert area.max() / area.min() < 1.15, dict(zip(names, area))
    m = cover > 0.5
    iou = np.array([[(m[a] & m[b]).sum() / (m[a] | m[b]).sum() for b in range(k)] for a in range(k)])
    off = iou[np.triu_indices(k, 1)]
    assert off.max() < 0.95 and np.median(off) < 0.7, off
    # the default's shapes at one size differ in mass as well (star vs square): what this preset removes
    u = (np.arange(64) + 0.5) / 32 - 1.0
    from evotok.data.evoshapes import _shape_mask

    sq, st = (_shape_mask(n, u[None, :], u[:, None]).sum() for n in ("square", "star"))
    assert sq / st > 1.5


def test_preset64_texture_survives_4x_pooling():
    from evotok.data.evoshapes import _texture_pattern

    names = FACTORS["texture"]
    for t in range(1, len(names)):  # every non-solid texture, every half-period, a few phases
        for half in range(5, 9):
            for ph in range(0, 16, 3):
                pat = _texture_pattern(np.array([t]), np.array([half]), np.array([[ph, 2 * ph]]), 64, names)[0]
                pooled = pat.reshape(16, 4, 16, 4).mean(axis=(1, 3))
                assert pooled.std() > 0.15, (names[t], half, ph, pooled.std())
    # the 32 px default's 4 px period averages away under the same pooling
    pat = _texture_pattern(np.array([3]), np.array([2]), np.array([[1, 2]]), 32, names)[0]
    assert pat.reshape(8, 4, 8, 4).mean(axis=(1, 3)).std() < 1e-6


def test_preset64_clutter_carries_no_label():
    p = EvoShapesParams(preset=P64, resolution=64, noise_sigma=0.0)
    g, clean = generate(p, "train", 0, 300), generate(p, "train", 0, 300, clutter=False)
    np.testing.assert_array_equal(g.labels_NF, clean.labels_NF)
    np.testing.assert_array_equal(g.cells_N4, clean.cells_N4)
    diff = (g.images_NCHW != clean.images_NCHW).any(axis=1)
    assert diff.any(axis=(1, 2)).mean() > 0.95  # nearly every image has visible marks
    fg = _foreground(clean.images_NCHW, clean.labels_NF)
    interior = np.stack([ndimage.binary_erosion(m, iterations=2) for m in fg])  # past the anti-aliased rim
    assert not (diff & interior).any()  # marks lie under the objects, never on them
    sizes = np.concatenate([np.bincount(ndimage.label(d)[0].ravel())[1:] for d in diff])
    assert sizes.max() < 40  # every mark is far smaller than the smallest object (about 80 px)
    c = 32
    cells = np.stack([diff[:, :c, :c], diff[:, :c, c:], diff[:, c:, :c], diff[:, c:, c:]], axis=1).any(axis=(2, 3))
    assert cells[~g.cells_N4].mean() > 0.3  # marks fall in empty cells too: not tied to objects
    # without marks, empty cells are pure background and every object is one component
    cover = np.stack([fg[:, :c, :c], fg[:, :c, c:], fg[:, c:, :c], fg[:, c:, c:]], axis=1).mean(axis=(2, 3))
    assert (cover[~clean.cells_N4] == 0).all() and (cover[clean.cells_N4] > 0.04).all()
    n_comp = np.array([ndimage.label(m, structure=np.ones((3, 3)))[1] for m in fg])
    assert (n_comp == clean.labels_NF[:, 1] + 1).mean() > 0.97


def test_teacher_prompts_and_checker_heads_follow_the_preset():
    from evotok.models.checker import build_checker
    from evotok.models.teacher import class_prompts

    from evotok.data import evoshapes

    n_shapes = len(evoshapes.factors("evoshapes64")["shape"])
    assert n_shapes == 12 and len(class_prompts("shape", "evoshapes64")) == n_shapes
    assert len(class_prompts("shape")) == len(evoshapes.factors()["shape"]) == 8
    assert build_checker(8, "evoshapes64").heads["shape"].out_features == n_shapes
    assert build_checker(8).heads["shape"].out_features == 8
