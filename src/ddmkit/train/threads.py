"""The CPU thread count of a training job.

torch's CPU results depend on its intra-op thread count, so every training job runs inside
`job_threads(config.train.threads)`: `train_expert` itself (so `ddmkit train-expert`, every
process of a `--nproc` or torchrun job and every launch backend), and the pipeline's concurrent,
monolith and router stages. The same bytes inline, in a process pool, on Ray or by hand, on any
number of cores. The analyses and studies that set a thread count use it too (the count restored after).
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def job_threads(threads: int | None):
    """Run a job on `threads` torch CPU threads (None: the current count), the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
