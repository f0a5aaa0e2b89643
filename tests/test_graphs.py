"""CUDA graphs for calls of changing batch size: the buckets, and the padded calls the graphs replay
(checked on the CPU with capture=False; the captured graphs against eager run in
benchmarks/sampling.py --speed on a GPU, docs/performance.md)."""
import pytest
import torch

from ddmkit.nets.mlp import VelocityMLP
from ddmkit.accel import SpeedOptions
from ddmkit.accel.graphs import GraphedCall
from ddmkit.accel.padding import bucket_size, padded


def test_bucket_sizes_known_values():
    assert [bucket_size(n) for n in (1, 2, 8, 9, 17, 100, 1024, 1025)] == [1, 2, 8, 9, 18, 104, 1024, 1152]
    assert [bucket_size(n, per_octave=2) for n in (3, 5, 100, 129)] == [3, 6, 128, 192]


@pytest.mark.parametrize("per_octave", [1, 4, 8, 16])
def test_buckets_pad_by_at_most_one_part_in_per_octave_and_are_few(per_octave):
    for octave in range(4, 13):
        lo, hi = 2 ** octave, 2 ** (octave + 1)
        sizes = [bucket_size(n, per_octave) for n in range(lo + 1, hi + 1)]
        assert all(b >= n and (b - n) * per_octave <= n for n, b in zip(range(lo + 1, hi + 1), sizes))
        assert len(set(sizes)) == per_octave and max(sizes) == hi


def test_bucket_size_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be >= 1"):
        bucket_size(0)
    with pytest.raises(ValueError, match="power of two"):
        bucket_size(10, per_octave=3)


def test_padded_calls_equal_direct_calls_and_return_copies():
    """The graphs' computation (pad the rows into a bucket's buffers, call, keep the first n):
    equal to calling the network on the n rows, for any n, a solver's expanded t, and labels."""
    torch.manual_seed(0)
    net = VelocityMLP([5], width=16, depth=2).eval()

    def expert(x, t, y):  # a class-conditional field: the label shifts the output
        return net(x, t) + y[:, None].to(x.dtype)

    call = GraphedCall(expert, per_octave=4, capture=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in (1, 3, 17, 20, 18, 64, 65, 17):
            x, y = torch.randn(n, 5, generator=gen), torch.randint(0, 10, (n,), generator=gen)
            for t in (torch.tensor(0.3).expand(n), torch.rand(n, generator=gen)):
                got = call(x, t, y=y)
                assert torch.allclose(got, expert(x, t, y), atol=1e-6, rtol=0)
                got.add_(1.0)  # a copy: the buffers the next call reads are untouched
    assert sorted(k[0] for k in call.entries) == [1, 3, 20, 64, 80]  # 17, 18 and 20 share the bucket 20


def test_padded_eager_calls_see_only_bucket_sizes_and_equal_direct_calls():
    """padded(fn): what a GPU runs above max_rows and, without graphs, for every expert call: fn
    sees the bucket sizes only (so cuDNN plans one convolution per bucket, not per group size),
    and the first n rows are fn's answer on the n rows, with a solver's t kept stride-0."""
    torch.manual_seed(0)
    net = VelocityMLP([5], width=16, depth=2).eval()
    seen = []

    def expert(x, t, y):
        seen.append((len(x), len(t), len(y), t.stride(0) if t.dim() else None))
        return net(x, t) + y[:, None].to(x.dtype)

    call = padded(expert, per_octave=4, large_per_octave=16)
    gen = torch.Generator().manual_seed(2)
    sizes = (1, 3, 17, 18, 19, 20, 65, 100, 300)
    with torch.no_grad():
        for n in sizes:
            x, y = torch.randn(n, 5, generator=gen), torch.randint(0, 10, (n,), generator=gen)
            for t in (torch.tensor(0.7).expand(n), torch.rand(n, generator=gen)):
                got, want = call(x, t, y=y), net(x, t) + y[:, None].to(x.dtype)
                assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6, rtol=0)
    rows = [s[0] for s in seen]
    assert rows == [bucket_size(n, 4 if n <= 256 else 16) for n in sizes for _ in (0, 1)]
    assert rows[-1] == 304  # above 256 rows, large_per_octave: 300 -> 304 (320 at 4 per octave)
    assert all(r == tr == yr for r, tr, yr, _ in seen)
    assert [s[3] for s in seen[::2]] == [0] * len(sizes)  # the expanded t stays a stride-0 view
    assert len(set(rows)) < len(sizes)  # 17, 18, 19 and 20 share the bucket 20


