"""Masked discrete flow matching: the path, the ELBO, the sampler and the
posterior identity p(x_0^i | x_t) = sum_k P(k | x_t) p_k(x_0^i | x_t)."""
import itertools
import math

import torch

from ddmkit.discrete.dfm import elbo_bits, mask_path, mixture_denoiser, sample_dfm
from ddmkit.discrete.tokens import MASK
from ddmkit.routing import RoutingState, parse_strategy


def point_denoiser(seq: torch.Tensor):
    """p(x_0 = seq) = 1: the exact denoiser of a one-sequence data set."""
    def den(xt):
        logp = torch.full((*xt.shape, 256), -1e4)
        return logp.scatter(-1, seq.expand(len(xt), -1)[..., None], 0.0).log_softmax(-1)
    return den


def test_mask_path_ends_and_rate():
    g, x0 = torch.Generator().manual_seed(0), torch.randint(0, 256, (200, 50))
    assert torch.equal(mask_path(x0, torch.zeros(200), g), x0)
    assert (mask_path(x0, torch.ones(200), g) == MASK).all()
    xt = mask_path(x0, torch.full((200,), 0.3), g)
    assert abs((xt == MASK).double().mean().item() - 0.3) < 0.01
    assert torch.equal(xt[xt != MASK], x0[xt != MASK])


def test_elbo_known_answers():
    g, x0 = torch.Generator().manual_seed(0), torch.randint(0, 256, (400, 16))
    uniform = lambda xt: torch.full((*xt.shape, 256), -math.log(256))
    # int_0^1 (1/t) (L t) 8 dt = 8 L bits
    assert abs(elbo_bits(uniform, x0, 8, g).mean().item() / 16 - 8.0) < 0.05
    seq = torch.arange(16)[None]
    assert elbo_bits(point_denoiser(seq), seq.expand(3, -1), 8, g).max() < 1e-3


def test_sampler_reaches_the_data_and_unmasks_everything():
    seq = torch.arange(100, 112)[None]
    x = sample_dfm(point_denoiser(seq), 5, 12, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, seq.expand(5, -1))


def table_denoiser(table: torch.Tensor, values: list):
    """Exact p(x_0^i | x_t) of a distribution `table` over all sequences in values^L (brute force)."""
    seqs = torch.tensor(list(itertools.product(values, repeat=round(math.log(len(table), len(values))))))

    def den(xt):
        ok = ((seqs[None] == xt[:, None]) | (xt[:, None] == MASK)).all(-1)  # (B, S) consistent with x_t
        post = table[None] * ok
        post = post / post.sum(1, keepdim=True)
        probs = torch.zeros(*xt.shape, 256, dtype=torch.float64)
        for s, seq in enumerate(seqs):
            probs[:, torch.arange(len(seq)), seq] += post[:, s:s + 1]
        return probs.clamp_min(1e-300).log()
    return den, seqs


def test_routed_mixture_of_exact_denoisers_is_the_global_denoiser():
    g = torch.Generator().manual_seed(0)
    values, length = [65, 66, 67], 3
    tables = [torch.rand(27, generator=g, dtype=torch.float64) ** 4 for _ in range(2)]
    tables = [t / t.sum() for t in tables]
    prior = torch.tensor([0.3, 0.7], dtype=torch.float64)
    experts = [table_denoiser(t, values)[0] for t in tables]
    glob, seqs = table_denoiser(prior[0] * tables[0] + prior[1] * tables[1], values)

    def exact_router(xt):  # P(k | x_t) ∝ pi_k p_k(unmasked part of x_t)
        ok = ((seqs[None] == xt[:, None]) | (xt[:, None] == MASK)).all(-1).double()
        lik = torch.stack([ok @ t for t in tables], 1)
        return prior * lik / (prior * lik).sum(1, keepdim=True)

    xt = mask_path(seqs[torch.multinomial(tables[1], 64, replacement=True, generator=g)],
                   torch.rand(64, generator=g), g)
    mixed = mixture_denoiser(experts, exact_router, parse_strategy("full"), RoutingState())(xt)
    assert torch.allclose(mixed.exp(), glob(xt).exp(), atol=1e-12)


def test_sparse_mixture_skips_unused_experts():
    calls = []
    den = lambda name: (lambda xt: calls.append(name) or torch.full((*xt.shape, 256), -math.log(256)))
    router = lambda xt: torch.tensor([[1.0, 0.0, 0.0]]).expand(len(xt), -1)
    mixture_denoiser([den("a"), den("b"), den("c")], router, parse_strategy("top-1"), RoutingState())(
        torch.zeros(4, 5, dtype=torch.long))
    assert calls == ["a"]
