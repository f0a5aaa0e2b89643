"""Where expert jobs run. Every backend calls the same pure function,

    train_expert(shard, config, out_dir)        (ddmkit.train.jobs)

so an expert's bytes depend only on its shard, its config and its seed, not
on where it ran: train_expert runs on config.train.threads CPU threads wherever
it is called (`ddmkit.train.threads.job_threads`; torch's results change with
the thread count):

    inline      one after another in this process (the default);
    processes   a local pool; with GPUs, one fresh process per expert on a GPU of
                its own: a job takes a free one of the GPUs this process sees
                (named as its CUDA_VISIBLE_DEVICES names them) when it starts,
                and gives it back when it ends; Ctrl-C or a failed job stops
                every job, and the workers die with this process;
    ray         Ray tasks, on an existing cluster (address="auto" or "host:6379";
                not a Ray Client address, ray://) or on a local Ray that ddmkit
                starts; a task receives its shard's (and checkpoint's) bytes and
                sends back its checkpoints' and the expert folder's bytes, so
                workers need no shared file system (see ddmkit.launch.ray_backend).

With resume=True a job continues from the checkpoint it left, on every backend.

    run_jobs(expert_jobs(run), cfg.expert, backend="processes", workers=2)
"""
from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ddmkit.config import ExpertConfig
from ddmkit.errors import DDMError, counted
from ddmkit.launch.ray_backend import check_address, import_ray, run_ray
from ddmkit.nets import use_networks, user_networks
from ddmkit.nets.user import check_workers_import
from ddmkit.train.checkpoint import check_checkpoint_file
from ddmkit.train.distributed import die_with_parent
from ddmkit.train.jobs import checkpoint_path, train_expert
from ddmkit.train.stop import request_stop, stop_scope

BACKENDS = ("inline", "processes", "ray")
_STATE = "idle"  # a pool worker's: "idle", "job" (running one) or "stopping" (_stop_job)
_FREE_GPUS = None  # a pool worker's queue of the ids of the GPUs no job runs on (None on CPUs)
Log = Callable[[str], None]


@dataclass(frozen=True)
class ExpertJob:
    """One expert to train: its cluster index, its shard file, its output folder."""

    cluster: int
    shard: Path
    out_dir: Path


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        hint = " (a SLURM job array is written, not run: `ddmkit launch RUN --emit slurm`)" if name == "slurm" else ""
        raise DDMError(f"--backend: unknown launch backend {name!r}; accepted: {', '.join(BACKENDS)}{hint}")
    return name


def check_launch(backend: str, workers: int | None = None, address: str | None = None,
                 concurrent: bool = False) -> None:
    """Refuse an unknown backend, workers < 1, workers for the inline backend (it has none), an address for
    another backend than ray, Ray not installed, a Ray Client address (ray://) and, for experts trained
    together (expert.concurrent), any backend but inline (check_concurrent_backend)."""
    check_backend(backend)
    check_concurrent_backend(concurrent, backend, workers, address)
    if workers is not None and workers < 1:
        raise DDMError(f"--workers must be >= 1, got {workers}; give 1 or more, or leave --workers out for the "
                       "default (one per job, at most one per GPU, or per CPU core without GPUs)")
    if workers is not None and backend == "inline":
        raise DDMError("--workers is for the processes and ray backends (inline trains one job after another in "
                       "this process); add --backend processes, or leave --workers out")
    if address is not None and backend != "ray":
        raise DDMError(f"--address is for the ray backend only (backend is {backend!r}); add --backend ray")
    if backend == "ray":
        check_address(address)  # --address, or RAY_ADDRESS
        import_ray()  # before `ddmkit run` makes the run's data and partition
    if backend != "inline":
        check_workers_import(f"backend {backend!r}", f"the {backend} backend's worker processes",
                             spawned=backend == "processes", fallback="use the inline backend")


def check_concurrent_backend(concurrent: bool, backend: str, workers: int | None = None,
                             address: str | None = None) -> None:
    """A DDMError when the experts train together (expert.concurrent = true: one job, in this process, which
    takes no backend) and a backend other than inline was asked for: it would not be used."""
    if not concurrent or backend == "inline":
        return
    given = [name for name, value in (("--backend", backend), ("--workers", workers), ("--address", address))
             if value is not None]
    named = " and ".join([", ".join(given[:-1]), given[-1]] if len(given) > 1 else given)
    raise DDMError(f"--backend {backend}: expert.concurrent = true trains the K experts as one job, in this "
                   f"process, so no backend runs them; leave {named} out, or train them as jobs of their own "
                   "on the backend: expert.concurrent = false (in a new run folder)")


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def job_gpus(config: ExpertConfig) -> list[str]:
    """The GPUs a pool's jobs train on, one job per GPU: those this process sees, as its CUDA_VISIBLE_DEVICES
    names them (indices, UUIDs or MIG ids; 0 .. N-1 when it is not set); none on CPUs or for jobs whose
    train.device is the CPU."""
    gpus = cuda_count() if config.train.device != "cpu" else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not gpus or visible is None:
        return [str(i) for i in range(gpus)]
    return [name.strip() for name in visible.split(",")][:gpus]  # CUDA counts up to the first id it cannot use


