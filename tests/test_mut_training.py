"""Known-answer tests of the sampler, path, loss, training-loop and evaluation math, each written against a
mutant that the other tests let through: closed forms, exact recurrences, and a resumed run that must equal an
uninterrupted one bit for bit."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddmkit.config import TrainConfig
from ddmkit.errors import DDMError
from ddmkit.evaluation import mmd_rbf, mode_coverage, nll, off_manifold_rate, w2_sliced
from ddmkit.flow import flow_matching_loss, router_loss, to_velocity
from ddmkit.flow.path import conversion_time
from ddmkit.sample import evaluations_per_step, get_solver, sample_euler, time_grid
from ddmkit.train import fit
from ddmkit.train.loop import EMA
from ddmkit.truth import GaussianMixture

F64 = torch.float64


# ---------------------------------------------------------------- solvers (t = 1 noise -> t = 0 data)

def test_the_cosine_grid_is_one_minus_half_a_cosine_period():
    """t_k = 1 - (1 - cos(pi k / n)) / 2: denser near both ends, not just increasing."""
    ts = time_grid(4, "cosine", dtype=F64)
    want = [1 - (1 - math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    assert ts.tolist() == pytest.approx(want, abs=1e-12)


def test_a_grid_that_repeats_a_time_is_refused():
    with pytest.raises(DDMError, match="the times must decrease"):
        sample_euler(lambda x, t: -x, torch.ones(2, 1), torch.tensor([1.0, 0.5, 0.5, 0.0]))


def test_the_callback_reports_each_steps_start_state_of_eulers_closed_form():
    """v = a x from x1 over n uniform steps: Euler's iterate after i steps is x1 (1 - a / n)^i, and step i
    reports t = 1 - i / n, t_next = 1 - (i + 1) / n, that state and v = a x there."""
    a, n = 0.5, 4
    x1 = torch.tensor([[1.0, -2.0]], dtype=F64)
    seen = []
    out = sample_euler(lambda x, t: a * x, x1, time_grid(n, dtype=F64), callback=seen.append)
    assert torch.allclose(out, x1 * (1 - a / n) ** n, atol=1e-14)
    assert [d["i"] for d in seen] == list(range(n))
    for i, d in enumerate(seen):
        assert float(d["t"]) == pytest.approx(1 - i / n) and float(d["t_next"]) == pytest.approx(1 - (i + 1) / n)
        assert torch.allclose(d["x"], x1 * (1 - a / n) ** i, atol=1e-14)
        assert torch.allclose(d["v"], a * d["x"], atol=1e-14)


@pytest.mark.parametrize("name,times", [("euler", [1.0]), ("heun", [1.0, 0.0]), ("midpoint", [1.0, 0.5]),
                                        ("rk4", [1.0, 0.5, 0.5, 0.0])])
def test_each_solver_evaluates_the_field_at_its_own_times_and_count(name, times):
    """One step from t = 1 to 0: the named solver evaluates at its tableau's times, evaluations_per_step of them;
    over 3 steps it makes 3 times as many."""
    seen = []

    def field(x, t):
        seen.append(float(t[0]))
        return -x

    get_solver(name)(field, torch.ones(2, 1, dtype=F64), time_grid(1, dtype=F64))
    assert seen == pytest.approx(times) and evaluations_per_step(name) == len(times)
    seen.clear()
    get_solver(name)(field, torch.ones(2, 1, dtype=F64), time_grid(3, dtype=F64))
    assert len(seen) == 3 * evaluations_per_step(name)


# ---------------------------------------------------------------- path conversions

def test_an_eps_or_x0_network_is_converted_t_eps_one_hundredth_from_its_singular_end():
    """The default T_EPS is 0.01: an eps network at t = 1 is taken at t = 0.99, v = (eps - x_t) / 0.01; an x0
    network at t = 0 at t = 0.01, v = (x_t - x0) / 0.01."""
    ends = torch.tensor([1.0, 0.0], dtype=F64)
    assert conversion_time("epsilon", ends).tolist() == pytest.approx([0.99, 0.0], abs=1e-15)
    assert conversion_time("x0", ends).tolist() == pytest.approx([1.0, 0.01], abs=1e-15)
    x_t, pred = torch.tensor([[1.0], [1.0]], dtype=F64), torch.tensor([[3.0], [3.0]], dtype=F64)
    assert to_velocity(pred, "epsilon", x_t, ends)[0].item() == pytest.approx(200.0)
    assert to_velocity(pred, "x0", x_t, ends)[1].item() == pytest.approx(-200.0)


# ---------------------------------------------------------------- losses

class Zero(nn.Module):
    """Predicts 0 and records its inputs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t):
        self.seen.append((x, t))
        return torch.zeros_like(x)


