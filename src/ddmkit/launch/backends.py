"""Where expert jobs run. Every backend calls the same pure function,

    train_expert(shard, config, out_dir)        (ddmkit.train.jobs)

so an expert's bytes depend only on its shard, its config and its seed, not
on where it ran: train_expert runs on config.train.threads CPU threads wherever
it is called (`ddmkit.train.threads.job_threads`; torch's results change with
the thread count):

    inline      one after another in this process (the default);
    processes   a local pool, one fresh process per expert, one GPU per process
                when there are GPUs (CUDA_VISIBLE_DEVICES = job index mod GPUs);
    ray         Ray tasks, on an existing cluster (address="ray://host:10001" or
                "auto") or on a local Ray that ddmkit starts; a task receives its
                shard's bytes and returns the expert folder's bytes, so workers
                need no shared file system (see ddmkit.launch.ray_backend).

    run_jobs(expert_jobs(run), cfg.expert, backend="processes", workers=2)
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddmkit.config import ExpertConfig
from ddmkit.errors import DDMError
from ddmkit.launch.ray_backend import run_ray
from ddmkit.nets import use_networks, user_networks
from ddmkit.train.jobs import train_expert

BACKENDS = ("inline", "processes", "ray")
Log = Callable[[str], None]


@dataclass(frozen=True)
class ExpertJob:
    """One expert to train: its cluster index, its shard file, its output folder."""

    cluster: int
    shard: Path
    out_dir: Path


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise DDMError(f"backend: unknown launch backend {name!r}; accepted: {', '.join(BACKENDS)}")
    return name


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_workers(n_jobs: int) -> int:
    """One worker per job, at most one per GPU (or per CPU core without GPUs)."""
    return max(1, min(n_jobs, cuda_count() or os.cpu_count() or 1))


def run_inline(jobs: list[ExpertJob], config: ExpertConfig, resume: bool = False, log: Log = print) -> list[Path]:
    out = []
    for job in jobs:
        out.append(train_expert(job.shard, config, job.out_dir, resume=resume))
        log(f"expert {job.cluster}: written to {job.out_dir}")
    return out


def _process_job(job: ExpertJob, config_dump: dict, resume: bool, gpu: int | None, networks: tuple = ()) -> str:
    """Body of one pool job (on GPUs a fresh process per job: CUDA starts after the GPU is chosen)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    use_networks(networks)  # the user's network classes this process's parent registered
    config = ExpertConfig.model_validate(config_dump)
    return str(train_expert(job.shard, config, job.out_dir, resume=resume))


def run_processes(jobs: list[ExpertJob], config: ExpertConfig, workers: int | None = None, resume: bool = False,
                  log: Log = print) -> list[Path]:
    """A local pool of `workers` processes (each job on config.train.threads threads). On GPUs every job
    gets a fresh process, which sees only its GPU; on CPUs a process runs job after job, so that torch
    is imported once per worker, not once per expert (seconds per job for small experts)."""
    import multiprocessing

    workers = workers or default_workers(len(jobs))
    gpus = cuda_count()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1 if gpus else None) as pool:
        futures = [pool.submit(_process_job, job, config.model_dump(), resume, i % gpus if gpus else None,
                               user_networks())
                   for i, job in enumerate(jobs)]
        out = []
        for job, fut in zip(jobs, futures):
            out.append(Path(fut.result()))
            log(f"expert {job.cluster}: written to {job.out_dir} (process pool, {workers} workers)")
    return out


def run_jobs(jobs: list[ExpertJob], config: ExpertConfig, backend: str = "inline", workers: int | None = None,
             address: str | None = None, resume: bool = False, log: Log = print) -> list[Path]:
    """Train every job's expert with the chosen backend; returns the folders."""
    check_backend(backend)
    if workers is not None and workers < 1:
        raise DDMError(f"workers must be >= 1, got {workers}")
    if address is not None and backend != "ray":
        raise DDMError(f"--address is for the ray backend only (backend is {backend!r})")
    if not jobs:
        return []
    if backend == "inline":
        return run_inline(jobs, config, resume, log)
    if backend == "processes":
        return run_processes(jobs, config, workers, resume, log)
    return run_ray(jobs, config, address=address, workers=workers, log=log)
