"""Routed sampling: one strategy, one solver, the same starting noise for every strategy.

    x0, info = sample_ddm(ddm, "top-2", n=1000, steps=50, solver="euler", seed=0)

info holds the expert evaluations per sample, router calls, wall time and
the number of velocity evaluations.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ddmkit.pipeline.ddm import DDM
from ddmkit.routing import CallCounter, RoutingState, parse_strategy, routed_velocity
from ddmkit.sample import get_solver, time_grid
from ddmkit.sample.graphs import graphed


def start_noise(n: int, data_shape, seed: int, device="cpu") -> torch.Tensor:
    """x_1 ~ N(0, I), the same for a given seed whatever the strategy."""
    return torch.randn(n, *data_shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def sample_field(velocity, x1: torch.Tensor, steps: int, solver: str, callback=None) -> torch.Tensor:
    ts = time_grid(steps, dtype=torch.float32).to(x1.device)
    return get_solver(solver)(velocity, x1, ts, callback=callback)


def _autocast(device, dtype: str | None):
    """bf16 (or fp16) autocast for the network calls when asked; a no-op otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def sample_ddm(ddm: DDM, strategy: str, n: int, steps: int = 50, solver: str = "euler", seed: int = 0,
               device="cpu", x1: torch.Tensor | None = None, callback=None, router_every: int = 1,
               autocast: str | None = None, cond: dict[str, torch.Tensor] | None = None,
               cuda_graphs: bool = False) -> tuple[torch.Tensor, dict]:
    """router_every = m reuses the routing for m velocity evaluations (1: route every time);
    autocast = "bfloat16" runs the networks under autocast (the state stays in float32);
    cuda_graphs = True replays the experts and the router from CUDA graphs on a GPU, rows padded
    to a few bucket sizes (ddmkit.sample.graphs; the graphs are kept for later calls);
    cond = per-sample conditioning passed to the experts, e.g. {"y": class labels (n,)}; it reaches
    the router too when the DDM's router is label-conditional, and with labels the oracle draws
    each sample's cluster from p(cluster | label) (ddm.label_prior) instead of the cluster sizes."""
    strat = parse_strategy(strategy)
    x1 = start_noise(n, ddm.data_shape, seed, device) if x1 is None else x1
    gen = torch.Generator(device=x1.device).manual_seed(seed + 1)
    prior = ddm.prior
    if ddm.label_prior is not None and cond is not None and "y" in cond:
        prior = ddm.label_prior.to(x1.device)[cond["y"]]  # (n, K) p(cluster | y) per sample
    state = RoutingState(generator=gen, prior=prior, nearest=ddm.nearest)
    counter = CallCounter()
    nfe = [0]
    router_cond = cond if ddm.router_conditional else None
    experts, router = ddm.experts, ddm.router
    if cuda_graphs:
        experts, router = [graphed(e) for e in experts], graphed(router, max_rows=None)  # the router: any batch
    field = routed_velocity(experts, router, strat, state, counter, cond=cond, router_every=router_every,
                            router_cond=router_cond)

    def counted(x, t):
        nfe[0] += 1
        return field(x, t)

    _sync(device)
    start = time.perf_counter()
    with _autocast(device, autocast):
        x0 = sample_field(counted, x1, steps, solver, callback)
    _sync(device)
    wall = time.perf_counter() - start
    return x0, {"strategy": strategy, "expert_calls_per_sample": counter.total_rows / len(x1),
                "router_calls": counter.router_calls, "velocity_evaluations": nfe[0], "wall_time": wall,
                "expert_rows": counter.expert_rows}


def sample_single(field, data_shape, n: int, steps: int = 50, solver: str = "euler", seed: int = 0,
                  device="cpu", name: str = "monolith", x1: torch.Tensor | None = None,
                  cuda_graphs: bool = False) -> tuple[torch.Tensor, dict]:
    """Sampling with one velocity field (the monolith): one network call per evaluation
    (cuda_graphs: replayed from a CUDA graph on a GPU, as in sample_ddm)."""
    x1 = start_noise(n, data_shape, seed, device) if x1 is None else x1
    field = graphed(field) if cuda_graphs else field
    nfe = [0]

    def counted(x, t):
        nfe[0] += 1
        return field(x, t)

    _sync(device)
    start = time.perf_counter()
    x0 = sample_field(counted, x1, steps, solver)
    _sync(device)
    return x0, {"strategy": name, "expert_calls_per_sample": float(nfe[0]), "router_calls": 0,
                "velocity_evaluations": nfe[0], "wall_time": time.perf_counter() - start}
