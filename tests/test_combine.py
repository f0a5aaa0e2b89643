"""The sparse combiner: exact against the dense reference, no work on zero-weight rows, router reuse."""
import warnings

import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.routing import (CallCounter, RoutingState, Strategy, combine, combine_dense, parse_strategy,
                            routed_velocity)
from ddmkit.nets.field import router_probabilities
from ddmkit.routing.combine import last_weights, make_plan, plan_selection
from ddmkit.sample import sample_euler, time_grid

ALL = ["full", "top-1", "top-2", "top-3", "threshold-0.1", "sample-1", "sample-2@0.5", "nucleus-0.9",
       "switch", "oracle", "nearest"]
K, B, D = 5, 300, 4


def linear_experts(gen, calls):
    """Expert i: x @ M_i + (i + 1) t + label; counts the rows it is called on."""
    mats = [torch.randn(D, D, generator=gen, dtype=torch.float64) for _ in range(K)]

    def make(i):
        def f(x, t, label=None):
            calls[i] += len(x)
            out = x @ mats[i] + t[:, None] * (i + 1)
            return out if label is None else out + label[:, None]
        return f

    return [make(i) for i in range(K)]


def router(x, t):
    return torch.softmax(torch.sin(x[:, :1] * torch.arange(1, K + 1, dtype=x.dtype)) * 3 + t[:, None], dim=1)


def routing_state(seed):
    return RoutingState(generator=torch.Generator().manual_seed(seed), prior=torch.full((K,), 1 / K),
                        nearest=lambda x: (x[:, 0].abs() * 7).long() % K)


@pytest.mark.parametrize("name", ALL)
def test_sparse_equals_dense_with_conditioning_and_skips_zero_rows(name):
    gen = torch.Generator().manual_seed(1)
    calls = [0] * K
    experts = linear_experts(gen, calls)
    x, t = torch.randn(B, D, generator=gen, dtype=torch.float64), torch.rand(B, generator=gen, dtype=torch.float64)
    label = torch.randint(0, 10, (B,), generator=gen).double()
    st = routing_state(2)
    st.x0_hat = x
    w = parse_strategy(name).weights(router(x, t), st)
    w[::7] = 0  # rows with no expert at all get zero and cost nothing
    counter = CallCounter()
    sparse = combine(experts, w, x, t, counter=counter, cond={"label": label})
    assert sum(calls) == int((w != 0).sum()) == counter.total_rows
    dense = combine_dense(experts, w, x, t, cond={"label": label})
    assert torch.allclose(sparse, dense, atol=1e-6, rtol=0)


def test_each_expert_sees_exactly_its_rows():
    w = torch.tensor([[0.5, 0.5, 0], [0, 0, 1.0], [0, 1.0, 0], [0.2, 0, 0.8]])
    seen = {}

    def make(i):
        def f(x, t):
            seen[i] = x[:, 0].tolist()
            return x
        return f

    x = torch.arange(4.0)[:, None]
    combine([make(i) for i in range(3)], w, x, torch.zeros(4))
    assert seen == {0: [0.0, 3.0], 1: [0.0, 2.0], 2: [1.0, 3.0]}


def test_plan_groups_pairs_by_expert():
    w = torch.tensor([[0, 0.3, 0.7], [1.0, 0, 0], [0, 0.4, 0.6]])
    plan = make_plan(w)
    assert plan.experts == [0, 1, 2] and plan.counts == [1, 2, 2]
    assert plan.rows.tolist() == [1, 0, 2, 0, 2]
    assert torch.allclose(plan.weights, torch.tensor([1.0, 0.3, 0.4, 0.7, 0.6]))


def test_plan_of_a_selection_equals_the_plan_of_its_dense_form():
    gen = torch.Generator().manual_seed(6)
    for n in (1, 2, 3):
        idx = torch.stack([torch.randperm(K, generator=gen)[:n] for _ in range(B)])
        w = torch.rand(B, n, generator=gen, dtype=torch.float64)
        w[torch.rand(B, n, generator=gen) < 0.2] = 0  # zero-weight pairs (a masked expert) are left out
        dense = torch.zeros(B, K, dtype=torch.float64).scatter(1, idx, w)
        sparse, ref = plan_selection(idx, w, K), make_plan(dense)
        assert sparse.experts == ref.experts and sparse.counts == ref.counts
        assert torch.equal(sparse.rows, ref.rows) and torch.equal(sparse.weights, ref.weights)


