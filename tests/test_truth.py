"""Exact Gaussian-mixture truth against independent computations."""
import math

import numpy as np
import pytest
import torch

from ddmkit.data.synthetic import anisotropic_mixture, ring_mixture
from ddmkit.evaluation import w2_exact
from ddmkit.sample import sample_adaptive, time_grid
from ddmkit.truth import GaussianMixture

D = torch.float64


def mixtures():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 3, 3))
    full = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(3)
    return {
        "isotropic": GaussianMixture.from_covariances([1, 2, 3], rng.normal(size=(3, 3)), [0.2, 0.5, 1.0]),
        "diagonal": GaussianMixture.from_covariances([1, 1, 2], rng.normal(size=(3, 3)), rng.uniform(0.1, 1, (3, 3))),
        "full": GaussianMixture.from_covariances([2, 1, 1], 2 * rng.normal(size=(3, 3)), full),
    }


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("t", [0.0, 0.2, 0.7, 1.0])
def test_velocity_is_posterior_weighted_sum(kind, t, gen):
    g = mixtures()[kind]
    x = torch.randn(64, 3, generator=gen, dtype=D) * 2
    w, vk = g.posterior(x, t), g.component_velocities(x, t)
    assert torch.allclose(w.sum(1), torch.ones(64, dtype=D))
    assert torch.allclose(g.velocity(x, t), (w[..., None] * vk).sum(1), atol=1e-12)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
def test_velocity_matches_autograd_score(kind, t, gen):
    """v = -(x + t score) / (1 - t) on the linear path, score = grad log p_t by autograd."""
    g = mixtures()[kind]
    x = (torch.randn(32, 3, generator=gen, dtype=D) * 2).requires_grad_()
    score, = torch.autograd.grad(g.log_prob(x, t).sum(), x)
    assert torch.allclose(score, g.score(x.detach(), t), atol=1e-10)
    v = g.velocity(x.detach(), t)
    assert torch.allclose(v, -(x.detach() + t * score) / (1 - t), atol=1e-9)


def test_component_velocity_is_conditional_expectation(gen):
    """Monte Carlo: E[eps - x | x_t in a small ball] ~ v(x_t) for a single Gaussian (closed form check)."""
    g = GaussianMixture.from_covariances([1.0], [[1.0, -2.0]], [[[0.5, 0.2], [0.2, 0.3]]])
    t = 0.5
    x0 = g.sample(400_000, gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=D)
    xt = (1 - t) * x0 + t * eps
    target = eps - x0
    # For a Gaussian, E[eps - x | x_t] is affine in x_t: fit it by least squares and compare.
    design = torch.cat([xt, torch.ones(len(xt), 1, dtype=D)], 1)
    coef = torch.linalg.lstsq(design, target).solution
    probe = torch.tensor([[0.3, -1.0], [0.8, -0.4]], dtype=D)
    fitted = torch.cat([probe, torch.ones(2, 1, dtype=D)], 1) @ coef
    assert torch.allclose(fitted, g.velocity(probe, t), atol=0.01)


def test_marginal_at_t1_is_standard_normal(gen):
    g = mixtures()["full"]
    x = torch.randn(16, 3, generator=gen, dtype=D)
    expect = -0.5 * (x**2).sum(1) - 1.5 * math.log(2 * math.pi)
    assert torch.allclose(g.log_prob(x, 1.0), expect, atol=1e-12)


def test_covariance_forms_agree(gen):
    means = [[0.0, 1.0], [1.0, -1.0]]
    iso = GaussianMixture.from_covariances([1, 1], means, [0.3, 0.5])
    diag = GaussianMixture.from_covariances([1, 1], means, [[0.3, 0.3], [0.5, 0.5]])
    full = GaussianMixture.from_covariances([1, 1], means, [np.eye(2) * 0.3, np.eye(2) * 0.5])
    x = torch.randn(10, 2, generator=gen, dtype=D)
    for other in (diag, full):
        assert torch.allclose(iso.velocity(x, 0.3), other.velocity(x, 0.3), atol=1e-12)
        assert torch.allclose(iso.log_prob(x, 0.3), other.log_prob(x, 0.3), atol=1e-12)


def test_jacobian_closed_form_matches_autograd(gen):
    g = mixtures()["full"]
    x = torch.randn(4, 3, generator=gen, dtype=D)
    t = torch.full((4,), 0.3, dtype=D)
    closed = g.velocity_jacobian(x, t)
    for i in range(4):
        auto = torch.autograd.functional.jacobian(lambda y: g.velocity(y[None], t[:1])[0], x[i])
        assert torch.allclose(closed[i], auto, atol=1e-10)


def test_lipschitz_bound_holds_for_equal_isotropic_modes(gen):
    g = ring_mixture(k=4, radius=2.0, std=0.3)
    for t in (0.05, 0.2, 0.5, 0.9):
        x = (1 - t) * g.sample(256, gen) + t * torch.randn(256, 2, generator=gen, dtype=D)
        norms = torch.linalg.matrix_norm(g.velocity_jacobian(x, t), ord=2)
        assert float(norms.max()) <= float(g.velocity_lipschitz_bound(t)) + 1e-9


def test_exact_ode_reproduces_the_mixture(gen):
    """Integrating the exact velocity from noise gives samples at the W2 sampling floor."""
    g = ring_mixture()
    n, r = 500, 4
    z = torch.randn(n * r, 2, generator=gen, dtype=D)
    x = sample_adaptive(g.velocity, z, time_grid(1, dtype=D))
    refs = [g.sample(n, gen) for _ in range(r)]
    trues = [g.sample(n, gen) for _ in range(r)]
    model = sum(w2_exact(x[i * n:(i + 1) * n], refs[i]) for i in range(r)) / r
    floor = sum(w2_exact(trues[i], refs[i]) for i in range(r)) / r
    assert model < 1.25 * floor
    # and a visibly wrong sampler (the global velocity at t=1 frozen) is far above the floor
    wrong = z + (-1.0) * g.velocity(z, 1.0)
    assert sum(w2_exact(wrong[i * n:(i + 1) * n], refs[i]) for i in range(r)) / r > 3 * floor


def test_subset_and_high_dim_preset(gen):
    g = anisotropic_mixture()
    assert g.dim == 32 and g.k == 8
    assert torch.allclose(g.weights, torch.arange(1, 9, dtype=D) / 36)
    sub = g.subset([0, 3])
    assert torch.allclose(sub.weights, torch.tensor([1 / 5, 4 / 5], dtype=D))
    x = g.sample(8, gen)
    assert torch.isfinite(g.velocity(x, 0.0)).all() and torch.isfinite(g.velocity(x, 1.0)).all()


def test_bad_covariances_are_refused():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture.from_covariances([1], [[0.0, 0.0]], [[0.0, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture.from_covariances([1, 1], [[0.0, 0.0]], [1.0])
