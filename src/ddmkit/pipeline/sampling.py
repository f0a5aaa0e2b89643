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
from ddmkit.sample.graphs import graphed, graphs_per_expert, padded, shared_graphs


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


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    """Row ranges of at most batch_size rows covering n (one range when batch_size is None)."""
    size = n if batch_size is None else batch_size
    if size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None: all {n} rows at once), got {batch_size}")
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _rows(cond: dict[str, torch.Tensor] | None, rows: slice) -> dict[str, torch.Tensor] | None:
    return None if cond is None else {name: c[rows] for name, c in cond.items()}


def sample_ddm(ddm: DDM, strategy: str, n: int, steps: int = 50, solver: str = "euler", seed: int = 0,
               device="cpu", x1: torch.Tensor | None = None, callback=None, router_every: int = 1,
               autocast: str | None = None, cond: dict[str, torch.Tensor] | None = None,
               cuda_graphs: bool = False, batch_size: int | None = None,
               cuda_streams: bool = True) -> tuple[torch.Tensor, dict]:
    """router_every = m reuses the routing for m velocity evaluations (1: route every time);
    autocast = "bfloat16" runs the networks under autocast (the state stays in float32);
    cuda_graphs = True replays the experts and the router from CUDA graphs on a GPU, rows padded
    to a few bucket sizes (ddmkit.sample.graphs; the graphs are kept for later calls); on a GPU
    the expert calls are padded to those sizes in any case (dispatch_networks);
    cuda_streams = True runs the experts of a sparse step on concurrent CUDA streams on a GPU
    (ddmkit.routing.streams; the same samples to the bit); with cuda_graphs too, each expert gets
    a set of graphs of its own (graphs_per_expert: K captures per bucket), else the experts share
    one set (shared_graphs) and run one at a time;
    cond = per-sample conditioning passed to the experts, e.g. {"y": class labels (n,)}; it reaches
    the router too when the DDM's router is label-conditional, and with labels the oracle draws
    each sample's cluster from p(cluster | label) (ddm.label_prior) instead of the cluster sizes;
    batch_size = b integrates the n rows in chunks of at most b rows, one after another, to bound
    memory: the same noise, the same samples to rounding for the deterministic strategies, and
    for the random ones the same law with other draws (one generator, used chunk after chunk).
    A callback sees whole trajectories only, so it needs batch_size None or >= n."""
    strat = parse_strategy(strategy)
    x1 = start_noise(n, ddm.data_shape, seed, device) if x1 is None else x1
    chunks = _chunks(len(x1), batch_size)
    if callback is not None and len(chunks) > 1:
        raise ValueError(f"sample_ddm: a callback needs all {len(x1)} rows in one batch; got batch_size={batch_size}")
    gen = torch.Generator(device=x1.device).manual_seed(seed + 1)
    prior = ddm.prior
    if ddm.label_prior is not None and cond is not None and "y" in cond:
        prior = ddm.label_prior.to(x1.device)[cond["y"]]  # (n, K) p(cluster | y) per sample
    per_row_prior = prior is not None and prior.dim() == 2
    counter = CallCounter()
    experts, router = dispatch_networks(ddm.experts, ddm.router, x1.device, cuda_graphs, cuda_streams)
    parts, nfe = [], []
    _sync(x1.device)
    start = time.perf_counter()
    with _autocast(device, autocast):
        for rows in chunks:
            state = RoutingState(generator=gen, prior=prior[rows] if per_row_prior else prior, nearest=ddm.nearest)
            part_cond = _rows(cond, rows)
            field = routed_velocity(experts, router, strat, state, counter, cond=part_cond,
                                    router_every=router_every, router_cond=part_cond if ddm.router_conditional else None,
                                    concurrent=cuda_streams)
            parts.append(_integrate_counted(field, x1[rows], steps, solver, callback, nfe))
    _sync(x1.device)
    wall = time.perf_counter() - start
    return torch.cat(parts), {"strategy": strategy, "expert_calls_per_sample": counter.total_rows / len(x1),
                              "router_calls": counter.router_calls, "velocity_evaluations": _per_trajectory(nfe),
                              "wall_time": wall, "expert_rows": counter.expert_rows}


def config_options(sample, routed: bool = True) -> dict:
    """The keyword arguments of sample_ddm (routed) or sample_single that a run's `sample`
    config section sets: batch_size, cuda_graphs, and router_every and cuda_streams for a DDM."""
    options = {"batch_size": sample.batch_size, "cuda_graphs": sample.cuda_graphs}
    return {**options, "router_every": sample.router_every, "cuda_streams": sample.cuda_streams} if routed else options


def dispatch_networks(experts: list, router, device, cuda_graphs: bool = False,
                      cuda_streams: bool = False) -> tuple[list, object]:
    """The experts and router as sample_ddm calls them. With cuda_graphs, replayed from CUDA graphs
    (experts: calls of up to 256 rows, larger ones padded; the router at any batch): with
    cuda_streams a set of graphs per expert, each in its own memory pool, so that the experts can
    replay at the same time on concurrent streams (graphs_per_expert); without, one set of graphs
    for experts of one architecture (shared_graphs). Without cuda_graphs, on a GPU, every expert call
    padded to a bucket size (ddmkit.sample.graphs.padded, 8 per octave): the combiner's group
    sizes change at every step, and cuDNN plans each new batch size anew (about 55 ms a call for
    the image UNet on an H100); on the CPU, as they are."""
    if cuda_graphs:
        return (graphs_per_expert(experts) if cuda_streams else shared_graphs(experts)), graphed(router, max_rows=None)
    if torch.device(device).type == "cuda":
        return [padded(e) for e in experts], router
    return list(experts), router


def _integrate_counted(field, x1: torch.Tensor, steps: int, solver: str, callback, nfe: list[int]) -> torch.Tensor:
    """One trajectory of the field from x1; appends its number of field evaluations to nfe."""
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return field(x, t)

    x0 = sample_field(counted, x1, steps, solver, callback)
    nfe.append(calls[0])
    return x0


def _per_trajectory(nfe: list[int]) -> int:
    """Velocity evaluations of one trajectory (the chunks' mean: they differ only for the adaptive solver)."""
    return round(sum(nfe) / len(nfe))


def sample_single(field, data_shape, n: int, steps: int = 50, solver: str = "euler", seed: int = 0,
                  device="cpu", name: str = "monolith", x1: torch.Tensor | None = None,
                  cuda_graphs: bool = False, cond: dict[str, torch.Tensor] | None = None,
                  batch_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """Sampling with one velocity field (the monolith): one network call per evaluation, called
    as field(x, t, **cond) with the rows' conditioning (cuda_graphs and batch_size as in sample_ddm)."""
    x1 = start_noise(n, data_shape, seed, device) if x1 is None else x1
    field = graphed(field) if cuda_graphs else field
    parts, nfe = [], []
    _sync(x1.device)
    start = time.perf_counter()
    for rows in _chunks(len(x1), batch_size):
        part_cond = _rows(cond, rows) or {}
        parts.append(_integrate_counted(lambda x, t, c=part_cond: field(x, t, **c), x1[rows], steps, solver, None, nfe))
    _sync(x1.device)
    evaluations = _per_trajectory(nfe)
    return torch.cat(parts), {"strategy": name, "expert_calls_per_sample": float(evaluations), "router_calls": 0,
                              "velocity_evaluations": evaluations, "wall_time": time.perf_counter() - start}
