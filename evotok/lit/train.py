"""Training entry point shared by every stage: upstream hand-over, run folder, trainer, loggers, resume.

A stage plugs in through its registry entry (evotok/stages.py): its module provides ``build(cfg, upstream)
-> LightningModule``. The LightningModule may set ``monitor`` / ``monitor_mode`` (the validation metric that
picks best.ckpt), ``extra_callbacks()``, ``handles_accumulation`` (it accumulates gradients itself) and
``on_run_finished(run, trainer)``.

Order, so that a failure leaves nothing behind: resolve and fingerprint the upstream runs, check the run
folder (finished? resumable with the same model and upstreams?), build the module (this loads the upstream
models), then create the run folder and train.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

from evotok.config import Config, accumulate_steps
from evotok.runs import RunDir, create_run, prepare_run, write_metrics

# Lightning warnings that describe what the suite does on purpose: frozen teachers sit in eval mode, and
# last.ckpt holds the post-step state of manually optimised modules.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Using ModelCheckpoint with manual optimization",
)
CHECKPOINT_FORMAT = 2  # checkpoint["evotok"]["format"]: 2 = with upstream records


def setup_process(cfg: Config) -> None:
    import torch

    torch.set_num_threads(max(1, cfg.trainer.threads))
    import lightning as L

    L.seed_everything(cfg.run.seed, workers=True, verbose=False)


def make_loggers(cfg: Config, run: RunDir) -> list[Any]:
    """``trainer.loggers``, through Lightning's own logger classes: TensorBoard in ``tb/``, CSV in ``csv/``,
    W&B in offline mode in ``wandb/`` (needs the wandb package; nothing is uploaded)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from evotok.config import ConfigError

    out: list[Any] = []
    for name in cfg.trainer.loggers:
        if name == "tensorboard":
            out.append(TensorBoardLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False))
        elif name == "csv":
            out.append(CSVLogger(save_dir=str(run.path), name="csv", version=""))
        elif name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "config key 'trainer.loggers' lists wandb, but the wandb package is not installed "
                    "(pip install -c constraints.txt wandb)"
                ) from None
            from lightning.pytorch.loggers import WandbLogger

            out.append(WandbLogger(save_dir=str(run.path), name=f"{run.path.parent.name}/{run.path.name}",
                                   offline=True, project="evotok"))
    return out


def _callback_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class RunRecordCallback(_callback_base()):  # type: ignore[misc]
    """Writes the run's identity into every checkpoint: ``checkpoint["evotok"] = {format, stage, upstream}``
    (the upstream records of evotok.handover), so a checkpoint moved away from its run folder still knows
    exactly which upstream runs it was trained from."""

    def __init__(self, stage: str, upstream_records: dict[str, dict[str, str]]):
        super().__init__()
        self.meta = {"format": CHECKPOINT_FORMAT, "stage": stage, "upstream": upstream_records}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["evotok"] = dict(self.meta)


class MetricsJsonCallback(_callback_base()):  # type: ignore[misc]
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


def build_trainer(
    cfg: Config, run: RunDir, module: Any, stage: str, upstream_records: Optional[dict] = None,
):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    t = cfg.trainer
    monitor = getattr(module, "monitor", None)
    callbacks: list[Any] = [
        # last.ckpt every ckpt_every_n_steps (and at the end): a killed run resumes from it.
        ModelCheckpoint(
            dirpath=run.checkpoints, save_last=True, save_top_k=0, every_n_train_steps=max(1, t.ckpt_every_n_steps),
            enable_version_counter=False,
        ),
        MetricsJsonCallback(run, stage=stage),
        RunRecordCallback(stage, upstream_records or {}),
        *getattr(module, "extra_callbacks", lambda: ())(),
    ]
    if monitor:
        callbacks.append(
            ModelCheckpoint(
                dirpath=run.checkpoints, filename="best", monitor=monitor, mode=getattr(module, "monitor_mode", "min"),
                save_top_k=1, save_last=False, enable_version_counter=False, auto_insert_metric_name=False,
            )
        )
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    val_every = max(1, min(t.val_every_n_steps, t.max_steps)) if t.max_steps > 0 else t.val_every_n_steps
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
        accumulate_grad_batches=1 if getattr(module, "handles_accumulation", False) else accumulate_steps(cfg),
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks,
        logger=make_loggers(cfg, run),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def make_datamodule(cfg: Config, stage: str, module: Any):
    """The one DataModule, seen through ``stage``'s view; its collate from the stage module's
    ``make_collate(cfg, module)`` when it has one (language-model stages tokenise with the module's tokenizer)."""
    from evotok.data.datamodule import EvoTokDataModule
    from evotok.stages import get_stage

    lit = get_stage(stage).lit_module()
    make = getattr(lit, "make_collate", None)
    return EvoTokDataModule(cfg, stage=stage, collate_fn=make(cfg, module) if make is not None else None)


def train(cfg: Config, stage: str, argv: Optional[Sequence[str]] = None, datamodule=None) -> RunDir:
    """Train ``stage`` with ``cfg``; resume from checkpoints/last.ckpt when the run folder has one."""
    from evotok.handover import records
    from evotok.stages import get_stage

    entry = get_stage(stage)
    lit = entry.lit_module()  # StageNotBuilt for stages without an implementation
    run, upstream = prepare_run(cfg, stage)
    setup_process(cfg)
    module = lit.build(cfg, upstream)
    if datamodule is None:
        datamodule = make_datamodule(cfg, stage, module)
    extra = getattr(module, "provenance_extra", None)  # what the module resolved (e.g. input normalisation)
    run = create_run(cfg, stage, argv, upstream, extra=extra() if extra is not None else None)
    recs = records(upstream, run.path)
    trainer = build_trainer(cfg, run, module, stage, recs)
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
        if 0 < trainer.global_step < cfg.trainer.max_steps and not trainer.interrupted:
            note = (f"stopped by the trainer.max_minutes={cfg.trainer.max_minutes} safety stop at step "
                    f"{trainer.global_step} of trainer.max_steps={cfg.trainer.max_steps}: the schedule did not finish")
            warnings.warn(note, RuntimeWarning, stacklevel=2)
            write_metrics(run, stage, trainer.global_step, extra={"stopped_early": note})
        if not trainer.interrupted:
            run.mark_finished()
        print(f"{stage} run folder: {Path(run.path).resolve()}")
    return run
