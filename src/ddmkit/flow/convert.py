"""Experts trained on other paths, converted at load to ddmkit's linear-path velocity.

ddmkit's path is x_t = (1 - t) x + t eps (t = 0 data), velocity v = eps - x. Two other families
of diffusion models see the same states up to a scale:

Variance preserving (DDPM, improved DDPM): z = alpha x + sigma eps with alpha^2 + sigma^2 = 1,
alpha^2 = alpha_bar(n) at the model's timestep n (a linear or cosine beta schedule). A linear state
x_t is the VP state of equal signal-to-noise ratio, scaled:

    alpha / sigma = (1 - t) / t,   c = sqrt((1 - t)^2 + t^2),   z = x_t / c,
    n = the timestep where alpha_bar(n) = (1 - t)^2 / c^2  (interpolated on log alpha_bar).

From the network's output at (z, n):
    epsilon prediction   eps_hat = f,                  x0_hat = (z - sigma eps_hat) / alpha
    v prediction         (v_vp = alpha eps - sigma x) eps_hat = sigma z + alpha f,  x0_hat = alpha z - sigma f
and v = eps_hat - x0_hat.

Variance exploding, EDM-style (Karras et al.): x_sigma = x + sigma eps and a denoiser
D(x_sigma, sigma) = E[x | x_sigma]. A linear state is x_sigma scaled:

    sigma = t / (1 - t),   x_sigma = x_t / (1 - t),   v = (x_t - D) / t.

At the ends, where a path has no counterpart (t = 0 for VP at finite n, t = 1 for EDM), t is
clamped into [t_min, 1 - t_min]; between, the maps are exact (tests/test_convert.py checks them on
Gaussian-mixture truth to float precision).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ddmkit.flow.path import conversion_time, per_row

T_MIN = 1e-4


@dataclass(frozen=True)
class VPSchedule:
    """A DDPM noise schedule over timesteps n = 0 .. steps - 1: "linear" betas from beta_start to
    beta_end (DDPM), or "cosine" (improved DDPM: alpha_bar(n) = f(n + 1) / f(0), f(n) =
    cos^2(((n / steps) + s) / (1 + s) pi / 2), s = 0.008, betas clipped at 0.999)."""

    kind: str = "linear"
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    time_scale: float = 1.0  # the network is called with n x time_scale: 1 (DDPM's timestep), 1 / steps (ddmkit's)

    def log_alpha_bar(self) -> torch.Tensor:
        """log alpha_bar at n = 0 .. steps - 1 (float64), decreasing."""
        n = torch.arange(self.steps, dtype=torch.float64)
        if self.kind == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, self.steps, dtype=torch.float64)
        elif self.kind == "cosine":
            f = lambda u: torch.cos((u / self.steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = (1 - f(n + 1) / f(n)).clamp(max=0.999)
        else:
            raise ValueError(f"VP schedule kind must be 'linear' or 'cosine'; got {self.kind!r}")
        return torch.cumsum(torch.log1p(-betas), 0)

    def noisiest_t(self) -> float:
        """The linear-path time of the schedule's last timestep (its lowest signal-to-noise ratio):
        t = sigma / (alpha + sigma) at n = steps - 1. The network never saw a noisier state."""
        alpha_bar = math.exp(float(self.log_alpha_bar()[-1]))
        alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
        return sigma / (alpha + sigma)


@lru_cache(maxsize=32)
def noisiest_t(schedule: VPSchedule) -> float:
    """schedule.noisiest_t(), at most 1 - T_MIN (a cosine schedule's last alpha_bar is ~1e-9), computed once
    per schedule."""
    return min(schedule.noisiest_t(), 1 - T_MIN)


@lru_cache(maxsize=32)
def log_alpha_bar_on(schedule: VPSchedule, device: torch.device) -> torch.Tensor:
    """schedule.log_alpha_bar() on `device`, computed once per schedule and device (every training step
    and every sampling step of a VP expert reads it)."""
    return schedule.log_alpha_bar().to(device)


def vp_timestep(schedule: VPSchedule, t: torch.Tensor) -> torch.Tensor:
    """The (fractional) timestep n whose alpha_bar equals (1 - t)^2 / ((1 - t)^2 + t^2), linear in
    log alpha_bar between integers, clamped to [0, steps - 1]."""
    table = log_alpha_bar_on(schedule, t.device)
    tt = t.double().clamp(T_MIN, 1 - T_MIN)
    target = 2 * torch.log1p(-tt) - torch.log((1 - tt) ** 2 + tt ** 2)
    # table decreases: search on its negation
    idx = torch.searchsorted(-table, -target).clamp(1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    frac = ((lo - target) / (lo - hi)).clamp(0, 1)
    n = (idx - 1).double() + frac
    return torch.where(target >= table[0], torch.zeros_like(n), n).to(t.dtype)


def vp_scales(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma, c) of the VP state of equal signal-to-noise ratio to x_t: z = x_t / c."""
    tt = t.clamp(T_MIN, 1 - T_MIN)
    c = torch.sqrt((1 - tt) ** 2 + tt ** 2)
    return (1 - tt) / c, tt / c, c


def vp_velocity(network, x: torch.Tensor, t: torch.Tensor, schedule: VPSchedule, prediction: str,
                **cond) -> torch.Tensor:
    """The linear-path velocity of a VP network predicting "epsilon" or "v", called as
    network(z, n x schedule.time_scale, **cond) with z = x / c and its timestep n. A state noisier than
    the schedule's last timestep (t above schedule.noisiest_t(), up to t = 1 where alpha = 0) is taken
    as that timestep's, as DDPM's sampler starts there from pure noise: else x0_hat = (z - sigma eps_hat)
    / alpha would divide the network's error by an alpha the network never saw."""
    t = t.clamp(max=noisiest_t(schedule))
    alpha, sigma, c = (per_row(s, x) for s in vp_scales(t))
    z = x / c
    out = network(z, vp_timestep(schedule, t) * schedule.time_scale, **cond).to(x.dtype)
    if prediction == "epsilon":
        eps, x0 = out, (z - sigma * out) / alpha
    elif prediction == "v":
        eps, x0 = sigma * z + alpha * out, alpha * z - sigma * out
    else:
        raise ValueError(f"VP prediction must be 'epsilon' or 'v'; got {prediction!r}")
    return eps - x0


def vp_training_pair(schedule: VPSchedule, prediction: str, x: torch.Tensor, u: torch.Tensor,
                     eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDPM's training example at draws u ~ U[0, 1) (B,) and eps ~ N(0, I): the timestep
    n = floor(u steps), the state z = alpha_n x + sigma_n eps (alpha_n^2 = alpha_bar(n), sigma_n^2 =
    1 - alpha_bar(n)), and the target, eps ("epsilon") or alpha_n eps - sigma_n x ("v").
    Returns (z, the network's time input n x time_scale, target)."""
    n = (u * schedule.steps).long().clamp(0, schedule.steps - 1)
    log_ab = log_alpha_bar_on(schedule, x.device)[n]
    alpha, sigma = per_row(torch.exp(0.5 * log_ab), x), per_row(torch.sqrt(-torch.expm1(log_ab)), x)
    if prediction == "epsilon":
        target = eps
    elif prediction == "v":
        target = alpha * eps - sigma * x
    else:
        raise ValueError(f"VP prediction must be 'epsilon' or 'v'; got {prediction!r}")
    return alpha * x + sigma * eps, n.to(u.dtype) * schedule.time_scale, target


def path_entry(schedule: VPSchedule | None) -> dict:
    """The "path" entry of the config.json of a network trained with this VP schedule, which the loader
    reads back (ddmkit.ddm.load.path_output); {} for the linear path, ddmkit's own."""
    if schedule is None:
        return {}
    return {"path": {"kind": "vp", "schedule": schedule.kind, "steps": schedule.steps,
                     "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
                     "time_scale": schedule.time_scale}}


def edm_velocity(network, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """The linear-path velocity of an EDM-style denoiser D(x_sigma, sigma) = E[x | x_sigma], called as
    network(x / (1 - t), t / (1 - t), **cond). A denoiser predicts x0, so it is evaluated as an x0
    network is (ddmkit.flow.path.conversion_time): at t >= T_EPS, where v = (x - x0) / t divides its
    error by no less than T_EPS."""
    tt = conversion_time("x0", t).clamp(max=1 - T_MIN)
    a = per_row(1 - tt, x)
    x0 = network(x / a, tt / (1 - tt), **cond).to(x.dtype)
    return (x - x0) / per_row(tt, x)
