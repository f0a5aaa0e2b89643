"""L(t), Lambda(t), Lambda grids and the teacher, against known answers."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from ddmkit.errors import DDMError
from ddmkit.theory.distill import (DistillSettings, lambda_of_bound, make_grids, stability_profile, two_modes,
                                   union_times)
from ddmkit.theory.paths import get_path
from ddmkit.theory.stability import (cumulative_lambda, lambda_uniform_grid, measured_lipschitz, report_times,
                                     teacher_solve, uniform_grid)
from ddmkit.truth import GaussianMixture

F64 = torch.float64


def test_lambda_of_standard_normal_data_is_log_two():
    """Data N(0, I): dv/dx = (2t - 1) / ((1 - t)^2 + t^2) I, whose |.| integrates to ln 2 on [0, 1]."""
    gmm = GaussianMixture.from_covariances([1.0], [[0.0, 0.0]], [1.0])
    t = torch.linspace(1.0, 0.0, 20001, dtype=F64)
    lam = cumulative_lambda(t, get_path("linear").lipschitz_bound(gmm, t))
    assert float(lam[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(lam[-1]) == 0.0


@pytest.mark.parametrize("name", ["linear", "ou"])
def test_cumulative_lambda_matches_quadrature(name):
    gmm = two_modes(2.0, 0.3)
    path = get_path(name)
    times = report_times(path, 4001)
    lam = cumulative_lambda(times, path.lipschitz_bound(gmm, times))

    def bound(u):
        return float(path.lipschitz_bound(gmm, torch.tensor(u, dtype=F64)))

    for i in (0, 1000, 3000):
        exact, _ = quad(bound, 0.0, float(times[i]), limit=400, points=[0.09] if name == "linear" else None)
        assert float(lam[i]) == pytest.approx(exact, rel=2e-4)


@pytest.mark.parametrize("name", ["linear", "ou"])
def test_the_reports_lambda_of_the_bound_matches_quadrature_on_its_coarse_grid(name):
    """The distillation report tabulates Lambda of the bound on its 121 (--quick: 61) times; the OU bound is so
    steep near the data end (L(0) = 4033 at D / sigma = 16) that the trapezoid on those times overstated
    Lambda(T) by 1.2% (30.48 against 30.11): it is integrated on a finer grid holding them."""
    gmm, path = two_modes(2.0, 0.125), get_path(name)
    for points in (61, 121):
        times = report_times(path, points)
        lam = lambda_of_bound(path, gmm, points)
        assert lam.shape == times.shape

        def bound(u):
            return float(path.lipschitz_bound(gmm, torch.tensor(u, dtype=F64)))

        for i in (0, points // 2):
            exact, _ = quad(bound, 0.0, float(times[i]), limit=800, points=[0.01, 0.07] if name == "linear" else None)
            assert float(lam[i]) == pytest.approx(exact, rel=1e-3)


def test_lambda_of_separated_modes_approaches_d2_over_8_sigma2():
    """The covariance term integrates to D^2 / (8 sigma^2) when D >> sigma (docs/theory.md)."""
    d, s = 8.0, 0.1
    for name in ("linear", "ou"):
        path = get_path(name)
        t = report_times(path, 20001)
        total = float(cumulative_lambda(t, path.lipschitz_bound(two_modes(d, s), t))[0])
        assert total == pytest.approx(d**2 / (8 * s**2), rel=0.05)


def test_lambda_grid_has_equal_lambda_steps():
    t = torch.linspace(1.0, 0.0, 2001, dtype=F64)
    lipschitz = 1.0 / (0.01 + t)  # Lambda(t) = log((0.01 + t) / 0.01)
    lam = cumulative_lambda(t, lipschitz)
    grid = lambda_uniform_grid(t, lam, 4)
    exact = np.log((0.01 + grid.numpy()) / 0.01)
    assert np.allclose(np.diff(exact), -exact[0] / 4, rtol=1e-3)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and (grid[1:] < grid[:-1]).all()


def test_report_times_are_uniform_in_sqrt_t():
    assert torch.allclose(report_times(get_path("ou", 4.0), 5), 4.0 * torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0],
                                                                                   dtype=F64))


def test_uniform_grid_and_union_of_grids():
    path = get_path("ou", 4.0)
    assert torch.allclose(uniform_grid(path, 4), torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=F64))
    union = union_times({"a": {1: uniform_grid(path, 1), 2: uniform_grid(path, 2)}, "b": {2: torch.tensor([4.0, 1.5, 0.0], dtype=F64)}})
    assert union.tolist() == [4.0, 2.0, 1.5, 0.0]


def test_teacher_flow_of_one_gaussian_is_linear(gen):
    """Data N(m, s2 I): the probability-flow map is x_t = a m + sqrt(a^2 s2 + t^2) x_1."""
    m, s2 = torch.tensor([1.0, -0.5], dtype=F64), 0.2
    gmm = GaussianMixture.from_covariances([1.0], m[None], [s2])
    times = torch.tensor([1.0, 0.6, 0.1, 0.0], dtype=F64)
    x1 = torch.randn(32, 2, generator=gen, dtype=F64)
    states = teacher_solve(get_path("linear"), gmm, x1, times, tol=1e-10)
    for x, t in zip(states, times):
        a = 1 - t
        assert torch.allclose(x, a * m + torch.sqrt(a**2 * s2 + t**2) * x1, atol=1e-7)


def test_teacher_default_tolerance_is_tight(gen):
    """The teacher of the distillation study (default tolerance 1e-8) on the closed-form flow of one Gaussian."""
    m, s2 = torch.tensor([1.0, -0.5], dtype=F64), 0.05
    gmm = GaussianMixture.from_covariances([1.0], m[None], [s2])
    x1 = torch.randn(16, 2, generator=gen, dtype=F64)
    final = teacher_solve(get_path("linear"), gmm, x1, torch.tensor([1.0, 0.0], dtype=F64))[-1]
    assert torch.allclose(final, m + s2**0.5 * x1, atol=1e-6)


def test_measured_lipschitz_of_one_gaussian_is_the_bound(gen):
    gmm = GaussianMixture.from_covariances([1.0], [[0.0, 0.0]], [0.3])
    path = get_path("linear")
    times = torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=F64)
    states = teacher_solve(path, gmm, torch.randn(8, 2, generator=gen, dtype=F64), times)
    measured = measured_lipschitz(path, gmm, states, times)
    assert torch.allclose(measured["mean"], path.lipschitz_bound(gmm, times))
    assert torch.allclose(measured["max"], measured["mean"])


def test_distillation_grids_are_uniform_in_the_profile_lambda():
    """make_grids on a profile with a known Lambda (L = 1 / (0.01 + t), Lambda = log((0.01 + t) / 0.01)):
    the Lambda grid has equal steps of that Lambda and is not the uniform grid (its last segment, at the
    stiff data end, is about 250 times shorter)."""
    path = get_path("linear")
    t = report_times(path, 4001)
    profile = {"times": t, "lambda_mean": cumulative_lambda(t, 1.0 / (0.01 + t))}
    grids = make_grids(path, profile, (1, 4))
    assert torch.allclose(grids["uniform"][4], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    assert grids["lambda"][1].tolist() == [1.0, 0.0]
    exact = np.log((0.01 + grids["lambda"][4].numpy()) / 0.01)
    assert np.allclose(np.diff(exact), -math.log(101) / 4, rtol=1e-4)
    expect = 0.01 * (101.0 ** (np.arange(4, -1, -1) / 4) - 1)  # the inverse of Lambda at equal steps
    assert np.allclose(grids["lambda"][4].numpy(), expect, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "ou"])
def test_distillation_lambda_grid_of_two_stiff_modes_crowds_the_data_end(name):
    """On two modes with D / sigma = 8 the study's Lambda grid has equal steps of the measured mean
    Lambda (not of the bound) and is not the uniform grid; on the OU path (uniform in tau in [0, 4])
    it puts its last segment far closer to the data end."""
    path = get_path(name, 4.0)
    s = DistillSettings(lipschitz_trajectories=32, lipschitz_times=41)
    profile = stability_profile(path, two_modes(2.0, 0.25), s, torch.Generator().manual_seed(0))
    grids = make_grids(path, profile, (4,))
    t, lam = profile["times"].numpy()[::-1], profile["lambda_mean"].numpy()[::-1]
    steps = np.diff(np.interp(grids["lambda"][4].numpy(), t, lam))
    assert np.allclose(steps, steps[0], rtol=1e-6) and steps[0] < 0
    bound_steps = np.diff(np.interp(grids["lambda"][4].numpy(), t, profile["lambda_bound"].numpy()[::-1]))
    assert not np.allclose(bound_steps, bound_steps[0], rtol=0.05)
    assert float((grids["lambda"][4] - grids["uniform"][4]).abs().max()) > 0.05
    if name == "ou":
        assert float(grids["lambda"][4][-2]) < 0.1 * float(grids["uniform"][4][-2])


def test_cumulative_lambda_on_a_grid_that_stops_short_of_zero():
    """Lambda(t) = integral_0^t L: with L = 1 it is t itself, whether or not the grid reaches 0 (below
    the grid L is held at its value at the smallest time)."""
    assert cumulative_lambda(torch.tensor([1.0, 0.5, 0.2]), torch.ones(3)).tolist() == pytest.approx([1.0, 0.5, 0.2])
    assert cumulative_lambda(torch.tensor([0.2, 0.5, 1.0]), torch.ones(3)).tolist() == pytest.approx([0.2, 0.5, 1.0])
    assert cumulative_lambda(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([3.0, 1.0, 2.0])).tolist() == pytest.approx(
        [1.0 + 0.45 + 0.4, 0.45 + 0.4, 0.4])
    # a grid that reaches 0 is the plain trapezoid rule, unchanged: trapezoids 1.0 and 0.5
    assert cumulative_lambda(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, 1.0])).tolist() == [1.5, 0.5, 0.0]


def test_lambda_uniform_grid_needs_at_least_one_segment():
    t = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    assert lambda_uniform_grid(t, t, 1).tolist() == [1.0, 0.0]
    for bad in (0, -1):
        with pytest.raises(DDMError, match=f"segments must be >= 1.*got {bad}"):
            lambda_uniform_grid(t, t, bad)
