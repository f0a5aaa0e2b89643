"""The training stages of a run, the same for every kind of continuous data (vectors, images):
data, partition, experts, monolith, router, registry. Each reads what the previous one wrote
and skips itself when its output is already there, so a run resumes after an interruption and
single stages can run on other machines.

The data and partition stages are also two steps each, so that pipeline.prepare checks a new
run completely before writing anything: load_data / plan_partition (in memory, every check)
and write_data / write_partition. Training jobs run on train.threads CPU threads (launch.job_threads).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import torch

from ddmkit.config import RunConfig
from ddmkit.data import load_dataset
from ddmkit.data.arrays import ArrayData
from ddmkit.data.features import is_user_function, use_features
from ddmkit.data.partition import PartitionPlan, compute_partition, write_partition
from ddmkit.ddm.load import load_truth
from ddmkit.errors import DDMError
from ddmkit.io import folder_lock, load_tensors, read_json, save_tensors, staging_dir, write_json
from ddmkit.launch import ExpertJob, run_jobs
from ddmkit.launch.threads import job_threads
from ddmkit.layout import RunFolder
from ddmkit.nets import build_model
from ddmkit.registry import shard_files, write_registry
from ddmkit.train.concurrent import train_experts_concurrently
from ddmkit.train.jobs import train_monolith, train_router

Log = Callable[[str], None]


@contextlib.contextmanager
def run_lock(run: str | Path):
    """Hold the run folder's lock (RUN/.lock, created with the folder) while the body writes to it: a
    second writer is refused, naming the holder. Re-entrant within one process; a folder this call
    created is removed again if it is left empty (a run that failed its checks leaves nothing)."""
    folder = RunFolder(run)
    created = not folder.root.exists()
    try:
        with folder_lock(folder.lock, f"run folder {folder.root}"):
            yield folder.root
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.root.rmdir()  # only when empty


def load_data(cfg: RunConfig) -> tuple[ArrayData, ArrayData]:
    """The run's train and test splits, in memory, checked (finite, non-empty, at least partition.k
    training samples)."""
    d = cfg.data
    train, test = load_dataset(d.name, d.n_train, d.n_test, d.seed, d.params)
    if len(train) < cfg.partition.k:
        raise DDMError(f"partition.k = {cfg.partition.k} is larger than the number of samples ({len(train)}); "
                       "lower partition.k or use more data (data.n_train)")
    return train, test


def write_data(cfg: RunConfig, run, train: ArrayData, test: ArrayData, log: Log = print) -> None:
    """Write RUN/data/ (one staged folder: it appears whole or not at all)."""
    folder = RunFolder(run)
    with staging_dir(folder.data) as tmp:
        for split, data in (("train", train), ("test", test)):
            tensors = {"x": data.x}
            if data.labels is not None:
                tensors["labels"] = data.labels
            save_tensors(tmp / folder.split(split).name, tensors)
        if train.truth is not None:
            t = train.truth
            save_tensors(tmp / folder.truth.name, {"weights": t.weights, "means": t.means, "eigvals": t.eigvals,
                                                   "eigvecs": t.eigvecs})
        write_json(tmp / folder.data_info.name, {"name": cfg.data.name, "n_train": len(train), "n_test": len(test),
                                                 "data_shape": list(train.data_shape),
                                                 "exact_truth": train.truth is not None})
    log(f"data: {cfg.data.name}, {len(train)} train / {len(test)} test samples of shape {train.data_shape}")


def stage_data(cfg: RunConfig, run, log: Log = print) -> None:
    with run_lock(run):
        if RunFolder(run).split("train").exists():
            return
        write_data(cfg, run, *load_data(cfg), log)


def load_split(run, split: str) -> ArrayData:
    """A run's train or test split (with the exact truth when the data have one)."""
    folder = RunFolder(run)
    if not folder.split(split).exists():
        raise DDMError(f"{folder.root}: no data (data/{split}.safetensors); run `ddmkit partition --out "
                       f"{folder.root} --config CONFIG` or `ddmkit run CONFIG --out {folder.root}` first")
    t = load_tensors(folder.split(split))
    return ArrayData(read_json(folder.data_info)["name"], t["x"], t.get("labels"), load_truth(run))


