"""Decentralized autoregressive generation: a mixture of next-token experts.

With data a mixture p(x) = sum_k pi_k p_k(x) of clusters, the global
next-token distribution is the posterior-weighted sum of the cluster ones:

    p(x_n | x_<n) = sum_k P(k | x_<n) p_k(x_n | x_<n),
    P(k | x_<n)  ∝ pi_k prod_{i<n} p_k(x_i | x_<i)                  (Bayes)

Conventions: a window is (B, L) byte ids x_0..x_{L-1}; a model reads
inputs [BOS, x_0, .., x_{L-2}] and its output at position n predicts x_n
from x_<n. Router probabilities are (B, L, K), row n = P(k | x_<n), so row 0
is the prior. Expert log-probabilities of the window are (K, B, L).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ddmkit.discrete.tokens import BOS, NUM_BYTES
from ddmkit.routing.strategies import RoutingState

Model = Callable[[torch.Tensor], torch.Tensor]  # tokens (B, n) -> logits (B, n, out)


def ar_inputs(windows: torch.Tensor) -> torch.Tensor:
    """[BOS, x_0, .., x_{L-2}]: the model input whose position n predicts x_n."""
    bos = torch.full_like(windows[:, :1], BOS)
    return torch.cat([bos, windows[:, :-1]], dim=1)


def ar_loss(model: Model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over all L positions."""
    logits = model(ar_inputs(windows))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows.reshape(-1))


@torch.no_grad()
def token_logprobs(model: Model, windows: torch.Tensor) -> torch.Tensor:
    """log p(x_n | x_<n) for every position: (B, L)."""
    logp = model(ar_inputs(windows)).log_softmax(-1)
    return logp.gather(-1, windows[..., None]).squeeze(-1)


def bayes_posterior(expert_logp: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Exact prefix posterior from the experts' own likelihoods, (K, B, L) -> (B, L, K):

        log P(k | x_<n) = log pi_k + sum_{i<n} log p_k(x_i | x_<i) - log Z_n."""
    k, b, _ = expert_logp.shape
    before = torch.cat([torch.zeros(k, b, 1, dtype=expert_logp.dtype), expert_logp.cumsum(-1)[..., :-1]], -1)
    logits = prior.log().to(expert_logp.dtype)[:, None, None] + before
    return logits.softmax(0).permute(1, 2, 0)


def route(probs: torch.Tensor, strategy, state: RoutingState) -> torch.Tensor:
    """A routing strategy applied at every position: (B, L, K) -> weights (B, L, K)."""
    b, n, k = probs.shape
    return strategy.weights(probs.reshape(b * n, k), state).reshape(b, n, k)


def mixture_logprobs(expert_logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k p_k(x_n | x_<n): (K, B, L) and (B, L, K) -> (B, L)."""
    logw = weights.permute(2, 0, 1).clamp_min(0).log()
    return torch.logsumexp(logw + expert_logp, dim=0)


def total_bits(logp: torch.Tensor) -> float:
    """-sum log2 p over all entries of a log-probability tensor (nats in)."""
    return float(-logp.double().sum() / math.log(2))


@torch.no_grad()
def sample_ar(experts: Sequence[Model], router: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], strategy,
              n: int, length: int, generator: torch.Generator, prompt: torch.Tensor | None = None,
              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate n continuations of `length` bytes with the routed mixture

        x_m ~ sum_k w_k p_k(. | x_<m),   w = strategy(P(k | x_<m)).

    router(inputs (n, m), expert_logp (K, n, m)) -> P(k | x_<m) (n, K); the
    Bayes router uses the experts' log-probabilities of the bytes so far, a
    learned one the inputs. Every expert runs at every step (dense; the
    models are small). Returns (bytes (n, length), weights used (n, length, K))."""
    prompt = prompt if prompt is not None else torch.zeros(0, dtype=torch.long)
    x = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), prompt.expand(n, -1)], dim=1)
    state = RoutingState(generator=generator)
    used = []
    for _ in range(length):
        logp = torch.stack([m(x)[..., :NUM_BYTES].log_softmax(-1) for m in experts])  # (K, n, m, 256)
        seen = logp[:, :, :-1].gather(-1, x[None, :, 1:, None].expand(len(experts), -1, -1, 1)).squeeze(-1)
        w = strategy.weights(router(x, seen), state)  # (n, K)
        mix = torch.einsum("nk,knv->nv", w.to(logp.dtype), logp[:, :, -1].exp())
        mix = (mix.clamp_min(1e-30).log() / temperature).softmax(-1)
        x = torch.cat([x, torch.multinomial(mix, 1, generator=generator)], dim=1)
        used.append(w)
    return x[:, 1 + len(prompt):], torch.stack(used, 1)


def bayes_router(prior: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Router for sample_ar: P(k | x_<m) ∝ pi_k prod_i p_k(x_i | x_<i)."""
    def router(inputs: torch.Tensor, expert_logp: torch.Tensor) -> torch.Tensor:
        logits = prior.log().to(expert_logp.dtype)[:, None] + expert_logp.sum(-1)
        return logits.softmax(0).T
    return router


def learned_router(model: Model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Router for sample_ar from a causal model with K outputs per position."""
    return lambda inputs, expert_logp: model(inputs)[:, -1].softmax(-1)
