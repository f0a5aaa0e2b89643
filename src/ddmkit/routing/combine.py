"""The sparse combiner and the routed velocity field.

    v(x, t) = sum_k w_k(x, t) v_k(x, t)

with w = strategy(router(x, t)). Each expert is evaluated only on the rows
that give it non-zero weight, grouped by expert:

    1. plan:    the (row, expert) pairs with non-zero weight, sorted by expert,
                and how many rows each expert gets (the one host sync: the
                group sizes decide the shapes of the expert calls); from the
                strategy's sparse selection (B, n) where it has one, else from
                the dense weights (B, K);
    2. gather:  one index_select of x, t and the conditioning in that order;
    3. experts: one call per active expert on its contiguous slice;
    4. scatter: the weighted outputs added back to their rows (unweighted for
                one-expert strategies, whose weights are all 1), each row's in
                ascending expert order: the same bytes on every run and device
                (scatter_rows).

The router is called once per velocity evaluation, or once every
`router_every` evaluations (the routing is then reused in between, with no
router call and no host sync), or once per trajectory for a strategy whose
selection is made once (oracle). A dense strategy ("full") takes a dense path with
no plan and so no host sync at all.

Plain PyTorch: how the active experts' calls run (one after another, or on
concurrent CUDA streams) is the caller's `call_experts` (ddmkit.accel).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ddmkit.errors import DDMError
from ddmkit.flow.path import per_row, x0_from_velocity
from ddmkit.routing.strategies import RoutingState, Strategy, dense_weights

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Cond = dict[str, torch.Tensor]
# call_experts(calls, experts, counts, device) -> outputs: runs a step's expert calls (ddmkit.accel)
CallExperts = Callable[[Sequence[Callable[[], torch.Tensor]], Sequence[int], Sequence[int], torch.device],
                       list[torch.Tensor]]


@dataclass
class CallCounter:
    """Counts expert evaluations (rows, one entry per expert: num_experts entries from the start, more
    if a higher index is counted) and router calls (batches)."""

    num_experts: int = 0
    expert_rows: list[int] = field(init=False)
    router_calls: int = 0

    def __post_init__(self) -> None:
        self.expert_rows = [0] * self.num_experts

    def add(self, k: int, rows: int) -> None:
        while len(self.expert_rows) <= k:
            self.expert_rows.append(0)
        self.expert_rows[k] += rows

    @property
    def total_rows(self) -> int:
        return sum(self.expert_rows)


@dataclass(frozen=True)
class DispatchPlan:
    """The non-zero (row, expert) pairs of a weight matrix, grouped by expert.

    Pairs experts[j] are the slice of `rows` and `weights` of length counts[j],
    the slices laid end to end in the order of `experts` (ascending)."""

    rows: torch.Tensor  # (P,) row index of each pair
    weights: torch.Tensor  # (P,) weight of each pair
    experts: list[int]  # the active experts
    counts: list[int]  # rows per active expert, > 0
    unit: bool = False  # every row has at most one pair, of weight 1: scatter without weighting
    ranks: torch.Tensor | None = None  # (P,) each pair's place among its row's pairs; None: no row has 3 or more
    width: int = 0  # the most pairs of one row (the widest row), where ranks are given


def make_plan(weights: torch.Tensor) -> DispatchPlan:
    """Group the non-zero entries of weights (B, K) by expert: one host sync (the dense weights
    as a selection of all K experts per row)."""
    b, k = weights.shape
    return plan_selection(torch.arange(k, device=weights.device).expand(b, k), weights, k)


def plan_selection(experts: torch.Tensor, weights: torch.Tensor, num_experts: int,
                   unit: bool = False) -> DispatchPlan:
    """The plan of a sparse selection, experts (B, n) and weights (B, n): one host sync.

    A stable sort of the n B pairs by expert (so rows ascend within each
    expert), pairs of zero weight sorted last (into a group K) and cut off.
    The sort is queued before the sync, so the GPU sorts while the host waits."""
    n = experts.shape[1]
    flat_w, flat_e = weights.reshape(-1), experts.reshape(-1)
    outside = (flat_e < 0) | (flat_e >= num_experts)
    key = torch.where(flat_w != 0, torch.where(outside, num_experts + 1, flat_e), num_experts)
    order = key.argsort(stable=True)
    pairs_per_row = (key < num_experts).reshape(experts.shape).sum(1)
    widest = pairs_per_row.max().reshape(1) if len(pairs_per_row) else pairs_per_row.new_zeros(1)
    *counts, width = torch.cat([torch.bincount(key, minlength=num_experts + 1), widest]).tolist()  # the host sync
    if len(counts) > num_experts + 1:  # a key above K: an expert index out of range, with weight
        raise DDMError(f"select(probs, state) chose an expert outside 0 to {num_experts - 1} with non-zero weight; "
                       f"it must return indices of the DDM's {num_experts} experts")
    per_expert = counts[:num_experts]
    order = order[:sum(per_expert)]
    rows = order // n if n > 1 else order
    ranks = row_ranks(rows, len(pairs_per_row)) if width > 2 else None
    return DispatchPlan(rows=rows, weights=flat_w[order], experts=[k for k, c in enumerate(per_expert) if c],
                        counts=[c for c in per_expert if c], unit=unit, ranks=ranks, width=width if width > 2 else 0)


def row_ranks(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each pair's place (0, 1, ...) among the pairs of its row, in the order the pairs come: for a plan,
    whose pairs are sorted by expert, that is ascending expert."""
    by_row = rows.argsort(stable=True)
    per_row = torch.bincount(rows, minlength=num_rows)
    first = per_row.cumsum(0) - per_row  # where each row's pairs start in by_row
    ranks = torch.empty_like(rows)
    ranks[by_row] = torch.arange(len(rows), device=rows.device) - first[rows[by_row]]
    return ranks


