"""The paper's Fig. 6 claim made testable, over the seeds of every (Lpix, Lsem) setting of a sweep.

Input: ``probes.json`` entries (:mod:`analysis.probes`, one per tokenizer run; the figures step writes them),
grouped by setting. For every pooled view (``z/mean``, ``sem/mean``, ...) and every seed, from depth 1 to
depth Lsem (d = Lsem; the paper's semantic depth):

- ``gain[f]``: the normalised probe score (acc - chance) / (1 - chance) of factor f at d minus at depth 1;
  ``semantic_gain`` / ``lowlevel_gain``: their mean over the semantic (shape, count) and the low-level
  (colour, texture, background) factors; ``gap`` = semantic_gain - lowlevel_gain;
- ``nmi_top_1`` / ``nmi_top_d``: the factor K-means clusters follow best (max NMI) at depth 1 and at d;
  ``nmi_shift``: (max semantic NMI - max low-level NMI) at d minus the same at depth 1.

Each is reported as the mean and the half-width of a 95% t interval over seeds (:func:`mean_ci95`). The
three claims, per view (``holds`` is True / False; None when a setting is missing):

- (i) per setting: the semantic factors gain while the low-level ones do not: the 95% interval of
  ``semantic_gain`` lies above 0 and that of ``gap`` lies above 0;
- (ii) per setting: the factor K-means follows changes from a low-level one at depth 1 to a semantic one at
  depth Lsem in every seed;
- (iii) both are stronger for (4, 16) than for (16, 4): the Welch 95% interval of the difference of ``gap``
  (and of ``nmi_shift``) between the two settings lies above 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting import integer_depth_axis, mark_depths, new_figure

SEMANTIC = ("shape", "count")
LOWLEVEL = ("color", "texture", "background")
VIEWS = ("z/mean", "z/fg", "q/mean", "sem/mean", "recon/mean")
STRONG, WEAK = (4, 16), (16, 4)  # claim (iii): the pixel-to-semantic setting against the reverse


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t interval (0 for a single value; NaN values dropped)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def welch_ci95(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its Welch 95% interval (NaN when either has < 2 values)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, 0.0
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return diff, float(stats.t.ppf(0.975, dof) * se)


def _top(nmi: Mapping[str, Sequence[Optional[float]]], depth: int) -> Optional[str]:
    vals = {f: v[depth - 1] for f, v in nmi.items() if v[depth - 1] is not None}
    return max(vals, key=vals.get) if vals else None  # type: ignore[arg-type]


def _margin(nmi: Mapping[str, Sequence[Optional[float]]], depth: int) -> float:
    sem = [nmi[f][depth - 1] for f in SEMANTIC if f in nmi and nmi[f][depth - 1] is not None]
    low = [nmi[f][depth - 1] for f in LOWLEVEL if f in nmi and nmi[f][depth - 1] is not None]
    return max(sem) - max(low) if sem and low else math.nan


def seed_stats(entry: Mapping[str, Any], view: str) -> Optional[dict]:
    """The per-seed quantities of the module docstring for one run's probes entry; None if it lacks ``view``."""
    v = entry["views"].get(view)
    if v is None:
        return None
    d = int(entry["lsem"])
    probe = v["probe"]
    gain = {f: probe[f]["normalized"][d - 1] - probe[f]["normalized"][0] for f in (*SEMANTIC, *LOWLEVEL)
            if f in probe and None not in (probe[f]["normalized"][d - 1], probe[f]["normalized"][0])}
    sem = [gain[f] for f in SEMANTIC if f in gain]
    low = [gain[f] for f in LOWLEVEL if f in gain]
    out = {"gain": gain, "semantic_gain": float(np.mean(sem)) if sem else math.nan,
           "lowlevel_gain": float(np.mean(low)) if low else math.nan}
    out["gap"] = out["semantic_gain"] - out["lowlevel_gain"]
    nmi = v.get("nmi")
    if nmi:
        out["nmi_top_1"], out["nmi_top_d"] = _top(nmi, 1), _top(nmi, d)
        out["nmi_shift"] = _margin(nmi, d) - _margin(nmi, 1)
    return out


