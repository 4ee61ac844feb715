"""Shared figure helpers: saving (PNG + PDF), depth markers, colours. No pyplot state anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

FORMATS = ("png", "pdf")
# Artist gids used for the Lpix / Lsem markers, so tests and callers can tell them from data lines.
LPIX_GID = "lpix"
LSEM_GID = "lsem"


def new_figure(width: float, height: float) -> Figure:
    """A Figure with constrained layout, created without pyplot (no global figure registry)."""
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = FORMATS, dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``<out_dir>/<name>.<fmt>`` for every format; returns the written paths."""
    if not name or Path(name).name != name:
        raise ValueError(f"figure name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=dpi)
        paths.append(path)
    return paths


def mark_depths(ax: Axes, lpix: int | None, lsem: int | None, color: str = "0.3", label: bool = True) -> None:
    """Vertical lines at Lpix (dotted) and Lsem (dashed); gids ``lpix`` / ``lsem``."""
    if lpix is not None:
        ax.axvline(lpix, color=color, linestyle=":", linewidth=1.2, gid=LPIX_GID,
                   label=f"$L_{{pix}}$={lpix}" if label else None)
    if lsem is not None:
        ax.axvline(lsem, color=color, linestyle="--", linewidth=1.2, gid=LSEM_GID,
                   label=f"$L_{{sem}}$={lsem}" if label else None)


def integer_depth_axis(ax: Axes) -> None:
    """Depth axes show integer ticks only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def data_lines(ax: Axes) -> list:
    """The axis' lines that carry data (everything except the Lpix/Lsem markers)."""
    return [ln for ln in ax.lines if ln.get_gid() not in (LPIX_GID, LSEM_GID)]


def note(ax: Axes, text: str) -> None:
    """A small grey note in the upper-left corner of an axis (missing metrics, provenance of numbers)."""
    ax.text(0.02, 0.98, text, transform=ax.transAxes, ha="left", va="top", fontsize=7, color="0.35", wrap=True)
