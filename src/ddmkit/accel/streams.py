"""The experts' calls of one step on concurrent CUDA streams.

A sparse step calls K experts on about B/K rows each. One after another on
one stream, each small call leaves much of the GPU idle, so top-1 costs more
than the monolith's one call on B rows, with the same arithmetic. Each
expert on its own stream lets the GPU overlap their kernels (measured in
docs/performance.md). It pays only where the calls are bound by the GPU, not
by the host's kernel launches, and leave it room: the sparse combiner uses
streams when its calls average 256 to 2048 rows (CONCURRENT_MIN_ROWS,
CONCURRENT_MAX_ROWS; graph replays from 1 row). Below, they cost more than
they save; above, one call fills the GPU (the image DDM's guided top-2, 2500
rows a call, was slower on streams: docs/performance.md).

    outs = call_concurrently([lambda: experts[k](x_k, t_k) for k ...], keys=[k ...], device=x.device)
    call_experts = concurrent_caller()     # what the sparse combiner takes (call_experts=...)

Expert k always runs on the same stream (its key), so whatever it caches
(autocast's bf16 weights) stays on one stream. The current stream waits for
all of them before it reads the outputs, which are then marked as used by
it (`record_stream`), so the allocator does not hand their memory back to
the side stream too early. The inputs were made on the current stream and
are freed after that wait, so no side stream can still be reading them.
The results are those of the calls one after another, to the bit: the
same kernels on the same rows.

Memory: the calls' activations are alive at the same time, so a top-k
step holds about k monolith calls' worth on the batch, where one after
another it held one expert call's (sample_ddm's batch_size bounds it).

Off the GPU, for one call, or while the current stream is being captured
into a CUDA graph, the calls run one after another as usual.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

_STREAMS: dict = {}  # (device, key) -> the side stream of that key
CONCURRENT_MIN_ROWS = 256  # smaller eager calls are bound by their launches, which streams do not overlap
CONCURRENT_MAX_ROWS = 2048  # larger calls fill the GPU alone: overlapping them only adds contention and memory


def side_stream(device: torch.device, key: int) -> torch.cuda.Stream:
    """The stream that calls with this key run on (one per device and key, made once)."""
    stream = _STREAMS.get((device, key))
    if stream is None:
        stream = _STREAMS[device, key] = torch.cuda.Stream(device)
    return stream


def call_concurrently(calls: Sequence[Callable[[], torch.Tensor]], keys: Sequence[int],
                      device: torch.device) -> list[torch.Tensor]:
    """[call() for call in calls], call i on the side stream of keys[i] when on a GPU."""
    if device.type != "cuda" or len(calls) < 2 or torch.cuda.is_current_stream_capturing():
        return [call() for call in calls]
    main = torch.cuda.current_stream(device)
    streams = [side_stream(device, key) for key in keys]
    outs = []
    for call, stream in zip(calls, streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            outs.append(call())
    for stream, out in zip(streams, outs):
        main.wait_stream(stream)
        out.record_stream(main)
    return outs


def concurrent_caller(graphed: bool = False) -> Callable:
    """call_experts(calls, experts, counts, device) for the sparse combiner: a step's expert calls on
    concurrent streams (expert k on the stream of key k) when they average CONCURRENT_MIN_ROWS to
    CONCURRENT_MAX_ROWS rows, else one after another. Graph replays are one launch each, so for
    graphed experts the lower bound is 1 row."""
    def call_experts(calls: Sequence[Callable[[], torch.Tensor]], experts: Sequence[int], counts: Sequence[int],
                     device: torch.device) -> list[torch.Tensor]:
        least = 1 if graphed else CONCURRENT_MIN_ROWS
        if least * len(counts) <= sum(counts) <= CONCURRENT_MAX_ROWS * len(counts):
            return call_concurrently(calls, experts, device)
        return [call() for call in calls]

    return call_experts
