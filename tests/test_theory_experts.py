"""Experts, routers and perturbations of the convergence study."""
import re

import pytest
import torch

from ddmkit.data.synthetic import ring_mixture
from ddmkit.errors import DDMError
from ddmkit.routing import RoutingState, parse_strategy, routed_velocity
from ddmkit.theory.convergence import parse_sampler
from ddmkit.theory.experts import (cluster_groups, cluster_posterior, expert_disagreement, make_experts,
                                   make_router, random_waves)

F64 = torch.float64


@pytest.fixture
def ring():
    return ring_mixture(8, 2.0, 0.2)


def test_cluster_groups_split_contiguously():
    assert cluster_groups(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(DDMError, match="clusters"):
        cluster_groups(4, 5)


def test_exact_experts_and_router_rebuild_the_mixture_velocity(ring, gen):
    """v = sum_k R_k v_k: the decomposition the DDM rests on."""
    groups = cluster_groups(8, 4)
    x, t = 2 * torch.randn(64, 2, generator=gen, dtype=F64), torch.rand(64, generator=gen, dtype=F64)
    velocity = routed_velocity(make_experts(ring, groups), make_router(ring, groups), parse_strategy("full"),
                               RoutingState())
    assert torch.allclose(velocity(x, t), ring.velocity(x, t), atol=1e-12)


def test_perturbation_is_bounded_by_eps_and_one_lipschitz(ring, gen):
    groups = cluster_groups(8, 4)
    x = 5 * torch.randn(2000, 2, generator=gen, dtype=F64)
    t = torch.full((2000,), 0.4, dtype=F64)
    exact, perturbed = make_experts(ring, groups), make_experts(ring, groups, eps=0.1)
    gaps = torch.stack([(p(x, t) - e(x, t)).norm(dim=1) for p, e in zip(perturbed, exact)])
    assert float(gaps.max()) <= 0.1 + 1e-12
    assert float(gaps.max()) > 0.09  # the bound is reached somewhere
    for wave in random_waves(4, 2, seed=0):
        y = x + 1e-3 * torch.randn(x.shape, generator=gen, dtype=F64)
        assert float(((wave(x) - wave(y)).norm(dim=1) / (x - y).norm(dim=1)).max()) <= 1 + 1e-9


def test_tempered_router(ring, gen):
    groups = cluster_groups(8, 4)
    x, t = torch.randn(16, 2, generator=gen, dtype=F64), torch.full((16,), 0.3, dtype=F64)
    exact = cluster_posterior(ring, groups, x, t)
    assert torch.allclose(make_router(ring, groups, 1.0)(x, t), exact)
    hot = make_router(ring, groups, 2.0)(x, t)
    assert torch.allclose(hot, exact.sqrt() / exact.sqrt().sum(1, keepdim=True))
    with pytest.raises(DDMError, match="temperature"):
        make_router(ring, groups, 0.0)


def test_switching_is_unbiased_and_its_variance_is_the_disagreement(ring, gen):
    """E[v_K] = v and E|v_K - v|^2 = sum_k r_k |v_k - v|^2, checked by Monte Carlo on one point."""
    groups = cluster_groups(8, 4)
    experts, router = make_experts(ring, groups), make_router(ring, groups)
    x = torch.tensor([[0.3, 0.1]], dtype=F64).expand(20000, 2).contiguous()
    t = torch.full((20000,), 0.5, dtype=F64)
    draws = routed_velocity(experts, router, parse_strategy("switch"), RoutingState(generator=gen))(x, t)
    v = ring.velocity(x[:1], t[:1])
    variance = float(expert_disagreement(experts, router, x[:1], 0.5))
    assert torch.allclose(draws.mean(0), v[0], atol=4 * (variance / 20000) ** 0.5)
    assert float(((draws - v) ** 2).sum(1).mean()) == pytest.approx(variance, rel=0.05)


def test_sampler_names_are_checked():
    assert parse_sampler("heun:top-2") == ("heun", "top-2")
    with pytest.raises(DDMError, match="euler, heun"):
        parse_sampler("rk4:full")
    with pytest.raises(DDMError, match="routing strategy"):
        parse_sampler("euler:bogus")


@pytest.mark.parametrize("strategy", ["oracle", "nearest", "gated-2@30"])
def test_a_sampler_whose_strategy_needs_more_than_the_router_is_refused_before_the_study(strategy, tmp_path):
    """ConvergenceSettings(samplers=("euler:oracle",)) started the study, made --out, and stopped at the first
    routing with 'needs the cluster proportions (a partition manifest)' (or a map, or the analysis sampler), which
    the study cannot be given."""
    import dataclasses

    from ddmkit.theory.convergence import ConvergenceSettings, run_convergence

    settings = dataclasses.replace(ConvergenceSettings.quick(), samplers=(f"euler:{strategy}",))
    with pytest.raises(DDMError, match=rf"^ConvergenceSettings\.samplers: \('euler:{re.escape(strategy)}',\); give "
                                       r"SOLVER:STRATEGY with a STRATEGY that routes by the router's probabilities "
                                       rf"alone: .*e\.g\. 'euler:switch' \('euler:{re.escape(strategy)}': oracle and "
                                       r"nearest need a run's partition, gated-K@A the analysis sampler\)$"):
        run_convergence(settings, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_expert_error_eps_must_be_finite_and_non_negative(ring):
    groups = cluster_groups(8, 4)
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(DDMError, match=f"eps must be a finite number >= 0; got {bad}"):
            make_experts(ring, groups, eps=bad)
    x, t = torch.zeros(1, 2, dtype=F64), torch.full((1,), 0.5, dtype=F64)
    assert torch.equal(make_experts(ring, groups, eps=0)[0](x, t), ring.subset(groups[0]).velocity(x, t))
