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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from evotok.config import REPO_ROOT, Config, ConfigError, from_dict, leaf_paths, to_dict, to_yaml
from evotok.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from evotok.handover import Upstream

FINISHED_MARKER = "FINISHED"
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
    def resumable(self) -> bool:
        return self.last_ckpt.is_file() and not self.finished


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
    if cfg.run.overwrite or not run.last_ckpt.is_file():
        return run, resolve_upstreams(cfg, stage)
    if run.config.is_file():
        _check_resume_config(run, cfg, stage)
    recorded = recorded_upstream(run.path, run.last_ckpt) or {}
    upstream = check_resume(recorded, resolve_upstreams(cfg, stage, missing_ok=True), run.path)
    for key in active_keys(cfg, stage):
        if key not in upstream:  # neither found from here nor recorded by the run: the error names the key
            upstream[key] = locate(key, get_key(cfg, key))
    return run, upstream


def create_run(
    cfg: Config, stage: str, argv: Optional[Sequence[str]] = None, upstream: "Optional[dict[str, Upstream]]" = None,
    extra: Optional[dict[str, Any]] = None,
) -> RunDir:
    """Create (or re-open for resuming) the run folder and write config.yaml (what ``stage`` reads) and
    provenance.json (with the upstream records and ``extra``, e.g. the module's resolved input normalisation).
    ``run.overwrite=true`` deletes the old folder first, so no
    file of an earlier run (checkpoints, tb/, metrics.json, figures) survives into the new one; a resumed run
    keeps everything it wrote. Call :func:`prepare_run` first."""
    from evotok.handover import records

    run = RunDir(run_path(cfg, stage))
    if cfg.run.overwrite and run.path.exists():
        shutil.rmtree(run.path)
    for p in (run.path, run.checkpoints, run.tb, run.figures):
        p.mkdir(parents=True, exist_ok=True)
    run.config.write_text(to_yaml(cfg, stage))
    prov = provenance(cfg, stage, argv)
    prov["upstream"] = records(upstream or {}, run.path)
    prov.update(extra or {})
    run.provenance.write_text(json.dumps(prov, indent=2) + "\n")
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
