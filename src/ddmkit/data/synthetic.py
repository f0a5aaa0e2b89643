"""Synthetic vector data sets: Gaussian-mixture presets with exact truth, and
two data sets without closed-form truth (two moons, checkerboard).

Every preset is a function (n, generator) -> (x (n, d), labels (n,) or None)
plus, for mixtures, the GaussianMixture it samples from. `mixture` is the one
written in the config: data.params give its weights, means and covariances.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ddmkit.errors import DDMError
from ddmkit.truth import GaussianMixture

MAX_COMPONENTS = MAX_DIM = 1024  # the largest mixture written in a config: K components in D dimensions


def ring_mixture(k: int = 8, radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """k equal-weight isotropic Gaussians on a circle (the classic "ring of 8")."""
    ang = np.arange(k) * 2 * math.pi / k
    means = radius * np.stack([np.cos(ang), np.sin(ang)], 1)
    return GaussianMixture.from_covariances(np.ones(k), means, np.full(k, std**2))


def grid_mixture(side: int = 5, spacing: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """side x side equal-weight isotropic Gaussians on a centred square grid."""
    c = (np.arange(side) - (side - 1) / 2) * spacing
    means = np.stack(np.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    return GaussianMixture.from_covariances(np.ones(side * side), means, np.full(side * side, std**2))


def anisotropic_mixture(dim: int = 32, k: int = 8, separation: float = 6.0, seed: int = 0) -> GaussianMixture:
    """k anisotropic full-covariance Gaussians in `dim` dimensions with unequal
    weights (proportional to 1..k), means spread at about `separation` apart.
    Fixed by `seed` so the truth is the same every time."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, dim)) * separation / math.sqrt(2 * dim)  # pairwise ~ separation
    covs = []
    for _ in range(k):
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        eig = np.exp(rng.uniform(np.log(0.05), np.log(0.6), size=dim))
        covs.append(q @ np.diag(eig) @ q.T)
    covs = np.stack(covs)
    covs = 0.5 * (covs + covs.transpose(0, 2, 1))
    return GaussianMixture.from_covariances(np.arange(1, k + 1, dtype=float), means, covs)


def _numbers(value, field: str, ndim: int, expected: str) -> np.ndarray:
    """A nested list of finite numbers (bools and strings refused) as a float64 array of `ndim`
    dimensions, or a DDMError naming data.params.<field> and the expected shape."""
    def leaves(v):
        return [x for item in v for x in leaves(item)] if isinstance(v, (list, tuple)) else [v]
    bad = [v for v in leaves(value) if isinstance(v, bool) or not isinstance(v, (int, float))]
    try:
        arr = np.array(value, dtype=np.float64) if not bad else None
    except (ValueError, TypeError):  # ragged lists
        arr = None
    if arr is None or arr.ndim != ndim:
        raise DDMError(f"data.params.{field}: expected {expected}, got {str(value)[:120]}")
    if not np.isfinite(arr).all():
        raise DDMError(f"data.params.{field}: every number must be finite (inf and nan are refused)")
    return arr


def config_mixture(means=None, weights=None, covs=None, stds=None, std=None) -> GaussianMixture:
    """The Gaussian mixture written in the config (data.name = "mixture"):

        sum_k w_k N(means[k], S_k),  S_k = covs[k] (full), diag(stds[k]^2) or std^2 I

    means (K, D); weights (K,) positive, normalised to sum 1 (default: equal); exactly one of
    covs (K, D, D) symmetric positive definite, stds (K, D) or std (a number), all positive."""
    if means is None:
        raise DDMError('data.params.means: required for data.name = "mixture": a list of K means of D numbers each, '
                       "e.g. means = [[0.0, 0.0], [3.0, 0.0]]")
    mu = _numbers(means, "means", 2, "a list of K lists of D numbers (K means)")
    k, d = mu.shape
    if not (1 <= k <= MAX_COMPONENTS and 1 <= d <= MAX_DIM):
        raise DDMError(f"data.params.means: {k} means of {d} numbers; accepted: 1 .. {MAX_COMPONENTS} means of "
                       f"1 .. {MAX_DIM} numbers")
    w = np.ones(k) if weights is None else _numbers(weights, "weights", 1, f"a list of {k} numbers (one per mean)")
    if w.shape != (k,):
        raise DDMError(f"data.params.weights: {len(w)} weights for {k} means; give one per mean")
    if (w <= 0).any():
        raise DDMError(f"data.params.weights: component {int(np.argmax(w <= 0))} has weight {w[w <= 0][0]:g}; "
                       "every weight must be positive (they are normalised to sum 1)")
    given = [name for name, v in (("covs", covs), ("stds", stds), ("std", std)) if v is not None]
    if len(given) != 1:
        raise DDMError(f"data.params: give exactly one of covs (K x D x D), stds (K x D) or std (one number) for "
                       f"data.name = \"mixture\"; got {', '.join(given) or 'none'}")
    if std is not None:
        s = _numbers(std, "std", 0, "one number")
        if s <= 0:
            raise DDMError(f"data.params.std: {float(s):g}; must be positive")
        cov = np.full(k, float(s) ** 2)
    elif stds is not None:
        cov = _numbers(stds, "stds", 2, f"a list of {k} lists of {d} numbers (per-dimension standard deviations)")
        if cov.shape != (k, d):
            raise DDMError(f"data.params.stds: shape {cov.shape}; expected ({k}, {d}): one list of {d} per mean")
        if (cov <= 0).any():
            raise DDMError(f"data.params.stds: component {int(np.argwhere(cov <= 0)[0, 0])} has a standard "
                           "deviation <= 0; every one must be positive")
        cov = cov**2
    else:
        cov = _numbers(covs, "covs", 3, f"a list of {k} matrices of {d} x {d} numbers")
        if cov.shape != (k, d, d):
            raise DDMError(f"data.params.covs: shape {cov.shape}; expected ({k}, {d}, {d}): one {d} x {d} "
                           "matrix per mean")
        for c in range(k):
            if np.abs(cov[c] - cov[c].T).max() > 1e-9 * max(1.0, np.abs(cov[c]).max()):
                raise DDMError(f"data.params.covs[{c}] (component {c}) is not symmetric; a covariance equals its "
                               "transpose")
            low = float(np.linalg.eigvalsh(cov[c]).min())
            if low <= 0:
                raise DDMError(f"data.params.covs[{c}] (component {c}) is not positive definite (smallest "
                               f"eigenvalue {low:.3g}); every covariance must have only positive eigenvalues")
        cov = (cov + cov.transpose(0, 2, 1)) / 2
    return GaussianMixture.from_covariances(w, mu, cov)


def two_moons(n: int, generator: torch.Generator, noise: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles, scaled to about unit spread; labels = moon."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    x = torch.stack([torch.cos(u), torch.sin(u)], 1)
    x = torch.where(labels[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], 1), x)
    x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 1.5
    return x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64), labels


def checkerboard(n: int, generator: torch.Generator, squares: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform on the black squares of a squares x squares board over [-2, 2]^2;
    labels = index of the square."""
    cell = 4.0 / squares
    black = [(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0]
    idx = torch.randint(0, len(black), (n,), generator=generator)
    corner = torch.tensor(black, dtype=torch.float64)[idx] * cell - 2.0
    return corner + cell * torch.rand(n, 2, generator=generator, dtype=torch.float64), idx


MIXTURES = {
    "ring8": ring_mixture,
    "grid25": grid_mixture,
    "gmm32": anisotropic_mixture,
    "mixture": config_mixture,
}
SAMPLERS = {
    "moons": two_moons,
    "checkerboard": checkerboard,
}