def scatter_rows(v: torch.Tensor, rows: torch.Tensor, like: torch.Tensor, ranks: torch.Tensor | None = None,
                 width: int = 0) -> torch.Tensor:
    """out[r] = sum of v[p] over the pairs p with rows[p] = r, added in the order of their ranks.

    Without ranks, one index_add_: exact only where no row has more than two pairs (0 + a + b is the same
    float in either order, but (a + b) + c is not (a + c) + b, and a GPU's index_add_ adds in whatever order
    its threads land). With ranks (each pair's place in its row, below width), the pairs are put in a
    (rows, width) grid and added one column after another, starting from zero: the sum a CPU's index_add_
    makes of pairs in rank order, to the bit, on every run and device."""
    if ranks is None:
        return torch.zeros_like(like).index_add_(0, rows, v)
    grid = v.new_zeros((len(like) * width,) + tuple(like.shape[1:]))
    grid = grid.index_copy_(0, rows * width + ranks, v).unflatten(0, (len(like), width))
    out = torch.zeros_like(like)
    for place in range(width):
        out = out + grid[:, place]
    return out


def _split_cond(cond: Cond | None, rows: torch.Tensor, counts: list[int]) -> list[Cond]:
    """The conditioning gathered once in plan order, then cut into one dict per active expert."""
    parts = {name: c.index_select(0, rows).split(counts) for name, c in (cond or {}).items()}
    return [{name: p[j] for name, p in parts.items()} for j in range(len(counts))]


def apply_plan(experts: Sequence[Field], plan: DispatchPlan, x: torch.Tensor, t: torch.Tensor,
               counter: CallCounter | None = None, cond: Cond | None = None,
               call_experts: CallExperts | None = None) -> torch.Tensor:
    """One gather, one call per active expert, one weighted scatter-add (scatter_rows). The calls run through
    call_experts when given (e.g. on concurrent CUDA streams: the same results), else one after
    another."""
    if not plan.experts:
        return torch.zeros_like(x)
    xs = x.index_select(0, plan.rows).split(plan.counts)
    if t.dim() == 1 and t.stride(0) == 0:  # one time for the whole batch (the solvers' t.expand(B)): no gather
        ts = [t[:n] for n in plan.counts]
    else:
        ts = t.index_select(0, plan.rows).split(plan.counts)
    conds = _split_cond(cond, plan.rows, plan.counts)
    calls = [lambda k=k, xk=xk, tk=tk, ck=ck: experts[k](xk, tk, **ck)
             for k, xk, tk, ck in zip(plan.experts, xs, ts, conds)]
    if call_experts is not None:
        outs = call_experts(calls, plan.experts, plan.counts, x.device)
    else:
        outs = [call() for call in calls]
    for k, xk, out in zip(plan.experts, xs, outs):
        check_expert_output(k, out, xk)
    if counter is not None:
        for k, n in zip(plan.experts, plan.counts):
            counter.add(k, n)
    v = torch.cat(outs).to(x.dtype)
    if not plan.unit:  # (one-expert strategies: every weight is 1)
        v = v * per_row(plan.weights, x)
    return scatter_rows(v, plan.rows, x, plan.ranks, plan.width)


