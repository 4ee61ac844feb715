"""Does the trajectory evolve? Linear probes, K-means NMI and a crossover detector for every feature view.

The paper's Fig. 6 says K-means clusters of z_l follow perceptual primitives (colour, texture) at
shallow depths and categories at deep depths. K-means follows whatever dominates the feature's
variance; a linear probe asks what the feature *carries*. For every (view, pooling) of
:mod:`analysis.extract`, every depth l and every factor this module measures:

- **probe**: held-out accuracy of a multinomial logistic regression (scikit-learn ``LogisticRegression``,
  lbfgs, L2 with fixed ``C = PROBE_C``, at most ``MAX_ITER`` iterations) on features standardised with the
  training images' mean and standard deviation; beside it **chance** = the majority-class rate of the
  test split and the **normalised score** (acc - chance) / (1 - chance) (0 = chance, 1 = perfect).
- **split**: one fixed image split for every view, depth and factor: a permutation seeded by
  ``split_seed`` (default ``SPLIT_SEED``) puts ``round(test_fraction * B)`` images in the test split
  (default ``TEST_FRACTION``). Per-position views (``pos``) split their positions by image, so no test image
  lends a position to training. Images whose label is ``-1`` (unknown) are left out for that factor.
- **position labels** (``pos``): a position carries its image's label, but object factors
  (``OBJECT_FACTORS``) count only at foreground positions (``position_fg_P >= 0.5``) and scene factors
  (``SCENE_FACTORS``) only at background positions (``< 0.5``); where no mask is known every position counts.
- **NMI**: :func:`analysis.kmeans.nmi_per_depth` on each pooled view (k clusters, seeded), as ``nmi.png``.
- **crossover detector**: per depth, the factor the K-means clusters follow best (max NMI) and the factor the
  probe reads best (max normalised score); the paths of those (consecutive repeats merged, ``"color -> shape"``);
  and the factors whose normalised probe score gains or loses at least ``GAIN_TOL`` between depth 1 and depth L.

JSON schema (``probes.json`` from :mod:`analysis.make_figures`, one entry per run; NaN is written as null)::

    {run: {"lpix", "lsem", "L", "split", "n_images",
           "protocol": {"probe", "C", "max_iter", "standardize", "test_fraction", "split_seed", "n_train",
                        "n_test", "chance", "normalized", "position_labels", "kmeans_k", "kmeans_seed", "gain_tol"},
           "views": {"<view>/<pooling>": {"view", "pooling", "width",
                     "probe": {factor: {"acc": [a_1..a_L], "chance", "normalized": [s_1..s_L],
                                        "n_train", "n_test", "n_classes"}},
                     "nmi": {factor: [v_1..v_L]} or null (pos),
                     "crossover": {"nmi_top": [factor per depth] or null, "nmi_path": str or null,
                                   "probe_top": [...], "probe_path": str, "probe_delta": {factor: s_L - s_1},
                                   "gains": [factor], "losses": [factor]}}},
           "not_converged": number of probe fits that hit MAX_ITER}}
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting import integer_depth_axis, mark_depths, new_figure

PROBE_C = 1.0  # inverse L2 strength (scikit-learn's C) on standardised features: fixed, never tuned
MAX_ITER = 1000
TEST_FRACTION = 0.3
SPLIT_SEED = 0
GAIN_TOL = 0.1  # a normalised probe score change of at least this between depth 1 and L is a gain / loss
FG_POSITION = 0.5  # a position is foreground when its latent cell is at least half foreground
OBJECT_FACTORS = ("shape", "color", "texture")
SCENE_FACTORS = ("background",)
CHANCE_GID = "chance"


# ------------------------------------------------------------------------------------------ probes


class ProbeFit(NamedTuple):
    acc: float  # held-out accuracy (NaN when the factor cannot be probed)
    chance: float  # majority-class rate of the test split
    converged: bool


def image_split(n_images: int, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """Boolean test mask (B,): ``round(test_fraction * B)`` images chosen by a permutation seeded by ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(test_fraction * n_images))
    if n_images >= 2:
        n_test = min(max(n_test, 1), n_images - 1)
    test = np.zeros(n_images, dtype=bool)
    test[np.random.default_rng(seed).permutation(n_images)[:n_test]] = True
    return test


