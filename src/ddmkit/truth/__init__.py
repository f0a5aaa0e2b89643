"""Exact ground truth: Gaussian-mixture marginals, posteriors, velocities, scores."""
from ddmkit.truth.gmm import GaussianMixture, follows_device

__all__ = ["GaussianMixture", "follows_device"]
