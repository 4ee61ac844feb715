"""Explicit hand-over between runs: which upstream runs a stage reads, what exactly they were, and checks that
they are still that.

A stage names its upstreams by key (``teacher.run``, ``tokenizer.run``, ``lm.run``, ``lm.path``, ...; the
registry in evotok/stages.py lists them per stage). At the start of training every upstream that the config
uses is resolved to an absolute path and fingerprinted (sha256 of the checkpoint file it loads from; of the
weights file; of every file of a Hugging Face folder). The run stores these records in ``provenance.json``
and in every checkpoint (``checkpoint["evotok"]["upstream"]``). Resume, evaluation and figures find each
upstream through its record: its absolute path, else its path relative to the run folder (a run tree copied
or moved as a whole still works from any working directory), and refuse one whose fingerprint changed: a
retrained teacher is never picked up silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from evotok.errors import UserError

_CHUNK = 8 << 20
_memo: dict[tuple[str, int, int], str] = {}


class UpstreamError(UserError, RuntimeError):
    """An upstream run is missing, moved out of reach, or no longer the one a run was made from."""


@dataclass(frozen=True)
class Upstream:
    """One resolved upstream: ``path`` (absolute) is what the config key names; ``artifact`` the file (or HF
    folder) that was fingerprinted and that the stage loads."""

    key: str
    path: Path
    artifact: Path
    fingerprint: str

    def record(self, run_dir: Path) -> dict[str, str]:
        run_dir = Path(run_dir).resolve()
        artifact = str(self.artifact.relative_to(self.path)) if self.artifact != self.path else ""
        return {
            "path": str(self.path),
            "relpath": os.path.relpath(self.path, run_dir),
            "artifact": artifact,
            "fingerprint": self.fingerprint,
        }


# ------------------------------------------------------------------------------------------ fingerprints


def fingerprint_file(path: Path) -> str:
    """sha256 of a file's bytes (memoised per process by path, size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _memo[key] = "sha256:" + h.hexdigest()
    return _memo[key]


def fingerprint_folder(path: Path) -> str:
    """sha256 over the relative names and fingerprints of every file in a folder (a Hugging Face model)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(fingerprint_file(f).encode())
    return "sha256:" + h.hexdigest()


def fingerprint(artifact: Path) -> str:
    return fingerprint_folder(artifact) if artifact.is_dir() else fingerprint_file(artifact)


# ------------------------------------------------------------------------------------------- resolving


def _kind(key: str) -> str:
    from evotok.stages import producer

    if producer(key):
        return "run"
    return "folder" if key == "lm.path" else "file"


def locate(key: str, value: str | Path) -> Upstream:
    """Resolve the upstream ``value`` of hand-over key ``key`` (relative paths against the working directory)."""
    p = Path(value).expanduser()
    kind = _kind(key)
    if kind == "run":
        from evotok.runs import RunError, resolve_run

        try:
            run, ckpt = resolve_run(p)
        except RunError as e:
            raise UpstreamError(f"{key} = '{value}': {e}") from None
        from evotok.stages import get_stage, producer

        root = run.path.resolve()
        artifact = get_stage(producer(key)).artifact
        if artifact:  # e.g. an lm run's Hugging Face export
            if not (root / artifact).exists():
                raise UpstreamError(f"{key} = '{value}' has no {artifact}/ (written when the run finishes): is it finished?")
            return Upstream(key, root, root / artifact, fingerprint(root / artifact))
        if not run.finished:
            warnings.warn(f"{key} = '{value}' is not a finished run (no FINISHED marker); using {ckpt.name}",
                          RuntimeWarning, stacklevel=2)
        return Upstream(key, root, ckpt.resolve(), fingerprint_file(ckpt))
    if kind == "folder":
        if not p.is_dir():
            raise UpstreamError(f"{key} = '{value}' is not a folder")
        return Upstream(key, p.resolve(), p.resolve(), fingerprint_folder(p))
    if not p.is_file():
        raise UpstreamError(f"{key} = '{value}' is not a file")
    return Upstream(key, p.resolve(), p.resolve(), fingerprint_file(p))


def active_keys(cfg: Any, stage: str) -> list[str]:
    """The hand-over keys ``cfg`` uses for ``stage``: registry-listed keys with a value, in the precedence the
    loaders apply (a teacher comes from ``teacher.random_init``, else ``teacher.run``, else ``teacher.weights``)."""
    from evotok.config import ConfigError, get_key
    from evotok.stages import get_stage

    keys = [k for k in get_stage(stage).upstream if get_key(cfg, k)]
    if "teacher.run" in keys or "teacher.weights" in keys:
        if cfg.teacher.random_init:
            keys = [k for k in keys if not k.startswith("teacher.")]
        elif "teacher.run" in keys:
            keys = [k for k in keys if k != "teacher.weights"]
    if "lm.run" in keys and "lm.path" in keys:
        raise ConfigError("config keys 'lm.run' and 'lm.path' are both set: name one language model")
    return keys


def resolve_upstreams(cfg: Any, stage: str, missing_ok: bool = False) -> dict[str, Upstream]:
    """Every upstream ``cfg`` uses for ``stage``, resolved and fingerprinted (fails naming the key). With
    ``missing_ok``, a key whose path does not exist is left out (a resumed run finds it through its record)."""
    from evotok.config import get_key

    out = {}
    for k in active_keys(cfg, stage):
        value = get_key(cfg, k)
        if missing_ok and not Path(value).expanduser().exists():
            continue
        out[k] = locate(k, value)
    return out


def with_upstreams(cfg: Any, upstreams: dict[str, Upstream]) -> Any:
    """A copy of ``cfg`` whose hand-over keys hold the resolved absolute paths."""
    for key, up in upstreams.items():
        section, leaf = key.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{leaf: str(up.path)})})
    return cfg


# --------------------------------------------------------------------------------------------- records


def records(upstreams: dict[str, Upstream], run_dir: Path) -> dict[str, dict[str, str]]:
    return {k: up.record(run_dir) for k, up in upstreams.items()}


def find_recorded(key: str, rec: dict[str, str], run_dir: Path) -> Upstream:
    """The upstream a record describes: at its absolute path, else relative to ``run_dir``; the first place
    holding the recorded fingerprint wins. None there: an error saying it is missing or changed."""
    cands = list(dict.fromkeys([Path(rec["path"]), *([(Path(run_dir) / rec["relpath"]).resolve()] if rec.get("relpath") else [])]))
    changed = []
    for found in (c for c in cands if c.exists()):
        artifact = found / rec["artifact"] if rec.get("artifact") else found
        if not artifact.exists():
            changed.append(f"{found} has no {rec['artifact']}")
            continue
        now = fingerprint(artifact)
        if now == rec["fingerprint"]:
            return Upstream(key, found, artifact, now)
        changed.append(f"{artifact} has fingerprint {now[:19]}...")
    if not changed:
        looked = " and ".join(str(c) for c in cands)
        raise UpstreamError(
            f"upstream {key} of run {run_dir} is missing: looked at {looked}; put it back there (or move the "
            f"runs together, keeping their relative layout)"
        )
    raise UpstreamError(
        f"upstream {key} of run {run_dir} changed: {'; '.join(changed)}, the run was made from "
        f"{rec['fingerprint'][:19]}...; a retrained or replaced upstream is never used silently: restore the "
        f"original, or train this run again from the new one (run.overwrite=true)"
    )


def check_resume(recorded: dict[str, dict[str, str]], now: dict[str, Upstream], run_dir: Path) -> dict[str, Upstream]:
    """On resume: the upstreams the config names now must be the ones the run started from. A config key
    whose value no longer resolves from the working directory is found through the run's record."""
    out = dict(now)
    for key, rec in recorded.items():
        if key in now:
            if now[key].fingerprint != rec["fingerprint"]:
                raise UpstreamError(
                    f"cannot resume {run_dir}: its upstream {key} was {rec['path']} ({rec['fingerprint'][:19]}...), "
                    f"the config now gives {now[key].artifact} ({now[key].fingerprint[:19]}...); resume with the "
                    f"original upstream, or start afresh with run.overwrite=true"
                )
        else:
            out[key] = find_recorded(key, rec, run_dir)
    return out


