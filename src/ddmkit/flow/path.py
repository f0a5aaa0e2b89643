"""The linear probability path and conversions between parameterisations.

The path of ddmkit.conventions, x_t = (1 - t) x + t eps, implemented: the network
target is v = eps - x, and x0_hat = x_t - t v, eps_hat = x_t + (1 - t) v.
An expert that predicts eps or x0 is converted to v here, once, at the
boundary of the code:

    from eps:  x0 = (x_t - t eps) / (1 - t),  v = eps - x0 = (eps - x_t) / (1 - t)
    from x0:   v = (x_t - x0) / t

The divisions are clamped away from the singular end (t = 1 for eps,
t = 0 for x0) by `t_eps`.
"""
from __future__ import annotations

import torch

PREDICTIONS = ("velocity", "epsilon", "x0")


def per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """v (B,) as (B, 1, ..., 1) in like's dtype: one value per row of like (B, *shape), broadcast."""
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
    raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


def to_velocity(pred: torch.Tensor, prediction: str, x_t: torch.Tensor, t: torch.Tensor, t_eps: float = 1e-3) -> torch.Tensor:
    """Convert a network output of kind `prediction` to the velocity v = eps - x."""
    if prediction == "velocity":
        return pred
    tb = per_row(t, x_t)
    if prediction == "epsilon":
        return (pred - x_t) / (1 - tb).clamp_min(t_eps)
    if prediction == "x0":
        return (x_t - pred) / tb.clamp_min(t_eps)
    raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


def x0_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t - t v."""
    return x_t - per_row(t, x_t) * v
