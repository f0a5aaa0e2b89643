"""Exact Gaussian-mixture truth against independent computations."""
import math

import numpy as np
import pytest
import torch

from ddmkit.data.synthetic import anisotropic_mixture, ring_mixture
from ddmkit.errors import DDMError
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
    with pytest.raises(DDMError, match="positive definite"):
        GaussianMixture.from_covariances([1], [[0.0, 0.0]], [[0.0, 1.0]])
    with pytest.raises(DDMError, match="shape"):
        GaussianMixture.from_covariances([1, 1], [[0.0, 0.0]], [1.0])


# ----- against an independent computation: Bayes' rule on scipy densities ---------------------------
def scipy_parts(g: GaussianMixture, x: np.ndarray, t: float):
    """Per-component noised densities N(x; (1-t) mu_k, (1-t)^2 Sigma_k + t^2 I) from scipy, the prior,
    and the Gaussian-conditioning x0 means E[x0 | x_t, k] = mu_k + (1-t) Sigma_k C_k^{-1} (x - (1-t) mu_k)."""
    from scipy.stats import multivariate_normal

    a = 1.0 - t
    weights, means, covs = g.weights.numpy(), g.means.numpy(), g.covariances.numpy()
    eye = np.eye(g.dim)
    log_dens = np.stack([multivariate_normal(a * m, a**2 * c + t**2 * eye).logpdf(x) for m, c in zip(means, covs)], 1)
    x0 = np.stack([m + (a * c @ np.linalg.solve(a**2 * c + t**2 * eye, (x - a * m).T)).T for m, c in zip(means, covs)], 1)
    return weights, log_dens.reshape(len(x), -1), x0


