"""Folder, LLaVA JSON, WebDataset and realphotos sources yield the common schema."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from evotok.config import DataConfig
from evotok.data import ITEM_KEYS, LABEL_KEYS, DataError
from evotok.data.collate import collate
from evotok.data.sources import build_dataset, split_of


def _cfg(**kw) -> DataConfig:
    base = dict(resolution=32, train_size=1, val_size=1, test_size=1, seed=0)
    base.update(kw)
    return DataConfig(**base)


def _img(seed: int, size=(48, 40), mode="RGB") -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def check_item(item: dict, res: int = 32, source: str = "") -> None:
    assert set(item) == set(ITEM_KEYS)
    img = item["image"]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.shape == (3, res, res)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert set(item["labels"]) == set(LABEL_KEYS) and all(isinstance(v, int) for v in item["labels"].values())
    assert isinstance(item["caption"], str) and isinstance(item["caption_sem"], str)
    assert isinstance(item["qa"], list) and isinstance(item["conversations"], list)
    assert item["task"] in ("understanding", "generation", "")
    assert isinstance(item["index"], int) and (not source or item["source"] == source)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    exts = [".jpg", ".JPG", ".jpeg", ".png", ".PNG", ".webp"]
    for i in range(24):
        sub = root / ("a/b" if i % 3 == 0 else "a" if i % 3 == 1 else "")
        ext = exts[i % len(exts)]
        _img(i, size=(40 + i, 36)).save(sub / f"im{i}{ext}")
    (root / "a" / "im1.txt").write_text("a caption for im1\n")
    (root / "notes.md").write_text("not an image")
    return root


def test_folder_splits_partition_and_schema(folder):
    cfg = _cfg(source="folder", root=str(folder))
    seen = []
    for split in ("train", "val", "test"):
        ds = build_dataset(cfg, split)
        assert len(ds) > 0
        seen += ds.rel_paths
        for i in range(len(ds)):
            check_item(ds[i], source="folder")
        assert all(split_of(r, cfg) == split for r in ds.rel_paths)
    assert len(seen) == 24 and len(set(seen)) == 24  # every file in exactly one split
    train = build_dataset(cfg, "train")
    if "a/im1.jpg" in train.rel_paths:
        assert train[train.rel_paths.index("a/im1.jpg")]["caption"] == "a caption for im1"
    # deterministic and centre-cropped without augmentation
    assert torch.equal(train[0]["image"], build_dataset(cfg, "train")[0]["image"])


def test_folder_augment_only_on_train(folder):
    cfg = _cfg(source="folder", root=str(folder), augment=True, train_size=8, val_size=1, test_size=1)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    a = [train[0]["image"] for _ in range(6)]
    assert any(not torch.equal(a[0], x) for x in a[1:])
    assert torch.equal(val[0]["image"], val[0]["image"])
    # through workers: deterministic given the loader's generator
    def run():
        dl = DataLoader(train, batch_size=4, num_workers=2, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
        return next(iter(dl))["image"]
    assert torch.equal(run(), run())


def _llava(tmp_path: Path, images: Path) -> Path:
    recs = []
    for i in range(12):
        name = f"img{i}.png"
        _img(100 + i).save(images / name)
        if i % 2 == 0:
            conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"thing {i}"}]
        else:
            conv = [{"from": "human", "value": f"Draw thing {i}."}, {"from": "gpt", "value": "<image>"}]
        recs.append({"id": f"r{i}", "image": name, "conversations": conv})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    return path


def test_llava_tasks_and_image_root(tmp_path):
    imgdir = tmp_path / "images"
    imgdir.mkdir()
    path = _llava(tmp_path, imgdir)
    cfg = _cfg(source="llava", root=str(path), image_root=str(imgdir), train_size=1, val_size=0, test_size=0)
    ds = build_dataset(cfg, "train")
    assert len(ds) == 12
    for i in range(len(ds)):
        item = ds[i]
        check_item(item, source="llava")
        k = int(ds.ids[i][1:])
        if k % 2 == 0:
            assert item["task"] == "understanding" and item["caption"] == ""
            assert item["qa"][0] == {"type": "", "question": "What is shown?", "answer": f"thing {k}"}
        else:
            assert item["task"] == "generation" and item["caption"] == f"Draw thing {k}."
        assert item["conversations"][0]["from"] == "human"
    # default image_root is the JSON's folder: images next to the JSON
    path2 = _llava(imgdir, imgdir)
    ds2 = build_dataset(_cfg(source="llava", root=str(path2), val_size=0, test_size=0), "train")
    assert len(ds2) == 12


def _write_shard(path: Path, start: int, n: int) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i in range(start, start + n):
            buf = io.BytesIO()
            _img(i).save(buf, format="PNG" if i % 2 else "JPEG")
            sample = {"__key__": f"s{i:04d}", ("png" if i % 2 else "jpg"): buf.getvalue(), "txt": f"caption {i}"}
            if i % 3 == 0:
                sample["json"] = json.dumps({"labels": {"shape": 2, "count": 1}}).encode()
            sink.write(sample)


def test_webdataset_shards(tmp_path):
    _write_shard(tmp_path / "shard-000.tar", 0, 10)
    _write_shard(tmp_path / "shard-001.tar", 10, 10)
    cfg = _cfg(source="webdataset", root=str(tmp_path / "shard-{000..001}.tar"), val_size=0, test_size=0)
    items = list(build_dataset(cfg, "test" if False else "train"))
    assert len(items) == 20
    for it in items:
        check_item(it, source="webdataset")
        k = int(it["caption"].split()[1])
        assert it["labels"]["shape"] == (2 if k % 3 == 0 else -1)
    # val split of a 1:1:1 config: disjoint keys; two workers read every sample once
    cfg3 = _cfg(source="webdataset", root=str(tmp_path / "shard-{000..001}.tar"))
    caps = {s: sorted(it["caption"] for it in build_dataset(cfg3, s)) for s in ("train", "val", "test")}
    assert sum(len(v) for v in caps.values()) == 20 and len(set(sum(caps.values(), []))) == 20
    dl = DataLoader(build_dataset(cfg, "train"), batch_size=3, num_workers=2, collate_fn=collate)
    got = sorted(c for b in dl for c in b["caption"])
    assert got == sorted(f"caption {i}" for i in range(20))
    with pytest.raises(DataError, match="data.root"):
        build_dataset(_cfg(source="webdataset", root=str(tmp_path / "nope-{0..1}.tar")), "train")


def test_realphotos():
    cfg = _cfg(source="realphotos", train_size=8, val_size=1, test_size=1)
    sizes = {}
    for split in ("train", "val", "test"):
        ds = build_dataset(cfg, split)
        sizes[split] = len(ds)
        check_item(ds[0], source="realphotos")
    assert sizes["train"] > 100 and sizes["val"] > 5 and sizes["test"] > 5
    ds = build_dataset(cfg, "test")
    imgs = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert imgs.std(dim=(1, 2, 3)).min() > 0.01  # real content, not blank crops
    assert torch.equal(imgs, torch.stack([build_dataset(cfg, "test")[i]["image"] for i in range(len(ds))]))
    assert build_dataset(_cfg(source="realphotos", resolution=64), "test")[0]["image"].shape == (3, 64, 64)


def test_factory_rejects_unknown():
    with pytest.raises(DataError, match="data.source"):
        build_dataset(_cfg(source="imagenet"), "train")
    with pytest.raises(DataError, match="heldout"):
        build_dataset(_cfg(source="realphotos"), "heldout")


def test_augmentation_is_exact_across_workers_and_a_mid_epoch_resume(folder):
    """Each sample's crop and flip depend on (seed, epoch, index) alone: 0 or 2 workers give the same
    batches, a loader resumed mid-epoch continues with exactly the uninterrupted run's batches, and the
    augmentation of one image differs from epoch to epoch."""
    from evotok.config import load_config
    from evotok.data.datamodule import EvoTokDataModule

    def loader(workers: int):
        cfg = load_config(None, ["data.source=folder", f"data.root={folder}", "data.augment=true",
                                 f"data.num_workers={workers}", "data.batch_size=4", "data.train_size=20",
                                 "data.val_size=2", "data.test_size=2"], stage="tokenizer")
        dm = EvoTokDataModule(cfg, "tokenizer")
        dm.setup("fit")
        return dm.train_dataloader()

    def epochs(dl, served_in_first: int = 0, first: int = 0) -> list[torch.Tensor]:
        out = []
        for epoch in (first, first + 1):
            dl.sampler.set_epoch(epoch)
            if served_in_first and epoch == first:
                dl.load_state_dict({"served": served_in_first})
            out += [b["image"] for b in dl]
        return out

    ref = epochs(loader(0))
    assert len(ref) >= 6
    par = epochs(loader(2))
    assert all(torch.equal(a, b) for a, b in zip(ref, par)) and len(par) == len(ref)
    per_epoch = len(ref) // 2
    resumed = epochs(loader(2), served_in_first=2, first=0)  # killed after 2 batches of epoch 0
    assert len(resumed) == len(ref) - 2
    assert all(torch.equal(a, b) for a, b in zip(ref[2:], resumed))
    resumed1 = epochs(loader(0), served_in_first=1, first=1)[: per_epoch - 1]  # killed in epoch 1
    assert all(torch.equal(a, b) for a, b in zip(ref[per_epoch + 1:], resumed1))
    # the same image, augmented differently in the two epochs
    dl = loader(0)
    ds = dl.dataset
    from evotok.data.datamodule import EpochIndex

    assert not torch.equal(ds[EpochIndex(3, 0)]["image"], ds[EpochIndex(3, 1)]["image"])
    assert torch.equal(ds[EpochIndex(3, 1)]["image"], ds[EpochIndex(3, 1)]["image"])
