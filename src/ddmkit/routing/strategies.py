"""Routing strategies: router probabilities (B, K) -> sparse weights (B, K).

Each strategy is a small frozen dataclass with
`weights(probs, state) -> (B, K)`; rows of the result sum to 1 and most
entries are zero. `state` (a RoutingState) carries the per-trajectory
randomness and memory (the oracle's fixed cluster per sample, the previous
x0_hat for nearest-cluster routing).

Strategies that pick the same number n of experts for every row also have
`select(probs, state) -> (experts (B, n) long, weights (B, n))`, the same
routing in sparse form (`weights` is its dense scatter). The sparse combiner
plans from it directly, without building and searching the dense (B, K)
matrix; `one_expert` marks the strategies whose every row has one expert of
weight 1 (so the combiner adds outputs back without weighting them). They
derive from `Selecting`, which gives them `weights`. `dense` marks the strategy
whose weights are the router's probabilities themselves (every expert on every row).

Every strategy has a name form (`top-2`, `nucleus-0.9@0.5`) registered in one table,
ddmkit.routing.table, which parses names and documents them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ddmkit.errors import DDMError


@dataclass
class ExpertProbe:
    """What a strategy that compares the experts' velocities sees (the gated strategies): the state (x, t)
    being routed and the experts, kept up to date by the analysis sampler (ddmkit.analysis.trace);
    `counter` (a CallCounter, or None) counts the probe's expert calls."""

    experts: Sequence[Callable]
    counter: object | None = None
    x: torch.Tensor | None = None
    t: torch.Tensor | None = None


@dataclass
class RoutingState:
    """Per-trajectory state shared by the strategy and the sampler."""

    generator: torch.Generator | None = None
    prior: torch.Tensor | None = None  # (K,) cluster proportions, or (B, K) per sample, for the oracle
    nearest: Callable[[torch.Tensor], torch.Tensor] | None = None  # x0_hat -> (B,) cluster index
    oracle: torch.Tensor | None = None  # (B,) fixed cluster per sample
    x0_hat: torch.Tensor | None = None  # x_t - t v of the previous velocity evaluation
    last_weights: torch.Tensor | tuple | None = None  # the last routing: dense (B, K), or a selection (idx, w)
    probe: ExpertProbe | None = None  # the experts at (x, t), for the strategies that compare them


def number(v: float) -> str:
    """A parameter as written in a name: the short form (%g) where it reads back as the same number, else
    the shortest form that does (repr)."""
    short = f"{v:g}"
    return short if float(short) == v else repr(float(v))


def top_mass(probs: torch.Tensor, p: float) -> torch.Tensor:
    """(B, K) mask of each row's largest entries whose mass first reaches p: those whose preceding mass,
    in descending order, is below p (at least the largest one, for p > 0)."""
    ordered, order = probs.sort(dim=1, descending=True)
    keep_ordered = (ordered.cumsum(1) - ordered) < p
    if p > 0:  # the largest (preceding mass 0) always: p is compared in probs' dtype, where 1e-8 is 0 in float16
        keep_ordered[:, 0] = True
    return torch.zeros_like(keep_ordered).scatter(1, order, keep_ordered)


