"""Exactness source: a known mixture of K Markov chains on V symbols.

Cluster k has initial law mu_k and transition matrix T_k; a sequence comes
from cluster k with probability pi_k. Everything is exact (float64):

    expert      q_k(x_{n+1} | x_<=n) = T_k[x_n]              (mu_k for the empty prefix)
    posterior   P(k | x_<=n) ∝ pi_k mu_k(x_1) prod_i T_k[x_i, x_{i+1}]
    global      p(x_{n+1} | x_<=n) = p(x_<=n, x_{n+1}) / p(x_<=n)

The global law is computed independently, by enumerating all V^N sequences
and summing the joint table; `exactness_rows` checks that the decentralized
mixture sum_k P(k | x_<=n) q_k equals it, and how KL grows as the router's
posterior is corrupted toward uniform:  r = (1 - eps) P + eps / K.

Since (k, y) -> y is a channel, KL(p || sum_k r_k q_k) <= KL(P(k|x) || r)
(data processing): next-token error never exceeds router error.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ddmkit.errors import DDMError


@dataclass
class MarkovMixture:
    prior: torch.Tensor  # (K,)
    init: torch.Tensor  # (K, V)
    trans: torch.Tensor  # (K, V, V), rows sum to 1

    @property
    def k(self) -> int:
        return len(self.prior)

    @property
    def v(self) -> int:
        return self.init.shape[1]

    @classmethod
    def random(cls, k: int = 3, v: int = 4, seed: int = 0, concentration: float = 0.5) -> "MarkovMixture":
        """Dirichlet(concentration) rows: small concentration, distinct chains."""
        if k < 1 or v < 2:
            raise DDMError(f"markov mixture: need k >= 1 and v >= 2, got k={k}, v={v}")
        g = torch.Generator().manual_seed(seed)
        dirichlet = lambda *shape: torch._standard_gamma(torch.full(shape, concentration, dtype=torch.float64),
                                                         generator=g)
        norm = lambda a: a / a.sum(-1, keepdim=True)
        return cls(norm(dirichlet(k) + 0.5), norm(dirichlet(k, v)), norm(dirichlet(k, v, v)))

    def sample(self, n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequences (n, length), cluster labels (n,)), ancestral sampling."""
        labels = torch.multinomial(self.prior, n, replacement=True, generator=generator)
        x = torch.multinomial(self.init[labels], 1, generator=generator)
        for _ in range(length - 1):
            x = torch.cat([x, torch.multinomial(self.trans[labels, x[:, -1]], 1, generator=generator)], 1)
        return x, labels

    def expert_next(self, x: torch.Tensor) -> torch.Tensor:
        """q_k(. | x_<=n) for every expert: (B, n) -> (K, B, V)."""
        if x.shape[1] == 0:
            return self.init[:, None].expand(-1, len(x), -1)
        return self.trans[:, x[:, -1]]

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p_k(x) for every cluster: (B, n) -> (K, B)."""
        if x.shape[1] == 0:
            return torch.zeros(self.k, len(x), dtype=torch.float64)
        ll = self.init[:, x[:, 0]].log()
        for i in range(x.shape[1] - 1):
            ll = ll + self.trans[:, x[:, i], x[:, i + 1]].log()
        return ll

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """P(k | x_<=n): (B, n) -> (B, K)."""
        return (self.prior.log()[:, None] + self.log_likelihood(x)).softmax(0).T


def decentralized_next(mix: MarkovMixture, x: torch.Tensor, router: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k r_k q_k(. | x_<=n), r = the exact posterior unless given: (B, V)."""
    r = mix.posterior(x) if router is None else router
    return torch.einsum("bk,kbv->bv", r, mix.expert_next(x))


def global_next_bruteforce(mix: MarkovMixture, length: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For every prefix length n < length: (all prefixes (V^n, n), p(x_{n+1} | prefix) (V^n, V)),
    from the joint table of all V^length sequences, marginalised by summation."""
    seqs = torch.tensor(list(itertools.product(range(mix.v), repeat=length)))
    joint = (mix.prior.log()[:, None] + mix.log_likelihood(seqs)).exp().sum(0).reshape((mix.v,) * length)
    out = {}
    for n in range(length):
        marg = joint.sum(dim=tuple(range(n + 1, length))) if n + 1 < length else joint  # p(x_<=n+1)
        table = marg.reshape(-1, mix.v)
        prefixes = torch.tensor(list(itertools.product(range(mix.v), repeat=n)), dtype=torch.long)
        prefixes = prefixes.reshape(len(table), n)
        out[n] = (prefixes, table / table.sum(1, keepdim=True))
    return out


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats."""
    return (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(-1)


def corrupt(post: torch.Tensor, eps: float) -> torch.Tensor:
    """A router with error: (1 - eps) P + eps / K."""
    return (1 - eps) * post + eps / post.shape[1]


def exactness_rows(mix: MarkovMixture, length: int = 6, eps_grid=(0.0, 0.01, 0.03, 0.1, 0.3, 1.0)) -> list[dict]:
    """Per router error eps: max and mean over all prefixes (lengths 0..length-1,
    weighted by p(prefix)) of KL(global || decentralized), the router's own
    KL(P || r) and its argmax accuracy against the exact posterior's argmax."""
    truth = global_next_bruteforce(mix, length)
    rows = []
    for eps in eps_grid:
        kls, weights, router_kls, tvs = [], [], [], []
        for n, (prefixes, p_next) in truth.items():
            post = mix.posterior(prefixes)
            r = corrupt(post, eps)
            kls.append(kl(p_next, decentralized_next(mix, prefixes, r)))
            router_kls.append(kl(post, r))
            tvs.append(0.5 * (post - r).abs().sum(1))
            weights.append((mix.prior.log()[:, None] + mix.log_likelihood(prefixes)).exp().sum(0) / length)
        kls, weights, router_kls, tvs = map(torch.cat, (kls, weights, router_kls, tvs))
        rows.append({"router_eps": eps, "kl_max": float(kls.max()), "kl_mean": float((weights * kls).sum()),
                     "router_kl_mean": float((weights * router_kls).sum()),
                     "router_tv_mean": float((weights * tvs).sum())})
    return rows
