"""Concurrent (stacked) expert training, ddmkit.train.concurrent: its batches, checkpoints and expert folders."""
from __future__ import annotations

import torch

from ddmkit.train.concurrent import stacked_sampler


def test_the_stacked_sampler_draws_every_row_of_a_shard_beyond_2_to_the_24_rows():
    """A float32 u in [0, 1) is m / 2^24, so floor(u n) for n = 2^25 is always even: half the rows were never
    drawn. Integer draws reach the odd rows too, about half the time."""
    n = 2**25
    parity = torch.tensor([0.0, 1.0]).repeat(n // 2)  # row i holds i mod 2
    x, y = stacked_sampler([parity], None, 4000, "cpu")(torch.Generator().manual_seed(0))
    assert x.shape == (1, 4000) and y is None
    assert 0.45 < x.mean().item() < 0.55


def test_the_stacked_sampler_draws_each_experts_rows_from_its_own_shard_uniformly():
    sizes = [3, 7]
    parts = [torch.arange(n, dtype=torch.float32) + 100 * k for k, n in enumerate(sizes)]
    labels = [torch.full((n,), k) for k, n in enumerate(sizes)]
    x, y = stacked_sampler(parts, labels, 70_000, "cpu")(torch.Generator().manual_seed(1))
    for k, n in enumerate(sizes):
        assert torch.equal(y[k], torch.full((70_000,), k))
        counts = torch.bincount((x[k] - 100 * k).long(), minlength=n)
        assert len(counts) == n and (counts - 70_000 / n).abs().max() < 5 * (70_000 / n) ** 0.5