def renormalise(w: torch.Tensor) -> torch.Tensor:
    """Rows of non-negative weights (B, n) scaled to sum to 1 (a row of zeros stays zero)."""
    total = w.sum(1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def dense_weights(experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The (B, K) weight matrix of a selection, experts (B, n) and weights (B, n)."""
    return torch.zeros(experts.shape[0], num_experts, dtype=weights.dtype, device=weights.device).scatter(
        1, experts, weights)


def _single(idx: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert per row with weight 1: idx (B,) -> ((B, 1), ones (B, 1))."""
    return idx[:, None], torch.ones(idx.shape[0], 1, dtype=probs.dtype, device=probs.device)


class Strategy:
    """Base of every strategy: what the combiner needs to know of it (class attributes)."""

    dense = False  # weights = the router's probabilities: every expert on every row, no plan
    selects = False  # has select(probs, state) -> (experts (B, n), weights (B, n))
    one_expert = False  # every row gets one expert of weight 1
    routes_once = False  # the selection of the first evaluation is kept for the whole trajectory (oracle):
    #                      the router is called, and the dispatch planned, once


class Selecting(Strategy):
    """Base of the strategies with `select`: their dense weights are the scatter of the selection."""

    selects = True

    def weights(self, probs, state):
        idx, w = self.select(probs, state)
        return dense_weights(idx, w.to(probs.dtype), probs.shape[1])


def _tempered_log(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """log(p) / T up to a constant per row: -inf where p = 0, so an expert of probability 0 (a missing one,
    say) is never drawn at any temperature; a row of zeros gives zeros (every expert alike). For T < 1 the
    row's largest log(p) is subtracted first, so that dividing by a tiny T cannot overflow to -inf."""
    logp = probs.log()
    if temperature < 1:
        logp = logp - logp.amax(1, keepdim=True)
    logp = logp / temperature
    return torch.where((probs != 0).any(1, keepdim=True), logp, torch.zeros_like(logp))  # NaN rows stay NaN


@dataclass(frozen=True)
class Full(Strategy):
    name: str = "full"
    dense = True

    def weights(self, probs, state):
        return probs


@dataclass(frozen=True)
class TopK(Selecting):
    k: int

    @property
    def name(self):
        return f"top-{self.k}"

    @property
    def one_expert(self):
        return self.k == 1

    def select(self, probs, state):
        if self.k == 1:  # max is cheaper than topk; the renormalised weight is p / p = 1 (0 for a zero row)
            p, idx = probs.max(1, keepdim=True)
            return idx, (p > 0).to(probs.dtype)
        p, idx = probs.topk(min(self.k, probs.shape[1]), dim=1)
        return idx, renormalise(p)


@dataclass(frozen=True)
class Threshold(Strategy):
    p: float

    @property
    def name(self):
        return f"threshold-{number(self.p)}"

    def weights(self, probs, state):
        keep = (probs >= self.p) | (probs == probs.amax(1, keepdim=True))
        return renormalise(probs * keep)


@dataclass(frozen=True)
class SampleK(Selecting):
    k: int
    temperature: float = 1.0

    @property
    def name(self):
        return f"sample-{self.k}" + (f"@{number(self.temperature)}" if self.temperature != 1.0 else "")

    @property
    def one_expert(self):
        return self.k == 1

    def select(self, probs, state):
        dt = torch.promote_types(probs.dtype, torch.float32)  # Gumbel noise in at least float32
        u = torch.rand(probs.shape, generator=state.generator, device=probs.device, dtype=dt)
        gumbel = -(-u.clamp_min(torch.finfo(dt).tiny).log()).log()
        scores = _tempered_log(probs.to(dt), self.temperature) + gumbel
        idx = scores.topk(min(self.k, probs.shape[1]), dim=1).indices
        w = probs.gather(1, idx)  # experts of probability 0, drawn last when K exceeds the others, get weight 0
        return idx, renormalise(torch.where((w != 0).any(1, keepdim=True), w, torch.ones_like(w)))


@dataclass(frozen=True)
class Nucleus(Selecting):
    p: float
    temperature: float = 1.0

    @property
    def name(self):
        return f"nucleus-{number(self.p)}" + (f"@{number(self.temperature)}" if self.temperature != 1.0 else "")

    one_expert = True

    def select(self, probs, state):
        q = torch.softmax(_tempered_log(probs, self.temperature), dim=1)
        q = renormalise(q * top_mass(q, self.p))
        return _single(torch.multinomial(q, 1, generator=state.generator).squeeze(1), probs)


@dataclass(frozen=True)
class Switch(Selecting):
    name: str = "switch"
    one_expert = True

    def select(self, probs, state):
        q = probs.clamp_min(0)
        q = torch.where(q.sum(1, keepdim=True) > 0, q, torch.ones_like(q))  # a row of zeros: uniform, as sample-1
        return _single(torch.multinomial(q, 1, generator=state.generator).squeeze(1), probs)


@dataclass(frozen=True)
class Oracle(Selecting):
    name: str = "oracle"
    one_expert = True
    routes_once = True

    def select(self, probs, state):
        if state.oracle is None:
            if state.prior is None:
                raise DDMError("strategy 'oracle' needs the cluster proportions (a partition manifest)")
            prior = state.prior.to(probs.device, probs.dtype).expand(probs.shape[0], -1)
            state.oracle = torch.multinomial(prior, 1, generator=state.generator).squeeze(1)
        return _single(state.oracle, probs)


@dataclass(frozen=True)
class Nearest(Selecting):
    """The cluster whose centroid is nearest to x0_hat = x_t - t v of the previous velocity evaluation
    (with heun, midpoint or rk4, possibly a stage of the step). With no x0_hat yet (the first step) one
    expert drawn from the router, as sample-1: near t = 1 the posterior is about the
    prior for every x, and its argmax would send every row to one cluster, which then keeps it (the
    expert's x0_hat is its own cluster's mean)."""
    name: str = "nearest"
    one_expert = True

    def select(self, probs, state):
        if state.x0_hat is None:
            return SampleK(1).select(probs, state)
        if state.nearest is None:
            raise DDMError("strategy 'nearest' needs the nearest-cluster map (x -> (B,) cluster index of the "
                           "nearest centroid): a run's DDM has it from its partition; give one built by hand "
                           "nearest=...")
        return _single(state.nearest(state.x0_hat).to(probs.device), probs)


def redraws_each_evaluation(strategy: Strategy) -> bool:
    """Whether a strategy draws its experts anew at every velocity evaluation (sample-K, nucleus, switch): an
    adaptive solver's error control, which compares evaluations, then rejects step after step."""
    return isinstance(strategy, (SampleK, Nucleus, Switch))