def test_plan_ranks_each_rows_pairs_by_expert_only_where_a_row_has_three():
    w = torch.tensor([[0.2, 0.3, 0.5, 0], [1.0, 0, 0, 0], [0, 0.4, 0, 0.6], [0.1, 0.2, 0.3, 0.4]])
    plan = make_plan(w)
    assert plan.width == 4
    assert plan.rows.tolist() == [0, 1, 3, 0, 2, 3, 0, 3, 2, 3]
    assert plan.ranks.tolist() == [0, 0, 0, 1, 0, 1, 2, 2, 1, 3]  # each row's pairs, in ascending expert
    two = make_plan(w[1:3])
    assert two.ranks is None and two.width == 0  # at most two pairs a row: index_add_ is exact


def test_the_scatter_adds_a_rows_pairs_in_expert_order_whatever_order_the_pairs_come_in():
    """A GPU's index_add_ adds the pairs of a row in whatever order its threads land, and (a + b) + c is not
    (a + c) + b: with three or more experts a row, two runs of the same seed gave other bytes. The scatter
    adds in expert order, so the pairs in any order (as a GPU's threads may take them) give the bytes of a
    CPU's index_add_ of the plan, to the bit."""
    from ddmkit.routing.combine import scatter_rows
    gen = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(K, generator=gen)[:4] for _ in range(B)])
    w = torch.rand(B, 4, generator=gen)
    w[torch.rand(B, 4, generator=gen) < 0.2] = 0
    plan = plan_selection(idx, w, K)
    assert plan.width >= 3
    v = torch.randn(len(plan.rows), D, generator=gen) * torch.rand(len(plan.rows), 1, generator=gen) * 100
    like = torch.zeros(B, D)
    in_plan_order = torch.zeros(B, D).index_add_(0, plan.rows, v)
    assert torch.equal(scatter_rows(v, plan.rows, like, plan.ranks, plan.width), in_plan_order)
    shuffles, differ = 0, 0
    for seed in range(5):
        p = torch.randperm(len(v), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(scatter_rows(v[p], plan.rows[p], like, plan.ranks[p], plan.width), in_plan_order)
        differ += not torch.equal(torch.zeros(B, D).index_add_(0, plan.rows[p], v[p]), in_plan_order)
        shuffles += 1
    assert differ == shuffles  # (what the ranks guard against: index_add_ in another order, other bytes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_top_3_gives_the_cpu_scatters_bytes_and_the_same_samples_twice():
    """On a GPU the plan's scatter gives, to the bit, a CPU's index_add_ in plan order (the GPU's own
    index_add_ adds three pairs of a row in the order its threads land), and top-3 sampling of one seed
    gives the same bytes twice."""
    from ddmkit.routing.combine import scatter_rows
    gen = torch.Generator().manual_seed(4)
    idx = torch.stack([torch.randperm(K, generator=gen)[:4] for _ in range(4096)])
    plan = plan_selection(idx.cuda(), torch.rand(4096, 4, generator=gen).cuda(), K)
    v = torch.randn(len(plan.rows), 64, generator=gen) * 100
    cpu = torch.zeros(4096, 64).index_add_(0, plan.rows.cpu(), v)
    gpu = scatter_rows(v.cuda(), plan.rows, torch.zeros(4096, 64, device="cuda"), plan.ranks, plan.width)
    assert torch.equal(gpu.cpu(), cpu)
    mats = [torch.randn(D, D, generator=gen).cuda() for _ in range(K)]
    experts = [lambda x, t, m=m: torch.tanh(x @ m) + t[:, None] for m in mats]
    x1 = torch.randn(20000, D, generator=gen).cuda()

    scale = torch.arange(1, K + 1, device="cuda", dtype=torch.float32)

    def gpu_router(x, t):
        return torch.softmax(torch.sin(x[:, :1] * scale) * 3 + t[:, None], dim=1)

    def draw():
        field = routed_velocity(experts, gpu_router, parse_strategy("top-3"), routing_state(0))
        return sample_euler(field, x1, time_grid(8).cuda())
    assert torch.equal(draw(), draw())


@pytest.mark.parametrize("name", ALL)
def test_routed_field_equals_the_dense_masked_sum_and_calls_no_zero_rows(name):
    """routed_velocity (sparse selection, or the dense plan) against every expert on every row,
    weighted by the strategy's dense weights drawn with the same generator; with a router that
    gives exact zeros (a missing expert), no expert sees a row that gives it zero weight."""
    gen = torch.Generator().manual_seed(7)
    calls = [0] * K
    experts = linear_experts(gen, calls)
    x, t = torch.randn(B, D, generator=gen, dtype=torch.float64), torch.rand(B, generator=gen, dtype=torch.float64)

    def masked_router(x, t):  # expert 1 is missing: probability exactly 0
        p = router(x, t) * torch.tensor([1.0, 0, 1, 1, 1], dtype=x.dtype)
        return p / p.sum(1, keepdim=True)

    strat = parse_strategy(name)
    st = routing_state(8)
    st.x0_hat = x
    counter = CallCounter()
    v = routed_velocity(experts, masked_router, strat, st, counter)(x, t)
    routed_calls = sum(calls)
    ref_state = routing_state(8)
    ref_state.x0_hat = x
    w = strat.weights(masked_router(x, t), ref_state)
    if name not in ("oracle", "nearest", "switch", "sample-1", "nucleus-0.9"):  # these may pick it: they ignore
        assert (w[:, 1] == 0).all()                                             # or only sample the router
    assert torch.allclose(v, combine_dense(experts, w, x, t), atol=1e-6, rtol=0)
    evaluated = K * B if name == "full" else int((w != 0).sum())  # full: the dense path, every expert
    assert counter.total_rows == evaluated == routed_calls
    assert torch.equal(last_weights(st, K), w)


def test_router_probabilities_equal_softmax_for_every_k():
    gen = torch.Generator().manual_seed(9)
    for k in (2, 8, 15, 16, 64):
        z = torch.randn(300, k, generator=gen) * 4
        p = router_probabilities(z)
        assert p.dtype == torch.float32 and p.shape == (300, k) and p.is_contiguous()
        assert torch.allclose(p, torch.softmax(z.double(), 1).float(), atol=1e-6)


def test_a_solver_time_reaches_the_experts_without_a_gather():
    """t.expand(B) (one time for the batch) reaches each expert as a view of its rows' length."""
    seen = []

    def expert(x, t):
        seen.append((t.stride(0), len(t), float(t[0])))
        return x

    w = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0]])
    combine([expert, expert], w, torch.ones(3, 2), torch.tensor(0.25).expand(3))
    assert seen == [(0, 2, 0.25), (0, 1, 0.25)]


