"""Expert-data alignment for token experts: how well each expert predicts each cluster's held-out
text, and how much of the routing weight lands on the expert of the text's own cluster.

    B[j, c] = bits per byte of expert j on the held-out windows of cluster c
              (autoregressive: exact; masked flow matching: the ELBO, an upper bound)
    own-cluster weight(s) = mean over cluster-c windows of w_c(s), the weight the routing strategy
              gives expert c (the text's own cluster) at prefix length s (autoregressive) or at
              masking time s (masked flow matching)

Aligned experts have a small diagonal against the rest of their column; a router aligned with
the data puts its weight on the diagonal expert as the prefix grows (or the masking thins).
"""
from __future__ import annotations

import torch

from ddmkit.discrete.ar import ar_inputs, bayes_posterior, route, token_logprobs, total_bits
from ddmkit.discrete.dfm import elbo_bits, mask_path, model_denoiser
from ddmkit.discrete.evaluate import DFM_ROUTER_TIMES, prefix_lengths
from ddmkit.discrete.shards import eval_windows
from ddmkit.routing.strategies import RoutingState
from ddmkit.routing.table import parse_strategy

def _windows(test_streams, length: int, per_cluster: int) -> list[torch.Tensor]:
    return [eval_windows(stream, length, per_cluster) for stream in test_streams]


@torch.no_grad()
def expert_cluster_bits(experts, test_streams, length: int, per_cluster: int, kind: str, t_points: int = 8,
                        seed: int = 0) -> list[list[float | None]]:
    """B[j][c]: bits per byte of expert j on cluster c's held-out windows (None: no window)."""
    out = [[None] * len(test_streams) for _ in experts]
    for c, w in enumerate(_windows(test_streams, length, per_cluster)):
        if len(w) == 0:
            continue
        for j, model in enumerate(experts):
            if kind == "text_ar":
                bits = total_bits(token_logprobs(model, w))
            else:
                bits = float(elbo_bits(model_denoiser(model), w, t_points, torch.Generator().manual_seed(seed + 7)).sum())
            out[j][c] = bits / w.numel()
    return out


@torch.no_grad()
def own_cluster_weight(experts, routers: dict, prior: torch.Tensor, test_streams, length: int, per_cluster: int,
                       kind: str, strategies: list[str], seed: int = 0) -> dict:
    """{router / strategy: {"axis": [s ...], "weight": [mean own-cluster weight at s ...]}} over all clusters'
    held-out windows; routers: name -> model, or None for the exact Bayes posterior (autoregressive)."""
    windows = _windows(test_streams, length, per_cluster)
    axis = prefix_lengths(length) if kind == "text_ar" else list(DFM_ROUTER_TIMES)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for c, w in enumerate(windows):
        if len(w) == 0:
            continue
        count += len(w)
        for name, model in routers.items():
            for spec in strategies:
                weights = _weights(experts, model, prior, w, kind, parse_strategy(spec), axis, seed)  # (B, S, K)
                key = f"{name} / {spec}"
                sums[key] = sums.get(key, torch.zeros(len(axis), dtype=torch.float64)) + weights[..., c].sum(0)
    return {key: {"axis": axis, "weight": (v / max(count, 1)).tolist()} for key, v in sums.items()}


def _weights(experts, router, prior, w: torch.Tensor, kind: str, strategy, axis: list, seed: int) -> torch.Tensor:
    """Routing weights (B, len(axis), K) of a strategy on windows w at every point of the axis."""
    state = RoutingState(generator=torch.Generator().manual_seed(seed))
    if kind == "text_ar":
        if router is None:
            probs = bayes_posterior(torch.stack([token_logprobs(m, w) for m in experts]).double(), prior)
        else:
            probs = router(ar_inputs(w)).double().softmax(-1)
        return route(probs[:, axis].float(), strategy, state).double()
    gen = torch.Generator().manual_seed(seed + 7)
    rows = []
    for t in axis:
        probs = router(mask_path(w, torch.full((len(w),), float(t)), gen)).softmax(-1)
        rows.append(strategy.weights(probs, state).double())
    return torch.stack(rows, 1)
