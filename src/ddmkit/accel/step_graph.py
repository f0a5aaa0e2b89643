"""A whole training step captured once as a CUDA graph and replayed (train.cuda_graph).

    replay = capture_step(lambda: train_step(step), generator, stream)
    values = replay()      # one launch: the step's kernels run again, values are the same tensors, refilled

A small network's step (a UNet expert at batch 128, or K of them) is bound by the host launching its
kernels: a few hundred per forward, backward, clipping, optimizer and EMA. A graph launches them all at
once. What the captured step may do (fit's step does all of it this way):

- draw its random numbers from CUDA generators: `generator` (the job's batch generator) is registered
  with the graph, torch's default CUDA generator is registered by torch; each replay draws new numbers,
  the same as the eager step would draw next;
- read every changing number from a tensor: the optimizer's learning rate is a tensor the scheduler fills
  in place between replays (AdamW fused and capturable), the EMA's weight is computed on the device;
- never wait for the host (no .item(), no printing of a value): the logged values are returned as tensors
  that each replay refills.

Its gradients must be None when it is captured (they are then allocated once, in the graph's memory, and
written anew by every replay). `stream` is the stream the job's eager steps ran on before (so the capture
finds the cuBLAS workspaces, compiled kernels and autocast state they made) and the one the replays run on.
"""
from __future__ import annotations

from typing import Callable

import torch

from ddmkit.errors import DDMError

GRAPH_WARMUP = 3  # eager steps before the capture: torch.compile compiles, the optimizer makes its state


def capture_step(step: Callable[[], dict], generator: torch.Generator,
                 stream: torch.cuda.Stream) -> Callable[[], dict]:
    """replay() -> step()'s outputs: `step` captured once on `stream` (the module docstring says what it may
    do), its random numbers from `generator` (registered with the graph) and torch's default CUDA one. A step
    that cannot be captured is a DDMError saying why and to set train.cuda_graph = false."""
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    try:
        with torch.cuda.graph(graph, stream=stream):
            outputs = step()
    except RuntimeError as e:  # e.g. "operation not permitted when stream is capturing": a sync in the step
        raise DDMError(f"train.cuda_graph: the training step could not be captured as one CUDA graph "
                       f"({' '.join(str(e).split())[:300]}); something in it waits for the host (a value read "
                       "with .item() or float(), a branch on the data, a copy from the CPU), or draws from "
                       "another random generator: set cuda_graph = false for this job") from e

    def replay() -> dict:
        graph.replay()
        return outputs

    return replay
