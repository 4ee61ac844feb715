"""The Fig. 6 verdict: on synthetic probe results built to evolve (semantic factors gain from depth 1 to
Lsem while low-level ones stay, K-means moving from colour to shape) claims (i)-(iii) hold; on results
that carry nothing, or that do not evolve, they do not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.fig6 import mean_ci95, plot_seed_curves, verdict, verdict_table, welch_ci95

FACTORS = ("shape", "count", "color", "texture", "background")


def _entry(lpix, lsem, seed, evolve: float, nothing: bool = False) -> dict:
    """Probe scores: semantic factors rise by ``evolve`` from depth 1 to Lsem, low-level ones stay at 0.6;
    K-means follows colour at depth 1 and, when evolving, shape from Lsem on. ``nothing``: every score ~ 0."""
    rng = np.random.default_rng(seed)
    L = max(lpix, lsem)
    ramp = np.clip(np.arange(L) / max(lsem - 1, 1), 0, 1)
    probe, nmi = {}, {}
    for f in FACTORS:
        noise = rng.normal(0, 0.02, L)
        if nothing:
            score = noise
        elif f in ("shape", "count"):
            score = 0.1 + evolve * ramp + noise
        else:
            score = 0.6 + noise
        probe[f] = {"normalized": score.tolist(), "acc": score.tolist(), "chance": 0.1}
        base = 0.05 + rng.uniform(0, 0.01, L)
        if f == "color":
            base = base + 0.5 * (1 - ramp * (evolve > 0)) if not nothing else base
        if f == "shape" and evolve > 0 and not nothing:
            base = base + 0.6 * ramp
        nmi[f] = base.tolist()
    return {"lpix": lpix, "lsem": lsem, "L": L, "views": {"z/mean": {"probe": probe, "nmi": nmi}}}


def test_evolving_features_satisfy_every_claim_and_flat_ones_none():
    runs = [_entry(4, 16, s, 0.7) for s in range(3)] + [_entry(16, 4, 10 + s, 0.0) for s in range(3)]
    out = verdict(runs, views=("z/mean", "sem/mean"))
    assert list(out["views"]) == ["z/mean"]  # a view no run has is left out
    v = out["views"]["z/mean"]
    strong, weak = v["settings"]["4,16"], v["settings"]["16,4"]
    assert strong["claim_i"] and strong["claim_ii"] and strong["n_seeds"] == 3
    assert strong["semantic_gain"][0] == pytest.approx(0.7, abs=0.05) and abs(strong["lowlevel_gain"][0]) < 0.05
    assert set(strong["nmi_tops"]) == {"color -> shape"}
    assert not weak["claim_i"] and not weak["claim_ii"] and set(weak["nmi_tops"]) == {"color -> color"}
    assert v["claim_iii"]["holds"] and v["claim_iii"]["gap_diff"][0] == pytest.approx(0.7, abs=0.08)
    table = verdict_table(out)
    assert "| z/mean | 4,16 | 3 |" in table and "| yes | yes (gap +0.6" in table


def test_features_that_carry_nothing_report_no_gain_within_the_interval():
    out = verdict([_entry(4, 16, s, 0.0, nothing=True) for s in range(3)], views=("z/mean",))
    s = out["views"]["z/mean"]["settings"]["4,16"]
    m, c = s["semantic_gain"]
    assert abs(m) <= c + 0.05 and not s["claim_i"]
    assert out["views"]["z/mean"]["claim_iii"]["holds"] is None  # no (16, 4) runs to compare with
    fig = plot_seed_curves([_entry(4, 16, s, 0.7) for s in range(3)], views=("z/mean",))
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "shape (semantic)"]
    assert len(lines) == 1 and lines[0].get_ydata()[-1] == pytest.approx(0.8, abs=0.05)
    # the NMI curves over seeds: colour leads at depth 1, shape at Lsem (the entries' K-means crossover)
    evolving = [_entry(4, 16, s, 0.7) for s in range(3)]
    fig = plot_seed_curves(evolving, views=("z/mean",), metric="nmi")
    ys = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()}
    assert ys["color (low-level)"][0] == pytest.approx(0.555, abs=0.02) and ys["color (low-level)"][-1] < 0.1
    assert ys["shape (semantic)"][-1] == pytest.approx(0.655, abs=0.02) and ys["shape (semantic)"][0] < 0.1
    # and the verdict keeps those curves (mean, 95% half-width per depth), so results/ can redraw the figures
    curves = verdict(evolving, views=("z/mean",))["views"]["z/mean"]["settings"]["4,16"]["curves"]
    assert curves["nmi"]["shape"]["n"] == 3 and len(curves["nmi"]["shape"]["mean"]) == 16
    np.testing.assert_allclose(curves["nmi"]["shape"]["mean"], ys["shape (semantic)"])
    assert curves["probe"]["shape"]["mean"][-1] == pytest.approx(0.8, abs=0.05)
    with pytest.raises(ValueError, match="metric"):
        plot_seed_curves(evolving, metric="acc")


def test_intervals():
    assert mean_ci95([1.0]) == (1.0, 0.0)
    m, c = mean_ci95([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert m == 2.0 and c == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)
    d, h = welch_ci95([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert d == 2.0 and h == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)  # the zero-variance side adds nothing
    assert math.isnan(welch_ci95([1.0], [2.0, 3.0])[1])
