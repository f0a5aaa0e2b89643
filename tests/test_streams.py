"""The experts of a sparse step on concurrent CUDA streams (ddmkit.routing.streams): the same results
as one call after another, each expert on its own stream; off the GPU, plain calls."""
import pytest
import torch

from ddmkit.nets.mlp import VelocityMLP
from ddmkit.routing.combine import apply_plan, make_plan
from ddmkit.routing.streams import call_concurrently

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


def test_the_threshold_the_tests_patch_is_the_one_apply_plan_reads(monkeypatch):
    import sys

    combine_module = sys.modules[apply_plan.__module__]
    monkeypatch.setattr(combine_module, "CONCURRENT_MIN_ROWS", 0)
    assert apply_plan.__globals__["CONCURRENT_MIN_ROWS"] == 0


def test_concurrent_plan_on_the_cpu_equals_the_plain_plan():
    experts = _experts(4, "cpu")
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(50, 6, generator=gen), torch.rand(50, generator=gen)
    w = torch.softmax(torch.randn(50, 4, generator=gen) * 3, dim=1)
    w = w * (w >= w.topk(2, dim=1).values[:, 1:])  # top-2 weights
    with torch.no_grad():
        plan = make_plan(w)
        assert torch.equal(apply_plan(experts, plan, x, t, concurrent=True), apply_plan(experts, plan, x, t))


@gpu
def test_concurrent_experts_equal_sequential_ones_to_the_bit_each_on_its_own_stream(monkeypatch):
    import sys

    combine_module = sys.modules[apply_plan.__module__]  # (ddmkit.routing.combine the name is the function)
    monkeypatch.setattr(combine_module, "CONCURRENT_MIN_ROWS", 0)  # streams for calls of any size
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
                    got = apply_plan(calls, plan, x, t, cond={"y": y}, concurrent=True)
                    torch.cuda.synchronize()
                    assert torch.equal(got, apply_plan(experts, plan, x, t, cond={"y": y}))
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert all(len(s) == 1 and main not in s for s in seen.values())  # always the same side stream
    assert len(set.union(*seen.values())) == 5  # one per expert


@gpu
def test_sample_ddm_with_and_without_streams_gives_the_same_samples():
    from ddmkit.pipeline.ddm import DDM
    from ddmkit.pipeline.sampling import sample_ddm

    experts = _experts(4, "cuda")
    router_net = torch.nn.Linear(6, 4).cuda()
    ddm = DDM(experts=experts, router=lambda x, t: torch.softmax(router_net(x) * 4, dim=1),
              prior=torch.full((4,), 0.25), data_shape=(6,))
    for strategy in ("top-1", "top-2", "sample-2"):
        a, _ = sample_ddm(ddm, strategy, n=500, steps=5, device="cuda", autocast="bfloat16", cuda_streams=False)
        b, _ = sample_ddm(ddm, strategy, n=500, steps=5, device="cuda", autocast="bfloat16", cuda_streams=True)
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
        apply_plan([watched(k) for k in range(4)], make_plan(w), x, t, concurrent=True)
    assert set(streams) == {torch.cuda.current_stream().cuda_stream}
