"""A small pre-norm transformer over byte tokens, causal or bidirectional.

    CausalTransformer(out_dim=256)        next-byte logits   (B, n) -> (B, n, 256)   autoregressive expert
    CausalTransformer(out_dim=K)          prefix router      (B, n) -> (B, n, K)     logits of P(k | x_<=n)
    BidirectionalTransformer(out_dim=256) masked denoiser    (B, L) -> (B, L, 256)   logits of p(x_0^i | x_t)
    BidirectionalTransformer(out_dim=K, pool=True)  router on masked sequences (B, L) -> (B, K)

Listed in ddmkit.nets.ARCHITECTURES as "causal_transformer" and
"bidirectional_transformer", so save_pretrained / from_pretrained handle them.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BYTE_VOCAB = 258  # byte tokens 0-255, BOS = 256, MASK = 257 (ddmkit.discrete.tokens)


class Block(nn.Module):
    """h <- h + Attn(LN h);  h <- h + MLP(LN h)."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.norm2(h))


class TokenTransformer(nn.Module):
    def __init__(self, seq_len: int, out_dim: int, width: int = 128, depth: int = 2, heads: int = 4,
                 causal: bool = True, pool: bool = False, vocab_size: int = BYTE_VOCAB):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.seq_len, self.pool = seq_len, pool
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(nn.init.normal_(torch.empty(seq_len, width), std=0.02))  # randn * 0.02, skipped on meta
        self.blocks = nn.ModuleList(Block(width, heads, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return self.head(h.mean(1) if self.pool else h)


class CausalTransformer(TokenTransformer):
    def __init__(self, seq_len: int, out_dim: int, width: int = 128, depth: int = 2, heads: int = 4):
        super().__init__(seq_len, out_dim, width, depth, heads, causal=True)


class BidirectionalTransformer(TokenTransformer):
    def __init__(self, seq_len: int, out_dim: int, width: int = 128, depth: int = 2, heads: int = 4,
                 pool: bool = False):
        super().__init__(seq_len, out_dim, width, depth, heads, causal=False, pool=pool)
