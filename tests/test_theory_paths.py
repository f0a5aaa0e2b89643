"""The exact fields of the theory studies against independent computations."""
import math

import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.theory.distill import two_modes
from ddmkit.theory.paths import get_path, ou_to_linear, score_hessian
from ddmkit.theory.stability import teacher_solve
from ddmkit.truth import GaussianMixture

F64 = torch.float64


def finite_difference_jacobian(f, x, h=1e-6):
    """d f / d x by central differences, (B, d, d)."""
    cols = [(f(x + h * e) - f(x - h * e)) / (2 * h) for e in torch.eye(x.shape[1], dtype=x.dtype)]
    return torch.stack(cols, dim=-1)


@pytest.fixture
def full_cov_mixture():
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.05, 0.0], [0.0, 0.4]], [[0.2, -0.05], [-0.05, 0.1]]])
    return GaussianMixture.from_covariances([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 0.0], [0.0, -1.5]], covs)


@pytest.mark.parametrize("name,t", [("linear", 0.05), ("linear", 0.6), ("ou", 0.02), ("ou", 1.3)])
def test_velocity_jacobian_matches_finite_differences(full_cov_mixture, name, t, gen):
    path = get_path(name)
    x = torch.randn(16, 2, generator=gen, dtype=F64)
    exact = path.jacobian(full_cov_mixture, x, t)
    numeric = finite_difference_jacobian(lambda y: path.velocity(full_cov_mixture, y, t), x)
    assert torch.allclose(exact, numeric, atol=1e-6, rtol=1e-6)


def test_score_hessian_matches_finite_differences(full_cov_mixture, gen):
    x = torch.randn(16, 2, generator=gen, dtype=F64)
    numeric = finite_difference_jacobian(lambda y: full_cov_mixture.score(y, 0.3), x)
    assert torch.allclose(score_hessian(full_cov_mixture, x, 0.3), numeric, atol=1e-6, rtol=1e-6)


def test_ou_velocity_of_one_gaussian_is_closed_form(gen):
    """Data N(0, s2 I): p_tau = N(0, (alpha^2 s2 + 1 - alpha^2) I), velocity -x + x / var."""
    s2, tau = 0.3, 0.7
    gmm = GaussianMixture.from_covariances([1.0], [[0.0, 0.0]], [s2])
    x = torch.randn(8, 2, generator=gen, dtype=F64)
    alpha2 = math.exp(-2 * tau)
    var = alpha2 * s2 + 1 - alpha2
    assert torch.allclose(get_path("ou").velocity(gmm, x, tau), -x + x / var, atol=1e-12)


def test_ou_and_linear_odes_trace_the_same_curves(gen):
    """x_tau(tau) = c(tau) x_t(t(tau)): the OU flow is a rescaled linear flow."""
    gmm = two_modes(2.0, 0.3)
    taus = torch.tensor([2.0, 0.5, 0.0], dtype=F64)
    c, t = ou_to_linear(taus)
    x_lin = teacher_solve(get_path("linear"), gmm, torch.randn(64, 2, generator=gen, dtype=F64) * 0.7, torch.cat(
        [torch.tensor([1.0], dtype=F64), t]), tol=1e-10)[1:]
    x_ou = teacher_solve(get_path("ou"), gmm, c[0] * x_lin[0], taus, tol=1e-10)
    assert torch.allclose(x_ou, c[:, None, None] * x_lin, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "ou"])
def test_lipschitz_bound_is_attained_between_two_modes(name):
    """With two modes the posterior is 1/2 each on the bisector, Cov_w(mu) = D^2/4 e e^T,
    so ||dv/dx|| there equals the bound."""
    gmm = two_modes(3.0, 0.4)
    path = get_path(name)
    for t in (0.05, 0.2, 0.5):
        measured = torch.linalg.matrix_norm(path.jacobian(gmm, torch.zeros(1, 2, dtype=F64), t), ord=2)
        assert float(measured) == pytest.approx(float(path.lipschitz_bound(gmm, torch.tensor(t, dtype=F64))), rel=1e-9)


@pytest.mark.parametrize("name", ["linear", "ou"])
def test_lipschitz_bound_holds_everywhere(name, gen):
    gmm = GaussianMixture.from_covariances([1.0, 1.0, 2.0], [[-1.0, 0.0], [1.5, 0.5], [0.0, 2.0]], [0.1, 0.1, 0.1])
    path = get_path(name)
    x = 3 * torch.randn(256, 2, generator=gen, dtype=F64)
    for t in (0.0, 0.03, 0.1, 0.4, 0.9):
        norms = torch.linalg.matrix_norm(path.jacobian(gmm, x, t), ord=2)
        assert float(norms.max()) <= float(path.lipschitz_bound(gmm, torch.tensor(t, dtype=F64))) * (1 + 1e-9)


def test_linear_bound_is_no_looser_than_the_truth_module():
    gmm = two_modes(2.0, 0.25)
    t = torch.linspace(0.0, 1.0, 50, dtype=F64)
    assert (get_path("linear").lipschitz_bound(gmm, t) <= gmm.velocity_lipschitz_bound(t) + 1e-12).all()


def test_bad_path_and_covariance_are_user_errors():
    with pytest.raises(DDMError, match="linear"):
        get_path("vp")
    gmm = GaussianMixture.from_covariances([1.0, 1.0], [[0.0, 0.0], [1.0, 0.0]], [[0.1, 0.2], [0.1, 0.2]])
    with pytest.raises(DDMError, match="isotropic"):
        get_path("linear").lipschitz_bound(gmm, torch.tensor(0.5))
