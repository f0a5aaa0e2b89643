"""The quality link and the verdict of `ddmkit analyze` against known answers."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddmkit.analysis.quality import (
    across_strategies,
    paired_difference,
    per_sample_quality,
    spearman_ci,
    verdict,
)
from ddmkit.truth import GaussianMixture


def link(rho, lo, hi, p_negative=0.5):
    return {"rho": rho, "lo": lo, "hi": hi, "p_negative": p_negative}


def test_verdict_reads_the_sign_of_rho_refine_vs_q():
    """A dissociation is rho(Delta_refine, q) < 0: the more stable strategies (small Delta_refine)
    have the larger (worse) q."""
    assert verdict(link(-0.8, -0.95, -0.4, 1.0)).startswith("dissociation")
    assert verdict(link(+0.8, +0.4, +0.95, 0.0)).startswith("no dissociation")
    words = verdict(link(-0.1, -0.6, +0.5, 0.62))
    assert words.startswith("inconclusive") and "P(rho < 0) = 0.62" in words
    assert verdict(link(math.nan, math.nan, math.nan)).startswith("undetermined")
    # the interval decides, not the point: a negative rho whose interval reaches above 0 is inconclusive
    assert verdict(link(-0.9, -0.99, +0.01)).startswith("inconclusive")
    assert verdict(link(+0.9, -0.01, +0.99)).startswith("inconclusive")


def strategies(rng, stable_is_worse: bool, s: int = 5, b: int = 400):
    """(S, B) per-sample Delta_refine and q for s strategies with clearly separated means: strategy i has
    Delta_refine about i; its q rises with i (stable = better) or falls (stable = worse)."""
    refine = np.arange(s)[:, None] + 0.1 * rng.standard_normal((s, b))
    slope = -1.0 if stable_is_worse else 1.0
    q = slope * np.arange(s)[:, None] + 0.1 * rng.standard_normal((s, b))
    return refine, q


def test_dissociation_is_found_where_the_more_stable_strategies_generate_worse():
    rng = np.random.default_rng(0)
    refine, q = strategies(rng, stable_is_worse=True)
    res = across_strategies(refine, q, n_boot=100)
    assert res["rho"] == pytest.approx(-1.0) and res["hi"] < 0 and res["p_negative"] == 1.0
    assert verdict(res).startswith("dissociation")
    refine, q = strategies(rng, stable_is_worse=False)
    res = across_strategies(refine, q, n_boot=100)
    assert res["rho"] == pytest.approx(1.0) and res["lo"] > 0 and res["p_negative"] == 0.0
    assert verdict(res).startswith("no dissociation")


def test_across_strategies_resamples_the_same_samples_for_every_strategy():
    """Strategy means that differ only through a per-sample term shared by all strategies (same noise):
    a paired bootstrap keeps their order, so the interval is the point."""
    rng = np.random.default_rng(1)
    shared = rng.standard_normal(300) * 10  # much larger than the strategy effects
    refine = np.arange(4)[:, None] * 0.01 + rng.standard_normal((4, 300)) * 1e-4
    q = -np.arange(4)[:, None] * 0.01 + shared[None]
    res = across_strategies(refine, q, n_boot=200)
    assert res["rho"] == pytest.approx(-1.0) and res["lo"] == pytest.approx(-1.0) and res["hi"] == pytest.approx(-1.0)


def test_spearman_ci_of_a_monotone_relation_and_of_independent_samples():
    rng = np.random.default_rng(2)
    a = rng.standard_normal(500)
    res = spearman_ci(a, np.exp(a), n_boot=100)
    assert res["rho"] == pytest.approx(1.0) and res["lo"] == pytest.approx(1.0)
    res = spearman_ci(a, -a**3, n_boot=100)
    assert res["rho"] == pytest.approx(-1.0) and res["p_negative"] == 1.0
    res = spearman_ci(a, rng.standard_normal(500), n_boot=200)
    assert res["lo"] < 0 < res["hi"] and abs(res["rho"]) < 0.15
    assert math.isnan(spearman_ci(a, np.ones(500), n_boot=10)["rho"])


def test_paired_difference_is_the_mean_difference_with_a_normal_interval():
    """Differences N(0.3, 1) on 4000 pairs: the mean is 0.3 within about 0.016 and the 95% interval is
    mean +- 1.96 se, se = 1 / sqrt(4000); 4000 bootstrap draws place each end within about 0.04 se
    (a 2.5% quantile misplaced to 1.7% or 10% moves it by 0.17 se or more)."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(4000) * 5
    diff = 0.3 + rng.standard_normal(4000)
    res = paired_difference(base + diff, base, n_boot=4000)
    assert res["mean"] == pytest.approx(diff.mean(), abs=1e-12)
    se = diff.std() / math.sqrt(4000)
    assert res["lo"] == pytest.approx(diff.mean() - norm.ppf(0.975) * se, abs=0.12 * se)
    assert res["hi"] == pytest.approx(diff.mean() + norm.ppf(0.975) * se, abs=0.12 * se)
    assert res["lo"] < 0.3 < res["hi"]