def setting_stats(entries: Sequence[Mapping[str, Any]], view: str) -> Optional[dict]:
    """Mean and 95% interval over the seeds (``entries``) of one setting, and claims (i) and (ii)."""
    seeds = [s for s in (seed_stats(e, view) for e in entries) if s is not None]
    if not seeds:
        return None
    out: dict[str, Any] = {"n_seeds": len(seeds), "per_seed": seeds}
    for key in ("semantic_gain", "lowlevel_gain", "gap", "nmi_shift"):
        if all(key in s for s in seeds):
            out[key] = mean_ci95([s[key] for s in seeds])
    out["gain"] = {f: mean_ci95([s["gain"][f] for s in seeds if f in s["gain"]]) for f in seeds[0]["gain"]}
    sg, gap = out["semantic_gain"], out["gap"]
    out["claim_i"] = bool(sg[0] - sg[1] > 0 and gap[0] - gap[1] > 0)
    if all("nmi_top_1" in s for s in seeds):
        out["nmi_tops"] = [f"{s['nmi_top_1']} -> {s['nmi_top_d']}" for s in seeds]
        out["claim_ii"] = all(s["nmi_top_1"] in LOWLEVEL and s["nmi_top_d"] in SEMANTIC for s in seeds)
    return out


def verdict(runs: Sequence[Mapping[str, Any]], views: Sequence[str] = VIEWS) -> dict:
    """``runs``: probes.json entries (each with lpix, lsem). Per view: per setting ``"lpix,lsem"`` its
    :func:`setting_stats`, and claim (iii) between (4, 16) and (16, 4)."""
    settings: dict[tuple[int, int], list] = {}
    for r in runs:
        settings.setdefault((int(r["lpix"]), int(r["lsem"])), []).append(r)
    out: dict[str, Any] = {"settings": [f"{a},{b}" for a, b in sorted(settings)], "views": {}}
    for view in views:
        per = {f"{a},{b}": setting_stats(entries, view) for (a, b), entries in sorted(settings.items())}
        per = {k: v for k, v in per.items() if v is not None}
        if not per:
            continue
        strong, weak = per.get("%d,%d" % STRONG), per.get("%d,%d" % WEAK)
        iii: dict[str, Any] = {"holds": None}
        if strong and weak:
            iii["gap_diff"] = welch_ci95([s["gap"] for s in strong["per_seed"]], [s["gap"] for s in weak["per_seed"]])
            ok = [iii["gap_diff"][0] - iii["gap_diff"][1] > 0]
            if "nmi_shift" in strong and "nmi_shift" in weak:
                iii["nmi_shift_diff"] = welch_ci95([s["nmi_shift"] for s in strong["per_seed"]],
                                                   [s["nmi_shift"] for s in weak["per_seed"]])
                ok.append(iii["nmi_shift_diff"][0] - iii["nmi_shift_diff"][1] > 0)
            iii["holds"] = bool(all(ok))
        out["views"][view] = {"settings": per, "claim_iii": iii}
        for (a, b), entries in sorted(settings.items()):  # the curves behind the figures, so results/ can redraw them
            if f"{a},{b}" in per:
                per[f"{a},{b}"]["curves"] = {m: seed_curves(entries, view, m) for m in METRICS}
    return out


def _pm(mc: Sequence[float]) -> str:
    m, c = mc
    return "n/a" if m is None or math.isnan(m) else (f"{m:+.2f} ± {c:.2f}" if not math.isnan(c) else f"{m:+.2f}")


