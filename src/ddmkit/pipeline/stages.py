"""The training stages of a run, the same for every kind of continuous data (vectors, images):
data, partition, experts, monolith, router, registry. Each reads what the previous one wrote
and skips itself when its output is already there, so a run resumes after an interruption and
single stages can run on other machines.
"""
from __future__ import annotations

import time
from typing import Callable

from ddmkit.config import RunConfig
from ddmkit.data import load_dataset
from ddmkit.data.arrays import ArrayData
from ddmkit.data.partition import partition_data
from ddmkit.ddm.load import load_truth
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors, read_json, save_tensors, write_json
from ddmkit.launch import ExpertJob, run_jobs
from ddmkit.layout import RunFolder
from ddmkit.registry import shard_files, write_registry
from ddmkit.train.concurrent import train_experts_concurrently
from ddmkit.train.jobs import train_monolith, train_router

Log = Callable[[str], None]


def stage_data(cfg: RunConfig, run, log: Log = print) -> None:
    folder = RunFolder(run)
    if folder.split("train").exists():
        return
    d = cfg.data
    train, test = load_dataset(d.name, d.n_train, d.n_test, d.seed, **d.params)
    for split, data in (("train", train), ("test", test)):
        tensors = {"x": data.x}
        if data.labels is not None:
            tensors["labels"] = data.labels
        save_tensors(folder.split(split), tensors)
    if train.truth is not None:
        t = train.truth
        save_tensors(folder.truth, {"weights": t.weights, "means": t.means, "eigvals": t.eigvals, "eigvecs": t.eigvecs})
    write_json(folder.data_info, {"name": d.name, "n_train": len(train), "n_test": len(test),
                                  "data_shape": list(train.data_shape), "exact_truth": train.truth is not None})
    log(f"data: {d.name}, {len(train)} train / {len(test)} test samples of shape {train.data_shape}")


def load_split(run, split: str) -> ArrayData:
    """A run's train or test split (with the exact truth when the data have one)."""
    folder = RunFolder(run)
    if not folder.split(split).exists():
        raise DDMError(f"{folder.root}: no data (data/{split}.safetensors); run `ddmkit partition --out "
                       f"{folder.root} --config CONFIG` or `ddmkit run CONFIG --out {folder.root}` first")
    t = load_tensors(folder.split(split))
    return ArrayData(read_json(folder.data_info)["name"], t["x"], t.get("labels"), load_truth(run))


def stage_partition(cfg: RunConfig, run, log: Log = print) -> None:
    folder = RunFolder(run)
    if folder.manifest.exists():
        return
    p = cfg.partition
    m = partition_data(load_split(run, "train"), p.k, folder.partition, p.features, p.pca_dim, p.balanced, p.seed)
    log(f"partition: k={m['k']}, cluster sizes {m['counts']}")


def stage_experts(cfg: RunConfig, run, log: Log = print, backend: str = "inline", workers: int | None = None,
                  address: str | None = None) -> None:
    """Train the experts not yet written, with a launch backend (ddmkit.launch), or all at once in
    one stacked network when expert.concurrent is set; a job that left a checkpoint continues from it."""
    folder = RunFolder(run)
    jobs = [ExpertJob(k, shard, folder.expert(k)) for k, shard in enumerate(shard_files(run))
            if not (folder.expert(k) / "model.safetensors").exists()]
    start = time.perf_counter()
    if jobs and cfg.expert.concurrent:  # all in one stacked network on this device, each on its own shard
        train_experts_concurrently([j.shard for j in jobs], cfg.expert, [j.out_dir for j in jobs], log)
        backend = "concurrent"
    else:
        run_jobs(jobs, cfg.expert, backend, workers, address, resume=True, log=log)
    if jobs:
        log(f"experts: {len(jobs)} trained in {time.perf_counter() - start:.1f}s ({backend} backend)")


def stage_registry(cfg: RunConfig, run, log: Log = print) -> None:
    """Write RUN/registry.json for the model folders present."""
    reg = write_registry(run)
    log(f"registry: {len(reg['models'])} model folders hashed into {RunFolder(run).registry}")


def stage_monolith(cfg: RunConfig, run, log: Log = print) -> None:
    folder = RunFolder(run)
    if not cfg.monolith.enabled or (folder.monolith / "model.safetensors").exists():
        return
    start = time.perf_counter()
    train_monolith(shard_files(run), cfg.expert, folder.monolith, cfg.monolith.match)
    log(f"monolith: trained in {time.perf_counter() - start:.1f}s (same steps x batch as all experts)")


def stage_router(cfg: RunConfig, run, log: Log = print) -> None:
    folder = RunFolder(run)
    if (folder.router / "model.safetensors").exists():
        return
    start = time.perf_counter()
    train_router(shard_files(run), cfg.router, folder.router)
    log(f"router: trained in {time.perf_counter() - start:.1f}s")


TRAINING_STAGES = (stage_data, stage_partition, stage_experts, stage_monolith, stage_router, stage_registry)
