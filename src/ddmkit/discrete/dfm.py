"""Masked (absorbing) discrete flow matching for fixed-length byte windows.

Time convention (ddmkit's, for every path): t = 0 is data, t = 1 is noise,
here the fully masked window. Each position is masked independently:

    x_t^i = x_0^i with probability 1 - t,   MASK with probability t.

(Gat et al. 2024 run time the other way, data at t' = 1, with scheduler
kappa_t' = t'; so t = 1 - t', kappa = 1 - t.) A denoiser gives
p(x_0^i | x_t) for masked positions; it needs no t input, because for this
path the posterior of a clean token given x_t does not depend on t.

Probability velocity, written for sampling from t = 1 down to t = 0: a masked
position jumps to byte y at rate  u_t(y) = p(x_0^i = y | x_t) / t  per unit
of decreasing t, so over a step t -> s < t it is unmasked with probability
(t - s) / t, its value drawn from the denoiser. u is linear in the denoiser,
hence for a mixture of clusters (same path for every expert)

    p(x_0^i | x_t) = sum_k P(k | x_t) p_k(x_0^i | x_t),   u_t = sum_k P(k | x_t) u_t^k,

and P(k | x_t) ∝ pi_k p_k(unmasked part of x_t) does not depend on t either.

ELBO (bits per byte bound on held-out text):

    -log p(x_0) <= int_0^1 (1/t) E[ sum_{i: x_t^i = MASK} -log p(x_0^i | x_t) ] dt.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ddmkit.discrete.tokens import MASK, NUM_BYTES
from ddmkit.routing.strategies import RoutingState

Denoiser = Callable[[torch.Tensor], torch.Tensor]  # x_t (B, L) -> log p(x_0^i | x_t) (B, L, 256)


def mask_path(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x_t: each byte replaced by MASK with probability t (t: (B,))."""
    u = torch.rand(x0.shape, generator=generator)
    return torch.where(u < t[:, None], torch.full_like(x0, MASK), x0)


def dfm_loss(model: Denoiser, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy of the denoiser on the masked positions, t ~ U(0, 1)."""
    t = torch.rand(len(x0), generator=generator).clamp_min(1e-3)
    xt = mask_path(x0, t, generator)
    masked = xt == MASK
    logits = model(xt)[masked]
    if logits.numel() == 0:
        return model(xt).sum() * 0.0
    return torch.nn.functional.cross_entropy(logits, x0[masked])


def model_denoiser(model: torch.nn.Module) -> Denoiser:
    return lambda xt: model(xt)[..., :NUM_BYTES].log_softmax(-1)


def mixture_denoiser(experts: Sequence[Denoiser], router: Callable[[torch.Tensor], torch.Tensor], strategy,
                     state: RoutingState) -> Denoiser:
    """log sum_k w_k p_k(x_0^i | x_t), w = strategy(router(x_t)); each expert runs
    only on the rows that give it non-zero weight."""
    def denoise(xt: torch.Tensor) -> torch.Tensor:
        w = strategy.weights(router(xt), state)
        out = torch.zeros(*xt.shape, NUM_BYTES, dtype=torch.float64)
        for k in (w != 0).any(0).nonzero().flatten().tolist():
            rows = (w[:, k] != 0).nonzero().flatten()
            out.index_add_(0, rows, w[rows, k, None, None].double() * experts[k](xt[rows]).double().exp())
        return out.clamp_min(1e-30).log()
    return denoise


@torch.no_grad()
def elbo_bits(denoise: Denoiser, x0: torch.Tensor, t_points: int, generator: torch.Generator) -> torch.Tensor:
    """Upper bound on -log2 p(x_0) per window, (B,), by the midpoint rule on
    t_j = (j + 1/2) / J with one random mask per window and time point."""
    total = torch.zeros(len(x0), dtype=torch.float64)
    for j in range(t_points):
        t = torch.full((len(x0),), (j + 0.5) / t_points)
        xt = mask_path(x0, t, generator)
        logp = denoise(xt).gather(-1, x0[..., None]).squeeze(-1)
        total += (-(logp * (xt == MASK)).sum(1)).double() / t[0] / t_points
    return total / math.log(2)


@torch.no_grad()
def sample_dfm(denoise: Denoiser, n: int, length: int, steps: int, generator: torch.Generator,
               temperature: float = 1.0) -> torch.Tensor:
    """Unmask from t = 1 (all MASK) to t = 0 on a uniform grid: over t -> s each
    masked position is revealed with probability (t - s)/t, its byte drawn
    from the (mixture) denoiser. Returns (n, length) bytes."""
    x = torch.full((n, length), MASK, dtype=torch.long)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t, s in zip(ts[:-1].tolist(), ts[1:].tolist()):
        probs = (denoise(x) / temperature).softmax(-1)
        draw = torch.multinomial(probs.reshape(-1, NUM_BYTES), 1, generator=generator).reshape(n, length)
        reveal = (x == MASK) & (torch.rand(x.shape, generator=generator) < (t - s) / t)
        x = torch.where(reveal, draw, x)
    return x
