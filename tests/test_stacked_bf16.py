"""Stacked experts (ddmkit.train.stacked): equal to separate networks in float32, isolated and in
bfloat16 under autocast (the path train.bf16 takes on a GPU; here on the CPU's autocast), and
traceable by torch.compile in one graph."""
import pytest
import torch

from ddmkit.config import TrainConfig
from ddmkit.nets import build_seeded
from ddmkit.train.concurrent import stacked_loss, stacked_sampler
from ddmkit.train.loop import fit
from ddmkit.train.stacked import StackedExperts

NETS = {
    "unet": ({"data_shape": [1, 8, 8], "channels": [4, 8], "attention_res": [4], "num_classes": 3}, (1, 8, 8)),
    "dit": ({"data_shape": [2, 4, 4], "patch": 1, "width": 16, "depth": 2, "heads": 2, "num_classes": 3}, (2, 4, 4)),
}


def nets(arch: str, k: int = 2) -> list[torch.nn.Module]:
    """k networks with different weights, the zero-initialised output layers made non-zero."""
    out = [build_seeded(arch, seed, **NETS[arch][0]) for seed in range(k)]
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for net in out:
            for p in net.parameters():
                if not p.any():
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return out


def batch(arch: str, k: int = 2, b: int = 5):
    gen = torch.Generator().manual_seed(1)
    shape = NETS[arch][1]
    return (torch.randn(k, b, *shape, generator=gen), torch.rand(k, b, generator=gen),
            torch.randint(0, 3, (k, b), generator=gen))


@pytest.mark.parametrize("arch", NETS)
def test_stacked_forward_gradients_and_clipping_equal_separate_networks(arch):
    separate = nets(arch)
    stacked = StackedExperts(nets(arch))
    x, t, y = batch(arch)
    out = stacked(x, t, y)
    out.square().sum().backward()
    for k, net in enumerate(separate):
        expected = net(x[k], t[k], y[k])
        torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-5)
        expected.square().sum().backward()
    grads = {n: torch.stack([dict(net.named_parameters())[n].grad for net in separate]) for n in stacked.param_names}
    for n in stacked.param_names:
        torch.testing.assert_close(stacked.stacked[n.replace(".", "__")].grad, grads[n], rtol=1e-4, atol=1e-5)

    norms = [torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5) for net in separate]
    torch.testing.assert_close(stacked.clip_grad_norm_(0.5), max(norms))  # returns the largest norm
    assert all(n > 0.5 for n in norms)  # so both experts were clipped, each by its own norm
    for n in stacked.param_names:
        clipped = torch.stack([dict(net.named_parameters())[n].grad for net in separate])
        torch.testing.assert_close(stacked.stacked[n.replace(".", "__")].grad, clipped, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", NETS)
def test_unstacked_experts_hold_every_buffer_and_compute_what_the_stacked_ones_do(arch):
    """unstack() copies the non-persistent buffers too (DiT's pos is in no state_dict): they were left as the
    uninitialised memory of to_empty(), and the unstacked DiTs computed something else."""
    separate = nets(arch)
    stacked = StackedExperts(separate)
    x, t, y = batch(arch)
    with torch.no_grad():
        together = stacked(x, t, y)
        for k, (original, alone) in enumerate(zip(separate, stacked.unstack())):
            for name, buffer in original.named_buffers():
                assert torch.equal(alone.get_buffer(name), buffer), name
            torch.testing.assert_close(alone(x[k], t[k], y[k]), together[k], rtol=1e-5, atol=1e-6)


class WithOwnBuffer(torch.nn.Module):
    """A network whose non-persistent buffer differs from one expert to the next."""

    def __init__(self, k: int):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("shift", torch.full((2,), 7.0 + k), persistent=False)

    def forward(self, x, t):
        return self.lin(x) + self.shift


def test_unstack_copies_each_experts_own_non_persistent_buffer():
    separate = [WithOwnBuffer(k) for k in range(3)]
    for k, alone in enumerate(StackedExperts(separate).unstack()):
        assert torch.equal(alone.shift, torch.full((2,), 7.0 + k))
        assert torch.equal(alone.lin.weight, separate[k].lin.weight)


@pytest.mark.parametrize("arch", NETS)
def test_under_autocast_the_stacked_experts_run_in_bfloat16(arch):
    stacked = StackedExperts(nets(arch))
    x, t, y = batch(arch)
    full = stacked(x, t, y)
    with torch.autocast("cpu", torch.bfloat16):
        low = stacked(x, t, y)
    assert full.dtype == torch.float32 and low.dtype == torch.bfloat16
    error = ((low.float() - full).norm() / full.norm()).item()
    assert 1e-4 < error < 3e-2  # bfloat16 rounding: not float32, not wrong
    low.float().square().sum().backward()  # float32 gradients for the float32 weights, through the cast
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in stacked.parameters())


def train(arch: str, shards: list[torch.Tensor], labels: list[torch.Tensor], bf16: bool) -> list[dict]:
    """3 steps of fit() on stacked experts, the loss under the CPU's bf16 autocast when bf16 (on a GPU
    fit() itself autocasts with train.bf16); the EMA experts' weights."""
    model = StackedExperts([build_seeded(arch, 0, **NETS[arch][0]) for _ in shards])
    draw = stacked_sampler(shards, labels, 6, "cpu")

    def batch_loss(m, step, gen):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            x, y = draw(gen)
            return stacked_loss(m, x, y, gen, "velocity").sum(), {}

    cfg = TrainConfig(steps=3, batch_size=6, warmup=1, log_every=3, device="cpu", grad_clip=0.01, lr=1e-2)
    ema, _ = fit(model, batch_loss, cfg)
    return [dict(e.state_dict()) for e in ema.unstack()]


@pytest.mark.parametrize("arch", NETS)
def test_bf16_stacked_training_keeps_each_expert_isolated(arch):
    gen = torch.Generator().manual_seed(0)
    shape = NETS[arch][1]
    a, b = torch.randn(30, *shape, generator=gen), torch.randn(20, *shape, generator=gen)
    ya, yb = torch.randint(0, 3, (30,), generator=gen), torch.randint(0, 3, (20,), generator=gen)
    first = train(arch, [a, b], [ya, yb], bf16=True)
    second = train(arch, [a, b * 5 + 3], [ya, (yb + 1) % 3], bf16=True)  # another shard's contents change
    assert all(torch.equal(first[0][n], second[0][n]) for n in first[0])
    assert any(not torch.equal(first[1][n], second[1][n]) for n in first[1])
    full = train(arch, [a, b], [ya, yb], bf16=False)  # the bf16 path was taken: other weights
    assert any(not torch.equal(first[0][n], full[0][n]) for n in first[0])


def test_torch_compile_traces_the_stacked_experts_in_one_graph_and_agrees_under_autocast():
    """fit() compiles the stacked module with train.compile on CUDA; here the trace (no graph break)
    and the result of AOT autograd's graphs (backend aot_eager: no C++ compiler needed)."""
    stacked = StackedExperts(nets("dit"))
    x, t, y = batch("dit")
    with torch.autocast("cpu", torch.bfloat16):
        assert torch._dynamo.explain(stacked)(x, t, y).graph_break_count == 0
        eager = stacked(x, t, y)
        eager.float().square().sum().backward()
        expected = [p.grad.clone() for p in stacked.parameters()]
        stacked.zero_grad()
        compiled = torch.compile(stacked, backend="aot_eager")(x, t, y)
        compiled.float().square().sum().backward()
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(stacked.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
