"""The experts of a sparse step on concurrent CUDA streams (ddmkit.accel.streams): the same results
as one call after another, each expert on its own stream; off the GPU, plain calls."""
import pytest
import torch

from ddmkit.accel import SpeedOptions
from ddmkit.accel import streams as streams_module
from ddmkit.accel.streams import CONCURRENT_MAX_ROWS, CONCURRENT_MIN_ROWS, call_concurrently, concurrent_caller
from ddmkit.nets.mlp import VelocityMLP
from ddmkit.routing.combine import apply_plan, make_plan

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_off_the_gpu_the_calls_run_one_after_another():
    order = []
    calls = [lambda i=i: order.append(i) or torch.full((2,), float(i)) for i in range(3)]
    outs = call_concurrently(calls, [5, 6, 7], torch.device("cpu"))
    assert order == [0, 1, 2] and [float(o[0]) for o in outs] == [0.0, 1.0, 2.0]


def _experts(k: int, device: str):
    torch.manual_seed(2)
    nets = [VelocityMLP([6], width=64, depth=2).to(device).eval() for _ in range(k)]
    return [lambda x, t, y=None, net=net: net(x, t) + (0 if y is None else y[:, None].to(x.dtype)) for net in nets]


def test_the_threshold_the_tests_patch_is_the_one_the_caller_reads(monkeypatch):
    monkeypatch.setattr(streams_module, "CONCURRENT_MIN_ROWS", 0)
    assert concurrent_caller().__globals__["CONCURRENT_MIN_ROWS"] == 0


def test_concurrent_plan_on_the_cpu_equals_the_plain_plan():
    experts = _experts(4, "cpu")
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(50, 6, generator=gen), torch.rand(50, generator=gen)
    w = torch.softmax(torch.randn(50, 4, generator=gen) * 3, dim=1)
    w = w * (w >= w.topk(2, dim=1).values[:, 1:])  # top-2 weights
    with torch.no_grad():
        plan = make_plan(w)
        assert torch.equal(apply_plan(experts, plan, x, t, call_experts=concurrent_caller()),
                           apply_plan(experts, plan, x, t))


@gpu
def test_concurrent_experts_equal_sequential_ones_to_the_bit_each_on_its_own_stream(monkeypatch):
    monkeypatch.setattr(streams_module, "CONCURRENT_MIN_ROWS", 0)  # streams for calls of any size
    experts = _experts(5, "cuda")
    seen = {}

    def watched(k):
        def call(x, t, **cond):
            seen.setdefault(k, set()).add(torch.cuda.current_stream().cuda_stream)
            return experts[k](x, t, **cond)
        return call
    calls = [watched(k) for k in range(5)]
    gen = torch.Generator(device="cuda").manual_seed(4)
    main = torch.cuda.current_stream().cuda_stream
    with torch.no_grad():
        for autocast in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                for b in (7, 300, 2000):
                    x, t = torch.randn(b, 6, device="cuda", generator=gen), torch.rand(b, device="cuda", generator=gen)
                    y = torch.randint(0, 3, (b,), device="cuda", generator=gen)
                    w = torch.softmax(torch.randn(b, 5, device="cuda", generator=gen) * 3, dim=1)
                    w = w * (w >= w.topk(2, dim=1).values[:, 1:])
                    plan = make_plan(w)
                    got = apply_plan(calls, plan, x, t, cond={"y": y}, call_experts=concurrent_caller())
                    torch.cuda.synchronize()
                    assert torch.equal(got, apply_plan(experts, plan, x, t, cond={"y": y}))
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert all(len(s) == 1 and main not in s for s in seen.values())  # always the same side stream
    assert len(set.union(*seen.values())) == 5  # one per expert


def _ddm(k: int):
    """A DDM of k MLP experts on the GPU with a linear router."""
    from ddmkit.ddm import DDM

    router_net = torch.nn.Linear(6, k).cuda()
    return DDM(experts=_experts(k, "cuda"), router=lambda x, t: torch.softmax(router_net(x) * 4, dim=1),
               prior=torch.full((k,), 1 / k), data_shape=(6,))


@gpu
def test_sample_ddm_with_and_without_streams_gives_the_same_samples():
    from ddmkit.ddm.sampling import sample_ddm

    ddm = _ddm(4)
    for strategy in ("top-1", "top-2", "sample-2"):
        a, _ = sample_ddm(ddm, strategy, n=500, steps=5, device="cuda",
                          speed=SpeedOptions(autocast="bfloat16", cuda_streams=False))
        b, _ = sample_ddm(ddm, strategy, n=500, steps=5, device="cuda",
                          speed=SpeedOptions(autocast="bfloat16", cuda_streams=True))
        assert torch.equal(a, b), strategy


@gpu
def test_small_calls_stay_on_the_current_stream():
    experts = _experts(4, "cuda")
    streams = []

    def watched(k):
        def call(x, t):
            streams.append(torch.cuda.current_stream().cuda_stream)
            return experts[k](x, t)
        return call
    x, t = torch.randn(400, 6, device="cuda"), torch.rand(400, device="cuda")
    w = torch.eye(4, device="cuda")[torch.arange(400, device="cuda") % 4]  # top-1, 100 rows per expert
    with torch.no_grad():
        apply_plan([watched(k) for k in range(4)], make_plan(w), x, t, call_experts=concurrent_caller())
    assert set(streams) == {torch.cuda.current_stream().cuda_stream}


# ---------------------------------------------------------------- a set of graphs per expert, on streams

