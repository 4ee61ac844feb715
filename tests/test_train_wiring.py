"""lit/train.py: run folder contents after training, best/last checkpoints, resume after a stop."""

from __future__ import annotations

import json
import sys
import types

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from evotok.config import load_config
from evotok.lit import train as train_mod


class _Regression(L.LightningModule):
    """A fixture model: linear regression, logs val/loss."""

    monitor, monitor_mode = "val/loss", "min"

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.finished_called = False

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_run_finished(self, run, trainer):
        self.finished_called = True


class _Data(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        self.ds = TensorDataset(x, x.sum(1, keepdim=True))

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=64)


@pytest.fixture
def fixture_stage(monkeypatch):
    built = []

    def build(cfg):
        built.append(_Regression())
        return built[-1]

    mod = types.ModuleType("evotok_test_stage")
    mod.build = build
    monkeypatch.setitem(sys.modules, "evotok_test_stage", mod)
    monkeypatch.setitem(train_mod.STAGE_BUILDERS, "checker", "evotok_test_stage")
    return built


def _cfg(tmp_path, steps):
    return load_config(None, [
        f"run.dir={tmp_path}", "run.name=t", f"trainer.max_steps={steps}", "trainer.val_every_n_steps=4",
        "trainer.ckpt_every_n_steps=4", "trainer.progress_bar=false", "trainer.accelerator=cpu",
    ])


def test_train_writes_complete_run_folder(tmp_path, fixture_stage):
    run = train_mod.train(_cfg(tmp_path, 12), "checker", argv=["evotok"], datamodule=_Data())
    assert run.last_ckpt.is_file() and run.best_ckpt.is_file()
    assert list(run.tb.rglob("events.out.tfevents.*"))
    metrics = json.loads(run.metrics.read_text())
    assert metrics["stage"] == "checker" and metrics["step"] == 12 and "val/loss" in metrics["scalars"]
    assert run.finished and fixture_stage[-1].finished_called
    assert torch.load(run.last_ckpt, weights_only=False)["global_step"] == 12


def test_stopped_run_resumes_from_last_checkpoint(tmp_path, fixture_stage):
    run = train_mod.train(_cfg(tmp_path, 8), "checker", datamodule=_Data())
    (run.path / "FINISHED").unlink()  # as if the process had been killed after the step-8 checkpoint
    w8 = torch.load(run.last_ckpt, weights_only=False)["state_dict"]["net.weight"]
    train_mod.train(_cfg(tmp_path, 12), "checker", datamodule=_Data())
    resumed = fixture_stage[-1]
    assert resumed.trainer.global_step == 12
    assert torch.load(run.last_ckpt, weights_only=False)["global_step"] == 12
    assert not torch.equal(w8, resumed.net.weight.detach())  # it trained on from the step-8 weights
    assert run.finished


def test_unknown_stage_and_unbuilt_stage():
    with pytest.raises(ValueError, match="unknown stage 'tokeniser'"):
        train_mod.stage_builder("tokeniser")
    with pytest.raises(train_mod.StageNotBuilt, match="'generation' is not built"):
        train_mod.stage_builder("generation")


def test_lr_factor_warms_up_holds_then_cools_down_to_zero():
    f = train_mod.lr_factor
    assert f(0, 10, 0.0, 0.2) == pytest.approx(0.1) and f(9, 10, 0.0, 0.2) == 1.0  # linear warm-up
    assert f(500, 10, 0.5, 0.2) == 1.0 and f(500, 10, 0.79, 0.2) == 1.0  # stable until the last 20%
    assert f(500, 10, 0.9, 0.2) == pytest.approx(0.5) and f(500, 10, 1.0, 0.2) == 0.0  # linear to 0
    assert f(500, 0, 0.99, 0.0) == 1.0  # cooldown 0: constant


def test_budget_used_is_the_larger_of_steps_and_time():
    from lightning.pytorch.callbacks import Timer

    timer = Timer(duration={"minutes": 10})
    timer.load_state_dict({"time_elapsed": {"train": 180.0}})  # a resumed run: 3 of 10 minutes spent
    trainer = types.SimpleNamespace(global_step=100, max_steps=1000, callbacks=[timer])
    assert train_mod.budget_used(trainer) == pytest.approx(0.3, abs=0.01)
    trainer.global_step = 500
    assert train_mod.budget_used(trainer) == pytest.approx(0.5)
    assert train_mod.budget_used(types.SimpleNamespace(global_step=5, max_steps=-1, callbacks=[])) == 0.0
