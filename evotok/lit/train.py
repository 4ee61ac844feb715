"""Training entry point shared by every stage: run folder, trainer, callbacks, resume.

A stage plugs in by providing ``build(cfg) -> LightningModule`` in the module named in ``STAGE_BUILDERS``.
The LightningModule sets ``monitor`` (a logged validation metric) and ``monitor_mode`` ("min"/"max").
"""

from __future__ import annotations

import importlib
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

from evotok.config import STAGES, Config, accumulate_steps
from evotok.runs import RunDir, create_run, write_metrics

STAGE_BUILDERS: dict[str, str] = {
    "teacher": "evotok.lit.teacher_module",
    "tokenizer": "evotok.lit.tokenizer_module",
}


# Lightning warnings that describe what the suite does on purpose: frozen teachers sit in eval mode, and
# last.ckpt holds the post-step state of manually optimised modules.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Using ModelCheckpoint with manual optimization",
)


class StageNotBuilt(NotImplementedError):
    """The stage exists in the design but has no implementation yet."""


def stage_builder(stage: str):
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    name = STAGE_BUILDERS.get(stage)
    if name is None:
        raise StageNotBuilt(
            f"stage '{stage}' is not built yet in this version of the suite; built stages: "
            f"{', '.join(STAGE_BUILDERS)}"
        )
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise StageNotBuilt(f"stage '{stage}' is not built yet ({name} is missing)") from None
        raise
    return module.build


def setup_process(cfg: Config) -> None:
    import torch

    torch.set_num_threads(max(1, cfg.trainer.threads))
    import lightning as L

    L.seed_everything(cfg.run.seed, workers=True, verbose=False)


def build_trainer(
    cfg: Config, run: RunDir, monitor: Optional[str], monitor_mode: str = "min", extra_callbacks=(),
    handles_accumulation: bool = False,
):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    t = cfg.trainer
    callbacks: list[Any] = [
        # last.ckpt every ckpt_every_n_steps (and at the end): a killed run resumes from it.
        ModelCheckpoint(
            dirpath=run.checkpoints, save_last=True, save_top_k=0, every_n_train_steps=max(1, t.ckpt_every_n_steps),
            enable_version_counter=False,
        ),
        MetricsJsonCallback(run, stage=run.path.parent.name),
        *extra_callbacks,
    ]
    if monitor:
        callbacks.append(
            ModelCheckpoint(
                dirpath=run.checkpoints, filename="best", monitor=monitor, mode=monitor_mode, save_top_k=1,
                save_last=False, enable_version_counter=False, auto_insert_metric_name=False,
            )
        )
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    logger = TensorBoardLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False)
    val_every = max(1, min(t.val_every_n_steps, t.max_steps))
    return L.Trainer(
        default_root_dir=str(run.path),
        max_steps=t.max_steps,
        max_time=timedelta(minutes=t.max_minutes) if t.max_minutes > 0 else None,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        # manual-optimisation modules (the tokenizer's G/D pair) accumulate themselves
        accumulate_grad_batches=1 if handles_accumulation else accumulate_steps(cfg),
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def budget_used(trainer) -> float:
    """Fraction of the run's budget spent, in [0, 1]: the larger of global_step / max_steps and (when the
    trainer has a ``max_time``) training time / max_time. Lightning's Timer keeps its elapsed time in the
    checkpoint, so a resumed run continues the same schedule."""
    from lightning.pytorch.callbacks import Timer

    used = trainer.global_step / trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0.0
    for cb in trainer.callbacks:
        remaining = cb.time_remaining() if isinstance(cb, Timer) else None
        if remaining is not None:
            elapsed = cb.time_elapsed()
            used = max(used, elapsed / max(elapsed + remaining, 1e-9))
    return min(1.0, max(0.0, used))


def lr_factor(step: int, warmup_steps: int, used: float, cooldown: float) -> float:
    """Warm-up, stable, decay: linear warm-up over ``warmup_steps``, then 1, then linear to 0 over the last
    ``cooldown`` fraction of the budget (``used`` is the fraction spent, from ``budget_used``)."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if cooldown > 0:
        factor *= min(1.0, max(0.0, (1.0 - used) / cooldown))
    return factor


def _metrics_callback_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class MetricsJsonCallback(_metrics_callback_base()):  # type: ignore[misc]
    """Mirror the latest logged scalars into metrics.json after every validation and at the end: Lightning's
    ``callback_metrics`` plus the module's ``logged_scalars`` (a dict of what it wrote to the loggers itself)."""

    def __init__(self, run: RunDir, stage: str):
        super().__init__()
        self.run, self.stage = run, stage

    def _write(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        scalars = dict(getattr(pl_module, "logged_scalars", {}))
        for k, v in trainer.callback_metrics.items():
            try:
                scalars[k] = float(v)
            except (TypeError, ValueError):
                continue
        write_metrics(self.run, self.stage, trainer.global_step, scalars=scalars)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


def train(cfg: Config, stage: str, argv: Optional[Sequence[str]] = None, datamodule=None) -> RunDir:
    """Train ``stage`` with ``cfg``; resume from checkpoints/last.ckpt when the run folder has one."""
    build = stage_builder(stage)
    run = create_run(cfg, stage, argv)
    setup_process(cfg)
    module = build(cfg)
    if datamodule is None:
        from evotok.data.datamodule import EvoTokDataModule

        datamodule = EvoTokDataModule(cfg, stage=stage)
    trainer = build_trainer(
        cfg, run, getattr(module, "monitor", None), getattr(module, "monitor_mode", "min"),
        extra_callbacks=getattr(module, "extra_callbacks", lambda: ())(),
        handles_accumulation=getattr(module, "handles_accumulation", False),
    )
    ckpt = run.last_ckpt if run.last_ckpt.is_file() else None
    if ckpt is not None and trainer.is_global_zero:
        print(f"resuming {stage} run from {ckpt}")
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.is_global_zero:
        finish = getattr(module, "on_run_finished", None)
        if finish is not None:
            finish(run, trainer)
        if not trainer.interrupted:
            run.mark_finished()
        print(f"{stage} run folder: {Path(run.path).resolve()}")
    return run