def recorded_upstream(run_dir: Path, ckpt: Optional[Path] = None) -> Optional[dict[str, dict[str, str]]]:
    """A run's upstream records: from the checkpoint when given (what that checkpoint was trained from),
    else from provenance.json; None for runs made before the records existed."""
    if ckpt is not None and Path(ckpt).is_file():
        from evotok.runs import load_checkpoint_file

        meta = load_checkpoint_file(ckpt, mmap=True).get("evotok") or {}
        if "upstream" in meta:
            return meta["upstream"]
    prov = Path(run_dir) / "provenance.json"
    if prov.is_file():
        data = json.loads(prov.read_text())
        if "upstream" in data:
            return data["upstream"]
    return None


def verified_upstreams(run_or_ckpt: str | Path, cfg: Any, stage: str) -> dict[str, Upstream]:
    """Every upstream a run's own config ``cfg`` uses, found through the run's records and verified. Runs made
    before the records existed resolve their keys from the working directory, else from the folder holding
    ``run.dir``, with a warning that nothing could be verified."""
    from evotok.config import get_key
    from evotok.runs import resolve_run

    run, ckpt = resolve_run(run_or_ckpt)
    recs = recorded_upstream(run.path, ckpt)
    keys = active_keys(cfg, stage)
    if recs is None:
        resolved = {}
        for k in keys:
            value = Path(get_key(cfg, k))
            base = run.path.resolve().parents[2] if len(run.path.resolve().parents) > 2 else Path.cwd()
            cand = value if value.is_absolute() or value.exists() else base / value
            resolved[k] = locate(k, cand)
        if keys:
            warnings.warn(f"run {run.path} has no upstream records (made before they existed): its "
                          f"{', '.join(keys)} could not be verified", RuntimeWarning, stacklevel=2)
        return resolved
    return {k: find_recorded(k, recs[k], run.path) for k in keys if k in recs}


def upstream_config(run_or_ckpt: str | Path, cfg: Any, stage: str) -> Any:
    """``cfg`` (a run's own config) with its hand-over keys set to the verified upstreams' absolute paths."""
    return with_upstreams(cfg, verified_upstreams(run_or_ckpt, cfg, stage))
