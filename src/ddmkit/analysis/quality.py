"""Per-sample quality and its link to disagreement, alignment and stability.

    q(x) = -log p_0(x)                       under the true mixture, when the data has one
    q(x) = min_j |phi(x) - phi(y_j)|         otherwise: nearest held-out point in feature space

Lower is better for both. Links are Spearman rank correlations with percentile bootstrap
confidence intervals (resampling samples). Across strategies every strategy starts from
the same noise, so one bootstrap draw resamples the same sample indices for all of them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ddmkit.truth import GaussianMixture


def per_sample_quality(x0: torch.Tensor, truth: GaussianMixture | None, reference: torch.Tensor,
                       features, chunk: int = 2048) -> tuple[torch.Tensor, str]:
    """(q per sample, its name): NLL under the truth, or nearest-neighbour feature distance."""
    if truth is not None:
        return -truth.log_prob(x0.reshape(len(x0), -1).double(), 0.0), "NLL"
    ref = features(reference).double()
    q = [torch.cdist(features(x0[i:i + chunk]).double(), ref).min(1).values for i in range(0, len(x0), chunk)]
    return torch.cat(q), "NN distance"


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences; NaN for fewer than 3 points or a
    constant sequence (no ranking to correlate)."""
    from scipy.stats import spearmanr  # scipy.stats takes a second to import: on first use, not at start-up

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def why_undefined(a, b, names: tuple[str, str], unit: str) -> str:
    """Why Spearman's rho of a and b has no value: fewer than 3 `unit`, or which of them (by name) is constant."""
    if len(a) < 3:
        return f"fewer than 3 {unit}"
    constant = [name for name, v in zip(names, (a, b)) if np.ptp(v) == 0]
    return f"constant {' and '.join(constant)}" if constant else "not a number"


def _with_rho(rho: float, interval: dict, a, b, names: tuple[str, str], unit: str) -> dict:
    """rho and its interval, and when rho is undefined, why ("why")."""
    return {"rho": rho, **interval, **({"why": why_undefined(a, b, names, unit)} if math.isnan(rho) else {})}


def spearman_ci(a, b, n_boot: int = 200, seed: int = 0, level: float = 0.95,
                names: tuple[str, str] = ("a", "b")) -> dict:
    """Spearman rho of paired samples with a percentile bootstrap interval (names: of a and b, for "why")."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    boots = [spearman(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(n_boot))]
    return _with_rho(spearman(a, b), _interval(boots, level), a, b, names, "samples")


def _interval(boots, level: float) -> dict:
    boots = np.asarray([b for b in boots if not math.isnan(b)])
    if len(boots) == 0:
        return {"lo": math.nan, "hi": math.nan, "p_negative": math.nan}
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"lo": float(lo), "hi": float(hi), "p_negative": float((boots < 0).mean())}


def across_strategies(stability: np.ndarray, quality: np.ndarray, n_boot: int = 500, seed: int = 0,
                      level: float = 0.95, names: tuple[str, str] = ("stability", "quality")) -> dict:
    """Spearman rho between per-strategy means of two (S, B) per-sample arrays (same samples in
    every row), with a bootstrap over samples (names: of the two, for "why")."""
    stability, quality = np.asarray(stability, float), np.asarray(quality, float)
    rng = np.random.default_rng(seed)
    n = stability.shape[1]
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        boots.append(spearman(stability[:, i].mean(1), quality[:, i].mean(1)))
    means = stability.mean(1), quality.mean(1)
    return _with_rho(spearman(*means), _interval(boots, level), *means, names, "strategies")


def verdict(link: dict) -> str:
    """Words for rho(Delta_refine, quality loss) across strategies: a stability-quality
    dissociation means the more stable strategies (small Delta_refine) generate worse (high q),
    i.e. rho < 0."""
    if math.isnan(link["rho"]):
        return "undetermined (a constant column)"
    ci = f"rho = {link['rho']:+.2f}, 95% CI [{link['lo']:+.2f}, {link['hi']:+.2f}]"
    if link["hi"] < 0:
        return f"dissociation: the more stable strategies generate worse ({ci})"
    if link["lo"] > 0:
        return f"no dissociation: the more stable strategies also generate better ({ci})"
    return f"inconclusive: the interval contains 0 ({ci}; P(rho < 0) = {link['p_negative']:.2f})"


def paired_difference(a, b, n_boot: int = 500, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of a - b over paired samples (same starting noise) with a bootstrap interval."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(seed)
    boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(diff.mean()), "lo": float(lo), "hi": float(hi)}
