"""The ablation table: one row per run, from metrics.json content (DESIGN §5 schema).

Each run dict is metrics.json plus optional ``name``/``label``, ``lpix``, ``lsem``. rFID and PSNR are read
at depth Lpix and CLIPSIM_sem at depth Lsem from ``per_depth``; when ``per_depth`` lacks them the
scalar of that name is used (``name``, ``val_name``, ``val/name``, any ``<prefix>/name``). Understanding / generation scores
(``vqa_accuracy``, ``mme``, ``geneval``, ...) get a column when at least one run has them.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Optional, Sequence

MISSING = "–"
# (column header, metric name, depth key whose value selects the per-depth entry)
CORE_COLUMNS = (("rFID", "rfid", "lpix"), ("PSNR", "psnr", "lpix"), ("CLIPSIM_sem", "clipsim_sem", "lsem"))
SCORE_COLUMNS = (("VQA acc", "vqa_accuracy"), ("MME", "mme"), ("GenEval", "geneval"))


def scalar(run: Mapping[str, Any], name: str) -> Optional[float]:
    """``scalars[name]``, else ``scalars['val_<name>']`` / ``['val/<name>']``, else the first key ending in
    ``/<name>`` or ``_<name>`` (sorted); None when absent or null."""
    sc = run.get("scalars") or {}
    for key in (name, f"val_{name}", f"val/{name}"):
        if sc.get(key) is not None:
            return float(sc[key])
    for key in sorted(sc):
        if (key.endswith("/" + name) or key.endswith("_" + name)) and sc[key] is not None:
            return float(sc[key])
    return None


def at_depth(run: Mapping[str, Any], name: str, depth: Optional[int]) -> Optional[float]:
    """``per_depth[name][depth - 1]`` when present and finite, else the scalar ``name``."""
    v = (run.get("per_depth") or {}).get(name)
    if v is not None and depth is not None and 1 <= int(depth) <= len(v) and v[int(depth) - 1] is not None:
        x = float(v[int(depth) - 1])
        if not math.isnan(x):
            return x
    return scalar(run, name)


def _fmt(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    return f"{v:.4g}"


def ablation_rows(
    runs: Sequence[Mapping[str, Any]], scores: Sequence[tuple[str, str]] = SCORE_COLUMNS
) -> tuple[list[str], list[list[Optional[float] | str | int]]]:
    """Header and raw rows (numbers or None) of the ablation table; score columns only when some run has them."""
    present = [(h, n) for h, n in scores if any(scalar(r, n) is not None for r in runs)]
    header = ["name", "Lpix", "Lsem"] + [h for h, _, _ in CORE_COLUMNS] + [h for h, _ in present]
    rows = []
    for i, r in enumerate(runs):
        name = r.get("name") or r.get("label") or f"run {i + 1}"
        row: list[Any] = [str(name), r.get("lpix"), r.get("lsem")]
        row += [at_depth(r, n, r.get(key)) for _, n, key in CORE_COLUMNS]
        row += [scalar(r, n) for _, n in present]
        rows.append(row)
    return header, rows


def _cell(v: Any, missing: str) -> str:
    if v is None:
        return missing
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    s = _fmt(float(v))
    return missing if s == MISSING else s


def ablation_table(
    runs: Sequence[Mapping[str, Any]], scores: Sequence[tuple[str, str]] = SCORE_COLUMNS, csv_missing: str = MISSING
) -> tuple[str, str]:
    """(markdown, csv) with one row per run: name, Lpix, Lsem, rFID and PSNR at Lpix, CLIPSIM_sem at Lsem,
    and the scores present in any run. Missing values are "–" (``csv_missing`` for the CSV)."""
    header, rows = ablation_rows(runs, scores)
    md_rows = [[_cell(v, MISSING) for v in row] for row in rows]
    md = "| " + " | ".join(header) + " |\n"
    md += "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in md_rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([_cell(v, csv_missing) for v in row])
    return md, buf.getvalue()


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The rows of :func:`ablation_rows` as an HTML table."""
    from html import escape

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(v, MISSING))}</td>" for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"
