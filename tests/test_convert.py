"""Experts of other paths converted to the linear-path velocity (ddmkit.flow.convert), checked on
Gaussian-mixture truth: the exact expert of each path, computed from that path's own marginal
(a mixture of Gaussians again), converted, equals the exact linear-path velocity to float precision."""
import math
import re

import pytest
import torch

from ddmkit.ddm.load import path_output, velocity_field
from ddmkit.errors import DDMError
from ddmkit.flow.convert import T_MIN, VPSchedule, vp_timestep
from ddmkit.flow.path import T_EPS
from ddmkit.truth import GaussianMixture

T = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98], dtype=torch.float64)


def mixture() -> GaussianMixture:
    """3 components in 2-D, unequal weights, full covariances."""
    covs = torch.tensor([[[1.0, 0.6], [0.6, 0.8]], [[0.3, -0.1], [-0.1, 0.5]], [[0.2, 0.0], [0.0, 1.5]]])
    return GaussianMixture.from_covariances(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([[2.0, 0.0], [-1.0, 1.5],
                                                                                       [0.5, -2.0]]), covs)


def noised(g: GaussianMixture, scale: float, noise: float) -> GaussianMixture:
    """The law of scale * x + noise * eps for x ~ g: a mixture again (independent of ddmkit's paths)."""
    covs = scale ** 2 * g.covariances + noise ** 2 * torch.eye(g.dim, dtype=torch.float64)
    return GaussianMixture.from_covariances(g.weights, scale * g.means, covs)


def alpha_bar(schedule: VPSchedule, n: torch.Tensor) -> torch.Tensor:
    """The VP network's own alpha_bar at a fractional timestep (linear in log alpha_bar)."""
    table = schedule.log_alpha_bar()
    lo = n.floor().long().clamp(0, len(table) - 1)
    hi = (lo + 1).clamp(max=len(table) - 1)
    return torch.exp(table[lo] + (n - lo) * (table[hi] - table[lo]))


class ExactVP(torch.nn.Module):
    """The exact epsilon (or v) prediction of a VP model of the mixture: eps_hat = -sigma score(z)."""

    def __init__(self, g: GaussianMixture, schedule: VPSchedule, prediction: str):
        super().__init__()
        self.g, self.schedule, self.prediction = g, schedule, prediction

    def forward(self, z, n):
        out = []
        for zi, ni in zip(z, n):
            a2 = float(alpha_bar(self.schedule, ni.double()))
            alpha, sigma = math.sqrt(a2), math.sqrt(1 - a2)
            eps = -sigma * noised(self.g, alpha, sigma).score(zi[None], 0.0)[0]
            x0 = (zi - sigma * eps) / alpha
            out.append(eps if self.prediction == "epsilon" else alpha * eps - sigma * x0)
        return torch.stack(out)


class ExactEDM(torch.nn.Module):
    """The exact denoiser D(x, sigma) = E[x0 | x] = x + sigma^2 score_sigma(x)."""

    def __init__(self, g: GaussianMixture):
        super().__init__()
        self.g = g

    def forward(self, x, sigma):
        return torch.stack([xi + float(s) ** 2 * noised(self.g, 1.0, float(s)).score(xi[None], 0.0)[0]
                            for xi, s in zip(x, sigma)])


