"""Fig. 6 and its quantitative form: K-means on per-image z_l features.

Shallow clusters should follow perceptual primitives (colour, texture, background), deep clusters
categories (shape, count). :func:`nmi_per_depth` turns that into numbers: the normalised mutual
information between the clusters at every depth and each known factor label.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting import integer_depth_axis, mark_depths, new_figure

DEFAULT_DEPTHS = (1, 4, 8, 16)
N_INIT = 10  # K-means restarts: fixed so that results depend only on the seed


def _kmeans(x_Bd: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    x_Bd = np.asarray(x_Bd, dtype=np.float64)
    k = int(min(k, x_Bd.shape[0]))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit_predict(x_Bd).astype(np.int64)


def cluster_depths(
    pooled_LBd: np.ndarray, depths: Sequence[int] = DEFAULT_DEPTHS, k: int = 8, seed: int = 0
) -> dict[int, np.ndarray]:
    """K-means (``k`` clusters, ``N_INIT`` restarts, ``random_state=seed``) on the pooled z_l of each
    requested depth (1-based); depths beyond L are dropped. Returns {depth: labels_B}."""
    pooled_LBd = np.asarray(pooled_LBd)
    if pooled_LBd.ndim != 3:
        raise ValueError(f"pooled_LBd must have shape (L, B, d), got {pooled_LBd.shape}")
    L = pooled_LBd.shape[0]
    kept = sorted({int(l) for l in depths if 1 <= int(l) <= L})
    return {l: _kmeans(pooled_LBd[l - 1], k, seed) for l in kept}


def cluster_mosaic(
    images_BHWC: np.ndarray, labels_B: np.ndarray, n_per_cluster: int, pad: int = 1, fill: int = 255
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One uint8 image: row r holds the first ``n_per_cluster`` members (index order) of cluster r
    (clusters in increasing label order); returns the mosaic and the member indices per row."""
    images_BHWC = np.asarray(images_BHWC)
    if images_BHWC.ndim == 3:
        images_BHWC = images_BHWC[..., None]
    B, H, W, C = images_BHWC.shape
    labels_B = np.asarray(labels_B)
    if len(labels_B) != B:
        raise ValueError(f"{len(labels_B)} labels for {B} images")
    clusters = np.unique(labels_B)
    rows = len(clusters)
    mosaic = np.full((rows * (H + pad) + pad, n_per_cluster * (W + pad) + pad, C), fill, dtype=np.uint8)
    members = []
    for r, c in enumerate(clusters):
        idx = np.flatnonzero(labels_B == c)[:n_per_cluster]
        members.append(idx)
        for j, b in enumerate(idx):
            y, x = pad + r * (H + pad), pad + j * (W + pad)
            mosaic[y:y + H, x:x + W] = images_BHWC[b]
    return mosaic, members


def plot_cluster_grids(
    images_BHWC: np.ndarray, clusters: Mapping[int, np.ndarray], n_per_cluster: int = 8, title: Optional[str] = None
) -> Figure:
    """One panel per depth (``fig.axes[i]`` = i-th depth in increasing order, image = :func:`cluster_mosaic`):
    rows are clusters (y tick: cluster id and size), columns sample members."""
    if not clusters:
        raise ValueError("clusters is empty: no requested depth exists in this model")
    depths = sorted(clusters)
    images_BHWC = np.asarray(images_BHWC)
    H = images_BHWC.shape[1]
    pad = 1
    k_max = max(len(np.unique(clusters[l])) for l in depths)
    fig = new_figure(max(2.0, 0.45 * n_per_cluster + 0.8) * len(depths), 0.45 * k_max + 1.0)
    for i, l in enumerate(depths):
        ax = fig.add_subplot(1, len(depths), i + 1)
        mosaic, members = cluster_mosaic(images_BHWC, clusters[l], n_per_cluster, pad=pad)
        ax.imshow(mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic, cmap="gray" if mosaic.shape[-1] == 1 else None,
                  interpolation="nearest")
        ids, sizes = np.unique(clusters[l], return_counts=True)
        ax.set_yticks([pad + r * (H + pad) + H / 2 for r in range(len(ids))])
        ax.set_yticklabels([f"c{c} ({n})" for c, n in zip(ids, sizes)], fontsize=6)
        ax.set_xticks([])
        ax.set_title(f"depth {l}", fontsize=9)
    fig.suptitle(title or "K-means clusters of pooled $z_l$ (rows: clusters, size in brackets)", fontsize=10)
    return fig


def nmi_per_depth(
    pooled_LBd: np.ndarray, labels: Mapping[str, np.ndarray], k: int = 8, seed: int = 0
) -> dict[str, list[float]]:
    """NMI between K-means clusters of every depth 1..L and each factor's labels (``-1`` = unknown,
    those images are left out for that factor; NaN when fewer than 2 images are known)."""
    from sklearn.metrics import normalized_mutual_info_score

    pooled_LBd = np.asarray(pooled_LBd)
    L, B, _ = pooled_LBd.shape
    for f, y in labels.items():
        if len(y) != B:
            raise ValueError(f"labels['{f}'] has {len(y)} entries for {B} images")
    per_depth = [_kmeans(pooled_LBd[l], k, seed) for l in range(L)]
    out: dict[str, list[float]] = {}
    for f, y in labels.items():
        y = np.asarray(y)
        known = y >= 0
        if known.sum() < 2:
            out[f] = [float("nan")] * L
            continue
        out[f] = [float(normalized_mutual_info_score(y[known], c[known])) for c in per_depth]
    return out


def plot_nmi(
    nmi: Mapping[str, Sequence[float]],
    lpix: Optional[int],
    lsem: Optional[int],
    semantic: Sequence[str] = ("shape", "count"),
    lowlevel: Sequence[str] = ("color", "texture", "background"),
    title: Optional[str] = None,
) -> Figure:
    """One curve per factor over depth (x = 1..L): semantic factors solid, low-level dashed, others dotted.
    Data lines come first in ``ax.lines`` in ``nmi``'s order; Lpix/Lsem markers follow (gids lpix/lsem)."""
    from matplotlib import colormaps

    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    colors = colormaps["tab10"].colors
    for i, (f, v) in enumerate(nmi.items()):
        v = np.asarray(v, dtype=np.float64)
        style = "-" if f in semantic else "--" if f in lowlevel else ":"
        kind = "semantic" if f in semantic else "low-level" if f in lowlevel else "other"
        ax.plot(np.arange(1, len(v) + 1), v, style, marker="o", markersize=3, color=colors[i % len(colors)],
                label=f"{f} ({kind})")
    mark_depths(ax, lpix, lsem)
    ax.set_xlabel("depth $l$")
    ax.set_ylabel("NMI(K-means clusters, factor)")
    integer_depth_axis(ax)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "what the clusters of $z_l$ follow, per depth", fontsize=10)
    return fig
