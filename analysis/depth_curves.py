"""Fig. 5b: per-depth curves (rFID, PSNR, CLIPSIM_pix, CLIPSIM_sem) for one or many runs.

Input is metrics.json content (DESIGN §5: ``{"stage", "step", "scalars", "per_depth": {name: [v_1..v_L]}}``)
plus optional ``label``, ``lpix``, ``lsem`` keys. Runs sharing (lpix, lsem) are drawn as their mean with
a spread band; a metric absent from every run leaves a note on its axis instead of failing.
:func:`feature_depth_metrics` computes the same curves from cached feature arrays when a run has no
per-depth metrics in metrics.json.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting import integer_depth_axis, mark_depths, new_figure, note

CURVE_METRICS = ("rfid", "psnr", "clipsim_pix", "clipsim_sem")
METRIC_LABELS = {
    "rfid": "rFID (lower is better)",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "clipsim_pix": "CLIPSIM$_{pix}$",
    "clipsim_sem": "CLIPSIM$_{sem}$",
    "usage": "codebook usage",
    "perplexity": "code perplexity",
}
SPREADS = ("minmax", "std")


def _values(run: Mapping[str, Any], metric: str) -> Optional[np.ndarray]:
    v = (run.get("per_depth") or {}).get(metric)
    if v is None or len(v) == 0:
        return None
    return np.array([np.nan if x is None else float(x) for x in v], dtype=np.float64)


def run_label(run: Mapping[str, Any], i: int) -> str:
    if run.get("label"):
        return str(run["label"])
    if run.get("lpix") is not None and run.get("lsem") is not None:
        return f"Lpix={run['lpix']}, Lsem={run['lsem']}"
    return f"run {i + 1}"


def group_runs(runs: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """Indices of runs grouped by (lpix, lsem); a run without both keys is a group of its own."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(runs):
        key = (r.get("lpix"), r.get("lsem")) if r.get("lpix") is not None and r.get("lsem") is not None else ("solo", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def plot_depth_curves(
    runs: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = CURVE_METRICS,
    spread: str = "minmax",
    title: Optional[str] = None,
) -> Figure:
    """One axis per metric (x = depth 1..L). Single runs are one line each; runs sharing (lpix, lsem) are
    one mean line plus a band (``spread="minmax"`` or ``"std"``). Lpix (dotted) and Lsem (dashed) are marked
    in each group's colour. Line labels: the run's ``label`` or ``Lpix=a, Lsem=b``, with `` (mean of n)``
    for groups."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    if not runs:
        raise ValueError("plot_depth_curves needs at least one run")
    from matplotlib import colormaps

    groups = group_runs(runs)
    colors = colormaps["tab10"].colors
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = new_figure(5.0 * ncols, 3.6 * nrows)
    for m_i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, m_i + 1)
        ax.set_xlabel("depth $l$")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        integer_depth_axis(ax)
        missing = []
        drawn = 0
        for g_i, members in enumerate(groups):
            color = colors[g_i % len(colors)]
            have = [(i, _values(runs[i], metric)) for i in members]
            missing += [run_label(runs[i], i) for i, v in have if v is None]
            have = [(i, v) for i, v in have if v is not None]
            if not have:
                continue
            first = runs[have[0][0]]
            if len(have) == 1:
                i, v = have[0]
                x = np.arange(1, len(v) + 1)
                ax.plot(x, v, "-o", color=color, markersize=3, label=run_label(runs[i], i))
            else:
                n = min(len(v) for _, v in have)
                stack = np.stack([v[:n] for _, v in have])
                x = np.arange(1, n + 1)
                mean = np.nanmean(stack, axis=0)
                if spread == "minmax":
                    lo, hi = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
                else:
                    sd = np.nanstd(stack, axis=0)
                    lo, hi = mean - sd, mean + sd
                labels = {run_label(runs[i], i) for i, _ in have}
                base = labels.pop() if len(labels) == 1 else f"Lpix={first.get('lpix')}, Lsem={first.get('lsem')}"
                ax.plot(x, mean, "-o", color=color, markersize=3, label=f"{base} (mean of {len(have)})")
                ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
            mark_depths(ax, first.get("lpix"), first.get("lsem"), color=color, label=len(groups) == 1)
            drawn += 1
        if drawn == 0:
            note(ax, f"no per-depth '{metric}' in any run")
        elif missing:
            note(ax, f"'{metric}' missing in: {', '.join(missing)}")
        if drawn:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "per-depth metrics (dotted: $L_{pix}$, dashed: $L_{sem}$)", fontsize=10)
    return fig


# ------------------------------------------------------------------------ metrics from cached arrays


def feature_depth_metrics(arrays: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """Per-depth curves from the cached feature arrays (see :mod:`analysis.extract`):

    - ``clipsim_pix``: mean over images of cos(teacher(recon from z_l), teacher(original)) (pooled features,
      :func:`evotok.eval.metrics.clipsim_pix`);
    - ``clipsim_sem``: mean of ``clipsim_sem_LB`` (per-token cosine, averaged per image, computed at extraction);
    - ``psnr``: mean of ``psnr_LB``;
    - ``rfid``: Fréchet distance in the teacher's pooled feature space between reconstructions and originals
      (:func:`evotok.eval.metrics.fid_from_features`; an estimate from the cached images only; needs at least
      2 images).
    Names whose arrays are absent are left out.
    """
    out: dict[str, list[float]] = {}
    rec = arrays.get("recon_teacher_LBE")
    orig = arrays.get("orig_teacher_BE")
    if rec is not None and orig is not None:
        import torch

        from evotok.eval.metrics import clipsim_pix, fid_from_features

        rec_LBE = torch.as_tensor(np.asarray(rec, dtype=np.float64))
        orig_BE = torch.as_tensor(np.asarray(orig, dtype=np.float64))
        out["clipsim_pix"] = clipsim_pix(rec_LBE, orig_BE[None]).mean(dim=1).tolist()
        if orig_BE.shape[0] >= 2:
            out["rfid"] = [fid_from_features(orig_BE, rec_LBE[l]) for l in range(rec_LBE.shape[0])]
    if arrays.get("clipsim_sem_LB") is not None:
        out["clipsim_sem"] = [float(x) for x in np.asarray(arrays["clipsim_sem_LB"]).mean(axis=1)]
    if arrays.get("psnr_LB") is not None:
        out["psnr"] = [float(x) for x in np.asarray(arrays["psnr_LB"]).mean(axis=1)]
    return out
