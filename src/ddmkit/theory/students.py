"""Student flow maps: one residual MLP per segment of a time grid.

A student for the grid T = t_0 > t_1 > ... > t_S = 0 is a list of maps
F_i(x) = x + f_i(x) trained by regression on teacher pairs
(x(t_i), x(t_{i+1})) taken from the teacher's trajectories; sampling composes
them, F_{S-1} o ... o F_0 (x(T)), so each local error is carried through the
later maps.
"""
from __future__ import annotations

import torch
from torch import nn

from ddmkit.config import TrainConfig
from ddmkit.train.loop import fit

Tensor = torch.Tensor


class ResidualMLP(nn.Module):
    """x -> x + f(x), f a small MLP with residual blocks h <- h + W2 silu(W1 LayerNorm(h))."""

    def __init__(self, dim: int, width: int = 64, depth: int = 2):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(depth))
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)  # starts as the identity map
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return x + self.out(nn.functional.silu(h))


def train_segment(inputs: Tensor, targets: Tensor, cfg: TrainConfig, width: int, depth: int) -> nn.Module:
    """One segment's map, fitted to teacher pairs (n, d) -> (n, d) by mean squared error."""
    x, y = inputs.float(), targets.float()

    def batch_loss(model: nn.Module, step: int, generator: torch.Generator):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=generator)
        return nn.functional.mse_loss(model(x[idx]), y[idx]), {}

    model, _ = fit(ResidualMLP(x.shape[1], width, depth), batch_loss, cfg, description="student segment",
                   device=torch.device("cpu"))
    return model


@torch.no_grad()
def compose(maps: list[nn.Module], x: Tensor) -> Tensor:
    """F_{S-1}( ... F_0(x)), in float32, returned in x's dtype."""
    y = x.float()
    for f in maps:
        y = f(y)
    return y.to(x.dtype)


def relative_mse(prediction: Tensor, target: Tensor) -> float:
    """E|prediction - target|^2 / E|target|^2."""
    return float(((prediction - target) ** 2).sum(1).mean() / (target**2).sum(1).mean())
