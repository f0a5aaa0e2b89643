"""MLPs for vector data: a velocity network v(x, t) and a router r(k | x, t).

Both embed t with sinusoidal features and add the embedding into every
residual block:  h <- h + W2 silu(W1 norm(h) + E t_emb).

The forwards apply the layers' functions (F.linear, F.layer_norm, F.silu) to
the layers' parameters instead of calling the submodules, and read those
parameters from one tuple built at the first call (`flat_parameters`) rather
than through nn.Module attribute lookups (about 45 per call): bitwise the same
operations without the Python overhead, which dominates the small expert
calls of routed sampling (docs/performance.md). Forward hooks on the layers
therefore do not fire. The tuple is rebuilt after .to()/.cuda()/.half() and
load_state_dict, which may replace parameters; in-place updates (optimizers,
load_state_dict's copy) need no rebuild.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


_FREQS: dict = {}  # (half, max_period, device) -> the frequencies, computed once


def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """exp(-log(max_period) i / half), i < half; cached in eager mode (torch.compile traces the formula)."""
    key = (half, max_period, device)
    freqs = None if torch.compiler.is_compiling() else _FREQS.get(key)
    if freqs is None:
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=device, dtype=torch.float32) / half)
        if not torch.compiler.is_compiling():
            _FREQS[key] = freqs
    return freqs


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], (B,) -> (B, dim)."""
    half = dim // 2
    args = (t.float() * 1000.0)[:, None] * _frequencies(half, max_period, t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb if dim % 2 == 0 else torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)


def residual_block(h: torch.Tensor, emb: torch.Tensor, params: tuple) -> torch.Tensor:
    """h + W2 silu(W1 norm(h) + E emb), params = ResidualBlock.parameters_tuple()."""
    shape, nw, nb, eps, w1, b1, we, be, w2, b2 = params
    n = F.layer_norm(h, shape, nw, nb, eps)
    return h + F.linear(F.silu(F.linear(n, w1, b1) + F.linear(emb, we, be)), w2, b2)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)

    def parameters_tuple(self) -> tuple:
        """What residual_block needs, in its order (the layers' own functions are called on them
        directly: the same operations as calling the submodules, without their per-call overhead)."""
        return (self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps, self.fc1.weight,
                self.fc1.bias, self.emb.weight, self.emb.bias, self.fc2.weight, self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return residual_block(h, emb, self.parameters_tuple())


class TimeMLP(nn.Module):
    """(x (B, in_dim), t (B,)) -> (B, out_dim); x may be (B, *shape) and is flattened."""

    def __init__(self, in_dim: int, out_dim: int, width: int = 256, depth: int = 3, time_dim: int = 64):
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth = {depth}: the number of residual blocks is 0 or more")
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, out_dim))
        self._flat = None  # flat_parameters(), built at the first forward

    def flat_parameters(self) -> tuple:
        """(time MLP, input layer, blocks, output) parameters as plain tuples, cached."""
        flat = None if torch.compiler.is_compiling() else self._flat
        if flat is None:
            (t1, _, t2), (norm, _, lin) = self.time_mlp, self.out
            blocks = tuple(b.parameters_tuple() for b in self.blocks)
            flat = ((t1.weight, t1.bias, t2.weight, t2.bias), (self.inp.weight, self.inp.bias), blocks,
                    (norm.normalized_shape, norm.weight, norm.bias, norm.eps, lin.weight, lin.bias))
            if not torch.compiler.is_compiling():
                self._flat = flat
        return flat

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): parameters may be new tensors
        self._flat = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict(assign=True) replaces parameters
        self._flat = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        (tw1, tb1, tw2, tb2), (iw, ib), blocks, (shape, nw, nb, eps, ow, ob) = self.flat_parameters()
        emb = F.linear(F.silu(F.linear(timestep_embedding(t, self.time_dim), tw1, tb1)), tw2, tb2)
        h = F.linear(x.reshape(x.shape[0], -1), iw, ib)
        for params in blocks:
            h = residual_block(h, emb, params)
        return F.linear(F.silu(F.layer_norm(h, shape, nw, nb, eps)), ow, ob)


class VelocityMLP(TimeMLP):
    """Velocity network for vector data: output has x's shape."""

    def __init__(self, data_shape: list[int], width: int = 256, depth: int = 3, time_dim: int = 64):
        dim = math.prod(data_shape)
        super().__init__(dim, dim, width, depth, time_dim)
        self.data_shape = tuple(data_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, t)
        return out if out.shape == x.shape else out.reshape(x.shape)  # not a view of itself: FSDP warns of views


class RouterMLP(TimeMLP):
    """Router for vector data: logits over the K clusters, (B, K)."""

    def __init__(self, data_shape: list[int], num_experts: int, width: int = 256, depth: int = 3, time_dim: int = 64):
        super().__init__(math.prod(data_shape), num_experts, width, depth, time_dim)