def chance_rate(y_test: np.ndarray) -> float:
    """The majority-class rate of the test labels (NaN when empty)."""
    y_test = np.asarray(y_test)
    if len(y_test) == 0:
        return float("nan")
    return float(np.bincount(y_test - y_test.min()).max() / len(y_test))


def normalized_score(acc: float, chance: float) -> float:
    """(acc - chance) / (1 - chance); NaN when chance is 1 or either is NaN."""
    if not (math.isfinite(acc) and math.isfinite(chance)) or chance >= 1.0:
        return float("nan")
    return float((acc - chance) / (1.0 - chance))


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              C: float = PROBE_C, max_iter: int = MAX_ITER) -> ProbeFit:
    """Held-out accuracy of the probe of the module docstring (standardise on train, L2 logistic regression)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    chance = chance_rate(y_test)
    if len(y_test) == 0 or len(np.unique(y_train)) < 2:
        return ProbeFit(float("nan"), chance, True)
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    mu = x_train.mean(axis=0)
    sd = x_train.std(axis=0)
    sd[sd < 1e-8] = 1.0
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x_train - mu) / sd, y_train)
    acc = float(np.mean(clf.predict((x_test - mu) / sd) == y_test))
    return ProbeFit(acc, chance, bool(np.all(clf.n_iter_ < max_iter)))


def probe_per_depth(x_LNC: np.ndarray, labels: Mapping[str, np.ndarray], test_N: np.ndarray, C: float = PROBE_C,
                    max_iter: int = MAX_ITER) -> tuple[dict[str, dict[str, Any]], int]:
    """Probe every depth of ``x_LNC`` for every factor (labels ``-1`` left out) on the split ``test_N``.

    Returns ({factor: {"acc": [L], "chance", "normalized": [L], "n_train", "n_test", "n_classes"}}, number of
    fits that hit ``max_iter``)."""
    x_LNC = np.asarray(x_LNC)
    if x_LNC.ndim != 3:
        raise ValueError(f"x_LNC must have shape (L, N, C), got {x_LNC.shape}")
    L, N, _ = x_LNC.shape
    test_N = np.asarray(test_N, dtype=bool)
    if len(test_N) != N:
        raise ValueError(f"test_N has {len(test_N)} entries for {N} samples")
    out: dict[str, dict[str, Any]] = {}
    not_converged = 0
    for f, y in labels.items():
        y = np.asarray(y)
        if len(y) != N:
            raise ValueError(f"labels['{f}'] has {len(y)} entries for {N} samples")
        known = y >= 0
        tr, te = known & ~test_N, known & test_N
        fits = [fit_probe(x_LNC[l][tr], y[tr], x_LNC[l][te], y[te], C, max_iter) for l in range(L)]
        not_converged += sum(not p.converged for p in fits)
        chance = chance_rate(y[te])
        acc = [p.acc for p in fits]
        out[f] = {"acc": acc, "chance": chance, "normalized": [normalized_score(a, chance) for a in acc],
                  "n_train": int(tr.sum()), "n_test": int(te.sum()), "n_classes": int(len(np.unique(y[known])))}
    return out, not_converged


def position_labels(labels_B: Mapping[str, np.ndarray], position_index_P2: np.ndarray,
                    position_fg_P: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Per-position labels (module docstring): the image's label, ``-1`` for object factors off the objects
    and for scene factors on them where the foreground fraction is known."""
    img = np.asarray(position_index_P2)[:, 0]
    fg = None if position_fg_P is None else np.asarray(position_fg_P, dtype=np.float64)
    out = {}
    for f, y in labels_B.items():
        y_P = np.asarray(y)[img].copy()
        if fg is not None:
            known = np.isfinite(fg)
            if f in OBJECT_FACTORS:
                y_P[known & (fg < FG_POSITION)] = -1
            elif f in SCENE_FACTORS:
                y_P[known & (fg >= FG_POSITION)] = -1
        out[f] = y_P
    return out


