"""Autoregressive experts, the prefix posterior and the routed mixture: known answers."""
import torch

from ddmkit.discrete.ar import (ar_inputs, bayes_posterior, bayes_router, mixture_logprobs, route, sample_ar,
                                token_logprobs)
from ddmkit.discrete.tokens import BOS, decode, encode
from ddmkit.nets.transformer import BidirectionalTransformer, CausalTransformer
from ddmkit.nets import from_pretrained, save_pretrained
from ddmkit.routing import RoutingState, parse_strategy


def tiny(seed, out_dim=256, **kw):
    torch.manual_seed(seed)
    return CausalTransformer(seq_len=16, out_dim=out_dim, width=32, depth=1, heads=2, **kw).eval()


class Constant(torch.nn.Module):
    """An 'expert' that puts probability p on one byte whatever the prefix."""

    def __init__(self, byte: int, p: float = 0.99):
        super().__init__()
        logp = torch.full((256,), (1 - p) / 255).log()
        logp[byte] = torch.tensor(p).log()
        self.register_buffer("logits", logp)

    def forward(self, tokens):
        return self.logits.expand(*tokens.shape, 256)


def test_ar_inputs_shift_by_one():
    w = encode("abc")[None]
    assert ar_inputs(w).tolist() == [[BOS, ord("a"), ord("b")]]


def test_causal_model_does_not_look_ahead():
    m, x = tiny(0), torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(m(x)[:, :9], m(y)[:, :9], atol=1e-6)
        assert not torch.allclose(m(x)[:, 9:], m(y)[:, 9:])


def test_bidirectional_model_looks_both_ways_and_pools():
    torch.manual_seed(0)
    m = BidirectionalTransformer(seq_len=8, out_dim=3, width=16, depth=1, heads=2, pool=True).eval()
    x = torch.randint(0, 256, (2, 8))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 256
    assert m(x).shape == (2, 3) and not torch.allclose(m(x), m(y))


def test_save_and_load_round_trip(tmp_path):
    m, x = tiny(1), torch.randint(0, 256, (3, 16))
    save_pretrained(tmp_path / "e", m, {"arch": "causal_transformer",
                                        "kwargs": {"seq_len": 16, "out_dim": 256, "width": 32, "depth": 1, "heads": 2}})
    loaded, cfg = from_pretrained(tmp_path / "e")
    assert cfg["arch"] == "causal_transformer"
    assert torch.equal(loaded(x), m(x))


def test_bayes_mixture_is_the_mixture_of_sequence_models():
    """Chain rule: sum_n log sum_k P(k|x_<n) q_k(x_n|x_<n) = log sum_k pi_k q_k(x)."""
    experts, prior = [tiny(s) for s in range(3)], torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    w = torch.randint(0, 256, (4, 16))
    logq = torch.stack([token_logprobs(m, w) for m in experts]).double()
    post = bayes_posterior(logq, prior)
    assert torch.allclose(post[:, 0], prior.expand(4, -1))
    assert torch.allclose(post.sum(-1), torch.ones(4, 16, dtype=torch.float64))
    lhs = mixture_logprobs(logq, post).sum(1)
    rhs = torch.logsumexp(prior.log()[:, None] + logq.sum(-1), 0)
    assert torch.allclose(lhs, rhs, atol=1e-9)


def test_one_hot_weights_select_one_expert():
    experts = [tiny(s) for s in range(2)]
    w = torch.randint(0, 256, (2, 16))
    logq = torch.stack([token_logprobs(m, w) for m in experts]).double()
    probs = torch.tensor([0.3, 0.7], dtype=torch.float64).expand(2, 16, 2)
    weights = route(probs, parse_strategy("top-1"), RoutingState())
    assert torch.allclose(mixture_logprobs(logq, weights), logq[1])


def test_bayes_router_follows_the_prompt():
    """Experts say 'a' or 'b'; after the prompt 'bbbb' the posterior is on the 'b' expert."""
    experts = [Constant(ord("a")), Constant(ord("b"))]
    prior = torch.tensor([0.5, 0.5], dtype=torch.float64)
    x, used = sample_ar(experts, bayes_router(prior), parse_strategy("top-1"), n=4, length=8,
                        generator=torch.Generator().manual_seed(0), prompt=encode("bbbb"))
    assert (used[:, :, 1] == 1).all()
    assert decode(x[0]).count("b") >= 6
    x, used = sample_ar(experts, bayes_router(prior), parse_strategy("full"), n=2, length=12,
                        generator=torch.Generator().manual_seed(0), prompt=encode("aaaa"))
    assert (used[:, -1, 0] > 0.999).all()  # the posterior sharpens as the sample agrees with expert 0
