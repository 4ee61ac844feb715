"""Training entry point shared by every stage: upstream hand-over, run folder, trainer, loggers, resume.

A stage plugs in through its registry entry (evotok/stages.py): its module provides ``build(cfg, upstream)
-> LightningModule``. The LightningModule may set ``monitor`` / ``monitor_mode`` (the validation metric that
picks best.ckpt), ``extra_callbacks()``, ``handles_accumulation`` (it accumulates gradients itself) and
``on_run_finished(run, trainer)``, ``ddp_find_unused_parameters`` (True: some parameters get no gradient in a
backward pass, so DDP must look for them; build_trainer then gives ``trainer.strategy=auto`` on several devices a
``DDPStrategy(find_unused_parameters=True)``), ``ddp_broadcast_buffers`` (False: the module keeps its buffers
identical across ranks itself, so DDP need not copy them from rank 0 at every forward) and ``last_loss_terms``
(a dict of the step's named loss tensors, checked by the non-finite guard; without it the step's returned loss is checked as ``train/loss``).

Order, so that a failure leaves nothing behind: resolve and fingerprint the upstream runs, check the run
folder (finished? resumable with the same model and upstreams?), build the module (this loads the upstream
models), then create the run folder and train. Under several processes (Lightning's launcher, torchrun, srun) only
global rank 0 creates and writes the run folder (docs/multinode.md); the other ranks wait for it and write nothing.

Fault tolerance (README "Fault tolerance"): checkpoints are written atomically (:class:`AtomicCheckpointIO`; the
previous last.ckpt stays as last.prev.ckpt until the new one is complete) every ``trainer.ckpt_every_n_steps`` and
at the end of the step a SIGTERM arrives in (:class:`PreemptionCheckpoint`; the process then exits with status
:data:`EXIT_PREEMPTED`); a resumed run continues exactly where the checkpoint was taken: model, optimisers,
schedulers, module buffers (the EMA codebooks), the loops and the train loader's position (Lightning, with the
DataModule's resumable loader) and the random streams (:class:`RngStateCallback`). A NaN or infinite loss term
stops the run before that state can be saved (:class:`NonFiniteGuard`).
"""

from __future__ import annotations

import math
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from evotok.config import Config, accumulate_steps
from evotok.errors import UserError
from evotok.runs import (CORRUPT_CKPT, PREV_CKPT, TMP_SUFFIX, RunDir, checkpoint_problem, create_run, prepare_run,
                         save_checkpoint_file, write_metrics)

# Lightning warnings that describe what the suite does on purpose: frozen teachers sit in eval mode, and
# last.ckpt holds the post-step state of manually optimised modules.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Using ModelCheckpoint with manual optimization",
)
CHECKPOINT_FORMAT = 2  # checkpoint["evotok"]["format"]: 2 = with upstream records
# Exit status of a run stopped by SIGTERM after writing last.ckpt (128 + SIGTERM, what a shell reports for a process
# the signal ended): not 0, so job schedulers and `&&` chains see that the run did not finish; rerun to resume.
EXIT_PREEMPTED = 143


class Preempted(SystemExit):
    """A SIGTERM stopped the run at a step boundary; last.ckpt holds that step. Exit status :data:`EXIT_PREEMPTED`."""


class NonFiniteLoss(UserError, FloatingPointError):
    """A loss term of a training step is NaN or infinite; the message names the term and the step."""


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


def _checkpoint_io_base():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    return TorchCheckpointIO


