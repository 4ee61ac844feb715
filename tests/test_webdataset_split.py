"""WebDataset shards: `evotok data shards`, brace patterns, an equal share per rank, a separate val source."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from evotok.cli import main
from evotok.config import DataConfig
from evotok.data import DataError
from evotok.data.collate import collate
from evotok.data.sources import WebDatasetShards, consumer_ranges, expand_shards, read_index

BS = 4


@dataclass
class _Cfg(DataConfig):
    val_root: str = ""  # the key docs/data_sharding.md asks evotok/config.py DataConfig to add


def _cfg(tmp: Path, **kw) -> _Cfg:
    base = dict(source="webdataset", resolution=16, batch_size=BS, train_size=50, val_size=12, test_size=4,
                seed=0, cache_dir=str(tmp / "cache"))
    base.update(kw)
    return _Cfg(**base)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """EvoShapes train (50 samples in shards of 13: 13, 13, 13, 11) and val (12 in 5, 5, 2), via the CLI."""
    tmp = tmp_path_factory.mktemp("wds")
    common = ["data.resolution=16", "data.train_size=50", "data.val_size=12", "data.test_size=4",
              f"data.cache_dir={tmp / 'cache'}"]
    assert main(["data", "shards", "--source", "evoshapes", "--out", str(tmp / "train"), "--per-shard", "13",
                 "--split", "train", *common]) == 0
    assert main(["data", "shards", "--source", "evoshapes", "--out", str(tmp / "val"), "--per-shard", "5",
                 "--split", "val", *common]) == 0
    return tmp


def _read(ds, workers: int = 2):
    dl = DataLoader(ds, batch_size=BS, num_workers=workers, collate_fn=collate)
    return [b["index"].tolist() if hasattr(b["index"], "tolist") else list(b["index"]) for b in dl]


def test_index_and_brace_expansion(shards):
    idx = json.loads((shards / "train" / "index.json").read_text())
    assert idx["__kind__"] == "wids-shard-index-v1"
    assert [e["nsamples"] for e in idx["shardlist"]] == [13, 13, 13, 11]
    files = expand_shards(str(shards / "train" / "train-{000000..000003}.tar"))
    assert [Path(f).name for f in files] == [e["url"] for e in idx["shardlist"]]
    assert sorted(read_index(shards / "train").values()) == [11, 13, 13, 13]
    two = expand_shards(f"{shards / 'train' / 'train-{000000..000001}.tar'};{shards / 'val' / 'val-000000.tar'}")
    assert len(two) == 3


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_two_workers_equal_batches(shards, epoch):
    pattern = str(shards / "train" / "train-{000000..000003}.tar")
    cfg = _cfg(shards, root=pattern, val_root=str(shards / "val" / "val-{000000..000002}.tar"))
    per_rank = []
    for rank in (0, 1):
        ds = WebDatasetShards(cfg, "train", rank=rank, world_size=2)
        ds.set_epoch(epoch)
        batches = _read(ds)
        assert all(len(b) == BS for b in batches)  # whole batches only
        assert len(batches) == len(ds) // BS
        per_rank.append([i for b in batches for i in b])
    assert len(per_rank[0]) == len(per_rank[1]) == (50 // (2 * BS)) * BS  # 6 batches each
    seen = per_rank[0] + per_rank[1]
    assert len(set(seen)) == len(seen)  # no sample twice in the epoch
    assert set(seen) <= set(range(50))


def test_epochs_reshuffle_and_repeat_deterministically(shards):
    cfg = _cfg(shards, root=str(shards / "train" / "train-{000000..000003}.tar"), val_size=0, test_size=0)
    ds = WebDatasetShards(cfg, "train", rank=0, world_size=2)
    ds.set_epoch(0)
    e0 = [i for it in ds for i in [it["index"]]]
    ds.set_epoch(0)
    assert [it["index"] for it in ds] == e0  # (seed, epoch) fixes the order: a resumed epoch repeats it
    assert [it["index"] for it in ds] != e0  # the next pass is the next epoch


def test_consumer_ranges_property():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = [int(c) for c in rng.integers(0, 40, size=int(rng.integers(1, 9)))]
        world, nw, bs = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 9))
        n = sum(counts)
        if world > 1 and n < world * bs:
            continue
        got, per_rank = [], []
        for r in range(world):
            mine = 0
            for w in range(nw):
                for pos, a, b in consumer_ranges(counts, r, world, w, nw, bs):
                    assert 0 <= a < b <= counts[pos]
                    got += [(pos, j) for j in range(a, b)]
                    mine += b - a
            per_rank.append(mine)
        assert len(got) == len(set(got))
        if world > 1:
            assert per_rank == [(n // (world * bs)) * bs] * world
        else:
            assert per_rank == [n]


def test_separate_val_root_holds_nothing_out(shards):
    train = str(shards / "train" / "train-{000000..000003}.tar")
    val = str(shards / "val" / "val-{000000..000002}.tar")
    cfg = _cfg(shards, root=train, val_root=val)
    tr, va = WebDatasetShards(cfg, "train"), WebDatasetShards(cfg, "val")
    assert len(tr) == 50 and len(va) == 12  # one rank: everything, no hash split
    val_items = list(va)
    assert sorted(it["index"] for it in val_items) == list(range(12))
    val_caps = sorted(it["caption"] for it in val_items)
    # the val shards are EvoShapes' val split, not a slice of the training shards
    from evotok.data.evoshapes import EvoShapes

    ev = EvoShapes(_cfg(shards, source="evoshapes"), "val")
    assert val_caps == sorted(ev[i]["caption"] for i in range(len(ev)))
    assert sum(1 for b in _read(tr) for _ in b) == 50
    # without data.val_root the old hash split of data.root applies
    hashed = _cfg(shards, root=train)
    assert len(WebDatasetShards(hashed, "train")) < 50


def test_too_few_samples_names_batch_size(shards):
    cfg = _cfg(shards, root=str(shards / "val" / "val-{000000..000002}.tar"), val_size=0, test_size=0,
               batch_size=8)
    with pytest.raises(DataError, match="data.batch_size"):
        WebDatasetShards(cfg, "train", rank=0, world_size=2)


def test_bad_sample_keeps_rank_share(tmp_path):
    from evotok.data.sources import write_shards

    good = (tmp_path / "g.png")
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(good)
    samples = [(f"k{i:03d}", {"png": good.read_bytes() if i != 3 else b"garbage", "txt": f"c{i}".encode()})
               for i in range(16)]
    write_shards(iter(samples), tmp_path / "s", per_shard=5)
    cfg = _cfg(tmp_path, root=str(tmp_path / "s" / "train-{000000..000003}.tar"), val_size=0, test_size=0)
    with pytest.warns(UserWarning, match="bad input"):
        counts = [sum(len(b) for b in _read(WebDatasetShards(cfg, "train", rank=r, world_size=2), workers=0))
                  for r in (0, 1)]
    assert counts == [8, 8]
