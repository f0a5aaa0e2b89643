"""Adaptive routing strategies, built on what the alignment diagnostics measure.

    adaptive-P         the fewest experts (by router probability) whose mass reaches P, weights r renormalised
    adaptive-ent-H     top-1 while the router entropy H(r) <= H nats; otherwise the top
                       m = ceil(exp(H(r))) experts (the router's perplexity), weights r renormalised
    gated-K@A          top-K, but only top-1 where some routed expert's velocity is more than A degrees
                       from the top expert's (experts that disagree are not averaged)

`gated-K@A` looks at expert velocities, so it needs the state that the analysis sampler
(ddmkit.analysis.trace) exposes; its probe evaluations are counted as expert calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddmkit.errors import DDMError
from ddmkit.routing.strategies import Strategy, number, renormalise, top_mass


def keep_top(probs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """r restricted to the m_b largest entries of each row b, renormalised."""
    order = probs.argsort(1, descending=True)
    keep_sorted = torch.arange(probs.shape[1], device=probs.device)[None] < m[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return renormalise(probs * keep)


@dataclass(frozen=True)
class AdaptiveMass(Strategy):
    p: float

    @property
    def name(self):
        return f"adaptive-{number(self.p)}"

    def weights(self, probs, state):
        return renormalise(probs * top_mass(probs, self.p))


@dataclass(frozen=True)
class AdaptiveEntropy(Strategy):
    h: float

    @property
    def name(self):
        return f"adaptive-ent-{number(self.h)}"

    def weights(self, probs, state):
        ent = -torch.special.xlogy(probs, probs).sum(1)
        m = torch.where(ent <= self.h, torch.ones_like(ent), ent.exp().ceil())
        return keep_top(probs, m.long().clamp(1, probs.shape[1]))


@dataclass(frozen=True)
class GatedTopK(Strategy):
    k: int
    angle: float

    @property
    def name(self):
        return f"gated-{self.k}@{number(self.angle)}"

    def weights(self, probs, state):
        if state.probe is None or state.probe.x is None:
            raise DDMError(f"strategy {self.name!r} compares expert velocities and needs the analysis sampler; "
                           "use `ddmkit analyze --strategy` (or ddmkit.analysis.trace.trace_strategy)")
        k = min(self.k, probs.shape[1])
        p, top = probs.topk(k, dim=1)
        vk = probe(state, top, p > 0)  # (B, k, D): experts of probability 0 are not called (compared with none)
        cos = (vk[:, 1:] * vk[:, :1]).sum(-1) / (vk[:, 1:].norm(dim=-1) * vk[:, :1].norm(dim=-1)).clamp_min(1e-30)
        if k > 1:  # only experts top-K would weight (probability > 0) are compared
            split = ((cos < math.cos(math.radians(self.angle))) & (p[:, 1:] > 0)).any(1)
        else:  # one expert: nothing to compare
            split = torch.zeros(len(probs), dtype=torch.bool, device=probs.device)
        m = torch.where(split, torch.ones_like(top[:, 0]), torch.full_like(top[:, 0], k))
        return keep_top(probs, m)


def probe(state, idx: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
    """Velocities (B, k, D) of experts idx[b, j] at the state's current (x, t), one call per expert used;
    with `used` (B, k) only where it is true (zeros elsewhere)."""
    x, t, experts, counter = state.probe.x, state.probe.t, state.probe.experts, state.probe.counter
    out = torch.zeros(*idx.shape, x[0].numel(), dtype=x.dtype, device=x.device)
    for e in idx.unique().tolist():
        rows, slot = ((idx == e) if used is None else (idx == e) & used).nonzero(as_tuple=True)
        if len(rows) == 0:
            continue
        out[rows, slot] = experts[e](x[rows], t[rows]).reshape(len(rows), -1).to(x.dtype)
        if counter is not None:
            counter.add(e, len(rows))
    return out
