"""The CPU thread count of a training job, one for every backend.

torch's CPU results depend on its intra-op thread count, so every launch backend
(and the pipeline's monolith and router stages) runs a job inside
`job_threads(config.train.threads)`: the same bytes inline, in a process pool or on Ray,
on any number of cores.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def job_threads(threads: int):
    """Run a training job on `threads` torch CPU threads (the previous count restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
