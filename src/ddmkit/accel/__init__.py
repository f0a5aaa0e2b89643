"""The GPU-speed code of ddmkit. Sampling (ddmkit.ddm) hands its networks to `accelerate` and calls
what comes back; solvers, strategies and the combiner are plain PyTorch and know nothing of CUDA.
Training uses two of its modules: fit() captures its step with step_graph (train.cuda_graph), and
experts on streams (ddmkit.train.streamed) run on the side streams of `streams`.

    speed = SpeedOptions(cuda_graphs=True, cuda_streams=True, autocast="bfloat16")
    nets = accelerate(experts, router, speed, device)
    nets.experts, nets.router      # the same callables, replayed from CUDA graphs / padded on a GPU
    nets.call_experts              # how the sparse combiner runs a step's expert calls (streams or not)

    cuda_graphs   replay expert and router calls from CUDA graphs (ddmkit.accel.graphs), rows padded
                  to a few bucket sizes; with cuda_streams each expert gets a set of graphs of its
                  own (graphs_per_expert), else experts of one architecture share one set
                  (shared_graphs)
    cuda_streams  run the experts of a sparse step on concurrent CUDA streams (ddmkit.accel.streams)
    autocast      "bfloat16" (or "float16"): the network calls under autocast; the state stays float32
    (always)      on a GPU without graphs, expert calls padded to bucket sizes (ddmkit.accel.padding),
                  so cuDNN plans a few batch sizes instead of one per call

Graphs, streams and padding give the samples of plain calls to the bit, on a GPU and off it (off
it they leave the calls as they are). Autocast changes the samples, and it applies on the CPU too
(torch's CPU autocast, for the rows' device), not only on a GPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ddmkit.accel.graphs import GraphedCall, graphs_per_expert, shared_graphs
from ddmkit.accel.padding import bucket_size, padded
from ddmkit.accel.streams import CONCURRENT_MAX_ROWS, CONCURRENT_MIN_ROWS, call_concurrently, concurrent_caller
from ddmkit.errors import DDMError

AUTOCAST = (None, "bfloat16", "float16")  # SpeedOptions.autocast: no autocast, or the torch dtype's name


@dataclass(frozen=True)
class SpeedOptions:
    """How sampling runs its networks on a GPU, passed as speed=SpeedOptions(...) to DDM.sample, sample_ddm
    and sample_single (docs/performance.md says when each pays):

    cuda_graphs   replay expert calls of up to 256 rows, and the router, from CUDA graphs (the same samples)
    cuda_streams  run the experts of a sparse step on concurrent CUDA streams (the same samples; on by default)
    autocast      None (float32), "bfloat16" or "float16": the networks compute in that dtype, on the CPU
                  too; the state and the weighted sum stay float32 (the samples change by that rounding)

    The defaults are plain calls with streams on for sparse steps, which give the same samples as plain
    calls; off a GPU, graphs and streams change nothing."""

    cuda_graphs: bool = False
    cuda_streams: bool = True
    autocast: str | None = None  # None, "bfloat16" or "float16"

    def __post_init__(self):
        if self.autocast not in AUTOCAST:
            raise DDMError(f"SpeedOptions autocast: {self.autocast!r} is not an autocast dtype; accepted: "
                           "None (float32), 'bfloat16' or 'float16'")
        for name in ("cuda_graphs", "cuda_streams"):
            if not isinstance(getattr(self, name), bool):
                raise DDMError(f"SpeedOptions {name}: {getattr(self, name)!r}; pass True or False")


@dataclass(frozen=True)
class Accelerated:
    """The networks as sampling calls them."""

    experts: list[Callable]
    router: Callable
    call_experts: Callable | None  # for the sparse combiner (None: one call after another)


def accelerate(experts: list[Callable], router: Callable, options: SpeedOptions, device,
               router_capturable: bool = True) -> Accelerated:
    """The experts and router of a DDM as `options` asks (router_capturable=False: the router reads
    values on the host, so it is never captured)."""
    on_gpu = torch.device(device).type == "cuda"
    if options.cuda_graphs:
        experts = graphs_per_expert(experts) if options.cuda_streams else shared_graphs(experts)
        router = GraphedCall(router, max_rows=None) if router_capturable else router
    elif on_gpu:
        experts = [padded(e) for e in experts]
    call_experts = concurrent_caller(graphed=options.cuda_graphs) if options.cuda_streams else None
    return Accelerated(list(experts), router, call_experts)


def accelerate_field(field: Callable, options: SpeedOptions) -> Callable:
    """One velocity field (a monolith) as `options` asks: replayed from CUDA graphs, or as it is."""
    return GraphedCall(field) if options.cuda_graphs else field


def autocast(options: SpeedOptions, device) -> contextlib.AbstractContextManager:
    """The autocast context of `options` for network calls on `device` (a no-op without autocast)."""
    if options.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, options.autocast))


__all__ = ["Accelerated", "CONCURRENT_MAX_ROWS", "CONCURRENT_MIN_ROWS", "GraphedCall", "SpeedOptions", "accelerate",
           "accelerate_field", "autocast", "bucket_size", "call_concurrently", "concurrent_caller", "graphs_per_expert",
           "padded", "shared_graphs"]
