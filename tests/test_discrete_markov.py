"""Exactness: a known mixture of Markov chains. Exact experts + exact
posterior give the global next-token law (KL < 1e-6, brute force truth);
KL grows with router error and never exceeds the router's own KL."""
import pytest
import torch

from ddmkit.discrete.ar import bayes_posterior, mixture_logprobs
from ddmkit.discrete.markov import (MarkovMixture, corrupt, decentralized_next, exactness_rows,
                                    global_next_bruteforce, kl)
from ddmkit.errors import DDMError


@pytest.mark.parametrize("k,v,length,seed", [(3, 4, 6, 0), (2, 3, 7, 1), (5, 2, 8, 2)])
def test_exact_experts_and_posterior_give_the_global_law(k, v, length, seed):
    mix = MarkovMixture.random(k, v, seed)
    for n, (prefixes, p_next) in global_next_bruteforce(mix, length).items():
        assert torch.allclose(p_next.sum(1), torch.ones(len(p_next), dtype=torch.float64))
        assert kl(p_next, decentralized_next(mix, prefixes)).max() < 1e-6


def test_kl_grows_with_router_error():
    rows = exactness_rows(MarkovMixture.random(3, 4, 0), length=6)
    kls = [r["kl_mean"] for r in rows]
    assert rows[0]["router_eps"] == 0 and rows[0]["kl_max"] < 1e-12
    assert all(a < b for a, b in zip(kls, kls[1:]))
    assert all(r["kl_mean"] <= r["router_kl_mean"] + 1e-12 for r in rows)


def test_next_token_error_is_bounded_by_router_error():
    """KL(sum P q || sum r q) <= KL(P || r) for every prefix (data processing)."""
    mix = MarkovMixture.random(4, 3, 3)
    for prefixes, _ in global_next_bruteforce(mix, 5).values():
        post = mix.posterior(prefixes)
        for eps in (0.05, 0.5):
            r = corrupt(post, eps)
            assert (kl(decentralized_next(mix, prefixes), decentralized_next(mix, prefixes, r))
                    <= kl(post, r) + 1e-12).all()


def test_chain_rule_identity_of_the_bayes_mixture():
    """sum_n log sum_k P(k|x_<n) q_k(x_n|x_<n) = log sum_k pi_k p_k(x)."""
    mix = MarkovMixture.random(3, 4, 5)
    x, _ = mix.sample(64, 9, torch.Generator().manual_seed(0))
    logq = torch.stack([torch.stack([mix.expert_next(x[:, :n])[k].gather(1, x[:, n:n + 1]).squeeze(1).log()
                                     for n in range(x.shape[1])], 1) for k in range(mix.k)])  # (K, B, L)
    post = bayes_posterior(logq, mix.prior)
    assert torch.allclose(post[:, 3], mix.posterior(x[:, :3]))
    lhs = mixture_logprobs(logq, post).sum(1)
    rhs = torch.logsumexp(mix.prior.log()[:, None] + mix.log_likelihood(x), 0)
    assert torch.allclose(lhs, rhs, atol=1e-10)


def test_samples_follow_the_mixture():
    mix = MarkovMixture.random(3, 4, 0)
    x, labels = mix.sample(40000, 2, torch.Generator().manual_seed(1))
    freq = torch.bincount(x[:, 0], minlength=4).double() / len(x)
    assert torch.allclose(freq, mix.prior @ mix.init, atol=0.01)
    assert torch.allclose(torch.bincount(labels, minlength=3).double() / len(x), mix.prior, atol=0.01)


def test_bad_markov_arguments():
    with pytest.raises(DDMError, match="v >= 2"):
        MarkovMixture.random(2, 1)
