"""Run folders: ``<run.dir>/<stage>/<run.name>/`` with config.yaml, provenance.json, checkpoints/,
tb/, metrics.json and figures/ (DESIGN.md §5). Every stage creates its folder through this module."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from evotok.config import REPO_ROOT, Config, ConfigError, from_dict, leaf_paths, to_dict, to_yaml
from evotok.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from evotok.handover import Upstream

FINISHED_MARKER = "FINISHED"
PREV_CKPT = "last.prev.ckpt"  # the previous last.ckpt, kept until the next one is complete
CORRUPT_CKPT = "last.corrupt.ckpt"  # a last.ckpt that could not be resumed from, moved aside by the resumed run
TMP_SUFFIX = ".tmp"  # checkpoints being written: .<name>.<pid>.<random>.tmp in the same folder
PACKAGES = ("torch", "torchvision", "lightning", "open_clip_torch", "transformers", "tokenizers", "numpy", "omegaconf")
# Keys that may change when a run is resumed (the rest define the model and must match what the run started with;
# upstream keys are checked by fingerprint instead).
RESUME_FREE = (
    "trainer", "run", "eval", "optim", "data", "teacher.cache_features", "teacher.run", "teacher.weights",
    "tokenizer.run", "lm.run", "lm.path", "understanding.run", "lm.gradient_checkpointing", "mllm.cache_features",
)


class RunError(UserError, RuntimeError):
    """A run folder problem: exists and is finished, or is not a run folder."""


class CheckpointError(UserError, ValueError):
    """A file that is not a readable checkpoint."""


def load_checkpoint_file(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a checkpoint on the CPU; a file that is not one fails with one line naming it."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # pickle, zip and format errors of every kind
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p} is not a checkpoint file torch can read ({type(e).__name__}: {reason[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def save_checkpoint_file(obj: dict[str, Any], path: str | Path, previous: Optional[Path] = None) -> Path:
    """``torch.save`` that a crash cannot leave half-written: the bytes go to a temporary file in the same folder,
    are fsynced, and replace ``path`` by an atomic rename (then the folder is fsynced). With ``previous``, the file
    being replaced is first renamed to ``previous`` (last.ckpt -> last.prev.ckpt), so the last complete checkpoint
    survives until the new one is complete. A crash between the two renames leaves only ``previous``:
    :meth:`RunDir.resume_checkpoint` resumes from it."""
    import torch

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and p.exists():
            os.replace(p, previous)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)
    return p


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_problem(path: str | Path) -> tuple[Optional[str], Optional[int]]:
    """Why ``path`` cannot be resumed from (None when it can), and its global step. Reads the whole file: every
    zip member's CRC (torch.load does not check them, so a flipped bit would load as garbage), then the pickle;
    a resumable checkpoint is a dict with a ``state_dict``."""
    p = Path(path)
    if not p.is_file():
        return "missing", None
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            return f"damaged zip archive ({type(e).__name__}: {str(e)[:120]})", None
        if bad is not None:
            return f"damaged: CRC mismatch in {bad}", None
    try:
        obj = load_checkpoint_file(p, mmap=zipfile.is_zipfile(p))
    except CheckpointError as e:
        return str(e).replace(f"{p} ", "", 1), None
    if "state_dict" not in obj:
        return "no state_dict in it", None
    return None, int(obj.get("global_step", 0))


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def provenance(self) -> Path:
        return self.path / "provenance.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def prev_ckpt(self) -> Path:
        """The last.ckpt before the latest one, kept until the new one is complete (:func:`save_checkpoint_file`)."""
        return self.checkpoints / PREV_CKPT

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def finished(self) -> bool:
        return (self.path / FINISHED_MARKER).exists()

    def mark_finished(self) -> None:
        (self.path / FINISHED_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")

    def load_config(self) -> Config:
        if not self.config.is_file():
            raise RunError(f"{self.path} is not a run folder: {self.config.name} is missing")
        from omegaconf import OmegaConf

        tree = OmegaConf.to_container(OmegaConf.load(self.config))
        return from_dict(tree, source=str(self.config))  # type: ignore[arg-type]

    @property
    def stage(self) -> str:
        """The stage that made the run (provenance.json; else the folder layout <run.dir>/<stage>/<name>)."""
        if self.provenance.is_file():
            stage = json.loads(self.provenance.read_text()).get("stage")
            if stage:
                return str(stage)
        return self.path.parent.name

    @property
    def has_resume_files(self) -> bool:
        """last.ckpt, last.prev.ckpt or a SLURM requeue checkpoint exists (readable or not): the run was started
        and may resume."""
        return self.last_ckpt.is_file() or self.prev_ckpt.is_file() or bool(self.hpc_checkpoints())

    @property
    def resumable(self) -> bool:
        return self.has_resume_files and not self.finished

    def hpc_checkpoints(self) -> list[Path]:
        """Lightning's SLURM requeue checkpoints (``hpc_ckpt_<n>.ckpt`` in the run folder, its default_root_dir),
        newest first."""
        def number(p: Path) -> int:
            tail = p.stem.rsplit("_", 1)[-1]
            return int(tail) if tail.isdigit() else -1

        return sorted(self.path.glob("hpc_ckpt_*.ckpt"), key=number, reverse=True)

    def resume_checkpoint(self, warn: bool = True) -> Optional[Path]:
        """The checkpoint a resumed run starts from: last.ckpt; when that is missing, truncated or damaged
        (:func:`checkpoint_problem`), last.prev.ckpt, with a warning naming both. A newer Lightning SLURM requeue
        checkpoint (:meth:`hpc_checkpoints`, by global step) wins over both. None when the run has no checkpoint;
        a CheckpointError when it has some and none can be resumed from."""
        found: list[tuple[Path, int]] = []
        rejected: list[tuple[Path, str]] = []
        for p in (self.last_ckpt, self.prev_ckpt):
            if not p.is_file():
                continue
            problem, step = checkpoint_problem(p)
            if problem is None:
                found.append((p, step or 0))
                break
            rejected.append((p, problem))
        hpc = self.hpc_checkpoints()
        if hpc:
            problem, step = checkpoint_problem(hpc[0])
            if problem is None and (not found or (step or 0) > found[0][1]):
                found.insert(0, (hpc[0], step or 0))
            elif problem is not None:
                rejected.append((hpc[0], problem))
        if not found:
            if not rejected:
                return None
            listed = "; ".join(f"{p} ({why})" for p, why in rejected)
            raise CheckpointError(f"run folder {self.path} has no checkpoint to resume from: {listed}; "
                                  "start afresh with run.overwrite=true")
        chosen, step = found[0]
        if warn and rejected:
            listed = "; ".join(f"{p.name} ({why})" for p, why in rejected)
            warnings.warn(f"cannot resume from {listed}: resuming from {chosen} (step {step}) instead",
                          RuntimeWarning, stacklevel=2)
        return chosen


def run_path(cfg: Config, stage: str) -> Path:
    return Path(cfg.run.dir) / stage / cfg.run.name


def prepare_run(cfg: Config, stage: str) -> "tuple[RunDir, dict[str, Upstream]]":
    """Check, before anything is built or written, that ``cfg`` may train into its run folder, and resolve its
    upstream runs (evotok.handover): a finished run needs ``run.overwrite=true``; a run resumed from its last
    checkpoint keeps its model config and its upstream runs (by fingerprint; an upstream that no longer
    resolves from the working directory is found through the run's record, relative to the run folder).
    Returns the run folder and the upstreams to use."""
    from evotok.config import get_key
    from evotok.handover import active_keys, check_resume, locate, recorded_upstream, resolve_upstreams

    run = RunDir(run_path(cfg, stage))
    if run.finished and not cfg.run.overwrite:
        raise RunError(
            f"run folder {run.path} holds a finished run; choose another run.name or pass run.overwrite=true"
        )
    if cfg.run.overwrite or not run.has_resume_files:
        return run, resolve_upstreams(cfg, stage)
    if run.config.is_file():
        _check_resume_config(run, cfg, stage)
    recorded = recorded_upstream(run.path, run.resume_checkpoint(warn=False)) or {}
    upstream = check_resume(recorded, resolve_upstreams(cfg, stage, missing_ok=True), run.path)
    for key in active_keys(cfg, stage):
        if key not in upstream:  # neither found from here nor recorded by the run: the error names the key
            upstream[key] = locate(key, get_key(cfg, key))
    return run, upstream


# Environment variables through which launchers give a process its rank: torchrun (RANK, GROUP_RANK = node, LOCAL_RANK),
# SLURM's srun (SLURM_PROCID), Lightning's own DDP launcher, which re-runs the command for ranks 1.. (LOCAL_RANK,
# NODE_RANK). Read before a Trainer exists; afterwards ``trainer.is_global_zero`` says the same.
RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
# Variables a launcher gives every rank of one launch alike, before any process starts: they identify the launch, so
# a rank waiting for rank 0's run folder can tell this launch's provenance.json from an earlier one's.
LAUNCH_ENV = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")
EXTERNAL_ENV = ("MASTER_ADDR", "MASTER_PORT")  # part of the launch id where the launcher started every rank itself
RUN_WAIT_S = 600.0  # how long ranks > 0 wait for rank 0 to create the run folder


def is_rank_zero(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process is global rank 0 by its launcher's variables (:data:`RANK_ENV`): a process any of
    them marks non-zero is not. Without any (one process, or rank 0 of Lightning's launcher, which starts the
    other ranks later, from inside ``trainer.fit``) it is."""
    env = os.environ if env is None else env
    for key in RANK_ENV:
        value = str(env.get(key, "")).strip()
        if value and value.lstrip("-").isdigit() and int(value) != 0:
            return False
    return True


def launch_id(env: Optional[Mapping[str, str]] = None) -> str:
    """What identifies this launch, the same on every rank (:data:`LAUNCH_ENV`; with torchrun or srun also the
    rendezvous address); "" for one process and under Lightning's own launcher (its ranks > 0 start after rank 0
    created the run folder, so they need not tell launches apart)."""
    env = os.environ if env is None else env
    keys = list(LAUNCH_ENV)
    if env.get("RANK") or env.get("SLURM_PROCID"):
        keys += EXTERNAL_ENV
    return ";".join(f"{k}={env[k]}" for k in keys if env.get(k))


def wait_for_run(run: RunDir, launch: str, timeout_s: float = RUN_WAIT_S, poll_s: float = 0.5) -> RunDir:
    """On ranks > 0: wait until rank 0 has created ``run`` for this launch (its provenance.json, written last by
    :func:`create_run`, names ``launch``; with no launch id, until it exists). Writes nothing."""
    deadline = time.monotonic() + timeout_s
    while True:
        if run.provenance.is_file():
            try:
                seen = json.loads(run.provenance.read_text()).get("launch", "")
            except (OSError, json.JSONDecodeError):  # being replaced just now
                seen = None
            if seen is not None and (not launch or seen == launch):
                return run
        if time.monotonic() > deadline:
            raise RunError(
                f"rank > 0 waited {timeout_s:.0f} s for rank 0 to create the run folder {run.path} "
                f"(provenance.json of launch {launch or '(no launcher id)'}): did rank 0 fail, or does rank 0 see "
                "another run.dir (ranks on several nodes need run.dir on a shared filesystem)?"
            )
        time.sleep(poll_s)


def create_run(
    cfg: Config, stage: str, argv: Optional[Sequence[str]] = None, upstream: "Optional[dict[str, Upstream]]" = None,
    extra: Optional[dict[str, Any]] = None, rank_zero: Optional[bool] = None,
) -> RunDir:
    """Create (or re-open for resuming) the run folder and write config.yaml (what ``stage`` reads) and
    provenance.json (with the upstream records and ``extra``, e.g. the module's resolved input normalisation).
    ``run.overwrite=true`` deletes the old folder first, so no
    file of an earlier run (checkpoints, tb/, metrics.json, figures) survives into the new one; a resumed run
    keeps everything it wrote. Call :func:`prepare_run` first.

    Only global rank 0 (``rank_zero``; by default :func:`is_rank_zero` of the launcher's variables) writes: the
    other ranks of a multi-process run write nothing and wait for rank 0's provenance.json of this launch
    (:func:`wait_for_run`), so a rank never resumes from a checkpoint that rank 0's ``run.overwrite`` is deleting."""
    from evotok.handover import records

    run = RunDir(run_path(cfg, stage))
    launch = launch_id()
    if not (is_rank_zero() if rank_zero is None else rank_zero):
        return wait_for_run(run, launch)
    if cfg.run.overwrite and run.path.exists():
        shutil.rmtree(run.path)
    for p in (run.path, run.checkpoints, run.tb, run.figures):
        p.mkdir(parents=True, exist_ok=True)
    run.config.write_text(to_yaml(cfg, stage))
    prov = provenance(cfg, stage, argv)
    prov["upstream"] = records(upstream or {}, run.path)
    prov.update(extra or {})
    prov["launch"] = launch
    tmp = run.provenance.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(prov, indent=2) + "\n")
    tmp.replace(run.provenance)  # atomic: ranks > 0 poll this file (wait_for_run)
    return run


