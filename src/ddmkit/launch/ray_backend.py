"""The Ray backend: one Ray task per expert (`pip install ddmkit[ray]`).

A task gets the bytes of its shard and returns the bytes of the expert folder
it wrote, so it runs on any node of a cluster without a shared file system;
the driver writes the folder atomically. Inside the task it is the same pure
`train_expert` as everywhere else, on config.train.threads CPU threads (the
task asks Ray for as many CPUs), so the result is byte-identical to the
inline backend for the same seeds.

    run_ray(jobs, cfg.expert)                          # a local Ray on this machine
    run_ray(jobs, cfg.expert, address="auto")          # the cluster this node belongs to
    run_ray(jobs, cfg.expert, address="ray://head:10001")

Each task asks for one GPU when the cluster has GPUs, none otherwise.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ddmkit.config import ExpertConfig
from ddmkit.errors import DDMError
from ddmkit.io import staging_dir, write_bytes_atomic
from ddmkit.nets import use_networks, user_networks
from ddmkit.train.jobs import train_expert


def import_ray():
    try:
        import ray
    except ImportError:
        raise DDMError("backend 'ray' needs Ray: pip install 'ddmkit[ray]' (or pip install ray)") from None
    return ray


def train_from_bytes(shard_name: str, shard_bytes: bytes, config_dump: dict, networks: tuple = ()) -> dict[str, bytes]:
    """What a Ray task runs: write the shard to a private temporary folder,
    train the expert there (on config.train.threads threads), return {file name: bytes}
    of the expert folder."""
    use_networks(networks)  # the user's network classes the driver registered (their package must be installed)
    config = ExpertConfig.model_validate(config_dump)
    with tempfile.TemporaryDirectory(prefix="ddmkit-expert-") as tmp:
        shard = Path(tmp) / Path(shard_name).name
        shard.write_bytes(shard_bytes)
        out = train_expert(shard, config, Path(tmp) / "expert")
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def write_folder(out_dir: Path, files: dict[str, bytes]) -> Path:
    """Write a returned expert folder atomically; names must be plain file names."""
    with staging_dir(out_dir) as tmp:
        for name, data in files.items():
            if name != Path(name).name or name in ("", ".", ".."):
                raise DDMError(f"ray task returned a file name {name!r} that is not a plain name")
            write_bytes_atomic(tmp / name, data)
    return out_dir


def start_ray(ray, address: str | None, workers: int | None):
    """Connect to `address`, or start a local Ray; returns whether we started it."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ray.init(num_cpus=workers or os.cpu_count() or 1, num_gpus=gpus, **kwargs)
    return True


def run_ray(jobs, config: ExpertConfig, address: str | None = None, workers: int | None = None,
            log=print) -> list[Path]:
    """Train every job as a Ray task (config.train.threads CPUs each) and write the folders here."""
    ray = import_ray()
    started = start_ray(ray, address, workers)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        cpus = min(config.train.threads, max(1, int(ray.cluster_resources().get("CPU", 1))))
        task = ray.remote(train_from_bytes).options(num_cpus=cpus, num_gpus=gpus, max_retries=2)
        refs = [task.remote(job.shard.name, job.shard.read_bytes(), config.model_dump(), user_networks())
                for job in jobs]
        out = []
        for job, ref in zip(jobs, refs):
            out.append(write_folder(job.out_dir, ray.get(ref)))
            log(f"expert {job.cluster}: written to {job.out_dir} (ray task, {gpus} GPU)")
        return out
    finally:
        if started:
            ray.shutdown()
