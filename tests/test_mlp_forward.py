"""The MLP forward (layers called as functions, cached embedding frequencies) is bitwise the
module-call forward it replaced; the grouped-experts experiment of benchmarks/ is exact."""
import importlib.util
from pathlib import Path

import pytest
import torch

from ddmkit.nets import mlp
from ddmkit.nets.mlp import RouterMLP, VelocityMLP
from ddmkit.routing import RoutingState, combine, combine_dense, parse_strategy
from ddmkit.routing.combine import make_plan

K, B, SHAPE = 4, 200, [3, 4]


def perturbed(net):
    """Random non-default LayerNorm affines and biases, so that every parameter matters."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def experts(k=K, width=32, depth=2):
    torch.manual_seed(0)
    return [perturbed(VelocityMLP(SHAPE, width=width, depth=depth)) for _ in range(k)]


def inputs(n=B, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.rand(n, generator=gen)


def weights(name, x, seed=2):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(len(x), K, generator=gen), dim=1)
    w = parse_strategy(name).weights(probs, RoutingState(generator=gen))
    w[::5] = 0  # rows with no expert: not evaluated at all
    return w


def benchmark_module(name):
    """A module of benchmarks/ (they import only torch and ddmkit)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["top-1", "top-2", "threshold-0.2", "sample-2", "full"])
@pytest.mark.parametrize("mode", ["loop", "grouped_mm"])
def test_grouped_experiment_is_exact(name, mode):
    """benchmarks/grouped_experts.py: one grouped pass over the plan's rows = the per-expert calls
    (bitwise for "loop", whose passes of 64 rows cut groups in two), and the dense reference to 1e-6."""
    nets = experts()
    x, t = inputs()
    w = weights(name, x)
    plan = make_plan(w)
    grouped = benchmark_module("grouped_experts").GroupedMLP(nets, mode=mode, block_rows=64)
    with torch.no_grad():
        out = grouped.run_groups(plan.experts, plan.counts, x[plan.rows], t[plan.rows])
        got = torch.zeros_like(x).index_add_(0, plan.rows, out * plan.weights[:, None, None])
        per_expert, dense = combine(nets, w, x, t), combine_dense(nets, w, x, t)
    if mode == "loop":
        assert torch.equal(got, per_expert)
    assert (got - dense).abs().max() <= 1e-6 * dense.abs().max()


@pytest.mark.parametrize("cls", ["velocity", "router"])
def test_mlp_forward_is_bitwise_the_module_call_forward(cls):
    torch.manual_seed(0)
    net = perturbed(VelocityMLP(SHAPE, width=32, depth=3) if cls == "velocity" else RouterMLP(SHAPE, 6, width=16))
    before = benchmark_module("sampling").legacy_forward
    for n in (1, 7, 300):
        x, t = inputs(n)
        with torch.no_grad():
            assert torch.equal(net(x, t), before(net, x, t))


@pytest.mark.slow
def test_compiled_mlp_matches_eager_and_leaves_the_frequency_cache_real():
    mlp._FREQS.clear()
    net = experts(1)[0]
    compiled = torch.compile(net, dynamic=True)
    with torch.no_grad():
        for n in (5, 9):
            x, t = inputs(n)
            assert (compiled(x, t) - net(x, t)).abs().max() <= 1e-5
    assert all(type(f) is torch.Tensor for f in mlp._FREQS.values())


def test_cached_parameters_follow_conversion_loading_and_in_place_updates():
    """The forward reads a cached tuple of the parameters: it must see .to(dtype), load_state_dict
    (copying or assigning) and optimizer-style in-place updates."""
    torch.manual_seed(0)
    net, other = perturbed(VelocityMLP(SHAPE, width=16, depth=2)), perturbed(VelocityMLP(SHAPE, width=16, depth=2))
    x, t = inputs(5)
    with torch.no_grad():
        net(x, t)  # builds the cache
        net.load_state_dict(other.state_dict())
        assert torch.equal(net(x, t), other(x, t))
        net.load_state_dict({k: v + 1 for k, v in other.state_dict().items()}, assign=True)
        assert torch.equal(net(x, t), before_forward(net, x, t))
        for p in net.parameters():
            p.mul_(0.5)
        assert torch.equal(net(x, t), before_forward(net, x, t))
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to() then makes new Parameters
    try:
        first = net.inp.weight
        net.double().float()
        assert net.inp.weight is not first
        with torch.no_grad():
            net.inp.weight.mul_(2)
            assert torch.equal(net(x, t), before_forward(net, x, t))
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)


def before_forward(net, x, t):
    return benchmark_module("sampling").legacy_forward(net, x, t)