def test_the_flow_matching_loss_is_the_mean_square_and_its_rows_take_the_whole_batchs_draws():
    """A zero network's loss is mean |eps - x|^2 at the draws t = rand(B), eps = randn(B, d) of the generator;
    rows=slice(1, 3) gives those rows of the same draws (every process draws the whole batch)."""
    x = torch.arange(8, dtype=torch.float32).reshape(4, 2) / 4
    gen = torch.Generator().manual_seed(5)
    t, eps = torch.rand(4, generator=gen), torch.randn(4, 2, generator=gen)
    model = Zero()
    whole = flow_matching_loss(model, x, torch.Generator().manual_seed(5))
    assert whole.item() == pytest.approx(float((eps - x).square().mean()), rel=1e-6)
    part = flow_matching_loss(model, x, torch.Generator().manual_seed(5), rows=slice(1, 3))
    assert part.item() == pytest.approx(float((eps - x)[1:3].square().mean()), rel=1e-6)
    state, time = model.seen[-1]
    assert torch.allclose(time, t[1:3]) and torch.allclose(state, ((1 - t[:, None]) * x + t[:, None] * eps)[1:3])


def test_the_router_loss_is_cross_entropy_on_the_noised_state_and_its_accuracy_the_argmax_hits():
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])  # argmax 0, 1, 0: two of three right
    seen = []

    def router(state, t):
        seen.append((state, t))
        return logits

    gen = torch.Generator().manual_seed(2)
    t, eps = torch.rand(3, generator=gen), torch.randn(3, 2, generator=gen)
    loss, accuracy = router_loss(router, x, labels, torch.Generator().manual_seed(2))
    assert loss.item() == pytest.approx(float(F.cross_entropy(logits, labels)))
    assert accuracy.item() == pytest.approx(2 / 3)
    state, time = seen[0]
    assert torch.allclose(time, t) and torch.allclose(state, (1 - t[:, None]) * x + t[:, None] * eps)


# ---------------------------------------------------------------- the training loop

class Counted(nn.Module):
    """A float parameter, a float buffer and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("scale", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_the_ema_follows_its_recurrence_and_copies_integer_buffers():
    """ema_n = d_n ema_{n-1} + (1 - d_n) w_n, d_n = min(decay, (1 + n) / (10 + n)); integer buffers are copied."""
    model = Counted()
    ema = EMA(model, decay=0.5)
    want, want_scale = [0.0, 0.0], 0.0
    for n in range(6):
        with torch.no_grad():
            model.w.copy_(torch.tensor([n + 1.0, -2.0 * n]))
            model.scale.fill_(10.0 * n)
            model.count.fill_(n + 7)
        ema.update_parameters(model)
        d = min(0.5, (1 + n) / (10 + n))
        want = [d * a + (1 - d) * b for a, b in zip(want, [n + 1.0, -2.0 * n])]
        want_scale = d * want_scale + (1 - d) * 10.0 * n
        assert ema.module.w.tolist() == pytest.approx(want, rel=1e-6)
        assert ema.module.scale.item() == pytest.approx(want_scale, rel=1e-6)
        assert ema.module.count.item() == n + 7 and int(ema.n_averaged) == n + 1


def _step_losses(model, step, gen):
    """A loss whose value is step + 1 and whose gradient is the constant (3, 4): norm 5."""
    return model.w @ torch.tensor([3.0, 4.0]) - (model.w @ torch.tensor([3.0, 4.0])).detach() + step + 1, {}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 1, "lr": 1e-2, "warmup": 0, "log_every": 4, "device": "cpu",
                          **kw})


def test_a_row_averages_the_steps_since_the_last_row_and_gradients_are_clipped():
    """log_every 4 over 6 steps: rows at 4 (mean of 1..4) and 6 (mean of 5, 6); the grad norm logged is the
    norm before clipping (5), the gradient left from the last step is the clipped one (norm grad_clip)."""
    model = Counted()
    _, history = fit(model, _step_losses, _cfg(grad_clip=0.5))
    assert [row["step"] for row in history] == [4, 6]
    assert [row["loss"] for row in history] == pytest.approx([2.5, 5.5])
    assert [row["grad_norm"] for row in history] == pytest.approx([5.0, 5.0])
    assert model.w.grad.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_the_constant_schedule_keeps_the_rate_after_its_warmup():
    _, history = fit(Counted(), _step_losses, _cfg(lr=1.0, warmup=2, log_every=1, schedule="constant"))
    assert [row["lr"] for row in history] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_a_loss_that_is_not_finite_stops_training_saying_it_diverged():
    nan = lambda model, step, gen: (model.w.sum() * float("nan"), {})  # noqa: E731
    with pytest.raises(DDMError, match="training diverged"):
        fit(Counted(), nan, _cfg())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


def _global_rng_loss(model, step, gen):
    """A batch drawn from torch's global RNG (as dropout or a user's loss would draw) and one from the
    generator."""
    x = torch.randn(8, 2) + torch.rand(8, 1, generator=gen)
    return (model(x) - x.flip(1)).square().mean(), {}


def test_a_resumed_fit_equals_an_uninterrupted_one_when_the_loss_draws_from_the_global_rng(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=8, lr=1e-2, warmup=2, log_every=5, checkpoint_every=4, device="cpu")
    ref_model = Net()
    ref_ema, ref_history = fit(ref_model, _global_rng_loss, cfg)
    calls = {"n": 0}

    def crashing(model, step, gen):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt("simulated crash")
        return _global_rng_loss(model, step, gen)

    checkpoint = tmp_path / "checkpoint.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(Net(), crashing, cfg, checkpoint=checkpoint)
    model = Net()
    ema, history = fit(model, _global_rng_loss, cfg, checkpoint=checkpoint, resume=True)
    for a, b in ((model, ref_model), (ema, ref_ema)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in history] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in ref_history]


# ---------------------------------------------------------------- distances

def test_the_mmd_of_two_small_sets_is_its_formula_with_the_gaussian_kernel():
    """x = {0, 1}, y = {0, 2}, h = 1, k(a, b) = exp(-(a - b)^2 / 2): the unbiased MMD^2 is
    k(0, 1) + k(0, 2) - 2 mean(k(x_i, y_j))."""
    k = lambda d: math.exp(-d * d / 2)  # noqa: E731
    want = k(1) + k(2) - 2 * (k(0) + k(2) + k(1) + k(1)) / 4
    assert mmd_rbf([[0.0], [1.0]], [[0.0], [2.0]], bandwidth=1.0) == pytest.approx(want, rel=1e-12)


def _sliced_translation(shift: np.ndarray, projections: int, seed: int) -> float:
    import ot

    theta = ot.sliced.get_random_projections(len(shift), projections, seed)
    return math.sqrt(float(((shift @ theta) ** 2).mean()))


def test_the_sliced_w2_of_a_translation_uses_256_projections_and_p_2_at_any_set_sizes(gen):
    """Sliced W2 of x and x + s is sqrt(mean_theta <s, theta>^2) over POT's 256 projections of seed 0 by default;
    a set twice as large holding every point twice is the same measure, so unequal sizes give the same value."""
    x = torch.randn(100, 3, generator=gen, dtype=F64)
    shift = np.array([0.6, -0.8, 1.5])
    y = x + torch.as_tensor(shift)
    want = _sliced_translation(shift, 256, 0)
    assert w2_sliced(x, y) == pytest.approx(want, rel=1e-10)
    assert w2_sliced(x, torch.cat([y, y])) == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- mixture scores

def test_the_nll_of_one_point_is_the_data_densitys():
    """Under N(2, 0.25) the point 3 has -log p = log(sqrt(2 pi 0.25)) + (1 / 0.25) / 2."""
    g = GaussianMixture.from_covariances([1.0], [[2.0]], [0.25])
    assert nll(torch.tensor([[3.0]], dtype=F64), g) == pytest.approx(0.5 * math.log(2 * math.pi * 0.25) + 2.0)


def test_mode_assignment_weighs_the_components():
    """N(-1, 1) of weight 0.9 and N(1, 1) of weight 0.1: at 0.5 the likelihood ratio is e^-1 for the first,
    its prior 9 times the second's, so all 20 points are assigned to the first: hist (20.5, 0.5) / 21."""
    g = GaussianMixture.from_covariances([0.9, 0.1], [[-1.0], [1.0]], [1.0, 1.0])
    out = mode_coverage(torch.full((20, 1), 0.5, dtype=F64), g)
    p = [20.5 / 21, 0.5 / 21]
    assert out["modes_hit"] == 0.5
    assert out["mode_kl"] == pytest.approx(p[0] * math.log(p[0] / 0.9) + p[1] * math.log(p[1] / 0.1), rel=1e-12)


