"""Fig. "which depth understands?": VQA accuracy per question type against the depth l whose features feed the
LM (per-depth lists ``vqa_<type>`` for the semantic decoder's output from z_l and ``vqa_latent_<type>`` for raw
z_l, from ``evotok eval vqa --depths``), with Lpix and Lsem marked. Pure: arrays in, a Figure out."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting import integer_depth_axis, mark_depths, new_figure

QA_TYPES = ("shape", "count", "color", "texture", "background")
KINDS = (("vqa_", "semantic decoder output from $z_l$"), ("vqa_latent_", "raw $z_l$"))


def plot_vqa_depth(per_depth: Mapping[str, Sequence[Optional[float]]], lpix: Optional[int] = None,
                   lsem: Optional[int] = None, chance: Optional[Mapping[str, float]] = None) -> Figure:
    """One panel per feature kind present, one line per question type (depths without a value are skipped);
    ``chance``: per type, drawn as a dotted level."""
    from matplotlib import colormaps

    kinds = [(p, t) for p, t in KINDS if any(k.startswith(p) and k[len(p):] in QA_TYPES for k in per_depth)]
    if not kinds:
        raise ValueError("plot_vqa_depth: no vqa_<type> or vqa_latent_<type> lists")
    fig = new_figure(5.0 * len(kinds), 3.6)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    colors = colormaps["tab10"]
    for ax, (prefix, title) in zip(axes, kinds):
        for i, t in enumerate(QA_TYPES):
            vals = per_depth.get(prefix + t)
            if vals is None:
                continue
            y = np.array([np.nan if v is None else float(v) for v in vals])
            x = np.arange(1, len(y) + 1)
            ok = ~np.isnan(y)
            ax.plot(x[ok], y[ok], marker="o", markersize=3, color=colors(i), label=t)
            if chance and t in chance:
                ax.axhline(chance[t], color=colors(i), linestyle=":", linewidth=0.8)
        mark_depths(ax, lpix, lsem)
        integer_depth_axis(ax)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("depth $l$ of the features")
        ax.set_ylabel("VQA accuracy")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("which depth understands? (a projector-only probe per depth; dotted: chance)", fontsize=10)
    return fig
