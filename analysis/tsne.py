"""Fig. 5a: one t-SNE map of the z_l features of every depth, coloured by depth.

The same random latent positions are sampled at every depth (``positions_LPd`` from the cached
features), so the map shows how a fixed set of vectors travels from pixel-level to semantic.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting import new_figure


def subsample_positions(positions_LPd: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Keep the same P' <= P positions at every depth so that L * P' <= max_points."""
    positions_LPd = np.asarray(positions_LPd)
    if positions_LPd.ndim != 3:
        raise ValueError(f"positions_LPd must have shape (L, P, d), got {positions_LPd.shape}")
    L, P, _ = positions_LPd.shape
    keep = max(1, min(P, max_points // max(L, 1)))
    if keep == P:
        return positions_LPd
    idx = np.sort(np.random.default_rng(seed).choice(P, size=keep, replace=False))
    return positions_LPd[:, idx]


def depth_index(L: int, P: int) -> np.ndarray:
    """Depth (1..L) of every row of ``positions_LPd.reshape(L * P, d)``."""
    return np.repeat(np.arange(1, L + 1), P)


def tsne_embed(
    positions_LPd: np.ndarray,
    seed: int = 0,
    perplexity: float = 30.0,
    max_iter: int = 1000,
    pca_dims: int = 50,
) -> np.ndarray:
    """t-SNE of all depths together: returns ``(L * P, 2)``, rows depth-major (see :func:`depth_index`).

    Every given sample is embedded; call :func:`subsample_positions` first to bound the cost.
    Features are PCA-reduced to ``pca_dims`` when wider; perplexity is clamped below N / 3.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    positions_LPd = np.asarray(positions_LPd, dtype=np.float64)
    if positions_LPd.ndim != 3:
        raise ValueError(f"positions_LPd must have shape (L, P, d), got {positions_LPd.shape}")
    L, P, d = positions_LPd.shape
    x_Nd = positions_LPd.reshape(L * P, d)
    n = x_Nd.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got L * P = {n}")
    if d > pca_dims and n > pca_dims:
        x_Nd = PCA(n_components=pca_dims, random_state=seed).fit_transform(x_Nd)
    perp = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed,
                max_iter=max_iter)
    return tsne.fit_transform(x_Nd).astype(np.float32)


def plot_tsne(embedding_N2: np.ndarray, depth_N: np.ndarray, lpix: int, lsem: int, title: str | None = None) -> Figure:
    """Scatter of the embedding coloured by depth (colour bar), with the path through the per-depth
    centroids (``ax.lines[0]``); the Lpix and Lsem centroids are annotated."""
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm

    embedding_N2 = np.asarray(embedding_N2)
    depth_N = np.asarray(depth_N).astype(int)
    if embedding_N2.ndim != 2 or embedding_N2.shape[1] != 2 or len(depth_N) != len(embedding_N2):
        raise ValueError(f"embedding_N2 must be (N, 2) with one depth per row; got {embedding_N2.shape} and {depth_N.shape}")
    depths = np.unique(depth_N)
    L = int(depths.max())
    cmap = colormaps["viridis"].resampled(L)
    norm = BoundaryNorm(np.arange(0.5, L + 1.5), L)

    fig = new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    sc = ax.scatter(embedding_N2[:, 0], embedding_N2[:, 1], c=depth_N, cmap=cmap, norm=norm, s=4, alpha=0.6,
                    linewidths=0, rasterized=True)
    cent = np.stack([embedding_N2[depth_N == l].mean(axis=0) for l in depths])
    ax.plot(cent[:, 0], cent[:, 1], "-o", color="k", markersize=3, linewidth=1.0, label="depth centroids")
    for l, name, dy in ((lpix, "$L_{pix}$", 8), (lsem, "$L_{sem}$", -14)):
        if l in depths:
            c = cent[list(depths).index(l)]
            ax.annotate(f"{name}={l}", c, xytext=(8, dy), textcoords="offset points", fontsize=8,
                        arrowprops=dict(arrowstyle="-", color="k", linewidth=0.6))
    ticks = np.unique(np.clip([1, lpix, lsem, L], 1, L))
    cb = fig.colorbar(sc, ax=ax, ticks=ticks)
    cb.set_label("depth $l$")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of $z_l$, all depths ($L_{{pix}}$={lpix}, $L_{{sem}}$={lsem})", fontsize=10)
    ax.legend(loc="best", fontsize=7)
    return fig
