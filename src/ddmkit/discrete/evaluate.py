"""Held-out evaluation and samples of a decentralized text model.

Bits per byte are accumulated per test cluster as (bits, bytes) and reported
per cluster and overall (byte-weighted). Rows:

    centralized              one model trained on all clusters, same total compute
    own expert               each cluster's text scored by its own expert (needs the true cluster)
    <router> / <strategy>    the routed mixture sum_k w_k q_k, w = strategy(router)
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ddmkit.discrete.ar import (ar_inputs, bayes_posterior, bayes_router, learned_router, mixture_logprobs, route,
                                sample_ar, token_logprobs, total_bits)
from ddmkit.discrete.dfm import elbo_bits, mask_path, mixture_denoiser, model_denoiser, sample_dfm
from ddmkit.discrete.shards import eval_windows
from ddmkit.discrete.tokens import encode
from ddmkit.errors import DDMError
from ddmkit.routing.strategies import RoutingState
from ddmkit.routing.table import parse_strategy

DFM_ROUTER_TIMES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


class Tally:
    """bits and bytes per (row name, cluster)."""

    def __init__(self, k: int):
        self.k = k
        self.bits = defaultdict(lambda: [0.0] * k)
        self.bytes = defaultdict(lambda: [0] * k)

    def add(self, name: str, c: int, bits: float, n_bytes: int) -> None:
        self.bits[name][c] += bits
        self.bytes[name][c] += n_bytes

    def table(self) -> dict[str, dict]:
        """name -> {"per_cluster": [bpb or None], "all": bpb}."""
        out = {}
        for name, bits in self.bits.items():
            n = self.bytes[name]
            out[name] = {"per_cluster": [b / m if m else None for b, m in zip(bits, n)], "all": sum(bits) / max(sum(n), 1)}
        return out


def _state(seed: int) -> RoutingState:
    return RoutingState(generator=torch.Generator().manual_seed(seed))


def prefix_lengths(seq_len: int) -> list[int]:
    """0, 1, 2, 4, .. and seq_len - 1: prefix lengths at which router accuracy is reported."""
    out, n = [0], 1
    while n < seq_len - 1:
        out.append(n)
        n *= 2
    return out + [seq_len - 1]


@torch.no_grad()
def evaluate_ar(experts, central, routers: dict, prior: torch.Tensor, test_streams, cfg) -> dict:
    """routers: name -> a causal router model, or None for the exact Bayes posterior."""
    length, k = cfg.model.seq_len, len(experts)
    tally, positions = Tally(k), prefix_lengths(length)
    correct = {name: torch.zeros(len(positions)) for name in routers}
    n_windows = 0
    for c, stream in enumerate(test_streams):
        w = eval_windows(stream, length, cfg.evaluate.windows_per_cluster)
        if len(w) == 0:
            continue
        n_windows += len(w)
        logq = torch.stack([token_logprobs(m, w) for m in experts]).double()  # (K, B, L)
        if central is not None:
            tally.add("centralized", c, total_bits(token_logprobs(central, w)), w.numel())
        tally.add("own expert (true cluster)", c, total_bits(logq[c]), w.numel())
        for name, model in routers.items():
            probs = bayes_posterior(logq, prior) if model is None else model(ar_inputs(w)).double().softmax(-1)
            correct[name] += (probs[:, positions].argmax(-1) == c).double().sum(0).float()
            for spec in cfg.evaluate.strategies:
                weights = route(probs, parse_strategy(spec), _state(cfg.seed))
                tally.add(f"{name} / {spec}", c, total_bits(mixture_logprobs(logq, weights)), w.numel())
    if n_windows == 0:
        raise DDMError("evaluate: no held-out window in any cluster; lower model.seq_len or raise "
                       "corpus.test_fraction")
    accuracy = {name: dict(zip(positions, (v / n_windows).tolist())) for name, v in correct.items()}
    return {"bits_per_byte": tally.table(), "router_accuracy": accuracy, "router_axis": "prefix length (bytes)",
            "eval_windows": n_windows}


@torch.no_grad()
def evaluate_dfm(experts, central, routers: dict, prior: torch.Tensor, test_streams, cfg) -> dict:
    """ELBO bits per byte (an upper bound) with the same masks for every row
    (common random numbers); router accuracy against the masking time t."""
    length, k, t_points = cfg.model.seq_len, len(experts), cfg.evaluate.t_points
    tally = Tally(k)
    correct = {name: torch.zeros(len(DFM_ROUTER_TIMES)) for name in routers}
    dens = [model_denoiser(m) for m in experts]
    n_windows = 0
    masks = lambda: torch.Generator().manual_seed(cfg.seed + 7)
    for c, stream in enumerate(test_streams):
        w = eval_windows(stream, length, cfg.evaluate.windows_per_cluster)
        if len(w) == 0:
            continue
        n_windows += len(w)
        if central is not None:
            tally.add("centralized", c, float(elbo_bits(model_denoiser(central), w, t_points, masks()).sum()), w.numel())
        tally.add("own expert (true cluster)", c, float(elbo_bits(dens[c], w, t_points, masks()).sum()), w.numel())
        for name, model in routers.items():
            router = lambda xt, m=model: m(xt).softmax(-1)
            for i, t in enumerate(DFM_ROUTER_TIMES):
                xt = mask_path(w, torch.full((len(w),), t), masks())
                correct[name][i] += float((router(xt).argmax(-1) == c).sum())
            for spec in cfg.evaluate.strategies:
                den = mixture_denoiser(dens, router, parse_strategy(spec), _state(cfg.seed))
                tally.add(f"{name} / {spec}", c, float(elbo_bits(den, w, t_points, masks()).sum()), w.numel())
    if n_windows == 0:
        raise DDMError("evaluate: no held-out window in any cluster; lower model.seq_len or raise "
                       "corpus.test_fraction")
    accuracy = {name: dict(zip(DFM_ROUTER_TIMES, (v / n_windows).tolist())) for name, v in correct.items()}
    return {"bits_per_byte": tally.table(), "router_accuracy": accuracy,
            "router_axis": "masking time t (fraction masked; t=1 fully masked)", "eval_windows": n_windows,
            "bound": "ELBO (upper bound on bits per byte)"}


@torch.no_grad()
def samples_ar(experts, central, routers: dict, prior, cfg) -> dict[str, list[bytes]]:
    """Generated bytes (the prompt's, then the drawn ones) per centralized model and per (router, strategy);
    sample_texts decodes them."""
    prompt = encode(cfg.sample.prompt)
    length = cfg.sample.length or cfg.model.seq_len - len(prompt)  # the config checked that both fit
    s = cfg.sample
    draw = lambda ms, router, spec: sample_ar(ms, router, parse_strategy(spec), s.n, length,
                                              torch.Generator().manual_seed(s.seed), prompt, s.temperature)[0]
    out = {}
    if central is not None:
        out["centralized"] = draw([central], lambda x, lp: torch.ones(len(x), 1), "full")
    for name, model in routers.items():
        router = bayes_router(prior) if model is None else learned_router(model)
        for spec in cfg.evaluate.strategies:
            out[f"{name} / {spec}"] = draw(experts, router, spec)
    return {name: [bytes(prompt.tolist()) + bytes(row.tolist()) for row in x] for name, x in out.items()}


@torch.no_grad()
def samples_dfm(experts, central, routers: dict, prior, cfg) -> dict[str, list[bytes]]:
    """Generated bytes (every position unmasked) per centralized model and per (router, strategy)."""
    s, length = cfg.sample, cfg.model.seq_len  # the config checked sample.length (None or seq_len)
    draw = lambda den: sample_dfm(den, s.n, length, s.steps, torch.Generator().manual_seed(s.seed), s.temperature)
    out = {}
    if central is not None:
        out["centralized"] = draw(model_denoiser(central))
    dens = [model_denoiser(m) for m in experts]
    for name, model in routers.items():
        for spec in cfg.evaluate.strategies:
            den = mixture_denoiser(dens, lambda xt, m=model: m(xt).softmax(-1), parse_strategy(spec), _state(s.seed))
            out[f"{name} / {spec}"] = draw(den)
    return {name: [bytes(row.tolist()) for row in x] for name, x in out.items()}


def sample_texts(samples: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """The texts of sampled bytes (samples_ar, samples_dfm); bytes that are not valid UTF-8 show as U+FFFD."""
    return {name: [row.decode("utf-8", errors="replace") for row in rows] for name, rows in samples.items()}
