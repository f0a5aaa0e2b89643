"""The sparse combiner and the routed velocity field.

    v(x, t) = sum_k w_k(x, t) v_k(x, t)

with w = strategy(router(x, t)). Each expert is evaluated only on the rows
that give it non-zero weight: one gather, one call per active expert, one
weighted scatter-add. The router is called once per velocity evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ddmkit.flow.path import x0_from_velocity
from ddmkit.routing.strategies import RoutingState

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CallCounter:
    """Counts expert evaluations (rows) and router calls (batches)."""

    expert_rows: list[int] = field(default_factory=list)
    router_calls: int = 0

    def add(self, k: int, rows: int) -> None:
        while len(self.expert_rows) <= k:
            self.expert_rows.append(0)
        self.expert_rows[k] += rows

    @property
    def total_rows(self) -> int:
        return sum(self.expert_rows)


def combine(experts: Sequence[Field], weights: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
            counter: CallCounter | None = None, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k weights[:, k] * experts[k](x, t), evaluating expert k only where weights[:, k] != 0.

    `cond` holds per-row conditioning (e.g. class labels, (B,)); expert k is
    then called as experts[k](x[rows], t[rows], **{name: c[rows]})."""
    out = torch.zeros_like(x)
    active = weights != 0
    shape = (-1,) + (1,) * (x.dim() - 1)
    for k in active.any(0).nonzero().flatten().tolist():
        rows = active[:, k].nonzero().flatten()
        extra = {name: c.index_select(0, rows) for name, c in (cond or {}).items()}
        v = experts[k](x.index_select(0, rows), t.index_select(0, rows), **extra)
        out.index_add_(0, rows, v.to(out.dtype) * weights.index_select(0, rows)[:, k].reshape(shape).to(out.dtype))
        if counter is not None:
            counter.add(k, rows.numel())
    return out


def combine_dense(experts: Sequence[Field], weights: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                  cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Reference: every expert on every row, then the weighted sum."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return sum(weights[:, k].reshape(shape) * experts[k](x, t, **(cond or {})) for k in range(len(experts)))


def routed_velocity(experts: Sequence[Field], router: Field, strategy, state: RoutingState,
                    counter: CallCounter | None = None, cond: dict[str, torch.Tensor] | None = None) -> Field:
    """The DDM's velocity field for a solver: route, combine, remember x0_hat.
    `cond` (per-row conditioning, e.g. class labels) is passed to the experts only."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        probs = router(x, t)
        if counter is not None:
            counter.router_calls += 1
        w = strategy.weights(probs, state)
        v = combine(experts, w, x, t, counter, cond)
        state.x0_hat = x0_from_velocity(v, x, t)
        state.extra["last_weights"] = w
        return v

    return velocity
