"""Run folders: ``<run.dir>/<stage>/<run.name>/`` with config.yaml, provenance.json, checkpoints/,
tb/, metrics.json and figures/ (DESIGN.md §5). Every stage creates its folder through this module."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

from evotok.config import REPO_ROOT, Config, ConfigError, from_dict, to_yaml
from evotok.errors import UserError

FINISHED_MARKER = "FINISHED"
PACKAGES = ("torch", "torchvision", "lightning", "open_clip_torch", "transformers", "numpy", "omegaconf")


class RunError(UserError, RuntimeError):
    """A run folder problem: exists and is finished, or is not a run folder."""


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
        return from_dict(tree)  # type: ignore[arg-type]


def run_path(cfg: Config, stage: str) -> Path:
    return Path(cfg.run.dir) / stage / cfg.run.name


def create_run(cfg: Config, stage: str, argv: Optional[Sequence[str]] = None) -> RunDir:
    """Create (or re-open for resuming) the run folder and write config.yaml and provenance.json.

    A finished run is never overwritten unless ``run.overwrite=true``; an unfinished one with a
    last checkpoint is resumed by the trainer (nothing already written is deleted).
    """
    run = RunDir(run_path(cfg, stage))
    if run.finished and not cfg.run.overwrite:
        raise RunError(
            f"run folder {run.path} holds a finished run; choose another run.name or pass run.overwrite=true"
        )
    if run.finished and cfg.run.overwrite:
        (run.path / FINISHED_MARKER).unlink()
        for ckpt in (run.last_ckpt, run.best_ckpt):
            if ckpt.exists():
                ckpt.unlink()
    for p in (run.path, run.checkpoints, run.tb, run.figures):
        p.mkdir(parents=True, exist_ok=True)
    if run.config.exists() and run.last_ckpt.exists():
        _check_resume_config(run, cfg)
    run.config.write_text(to_yaml(cfg))
    run.provenance.write_text(json.dumps(provenance(cfg, stage, argv), indent=2) + "\n")
    return run


def _check_resume_config(run: RunDir, cfg: Config) -> None:
    """Resuming with a different model is an error, not a silent mix."""
    try:
        old = run.load_config()
    except ConfigError:
        return
    for key in ("preset", "lpix", "lsem"):
        a, b = getattr(old.model, key), getattr(cfg.model, key)
        if a != b:
            raise RunError(
                f"run folder {run.path} was started with model.{key}={a!r}, now {b!r}; "
                f"resume with the same model or choose another run.name"
            )


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
    """Accept a run folder or a .ckpt path; return the run folder and the checkpoint to load (best, else last)."""
    p = Path(run_or_ckpt)
    if p.suffix == ".ckpt":
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