def test_mode_coverage_hits_at_a_tenth_of_the_expected_count_and_its_kl_is_add_half_smoothed():
    """20 points, two equal modes: 19 at the first, 1 at the second (exactly a tenth of the expected 10) hit both;
    KL(hist || pi) with hist = (19.5, 1.5) / 21."""
    g = GaussianMixture.from_covariances([0.5, 0.5], [[-5.0], [5.0]], [1.0, 1.0])
    x = torch.tensor([[-5.0]] * 19 + [[5.0]], dtype=F64)
    out = mode_coverage(x, g)
    p = [19.5 / 21, 1.5 / 21]
    assert out["modes_hit"] == 1.0
    assert out["mode_kl"] == pytest.approx(sum(q * math.log(q / 0.5) for q in p), rel=1e-12)


def test_off_manifold_is_the_chi_square_quantile_of_the_mahalanobis_distance_along_rotated_axes():
    """A 2-D Gaussian of variances 4 and 0.25 along axes rotated by 30 degrees (eigvecs not symmetric): points
    along either axis at squared Mahalanobis distance 13 are inside the 0.999 ellipsoid (chi2(2) quantile 13.82),
    at 14.5 outside."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    vecs = torch.tensor([[[c, -s], [s, c]]], dtype=F64)
    vals = torch.tensor([[4.0, 0.25]], dtype=F64)
    g = GaussianMixture(torch.ones(1, dtype=F64), torch.tensor([[1.0, -1.0]], dtype=F64), vals, vecs)
    for axis in range(2):
        direction = vecs[0, :, axis] * vals[0, axis].sqrt()
        for r2, outside in ((13.0, 0.0), (14.5, 1.0)):
            point = (g.means[0] + math.sqrt(r2) * direction)[None]
            assert off_manifold_rate(point, g) == outside, (axis, r2)