def test_a_batch_with_no_weight_calls_nothing():
    calls = [0] * K
    experts = linear_experts(torch.Generator().manual_seed(0), calls)
    out = combine(experts, torch.zeros(3, K), torch.ones(3, D, dtype=torch.float64), torch.ones(3))
    assert sum(calls) == 0 and (out == 0).all()


def sample(name, router_every, steps=8):
    gen = torch.Generator().manual_seed(3)
    calls = [0] * K
    experts = [lambda x, t, f=f: 0.1 * f(x, t) for f in linear_experts(gen, calls)]
    counter = CallCounter()
    field = routed_velocity(experts, router, parse_strategy(name), routing_state(4), counter, router_every=router_every)
    x1 = torch.randn(64, D, generator=gen, dtype=torch.float64)
    return sample_euler(field, x1, time_grid(steps, dtype=torch.float64)), counter


@pytest.mark.parametrize("name", ["top-2", "full", "switch"])
def test_router_reuse_every_1_equals_plain(name):
    gen = torch.Generator().manual_seed(3)
    calls = [0] * K
    experts = [lambda x, t, f=f: 0.1 * f(x, t) for f in linear_experts(gen, calls)]
    x1 = torch.randn(64, D, generator=gen, dtype=torch.float64)
    plain = routed_velocity(experts, router, parse_strategy(name), routing_state(4))
    reuse = routed_velocity(experts, router, parse_strategy(name), routing_state(4), router_every=1)
    ts = time_grid(8, dtype=torch.float64)
    assert torch.equal(sample_euler(plain, x1, ts), sample_euler(reuse, x1, ts))


def test_router_reuse_every_m_calls_the_router_once_per_m_steps():
    x_reuse, counter = sample("top-2", router_every=3, steps=8)
    x_plain, plain = sample("top-2", router_every=1, steps=8)
    assert counter.router_calls == 3 and plain.router_calls == 8
    assert counter.total_rows == plain.total_rows == 8 * 64 * 2
    assert (x_reuse - x_plain).abs().max() < 0.5  # close, not equal: the routing is held for 3 steps