def test_gpu_dispatch_pads_expert_calls_and_the_cpu_leaves_them_alone():
    """sample_ddm's networks: on a CUDA device every expert call is padded (without graphs too); on the
    CPU the experts are the DDM's own. (The wrappers are device-agnostic, so this runs on a CPU.)"""
    from ddmkit.accel import accelerate

    seen = []

    def expert(x, t):
        seen.append(len(x))
        return 3 * x

    def router(x, t):
        return torch.ones(len(x), 1)

    cpu = accelerate([expert], router, SpeedOptions(), "cpu")
    assert cpu.experts == [expert] and cpu.router is router
    gpu = accelerate([expert], router, SpeedOptions(), "cuda")
    gpu_experts, gpu_router = gpu.experts, gpu.router
    assert gpu_router is router  # one call on the whole batch per step: its size never changes
    with torch.no_grad():
        out = gpu_experts[0](torch.ones(17, 2), torch.zeros(17))
        large = gpu_experts[0](torch.ones(300, 2), torch.zeros(300))
    assert torch.equal(out, torch.full((17, 2), 3.0)) and torch.equal(large, torch.full((300, 2), 3.0))
    assert seen == [18, 320]  # 8 buckets per octave


def test_off_the_gpu_and_under_autograd_the_function_runs_as_it_is():
    calls = []

    def f(x, t):
        calls.append(len(x))
        return 2 * x

    call = GraphedCall(f)
    x = torch.ones(3, 2, requires_grad=True)
    assert torch.equal(call(x, torch.zeros(3)), 2 * x)  # CPU: no buffers, no capture
    assert calls == [3] and not call.entries and call.captures == 0
    padded_call = GraphedCall(f, capture=False, max_rows=4)
    padded_call(x, torch.zeros(3))  # autograd on: called directly even in padded mode
    with torch.no_grad():
        padded_call(torch.ones(5, 2), torch.zeros(5))  # more rows than max_rows, on the CPU: called directly
        assert not padded_call.entries
        padded_call(torch.ones(4, 2), torch.zeros(4))
    assert calls == [3, 3, 5, 4] and len(padded_call.entries) == 1