# --------------------------------------------------------------------------------------- crossover


def _top(curves: Mapping[str, Sequence[float]], L: int) -> list[Optional[str]]:
    tops: list[Optional[str]] = []
    for l in range(L):
        best, best_v = None, -math.inf
        for f, v in curves.items():
            x = float(v[l])
            if math.isfinite(x) and x > best_v:
                best, best_v = f, x
        tops.append(best)
    return tops


def path(tops: Sequence[Optional[str]]) -> str:
    """The per-depth winners with consecutive repeats merged: ['color', 'color', 'shape'] -> 'color -> shape'."""
    steps: list[str] = []
    for t in tops:
        if t is not None and (not steps or steps[-1] != t):
            steps.append(t)
    return " -> ".join(steps)


def crossover(nmi: Optional[Mapping[str, Sequence[float]]], probe: Mapping[str, Mapping[str, Any]],
              tol: float = GAIN_TOL) -> dict[str, Any]:
    """The crossover detector (module docstring) from NMI curves (None for per-position views) and the probe
    results of :func:`probe_per_depth`."""
    scores = {f: r["normalized"] for f, r in probe.items()}
    L = max((len(v) for v in scores.values()), default=0)
    probe_top = _top(scores, L)
    delta = {}
    for f, s in scores.items():
        d = float(s[-1]) - float(s[0]) if L else float("nan")
        delta[f] = d
    ok = {f: d for f, d in delta.items() if math.isfinite(d)}
    gains = sorted((f for f, d in ok.items() if d >= tol), key=lambda f: -ok[f])
    losses = sorted((f for f, d in ok.items() if d <= -tol), key=lambda f: ok[f])
    nmi_top = _top(nmi, L) if nmi else None
    return {"nmi_top": nmi_top, "nmi_path": path(nmi_top) if nmi_top is not None else None,
            "probe_top": probe_top, "probe_path": path(probe_top), "probe_delta": delta,
            "gains": gains, "losses": losses}


# ---------------------------------------------------------------------------------- all the views


def view_key(view: str, pooling: str) -> str:
    return f"{view}/{pooling}"


def analyse_views(
    feats: Mapping[str, Any],
    views: Optional[Sequence[tuple[str, str]]] = None,
    k: int = 8,
    seed: int = 0,
    test_fraction: float = TEST_FRACTION,
    split_seed: int = SPLIT_SEED,
    C: float = PROBE_C,
    max_iter: int = MAX_ITER,
    tol: float = GAIN_TOL,
    nmi: Optional[Mapping[str, Mapping[str, Sequence[float]]]] = None,
) -> dict[str, Any]:
    """Probes, NMI and crossover for every (view, pooling) in ``views`` (default: all that ``feats`` holds,
    :func:`analysis.extract.available_views`); ``feats`` is :func:`analysis.extract.load_features` output (or
    any mapping with its arrays and ``labels``). ``nmi`` may hold already computed NMI curves by view key.
    Returns the per-run JSON object of the module docstring without the run's lpix/lsem/L/split keys."""
    from analysis.extract import POSITION, available_views, view_array
    from analysis.kmeans import nmi_per_depth

    labels = {f: np.asarray(y) for f, y in (feats.get("labels") or {}).items()}
    if not labels:
        raise ValueError("the features carry no factor labels: nothing to probe")
    B = len(next(iter(labels.values())))
    views = list(views) if views is not None else available_views(feats)
    test_B = image_split(B, test_fraction, split_seed)
    out_views: dict[str, Any] = {}
    not_converged = 0
    pos_labels = None
    for view, pooling in views:
        x = view_array(feats, view, pooling)
        key = view_key(view, pooling)
        if pooling == POSITION:
            idx = np.asarray(feats["position_index_P2"])
            if pos_labels is None:
                pos_labels = position_labels(labels, idx, feats.get("position_fg_P"))
            probe, nc = probe_per_depth(x, pos_labels, test_B[idx[:, 0]], C, max_iter)
            curves = None
        else:
            probe, nc = probe_per_depth(x, labels, test_B, C, max_iter)
            curves = dict(nmi[key]) if nmi and key in nmi else nmi_per_depth(x, labels, k=k, seed=seed)
        not_converged += nc
        out_views[key] = {"view": view, "pooling": pooling, "width": int(x.shape[-1]), "probe": probe,
                          "nmi": curves, "crossover": crossover(curves, probe, tol)}
    protocol = {
        "probe": "sklearn LogisticRegression, multinomial, lbfgs, L2", "C": C, "max_iter": max_iter,
        "standardize": "per feature, mean and std of the training split", "test_fraction": test_fraction,
        "split_seed": split_seed, "n_train": int((~test_B).sum()), "n_test": int(test_B.sum()),
        "chance": "majority-class rate of the test split", "normalized": "(acc - chance) / (1 - chance)",
        "position_labels": f"object factors {list(OBJECT_FACTORS)} at positions with fg >= {FG_POSITION}, scene "
                           f"factors {list(SCENE_FACTORS)} at positions with fg < {FG_POSITION}, others everywhere",
        "kmeans_k": k, "kmeans_seed": seed, "gain_tol": tol,
    }
    return {"n_images": B, "protocol": protocol, "views": out_views, "not_converged": not_converged}