def test_oracle_routes_once_per_trajectory_with_the_samples_of_routing_at_every_step():
    from dataclasses import dataclass

    from ddmkit.routing.strategies import Oracle

    @dataclass(frozen=True)
    class OracleRoutedEachStep(Oracle):  # the same selection, planned again at every evaluation
        routes_once = False

    gen = torch.Generator().manual_seed(3)
    experts = [lambda x, t, f=f: 0.1 * f(x, t) for f in linear_experts(gen, [0] * K)]
    x1 = torch.randn(64, D, generator=gen, dtype=torch.float64)
    results = []
    for strategy in (Oracle(), OracleRoutedEachStep()):
        counter = CallCounter()
        field = routed_velocity(experts, router, strategy, routing_state(4), counter)
        results.append((sample_euler(field, x1, time_grid(8, dtype=torch.float64)), counter))
    (once, once_calls), (each, each_calls) = results
    assert torch.equal(once, each)
    assert once_calls.router_calls == 1 and each_calls.router_calls == 8
    assert once_calls.expert_rows == each_calls.expert_rows


def test_full_takes_the_dense_path_and_equals_the_sparse_one():
    gen = torch.Generator().manual_seed(5)
    experts = linear_experts(gen, [0] * K)
    x, t = torch.randn(B, D, generator=gen, dtype=torch.float64), torch.rand(B, generator=gen, dtype=torch.float64)
    field = routed_velocity(experts, router, parse_strategy("full"), RoutingState())
    assert torch.allclose(field(x, t), combine(experts, router(x, t), x, t), atol=1e-12)


class _Weights(Strategy):
    name = "mine"

    def __init__(self, weights):
        self.weights = lambda probs, state: weights(probs)


class _Select(_Weights):
    selects = True

    def __init__(self, select):
        self.select = lambda probs, state: select(probs)


@pytest.mark.parametrize("bad, said", [
    (_Weights(lambda p: p[:, :-1]), r"weights\(probs, state\) returned torch.float64 \(300, 4\); expected float "
                                     r"weights of the probabilities' shape \(B, K\) = \(300, 5\)"),
    (_Weights(lambda p: p.T), r"returned torch.float64 \(5, 300\)"),
    (_Weights(lambda p: p[:, 0]), r"returned torch.float64 \(300,\)"),
    (_Weights(lambda p: p > 0.3), r"returned torch.bool \(300, 5\)"),
    (_Weights(lambda p: p.tolist()), r"returned list"),
    (_Select(lambda p: (p.argmax(1, keepdim=True).double(), torch.ones(len(p), 1))), r"\(torch.float64 \(300, 1\), "
                                                                                   r"torch.float32 \(300, 1\)\)"),
    (_Select(lambda p: (p.argmax(1), torch.ones(len(p)))), r"select\(probs, state\) returned \(torch.int64 \(300,\)"),
    (_Select(lambda p: (p.argmax(1, keepdim=True), torch.ones(len(p), 2))), r"expected experts \(B, n\) as integers"),
    (_Select(lambda p: (p.argmax(1, keepdim=True) + K, torch.ones(len(p), 1))), r"an expert outside 0 to 4"),
    (_Select(lambda p: (p.argmax(1, keepdim=True) - K, torch.ones(len(p), 1))), r"an expert outside 0 to 4"),
])
def test_a_strategy_that_returns_the_wrong_thing_is_named(bad, said):
    """A strategy of the user's that returns weights or a selection of the wrong shape, dtype or experts
    stops with its name, instead of sampling something else (weights of K - 1 columns never called the
    last expert; experts out of range were dropped, giving zero velocity)."""
    gen = torch.Generator().manual_seed(6)
    x, t = torch.randn(B, D, generator=gen, dtype=torch.float64), torch.rand(B, generator=gen, dtype=torch.float64)
    experts = linear_experts(gen, [0] * K)
    field = routed_velocity(experts, router, bad, routing_state(0))
    with pytest.raises(DDMError, match=f"^(routing strategy 'mine': )?.*{said}"):
        field(x, t)
    ok = _Select(lambda p: (p.argmax(1, keepdim=True), torch.ones(len(p), 1, dtype=p.dtype)))  # zero weight: any index
    zero = _Select(lambda p: (torch.cat([p.argmax(1, keepdim=True), torch.full_like(p[:, :1], -1).long()], 1),
                              torch.cat([torch.ones_like(p[:, :1]), torch.zeros_like(p[:, :1])], 1)))
    one = routed_velocity(experts, router, ok, routing_state(0))(x, t)
    assert torch.equal(routed_velocity(experts, router, zero, routing_state(0))(x, t), one)


