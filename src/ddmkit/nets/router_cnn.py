"""A small CNN router for images: logits over K clusters given (x_t, t).

    router = RouterCNN(data_shape=[1, 32, 32], num_experts=8, channels=[32, 64, 128])
    logits = router(x_t, t)          # (B, K)

Strided residual conv stages with the time embedding added in each block,
then global average pooling and a linear head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddmkit.errors import DDMError
from ddmkit.nets.mlp import timestep_embedding
from ddmkit.nets.unet import ResBlock, _norm


class RouterCNN(nn.Module):
    def __init__(self, data_shape: list[int], num_experts: int, channels: list[int] = (32, 64, 128), time_dim: int = 64):
        super().__init__()
        self.data_shape, self.time_dim = tuple(data_shape), time_dim
        emb_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(data_shape[0], channels[0], 3, padding=1)
        self.blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        prev = channels[0]
        for c in channels:
            self.blocks.append(ResBlock(prev, c, emb_dim))
            self.downs.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            prev = c
        self.head = nn.Sequential(_norm(prev), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_experts))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise DDMError(f"RouterCNN built for images {self.data_shape} got {tuple(x.shape[1:])}")
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        h = self.conv_in(x)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))
        return self.head(h)