def to_json(obj: Any) -> Any:
    """``obj`` with NaN / inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------------------ figures


def _style(f: str, semantic: Sequence[str], lowlevel: Sequence[str]) -> tuple[str, str]:
    if f in semantic:
        return "-", "semantic"
    if f in lowlevel:
        return "--", "low-level"
    return ":", "other"


def _panels(n: int, title: Optional[str]) -> tuple[Figure, list]:
    fig = new_figure(3.6 * n + 0.6, 3.4)
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _curve_panels(
    panels: Mapping[str, Mapping[str, Sequence[Optional[float]]]],
    lpix: Optional[int],
    lsem: Optional[int],
    semantic: Sequence[str],
    lowlevel: Sequence[str],
    title: Optional[str],
    ylabel: str,
    ylim: tuple[float, float],
    label_note: Optional[Mapping[str, Mapping[str, str]]] = None,
    chance_line: bool = False,
) -> Figure:
    """One panel per entry of ``panels`` ({panel title: {factor: value per depth}}), one curve per factor over
    depth (semantic solid, low-level dashed; a factor keeps its colour in every panel, legend in the first);
    ``label_note[panel][factor]`` is appended to the legend label; ``chance_line`` draws 0 (gid ``chance``)."""
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    factors = list(dict.fromkeys(f for c in panels.values() for f in c))
    fig, axes = _panels(len(panels), title)
    for ax, (name, curves) in zip(axes, panels.items()):
        for f, vals in curves.items():
            v = np.asarray([np.nan if x is None else x for x in vals], dtype=np.float64)
            style, kind = _style(f, semantic, lowlevel)
            note = (label_note or {}).get(name, {}).get(f, "")
            ax.plot(np.arange(1, len(v) + 1), v, style, marker="o", markersize=3,
                    color=colors[factors.index(f) % len(colors)], label=f"{f} ({kind}{note})")
        if chance_line:
            ax.axhline(0.0, color="0.6", linewidth=0.8, gid=CHANCE_GID)
        mark_depths(ax, lpix, lsem)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("depth $l$")
        ax.set_ylabel(ylabel)
        ax.set_ylim(*ylim)
        integer_depth_axis(ax)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="best")
    return fig


def plot_probe_views(
    probes: Mapping[str, Mapping[str, Mapping[str, Any]]],
    lpix: Optional[int],
    lsem: Optional[int],
    semantic: Sequence[str] = ("shape", "count"),
    lowlevel: Sequence[str] = ("color", "texture", "background"),
    title: Optional[str] = None,
) -> Figure:
    """One panel per view (``{panel title: {factor: probe result}}``, :func:`probe_per_depth`), one curve per
    factor of the normalised probe score over depth (x = 1..L; semantic solid, low-level dashed), the chance level
    (0) as a grey line (gid ``chance``); the legend (first panel; a factor keeps its colour in every panel) names
    each factor's chance rate."""
    if not probes:
        raise ValueError("plot_probe_views needs at least one view")
    curves = {name: {f: r["normalized"] for f, r in probe.items()} for name, probe in probes.items()}
    notes = {name: {f: "" if r.get("chance") is None or not math.isfinite(r["chance"]) else f", chance {r['chance']:.2f}"
                    for f, r in probe.items()} for name, probe in probes.items()}
    return _curve_panels(curves, lpix, lsem, semantic, lowlevel, title, "probe (acc - chance) / (1 - chance)",
                         (-0.2, 1.05), label_note=notes, chance_line=True)