def test_a_strategy_not_derived_from_strategy_is_named():
    class Mine:
        def weights(self, probs, state):
            return probs

    with pytest.raises(DDMError, match="routing strategy 'Mine' is not a ddmkit.routing.Strategy"):
        routed_velocity([], router, Mine(), RoutingState())


def test_router_every_must_be_positive():
    with pytest.raises(DDMError, match="router_every: must be an integer >= 1"):
        routed_velocity([], router, parse_strategy("top-1"), RoutingState(), router_every=0)


def _field_call(strategy, experts=None, route=router):
    gen = torch.Generator().manual_seed(6)
    x, t = torch.randn(B, D, generator=gen, dtype=torch.float64), torch.rand(B, generator=gen, dtype=torch.float64)
    experts = linear_experts(gen, [0] * K) if experts is None else experts
    return routed_velocity(experts, route, strategy, routing_state(0))(x, t)


@pytest.mark.parametrize("select, said", [
    (lambda p: (torch.full((len(p), 1), K), torch.ones(len(p), 1)), "chose an expert outside 0 to 4"),  # index K
    (lambda p: p.argmax(1, keepdim=True), r"select\(probs, state\) returned Tensor; expected \(experts, weights\)"),
    (lambda p: (p.argmax(1, keepdim=True),) * 3, "returned a tuple of 3"),
])
def test_a_selection_of_index_k_or_not_a_pair_names_the_strategy(select, said):
    """Expert index K (one past the last) fell into the zero-weight group: no expert called, zero velocity,
    samples equal to the noise; a select returning one tensor was a bare 'too many values to unpack'."""
    with pytest.raises(DDMError, match=f"^routing strategy 'mine': .*{said}"):
        _field_call(_Select(select))


def test_a_one_expert_strategy_that_selects_two_is_named():
    """Its two outputs were added unweighted: twice the velocity, no error."""
    two = _Select(lambda p: (p.topk(2, dim=1).indices, torch.full((len(p), 2), 0.5, dtype=p.dtype)))
    two.one_expert = True
    with pytest.raises(DDMError, match="^routing strategy 'mine': one_expert = True, but select.* returned 2 experts"):
        _field_call(two)


@pytest.mark.parametrize("route, said", [
    (lambda x, t: router(x, t)[:, :1], r"\(300, 1\)"),
    (lambda x, t: torch.cat([router(x, t), router(x, t)[:, :1]], 1), r"\(300, 6\)"),
    (lambda x, t: router(x, t)[:7], r"\(7, 5\)"),
    (lambda x, t: router(x, t).argmax(1, keepdim=True).expand(-1, K), r"torch.int64 \(300, 5\)"),
])
@pytest.mark.parametrize("strategy", ["full", "top-1", "switch"])
def test_a_router_output_of_the_wrong_shape_is_refused(route, said, strategy):
    """A (B, 6) router for 5 experts dropped a column's mass under full and was an IndexError under switch."""
    with pytest.raises(DDMError, match=rf"^the router returned .*{said}; expected float probabilities \(B, K\) = "
                                       r"\(300, 5\)"):
        _field_call(parse_strategy(strategy), route=route)


@pytest.mark.parametrize("strategy", ["full", "top-1", "top-2"])
def test_an_expert_output_of_the_wrong_shape_names_the_expert(strategy):
    """An expert returning (B, 1) was broadcast into (B, D) under full (wrong samples, no error)."""
    gen = torch.Generator().manual_seed(6)
    experts = linear_experts(gen, [0] * K)
    experts[2] = lambda x, t: x[:, :1]
    with pytest.raises(DDMError, match=r"^expert 2 returned \(\d+, 1\) for an input of shape \(\d+, 4\)"):
        _field_call(parse_strategy(strategy), experts)


