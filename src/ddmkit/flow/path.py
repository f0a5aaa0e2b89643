"""The linear probability path and conversions between parameterisations.

The path of ddmkit.conventions, x_t = (1 - t) x + t eps, implemented: the network
target is v = eps - x, and x0_hat = x_t - t v, eps_hat = x_t + (1 - t) v.
An expert that predicts eps or x0 is converted to v here, once, at the
boundary of the code:

    from eps:  x0 = (x_t - t eps) / (1 - t),  v = eps - x0 = (eps - x_t) / (1 - t)
    from x0:   v = (x_t - x0) / t

Each is singular at one end (t = 1 for eps: x_t = eps there, so eps says nothing of x;
t = 0 for x0), where a network's error is divided by (1 - t) or t. Such a network is
evaluated and converted at the time clamped `t_eps` away from that end (`conversion_time`):
the velocity there of the state x_t, which for an exact network is the exact velocity at the
clamped time, and the network's error is multiplied by at most 1 / t_eps.
"""
from __future__ import annotations

import torch

from ddmkit.errors import DDMError

PREDICTIONS = ("velocity", "epsilon", "x0")


def per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """v (B,) as (B, 1, ..., 1) in like's dtype: one value per row of like (B, *shape), broadcast (a number:
    the same for every row)."""
    if not isinstance(v, torch.Tensor):
        v = torch.tensor(float(v), device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noise(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps."""
    tb = per_row(t, x)
    return (1 - tb) * x + tb * eps


def target_for(prediction: str, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target of a network that predicts `prediction`."""
    if prediction == "velocity":
        return eps - x
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x
    raise DDMError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


T_EPS = 1e-2  # how far from its singular end an eps or x0 network is evaluated


def conversion_time(prediction: str, t: torch.Tensor, t_eps: float = T_EPS) -> torch.Tensor:
    """The time at which a network of kind `prediction` is evaluated and converted for the state at t:
    t itself, but at most 1 - t_eps for "epsilon" and at least t_eps for "x0"."""
    if prediction == "epsilon":
        return t.clamp(max=1 - t_eps)
    if prediction == "x0":
        return t.clamp(min=t_eps)
    return t


def to_velocity(pred: torch.Tensor, prediction: str, x_t: torch.Tensor, t: torch.Tensor,
                t_eps: float = T_EPS) -> torch.Tensor:
    """Convert a network output of kind `prediction`, made at time t, to the velocity v = eps - x (t is
    clamped as conversion_time does: call the network at conversion_time(prediction, t))."""
    if prediction == "velocity":
        return pred
    tb = per_row(conversion_time(prediction, t, t_eps), x_t)
    if prediction == "epsilon":
        return (pred - x_t) / (1 - tb)
    if prediction == "x0":
        return (x_t - pred) / tb
    raise DDMError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


def x0_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t - t v."""
    return x_t - per_row(t, x_t) * v