class AtomicCheckpointIO(_checkpoint_io_base()):  # type: ignore[misc]
    """Lightning's TorchCheckpointIO, writing local files with :func:`evotok.runs.save_checkpoint_file`: a temporary
    file in the checkpoint's own folder, fsynced, then an atomic rename; a replaced last.ckpt becomes last.prev.ckpt.
    (Lightning's own atomic save goes through an fsspec transaction, which writes a file in the system temp folder
    and moves it into place: a copy, not a rename, when that folder is on another filesystem, and no fsync.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        p = Path(path)
        save_checkpoint_file(checkpoint, p, previous=p.with_name(PREV_CKPT) if p.name == "last.ckpt" else None)


def _rng_state(device) -> dict[str, Any]:
    """The global random streams of this process, as plain tensors and numbers (checkpoints load with
    ``weights_only``): torch CPU, the CUDA device this rank trains on, numpy's legacy global state, Python's."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class RngStateCallback(_callback_base()):  # type: ignore[misc]
    """Exact resume of the random streams, which Lightning's checkpoints do not hold. The training stream advances
    only inside training steps: the state at the end of each step is kept and put back at the start of the next,
    so what runs between steps (validation, the first fetch of an epoch drawing the loader's base seed, a resumed
    loader skipping the batches already trained on) draws from it without moving it, in an uninterrupted run
    and in a resumed one alike. Checkpoints hold that state, one per rank: ``checkpoint["rng_states"]``."""

    KEY = "rng_states"

    def __init__(self) -> None:
        super().__init__()
        self._state: Optional[dict[str, Any]] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._state is not None:
            _set_rng_state(self._state, pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._state = _rng_state(pl_module.device)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = self._state if self._state is not None else _rng_state(pl_module.device)
        states = [state]
        if trainer.world_size > 1:  # every rank dumps the checkpoint (Lightning's save_checkpoint is collective)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                states = [None] * trainer.world_size
                dist.all_gather_object(states, state)
        checkpoint[self.KEY] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get(self.KEY)
        if states:  # a run resumed on another number of ranks takes rank r % saved ranks
            self._state = states[trainer.global_rank % len(states)]


def loss_terms(pl_module, outputs) -> dict[str, Any]:
    """The step's named loss terms: the module's ``last_loss_terms``, else its returned loss as ``train/loss``."""
    terms = getattr(pl_module, "last_loss_terms", None)
    if terms:
        return dict(terms)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return {"train/loss": loss} if loss is not None else {}


class NonFiniteGuard(_callback_base()):  # type: ignore[misc]
    """Stops the run when a loss term of a training step is NaN or infinite, naming the term and the step
    (``trainer.global_step`` when the batch started, the step the modules log it at). It runs in
    ``on_train_batch_end`` before the checkpoint callbacks (Lightning calls those last) and before validation, so
    the broken state is never written: last.ckpt stays the last good one. One device sync per step.

    Under DDP the ranks decide without a collective of their own (Lightning's SIGTERM handler broadcasts from
    inside the signal handler, and an extra per-step collective is what that broadcast would pair with): a
    non-finite loss on any rank makes the all-reduced gradients, and so the updated parameters, non-finite on
    every rank at the same optimiser step, so each rank checks one parameter of every optimiser parameter group
    there and they all stop together."""

    def __init__(self, run: RunDir):
        super().__init__()
        self.run = run
        self._step = 0
        self._seen: dict[str, Any] = {}  # DDP: non-finite terms of this rank since the last optimiser step
        self._seen_step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        terms = loss_terms(pl_module, outputs)
        bad = {k: v for (k, v), ok in zip(terms.items(), finite_flags(list(terms.values()))) if not ok}
        if trainer.world_size <= 1:
            if bad:
                raise NonFiniteLoss(self._message(bad, self._step))
            return
        if bad and not self._seen:
            self._seen, self._seen_step = bad, self._step
        if trainer.global_step == self._step:
            return  # no optimiser step in this batch (accumulating): the parameters did not change
        probes = [g["params"][0].detach() for opt in trainer.optimizers for g in opt.param_groups if g["params"]]
        if not all(finite_flags(probes)):
            raise NonFiniteLoss(self._message(self._seen, self._seen_step if self._seen else self._step))
        if self._seen:
            warnings.warn(f"rank {trainer.global_rank}: non-finite loss at step {self._seen_step} "
                          f"({', '.join(self._seen)}), but the parameters stayed finite (the step was skipped)",
                          RuntimeWarning, stacklevel=2)
        self._seen = {}

    def _message(self, bad: dict[str, Any], step: int) -> str:
        if bad:
            shown = ", ".join(f"{k} = {_show(v)}" for k, v in bad.items())
            what = f"non-finite loss at step {step}: {shown}"
        else:
            what = f"non-finite parameters after step {step}: a loss on another rank is NaN or infinite"
        last = self.run.last_ckpt
        problem, saved = checkpoint_problem(last)
        kept = (f"{last} (step {saved}) is the last good checkpoint; rerunning the same command resumes from it"
                if problem is None else "no checkpoint had been written")
        return (f"{what}. The run stopped without saving this state: {kept}. Lower optim.lr, raise "
                f"optim.warmup_steps or set optim.grad_clip, or check the data of this step")


def finite_flags(values: Sequence[Any]) -> list[bool]:
    """Whether each value (a tensor or a number) is finite everywhere; one device sync for all the tensors."""
    import torch

    tensors = [torch.isfinite(v.detach()).all() for v in values if isinstance(v, torch.Tensor)]
    checked = iter(torch.stack(tensors).tolist() if tensors else [])
    return [bool(next(checked)) if isinstance(v, torch.Tensor) else math.isfinite(float(v)) for v in values]


def _show(v: Any) -> str:
    import torch

    if isinstance(v, torch.Tensor) and v.numel() != 1:
        return f"non-finite values in a {tuple(v.shape)} tensor"
    return str(float(v))


class PreemptionCheckpoint(_callback_base()):  # type: ignore[misc]
    """Writes last.ckpt when a SIGTERM stops the run. Lightning's signal connector sets
    ``trainer.received_sigterm`` and stops the loops with its ``SIGTERMException`` (train() turns it into
    :class:`Preempted`); under SLURM with auto-requeue it also owns SIGUSR1 (it saves hpc_ckpt_<n>.ckpt in the
    run folder and requeues the job; :meth:`RunDir.resume_checkpoint` resumes from it when it is newer).

    In one process the checkpoint is written at the end of the step the signal arrives in, and the run stops
    there. Under DDP the ranks learn of the signal at different moments (Lightning broadcasts it), so the
    checkpoint is written in ``on_exception``, which every rank reaches through Lightning's stop with no
    collective pending (the save is one). Mid-accumulation (no optimiser step in the last batch) nothing is
    written, since the accumulated gradients would be lost: the run resumes from the last step-boundary
    checkpoint."""

    def __init__(self, path: Path, accumulate: int = 1):
        super().__init__()
        self.path, self.accumulate = Path(path), int(accumulate)
        self._step = 0
        self._boundary = True
        self._saved_step: Optional[int] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._boundary = self.accumulate <= 1 or trainer.global_step != self._step
        if not trainer.received_sigterm or trainer.world_size > 1:
            return
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return  # the last step: the run finishes as usual
        self._save(trainer)
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            self._save(trainer)

    def _save(self, trainer) -> None:
        if self._saved_step == trainer.global_step:
            return
        self._saved_step = trainer.global_step
        if not self._boundary:
            if trainer.is_global_zero:
                warnings.warn(f"SIGTERM arrived in the middle of a gradient accumulation at step "
                              f"{trainer.global_step}: nothing saved, the run resumes from the last checkpoint",
                              RuntimeWarning, stacklevel=2)
            return
        trainer.save_checkpoint(str(self.path))


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
        # in this order: a NaN stops the step before its state is saved; the random state of the step's end is
        # taken before any save of it; a SIGTERM saves last.ckpt (Lightning moves ModelCheckpoints to the end)
        NonFiniteGuard(run),
        RngStateCallback(),
        PreemptionCheckpoint(run.last_ckpt, accumulate=accumulate_steps(cfg)),
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
        strategy=choose_strategy(cfg, module),
        plugins=[AtomicCheckpointIO()],
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


def device_count(accelerator: str, devices: Any) -> int:
    """How many devices of ``accelerator`` (cpu | cuda | gpu | mps | auto) ``devices`` selects on this node,
    through Lightning's accelerator classes; 1 when Lightning would refuse the value (the Trainer then says why)."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator

    acc = str(accelerator)
    if acc in ("auto", "gpu"):
        acc = "cuda" if CUDAAccelerator.is_available() else "mps" if MPSAccelerator.is_available() else "cpu"
    cls = {"cpu": CPUAccelerator, "cuda": CUDAAccelerator, "mps": MPSAccelerator}.get(acc)
    if cls is None:
        return 1
    try:
        chosen = cls.auto_device_count() if devices == "auto" else devices
        return len(cls.get_parallel_devices(cls.parse_devices(chosen)))
    except Exception:  # noqa: BLE001 (Lightning raises its own message for the same value)
        return 1


def choose_strategy(cfg: Config, module: Any):
    """``trainer.strategy``, except that ``auto`` on several devices (or nodes) becomes a ``DDPStrategy`` with the
    module's ``ddp_find_unused_parameters`` / ``ddp_broadcast_buffers`` when it declares either (Lightning's
    ``auto`` would pick plain DDP, which fails on the first parameter without a gradient)."""
    t = cfg.trainer
    unused = bool(getattr(module, "ddp_find_unused_parameters", False))
    broadcast = bool(getattr(module, "ddp_broadcast_buffers", True))
    if t.strategy != "auto" or (not unused and broadcast):
        return t.strategy
    if t.num_nodes <= 1 and device_count(t.accelerator, t.devices) <= 1:
        return t.strategy
    from lightning.pytorch.strategies import DDPStrategy

    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)  # Lightning's auto picks ddp_fork there
    return DDPStrategy(find_unused_parameters=unused, broadcast_buffers=broadcast,
                       start_method="fork" if interactive else "popen")


def check_global_batch(cfg: Config, trainer: Any) -> None:
    """``trainer.global_batch_size`` is what every optimiser step sees: data.batch_size x the devices the Trainer
    really uses x num_nodes x the derived accumulation. The derivation (evotok.config.accumulate_steps) counts
    ``trainer.devices: auto`` and device strings as one device; where that differs from the Trainer's count the run
    would silently train with another global batch, so it stops here, naming the keys."""
    from evotok.config import ConfigError

    t = cfg.trainer
    if not t.global_batch_size:
        return
    acc = accumulate_steps(cfg)
    per_step = cfg.data.batch_size * trainer.num_devices * trainer.num_nodes
    if per_step * acc != t.global_batch_size:
        raise ConfigError(
            f"config key 'trainer.global_batch_size' = {t.global_batch_size}, but the Trainer runs "
            f"{trainer.num_devices} device(s) per node x trainer.num_nodes={trainer.num_nodes} x "
            f"data.batch_size={cfg.data.batch_size} x accumulation {acc} (derived from trainer.devices="
            f"{t.devices!r}) = {per_step * acc}: set trainer.devices to the device count ({trainer.num_devices})"
        )


def make_datamodule(cfg: Config, stage: str, module: Any):
    """The one DataModule, seen through ``stage``'s view; its collate from the stage module's
    ``make_collate(cfg, module)`` when it has one (language-model stages tokenise with the module's tokenizer)."""
    from evotok.data.datamodule import EvoTokDataModule
    from evotok.stages import get_stage

    lit = get_stage(stage).lit_module()
    make = getattr(lit, "make_collate", None)
    return EvoTokDataModule(cfg, stage=stage, collate_fn=make(cfg, module) if make is not None else None)


def tidy_checkpoints(run: RunDir, resume_from: Optional[Path]) -> None:
    """Before training: delete temporary files of checkpoint writes a crash interrupted, and move an unreadable
    last.ckpt aside (last.corrupt.ckpt) when the run resumes from last.prev.ckpt, so the next save does not
    rotate it over the good one."""
    for tmp in run.checkpoints.glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
    if resume_from is not None and resume_from == run.prev_ckpt and run.last_ckpt.is_file():
        run.last_ckpt.replace(run.checkpoints / CORRUPT_CKPT)


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
    # only global rank 0 writes the run folder (config.yaml, provenance.json); other ranks wait for it
    run = create_run(cfg, stage, argv, upstream, extra=extra() if extra is not None else None)
    recs = records(upstream, run.path)
    trainer = build_trainer(cfg, run, module, stage, recs)
    check_global_batch(cfg, trainer)
    ckpt = run.resume_checkpoint()  # warns when last.ckpt is unreadable and last.prev.ckpt is taken
    if trainer.is_global_zero:
        tidy_checkpoints(run, ckpt)
        if ckpt is not None:
            print(f"resuming {stage} run from {ckpt}")
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
        except SIGTERMException:
            if trainer.is_global_zero:
                print(f"{stage} run stopped by SIGTERM at step {trainer.global_step}; {run.last_ckpt} holds the last "
                      f"step boundary: rerun the same command to resume", file=sys.stderr)
            raise Preempted(EXIT_PREEMPTED) from None
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