def verdict_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per (view, setting): semantic / low-level gain, gap, NMI shift, claims (i) (ii),
    and (iii) on the (4,16) row."""
    rows = ["| view | Lpix,Lsem | seeds | semantic gain | low-level gain | gap | (i) | K-means top (depth 1 -> Lsem) "
            "| NMI shift | (ii) | (iii) vs (16,4) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    yn = {True: "yes", False: "no", None: ""}
    for view, v in result["views"].items():
        for key, s in v["settings"].items():
            iii = v["claim_iii"] if key == "%d,%d" % STRONG else {}
            iii_txt = ""
            if iii.get("holds") is not None:
                iii_txt = f"{yn[iii['holds']]} (gap {_pm(iii['gap_diff'])}" + (
                    f", NMI {_pm(iii['nmi_shift_diff'])})" if "nmi_shift_diff" in iii else ")")
            tops = ", ".join(sorted(set(s.get("nmi_tops", [])))) or "n/a"
            rows.append(f"| {view} | {key} | {s['n_seeds']} | {_pm(s['semantic_gain'])} | {_pm(s['lowlevel_gain'])} "
                        f"| {_pm(s['gap'])} | {yn[s['claim_i']]} | {tops} | {_pm(s.get('nmi_shift', (math.nan, 0)))} "
                        f"| {yn[s.get('claim_ii')]} | {iii_txt} |")
    return "\n".join(rows)


# metric -> (y label, y limits, what the figure shows)
METRICS = {"probe": ("probe (acc - chance) / (1 - chance)", (-0.3, 1.05), "linear probes"),
           "nmi": ("NMI(K-means, factor)", (0.0, 1.05), "NMI of K-means clusters")}


def _metric(metric: str) -> tuple[str, tuple[float, float], str]:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return METRICS[metric]


def _curve(entry: Mapping[str, Any], view: str, metric: str, factor: str) -> Optional[list]:
    v = entry["views"].get(view) or {}
    if metric == "probe":
        r = (v.get("probe") or {}).get(factor)
        return None if r is None else r["normalized"]
    return (v.get("nmi") or {}).get(factor)


def seed_curves(entries: Sequence[Mapping[str, Any]], view: str, metric: str = "probe") -> dict[str, dict]:
    """{factor: {"mean": [per depth], "ci": [95% half-width per depth], "n": seeds}} over ``entries`` (the seeds
    of one setting) for ``metric`` ``"probe"`` (normalised score) or ``"nmi"``; factors without curves left out."""
    _metric(metric)
    out = {}
    for f in (*SEMANTIC, *LOWLEVEL):
        curves = [c for c in (_curve(e, view, metric, f) for e in entries) if c is not None]
        if not curves:
            continue
        arr = np.asarray([[np.nan if x is None else x for x in c] for c in curves], dtype=np.float64)
        stats = [mean_ci95(arr[:, d]) for d in range(arr.shape[1])]
        out[f] = {"mean": [s[0] for s in stats], "ci": [s[1] for s in stats], "n": len(curves)}
    return out


def plot_seed_curves(runs: Sequence[Mapping[str, Any]], views: Sequence[str] = ("z/mean", "z/fg", "sem/mean"),
                     title: Optional[str] = None, metric: str = "probe") -> Figure:
    """Rows: settings; columns: views; one line per factor (``metric``: the normalised probe score, or the NMI of
    the K-means clusters, over depth; mean over the setting's seeds) with its 95% band (semantic solid,
    low-level dashed)."""
    from matplotlib import colormaps

    ylabel, ylim, what = _metric(metric)
    settings: dict[tuple[int, int], list] = {}
    for r in runs:
        settings.setdefault((int(r["lpix"]), int(r["lsem"])), []).append(r)
    keys = sorted(settings)
    colors = colormaps["tab10"].colors
    factors = (*SEMANTIC, *LOWLEVEL)
    fig = new_figure(3.4 * len(views) + 0.6, 2.9 * len(keys) + 0.4)
    for i, key in enumerate(keys):
        for j, view in enumerate(views):
            ax = fig.add_subplot(len(keys), len(views), i * len(views) + j + 1)
            entries = [e for e in settings[key] if view in e["views"]]
            for f, c in seed_curves(entries, view, metric).items():
                color = colors[factors.index(f)]
                m, ci = np.asarray(c["mean"]), np.nan_to_num(np.asarray(c["ci"]))
                x = np.arange(1, len(m) + 1)
                ax.plot(x, m, "-" if f in SEMANTIC else "--", color=color, marker="o", markersize=2,
                        label=f"{f} ({'semantic' if f in SEMANTIC else 'low-level'})")
                ax.fill_between(x, m - ci, m + ci, color=color, alpha=0.15, linewidth=0)
            mark_depths(ax, key[0], key[1], label=False)
            if metric == "probe":
                ax.axhline(0.0, color="0.6", linewidth=0.8)
            ax.set_ylim(*ylim)
            ax.set_title(f"Lpix={key[0]}, Lsem={key[1]}: {view} (n={len(entries)})", fontsize=8)
            ax.set_xlabel("depth $l$", fontsize=8)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=7)
            integer_depth_axis(ax)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="best")
    fig.suptitle(title or f"{what} per depth: mean and 95% interval over seeds", fontsize=10)
    return fig


def load_runs(probe_files: Sequence[str | Path]) -> list[dict]:
    """Every entry of every probes.json given (one entry per run)."""
    out = []
    for p in probe_files:
        out += list(json.loads(Path(p).read_text()).values())
    return out