def _check_resume_config(run: RunDir, cfg: Config, stage: str) -> None:
    """Resuming with a different model is an error, not a silent mix."""
    try:
        old = run.load_config()
    except ConfigError:
        return
    a, b = _flat(to_dict(old, stage)), _flat(to_dict(cfg, stage))
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in RESUME_FREE):
            continue
        if a.get(key) != b.get(key):
            raise RunError(
                f"run folder {run.path} was started with {key}={a.get(key)!r}, now {b.get(key)!r}; "
                f"resume with the same model, choose another run.name, or start afresh with run.overwrite=true"
            )


def _flat(tree: dict) -> dict[str, Any]:
    out = {}
    for path in leaf_paths(tree):
        node: Any = tree
        for part in path.split("."):
            node = node[part]
        out[path] = node
    return out


def provenance(cfg: Config, stage: str, argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    sha, dirty = git_state()
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "stage": stage,
        "git_sha": sha,
        "git_dirty": dirty,
        "packages": versions,
        "python": sys.version.split()[0],
        "seed": cfg.run.seed,
        "command": list(argv) if argv is not None else sys.argv,
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_state(repo: Path = REPO_ROOT) -> tuple[Optional[str], Optional[bool]]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def write_metrics(
    run: RunDir | Path,
    stage: str,
    step: int,
    scalars: Optional[dict[str, float]] = None,
    per_depth: Optional[dict[str, Sequence[float]]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write or update metrics.json (DESIGN §5 schema); new names are merged into what is there."""
    path = (run.path if isinstance(run, RunDir) else Path(run)) / "metrics.json"
    data: dict[str, Any] = {"stage": stage, "step": step, "scalars": {}, "per_depth": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            data["scalars"].update(old.get("scalars", {}))
            data["per_depth"].update(old.get("per_depth", {}))
            for k, v in old.items():
                if k not in data:
                    data[k] = v
        except json.JSONDecodeError:
            pass
    data["stage"], data["step"] = stage, int(step)
    data["scalars"].update({k: _num(v) for k, v in (scalars or {}).items()})
    data["per_depth"].update({k: [_num(x) for x in v] for k, v in (per_depth or {}).items()})
    if extra:
        data.update(extra)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)  # atomic: a killed run never leaves half a file
    return path


def read_metrics(run: RunDir | Path) -> dict[str, Any]:
    path = (run.path if isinstance(run, RunDir) else Path(run)) / "metrics.json"
    if not path.is_file():
        raise RunError(f"{path} does not exist: evaluate the run first (evotok eval ... --run {path.parent})")
    return json.loads(path.read_text())


def _num(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None  # NaN -> null in JSON


def resolve_run(run_or_ckpt: str | Path) -> tuple[RunDir, Path]:
    """Accept a run folder or a checkpoint file; return the run folder and the checkpoint to load (best, else
    last)."""
    p = Path(run_or_ckpt)
    if p.is_file() or p.suffix == ".ckpt":
        if not p.is_file():
            raise RunError(f"checkpoint {p} does not exist")
        root = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        return RunDir(root), p
    if not p.is_dir():
        raise RunError(f"run folder {p} does not exist")
    run = RunDir(p)
    for ckpt in (run.best_ckpt, run.last_ckpt):
        if ckpt.is_file():
            return run, ckpt
    raise RunError(f"run folder {p} has no checkpoints/best.ckpt or checkpoints/last.ckpt: was it trained?")