def check_expert_output(k: int, out, x: torch.Tensor) -> None:
    """Expert k's velocity must be a tensor of its input's shape (checked on the host: no sync); a
    (B, 1) output would otherwise broadcast into (B, D) silently."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DDMError(f"expert {k} returned {got} for an input of shape {tuple(x.shape)}; an expert's velocity "
                       "has its input's shape")


def check_weight_matrix(experts: Sequence[Field], weights, x: torch.Tensor, t) -> None:
    """combine's arguments: weights (B, K) for x's B rows and the K experts, t a tensor."""
    want = (len(x), len(experts))
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != want:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise DDMError(f"weights: got {got}; expected (B, K) = {want}, one row per row of x and one column per expert")
    if not isinstance(t, torch.Tensor):
        raise DDMError(f"t: got {type(t).__name__}; give a tensor, (B,) or one time expanded: "
                       "torch.full((len(x),), t)")


def combine(experts: Sequence[Field], weights: torch.Tensor, x: torch.Tensor, t: torch.Tensor, *,
            counter: CallCounter | None = None, cond: Cond | None = None) -> torch.Tensor:
    """sum_k weights[:, k] * experts[k](x, t), evaluating expert k only where weights[:, k] != 0.

    `cond` holds per-row conditioning (e.g. class labels, (B,)); expert k is
    then called as experts[k](x[rows], t[rows], **{name: c[rows]})."""
    check_weight_matrix(experts, weights, x, t)
    return apply_plan(experts, make_plan(weights), x, t, counter, cond)


def combine_dense(experts: Sequence[Field], weights: torch.Tensor, x: torch.Tensor, t: torch.Tensor, *,
                  counter: CallCounter | None = None, cond: Cond | None = None) -> torch.Tensor:
    """Every expert on every row, then the weighted sum: the reference, the
    naive implementation, and the no-sync path of the strategy "full" (one
    expert after another: on concurrent streams, K calls on every row would
    hold K times the memory of one)."""
    check_weight_matrix(experts, weights, x, t)
    out = torch.zeros_like(x)
    for k, expert in enumerate(experts):
        v = expert(x, t, **(cond or {}))
        check_expert_output(k, v, x)
        out = out + per_row(weights[:, k], x) * v.to(x.dtype)
        if counter is not None:
            counter.add(k, len(x))
    return out


def last_weights(state: RoutingState, num_experts: int) -> torch.Tensor:
    """The dense weights (B, K) of the routed field's last routing."""
    w = state.last_weights
    return dense_weights(*w, num_experts) if isinstance(w, tuple) else w  # a tuple: a sparse selection


def _strategy_name(strategy) -> str:
    return str(getattr(strategy, "name", type(strategy).__name__))


def check_weights(strategy, w, probs: torch.Tensor) -> None:
    """A strategy's weights must be a float tensor of the router's probabilities' shape (B, K): checked on
    the host (shapes and dtypes only, no sync), so a strategy of the user's fails with its name, not in
    the combiner or with silently wrong samples."""
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(probs.shape) or not w.is_floating_point():
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise DDMError(f"routing strategy {_strategy_name(strategy)!r}: weights(probs, state) returned {got}; "
                       f"expected float weights of the probabilities' shape (B, K) = {tuple(probs.shape)}")


def check_router_output(probs, x: torch.Tensor, num_experts: int) -> None:
    """The router's output must be probabilities (B, K) for x's B rows and the K experts: checked on the host
    (shape and dtype only: their values would cost a sync)."""
    want = (len(x), num_experts)
    if not isinstance(probs, torch.Tensor) or tuple(probs.shape) != want or not probs.is_floating_point():
        got = f"{probs.dtype} {tuple(probs.shape)}" if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise DDMError(f"the router returned {got}; expected float probabilities (B, K) = {want}, one column per "
                       "expert")


def check_selection(strategy, idx, w, probs: torch.Tensor) -> None:
    """A strategy's select must return experts (B, n), integers, and float weights (B, n), B the batch."""
    ok = isinstance(idx, torch.Tensor) and isinstance(w, torch.Tensor) and idx.dim() == 2 \
        and tuple(w.shape) == tuple(idx.shape) and idx.shape[0] == probs.shape[0] and w.is_floating_point() \
        and not idx.is_floating_point() and not idx.is_complex() and idx.dtype != torch.bool
    if not ok:
        got = ", ".join(f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                        for v in (idx, w))
        raise DDMError(f"routing strategy {_strategy_name(strategy)!r}: select(probs, state) returned ({got}); "
                       f"expected experts (B, n) as integers and weights (B, n) as floats, B = {probs.shape[0]} "
                       "rows")


