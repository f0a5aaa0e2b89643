"""MLPs for vector data: a velocity network v(x, t) and a router r(k | x, t).

Both embed t with sinusoidal features and add the embedding into every
residual block:  h <- h + W2 silu(W1 norm(h) + E t_emb).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb if dim % 2 == 0 else torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + self.emb(emb)))


class TimeMLP(nn.Module):
    """(x (B, in_dim), t (B,)) -> (B, out_dim); x may be (B, *shape) and is flattened."""

    def __init__(self, in_dim: int, out_dim: int, width: int = 256, depth: int = 3, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        h = self.inp(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


class VelocityMLP(TimeMLP):
    """Velocity network for vector data: output has x's shape."""

    def __init__(self, data_shape: list[int], width: int = 256, depth: int = 3, time_dim: int = 64):
        dim = math.prod(data_shape)
        super().__init__(dim, dim, width, depth, time_dim)
        self.data_shape = tuple(data_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t).reshape(x.shape)


class RouterMLP(TimeMLP):
    """Router for vector data: logits over the K clusters, (B, K)."""

    def __init__(self, data_shape: list[int], num_experts: int, width: int = 256, depth: int = 3, time_dim: int = 64):
        super().__init__(math.prod(data_shape), num_experts, width, depth, time_dim)
