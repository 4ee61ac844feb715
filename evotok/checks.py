"""Minimum-result checks of a pipeline (``do: check``; ``make demo`` ends with them).

Each entry of a check step's ``require`` list reads one trained stage of the pipeline::

    {stage: tokenizer, metric: psnr, at: lpix, min: 20.0}   # metrics.json: per_depth[metric][at - 1]
    {stage: teacher, metric: zeroshot_shape, min: 0.8}       # metrics.json: scalars[metric]
    {stage: generation, files: [figures/geneval_*.png]}      # each glob matches a non-empty file
    {stage: tokenizer, links: figures/index.html}            # the page exists and every file it links does

``at`` is a depth (1-based) or ``lpix`` / ``lsem`` (read from the run's config). ``name`` labels an entry in the
report and in the failure message. Every entry is evaluated; :func:`failures` lists the missed ones."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from evotok.errors import UserError


class CheckFailed(UserError):
    """A pipeline's minimum-result check was missed; the message names every missed check."""


class Check(NamedTuple):
    name: str
    stage: str
    wanted: str  # ">= 20", "exists"
    got: str  # the value read, or what is missing
    ok: bool


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("href", "src") and v and "://" not in v and not v.startswith("#")]


def page_links(index: str | Path) -> list[str]:
    """The local ``href`` / ``src`` targets of an HTML page, as written (relative to the page's folder)."""
    parser = _Links()
    parser.feed(Path(index).read_text())
    return parser.links


def missing_links(index: str | Path) -> list[str]:
    """The links of ``index`` whose target does not exist."""
    folder = Path(index).parent
    return [link for link in page_links(index) if not (folder / link).exists()]


def _depth(at: Any, run: Path) -> int:
    if isinstance(at, int):
        return at
    from evotok.runs import RunDir

    cfg = RunDir(run).load_config()
    return int(getattr(cfg.model, str(at)))


def _metric(entry: dict, run: Path) -> Check:
    metric, stage = entry["metric"], entry["stage"]
    at = entry.get("at")
    name = entry.get("name") or (f"{stage} {metric}" + (f" at {at}" if at is not None else ""))
    wanted = f">= {entry['min']}"
    path = run / "metrics.json"
    if not path.is_file():
        return Check(name, stage, wanted, f"no {path}", False)
    data = json.loads(path.read_text())
    if at is None:
        value = data.get("scalars", {}).get(metric)
    else:
        curve = data.get("per_depth", {}).get(metric) or []
        d = _depth(at, run)
        value = curve[d - 1] if 0 < d <= len(curve) else None
    if value is None:
        return Check(name, stage, wanted, f"{metric} not in {path}", False)
    return Check(name, stage, wanted, f"{value:.4g}", float(value) >= float(entry["min"]))


def _files(entry: dict, run: Path) -> list[Check]:
    out = []
    for pattern in entry["files"]:
        hits = [p for p in sorted(run.glob(pattern)) if p.is_file() and p.stat().st_size > 0]
        name = entry.get("name") or f"{entry['stage']} {pattern}"
        out.append(Check(name, entry["stage"], "written", f"{len(hits)} file(s)" if hits else f"no {run / pattern}",
                         bool(hits)))
    return out


def _links(entry: dict, run: Path) -> Check:
    index = run / entry["links"]
    name = entry.get("name") or f"{entry['stage']} {entry['links']} and every file it links"
    if not index.is_file():
        return Check(name, entry["stage"], "written", f"no {index}", False)
    links, missing = page_links(index), missing_links(index)
    got = f"{len(links)} links" if not missing else f"missing: {', '.join(missing[:5])}"
    return Check(name, entry["stage"], "written", got, bool(links) and not missing)


def run_checks(require: Sequence[dict], runs: dict[str, Path]) -> list[Check]:
    """Evaluate every entry of ``require`` against the pipeline's trained ``runs`` (stage -> run folder)."""
    checks: list[Check] = []
    for entry in require:
        stage = entry.get("stage")
        if stage not in runs:
            checks.append(Check(entry.get("name") or str(stage), str(stage), "a trained run",
                                f"the pipeline trained no {stage} stage", False))
        elif "metric" in entry:
            checks.append(_metric(entry, Path(runs[stage])))
        elif "files" in entry:
            checks += _files(entry, Path(runs[stage]))
        elif "links" in entry:
            checks.append(_links(entry, Path(runs[stage])))
        else:
            raise UserError(f"check entry {entry}: give metric (with min), files or links")
    return checks


def check_table(checks: Sequence[Check]) -> str:
    rows = [f"  {'check':<44} {'wanted':<9} {'got':<28} result"]
    for c in checks:
        rows.append(f"  {c.name:<44} {c.wanted:<9} {c.got:<28} {'ok' if c.ok else 'MISSED'}")
    return "\n".join(rows)


def failures(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]