UNEQUAL = GaussianMixture.from_covariances(
    [0.7, 0.2, 0.1], [[0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [-0.5, 1.0, 0.5]],
    [[[0.6, 0.2, 0.0], [0.2, 0.4, 0.1], [0.0, 0.1, 0.3]], [[0.3, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.2]],
     [[0.5, -0.1, 0.0], [-0.1, 0.5, 0.0], [0.0, 0.0, 0.5]]])


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8])
def test_posterior_log_prob_and_x0_mean_match_bayes_rule_on_scipy_densities(t, gen):
    """Unequal weights (0.7, 0.2, 0.1) and overlapping full-covariance components: the posterior is
    pi_k N_k / sum_j pi_j N_j with scipy's densities, not the code's own log-density. A posterior that
    ignores the weights is off by up to the prior ratio 7 here."""
    g = UNEQUAL
    x = g.sample(200, gen) * (1 - t) + t * torch.randn(200, 3, generator=gen, dtype=D)
    weights, log_dens, x0k = scipy_parts(g, x.numpy(), t)
    joint = np.log(weights) + log_dens
    post = np.exp(joint - joint.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    assert np.allclose(g.posterior(x, t).numpy(), post, atol=1e-10)
    assert np.allclose(g.log_prob(x, t).numpy(), np.logaddexp.reduce(joint, 1), atol=1e-10)
    assert np.allclose(g.component_log_prob(x, t).numpy(), log_dens, atol=1e-10)
    x0 = (post[..., None] * x0k).sum(1)  # E[x0 | x_t] = sum_k P(k | x_t) E[x0 | x_t, k]
    assert np.allclose(g.x0_mean(x, t).numpy(), x0, atol=1e-9)
    if t > 0:  # v = (x_t - E[x0 | x_t]) / t on the linear path
        assert np.allclose(g.velocity(x, t).numpy(), (x.numpy() - x0) / t, atol=1e-9)
    # the weights matter here: the posterior of the equal-weight mixture is far from it
    flat = np.exp(log_dens - log_dens.max(1, keepdims=True))
    flat /= flat.sum(1, keepdims=True)
    assert np.abs(flat - post).max() > 0.2


def test_posterior_at_pure_noise_is_the_prior(gen):
    """At t = 1 every noised component is N(0, I): the posterior is the prior pi, whatever x."""
    x = torch.randn(16, 3, generator=gen, dtype=D) * 3
    assert torch.allclose(UNEQUAL.posterior(x, 1.0), UNEQUAL.weights.expand(16, 3), atol=1e-12)
    assert torch.allclose(UNEQUAL.weights, torch.tensor([0.7, 0.2, 0.1], dtype=D))


def test_sample_frequencies_follow_the_weights(gen):
    _, labels = UNEQUAL.sample(20000, gen, return_labels=True)
    freq = torch.bincount(labels, minlength=3).double() / 20000
    assert torch.allclose(freq, UNEQUAL.weights, atol=0.015)


def test_log_prob_defaults_to_the_data_end_and_to_changes_dtype(gen):
    x = torch.randn(8, 3, generator=gen, dtype=D)
    assert torch.equal(UNEQUAL.log_prob(x), UNEQUAL.log_prob(x, 0.0))
    single = UNEQUAL.to(dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in (single.weights, single.means, single.eigvals, single.eigvecs))
    assert UNEQUAL.to().means.dtype == D


def test_lipschitz_bound_is_the_closed_form_and_is_attained_between_two_modes():
    """Two modes N(+-D/2 e1, s2 I): the bound is |t - (1-t) s2| / c + (1-t) t D^2 / (4 c^2), c = (1-t)^2 s2 + t^2,
    for a vector of times; where t <= (1-t) s2 (near the data) it is the Jacobian's norm on the bisector x = 0."""
    d, s2 = 3.0, 0.09
    g = GaussianMixture.from_covariances([1.0, 1.0], [[-d / 2, 0.0], [d / 2, 0.0]], [s2, s2])
    t = torch.tensor([0.02, 0.05, 0.3, 0.7, 0.95], dtype=D)
    a = 1 - t
    c = a**2 * s2 + t**2
    expect = (t - a * s2).abs() / c + a * t * d**2 / (4 * c**2)
    assert torch.allclose(g.velocity_lipschitz_bound(t), expect, rtol=1e-12)
    for ti in (0.02, 0.05):
        jac = g.velocity_jacobian(torch.zeros(1, 2, dtype=D), ti)
        assert float(torch.linalg.matrix_norm(jac, ord=2)) == pytest.approx(float(g.velocity_lipschitz_bound(ti)),
                                                                             rel=1e-10)


def test_zero_samples_are_an_empty_set(gen):
    """n = 0 (a preset with data.n_test = 0) gives empty (0, D) samples and labels, not an error."""
    from ddmkit.data import load_dataset

    train, test = load_dataset("ring8", 16, 0, 0)
    assert len(train) == 16 and test.x.shape == (0, 2) and test.labels.shape == (0,)


# ----- input checks ---------------------------------------------------------------------------------
def standard_pair():
    """Two components N(0, I_2) with weights 1/4, 3/4 (so log p_0(0) = -log(2 pi))."""
    return GaussianMixture.from_covariances([1.0, 3.0], np.zeros((2, 2)), [1.0, 1.0])


def test_direct_constructor_needs_normalised_weights_and_orthonormal_eigvecs():
    g = standard_pair()
    x = torch.zeros(1, 2, dtype=D)
    direct = GaussianMixture(torch.tensor([0.25, 0.75], dtype=D), g.means, g.eigvals, g.eigvecs)
    assert float(direct.log_prob(x)) == float(g.log_prob(x)) == pytest.approx(-math.log(2 * math.pi))
    with pytest.raises(DDMError, match=r"weights must be >= 0 and sum to 1; got sum 4"):
        GaussianMixture(torch.tensor([1.0, 3.0], dtype=D), g.means, g.eigvals, g.eigvecs)
    with pytest.raises(DDMError, match="eigvecs must be orthonormal"):
        GaussianMixture(g.weights, g.means, g.eigvals, 2 * g.eigvecs)
    c, s = math.cos(0.3), math.sin(0.3)  # a rotation is orthonormal
    rotation = torch.tensor([[c, -s], [s, c]], dtype=D).expand(2, 2, 2)
    assert float(GaussianMixture(g.weights, g.means, g.eigvals, rotation).log_prob(x)) == pytest.approx(
        -math.log(2 * math.pi))
    with pytest.raises(DDMError, match=r"eigvals must have shape \(2, 2\)"):
        GaussianMixture(g.weights, g.means, g.eigvals[:, :1], g.eigvecs)
    with pytest.raises(DDMError, match="means must be finite"):
        GaussianMixture(g.weights, g.means + math.nan, g.eigvals, g.eigvecs)


@pytest.mark.parametrize("field, weights, means, covs", [
    ("means", [1.0, 1.0], [[math.nan, 0.0], [0.0, 0.0]], [1.0, 1.0]),
    ("covs", [1.0, 1.0], [[0.0, 0.0], [1.0, 0.0]], [math.nan, 0.2]),
    ("weights", [math.inf, 0.7], [[0.0, 0.0], [1.0, 0.0]], [1.0, 0.2]),
])
def test_from_covariances_refuses_non_finite_numbers(field, weights, means, covs):
    with pytest.raises(DDMError, match=f"^{field} must be finite"):
        GaussianMixture.from_covariances(weights, means, covs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex128, "float32"])
def test_from_covariances_refuses_a_dtype_that_is_not_a_float_naming_dtype(dtype):
    """dtype=torch.int64 truncated variances of 0.1 to 0 and was answered 'covs must be positive definite; the
    smallest eigenvalue is 0', a fault of the covariances they do not have."""
    with pytest.raises(DDMError, match=r"^dtype must be a floating-point torch dtype \(torch.float64"):
        GaussianMixture.from_covariances([1.0, 1.0], [[0.0, 0.0], [2.0, 0.0]], [0.1, 0.2], dtype=dtype)
    single = GaussianMixture.from_covariances([1.0], [[0.0, 0.0]], [0.1], dtype=torch.float32)
    assert single.means.dtype == torch.float32


