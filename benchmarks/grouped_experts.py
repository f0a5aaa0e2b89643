"""Grouped execution of K MLP experts of one architecture: the experiment of issue 8 that did not pay.

Not a benchmark by itself: `sampling.py --variants` times it against the per-expert calls of the
library's combiner (docs/PERFORMANCE.md has the numbers and why it loses on the CPU we measured).

The library's sparse combiner calls each active expert once on its rows, K calls a step. Here the K
`TimeMLP` experts (`VelocityMLP`) are evaluated as one network on the rows grouped by expert, so
that the ~20 row-wise operations of the network (SiLU, residual adds, the time embedding) run once
for all rows instead of once per expert. Two ways to do the per-expert layers:

    "loop"        each linear layer and LayerNorm once per group (torch.addmm with expert k's
                  weight and bias into rows s:e of one output; layer_norm with its affine), rows in
                  passes of at most `block_rows` so that a pass's activations stay in the cache.
                  The same operations on the same rows as the per-expert calls: bitwise, except
                  where a pass cuts a group (MKL's blocking depends on the row count; 4e-7 at
                  width 512).
    "grouped_mm"  the weights stacked (K, in, out) and one torch.nn.functional.grouped_mm
                  (segment-wise matrix product) per layer; biases and LayerNorm affines gathered
                  per row. Exact to rounding (the sampling benchmark prints the difference).
"""
from __future__ import annotations

from itertools import accumulate
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ddmkit.nets.mlp import TimeMLP, VelocityMLP, timestep_embedding
from ddmkit.routing.combine import make_plan

Groups = list[tuple[int, int, int]]  # (expert, first row, end row)


def _passes(groups: Groups, block: int) -> list[tuple[int, int, Groups]]:
    """Cut the rows into passes of at most `block` rows (a group may straddle two), each pass's
    groups counted from its first row."""
    passes, cur, start = [], [], 0
    for k, s, e in groups:
        while s < e:
            stop = min(e, start + block)
            cur.append((k, s - start, stop - start))
            s = stop
            if stop == start + block:
                passes.append((start, stop, cur))
                cur, start = [], stop
    if cur:
        passes.append((start, cur[-1][2] + start, cur))
    return passes


class GroupedMLP:
    """K TimeMLP experts of one architecture evaluated as one network on rows grouped by expert."""

    def __init__(self, nets: Sequence[TimeMLP], mode: str = "loop", block_rows: int = 512):
        nets = list(nets)
        shapes = {n: p.shape for n, p in nets[0].state_dict().items()}
        if not all(type(n) is type(nets[0]) and isinstance(n, TimeMLP)
                   and {k: p.shape for k, p in n.state_dict().items()} == shapes for n in nets):
            raise ValueError("GroupedMLP needs TimeMLP experts of one class and one shape")
        self.nets, self.mode, self.block_rows = nets, mode, block_rows
        self.layers = {name: [m for n in nets for m in [dict(n.named_modules())[name]]]
                       for name, m in nets[0].named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))}
        if mode == "grouped_mm":
            with torch.no_grad():  # a copy: the weights as they are now
                self.stacked = {name: [torch.stack([getattr(m, p).detach() for m in mods])
                                       for p in ("weight", "bias")] for name, mods in self.layers.items()}
            for name, (w, b) in self.stacked.items():
                if w.dim() == 3:
                    self.stacked[name][0] = w.transpose(1, 2).contiguous()  # (K, in, out)

    # ------------------------------------------------------------ one layer over all groups

    def _linear(self, name: str, a: torch.Tensor, groups: Groups, seg) -> torch.Tensor:
        if self.mode == "grouped_mm":
            w, b = self.stacked[name]
            return F.grouped_mm(a, w, offs=seg[0]) + b.index_select(0, seg[1])
        layers = self.layers[name]
        out = a.new_empty((a.shape[0], layers[0].out_features))
        for k, s, e in groups:  # exactly F.linear on the CPU: addmm(bias, a, weight.t())
            torch.addmm(layers[k].bias, a[s:e], layers[k].weight.t(), out=out[s:e])
        return out

    def _norm(self, name: str, h: torch.Tensor, groups: Groups, seg) -> torch.Tensor:
        if self.mode == "grouped_mm":
            g, b = self.stacked[name]
            n = F.layer_norm(h, h.shape[-1:], eps=self.layers[name][0].eps)
            return torch.addcmul(b.index_select(0, seg[1]), n, g.index_select(0, seg[1]))
        out = torch.empty_like(h)
        for k, s, e in groups:
            m = self.layers[name][k]
            out[s:e] = F.layer_norm(h[s:e], m.normalized_shape, m.weight, m.bias, m.eps)
        return out

    def forward_groups(self, x: torch.Tensor, t: torch.Tensor, groups: Groups) -> torch.Tensor:
        """TimeMLP.forward with expert k on rows s:e for each (k, s, e) in groups."""
        seg = None
        if self.mode == "grouped_mm":
            sizes = torch.zeros(len(self.nets), dtype=torch.int64)
            for k, s, e in groups:
                sizes[k] = e - s
            seg = (sizes.cumsum(0).to(torch.int32),
                   torch.repeat_interleave(torch.arange(len(self.nets)), sizes, output_size=len(x)))

        def lin(name, a):
            return self._linear(name, a, groups, seg)

        emb = lin("time_mlp.2", F.silu(lin("time_mlp.0", timestep_embedding(t, self.nets[0].time_dim))))
        h = lin("inp", x.reshape(x.shape[0], -1))
        for i in range(len(self.nets[0].blocks)):
            b = f"blocks.{i}."
            a = lin(b + "fc1", self._norm(b + "norm", h, groups, seg)) + lin(b + "emb", emb)
            h = h + lin(b + "fc2", F.silu(a))
        return lin("out.2", F.silu(self._norm("out.0", h, groups, seg)))

    def run_groups(self, experts: Sequence[int], counts: Sequence[int], x: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
        """Outputs on rows laid out as the combiner's plan: counts[0] rows of experts[0], then ..."""
        ends = list(accumulate(counts))
        groups = [(k, e - n, e) for k, n, e in zip(experts, counts, ends)]
        if self.mode == "grouped_mm":  # experts in ascending order, as make_plan lays them out
            out = self.forward_groups(x, t, groups)
        else:
            out = torch.cat([self.forward_groups(x[s:e], t[s:e], g) for s, e, g in _passes(groups, self.block_rows)])
        return out.reshape(x.shape) if isinstance(self.nets[0], VelocityMLP) else out


def grouped_velocity(grouped: GroupedMLP, router, strategy, state, counter=None):
    """What ddmkit.routing.routed_velocity does for a sparse strategy (route, plan, gather, experts,
    weighted scatter-add), with one grouped pass in place of the K expert calls."""
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        plan = make_plan(strategy.weights(router(x, t), state))
        if counter is not None:
            counter.router_calls += 1
            for k, n in zip(plan.experts, plan.counts):
                counter.add(k, n)
        if not plan.experts:
            return torch.zeros_like(x)
        out = grouped.run_groups(plan.experts, plan.counts, x.index_select(0, plan.rows), t.index_select(0, plan.rows))
        v = out.to(x.dtype) * plan.weights.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, plan.rows, v)
    return velocity
