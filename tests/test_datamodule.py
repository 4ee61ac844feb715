"""EvoTokDataModule: batch keys/shapes for every stage, task filtering, seeding, Lightning wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evotok.config import Config, DataConfig
from evotok.data.datamodule import EvoTokDataModule
from evotok.stages import STAGE_NAMES as STAGES
from evotok.stages import STAGES as REGISTRY


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dm_cache")


def _cfg(cache_dir, **kw) -> Config:
    """Tests share one EvoShapes cache folder (module scope) so each split is generated once."""
    base = dict(cache_dir=str(cache_dir), train_size=256, val_size=64, test_size=64, batch_size=8, seed=0)
    base.update(kw)
    return Config(data=DataConfig(**base))


def _check_batch(batch: dict, stage: str, bs: int, res: int = 32) -> None:
    assert set(batch) == set(REGISTRY[stage].batch.fields), stage
    if "image" in batch:
        assert batch["image"].shape == (bs, 3, res, res) and batch["image"].dtype == torch.float32
    if "labels" in batch:
        assert set(batch["labels"]) == {"shape", "count", "color", "texture", "background"}
        for v in batch["labels"].values():
            assert v.dtype == torch.long and v.shape == (bs,)
    if "index" in batch:
        assert batch["index"].dtype == torch.long and batch["index"].shape == (bs,)
    for k in ("caption_sem", "caption", "text", "conversations", "qa"):
        if k in batch:
            assert isinstance(batch[k], list) and len(batch[k]) == bs
            if k not in ("conversations", "qa"):
                assert all(isinstance(s, str) and s for s in batch[k]), k


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_on_evoshapes(cache_dir, stage):
    dm = EvoTokDataModule(_cfg(cache_dir), stage)
    dm.prepare_data()
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        _check_batch(next(iter(loader)), stage, 8)
    if stage == "understanding":
        b = next(iter(dm.val_dataloader()))
        for c, qa in zip(b["conversations"], b["qa"]):
            assert "<image>" in c[0]["value"] and sum("<image>" in m["value"] for m in c) == 1
            rounds = {(c[i]["value"].replace("<image>\n", ""), c[i + 1]["value"]) for i in range(0, len(c), 2)}
            assert rounds == {(q["question"], q["answer"]) for q in qa}
        firsts = {c[0]["value"] for c in b["conversations"]}
        assert len(firsts) > 1, "every item asks the same question first"
    if stage == "lm":
        b = next(iter(dm.val_dataloader()))
        assert all("\n" in t and "background" in t for t in b["text"])
    heldout = next(iter(dm.dataloader("heldout")))
    _check_batch(heldout, stage, 8)


def test_unknown_stage():
    with pytest.raises(ValueError, match="teacher.*tokenizer.*lm.*understanding.*generation.*checker"):
        EvoTokDataModule(Config(), "pretrain")


def test_shuffle_seeded_and_workers(cache_dir):
    def first_indices(seed, workers=0):
        dm = EvoTokDataModule(_cfg(cache_dir, seed=seed, num_workers=workers), "tokenizer")
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["index"].tolist()

    a = first_indices(0)
    assert a == first_indices(0) and a != sorted(a)
    assert a == first_indices(0, workers=2)  # the sampler, not the workers, decides the order
    dm = EvoTokDataModule(_cfg(cache_dir, num_workers=2), "checker")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    # val order is fixed
    v = [b for b in EvoTokDataModule(_cfg(cache_dir), "tokenizer").val_dataloader()]
    assert torch.cat([b["index"] for b in v]).tolist() == list(range(64))


def test_train_order_depends_on_epoch_only_and_resumes_mid_epoch(cache_dir):
    """A run killed mid-epoch continues with the batch after the last one it trained on, in the same order."""
    def loader(epoch):
        dm = EvoTokDataModule(_cfg(cache_dir), "tokenizer")
        dm.setup("fit")
        dl = dm.train_dataloader()
        dl.sampler.set_epoch(epoch)  # what Lightning does at the start of every epoch
        return dl

    def order(dl):
        return [b["index"].tolist() for b in dl]

    full = order(loader(1))
    assert len(full) == 32 and sorted(sum(full, [])) == list(range(256))
    assert full == order(loader(1)) and full != order(loader(2))  # a function of (seed, epoch) alone
    first = loader(1)
    it = iter(first)
    seen = [next(it)["index"].tolist() for _ in range(5)]
    state = first.state_dict()
    assert state == {"served": 5} and seen == full[:5]
    resumed = loader(1)
    resumed.load_state_dict(state)
    assert order(resumed) == full[5:]  # no batch repeated, none skipped
    assert order(resumed) == full  # the next pass is a whole epoch again
    done = loader(1)
    done.load_state_dict({"served": 32})  # saved after the epoch's last batch: the next epoch starts whole
    assert order(done) == full


def test_llava_tasks_split_by_stage(tmp_path, cache_dir):
    imgs = tmp_path / "im"
    imgs.mkdir()
    recs = []
    for i in range(16):
        Image.fromarray(np.full((20, 20, 3), i * 10, np.uint8)).save(imgs / f"{i}.png")
        conv = ([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": f"ans{i}"}] if i % 2 else
                [{"from": "human", "value": f"Draw {i}"}, {"from": "gpt", "value": "<image>"}])
        recs.append({"id": str(i), "image": f"{i}.png", "conversations": conv})
    path = imgs / "d.json"
    path.write_text(json.dumps(recs))
    kw = dict(source="llava", root=str(path), train_size=1, val_size=0, test_size=0, batch_size=4)
    und = EvoTokDataModule(_cfg(cache_dir, **kw), "understanding")
    assert len(und.dataset("train")) == 8
    batch = next(iter(und.dataloader("train")))
    _check_batch(batch, "understanding", 4)
    assert all(c[0]["value"] == "<image>\nWhat?" and c[1]["value"].startswith("ans") for c in batch["conversations"])
    gen = EvoTokDataModule(_cfg(cache_dir, **kw), "generation")
    batch = next(iter(gen.dataloader("train")))
    _check_batch(batch, "generation", 4)
    assert all(c.startswith("Draw ") for c in batch["caption"])
    lm = EvoTokDataModule(_cfg(cache_dir, **kw), "lm")
    assert len(lm.dataset("train")) == 16 and "<image>" not in lm.dataset("train")[0]["text"]


def test_lightning_fit_uses_datamodule(tmp_path, cache_dir):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.seen = []

        def training_step(self, batch, _):
            self.seen.append(batch["index"])
            return self.lin(batch["image"].mean((2, 3))).mean()

        def validation_step(self, batch, _):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=EvoTokDataModule(_cfg(cache_dir), "tokenizer"))
    assert len(model.seen) == 3 and all(s.shape == (8,) for s in model.seen)