def test_sample_ddm_with_cuda_graphs_on_the_cpu_is_plain_sampling():
    from ddmkit.ddm import DDM
    from ddmkit.ddm.sampling import sample_ddm, sample_single

    gen = torch.Generator().manual_seed(6)
    mats = [torch.randn(4, 4, generator=gen) * 0.3 for _ in range(3)]
    experts = [lambda x, t, m=m: x @ m + t[:, None] for m in mats]

    def router(x, t):
        return torch.softmax(x[:, :3] * 2, dim=1)

    ddm = DDM(experts=experts, router=router, prior=torch.full((3,), 1 / 3), data_shape=(4,))
    plain, _ = sample_ddm(ddm, "top-2", n=16, steps=4)
    graphs, _ = sample_ddm(ddm, "top-2", n=16, steps=4, speed=SpeedOptions(cuda_graphs=True))
    assert torch.equal(plain, graphs)
    mono, _ = sample_single(experts[0], (4,), n=16, steps=4)
    mono_graphs, _ = sample_single(experts[0], (4,), n=16, steps=4, speed=SpeedOptions(cuda_graphs=True))
    assert torch.equal(mono, mono_graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_equal_eager_calls_on_a_gpu():
    torch.manual_seed(0)
    net = VelocityMLP([5], width=32, depth=2).cuda().eval()
    call = GraphedCall(lambda x, t: net(x, t), max_rows=208)
    with torch.no_grad():
        for autocast in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                for n in (3, 17, 20, 64, 17, 200, 300):
                    x, t = torch.randn(n, 5, device="cuda"), torch.rand(n, device="cuda")
                    got, ref = call(x, t), net(x, t)
                    assert got.dtype == ref.dtype
                    assert torch.allclose(got.float(), ref.float(), atol=1e-5 if not autocast else 2e-2, rtol=0)
    assert call.captures == 2 * 5  # buckets 3, 18 (17 twice), 20, 64, 208 (300 > max_rows: eager); twice


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_of_a_network_on_the_second_gpu_are_captured_and_replayed_there():
    """Streams, pools and captures were made on the current GPU (cuda:0) for a network on cuda:1."""
    torch.manual_seed(0)
    net = VelocityMLP([5], width=32, depth=2).to("cuda:1").eval()
    call = GraphedCall(lambda x, t: net(x, t), max_rows=64)
    with torch.no_grad():
        for n in (3, 17, 3, 40):
            x, t = torch.randn(n, 5, device="cuda:1"), torch.rand(n, device="cuda:1")
            torch.testing.assert_close(call(x, t), net(x, t), atol=1e-5, rtol=0)
    assert call.captures == 3 and torch.cuda.current_device() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_shared_pool_outlives_the_graphs_that_used_it():
    import gc

    net = VelocityMLP([4], width=16, depth=1).cuda().eval()
    x, t = torch.randn(10, 4, device="cuda"), torch.rand(10, device="cuda")
    with torch.no_grad():
        for _ in range(2):  # the second capture goes into the pool after every graph of the first is gone
            call = GraphedCall(lambda x, t: net(x, t))
            assert torch.allclose(call(x, t), net(x, t), atol=1e-5) and call.captures == 1
            del call
            gc.collect()


CANNOT_CAPTURE = """
import warnings, torch
from ddmkit.accel.graphs import GraphedCall

def syncing(x, t):  # reads a value on the host: not allowed while a stream is capturing
    return x * 2 if float(t[0]) >= 0 else x

call = GraphedCall(syncing)
x, t = torch.randn(10, 3, device="cuda"), torch.rand(10, device="cuda")
with torch.no_grad():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(call(x, t), 2 * x)
    assert any("cannot capture" in str(w.message) for w in caught)
    assert torch.equal(call(x, t), 2 * x) and call.captures == 0
    other = GraphedCall(lambda x, t: x + 1)  # graphs are off on the device now: eager, and right
    assert torch.equal(other(x, t), x + 1) and other.captures == 0
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_network_that_cannot_be_captured_runs_eagerly_with_a_warning():
    """In its own process: a failed capture turns graphs off for the whole device."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CANNOT_CAPTURE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _call(network, x, t):
    return network(x, t)


def _marked_experts(k: int, width: int = 16):
    """k NetworkFields of one architecture with different weights (so they can share graphs)."""
    from ddmkit.nets.field import NetworkField

    torch.manual_seed(3)
    return [NetworkField(VelocityMLP([5], width=width, depth=2).eval(), _call) for _ in range(k)]


def test_shared_graphs_give_each_expert_its_own_answer_from_one_set_of_buckets():
    """Experts of one architecture share one template (their weights copied in before each call):
    every call equals the expert's own network, and the buckets are shared, not one set per expert."""
    from ddmkit.accel.graphs import shared_graphs

    experts = _marked_experts(3)
    calls = shared_graphs(experts, capture=False)  # the graphs' buffers and padding, run eagerly (CPU)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n in (17, 18, 20, 64, 17, 5):
            for k in (0, 2, 1):
                x, t = torch.randn(n, 5, generator=gen), torch.rand(n, generator=gen)
                assert torch.allclose(calls[k](x, t), experts[k](x, t), atol=1e-6, rtol=0)
    template = calls[0].graphs
    assert all(c.graphs is template for c in calls)
    assert sorted(key[0] for key in template.entries) == [5, 18, 20, 64]  # once for all three experts
    assert not torch.allclose(experts[0](x, t), experts[1](x, t), atol=1e-3)  # the experts do differ


def test_shared_graphs_keep_plain_functions_and_lone_architectures_apart():
    from ddmkit.accel.graphs import shared_graphs
    from ddmkit.nets.field import NetworkField

    same = _marked_experts(2)
    wide = VelocityMLP([5], width=32, depth=2).eval()
    lone = NetworkField(wide, _call)  # another architecture, met once
    plain = lambda x, t: 2 * x  # noqa: E731  (not a NetworkField)
    calls = shared_graphs(same + [lone, plain], capture=False)
    assert calls[0].graphs is calls[1].graphs
    assert isinstance(calls[2], GraphedCall) and isinstance(calls[3], GraphedCall)
    x, t = torch.randn(7, 5), torch.rand(7)
    with torch.no_grad():
        assert torch.allclose(calls[2](x, t), wide(x, t), atol=1e-6) and torch.equal(calls[3](x, t), 2 * x)


def test_graphs_first_called_under_inference_mode_serve_later_calls_outside_it():
    """The buckets' input buffers were made under torch.inference_mode: a later call under no_grad raised
    'Inplace update to inference tensor outside InferenceMode'."""
    call = GraphedCall(lambda x, t: 2 * x, capture=False)
    with torch.inference_mode():
        assert call(torch.ones(3, 2), torch.zeros(3)).sum() == 12
    with torch.no_grad():
        assert call(torch.ones(3, 2), torch.zeros(3)).sum() == 12
        assert call(torch.full((3, 2), 3.0), torch.zeros(3)).sum() == 36  # the same bucket: its buffers reused


def test_experts_of_one_weight_shape_but_other_settings_get_graphs_of_their_own():
    """DiTs of 4 and 2 attention heads have the same weight shapes: expert 1 (a replace-expert folder of other
    heads) ran through expert 0's template, another function (max difference 0.8)."""
    from ddmkit.accel.graphs import shared_graphs
    from ddmkit.nets.dit import DiT
    from ddmkit.nets.field import NetworkField, VelocityOutput

    torch.manual_seed(0)
    nets = [DiT([1, 8, 8], patch=4, width=16, depth=1, heads=h).eval() for h in (4, 2, 4)]
    for net in nets:  # DiT zero-inits its output layers: weights as a trained network has
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
    fields = [NetworkField(n, VelocityOutput()) for n in nets]
    calls = shared_graphs(fields, capture=False)
    assert calls[0].graphs is calls[2].graphs and isinstance(calls[1], GraphedCall)
    x, t = torch.randn(5, 1, 8, 8), torch.full((5,), 0.5)
    with torch.no_grad():
        for call, field in zip(calls, fields):
            torch.testing.assert_close(call(x, t), field(x, t))


def test_routed_sampling_with_shared_graphs_equals_sampling_without():
    """sample_ddm with cuda_graphs on the CPU runs the networks as they are; the dispatch with shared
    graphs (run eagerly here) gives the same routed field."""
    from ddmkit.routing.combine import routed_velocity
    from ddmkit.routing import RoutingState, parse_strategy
    from ddmkit.accel.graphs import shared_graphs

    experts = _marked_experts(4)
    torch.manual_seed(5)
    router_net = torch.nn.Linear(5, 4)

    def router(x, t):
        return torch.softmax(router_net(x), dim=1)
    x, t = torch.randn(300, 5), torch.full((300,), 0.6)
    with torch.no_grad():
        for strategy in ("top-1", "top-2", "full"):
            plain = routed_velocity(experts, router, parse_strategy(strategy), RoutingState())(x, t)
            shared = routed_velocity(shared_graphs(experts, capture=False), router, parse_strategy(strategy),
                                     RoutingState())(x, t)
            assert torch.allclose(shared, plain, atol=1e-6, rtol=0), strategy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shared_graphs_capture_once_per_bucket_for_all_experts_on_a_gpu():
    from ddmkit.accel.graphs import shared_graphs

    experts = _marked_experts(3, width=32)
    for f in experts:
        f.network.cuda()
    calls = shared_graphs(experts)
    with torch.no_grad():
        for n in (3, 17, 20, 64, 17, 300):
            for k in (0, 1, 2):
                x, t = torch.randn(n, 5, device="cuda"), torch.rand(n, device="cuda")
                assert torch.allclose(calls[k](x, t), experts[k](x, t), atol=1e-5, rtol=0)
    assert calls[0].graphs.captures == 4  # buckets 3, 18, 20, 64 (300 rows: eager); not 4 per expert


def test_shared_graphs_off_the_gpu_call_each_expert_directly():
    from ddmkit.accel import accelerate

    experts = _marked_experts(2)
    calls = accelerate(experts, lambda x, t: torch.ones(len(x), 2) / 2, SpeedOptions(cuda_graphs=True, cuda_streams=False),
                       "cpu").experts
    x, t = torch.randn(9, 5), torch.rand(9)
    with torch.no_grad():
        for call, expert in zip(calls, experts):
            assert torch.equal(call(x, t), expert(x, t))
    assert calls[0].graphs is calls[1].graphs and not calls[0].graphs.entries  # no template call, no copy


def test_shared_graphs_of_label_conditional_image_experts_with_guidance():
    """The image pipeline's experts (a class-conditional UNet, guidance 2 doubling the rows inside the
    field) through one shared template, labels as conditioning: each expert's answer."""
    from ddmkit.accel.graphs import shared_graphs
    from ddmkit.ddm.load import velocity_field
    from ddmkit.nets import build_seeded

    spec = {"arch": "unet", "kwargs": {"channels": [8, 16], "blocks": 1, "attention_res": [], "num_classes": 3}}
    nets = [build_seeded("unet", seed, data_shape=[1, 8, 8], **spec["kwargs"]).eval() for seed in range(3)]
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for net in nets:  # the output layer starts at zero: perturb every weight so that the experts differ
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    experts = [velocity_field(net, spec, 2.0) for net in nets]
    calls = shared_graphs(experts, capture=False)
    with torch.no_grad():
        for n, k in ((5, 0), (7, 2), (5, 1)):
            x, t = torch.randn(n, 1, 8, 8, generator=gen), torch.rand(n, generator=gen)
            y = torch.randint(0, 3, (n,), generator=gen)
            want = experts[k](x, t, y=y)
            assert torch.allclose(calls[k](x, t, y=y), want, atol=1e-5, rtol=0)
            assert not torch.allclose(experts[(k + 1) % 3](x, t, y=y), want, atol=1e-3)  # the experts differ
    assert calls[0].graphs is calls[2].graphs and len(calls[0].graphs.entries) == 2  # buckets 5 and 7


def _label_stats_ddm(device: str):
    """A small label-conditional DDM routed by the statistics-only router (which cannot be graphed)."""
    from ddmkit.ddm import DDM
    from ddmkit.routing.stats_router import class_stats_router, island_class_statistics, island_statistics

    gen = torch.Generator().manual_seed(8)
    shards = [(torch.randn(40, 300, generator=gen) + 2 * k, torch.arange(40) % 3) for k in range(2)]
    per_class = [island_class_statistics(x.to(device), y.to(device), 3, rank=4) for x, y in shards]
    router = class_stats_router(per_class, [island_statistics(x.to(device), rank=4) for x, _ in shards])
    torch.manual_seed(9)
    nets = [VelocityMLP([300], width=16, depth=1).to(device).eval() for _ in range(2)]
    experts = [lambda x, t, y=None, net=net: net(x, t) for net in nets]
    return DDM(experts=experts, router=router, prior=torch.full((2,), 0.5), data_shape=(300,),
               router_conditional=True, router_capturable=False)


def test_a_router_that_cannot_be_captured_is_never_graphed():
    """The statistics-only routers read values on the host: a DDM routed by one says so, and the speed
    code leaves that router as it is while the experts get their graphs."""
    from ddmkit.accel import accelerate

    ddm = _label_stats_ddm("cpu")
    nets = accelerate(ddm.experts, ddm.router, SpeedOptions(cuda_graphs=True), "cpu", ddm.router_capturable)
    assert nets.router is ddm.router and all(isinstance(e, GraphedCall) for e in nets.experts)
    assert isinstance(accelerate(ddm.experts, ddm.router, SpeedOptions(cuda_graphs=True), "cpu").router, GraphedCall)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_statistics_router_runs_eagerly_beside_graphed_experts_on_a_gpu():
    """It groups rows by label on the host, so it cannot be captured: the DDM says so, and the
    experts keep their graphs: no warning, graphs stay on, the samples equal sampling without graphs."""
    import warnings

    from ddmkit.ddm.sampling import sample_ddm
    from ddmkit.accel import graphs

    ddm = _label_stats_ddm("cuda")
    y = torch.arange(64, device="cuda") % 3
    plain, _ = sample_ddm(ddm, "top-1", n=64, steps=3, device="cuda", cond={"y": y})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with_graphs, _ = sample_ddm(ddm, "top-1", n=64, steps=3, device="cuda", cond={"y": y},
                                    speed=SpeedOptions(cuda_graphs=True))
    assert torch.device("cuda", 0) not in graphs._DISABLED
    assert torch.allclose(with_graphs, plain, atol=1e-5, rtol=0)