def default_workers(n_jobs: int, gpus: int) -> int:
    """One worker per job, at most one per GPU of the jobs (or per CPU core without GPUs)."""
    return max(1, min(n_jobs, gpus or os.cpu_count() or 1))


def run_inline(jobs: list[ExpertJob], config: ExpertConfig, resume: bool = False, log: Log = print) -> list[Path]:
    out = []
    for job in jobs:
        out.append(train_expert(job.shard, config, job.out_dir, resume=resume))
        log(f"expert {job.cluster}: written to {job.out_dir}")
    return out


def _stop_job(signum, frame) -> None:
    """A pool worker's SIGINT / SIGTERM handler: a running job ends as interrupted (its staging folder
    removed, its last checkpoint kept; signals during that cleanup are ignored), then the process exits
    (_process_job); an idle worker exits at once. The KeyboardInterrupt raised here can be lost (Python
    drops one raised in a __del__ or a weakref callback), so the job's stop flag is set first
    (ddmkit.train.stop; the handler runs in the main thread, the job's): the training loop raises it
    again at its next step. The KeyboardInterrupt stops a job that is not in the loop (loading its shard,
    writing its folder) as well."""
    global _STATE
    if _STATE == "job":
        _STATE = "stopping"
        request_stop()
        raise KeyboardInterrupt
    if _STATE == "idle":
        os._exit(128 + signum)


def _start_worker(parent: int, free_gpus=None) -> None:
    """A pool worker's initializer: stop on SIGINT / SIGTERM (_stop_job), die with the parent (on Linux
    the kernel sends SIGTERM when it dies, elsewhere a thread looks every second), and keep the queue
    of free GPUs (job_gpu)."""
    global _FREE_GPUS
    signal.signal(signal.SIGINT, _stop_job)
    signal.signal(signal.SIGTERM, _stop_job)
    die_with_parent(parent)
    _FREE_GPUS = free_gpus


@contextlib.contextmanager
def job_gpu() -> Iterator[str | None]:
    """The GPU of the job this pool worker runs (None on CPUs): a free one, taken from the pool's queue
    when the job starts and given back when it ends, so that no two running jobs share a GPU whatever
    order the pool runs them in. This process sees that GPU alone (CUDA starts after it is chosen: on
    GPUs a fresh process runs each job)."""
    if _FREE_GPUS is None:
        yield None
        return
    gpu = _FREE_GPUS.get()
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield gpu
    finally:
        _FREE_GPUS.put(gpu)


def on_its_gpu(config: ExpertConfig, gpu: str | None) -> ExpertConfig:
    """A pool job's config on the GPU it was given (gpu, None on CPUs): that process sees it alone, as
    cuda:0, so a train.device of cuda:N (N > 0) would name a GPU it does not see; "cuda" it is."""
    if gpu is None or not config.train.device.startswith("cuda:"):
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"device": "cuda"})})


def _process_job(job: ExpertJob, config_dump: dict, resume: bool, networks: tuple = ()) -> str:
    """Body of one pool job, in a stop scope of its own (ddmkit.train.stop: the flag _stop_job sets). A
    stopped job leaves the pool (exit status 130), not on to the next job: also one whose KeyboardInterrupt
    was lost after its last step, its folder written (it sends no result: the pool is stopping)."""
    global _STATE
    with job_gpu() as gpu:
        use_networks(networks)  # the user's network classes this process's parent registered
        config = on_its_gpu(ExpertConfig.model_validate(config_dump), gpu)
        with stop_scope() as stop:
            _STATE = "job"
            try:
                folder = train_expert(job.shard, config, job.out_dir, resume=resume)
            except KeyboardInterrupt:
                os._exit(130)
            finally:
                _STATE = "idle"
            if stop.is_set():
                os._exit(130)
        return str(folder)


STOP_GRACE = 60.0  # seconds a stopped pool worker has to end its job (remove its staging folder) before it is killed


def _exited(process, timeout: float | None = 0.0) -> bool:
    """Whether the process has exited, waiting for at most `timeout` seconds (None: until it has): its sentinel
    tells, whichever thread reaps it."""
    return bool(multiprocessing.connection.wait([process.sentinel], timeout))


def exit_code(process, timeout: float = 5.0) -> int | None:
    """A process's exit status (Process.exitcode), None while it runs. The thread that reaps a process (waitpid)
    records its status, and another thread that reaps it at the same time reads None, as for a running process:
    the pool's own thread reaps its workers too. So the status of a process that has exited (_exited) is awaited
    until the thread that reaped it has recorded it (at once; at most `timeout` seconds)."""
    code = process.exitcode
    deadline = time.monotonic() + timeout
    while code is None and _exited(process) and time.monotonic() < deadline:
        time.sleep(0.01)
        code = process.exitcode
    return code


