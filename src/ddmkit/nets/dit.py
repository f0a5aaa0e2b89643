"""A small DiT (diffusion transformer) velocity network for images.

    net = DiT(data_shape=[1, 32, 32], patch=4, width=192, depth=6, heads=6, num_classes=10)
    v = net(x_t, t, y=labels)

Patchify with a strided convolution, add fixed 2-D sinusoidal positions, run
`depth` transformer blocks whose LayerNorms are modulated by the time (+ class)
embedding (adaLN-Zero: every block starts as the identity), then un-patchify.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ddmkit.errors import DDMError
from ddmkit.nets.mlp import timestep_embedding


def positions_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed sinusoidal positions (h * w, dim): half the features for rows, half for columns; computed on the
    CPU whatever the default device (on the meta device, torch's kernels would import torch._dynamo)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device="cpu") / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, device="cpu").float(), torch.arange(w, device="cpu").float(),
                                indexing="ij")
    parts = [f(a.reshape(-1, 1) * freqs) for a in (rows, cols) for f in (torch.sin, torch.cos)]
    pos = torch.cat(parts, dim=1)
    return nn.functional.pad(pos, (0, dim - pos.shape[1]))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * (w // self.heads) ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, w))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(nn.functional.silu(emb))[:, None].chunk(6, dim=-1)
        h = h + gate1 * self.attention(self.norm1(h) * (1 + scale1) + shift1)
        return h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """(x (B, C, H, W), t (B,), y (B,) or None) -> (B, C, H, W)."""

    def __init__(self, data_shape: list[int], patch: int = 4, width: int = 192, depth: int = 6, heads: int = 6,
                 num_classes: int = 0):
        super().__init__()
        c, h, w = data_shape
        for name, value in (("patch", patch), ("width", width), ("heads", heads)):
            if value < 1:  # 0 divided by zero, a negative value made a tensor of negative size
                raise DDMError(f"DiT: kwargs.{name} = {value}; give a whole number of 1 or more")
        if h % patch or w % patch:
            fits = [p for p in range(patch - 1, 0, -1) if not h % p and not w % p][0]
            raise DDMError(f"DiT: an input of {h}x{w} does not split into patches of {patch}x{patch}; give a patch that "
                           f"divides both sides (e.g. patch = {fits}), or pad the data to a multiple of {patch}")
        if width % heads:
            raise DDMError(f"DiT: width {width} is not divisible by heads {heads}; give a width that is a multiple "
                           "of heads")
        self.data_shape, self.patch, self.num_classes, self.width = tuple(data_shape), patch, num_classes, width
        self.embed_patches = nn.Conv2d(c, width, patch, stride=patch)
        self.register_buffer("pos", positions_2d(h // patch, w // patch, width).to(torch.get_default_device()),
                             persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False)
        self.ada_out = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, patch * patch * c)
        for layer in (self.ada_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise DDMError(f"DiT built for images {self.data_shape} got {tuple(x.shape[1:])}")
        b, c, height, width = x.shape
        p = self.patch
        h = self.embed_patches(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        emb = self.time_mlp(timestep_embedding(t, self.width))
        if self.label_emb is not None:
            y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device) if y is None else y
            emb = emb + self.label_emb(y)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.ada_out(nn.functional.silu(emb))[:, None].chunk(2, dim=-1)
        h = self.out(self.norm_out(h) * (1 + scale) + shift)  # (B, N, p*p*C)
        h = h.reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c, height, width)
