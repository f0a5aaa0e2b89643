"""Small image networks for the GPU benchmarks: a UNet-shaped expert and a conv router.

Used when ddmkit has no UNet of its own (or to keep the benchmark's expert
fixed while the library's changes). The expert is a two-level UNet:

    32x32, C -> w -> ResBlock -> down (2w, 16x16) -> 2 ResBlocks -> up (w, 32x32)
             -> concat skip -> ResBlock -> C

with the time embedding added in every ResBlock. About 0.9 GFLOP per
32x32 image forward at width 64.
"""
from __future__ import annotations

import torch
from torch import nn

from ddmkit.nets.mlp import timestep_embedding


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, ch)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.n1, self.c1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.n2, self.c2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, h, e):
        a = self.c1(nn.functional.silu(self.n1(h))) + self.emb(e)[:, :, None, None]
        return self.skip(h) + self.c2(nn.functional.silu(self.n2(a)))


class ConvUNet(nn.Module):
    """Velocity network for (B, C, H, W) images, H and W even."""

    def __init__(self, channels: int = 3, width: int = 64, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        emb = 4 * width
        self.time = nn.Sequential(nn.Linear(time_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.enc = ResBlock(width, width, emb)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([ResBlock(2 * width, 2 * width, emb) for _ in range(2)])
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * width, width, 3, padding=1))
        self.dec = ResBlock(2 * width, width, emb)
        self.out = nn.Sequential(_norm(width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t):
        e = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        skip = self.enc(self.inp(x), e)
        h = self.down(skip)
        for block in self.mid:
            h = block(h, e)
        return self.out(self.dec(torch.cat([self.up(h), skip], 1), e))


class ConvRouter(nn.Module):
    """Logits over K experts from (B, C, H, W) images: two strided convs, pool, linear with t, plus a
    linear map of the 4x4-pooled pixels.

    The pixel term stands in for what training gives a router: logits that differ from image to
    image. With random weights the conv path alone gives every noise image nearly the same logits
    (its time and bias terms, equal for all rows, dominate), so every row would go to one expert
    and there would be no dispatch to measure; with the pixel term the argmax
    spreads over the experts (weights N(0, 64/d): unit-variance logits from pure noise)."""

    def __init__(self, channels: int, num_experts: int, width: int = 32, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.features = nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.SiLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * width + time_dim, 2 * width), nn.SiLU(),
                                  nn.Linear(2 * width, num_experts))
        self.pixels = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * channels, num_experts))
        nn.init.normal_(self.pixels[2].weight, std=8 * (16 * channels) ** -0.5)  # a pooled cell of noise: std 1/8

    def forward(self, x, t):
        f = self.features(x)
        return self.head(torch.cat([f, timestep_embedding(t, self.time_dim).to(f.dtype)], 1)) + self.pixels(x)
