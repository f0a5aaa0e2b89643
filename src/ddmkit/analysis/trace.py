"""Recorded sampling trajectories: one pass of the sampler per strategy, reused by every diagnostic.

    tr = trace_strategy(ddm, "top-2", x1, steps=50, solver="euler", seed=0)
    tr.x[i], tr.v[i], tr.t[i], tr.probs[i], tr.w[i]     # step i: state, velocity, time, router, weights

The loop is the same as `ddmkit.ddm.sampling.sample_ddm` without conditioning
(same solver, same routing state and seeding, so the same samples), with the
routing state kept: the router is wrapped so every strategy can see the current
(x, t) and the experts (the `gated-K@A` strategies need them: state.probe), and
the solver callback stores the first velocity evaluation of every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddmkit.ddm.model import DDM
from ddmkit.ddm.sampling import probe_router, routing_generator, sample_field
from ddmkit.errors import DDMError
from ddmkit.flow.path import x0_from_velocity
from ddmkit.routing import CallCounter, RoutingState, parse_strategy, routed_velocity
from ddmkit.routing.strategies import ExpertProbe
from ddmkit.routing.combine import last_weights


@dataclass
class Trace:
    """One strategy's recorded trajectories; per-step tensors are stacked on dim 0 (N steps)."""

    strategy: str
    x1: torch.Tensor  # (B, *shape) starting noise
    x0: torch.Tensor  # (B, *shape) samples
    t: torch.Tensor  # (N,)
    x: torch.Tensor  # (N, B, *shape) state at the start of each step
    v: torch.Tensor  # (N, B, *shape) routed velocity there
    probs: torch.Tensor  # (N, B, K) router probabilities
    w: torch.Tensor  # (N, B, K) routing weights the strategy used
    x0_prev: list  # per step: the routing state's x0_hat before the step (None on the first)
    oracle: torch.Tensor | None  # the oracle's fixed clusters, if any
    expert_calls_per_sample: float

    @property
    def x0_hat(self) -> torch.Tensor:
        """x0_hat = x_t - t v at every step, (N, B, *shape)."""
        return x0_from_velocity(self.v, self.x, self.t)  # t (N,): one time per step, the rows of x


def new_state(ddm: DDM, seed: int, device="cpu") -> RoutingState:
    """The routing state sample_ddm starts from (its routing generator)."""
    return RoutingState(generator=routing_generator(seed, device), prior=ddm.prior, nearest=ddm.nearest)


def hooked_field(ddm: DDM, strategy, state: RoutingState, counter: CallCounter | None = None,
                 seen: dict | None = None):
    """The routed velocity field, with the experts at the routed (x, t) visible to the strategy (state.probe);
    `seen`, when given, holds the last routing's router probabilities ("probs") and the x0_hat it saw
    ("x0_prev")."""
    state.probe = ExpertProbe(experts=ddm.experts, counter=counter)

    def router(x, t):
        p = ddm.router(x, t)
        state.probe.x, state.probe.t = x, t
        if seen is not None:
            seen.update(probs=p, x0_prev=state.x0_hat)
        return p

    return routed_velocity(ddm.experts, router, strategy, state, counter, keep_selection=False)  # probs every step


def trace_strategy(ddm: DDM, strategy: str, x1: torch.Tensor, steps: int, solver: str = "euler",
                   seed: int = 0, record: bool = True) -> Trace:
    """Sample from x1 with one strategy, recording every step (record=False keeps only x0). The diagnostics
    are per step: a fixed-step solver (the adaptive one reports no steps). The router is probed first, as
    sample_ddm probes it (ddmkit.ddm.sampling.probe_router)."""
    if solver == "adaptive":
        raise DDMError("the analysis sampler records fixed steps; the adaptive solver has none: trace with "
                       "euler, heun, midpoint or rk4")
    strat = parse_strategy(strategy)
    probe_router(ddm, x1)
    state = new_state(ddm, seed, x1.device)
    counter = CallCounter()
    seen: dict = {}
    field = hooked_field(ddm, strat, state, counter, seen)
    rec: dict[str, list] = {key: [] for key in ("t", "x", "v", "probs", "w", "x0_prev")}

    def callback(step):
        if not record:
            return
        rec["t"].append(step["t"].reshape(()))
        rec["x"].append(step["x"])
        rec["v"].append(step["v"])
        rec["probs"].append(seen["probs"])
        rec["w"].append(last_weights(state, ddm.k))
        rec["x0_prev"].append(seen["x0_prev"])

    x0 = sample_field(field, x1, steps, solver, callback)
    calls = counter.total_rows / len(x1)
    if not record:
        empty = torch.empty(0, device=x1.device)
        return Trace(strategy, x1, x0, empty, empty, empty, empty, empty, [], state.oracle, calls)
    stack = {key: torch.stack(val) for key, val in rec.items() if key != "x0_prev"}
    return Trace(strategy, x1, x0, stack["t"], stack["x"], stack["v"], stack["probs"], stack["w"],
                 rec["x0_prev"], state.oracle, calls)


def replay_state(ddm: DDM, tr: Trace, i: int, rows: torch.Tensor, seed: int) -> RoutingState:
    """A routing state as it was at step i for the given rows (x0_hat memory, oracle), with a
    fixed generator: two copies draw the same random numbers (common random numbers)."""
    state = new_state(ddm, seed + 1000 + i, tr.x.device)
    state.x0_hat = None if tr.x0_prev[i] is None else tr.x0_prev[i][rows]
    state.oracle = None if tr.oracle is None else tr.oracle[rows]
    return state


def strategy_weights(ddm: DDM, strategy, probs: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                     x0_hat: torch.Tensor | None, seed: int = 0,
                     clusters: torch.Tensor | None = None) -> torch.Tensor:
    """The weights a strategy gives at states x (not on a trajectory): x0_hat stands in for the
    previous step's estimate (nearest-cluster routing), randomness from a fixed seed. With the clusters
    (B,) of the data points the states were made from, the oracle routes each to its own cluster (the
    cluster its trajectory would end in); without them it draws one from the prior."""
    state = new_state(ddm, seed, x.device)
    state.x0_hat = x0_hat
    state.oracle = clusters
    state.probe = ExpertProbe(experts=ddm.experts, x=x, t=t)
    return strategy.weights(probs, state)