def plan_partition(cfg: RunConfig, train: ArrayData) -> PartitionPlan:
    """The run's partition computed in memory (every check of the partition settings)."""
    p = cfg.partition
    return compute_partition(train, p.k, p.features, p.pca_dim, p.balanced, p.seed)


def register_user_features(cfg: RunConfig) -> None:
    """Import and register the feature function the user's config names (partition.features =
    "module:function"), for nearest-centroid routing; nothing for identity and pca. Call it only
    with the config the user runs, never with one read from a run folder."""
    if is_user_function(cfg.partition.features):
        use_features(cfg.partition.features)


def check_networks(cfg: RunConfig, data_shape: tuple) -> None:
    """Build the run's expert, monolith and router networks on the meta device (no memory): an
    unknown arch or bad net kwargs is a DDMError before anything is written."""
    shape = list(data_shape)
    nets = {"expert.net": (cfg.expert.net, {"data_shape": shape}),
            "router.net": (cfg.router.net, {"data_shape": shape, "num_experts": cfg.partition.k})}
    for where, (net, given) in nets.items():
        try:
            with torch.device("meta"):
                build_model(net.arch, **{**given, **net.kwargs})
        except DDMError as e:
            raise DDMError(f"{where}: {e} (data of shape {tuple(shape)})") from None


def stage_partition(cfg: RunConfig, run, log: Log = print) -> None:
    with run_lock(run):
        folder = RunFolder(run)
        if folder.manifest.exists():
            return
        train = load_split(run, "train")
        m = write_partition(plan_partition(cfg, train), train, folder.partition)
        log(f"partition: k={m['k']}, cluster sizes {m['counts']}")


def stage_experts(cfg: RunConfig, run, log: Log = print, backend: str = "inline", workers: int | None = None,
                  address: str | None = None) -> None:
    """Train the experts not yet written, with a launch backend (ddmkit.launch), or all at once in
    one stacked network when expert.concurrent is set; a job that left a checkpoint continues from it."""
    with run_lock(run):
        folder = RunFolder(run)
        jobs = [ExpertJob(k, shard, folder.expert(k)) for k, shard in enumerate(shard_files(run))
                if not (folder.expert(k) / "model.safetensors").exists()]
        start = time.perf_counter()
        if jobs and cfg.expert.concurrent:  # all in one stacked network on this device, each on its own shard
            with job_threads(cfg.expert.train.threads):
                train_experts_concurrently([j.shard for j in jobs], cfg.expert, [j.out_dir for j in jobs], log)
            backend = "concurrent"
        else:
            run_jobs(jobs, cfg.expert, backend, workers, address, resume=True, log=log)
        if jobs:
            log(f"experts: {len(jobs)} trained in {time.perf_counter() - start:.1f}s ({backend} backend)")


def stage_registry(cfg: RunConfig, run, log: Log = print) -> None:
    """Write RUN/registry.json for the model folders present."""
    with run_lock(run):
        reg = write_registry(run)
        log(f"registry: {len(reg['models'])} model folders hashed into {RunFolder(run).registry}")


def stage_monolith(cfg: RunConfig, run, log: Log = print) -> None:
    with run_lock(run):
        folder = RunFolder(run)
        if not cfg.monolith.enabled or (folder.monolith / "model.safetensors").exists():
            return
        start = time.perf_counter()
        with job_threads(cfg.expert.train.threads):
            train_monolith(shard_files(run), cfg.expert, folder.monolith, cfg.monolith.match)
        log(f"monolith: trained in {time.perf_counter() - start:.1f}s (same steps x batch as all experts)")


def stage_router(cfg: RunConfig, run, log: Log = print) -> None:
    with run_lock(run):
        folder = RunFolder(run)
        if (folder.router / "model.safetensors").exists():
            return
        start = time.perf_counter()
        with job_threads(cfg.router.train.threads):
            train_router(shard_files(run), cfg.router, folder.router)
        log(f"router: trained in {time.perf_counter() - start:.1f}s")


TRAINING_STAGES = (stage_data, stage_partition, stage_experts, stage_monolith, stage_router, stage_registry)
