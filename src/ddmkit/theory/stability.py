"""Stability of a probability-flow ODE: L(t), Lambda(t) and Lambda-uniform grids.

L(t) is the Lipschitz constant of the velocity at time t: the analytic bound
sup_x ||dv/dx||_2 (FlowPath.lipschitz_bound), or the spectral norm of the
closed-form Jacobian measured along teacher trajectories (mean and max over
trajectories). Errors made at time t reach the data end amplified by at most

    exp(Lambda(t)),   Lambda(t) = integral_0^t L(u) du      (t = 0 the data end),

so a grid that spends segments where L is large is uniform in Lambda:
t_i = Lambda^{-1}(Lambda(T) (S - i) / S), i = 0..S, from T (noise) to 0 (data).
"""
from __future__ import annotations

import numpy as np
import torch

from ddmkit.errors import DDMError
from ddmkit.sample import sample_adaptive
from ddmkit.theory.paths import FlowPath
from ddmkit.truth import GaussianMixture

Tensor = torch.Tensor


def report_times(path: FlowPath, points: int) -> Tensor:
    """A decreasing grid from t_noise to 0, dense near the data end
    (uniform in sqrt(t)), where L(t) varies fastest."""
    u = torch.linspace(1.0, 0.0, points, dtype=torch.float64)
    return path.t_noise * u**2


def teacher_solve(path: FlowPath, gmm: GaussianMixture, x_noise: Tensor, times: Tensor,
                  tol: float = 1e-8) -> Tensor:
    """Teacher trajectories: a fine adaptive (dopri5) solve from x_noise at times[0]
    through the decreasing `times`; returns (len(times), B, d)."""
    states = []
    final = sample_adaptive(lambda x, t: path.velocity(gmm, x, t), x_noise, times,
                            callback=lambda info: states.append(info["x"]), rtol=tol, atol=tol)
    return torch.stack(states + [final])


def measured_lipschitz(path: FlowPath, gmm: GaussianMixture, trajectories: Tensor, times: Tensor) -> dict:
    """Spectral norm of dv/dx along trajectories (T, B, d) at `times` (T,):
    {"mean": (T,), "max": (T,)} over the B trajectories."""
    norms = torch.stack([torch.linalg.matrix_norm(path.jacobian(gmm, x, t), ord=2)
                         for x, t in zip(trajectories, times)])
    return {"mean": norms.mean(1), "max": norms.amax(1)}


def cumulative_lambda(times: Tensor, lipschitz: Tensor) -> Tensor:
    """Lambda(t_i) = integral_0^{t_i} L, by the trapezoid rule on any grid
    (increasing or decreasing); Lambda at the data end (t = 0) is 0. On a grid
    that stops short of 0 at t_min, L is taken as constant on [0, t_min]:
    Lambda(t_min) = L(t_min) t_min."""
    t, values = np.asarray(times, dtype=np.float64), np.asarray(lipschitz, dtype=np.float64)
    order = np.argsort(t)
    t, values = t[order], values[order]
    start = values[0] * t[0] if t[0] != 0 else 0.0
    cum = start + np.concatenate([[0.0], np.cumsum(0.5 * (values[1:] + values[:-1]) * np.diff(t))])
    out = np.empty_like(cum)
    out[order] = cum
    return torch.as_tensor(out)


def lambda_uniform_grid(times: Tensor, lam: Tensor, segments: int) -> Tensor:
    """Times t_0 = T > t_1 > ... > t_S = 0 with equal steps of Lambda, by
    linear interpolation of the tabulated (times, Lambda); Lambda must increase with t."""
    if segments < 1:
        raise DDMError(f"segments must be >= 1 (the number of steps of the grid); got {segments}")
    t, lam = np.asarray(times, dtype=np.float64), np.asarray(lam, dtype=np.float64)
    order = np.argsort(t)
    t, lam = t[order], lam[order]
    targets = lam[-1] * np.linspace(1.0, 0.0, segments + 1)
    grid = np.interp(targets, lam, t)
    grid[0], grid[-1] = t[-1], t[0]
    return torch.as_tensor(grid)


def uniform_grid(path: FlowPath, segments: int) -> Tensor:
    """S equal segments from t_noise to 0."""
    return torch.linspace(path.t_noise, 0.0, segments + 1, dtype=torch.float64)
