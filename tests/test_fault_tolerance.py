"""Fault tolerance (lit/train.py, runs.py): a run killed with SIGKILL at a random step and resumed ends exactly as an
uninterrupted one; SIGTERM saves a checkpoint and exits with EXIT_PREEMPTED; a damaged last.ckpt falls back to
last.prev.ckpt; checkpoint writes are atomic; a non-finite loss stops the run and keeps the last good checkpoint;
the tokenizer declares its DDP needs.

Training that must be interrupted runs in a forked child process (the test process's imports are reused, so a
child starts in a fraction of a second); the child sleeps after every step so the parent can signal it between two
checkpoints."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import signal
import sys
import time
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import TINY_DATA
from evotok import stages
from evotok.config import load_config
from evotok.data.datamodule import EpochShuffle, ResumableLoader
from evotok.lit import train as train_mod
from evotok.runs import CheckpointError, RunDir, checkpoint_problem, load_checkpoint_file, save_checkpoint_file

# Tiny runs of 10 steps with a checkpoint every 2: 6 batches per epoch, so a resume may land mid-epoch or on the
# epoch boundary (step 6); the tokenizer's discriminator joins at step 3 (both optimisers are restored).
STEPS, EVERY = 10, 2
TOKENIZER = ("tokenizer/evotok_tiny", "tokenizer", [
    "teacher.run=", "teacher.random_init=true", "teacher.cache_features=false", "model.lpix=2", "model.lsem=3",
    "loss.gan_start=3", "loss.gan_weight=0.1", "trainer.image_log_every_n_steps=0", "trainer.log_every_n_steps=3",
])
LM = ("lm/tiny", "lm", ["lm.vocab_size=400", "trainer.log_every_n_steps=3"])
DELAY = 0.3  # seconds the child sleeps after each step


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The EvoShapes splits of TINY_DATA, generated once for the module (before any child starts)."""
    from evotok.data.sources import build_dataset

    path = tmp_path_factory.mktemp("evoshapes")
    data = load_config(None, [*TINY_DATA, f"data.cache_dir={path}"]).data
    for split in ("train", "val", "test"):
        build_dataset(data, split)
    return path


def _overrides(root: Path, cache: Path, name: str, extra: list[str]) -> list[str]:
    return [f"run.dir={root / 'runs'}", f"data.cache_dir={cache}", *TINY_DATA, f"run.name={name}",
            f"trainer.max_steps={STEPS}", f"trainer.val_every_n_steps={STEPS}", f"trainer.ckpt_every_n_steps={EVERY}",
            "trainer.limit_val_batches=1", "trainer.accelerator=cpu", *extra]


class _Slow(L.Callback):
    """In the child: sleep after every step, and write the steps done to ``progress``."""

    def __init__(self, progress: Path):
        self.progress = progress

    def on_train_batch_end(self, trainer, *args):
        self.progress.write_text(str(trainer.global_step))
        time.sleep(DELAY)


