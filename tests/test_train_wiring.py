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

from evotok import stages
from evotok.config import ConfigError, load_config
from evotok.lit import train as train_mod
from evotok.lit.optim import lr_groups, lr_multiplier


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

    def build(cfg, upstream):
        built.append(_Regression())
        return built[-1]

    import dataclasses

    mod = types.ModuleType("evotok_test_stage")
    mod.build = build
    monkeypatch.setitem(sys.modules, "evotok_test_stage", mod)
    monkeypatch.setitem(stages.STAGES, "checker", dataclasses.replace(stages.STAGES["checker"], module="evotok_test_stage"))
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
    with pytest.raises(stages.UnknownStage, match="unknown stage 'tokeniser' \\(did you mean 'tokenizer'\\?\\)"):
        stages.get_stage("tokeniser")
    import dataclasses

    entry = dataclasses.replace(stages.STAGES["generation"], module=None)
    with pytest.raises(stages.StageNotBuilt, match="'generation' is not built"):
        entry.lit_module()


def _optim(*extra):
    return load_config(None, list(extra)).optim


def test_lr_schedules_are_functions_of_the_step():
    const = _optim("optim.warmup_steps=10")
    assert lr_multiplier(0, 100, const) == pytest.approx(0.1) and lr_multiplier(9, 100, const) == 1.0
    assert lr_multiplier(99, 100, const) == 1.0
    lin = _optim("optim.schedule=linear", "optim.cooldown=0.2", "optim.warmup_steps=10")
    assert lr_multiplier(50, 100, lin) == 1.0 and lr_multiplier(80, 100, lin) == 1.0  # stable until the last 20%
    assert lr_multiplier(90, 100, lin) == pytest.approx(0.5) and lr_multiplier(100, 100, lin) == 0.0
    cos = _optim("optim.schedule=cosine", "optim.min_lr_ratio=0.1")
    assert lr_multiplier(0, 100, cos) == pytest.approx(1.0) and lr_multiplier(100, 100, cos) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, cos) == pytest.approx(0.55)
    with pytest.raises(ConfigError, match="optim.cooldown"):
        _optim("optim.cooldown=0.3")  # a cool-down needs schedule=linear


def test_group_learning_rates_and_unknown_group():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = lr_groups({"projector": a.parameters(), "lm": list(b.parameters())}, _optim("optim.lr=0.5",
                       "optim.group_lr.projector=0.01"), "understanding")
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("projector", 0.01, 2), ("lm", 0.5, 2)]
    with pytest.raises(ConfigError, match=r"'optim.group_lr.head' names no parameter group of stage 'understanding'"):
        lr_groups({"projector": [], "lm": []}, _optim("optim.group_lr.head=0.1"), "understanding")


def test_loggers_from_config(tmp_path, fixture_stage):
    cfg = load_config(None, [
        f"run.dir={tmp_path}", "run.name=t", "trainer.max_steps=4", "trainer.val_every_n_steps=4",
        "trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
        "trainer.loggers=[tensorboard,csv]",
    ])
    run = train_mod.train(cfg, "checker", datamodule=_Data())
    assert list(run.tb.rglob("events.out.tfevents.*"))
    rows = (run.path / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in rows[0] and len(rows) > 2
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="'trainer.loggers' lists wandb.*not installed"):
            train_mod.make_loggers(load_config(None, ["trainer.loggers=[wandb]"]), run)


def test_a_safety_stop_is_recorded(tmp_path, fixture_stage):
    """trainer.max_minutes only stops a run; metrics.json then says the schedule did not finish."""
    cfg = load_config(None, [
        f"run.dir={tmp_path}", "run.name=t", "trainer.max_steps=500", "trainer.max_minutes=0.00001",
        "trainer.val_every_n_steps=4", "trainer.progress_bar=false", "trainer.accelerator=cpu",
    ])
    with pytest.warns(RuntimeWarning, match=r"safety stop at step \d+ of trainer.max_steps=500"):
        run = train_mod.train(cfg, "checker", datamodule=_Data())
    assert "schedule did not finish" in json.loads(run.metrics.read_text())["stopped_early"]
