"""Slope fits with bootstrap intervals."""
import numpy as np
import pytest

from ddmkit.theory.report import bootstrap_slope, loglog_slope, markdown_table


def test_loglog_slope_recovers_a_power_law():
    n = np.array([4, 8, 16, 32, 64])
    slope, intercept = loglog_slope(n, 3.0 * n**-1.5)
    assert slope == pytest.approx(-1.5) and np.exp(intercept) == pytest.approx(3.0)


def test_bootstrap_interval_covers_the_true_slope_and_shrinks_with_samples():
    rng = np.random.default_rng(1)
    n = np.array([8, 16, 32, 64, 128])
    widths = []
    for samples in (50, 5000):
        sq = (n[:, None] ** -0.5 * rng.standard_normal((5, samples))) ** 2
        fit = bootstrap_slope(n, sq, resamples=300, seed=0)
        assert fit["ci_low"] <= -0.5 <= fit["ci_high"] or abs(fit["slope"] + 0.5) < 0.02
        widths.append(fit["ci_high"] - fit["ci_low"])
    assert widths[1] < widths[0] / 3


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 0.123456]]) == "| a | b |\n|---|---|\n| 1 | 0.123 |"
