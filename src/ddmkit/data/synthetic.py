"""Synthetic vector data sets: Gaussian-mixture presets with exact truth, and
two data sets without closed-form truth (two moons, checkerboard).

Every preset is a function (n, generator) -> (x (n, d), labels (n,) or None)
plus, for mixtures, the GaussianMixture it samples from.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ddmkit.truth import GaussianMixture


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
}
SAMPLERS = {
    "moons": two_moons,
    "checkerboard": checkerboard,
}