def test_wrong_shapes_are_named():
    g = standard_pair()
    with pytest.raises(DDMError, match=r"x must have shape \(B, 2\).*got \(3, 3\)"):
        g.velocity(torch.zeros(3, 3, dtype=D), 0.5)
    with pytest.raises(DDMError, match=r"x must have shape \(B, 2\).*got \(2,\)"):
        g.posterior(torch.zeros(2, dtype=D), 0.5)
    with pytest.raises(DDMError, match=r"t must be a number or of shape \(3,\).*got shape \(3, 1\)"):
        g.velocity(torch.zeros(3, 2, dtype=D), torch.full((3, 1), 0.5, dtype=D))
    with pytest.raises(DDMError, match=r"n \(the number of samples\) must be an integer >= 0; got 2.5"):
        g.sample(2.5)
    with pytest.raises(DDMError, match=r"idx must be a list of component indices in 0 \.\. 1; got \[5\]"):
        g.subset([5])
    assert g.subset([1]).weights.tolist() == [1.0] and g.sample(np.int64(3)).shape == (3, 2)


def test_t_must_be_finite_and_at_most_one_and_the_ends_are_exact():
    g = GaussianMixture.from_covariances([1.0], [[1.0, -2.0]], [1.0])  # N(mu, I): v(x, t) = x - mu at t = 1
    x = torch.tensor([[0.5, 0.5]], dtype=D)
    for bad in (1.5, 1 + 1e-12, math.nan, math.inf, -math.inf):
        with pytest.raises(DDMError, match=r"t must be finite and <= 1"):
            g.velocity(x, bad)
    with pytest.raises(DDMError, match=r"t must be finite and <= 1"):
        g.posterior(x.expand(2, 2), torch.tensor([0.5, 2.0], dtype=D))
    assert g.velocity(x, 1.0).tolist() == [[-0.5, 2.5]]
    assert g.velocity(x, 0.0).tolist() == [[-0.5, -0.5]]  # v = E[eps] - x = -x at the data end
    # t < 0 stays accepted: an adaptive solver of the user's may step past the data end and interpolate back
    # (ddmkit's ends its last step at t = 0). For N(0, I) data, v = (s - a) / (a^2 + s^2) x; at t = -0.1:
    # -1.2 / 1.22 x.
    z = GaussianMixture.from_covariances([1.0], [[0.0, 0.0]], [1.0])
    assert torch.allclose(z.velocity(x, -0.1), -1.2 / 1.22 * x)
    seen = []
    sample_adaptive(lambda y, t: seen.append(float(t.min())) or g.velocity(y, t), torch.zeros(4, 2, dtype=D),
                    time_grid(4, dtype=D))
    assert min(seen) >= 0


def test_x_of_another_kind_than_the_mixtures_floats_is_refused_naming_x():
    """An integer x made t an integer (the t = 0 velocity whatever t); a float64 x met a float32 mixture in
    a raw RuntimeError; a list or numpy array was an AttributeError or TypeError."""
    g = GaussianMixture.from_covariances([0.5, 0.5], [[0, 0], [3, 0]], [0.2, 0.2]).to(torch.float32)
    for x, said in ((torch.tensor([[1, 0], [2, 0]]), "x must be floating point; got torch.int64"),
                    (torch.zeros(2, 2, dtype=torch.float64), r"x is torch.float64 and the mixture torch.float32"),
                    ([[1.0, 0.5]], "x must be a torch tensor"), (np.zeros((2, 2)), "x must be a torch tensor")):
        with pytest.raises(DDMError, match=said):
            g.velocity(x, 0.5)
    for t in ("0.5", None):
        with pytest.raises(DDMError, match="t must be a number or a tensor"):
            g.velocity(torch.zeros(2, 2), t)
    assert torch.allclose(g.to(torch.float64).velocity(torch.tensor([[1.0, 0.0]], dtype=torch.float64), 0.5),
                          g.velocity(torch.tensor([[1.0, 0.0]]), 0.5).double(), atol=1e-6)


def test_a_mixture_moves_like_a_tensor():
    """mixture.to("cpu") was a TypeError: the device was taken for the dtype."""
    g = GaussianMixture.from_covariances([0.5, 0.5], [[0, 0], [3, 0]], [0.2, 0.2])
    assert g.to("cpu").means.dtype == g.means.dtype
    assert g.to("cpu", torch.float32).means.dtype == torch.float32 == g.to(torch.float32).means.dtype
    assert g.to(device="cpu", dtype=torch.float16).means.dtype == torch.float16


def test_a_dtype_given_as_a_string_is_refused_naming_the_torch_dtype():
    """mixture.to("float32") raised torch's "Invalid device string": a string is a device, as for a tensor."""
    g = GaussianMixture.from_covariances([0.5, 0.5], [[0, 0], [3, 0]], [0.2, 0.2])
    with pytest.raises(DDMError, match=r"to\('float32'\): a string names a device .* "
                                       r"e\.g\. mixture\.to\(torch\.float32\)"):
        g.to("float32")
    with pytest.raises(DDMError, match=r"dtype must be a torch dtype, e\.g\. dtype=torch\.float64; got 'float64'"):
        g.to(dtype="float64")