def stop_workers(pool: ProcessPoolExecutor, grace: float = STOP_GRACE) -> None:
    """Cancel the queued jobs, stop the running ones (SIGTERM: _stop_job) and wait for the workers to exit; one
    still alive after `grace` seconds is killed (SIGKILL). A job whose KeyboardInterrupt was lost stops at its
    next step (its stop flag), but one can be stuck outside the training loop: e.g. a worker killed while it
    held the result queue's lock left another waiting for it, and this waited for ever. Returns once every
    worker has exited and its exit status is recorded (exit_code): a worker that the pool's own thread reaped
    is not taken for a running one (signalled again, its status read as None)."""
    processes = list((pool._processes or {}).values())  # noqa: SLF001 (no public API before Python 3.14)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if not _exited(process):
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        if not _exited(process, max(0.0, deadline - time.monotonic())):
            process.kill()
            _exited(process, None)
        exit_code(process)


def stopped_by_ctrl_c(processes: list) -> bool:
    """Whether the workers that ended before their jobs did all ended by Ctrl-C (exit status 130, see
    _process_job, or killed by SIGINT)."""
    ended = [code for code in map(exit_code, processes) if code not in (None, 0)]
    return bool(ended) and all(code in (130, -signal.SIGINT) for code in ended)


def run_processes(jobs: list[ExpertJob], config: ExpertConfig, workers: int | None = None, resume: bool = False,
                  log: Log = print) -> list[Path]:
    """A local pool of `workers` processes (each job on config.train.threads threads). On GPUs every job
    gets a fresh process, which sees only its GPU (job_gpu), and at most one job per GPU runs at a time
    (more workers than GPUs are lowered to their number); on CPUs a process runs job after job, so that
    torch is imported once per worker, not once per expert (seconds per job for small experts). A failed
    job or Ctrl-C stops the others (finished experts stay, a stopped one leaves only its checkpoint); the
    workers die with this process."""
    import multiprocessing

    gpus = job_gpus(config)
    workers = workers or default_workers(len(jobs), len(gpus))
    if gpus and workers > len(gpus):
        here = "1 GPU here, one job on it" if len(gpus) == 1 else f"{len(gpus)} GPUs here, one job on each"
        log(f"--workers {workers}: {here} at a time, so {counted(len(gpus), 'worker')}")
        workers = len(gpus)
    ctx = multiprocessing.get_context("spawn")
    free_gpus = None
    if gpus:
        free_gpus = ctx.SimpleQueue()
        for gpu in gpus:
            free_gpus.put(gpu)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1 if gpus else None,
                             initializer=_start_worker, initargs=(os.getpid(), free_gpus)) as pool:
        started = []
        try:
            futures = {pool.submit(_process_job, job, config.model_dump(), resume, user_networks()): job
                       for job in jobs}
            started = list((pool._processes or {}).values())  # noqa: SLF001 (to read how a dead worker ended)
            for fut in as_completed(futures):  # the first failure raises here, and stops the others at once
                fut.result()
                job = futures[fut]
                log(f"expert {job.cluster}: written to {job.out_dir} (process pool, {counted(workers, 'worker')})")
            return [Path(fut.result()) for fut in futures]
        except BrokenProcessPool:
            ctrl_c = stopped_by_ctrl_c(started)  # read before stop_workers ends the others (SIGTERM)
            stop_workers(pool)
            if ctrl_c:  # Ctrl-C reached a worker before this process's own KeyboardInterrupt
                raise KeyboardInterrupt from None
            raise DDMError("a worker process of the pool died while training an expert (killed from outside, or "
                           "out of memory? see the system log, e.g. `dmesg`); the finished experts are kept: run "
                           "the same command to train the others (a job that left a checkpoint continues from it)"
                           ) from None
        except BaseException:
            stop_workers(pool)
            raise


def run_jobs(jobs: list[ExpertJob], config: ExpertConfig, backend: str = "inline", workers: int | None = None,
             address: str | None = None, resume: bool = False, log: Log = print) -> list[Path]:
    """Train every job's expert with the chosen backend; returns the folders."""
    check_launch(backend, workers, address)
    if not jobs:
        return []
    for job in jobs if resume else []:  # a damaged checkpoint is named before any job trains
        if checkpoint_path(job.out_dir).exists():
            check_checkpoint_file(checkpoint_path(job.out_dir))
    if backend == "inline":
        return run_inline(jobs, config, resume, log)
    if backend == "processes":
        return run_processes(jobs, config, workers, resume, log)
    return run_ray(jobs, config, address=address, workers=workers, resume=resume, log=log)