def test_graphs_per_expert_keep_a_set_of_graphs_and_a_pool_per_expert_and_off_the_gpu_call_it_directly():
    from ddmkit.accel import accelerate
    from ddmkit.accel.graphs import GraphedCall
    from ddmkit.ddm import DDM

    experts = _experts(3, "cpu")
    router = lambda x, t: torch.ones(len(x), 3) / 3  # noqa: E731
    nets = accelerate(experts, router, SpeedOptions(cuda_graphs=True, cuda_streams=True), "cpu",
                      router_capturable=False)
    calls = nets.experts
    assert all(isinstance(c, GraphedCall) and c.own_pool for c in calls) and calls[0] is not calls[1]
    assert nets.router is router  # a router that cannot be captured is never graphed
    ddm = DDM(experts=experts, router=router, prior=torch.full((3,), 1 / 3), data_shape=(6,))
    speed = SpeedOptions(cuda_graphs=True)
    assert ddm.networks(speed, "cpu") is ddm.networks(speed, "cpu")  # kept per DDM, for later sampling calls
    x, t = torch.randn(9, 6), torch.rand(9)
    with torch.no_grad():
        assert all(torch.equal(c(x, t), e(x, t)) for c, e in zip(calls, experts))


def test_graphed_experts_overlap_at_any_size_and_eager_ones_from_the_threshold_to_the_ceiling(monkeypatch):
    seen = []
    monkeypatch.setattr(streams_module, "call_concurrently", lambda calls, keys, device: seen.append(1) or [])

    def overlaps(caller, rows_per_expert):
        seen.clear()
        caller([], [0, 1], [rows_per_expert, rows_per_expert], torch.device("cpu"))
        return bool(seen)
    eager, graphed = concurrent_caller(), concurrent_caller(graphed=True)
    assert CONCURRENT_MIN_ROWS > 20 and not overlaps(eager, 20)
    assert overlaps(graphed, 20)
    assert overlaps(eager, CONCURRENT_MIN_ROWS) and overlaps(eager, CONCURRENT_MAX_ROWS)
    assert not overlaps(eager, CONCURRENT_MAX_ROWS + 1)  # large calls fill the GPU alone
    assert not overlaps(graphed, CONCURRENT_MAX_ROWS + 1)


@gpu
def test_graphs_per_expert_on_streams_equal_them_one_after_another_to_the_bit():
    from ddmkit.accel.graphs import graphs_per_expert

    experts = _experts(5, "cuda")
    calls = graphs_per_expert(experts)
    gen = torch.Generator(device="cuda").manual_seed(6)
    with torch.no_grad():
        for autocast in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                for b in (7, 300, 300, 2000):  # 2000: calls above 256 rows run eagerly, padded
                    x, t = torch.randn(b, 6, device="cuda", generator=gen), torch.rand(b, device="cuda", generator=gen)
                    y = torch.randint(0, 3, (b,), device="cuda", generator=gen)
                    w = torch.softmax(torch.randn(b, 5, device="cuda", generator=gen) * 3, dim=1)
                    plan = make_plan(w * (w >= w.topk(2, dim=1).values[:, 1:]))
                    together = apply_plan(calls, plan, x, t, cond={"y": y}, call_experts=concurrent_caller(graphed=True))
                    torch.cuda.synchronize()
                    assert torch.equal(together, apply_plan(calls, plan, x, t, cond={"y": y}))
                    eager = apply_plan(experts, plan, x, t, cond={"y": y})
                    assert torch.allclose(together, eager, atol=3e-2 if autocast else 1e-5, rtol=0)
    assert all(c.captures > 0 for c in calls)
    assert len({id(c._pool[0]) for c in calls}) == 5  # a memory pool per expert


@gpu
def test_sample_ddm_with_graphs_on_streams_gives_the_samples_of_shared_graphs():
    from ddmkit.ddm.sampling import sample_ddm

    ddm = _ddm(4)
    for strategy in ("top-1", "top-2", "sample-2"):
        eager, _ = sample_ddm(ddm, strategy, n=500, steps=5, device="cuda")
        shared, _ = sample_ddm(ddm, strategy, n=500, steps=5, device="cuda",
                               speed=SpeedOptions(cuda_graphs=True, cuda_streams=False))
        own, _ = sample_ddm(ddm, strategy, n=500, steps=5, device="cuda",
                            speed=SpeedOptions(cuda_graphs=True, cuda_streams=True))
        assert torch.equal(own, shared), strategy
        assert torch.allclose(own, eager, atol=1e-4, rtol=0), strategy


@gpu
def test_each_experts_graphs_are_captured_on_that_experts_stream(monkeypatch):
    """A captured matrix product keeps the cuBLAS workspace of the stream it was captured on. Captured on
    one stream, several experts' graphs share one workspace and race on it when replayed at once: the
    GPU hung in the sample_ddm test above (4 of 5 runs on an H100) until each expert captured on its own."""
    from ddmkit.accel.streams import side_stream
    from ddmkit.accel.graphs import graphs_per_expert

    captured_on = []

    class watched(torch.cuda.graph):
        def __init__(self, cuda_graph, pool=None, stream=None, **kwargs):
            captured_on.append(None if stream is None else stream.cuda_stream)
            super().__init__(cuda_graph, pool=pool, stream=stream, **kwargs)
    monkeypatch.setattr(torch.cuda, "graph", watched)
    calls = graphs_per_expert(_experts(3, "cuda"))
    x, t = torch.randn(20, 6, device="cuda"), torch.rand(20, device="cuda")
    with torch.no_grad():
        for call in calls:
            call(x, t)
    device = x.device
    assert sorted(s for s in captured_on if s is not None) == sorted(side_stream(device, k).cuda_stream
                                                                      for k in range(3))
    assert captured_on.count(None) == 3  # the one-kernel graphs that hold each expert's pool
