"""Solvers on an ODE with a known solution: dx/dt = A x, x(1) = x1, so x(0) = exp(-A) x1."""
import math

import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.sample import SOLVERS, get_solver, time_grid

A = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=torch.float64)


def field(x, t):
    return x @ A.T


def exact(x1):
    return x1 @ torch.linalg.matrix_exp(-A).T


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)])
def test_convergence_order(name, order):
    x1 = torch.tensor([[1.0, -2.0], [0.5, 0.3]], dtype=torch.float64)
    errs = []
    for steps in (16, 32, 64):
        x0 = get_solver(name)(field, x1, time_grid(steps, dtype=torch.float64))
        errs.append(float((x0 - exact(x1)).norm()))
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.25 for r in rates), rates


def test_adaptive_is_accurate():
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    x0 = get_solver("adaptive")(field, x1, time_grid(1, dtype=torch.float64))
    assert torch.allclose(x0, exact(x1), atol=1e-4)


def test_adaptive_never_evaluates_the_field_past_the_end_of_the_grid():
    """dopri5 stepped past t = 0 (to t = -0.37 on one run) and interpolated back: networks trained on
    [0, 1] were called outside it. Its last step ends at t = 0 exactly, and the answer is as accurate."""
    seen = []

    def recorded(x, t):
        seen.append(float(t.min()))
        return field(x, t) * 3.0  # a faster field: larger steps, one of which overshot

    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    x0 = get_solver("adaptive")(recorded, x1, time_grid(1, dtype=torch.float64))
    assert min(seen) >= 0.0, min(seen)
    assert torch.allclose(x0, x1 @ torch.linalg.matrix_exp(-3 * A).T, atol=1e-4)


def test_grid_and_callback():
    ts = time_grid(10, "cosine")
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0 and bool((ts[1:] < ts[:-1]).all())
    seen = []
    get_solver("heun")(field, torch.ones(1, 2, dtype=torch.float64), time_grid(5, dtype=torch.float64),
                       callback=lambda d: seen.append(float(d["t"])))
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_unknown_solver():
    with pytest.raises(DDMError, match="euler"):
        get_solver("leapfrog")
    assert set(SOLVERS) >= {"euler", "heun", "midpoint", "rk4", "adaptive"}


@pytest.mark.parametrize("name", ["euler", "heun", "midpoint", "rk4"])
def test_a_grid_on_the_cpu_gives_times_on_the_states_device(name):
    """A time grid made on the CPU and states on another device (on a GPU: cuda; here the meta device):
    the field gets t on x's device and in x's dtype at every call."""
    calls = []

    def on_device(x, t):
        calls.append((t.device, t.dtype) == (x.device, x.dtype))
        return -x

    get_solver(name)(on_device, torch.zeros(4, 2, device="meta"), time_grid(3))
    assert calls and all(calls)


def test_a_grid_that_is_not_a_decreasing_tensor_is_refused():
    """An increasing grid integrated from data to noise, silently; a list was an AttributeError; time_grid(0)
    and evaluations_per_step('rk5') were a ValueError and a KeyError."""
    from ddmkit.sample import evaluations_per_step, sample_euler
    v, x = (lambda x, t: -x), torch.ones(3, 2)
    for grid, said in ((time_grid(4).flip(0), "the times must decrease"), ([1.0, 0.5, 0.0], "got list"),
                       (torch.ones(1), r"got shape \(1,\)")):
        with pytest.raises(DDMError, match=f"ts: .*{said}"):
            sample_euler(v, x, grid)
    for call, said in ((lambda: time_grid(0), "steps must be an integer >= 1, got 0"),
                       (lambda: time_grid(2.5), "got 2.5"), (lambda: evaluations_per_step("rk5"), "got 'rk5'")):
        with pytest.raises(DDMError, match=said):
            call()
    assert torch.allclose(sample_euler(v, x, time_grid(4)), x * 1.25 ** 4)  # x' = -x backwards: x grows


def test_the_path_takes_one_time_for_every_row_and_names_a_bad_prediction():
    """noise(x, 0.5, eps) was an AttributeError; target_for('v', ...) a ValueError."""
    from ddmkit.flow import noise, target_for
    x, eps = torch.ones(3, 2), torch.zeros(3, 2)
    assert torch.equal(noise(x, 0.5, eps), noise(x, torch.full((3,), 0.5), eps))
    with pytest.raises(DDMError, match="prediction must be one of"):
        target_for("v", x, eps)