def points(g: GaussianMixture, t: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x0 = g.sample(len(t), gen).double()
    return (1 - t[:, None]) * x0 + t[:, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_a_vp_expert_converts_to_the_linear_velocity(schedule, prediction):
    g = mixture()
    config = {"kwargs": {}, "prediction": prediction, "path": {"kind": "vp", "schedule": schedule}}
    field = velocity_field(ExactVP(g, VPSchedule(schedule), prediction), config)
    x = points(g, T)
    got = field.output.velocity(field.network, x, T)
    assert torch.allclose(got, g.velocity(x, T), atol=1e-9, rtol=0)


def test_an_edm_denoiser_converts_to_the_linear_velocity():
    g = mixture()
    field = velocity_field(ExactEDM(g), {"kwargs": {}, "path": {"kind": "edm"}})
    x = points(g, T)
    assert torch.allclose(field.output.velocity(field.network, x, T), g.velocity(x, T), atol=1e-9, rtol=0)


def test_an_edm_denoiser_near_the_data_gives_the_velocity_at_t_eps_as_an_x0_expert_does():
    """A denoiser predicts x0 like an x0 network, but was evaluated down to t = 1e-4, where
    v = (x - x0) / t multiplies its error by 1e4 (heun and rk4 evaluate at t = 0 on their last step)."""
    g = mixture()
    field = velocity_field(ExactEDM(g), {"kwargs": {}, "path": {"kind": "edm"}})
    x = points(g, torch.full((4,), 0.5, dtype=torch.float64))
    at = lambda t: torch.full((4,), t, dtype=torch.float64)  # noqa: E731
    for t in (0.0, T_EPS / 2):
        assert torch.allclose(field.output.velocity(field.network, x, at(t)), g.velocity(x, at(T_EPS)), atol=1e-9,
                              rtol=0)


def test_the_timestep_has_the_signal_to_noise_ratio_of_t():
    for kind in ("linear", "cosine"):
        schedule = VPSchedule(kind)
        n = vp_timestep(schedule, T)
        snr = alpha_bar(schedule, n) / (1 - alpha_bar(schedule, n))
        assert torch.allclose(snr, ((1 - T) / T) ** 2, rtol=1e-9)
        assert (n[1:] > n[:-1]).all() and n.min() >= 0 and n.max() <= 999  # later t, noisier timestep


def test_a_wrong_time_map_is_caught():
    """The check is sharp: the VP expert asked at the wrong timestep (n = t * steps, the naive map)
    is far from the linear velocity."""
    g = mixture()
    schedule = VPSchedule("linear")
    net = ExactVP(g, schedule, "epsilon")
    x, t = points(g, T), T
    c = torch.sqrt((1 - t) ** 2 + t ** 2)
    alpha, sigma = (1 - t) / c, t / c
    z = x / c[:, None]
    eps = net(z, t * 999)
    v = eps - (z - sigma[:, None] * eps) / alpha[:, None]
    assert (v - g.velocity(x, t)).abs().max() > 0.1


@pytest.mark.parametrize("path", [{"kind": "ddim"}, {"kind": "vp", "schedule": "sigmoid"}, {"kind": "edm", "steps": 3},
                                  {"kind": "vp", "betas": [1]}])
def test_a_path_ddmkit_cannot_convert_is_refused(path):
    with pytest.raises(DDMError, match="path"):
        path_output({"kwargs": {}, "path": path})


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_vp_expert_past_its_noisiest_timestep_is_taken_at_that_timestep(schedule):
    """From t = schedule.noisiest_t() to t = 1 (alpha = 0, beyond the network's last timestep) the exact VP
    expert gives the exact velocity of the state at noisiest_t, as DDPM's sampler starts there; the map
    of a t clamped only near 1 (alpha = 1e-4 while the network answers at its last timestep) was off by
    more than the velocity itself."""
    g = mixture()
    vp = VPSchedule(schedule)
    alpha_bar_last = float(torch.exp(vp.log_alpha_bar()[-1]))
    assert math.isclose((1 - vp.noisiest_t()) / vp.noisiest_t(), math.sqrt(alpha_bar_last / (1 - alpha_bar_last)),
                        rel_tol=1e-12)
    t_hi = min(vp.noisiest_t(), 1 - T_MIN)  # cosine: alpha_bar 2.4e-9 at its last timestep, t = 0.99995
    config = {"kwargs": {}, "prediction": "epsilon", "path": {"kind": "vp", "schedule": schedule}}
    field = velocity_field(ExactVP(g, vp, "epsilon"), config)
    x = points(g, torch.full((4,), 1.0, dtype=torch.float64))
    for t in (t_hi, (t_hi + 1) / 2, 1.0):
        got = field.output.velocity(field.network, x, torch.full((4,), t, dtype=torch.float64))
        assert torch.allclose(got, g.velocity(x, torch.full((4,), t_hi, dtype=torch.float64)), atol=1e-8, rtol=0)


class ExactLinear(torch.nn.Module):
    """The exact eps or x0 prediction of the linear path: eps = x_t + (1 - t) v, x0 = x_t - t v."""

    def __init__(self, g: GaussianMixture, prediction: str):
        super().__init__()
        self.g, self.prediction = g, prediction

    def forward(self, x, t):
        v = self.g.velocity(x, t)
        tb = t[:, None]
        return x + (1 - tb) * v if self.prediction == "epsilon" else x - tb * v


@pytest.mark.parametrize("prediction, singular, clamped", [("epsilon", 1.0, 1 - T_EPS), ("x0", 0.0, T_EPS)])
def test_an_eps_or_x0_expert_at_its_singular_end_gives_the_velocity_at_the_clamped_time(prediction, singular, clamped):
    """An eps network says nothing of the data at t = 1 (x_t = eps), an x0 network nothing of the noise at
    t = 0: the exact network, asked there, gives the exact velocity of the state at t_eps from that end
    (the conversion divided 0 by t_eps instead: velocity 0 at t = 1 for eps), and between the ends the
    exact velocity itself."""
    g = mixture()
    field = velocity_field(ExactLinear(g, prediction), {"kwargs": {}, "prediction": prediction})
    x = points(g, torch.full((4,), 0.5, dtype=torch.float64))
    at = lambda t: torch.full((4,), t, dtype=torch.float64)  # noqa: E731
    assert torch.allclose(field.output.velocity(field.network, x, at(singular)), g.velocity(x, at(clamped)),
                          atol=1e-9, rtol=0)
    assert torch.allclose(field.output.velocity(field.network, x, T[:4]), g.velocity(x, T[:4]), atol=1e-9, rtol=0)


@pytest.mark.parametrize("path, prediction, message", [
    ({"kind": "vp", "steps": 1_000_000_000}, "v", "path.steps: 1000000000; give an integer in 2 .. 100000"),
    ({"kind": "vp", "steps": 0}, "v", "path.steps: 0"),
    ({"kind": "vp", "steps": "1000"}, "v", "path.steps: '1000'"),
    ({"kind": "vp", "beta_start": -0.5}, "v", "path.beta_start: -0.5"),
    ({"kind": "vp", "beta_end": 2.0}, "v", "path.beta_end: 2.0"),
    ({"kind": "vp", "beta_start": 0.02, "beta_end": 0.01}, "v", "below beta_start"),
    ({"kind": "vp", "time_scale": 0}, "v", "path.time_scale: 0"),
    ("edm", None, "is not a table"),
    ({"kind": "edm"}, "epsilon", "prediction: 'epsilon' on the edm path"),
    ({"kind": "vp"}, "velocity", "prediction: 'velocity' on the vp path"),
    ({"kind": "linear"}, "banana", "prediction: 'banana' on the linear path"),
])
def test_a_model_folders_path_is_checked_before_anything_is_built(path, prediction, message):
    """A model folder's config.json is untrusted: path.steps = 1e9 allocated until the process was killed,
    other values failed inside torch, and time_scale 0 or a prediction of another path was accepted."""
    config = {"kwargs": {}, "path": path, **({"prediction": prediction} if prediction else {})}
    with pytest.raises(DDMError, match=re.escape(message)):
        velocity_field(torch.nn.Identity(), config)