def _child(log: Path, cfg, stage: str, datamodule=None) -> None:
    """The forked child: the stage's own training with :class:`_Slow` added; output into ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)  # pytest's capture replaced the sys streams
    build = train_mod.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(_Slow(log.with_suffix(".step")))
        return trainer

    train_mod.build_trainer = build_trainer  # in the child only
    train_mod.train(cfg, stage, datamodule=datamodule)


def _start(tmp_path: Path, cfg, stage: str, datamodule=None):
    log = tmp_path / f"child-{cfg.run.name}.log"
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(log, cfg, stage, datamodule))
    proc.start()
    return proc, log


def _ckpt_step(path: Path):
    try:
        return int(load_checkpoint_file(path, mmap=True)["global_step"])
    except (CheckpointError, KeyError):  # not written yet, or between the two renames of a save
        return None


def _signal_when(proc, log: Path, ready, sig: int, delay: float) -> int:
    """Once ``ready()`` holds, wait ``delay`` seconds and send ``sig``; returns the child's exit status."""
    deadline = time.monotonic() + 240
    while not ready():
        if not proc.is_alive():
            pytest.fail(f"the training child ended (status {proc.exitcode}) too early:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the training child made no progress within 240 s:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(proc.pid, sig)
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
        pytest.fail(f"the training child did not stop within 120 s of the signal:\n{log.read_text()[-4000:]}")
    return proc.exitcode


def _assert_same_tree(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _assert_same_end(ref: RunDir, other: RunDir, steps: int) -> None:
    a, b = (torch.load(r.last_ckpt, weights_only=False, map_location="cpu") for r in (ref, other))
    assert a["global_step"] == b["global_step"] == steps
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "rng_states"):
        _assert_same_tree(a[key], b[key], key)
    ma, mb = (json.loads(r.metrics.read_text()) for r in (ref, other))
    assert ma["scalars"] and ma["scalars"] == mb["scalars"] and ma["per_depth"] == mb["per_depth"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", [TOKENIZER, LM], ids=["tokenizer", "lm"])
def test_kill9_at_a_random_step_then_resume_is_exact(tmp_path, cache, spec):
    """SIGKILL (no chance to save) at a random moment after the step-4 checkpoint, possibly in the middle of
    writing the next one: the resumed run ends with the same weights, codebooks and EMA buffers, optimiser and
    scheduler states, random state and metrics as an uninterrupted run with the same seed."""
    config, stage, extra = spec
    cfg = load_config(config, _overrides(tmp_path, cache, "killed", extra), stage=stage)
    proc, log = _start(tmp_path, cfg, stage)  # the child trains while the reference does
    ref = train_mod.train(load_config(config, _overrides(tmp_path, cache, "ref", extra), stage=stage), stage)
    run = RunDir(tmp_path / "runs" / stage / "killed")
    delay = random.Random(stage).uniform(0, EVERY * DELAY)
    past_4 = lambda: (_ckpt_step(run.last_ckpt) or 0) >= 4  # noqa: E731
    assert _signal_when(proc, log, past_4, signal.SIGKILL, delay) == -signal.SIGKILL
    killed_at = _ckpt_step(run.last_ckpt) or _ckpt_step(run.prev_ckpt)
    assert killed_at is not None and 4 <= killed_at < STEPS and not run.finished

    resumed = train_mod.train(cfg, stage)
    assert resumed.finished
    if stage == "tokenizer":
        names = load_checkpoint_file(resumed.last_ckpt)["state_dict"]
        assert any(k.endswith("codebooks_LKd") for k in names) and any(k.endswith("ema_sum_LKd") for k in names)
    _assert_same_end(ref, resumed, STEPS)


# ----------------------------------------------------------------------------------- a fast fixture stage
class _Noisy(L.LightningModule):
    """Linear regression with dropout (so the random state matters); ``nan_at`` makes that step's loss NaN."""

    monitor, monitor_mode = "val/loss", "min"

    def __init__(self, nan_at: int = -1):
        super().__init__()
        self.net, self.drop = nn.Linear(4, 1), nn.Dropout(0.5)
        self.nan_at, self.started_at = nan_at, None

    def on_train_start(self):
        self.started_at = self.global_step

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(self.drop(x)), y)
        if self.global_step == self.nan_at:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _Data(L.LightningDataModule):
    """64 items in batches of 8 through the suite's resumable train loader."""

    def __init__(self):
        super().__init__()
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        self.ds = TensorDataset(x, x.sum(1, keepdim=True))

    def train_dataloader(self):
        return ResumableLoader(self.ds, batch_size=8, sampler=EpochShuffle(len(self.ds), 0), drop_last=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.ds, batch_size=64)


@pytest.fixture
def noisy_stage(monkeypatch):
    """The checker stage replaced by :class:`_Noisy`; the built modules are appended to the returned list."""
    built: list[_Noisy] = []
    mod = types.ModuleType("evotok_test_noisy_stage")
    def build(cfg, upstream):
        built.append(_Noisy(nan_at=int(os.environ.get("EVOTOK_TEST_NAN_AT", -1))))
        return built[-1]

    mod.build = build
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(stages.STAGES, "checker", dataclasses.replace(stages.STAGES["checker"], module=mod.__name__))
    return built


def _noisy_cfg(tmp_path, name: str, steps: int, every: int):
    return load_config(None, [
        f"run.dir={tmp_path}", f"run.name={name}", f"trainer.max_steps={steps}", f"trainer.val_every_n_steps={steps}",
        f"trainer.ckpt_every_n_steps={every}", "trainer.progress_bar=false", "trainer.accelerator=cpu",
        "trainer.threads=1",
    ])


def test_sigterm_saves_the_step_and_exits_with_the_preempted_status(tmp_path, noisy_stage):
    """SIGTERM (no periodic checkpoint before step 1000): the child writes last.ckpt at the step it is in and exits
    with EXIT_PREEMPTED; the rerun resumes from that step and ends as an uninterrupted run does."""
    steps = 20
    cfg = _noisy_cfg(tmp_path, "term", steps, every=1000)
    proc, log = _start(tmp_path, cfg, "checker", _Data())
    progress = log.with_suffix(".step")
    ready = lambda: progress.is_file() and int(progress.read_text() or 0) >= 3  # noqa: E731
    assert _signal_when(proc, log, ready, signal.SIGTERM, DELAY / 2) == train_mod.EXIT_PREEMPTED
    run = RunDir(tmp_path / "checker" / "term")
    saved = _ckpt_step(run.last_ckpt)
    assert saved is not None and 3 <= saved < steps and not run.finished
    assert "stopped by SIGTERM" in log.read_text()

    resumed = train_mod.train(cfg, "checker", datamodule=_Data())
    assert noisy_stage[-1].started_at == saved and resumed.finished
    ref = train_mod.train(_noisy_cfg(tmp_path, "ref", steps, every=1000), "checker", datamodule=_Data())
    _assert_same_end(ref, resumed, steps)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, noisy_stage):
    run = train_mod.train(_noisy_cfg(tmp_path, "t", 8, every=2), "checker", datamodule=_Data())
    assert _ckpt_step(run.last_ckpt) == 8 and _ckpt_step(run.prev_ckpt) == 6
    (run.path / "FINISHED").unlink()  # as if killed after the step-8 checkpoint, which then got truncated
    data = run.last_ckpt.read_bytes()
    run.last_ckpt.write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match=r"cannot resume from last\.ckpt \(.*\): resuming from .*last\.prev\.ckpt "
                                            r"\(step 6\) instead"):
        train_mod.train(_noisy_cfg(tmp_path, "t", 12, every=2), "checker", datamodule=_Data())
    assert noisy_stage[-1].started_at == 6 and run.finished and _ckpt_step(run.last_ckpt) == 12
    assert (run.checkpoints / "last.corrupt.ckpt").is_file()  # moved aside, not rotated over the good one

    # a flipped bit loads with torch (it checks no CRC) but not here; with no readable checkpoint left: one line
    good = run.last_ckpt.read_bytes()
    at = good.find(torch.load(run.last_ckpt, weights_only=False)["state_dict"]["net.weight"].numpy().tobytes())
    for p in (run.last_ckpt, run.prev_ckpt):
        p.write_bytes(good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:])
    assert "CRC mismatch" in checkpoint_problem(run.last_ckpt)[0]
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from: .*last\.ckpt \(damaged: CRC mismatch"):
        run.resume_checkpoint()


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the old last.ckpt and no temporary file; the temporary file is in the
    checkpoint's folder; a crash between the two renames leaves last.prev.ckpt, which the resume takes."""
    run = RunDir(tmp_path / "run")
    save_checkpoint_file({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, run.last_ckpt, previous=run.prev_ckpt)
    real_save, seen = torch.save, []

    def dying_save(obj, f):
        seen.append(Path(f.name).parent)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_file({"state_dict": {}, "global_step": 2}, run.last_ckpt, previous=run.prev_ckpt)
    monkeypatch.setattr(torch, "save", real_save)
    assert seen == [run.checkpoints] and sorted(p.name for p in run.checkpoints.iterdir()) == ["last.ckpt"]
    assert _ckpt_step(run.last_ckpt) == 1

    import evotok.runs as runs_mod

    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between "last -> prev" and "tmp -> last"
        real_replace(src, dst)

    monkeypatch.setattr(runs_mod.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_file({"state_dict": {}, "global_step": 2}, run.last_ckpt, previous=run.prev_ckpt)
    monkeypatch.setattr(runs_mod.os, "replace", real_replace)
    assert not run.last_ckpt.exists() and run.resume_checkpoint() == run.prev_ckpt and _ckpt_step(run.prev_ckpt) == 1


def test_nan_guard_names_the_term_and_step_and_keeps_the_last_good_checkpoint(tmp_path, noisy_stage, monkeypatch):
    monkeypatch.setenv("EVOTOK_TEST_NAN_AT", "5")
    with pytest.raises(train_mod.NonFiniteLoss, match=r"non-finite loss at step 5: train/loss = nan\. .*last\.ckpt "
                                                      r"\(step 4\) is the last good checkpoint"):
        train_mod.train(_noisy_cfg(tmp_path, "nan", 12, every=2), "checker", datamodule=_Data())
    run = RunDir(tmp_path / "checker" / "nan")
    ckpt = load_checkpoint_file(run.last_ckpt)
    assert ckpt["global_step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert not run.finished and not run.best_ckpt.exists()


def test_nan_guard_reads_the_tokenizer_loss_terms(tmp_path, cache, monkeypatch):
    """The tokenizer exposes its terms (last_loss_terms): a NaN reconstruction loss is reported as train/recon."""
    from evotok.models.losses import TokenizerLoss

    forward = TokenizerLoss.forward

    def nan_recon(self, *args, **kwargs):
        terms = forward(self, *args, **kwargs)
        return terms._replace(recon=terms.recon * float("nan")) if args[5] == 3 else terms  # args[5]: the step

    monkeypatch.setattr(TokenizerLoss, "forward", nan_recon)
    config, stage, extra = TOKENIZER
    cfg = load_config(config, [*_overrides(tmp_path, cache, "nan", extra), "trainer.max_steps=6"], stage=stage)
    with pytest.raises(train_mod.NonFiniteLoss, match=r"at step 3: train/recon = nan\. .*\(step 2\) is the last good"):
        train_mod.train(cfg, stage)
    assert _ckpt_step(RunDir(tmp_path / "runs" / stage / "nan").last_ckpt) == 2


def test_tokenizer_declares_unused_parameters_for_ddp():
    from lightning.pytorch.strategies import DDPStrategy

    from evotok.lit.tokenizer_module import TokenizerModule

    assert TokenizerModule.ddp_find_unused_parameters is True
    module, plain = types.SimpleNamespace(ddp_find_unused_parameters=True), types.SimpleNamespace()
    two = load_config(None, ["trainer.accelerator=cpu", "trainer.devices=2"])
    strategy = train_mod.choose_strategy(two, module)
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs["find_unused_parameters"] is True
    assert TokenizerModule.ddp_broadcast_buffers is False  # its quantizer keeps the codebooks identical itself
    tok = train_mod.choose_strategy(two, TokenizerModule)
    assert tok._ddp_kwargs == {"find_unused_parameters": True, "broadcast_buffers": False}
    assert train_mod.choose_strategy(two, plain) == "auto"  # Lightning's own choice (plain DDP)
    one = load_config(None, ["trainer.accelerator=cpu", "trainer.devices=1"])
    assert train_mod.choose_strategy(one, module) == "auto"
    assert train_mod.choose_strategy(load_config(None, ["trainer.accelerator=cpu", "trainer.devices=2",
                                                        "trainer.strategy=ddp_spawn"]), module) == "ddp_spawn"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    assert trainer.strategy is strategy and trainer.num_devices == 2