def checked_select(strategy, probs: torch.Tensor, state: RoutingState) -> tuple[torch.Tensor, torch.Tensor]:
    """strategy.select(probs, state), checked on the host (check_selection; one expert per row for a
    one_expert strategy, whose outputs are added unweighted); else a DDMError naming the strategy."""
    selection = strategy.select(probs, state)
    if not isinstance(selection, tuple) or len(selection) != 2:
        got = f"a tuple of {len(selection)}" if isinstance(selection, tuple) else type(selection).__name__
        raise DDMError(f"routing strategy {_strategy_name(strategy)!r}: select(probs, state) returned {got}; "
                       "expected (experts, weights), both (B, n)")
    idx, w = selection
    check_selection(strategy, idx, w, probs)
    if strategy.one_expert and idx.shape[1] != 1:
        raise DDMError(f"routing strategy {_strategy_name(strategy)!r}: one_expert = True, but select(probs, "
                       f"state) returned {idx.shape[1]} experts per row, whose outputs would be added unweighted; "
                       "return one expert per row, or set one_expert = False")
    return idx, w


def routed_velocity(experts: Sequence[Field], router: Field, strategy, state: RoutingState,
                    counter: CallCounter | None = None, cond: Cond | None = None,
                    router_every: int = 1, router_cond: Cond | None = None,
                    call_experts: CallExperts | None = None, keep_selection: bool = True) -> Field:
    """The DDM's velocity field for a solver: route, combine, remember x0_hat.

    `cond` (per-row conditioning, e.g. class labels) is passed to the experts;
    `router_cond` to the router (a label-conditional router p(k | x_t, t, y)).
    `router_every` = m calls the router (and applies the strategy and plans the
    dispatch) on evaluations 0, m, 2m, ... and reuses that routing in between;
    m = 1 (the default) routes at every evaluation. A strategy whose selection is
    made once (routes_once: oracle) is routed on the first evaluation only, unless
    keep_selection = False (a caller that records the router's probabilities at every
    step; the samples are the same). `call_experts` runs a sparse step's expert calls
    (apply_plan)."""
    if not isinstance(router_every, int) or router_every < 1:
        raise DDMError(f"router_every: must be an integer >= 1 (got {router_every!r})")
    if isinstance(strategy, str):
        raise DDMError(f"routing strategy {strategy!r}: routed_velocity takes a Strategy object; make one from its "
                       f"name with ddmkit.routing.parse_strategy({strategy!r})")
    if not isinstance(strategy, Strategy):
        raise DDMError(f"routing strategy {_strategy_name(strategy)!r} is not a ddmkit.routing.Strategy: derive it "
                       "from Strategy (or Selecting, for one with select), which say how the combiner calls it")
    dense = strategy.dense
    sparse = strategy.selects and not dense
    unit = strategy.one_expert
    memory: dict = {"calls": 0}

    def route(x: torch.Tensor, t: torch.Tensor) -> None:
        probs = router(x, t, **(router_cond or {}))
        check_router_output(probs, x, len(experts))
        if counter is not None:
            counter.router_calls += 1
        if sparse:  # plan from the strategy's (B, n) selection, never building the (B, K) matrix
            idx, w = checked_select(strategy, probs, state)
            memory["weights"] = (idx, w)
            try:
                memory["plan"] = plan_selection(idx, w, probs.shape[1], unit)
            except DDMError as e:  # an expert index out of range, seen with the plan's sync
                raise DDMError(f"routing strategy {_strategy_name(strategy)!r}: {e}") from None
        else:
            memory["weights"] = w = strategy.weights(probs, state)
            check_weights(strategy, w, probs)
            memory["plan"] = None if dense else make_plan(w)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        once = strategy.routes_once and keep_selection
        if memory["calls"] == 0 or (not once and memory["calls"] % router_every == 0):
            route(x, t)
        memory["calls"] += 1
        w, plan = memory["weights"], memory["plan"]
        if plan is None:
            v = combine_dense(experts, w, x, t, counter=counter, cond=cond)
        else:
            v = apply_plan(experts, plan, x, t, counter, cond, call_experts)
        state.x0_hat = x0_from_velocity(v, x, t)
        state.last_weights = w  # dense (B, K) or a selection; last_weights() gives (B, K)
        return v

    return velocity
