"""Experts of other paths converted to the linear-path velocity (ddmkit.flow.convert), checked on
Gaussian-mixture truth: the exact expert of each path, computed from that path's own marginal
(a mixture of Gaussians again), converted, equals the exact linear-path velocity to float precision."""
import math

import pytest
import torch

from ddmkit.ddm.load import path_output, velocity_field
from ddmkit.errors import DDMError
from ddmkit.flow.convert import VPSchedule, vp_timestep
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