def test_per_sample_quality_is_the_mixture_nll_or_the_nearest_neighbour_distance():
    g = GaussianMixture.from_covariances([0.75, 0.25], [[0.0, 0.0], [4.0, 0.0]], [1.0, 1.0])
    x = torch.tensor([[0.0, 1.0], [4.0, 0.0], [2.0, -1.0]], dtype=torch.float64)
    q, name = per_sample_quality(x, g, None, None)
    pdf = 0.75 * norm.pdf(x.numpy()[:, 0]) + 0.25 * norm.pdf(x.numpy()[:, 0], loc=4.0)
    expect = -np.log(pdf * norm.pdf(x.numpy()[:, 1]))
    assert name == "NLL" and np.allclose(q.numpy(), expect, atol=1e-12)
    ref = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    q, name = per_sample_quality(torch.tensor([[0.0, 1.0], [6.0, 8.0]]), None, ref, lambda y: 2 * y)
    assert name == "NN distance" and torch.allclose(q, torch.tensor([2.0, 10.0], dtype=torch.float64))


def test_interval_is_the_percentile_interval_of_the_finite_draws():
    from ddmkit.analysis.quality import _interval

    boots = list(np.arange(-500, 501) / 500) + [math.nan] * 7
    res = _interval(boots, 0.95)
    assert res["lo"] == pytest.approx(-0.95) and res["hi"] == pytest.approx(0.95)
    assert res["p_negative"] == pytest.approx(500 / 1001)
    res = _interval(boots, 0.5)
    assert res["lo"] == pytest.approx(-0.5) and res["hi"] == pytest.approx(0.5)
    assert all(math.isnan(v) for v in _interval([math.nan] * 3, 0.95).values())
    assert set(_interval([math.nan], 0.95)) == {"lo", "hi", "p_negative"}


def test_verdict_words_carry_the_numbers_and_an_interval_touching_zero_is_inconclusive():
    words = verdict(link(-0.8, -0.95, -0.4, 1.0))
    assert "rho = -0.80, 95% CI [-0.95, -0.40]" in words
    assert verdict(link(-0.5, -0.9, 0.0)).startswith("inconclusive")
    assert verdict(link(+0.5, 0.0, +0.9)).startswith("inconclusive")


def test_bootstraps_draw_every_sample_including_the_first():
    """Resampling must draw from all indices 0..n-1: here only draws that include sample 0 change the sign."""
    assert spearman_ci([0, 1, 2], [2, 0, 1], n_boot=200)["p_negative"] > 0.2
    stability = np.array([[0.0, 0.0], [100.0, 1.0], [200.0, 2.0]])
    quality = np.array([[200.0, 0.0], [100.0, 1.0], [0.0, 2.0]])
    res = across_strategies(stability, quality, n_boot=200)
    assert res["rho"] == pytest.approx(-1.0) and 0.5 < res["p_negative"] < 1.0
    diff = paired_difference([1.0] + [0.0] * 9, [0.0] * 10, n_boot=200)
    assert diff["mean"] == pytest.approx(0.1) and diff["lo"] == 0.0 and diff["hi"] > 0


def test_rho_is_computed_for_any_non_constant_column():
    """A column whose range is exactly 1 is not constant."""
    assert spearman_ci([0.0, 0.5, 1.0], [0.0, 2.0, 5.0], n_boot=10)["rho"] == pytest.approx(1.0)
    assert spearman_ci([0.0, 2.0, 5.0], [0.0, 0.5, 1.0], n_boot=10)["rho"] == pytest.approx(1.0)


def test_bootstrap_intervals_are_reproducible():
    """Same inputs, same seed: the same interval (every command is seeded; no draw from the OS)."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal(50), rng.standard_normal(50)
    assert spearman_ci(a, b, n_boot=50) == spearman_ci(a, b, n_boot=50)
    s, q = rng.standard_normal((3, 50)), rng.standard_normal((3, 50))
    assert across_strategies(s, q, n_boot=50) == across_strategies(s, q, n_boot=50)
    assert paired_difference(a, b, n_boot=50) == paired_difference(a, b, n_boot=50)


def test_an_undefined_rho_says_why():
    """A constant column or fewer than 3 points has no rank correlation: the result names the reason."""
    q = np.arange(10.0)
    assert "why" not in spearman_ci(q, q[::-1], n_boot=5)
    flat = spearman_ci(q, np.ones(10), n_boot=5, names=("q", "rank"))
    assert math.isnan(flat["rho"]) and flat["why"] == "constant rank"
    assert spearman_ci(q[:2], q[:2], n_boot=5)["why"] == "fewer than 3 samples"
    two = across_strategies(np.ones((2, 6)), np.arange(12.0).reshape(2, 6), n_boot=5, names=("Delta_refine", "q"))
    assert two["why"] == "fewer than 3 strategies"
    same = across_strategies(np.ones((3, 6)), np.ones((3, 6)), n_boot=5, names=("Delta_refine", "q"))
    assert same["why"] == "constant Delta_refine and q"
