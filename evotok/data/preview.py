"""A PNG grid of samples with their captions and labels, for eyeballing a data config."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np


def _describe(item: dict) -> str:
    text = item["caption"] or item["caption_sem"]
    if not text and item["conversations"]:
        text = item["conversations"][0]["value"].replace("<image>", "").strip()
    labels = {k: v for k, v in item["labels"].items() if v >= 0}
    if labels and not item["caption"]:
        text = (text + " " if text else "") + " ".join(f"{k}={v}" for k, v in labels.items())
    return "\n".join(textwrap.wrap(text or f"#{item['index']}", 26)[:4])


def write_preview(cfg: Any, out: str | Path, n: int = 32, split: str = "train") -> Path:
    """Write a grid of the first ``n`` items of ``split`` of ``cfg.data`` to ``out`` (PNG); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from evotok.data.sources import build_dataset

    ds = build_dataset(cfg.data, split)
    items = []
    for item in (ds[i] for i in range(min(n, len(ds)))) if hasattr(ds, "__len__") else iter(ds):
        items.append(item)
        if len(items) >= n:
            break
    if not items:
        raise ValueError(f"split '{split}' of source '{cfg.data.source}' is empty")
    cols = min(8, len(items))
    rows = math.ceil(len(items) / cols)
    fig = Figure(figsize=(cols * 1.7, rows * 2.4), dpi=100)
    FigureCanvasAgg(fig)
    for k, item in enumerate(items):
        ax = fig.add_subplot(rows, cols, k + 1)
        img_HWC = np.clip(item["image"].numpy().transpose(1, 2, 0), 0, 1)
        ax.imshow(img_HWC, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(_describe(item), fontsize=6)
    fig.suptitle(f"{cfg.data.source} / {split} / {cfg.data.resolution}px", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
