"""A small UNet velocity network for images, optionally class-conditional.

    net = UNet(data_shape=[1, 32, 32], channels=[64, 128, 128], num_classes=10)
    v = net(x_t, t, y=labels)        # y=None (or the label num_classes) is the unconditional branch

Each level has `blocks` residual blocks (GroupNorm, SiLU, 3x3 conv, with the
time (+ class) embedding added in between); levels are joined by strided
convolutions down and nearest-neighbour upsampling up, with one skip per
block. Self-attention runs at the resolutions listed in `attention_res`.
The output layer starts at zero, so an untrained network predicts v = 0.
The class embedding has one extra row, the "no label" token used for
classifier-free guidance.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddmkit.errors import DDMError
from ddmkit.nets.mlp import timestep_embedding


def _norm(c: int) -> nn.GroupNorm:
    """GroupNorm over c channels in at most min(32, c / 4) groups: the most that divide c (a skip
    concatenation such as 96 + 48 = 144 channels takes 24 groups, not 32)."""
    most = min(32, c // 4) if c >= 4 else 1
    return nn.GroupNorm(max(g for g in range(1, most + 1) if c % g == 0), c)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (plain ops, so torch.func.vmap works)."""

    def __init__(self, c: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm, self.qkv, self.proj = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) * (c // self.heads) ** -0.5, dim=-1)
        out = torch.einsum("bhnm,bhdm->bhdn", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


def check_channels(arch: str, channels, example: str = "[64, 128, 128]") -> None:
    """A DDMError unless `channels` (a UNet's or a CNN router's kwargs.channels) is a non-empty list of widths of
    1 or more: [] failed with an IndexError, a negative width with torch's 'negative dimension'."""
    if not channels or any(type(c) is not int or c < 1 for c in channels):
        raise DDMError(f"{arch}: kwargs.channels = {list(channels)}; give one width of 1 or more per level, e.g. "
                       f"{example}")


def check_size(height: int, width: int, channels: list[int], scale: int = 1,
               fix: Callable[[int, int, int], str] | None = None) -> None:
    """A DDMError when a UNet of `channels` cannot take height x width inputs (each level after the first halves
    them), with the data settings that fix it: for images `scale` times larger per side than the inputs (a
    latent run's images, of which an autoencoder makes the inputs). fix(height, width, multiple) says how to make
    the images square of a side `multiple` divides (default size_fix: the image loaders' settings)."""
    levels = len(channels) - 1
    if not (height % 2 ** levels or width % 2 ** levels):
        return
    what = f"image size {height}x{width}" if scale == 1 else \
        f"latent size {height}x{width} (of {height * scale}x{width * scale} images, {scale}x smaller per side)"
    raise DDMError(f"UNet: {what} is not divisible by 2^{levels} (channels {list(channels)}); "
                   f"{(fix or size_fix)(height * scale, width * scale, 2 ** levels * scale)}, or use fewer levels "
                   "(fewer entries in channels)")


def fitting_sides(height: int, width: int, multiple: int) -> tuple[int, int]:
    """(the smallest side divisible by `multiple` that holds height x width: to pad to, the largest one that both
    sides hold, 0 if none: to cut to)."""
    return -(-max(height, width) // multiple) * multiple, min(height, width) // multiple * multiple


def size_fix(height: int, width: int, multiple: int) -> str:
    """The data settings that make height x width images square of a side divisible by `multiple`: the smallest
    pad_to, and the largest resize and crop (when the images are at least that large; the loaders of image folders and
    arrays take them)."""
    pad, cut = fitting_sides(height, width, multiple)
    fix = f"pad the images to {pad}x{pad} (data.params.pad_to = {pad}, the smallest that works)"
    if cut:
        fix += (f", or scale and cut them to {cut}x{cut} (an image folder or array: data.params.resize = {cut} and "
                f"data.params.crop = {cut})")
    return fix


class UNet(nn.Module):
    """(x (B, C, H, W), t (B,), y (B,) or None) -> (B, C, H, W)."""

    def __init__(self, data_shape: list[int], channels: list[int] = (64, 128, 128), blocks: int = 1,
                 attention_res: list[int] = (8,), num_classes: int = 0, time_dim: int | None = None):
        super().__init__()
        c_in, height, width = data_shape
        check_channels("UNet", channels)
        if blocks < 0:  # fewer blocks up than down: the first training step failed on the skips' channels
            raise DDMError(f"UNet: kwargs.blocks = {blocks}; give a whole number of 0 or more (default 1)")
        check_size(height, width, channels)
        self.data_shape, self.num_classes = tuple(data_shape), num_classes
        base = channels[0]
        self.time_dim = time_dim or base
        emb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(c_in, base, 3, padding=1)

        self.down, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        skips, prev, res = [base], base, height
        for i, c in enumerate(channels):
            for _ in range(blocks):
                self.down.append(ResBlock(prev, c, emb_dim))
                self.down_attn.append(Attention(c) if res in attention_res else nn.Identity())
                prev = c
                skips.append(c)
            last = i == len(channels) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)
                res //= 2
        self.mid1, self.mid_attn, self.mid2 = ResBlock(prev, prev, emb_dim), Attention(prev), ResBlock(prev, prev, emb_dim)

        self.up, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(prev + skips.pop(), c, emb_dim))
                self.up_attn.append(Attention(c) if res in attention_res else nn.Identity())
                prev = c
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2
        self.blocks = blocks
        self.norm_out, self.conv_out = _norm(prev), nn.Conv2d(prev, c_in, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.label_emb is not None:
            if y is None:
                y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise DDMError(f"UNet built for images {self.data_shape} got {tuple(x.shape[1:])}")
        emb = self.embed(t, y)
        h = self.conv_in(x)
        hs = [h]
        blocks = iter(zip(self.down, self.down_attn))
        for down in self.downsample:
            for _ in range(self.blocks):
                block, attn = next(blocks)
                h = attn(block(h, emb))
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        blocks = iter(zip(self.up, self.up_attn))
        for up in self.upsample:
            for _ in range(self.blocks + 1):
                block, attn = next(blocks)
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
