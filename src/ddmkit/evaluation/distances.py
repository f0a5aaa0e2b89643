"""Distances between two sample sets: exact W2 (POT), sliced W2, MMD.

x, y are (n, d) arrays or tensors; all functions return a Python float.
"""
from __future__ import annotations

import numpy as np
import torch


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def w2_exact(x, y) -> float:
    """Exact 2-Wasserstein distance between the two empirical measures
    (uniform weights), by linear programming (POT's emd)."""
    import ot  # POT, imported on first use: commands that never measure W2 start faster

    x, y = _np(x), _np(y)
    cost = ot.dist(x, y, metric="sqeuclidean")
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=10_000_000), 0.0)))


def w2_sliced(x, y, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance over `projections` random unit directions theta (POT's, from `seed`):
    sqrt(mean_theta W2^2(<x, theta>, <y, theta>)). For two sets of one size the 1-D W2^2 is the mean
    squared difference of the sorted projections (POT's value to rounding, ten times faster); other
    sizes go to POT's quantile functions."""
    import ot

    x, y = _np(x), _np(y)
    if len(x) != len(y):
        return float(ot.sliced_wasserstein_distance(x, y, n_projections=projections, seed=seed, p=2))
    theta = ot.sliced.get_random_projections(x.shape[1], projections, seed)
    return float(np.sqrt(np.mean((np.sort(x @ theta, axis=0) - np.sort(y @ theta, axis=0)) ** 2)))


def mmd_rbf(x, y, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel exp(-|a-b|^2 / (2 h^2)).

    h defaults to the median pairwise distance of the pooled samples (computed on at most the first 1000
    points of each, the zero distances of a point to itself included), so MMD(x, y) = MMD(y, x).
    """
    x, y = torch.as_tensor(_np(x)), torch.as_tensor(_np(y))
    if bandwidth is None:
        pool = torch.cat([x[:1000], y[:1000]])
        bandwidth = float(torch.cdist(pool, pool).median().clamp_min(1e-12))
    g = -1.0 / (2 * bandwidth**2)
    kxx, kyy, kxy = ((torch.cdist(a, b) ** 2 * g).exp() for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())