def plot_nmi_views(
    nmi: Mapping[str, Mapping[str, Sequence[float]]],
    lpix: Optional[int],
    lsem: Optional[int],
    semantic: Sequence[str] = ("shape", "count"),
    lowlevel: Sequence[str] = ("color", "texture", "background"),
    title: Optional[str] = None,
) -> Figure:
    """One panel per view (``{panel title: {factor: [NMI per depth]}}``), one curve per factor (legend in the first
    panel)."""
    if not nmi:
        raise ValueError("plot_nmi_views needs at least one view")
    return _curve_panels(nmi, lpix, lsem, semantic, lowlevel, title, "NMI(K-means clusters, factor)", (0, 1.05))


def figures_by_pooling(result: Mapping[str, Any], lpix: Optional[int], lsem: Optional[int],
                       semantic: Sequence[str] = ("shape", "count"),
                       lowlevel: Sequence[str] = ("color", "texture", "background"),
                       name: str = "") -> list[tuple[str, Figure, str]]:
    """(file stem, Figure, caption) for every pooling in an :func:`analyse_views` result: ``probes_<pooling>``
    (one panel per view) and, for pooled views, ``nmi_views_<pooling>``."""
    pools: dict[str, list[str]] = {}
    for key, v in result["views"].items():
        pools.setdefault(v["pooling"], []).append(key)
    out = []
    prefix = f"{name}: " if name else ""
    for pooling, keys in pools.items():
        probes = {result["views"][k]["view"]: result["views"][k]["probe"] for k in keys}
        fig = plot_probe_views(probes, lpix, lsem, semantic, lowlevel,
                               title=f"{prefix}linear probes per depth, {pooling} features (0 = chance)")
        out.append((f"probes_{pooling}", fig,
                    f"linear probe per depth and factor, {pooling} features: views {', '.join(probes)}"))
        nmi = {result["views"][k]["view"]: result["views"][k]["nmi"] for k in keys if result["views"][k]["nmi"]}
        if nmi:
            fig = plot_nmi_views(nmi, lpix, lsem, semantic, lowlevel,
                                 title=f"{prefix}NMI of K-means clusters per depth, {pooling} features")
            out.append((f"nmi_views_{pooling}", fig, f"NMI per depth and factor, {pooling} features: views {', '.join(nmi)}"))
    return out


def crossover_lines(result: Mapping[str, Any]) -> list[str]:
    """One human-readable line per view: what the clusters follow and what the probe gains / loses."""
    lines = []
    for key, v in result["views"].items():
        c = v["crossover"]
        parts = []
        if c["nmi_path"] is not None:
            parts.append(f"clusters follow {c['nmi_path'] or '-'}")
        parts.append(f"probe reads best {c['probe_path'] or '-'}")
        parts.append(f"probe gains {', '.join(c['gains']) or 'none'}, loses {', '.join(c['losses']) or 'none'} "
                     f"(depth 1 -> L)")
        lines.append(f"{key}: " + "; ".join(parts))
    return lines
