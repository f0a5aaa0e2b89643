"""A small CNN router for images: logits over K clusters given (x_t, t), or
(x_t, t, y) for a label-conditional router p(cluster | x_t, t, y).

    router = RouterCNN(data_shape=[1, 32, 32], num_experts=8, channels=[32, 64, 128])
    logits = router(x_t, t)          # (B, K)
    router = RouterCNN(..., num_classes=10)
    logits = router(x_t, t, y)       # y=None (or the label num_classes): p(cluster | x_t, t)

Strided residual conv stages with the time (+ class) embedding added in each
block, then global average pooling and a linear head. With class-conditional
experts the label says much about the cluster (a k-means cluster of pixels
holds some classes and not others), so the conditional router routes a
"sneaker" away from experts that never saw one; the extra "no label" row of
the embedding keeps p(cluster | x_t, t) available.
"""
from __future__ import annotations

import torch
from torch import nn

from ddmkit.errors import DDMError
from ddmkit.nets.mlp import timestep_embedding
from ddmkit.nets.unet import ResBlock, _norm, check_channels


class RouterCNN(nn.Module):
    def __init__(self, data_shape: list[int], num_experts: int, channels: list[int] = (32, 64, 128), time_dim: int = 64,
                 num_classes: int = 0):
        super().__init__()
        check_channels("RouterCNN", channels, "[32, 64, 128]")
        self.data_shape, self.time_dim, self.num_classes = tuple(data_shape), time_dim, num_classes
        emb_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(data_shape[0], channels[0], 3, padding=1)
        self.blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        prev = channels[0]
        for c in channels:
            self.blocks.append(ResBlock(prev, c, emb_dim))
            self.downs.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            prev = c
        self.head = nn.Sequential(_norm(prev), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_experts))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise DDMError(f"RouterCNN built for images {self.data_shape} got {tuple(x.shape[1:])}")
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.label_emb is not None:
            if y is None:
                y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))
        return self.head(h)
