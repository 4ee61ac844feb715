"""Bad input: every case converts, skips (count + one warning) or raises DataError naming the file/key."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from evotok.config import DataConfig
from evotok.data import DataError
from evotok.data.collate import collate
from evotok.data.sources import build_dataset, image_to_tensor, open_rgb


def _cfg(root: Path | str, **kw) -> DataConfig:
    base = dict(source="folder", root=str(root), resolution=16, train_size=1, val_size=0, test_size=0)
    base.update(kw)
    return DataConfig(**base)


def _good(path: Path, seed: int = 0) -> None:
    a = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


def _jpeg_bytes(seed: int = 1) -> bytes:
    import io

    buf = io.BytesIO()
    a = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------- conversions


def test_mode_conversions(tmp_path):
    res = 16
    # 16-bit greyscale PNG: full scale -> 255
    a16 = np.full((10, 12), 65535, dtype=np.uint16)
    a16[:, :6] = 0
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = open_rgb(tmp_path / "g16.png")
    assert img.mode == "RGB"
    px = np.asarray(img)
    assert px[:, :6].max() == 0 and px[:, 7:].min() == 255
    # greyscale
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert (np.asarray(open_rgb(tmp_path / "g.png")) == 77).all()
    # RGBA: transparent pixels composited on white, opaque kept
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    px = np.asarray(open_rgb(tmp_path / "rgba.png"))
    assert (px[:4] == [200, 0, 0]).all() and (px[4:] == 255).all()
    # palette, with and without transparency
    pal = Image.fromarray(np.tile(np.array([[0, 1]], np.uint8), (8, 4)), "P")
    pal.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    px = np.asarray(open_rgb(tmp_path / "pal.png"))
    assert (px[:, 0] == [10, 20, 30]).all() and (px[:, 1] == [250, 0, 0]).all()
    pal.save(tmp_path / "palt.png", transparency=0)
    px = np.asarray(open_rgb(tmp_path / "palt.png"))
    assert (px[:, 0] == 255).all() and (px[:, 1] == [250, 0, 0]).all()
    # 1x1 image: upscaled to a uniform image at the resolution
    Image.new("RGB", (1, 1), (9, 99, 199)).save(tmp_path / "one.png")
    t = image_to_tensor(open_rgb(tmp_path / "one.png"), res)
    assert t.shape == (3, res, res)
    assert torch.allclose(t, torch.tensor([9, 99, 199.0]).div(255).view(3, 1, 1).expand(3, res, res), atol=1e-6)


def test_odd_modes_through_folder_dataset(tmp_path):
    Image.fromarray(np.full((10, 12), 40000, np.uint16)).save(tmp_path / "g16.png")
    Image.new("L", (9, 9), 5).save(tmp_path / "g.jpg")
    Image.new("RGBA", (9, 9), (0, 0, 0, 0)).save(tmp_path / "t.png")
    Image.new("P", (9, 9), 3).save(tmp_path / "p.png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.webp")
    Image.new("CMYK", (9, 9), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    ds = build_dataset(_cfg(tmp_path), "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is bad input
        batch = collate([ds[i] for i in range(len(ds))])
    assert len(ds) == 6 and batch["image"].shape == (6, 3, 16, 16) and len(ds.bad_files) == 0


# ---------------------------------------------------------------------------- skip / error


def _bad_folder(tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(3):
        _good(root / f"good{i}.png", i)
    (root / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "text.png").write_text("this is not a png")
    (root / "empty.webp").write_bytes(b"")
    png = (root / "good0.png").read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])  # truncated PNG: verify catches it
    return root


def test_skip_counts_and_warns_once(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.warns(UserWarning) as rec:
        ds = build_dataset(_cfg(root), "train")
    msgs = [str(w.message) for w in rec if "bad input" in str(w.message)]
    assert len(msgs) == 1
    assert "4 bad input file(s)" in msgs[0] and "random.jpg" in msgs[0] and "text.png" in msgs[0]
    assert len(ds) == 3 and len(ds.bad_files) == 4
    assert {Path(p).name for p in ds.paths} == {"good0.png", "good1.png", "good2.png"}
    # the loader never sees a bad file
    dl = DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate)
    assert sum(len(b["image"]) for b in dl) == 3


def test_error_mode_names_file(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.raises(DataError, match=r"(cut\.png|empty\.webp|random\.jpg|text\.png).*data\.on_bad_file"):
        build_dataset(_cfg(root, on_bad_file="error"), "train")


def test_truncated_jpeg_caught_at_load(tmp_path):
    """JPEG verify does not decode, so a truncated JPEG passes the scan; loading substitutes the
    next file (skip) or raises DataError naming it (error), never a bare PIL error."""
    root = tmp_path / "t"
    root.mkdir()
    data = _jpeg_bytes()
    (root / "a_trunc.jpg").write_bytes(data[: len(data) // 3])
    _good(root / "b_good.png")
    ds = build_dataset(_cfg(root), "train")
    assert len(ds) == 2
    with pytest.warns(UserWarning, match="a_trunc.jpg"):
        item = ds[0]
    assert torch.equal(item["image"], ds[1]["image"]) and len(ds.bad_files) == 1
    dl = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert next(iter(dl))["image"].shape == (2, 3, 16, 16)
    strict = build_dataset(_cfg(root, on_bad_file="error"), "train")
    with pytest.raises(DataError, match="a_trunc.jpg"):
        strict[0]


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="data.root.*does not exist"):
        build_dataset(_cfg(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="data.root.*no images"):
        build_dataset(_cfg(tmp_path / "empty"), "train")
    with pytest.raises(DataError, match="data.root"):
        build_dataset(_cfg(""), "train")
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_text("nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="data.root.*no readable image"):
        build_dataset(_cfg(only_bad), "train")


def _json(tmp_path: Path, recs) -> Path:
    p = tmp_path / "d.json"
    p.write_text(json.dumps(recs))
    return p


def test_llava_missing_image_and_bad_records(tmp_path):
    _good(tmp_path / "ok.png")
    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]
    recs = [{"id": "1", "image": "ok.png", "conversations": conv},
            {"id": "2", "image": "missing.png", "conversations": conv},
            {"id": "3", "conversations": conv},
            {"id": "4", "image": "ok.png", "conversations": "oops"}]
    path = _json(tmp_path, recs)
    with pytest.warns(UserWarning, match="missing.png") as rec:
        ds = build_dataset(_cfg(path, source="llava"), "train")
    assert len([w for w in rec if "bad input" in str(w.message)]) == 1
    assert len(ds) == 1 and len(ds.bad_files) == 3
    with pytest.raises(DataError, match=r"missing\.png.*record id 2"):
        build_dataset(_cfg(_json(tmp_path, recs[:2]), source="llava", on_bad_file="error"), "train")


def test_llava_malformed_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"id": "1", "image": "a.png",, }]')
    with pytest.raises(DataError, match=r"data\.root.*bad\.json.*line 1"):
        build_dataset(_cfg(p, source="llava"), "train")
    p.write_text('{"id": 1}')
    with pytest.raises(DataError, match="list of records"):
        build_dataset(_cfg(p, source="llava"), "train")
    with pytest.raises(DataError, match="data.root.*does not exist"):
        build_dataset(_cfg(tmp_path / "none.json", source="llava"), "train")
    _good(tmp_path / "ok.png")
    ok = _json(tmp_path, [{"id": "1", "image": "ok.png", "conversations": []}])
    with pytest.raises(DataError, match="data.image_root"):
        build_dataset(_cfg(ok, source="llava", image_root=str(tmp_path / "nowhere")), "train")


def test_webdataset_bad_sample_skipped(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "jpg": _jpeg_bytes(), "txt": "good"})
        sink.write({"__key__": "b", "jpg": b"garbage", "txt": "bad"})
        sink.write({"__key__": "c", "txt": "no image"})
    cfg = _cfg(tmp_path / "s.tar", source="webdataset")
    with pytest.warns(UserWarning, match="bad input"):
        items = list(build_dataset(cfg, "train"))
    assert [it["caption"] for it in items] == ["good"]
    with pytest.raises(DataError, match="b.jpg"):
        list(build_dataset(_cfg(tmp_path / "s.tar", source="webdataset", on_bad_file="error"), "train"))
