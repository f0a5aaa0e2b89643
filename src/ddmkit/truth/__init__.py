"""Exact ground truth: Gaussian-mixture marginals, posteriors, velocities, scores."""
from ddmkit.truth.gmm import GaussianMixture

__all__ = ["GaussianMixture"]
