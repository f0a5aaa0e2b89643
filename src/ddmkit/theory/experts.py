"""Exact experts and routers of a clustered Gaussian mixture, with controlled errors.

The mixture's components are split into K clusters (contiguous groups). Then

    expert_k(x, t) = v_k(x, t) + eps phi_k(x)       v_k: the exact velocity of cluster k's mixture
    router(x, t)   = softmax(log R(x, t) / T)        R_k = sum of the exact posteriors in cluster k

so eps = 0 and T = 1 give the exact decomposition v = sum_k R_k v_k.

The perturbation is one smooth wave per expert,

    phi_k(x) = u_k sin(w_k . x + b_k),   |u_k| = |w_k| = 1,  b_k in [0, 2 pi),

drawn once from a seeded generator: |phi_k| <= 1 and phi_k is 1-Lipschitz, so
sup_x |expert_k - v_k| = eps and the experts stay as smooth as the truth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddmkit.errors import DDMError
from ddmkit.theory.report import is_count, value_error
from ddmkit.truth import GaussianMixture

Tensor = torch.Tensor


def clusters_fix(components: int, clusters: int) -> str | None:
    """What to give instead of `clusters` for a mixture of `components` components; None when it splits them."""
    splits = is_count(clusters, 1) and clusters <= components
    return None if splits else f"an integer between 1 and components ({components})"


def cluster_groups(components: int, clusters: int) -> list[list[int]]:
    """Component i goes to cluster floor(i K / n): K contiguous groups of near-equal size."""
    if not is_count(components, 1):  # no clusters value would split it
        raise value_error("cluster_groups: components", components, "an integer >= 1")
    if (fix := clusters_fix(components, clusters)) is not None:
        raise value_error("cluster_groups: clusters", clusters, fix)
    return [[i for i in range(components) if i * clusters // components == k] for k in range(clusters)]


@dataclass(frozen=True)
class Wave:
    """phi(x) = direction * sin(frequency . x + phase)."""

    direction: Tensor
    frequency: Tensor
    phase: float

    def __call__(self, x: Tensor) -> Tensor:
        return self.direction * torch.sin(x @ self.frequency + self.phase)[:, None]


def random_waves(count: int, dim: int, seed: int) -> list[Wave]:
    """`count` waves with unit direction and unit frequency vectors, fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    waves = []
    for _ in range(count):
        u, w = torch.randn(2, dim, generator=g, dtype=torch.float64)
        waves.append(Wave(u / u.norm(), w / w.norm(), float(torch.rand((), generator=g)) * 2 * math.pi))
    return waves


def make_experts(gmm: GaussianMixture, groups: list[list[int]], eps: float = 0.0, seed: int = 0) -> list:
    """Expert callables (x, t) -> v: exact cluster velocities plus eps times a wave."""
    if not (math.isfinite(eps) and eps >= 0):
        raise DDMError(f"expert error eps must be a finite number >= 0; got {eps}")
    waves = random_waves(len(groups), gmm.dim, seed)

    def expert(sub: GaussianMixture, wave: Wave):
        return lambda x, t: sub.velocity(x, t) + eps * wave(x)

    return [expert(gmm.subset(g), wave) for g, wave in zip(groups, waves)]


def cluster_posterior(gmm: GaussianMixture, groups: list[list[int]], x: Tensor, t) -> Tensor:
    """R_k(x, t) = sum over cluster k's components of the exact posterior, (B, K)."""
    w = gmm.posterior(x, t)
    return torch.stack([w[:, g].sum(1) for g in groups], dim=1)


def make_router(gmm: GaussianMixture, groups: list[list[int]], temperature: float = 1.0):
    """Router callable (x, t) -> probabilities: the exact cluster posterior tempered by T."""
    if not temperature > 0:
        raise DDMError(f"router temperature must be > 0; got {temperature}")

    def router(x: Tensor, t: Tensor) -> Tensor:
        r = cluster_posterior(gmm, groups, x, t)
        return r if temperature == 1.0 else torch.softmax(r.clamp_min(1e-300).log() / temperature, dim=1)

    return router


def expert_disagreement(experts, router, x: Tensor, t) -> Tensor:
    """sum_k r_k |v_k - sum_j r_j v_j|^2 per row, (B,): the variance of one switching draw."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
    r = router(x, t)
    v = torch.stack([e(x, t) for e in experts], dim=1)
    mean = torch.einsum("bk,bkd->bd", r, v)
    return torch.einsum("bk,bk->b", r, ((v - mean[:, None]) ** 2).sum(-1))
