"""Rows padded up to a few bucket sizes, so that calls whose batch size changes from call to call
see only a few sizes.

    bucket(n) = the smallest multiple of 2^(floor(log2(n - 1)) - log2(g)) that is >= n

(g buckets per octave: at most 1/g of the rows are padding, about 1/(2g) on average). cuDNN chooses
a convolution plan for each new batch size (several times the call itself for the image UNet:
docs/performance.md), and a sparse combiner's group sizes are new at almost every step; padded to
buckets, the sizes repeat and a call costs its arithmetic plus the padding rows. Rows must not
interact (true of every velocity network and router here: no batch statistics in eval mode).
"""
from __future__ import annotations

from typing import Callable

import torch


def bucket_size(n: int, per_octave: int = 8) -> int:
    """The padded batch size for n rows: n rounded up to a multiple of 2^(floor(log2(n - 1)) - log2(per_octave))
    (n itself while that step is 1); per_octave must be a power of two."""
    if n < 1:
        raise ValueError(f"bucket_size: n must be >= 1, got {n}")
    if per_octave < 1 or per_octave & (per_octave - 1):
        raise ValueError(f"bucket_size: per_octave must be a power of two, got {per_octave}")
    step = max(1, (1 << ((n - 1).bit_length() - 1)) // per_octave) if n > 1 else 1
    return -(-n // step) * step


def pad_rows(v: torch.Tensor, rows: int) -> torch.Tensor:
    """v (n, ...) with copies of its first row appended up to `rows` rows; a stride-0 time
    (the solvers' t.expand(n)) stays a stride-0 view."""
    if v.dim() == 1 and v.stride(0) == 0:
        return v[:1].expand(rows)
    return torch.cat([v, v[:1].expand(rows - len(v), *v.shape[1:])])


def padded(fn: Callable, per_octave: int = 8, large_per_octave: int = 8, small_rows: int = 256) -> Callable:
    """fn(x, t, **cond) with its rows padded up to a bucket size (copies of the first row, whose
    outputs are dropped): the batch sizes fn sees repeat, so per-size work (cuDNN's plan for each
    new batch size) is done once per bucket. Calls of at most `small_rows` rows get `per_octave`
    buckets per octave, larger calls `large_per_octave` (bound by arithmetic: 16 pads them by at most
    1/16 instead of 1/8, for twice as many plans; it pays in long runs). Rows must not interact, as
    for the graphs."""
    def call(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows = bucket_size(n, per_octave if n <= small_rows else large_per_octave)
        if rows == n:
            return fn(x, t, **cond)
        return fn(pad_rows(x, rows), pad_rows(t, rows), **{k: pad_rows(c, rows) for k, c in cond.items()})[:n]

    return call