def test_combine_refuses_weights_that_do_not_match_x_and_the_experts():
    """Two weight rows for four rows of x left rows 3 and 4 at zero, silently."""
    experts = [lambda x, t: torch.ones_like(x), lambda x, t: 2 * torch.ones_like(x)]
    x, t = torch.zeros(4, 2), torch.full((4,), 0.5)
    for combiner in (combine, combine_dense):
        with pytest.raises(DDMError, match=r"weights: got \(2, 2\); expected \(B, K\) = \(4, 2\)"):
            combiner(experts, torch.tensor([[1., 0.], [0., 1.]]), x, t)
        with pytest.raises(DDMError, match=r"weights: got \(4, 3\)"):
            combiner(experts, torch.ones(4, 3) / 3, x, t)
        with pytest.raises(DDMError, match="t: got float; give a tensor"):
            combiner(experts, torch.ones(4, 2) / 2, x, 0.4)
    assert torch.equal(combine(experts, torch.tensor([[1., 0.], [0., 1.]] * 2), x, t),
                       torch.tensor([[1., 1.], [2., 2.]] * 2))


def test_sample_ddm_router_reuse_and_bf16_autocast():
    from ddmkit.ddm import DDM
    from ddmkit.accel import SpeedOptions
    from ddmkit.ddm.sampling import sample_ddm

    gen = torch.Generator().manual_seed(6)
    mats = [torch.randn(D, D, generator=gen) * 0.3 for _ in range(K)]
    experts = [lambda x, t, m=m: x @ m + t[:, None] for m in mats]
    ddm = DDM(experts=experts, router=router, prior=torch.full((K,), 1 / K), data_shape=(D,))
    plain, info = sample_ddm(ddm, "top-2", n=32, steps=6)
    same, _ = sample_ddm(ddm, "top-2", n=32, steps=6, router_every=1)
    held, held_info = sample_ddm(ddm, "top-2", n=32, steps=6, router_every=3)
    low, _ = sample_ddm(ddm, "top-2", n=32, steps=6, speed=SpeedOptions(autocast="bfloat16"))
    assert torch.equal(plain, same)
    assert info["router_calls"] == 6 and held_info["router_calls"] == 2
    assert low.dtype == torch.float32
    assert (low - plain).abs().max() < 0.1 * plain.abs().max()  # bf16: about 3% here


def test_autocast_follows_the_rows_device_not_the_device_argument():
    """The rows given as x1 decide where the networks run, so they decide the autocast too: rows on the
    CPU with device="cuda" (as with rows on a GPU and the default device="cpu") are autocast on the CPU."""
    from ddmkit.accel import SpeedOptions
    from ddmkit.ddm.sampling import sample_single

    net = torch.nn.Linear(D, D)
    x1 = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    field = lambda x, t: net(x)  # noqa: E731
    low = SpeedOptions(autocast="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of a CUDA autocast asked without CUDA (the old behaviour)
        other, _ = sample_single(field, (D,), 16, steps=3, x1=x1, device="cuda", speed=low)
    here, _ = sample_single(field, (D,), 16, steps=3, x1=x1, device="cpu", speed=low)
    full, _ = sample_single(field, (D,), 16, steps=3, x1=x1)
    assert not torch.equal(here, full)  # bf16 on the CPU changes the samples
    assert torch.equal(other, here)


def test_nearest_routing_keeps_the_mixture_weights_on_an_exact_ddm():
    """Exact experts of three far-apart components and the exact posterior: at t = 1 the posterior is the
    prior for every x, so nearest's first step draws an expert from it, and each row stays with its
    cluster (its x0_hat is that cluster's mean). The samples' component shares are the weights (0.5, 0.3,
    0.2) within sampling error (n = 3000: standard error <= 0.01), every expert called."""
    from ddmkit.ddm import DDM
    from ddmkit.truth import GaussianMixture

    gmm = GaussianMixture.from_covariances([0.5, 0.3, 0.2], [[-6.0, 0.0], [6.0, 0.0], [0.0, 6.0]], [0.1, 0.1, 0.1])
    experts = [lambda x, t, k=k: gmm.component_velocities(x.double(), t.double())[:, k].float() for k in range(3)]
    ddm = DDM(experts, lambda x, t: gmm.posterior(x.double(), t.double()).float(), gmm.weights.float(), (2,),
              lambda x: torch.cdist(x.double(), gmm.means).argmin(1))
    x, info = ddm.sample("nearest", n=3000, steps=20, seed=0)
    shares = torch.bincount(torch.cdist(x.double(), gmm.means).argmin(1), minlength=3).double() / 3000
    assert torch.allclose(shares, gmm.weights, atol=0.04), shares
    assert min(info["expert_rows"]) > 0
