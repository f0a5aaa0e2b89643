"""The MLP forward (layers called as functions, cached embedding frequencies) is bitwise the
module-call forward it replaced (kept here as the reference)."""
import math

import pytest
import torch
from torch.nn import functional as F

from ddmkit.nets import mlp
from ddmkit.nets.mlp import RouterMLP, VelocityMLP

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


@pytest.mark.parametrize("cls", ["velocity", "router"])
def test_mlp_forward_is_bitwise_the_module_call_forward(cls):
    torch.manual_seed(0)
    net = perturbed(VelocityMLP(SHAPE, width=32, depth=3) if cls == "velocity" else RouterMLP(SHAPE, 6, width=16))
    before = before_forward
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
    """The MLP forward as it was first written: one nn.Module call per layer, the embedding frequencies
    recomputed at every call (the same operations as the current forward)."""
    half = net.time_dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = net.time_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    h = net.inp(x.reshape(x.shape[0], -1))
    for b in net.blocks:
        h = h + b.fc2(F.silu(b.fc1(b.norm(h)) + b.emb(emb)))
    out = net.out(h)
    return out.reshape(x.shape) if isinstance(net, VelocityMLP) else out


def test_the_velocity_of_vector_data_is_not_a_view():
    """reshape(x.shape) of an output of that shape returned a view of it, and FSDP warned of wrong gradients
    at every process (the gradients were right)."""
    from ddmkit.nets import VelocityMLP
    net = VelocityMLP([3], width=8, depth=1)
    v = net(torch.randn(4, 3), torch.rand(4))
    assert v._base is None and v.shape == (4, 3)
    assert VelocityMLP([1, 2, 2], width=8, depth=1)(torch.randn(4, 1, 2, 2), torch.rand(4)).shape == (4, 1, 2, 2)
