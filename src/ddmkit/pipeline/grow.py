"""Change the set of experts of a trained run: a new island's data join it, or one expert is swapped.

    add_expert("runs/ring", "island.npz")                  # cluster K, its expert, the router retrained
    add_expert("runs/ring", data, router="stats")          # no router training: the statistics-only router
    add_expert("runs/ring", data, mode="nearest")          # rows join their nearest clusters, whose experts retrain
    replace_expert("runs/ring", 2, "elsewhere/expert_07")  # expert 2 is now that model folder

add_expert, mode "new-cluster" (the new rows x_1 .. x_m become cluster K of a run with K clusters):

    partition/  shards/cluster_K (the rows), centroid c_K = (1/m) sum_i phi(x_i) under the partition's
                feature map phi, cluster K's mean and covariance appended, the manifest's k, counts, shards,
                n and data hash updated; the old shards keep their bytes
    experts/    expert_K, trained on its shard alone with the run's [expert] section (train_expert, the
                job every expert runs); experts 0 .. K-1 are untouched
    router/     retrained over the K + 1 shards with the run's [router] section (router="retrain"), or
                removed (router="stats": nothing is trained; the run routes by each island's count, mean
                and covariance, ddmkit.routing.stats_router, and RUN/grow.json records that, so that
                `ddmkit sample` and `evaluate` use it until a router is trained again)

mode "nearest": each row joins the shard of its nearest centroid (K stays), the centroid c moves to
(n_c c + sum of the new features) / (n_c + m_c), the cluster's statistics are recomputed, and every
expert whose shard grew is retrained from scratch on its whole shard (the cost of a new expert per
grown cluster, against one expert for "new-cluster"); the router is retrained (or statistics-only).

Both modes append the rows to RUN/data/train (and a data set's test split to RUN/data/test, spread
evenly among the old test rows: `interleaved`), so the evaluation scores the grown DDM on old and new data; the exact mixture of a Gaussian-mixture run is
extended when the new data have one too (weights by training counts), else dropped.

replace_expert copies a model folder (config.json + model.safetensors, checked: same data shape and
time convention, finite weights, a velocity network) into experts/expert_k; its config.json records
the slot it serves (cluster, shard SHA-256) and where it came from ("replaced_from").

Both hold the run's lock, make every check before the first write, write staged folders that are
renamed into place at the end, rewrite RUN/registry.json, remove the old DDM's samples, scores, plots
and report (RunFolder.derived; `ddmkit run` or `sample` draws them again), and append an entry to
RUN/grow.json. RUN/config.json and the monolith stay as they were: the monolith remains the baseline
of the original data (remove RUN/monolith and run `ddmkit train-monolith RUN` to train it on every shard).
"""
from __future__ import annotations

import contextlib
import numbers
import os
import shlex
import shutil
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ddmkit.config import DataConfig, RunConfig, apply_overrides, device_overrides, validate
from ddmkit.conventions import __version__
from ddmkit.data import ArrayData, check_finite, content_hash, load_dataset, takes_test_fraction
from ddmkit.data.arrays import checked_labels
from ddmkit.data.partition import cluster_statistics, feature_map, read_shard, shard_name, write_manifest
from ddmkit.ddm.load import check_shape, velocity_field
from ddmkit.errors import DDMError
from ddmkit.io import (load_tensors, read_json, read_metadata, remove, remove_stale_staging, save_tensors,
                       sha256_file, staging_dir, write_json)
from ddmkit.launch import ExpertJob, run_jobs
from ddmkit.train.stop import signals_held
from ddmkit.train.threads import job_threads
from ddmkit.layout import RunFolder, check_run_exists
from ddmkit.nets import check_builds
from ddmkit.nets.folders import did_you_mean, identity
from ddmkit.pipeline.checks import check_devices, checked_device
from ddmkit.pipeline.prepare import run_config
from ddmkit.pipeline.stages import load_split, run_lock
from ddmkit.registry import (checked_registry, data_sha256, load_model, load_partition_checked, verify_registry,
                             write_registry)
from ddmkit.train.jobs import checkpoint_path, train_router
from ddmkit.truth import GaussianMixture

Log = Callable[[str], None]
MODES = ("new-cluster", "nearest")
ROUTERS = ("retrain", "stats")
STATS = ("cluster_means", "cluster_covs", "cluster_vars", "cluster_counts")  # per-cluster rows of partition.safetensors
GROW_FORMAT = "ddmkit-grow-1"


# ----- the run as it is ----------------------------------------------------------------------
@dataclass
class TrainedRun:
    """A trained run read back and checked (nothing written)."""

    folder: RunFolder
    cfg: RunConfig
    manifest: dict
    tensors: dict  # partition.safetensors
    train: ArrayData  # RUN/data/train (the rows the partition holds, in order)
    test: ArrayData
    expert_config: dict  # expert 0's config.json (class labels, ...)


def refuse_latent(folder: RunFolder, k=None) -> None:
    """A latent run is refused by add-expert (k None) and replace-expert (k: the expert to replace), each
    with what does work: a new run that keeps the run's autoencoder, or an expert trained on the slot's
    latent shard put in place and registered."""
    if not folder.is_latent:
        return
    run = folder.root
    if k is None:
        raise DDMError(f"{run} is a latent run (RUN/latents): `ddmkit add-expert` does not grow one. Make a new "
                       "run with every island's data, the old and the new, and latent.pretrained = "
                       f'"{folder.autoencoder}" in its config to keep this run\'s autoencoder (its latent space): '
                       "`ddmkit run CONFIG --out NEW_RUN`")
    xx = f"{k:02d}" if isinstance(k, int) and not isinstance(k, bool) and k >= 0 else "XX"
    raise DDMError(f"{run} is a latent run (RUN/latents): `ddmkit replace-expert` does not copy experts into one. "
                   f"An expert of it must be trained on its latents: train one with `ddmkit train-expert "
                   f"{folder.latents / f'cluster_{xx}.safetensors'} --config {folder.config} --out NEW` (other "
                   f"[expert] settings may be set with --set), put NEW in place of {folder.experts / f'expert_{xx}'} "
                   f"and run `ddmkit register {run}`, which checks it; then sample and evaluate again")


def trained_run(run) -> TrainedRun:
    """The run's config, partition, data and first expert, after checking that it is trained: every
    expert present and, when there is a registry, every file matching it."""
    folder = RunFolder(run)
    cfg = run_config(folder.root)
    manifest, tensors = load_partition_checked(folder.partition)
    if not manifest["data_shape"]:
        raise DDMError(f"{folder.root} is a text run; `ddmkit add-expert` and `replace-expert` work on vector and "
                       "image runs")
    missing = [c for c in range(manifest["k"]) if not (folder.expert(c) / "model.safetensors").exists()]
    if missing:
        raise DDMError(f"{folder.root} is not trained yet: experts {missing} are missing"
                       f"{folder.missing_expert_hints(missing)}; train them first with "
                       f"`ddmkit run CONFIG --out {folder.root} --stages train` or `ddmkit launch {folder.root}`, or "
                       f"copy the folders of experts trained elsewhere on those shards into "
                       f"{folder.experts}/expert_XX (then `ddmkit register {folder.root}`)")
    if folder.registry.exists():
        verify_registry(folder.root, allow_missing=False)
    else:  # its model folders checked now, as write_registry checks them at the end, after the training
        checked_registry(folder.root)
    train, test = load_split(folder.root, "train"), load_split(folder.root, "test")
    if len(train) != len(tensors["assignments"]):
        raise DDMError(f"{folder.data}: {len(train)} training rows but the partition assigns "
                       f"{len(tensors['assignments'])}; the data folder does not belong to this partition")
    return TrainedRun(folder, cfg, manifest, tensors, train, test, read_json(folder.expert(0) / "config.json"))


# ----- the new island's data -------------------------------------------------------------------
def island_data(cfg: RunConfig, data, held_out: float = 0.2) -> tuple[ArrayData, ArrayData | None]:
    """(train, test) of the new island. An ArrayData is all training rows (no test rows); a data set
    name or .npy/.npz path, or a table like [data] ({"name": ..., "params": {...}}, and n_train, n_test,
    seed: the run's by default), is loaded by ddmkit.data.load_dataset. A file or image island holds out
    the share `held_out` of its rows (the run's own share, from add_expert) unless its params set
    test_fraction or test_path: then the new rows weigh as much among the test rows as among the training rows."""
    if isinstance(data, ArrayData):
        return with_tensors(data), None
    if isinstance(data, (str, Path)):
        data = {"name": str(data)}
    if not isinstance(data, dict):
        raise DDMError(f"data: expected an ArrayData, a data set name or .npy/.npz path, or a table like [data] "
                       f"({{'name': ..., 'params': {{...}}}}), got {type(data).__name__}")
    spec = validate(DataConfig, {**cfg.data.model_dump(), "params": {}, **data}, "data", "data spec")
    params = dict(spec.params)
    if holds_out_the_runs_share(spec.name, params):
        params["test_fraction"] = min(max(held_out, 1e-3), 0.999)
    return load_dataset(spec.name, spec.n_train, spec.n_test, spec.seed, params)


def with_tensors(data: ArrayData) -> ArrayData:
    """An ArrayData whose x or labels are NumPy arrays (ArrayData("island", np.load(...)["x"])) as one of tensors;
    x or labels of any other type than a tensor or an array: a DDMError naming it and what to give."""
    parts = {}
    for name in ("x", "labels"):
        value = getattr(data, name)
        if value is None and name == "labels" or isinstance(value, torch.Tensor):
            continue
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            kind = f"a NumPy array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            raise DDMError(f"data: ArrayData.{name} is {kind}; give a tensor (or a NumPy array) of numbers, e.g. "
                           f"ArrayData(name, torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels))")
        parts[name] = torch.as_tensor(value)
    return replace(data, **parts) if parts else data


def holds_out_the_runs_share(name: str, params: dict) -> bool:
    """Whether island_data holds out the run's share of the island's rows as its test rows: a file or image island
    whose params set neither test_fraction nor test_path (a data set's test rows are the run's data.n_test)."""
    return takes_test_fraction(name) and not {"test_fraction", "test_path"} & set(params)


def held_out_share(run: TrainedRun) -> float:
    """The share of the run's rows held out as test rows."""
    return len(run.test) / max(len(run.train) + len(run.test), 1)


def joined_truth(old: GaussianMixture | None, new: GaussianMixture | None, n_old: int,
                 n_new: int) -> GaussianMixture | None:
    """The exact mixture of the union: pi = (n_old pi_old, n_new pi_new) / (n_old + n_new) over the
    components of both (None unless both are known and of one dimension)."""
    if old is None or new is None or old.dim != new.dim:
        return None
    new = new.to(dtype=old.means.dtype)
    w = torch.cat([old.weights * n_old, new.weights * n_new])
    return GaussianMixture(w / w.sum(), torch.cat([old.means, new.means]), torch.cat([old.eigvals, new.eigvals]),
                           torch.cat([old.eigvecs, new.eigvecs]))


# (the run's channels, the new images') -> how to make the new images the run's: for each way of giving them
CHANNEL_FIXES = {
    (1, 3): "make them grey: an image folder's with \"mode\": \"grey\" in --params, an array file's saved as uint8 "
            "(N, H, W), e.g. x.mean(axis=-1).round().astype(np.uint8) of (N, H, W, 3) pixels, an ArrayData's "
            "x.mean(1, keepdim=True)",
    (3, 1): "make them colour: an image folder's with \"mode\": \"rgb\" in --params, an array file's saved as uint8 "
            "(N, H, W, 3), e.g. np.repeat(x[..., None], 3, axis=-1) of (N, H, W) pixels, an ArrayData's "
            "x.repeat(1, 3, 1, 1)"}


def check_island(run: TrainedRun, x: ArrayData, what: str) -> None:
    """The new rows against the run: non-empty, finite, of the run's data shape, labelled where the run's
    rows are (and within the class range of class-conditional networks)."""
    if len(x) == 0:
        raise DDMError(f"data: the new {what} split is empty; give the new island at least one row")
    shape = tuple(run.manifest["data_shape"])
    if tuple(x.data_shape) != shape:
        new, hint = tuple(x.data_shape), ""
        if len(shape) == 3 and len(new) == 2 and new == shape[-2:]:
            hint = (" (images in an .npy/.npz file: give --data image_array --params '{\"path\": \"FILE\"}', which "
                    "reads (N, H, W) or (N, H, W, C) images)")
        elif len(shape) == 3 and len(new) == 3 and new[-2:] == shape[-2:]:  # other channels: image_array keeps them
            fix = CHANNEL_FIXES.get((shape[0], new[0]), "convert them")
            hint = f" (the run's images have {shape[0]} channel(s), these {new[0]}: {fix})"
        elif len(shape) == 3 and len(new) in (2, 3) and (new[0] if len(new) == 3 else 1) == shape[0] \
                and shape[1] == shape[2]:  # the run's channels at another resolution: scaled and cut to a square
            side = shape[2]
            hint = (f" (images at another resolution: image_array and image_folder scale each image's shorter side "
                    f"to resize and cut the centre crop x crop, so add \"resize\": {side}, \"crop\": {side} to "
                    f"--params, e.g. --data image_array --params '{{\"path\": \"FILE\", \"resize\": {side}, "
                    f"\"crop\": {side}}}')")
        raise DDMError(f"data: the new data are of shape {tuple(x.data_shape)} but the run's are {shape}; give data "
                       f"of the run's shape (images: at its resolution and channels){hint}")
    check_finite(x.x, f"data ({what})")
    if x.labels is not None:  # an ArrayData's: one whole number per row (a file's were checked on loading)
        labels = x.labels.detach().cpu() if isinstance(x.labels, torch.Tensor) else x.labels
        checked_labels(labels, len(x), f"data ({what})")
    classes = _classes(run)
    if run.train.labels is not None and x.labels is None and classes:
        raise DDMError(f"data: the run's networks are class-conditional ({classes} classes) but the new rows have no "
                       f"labels; give each new row its class, 0 .. {classes - 1} (an .npz 'labels' array, or "
                       "ArrayData.labels)")
    if run.train.labels is not None and x.labels is None and x.truth is not None:
        raise DDMError("data: the new rows come with an exact mixture, which joins the run's, but have no labels; "
                       "give each new row the component it was drawn from (ArrayData.labels), or leave out "
                       "ArrayData.truth")
    if classes and x.labels is not None and not bool(((x.labels >= 0) & (x.labels < classes)).all()):
        raise DDMError(f"data: labels must lie in 0 .. {classes - 1} (the networks' classes); the new data hold "
                       f"{int(x.labels.min())} .. {int(x.labels.max())}: the networks cannot take another class, so "
                       "map the new rows' labels onto the run's classes (or train a run with more num_classes)")


def _classes(run: TrainedRun) -> int:
    """The class count of the run's class-conditional networks (0: none)."""
    return max(int(run.expert_config["kwargs"].get("num_classes", 0)),
               int(run.cfg.router.net.kwargs.get("num_classes", 0)))


def check_grown_networks(run: TrainedRun, k: int) -> None:
    """The run's expert network and a router over k clusters build (on the meta device: no memory)."""
    shape = list(run.manifest["data_shape"])
    nets = {"expert.net": (run.cfg.expert.net, {"data_shape": shape}),
            "router.net": (run.cfg.router.net, {"data_shape": shape, "num_experts": k})}
    for where, (net, given) in nets.items():
        check_builds(net.arch, {**given, **net.kwargs}, where)


# ----- the plan: everything add_expert writes, computed in memory ------------------------------
@dataclass
class Growth:
    manifest: dict
    tensors: dict  # partition.safetensors
    shards: dict[int, dict]  # cluster -> tensors of the shard files written (new or grown)
    shard_meta: dict[int, dict]
    retrain: list[int]  # experts trained (new or again)
    train: dict  # RUN/data/train.safetensors
    test: dict
    truth: GaussianMixture | None
    data_info: dict
    event: dict = field(default_factory=dict)


def _labels(old: torch.Tensor | None, x: ArrayData, offset: int) -> torch.Tensor | None:
    """The new rows' labels as the run stores them beside `old` (its labels, or None): none when the
    run's rows or the new ones have none (the run's labels are then dropped: check_island let unlabelled
    rows in only where nothing reads labels); mixture components shifted past the run's own when the mixtures
    are joined."""
    if old is None or x.labels is None:
        return None
    return x.labels.long() + offset


def as_new_cluster(run: TrainedRun, x: torch.Tensor, y: torch.Tensor | None, feats: torch.Tensor,
                   data_hash: str) -> tuple[dict, dict, dict, torch.Tensor]:
    """(partition tensors, {K: shard}, {K: shard metadata}, assignments) with the rows as cluster K:
    centroid K = mean of their features, cluster K's mean and covariance appended."""
    t, k = run.tensors, run.manifest["k"]
    tensors = {**t, "centroids": torch.cat([t["centroids"], feats.mean(0, keepdim=True)])}
    for key, value in cluster_statistics(x, torch.zeros(len(x), dtype=torch.long), 1).items():
        tensors[key] = torch.cat([t[key], value.to(t[key].dtype)])
    shard = {"x": x.contiguous(), **({} if y is None else {"labels": y})}
    return tensors, {k: shard}, {k: {"cluster": k, "k": k + 1, "data_hash": data_hash}}, \
        torch.full((len(x),), k, dtype=torch.long)


def into_nearest(run: TrainedRun, x: torch.Tensor, y: torch.Tensor | None, feats: torch.Tensor,
                 data_hash: str) -> tuple[dict, dict, dict, torch.Tensor]:
    """(partition tensors, {c: grown shard}, {c: its metadata}, assignments) with each row in the cluster of
    its nearest centroid: centroid c moves to (n_c c + sum of the new features) / (n_c + m_c), cluster c's
    statistics are recomputed on its grown shard."""
    t, m = run.tensors, run.manifest
    assign = torch.cdist(feats, t["centroids"].float()).argmin(1)
    tensors = {**t, "centroids": t["centroids"].clone(), **{key: t[key].clone() for key in STATS if key in t}}
    shards, meta = {}, {}
    for c in assign.unique().tolist():
        rows = assign == c
        old_x, old_y, old_meta = read_shard(run.folder.partition / m["shards"][_entry(m, c)]["path"])
        shard = {"x": torch.cat([old_x, x[rows].to(old_x.dtype)]).contiguous()}
        if y is not None:
            shard["labels"] = torch.cat([old_y.long(), y[rows]])
        shards[c], meta[c] = shard, {**old_meta, "data_hash": data_hash}
        n_c = m["counts"][c]
        tensors["centroids"][c] = (n_c * t["centroids"][c] + feats[rows].sum(0)) / (n_c + int(rows.sum()))
        for key, value in cluster_statistics(shard["x"], torch.zeros(len(shard["x"]), dtype=torch.long), 1).items():
            tensors[key][c] = value[0].to(tensors[key].dtype)
    return tensors, shards, meta, assign


def plan_growth(run: TrainedRun, train: ArrayData, test: ArrayData | None, mode: str, router: str) -> Growth:
    """Every file add_expert writes, in memory; every check is here."""
    check_island(run, train, "training")
    if test is not None and len(test):
        check_island(run, test, "test")
    if len(train) < 2:  # the statistics-only router (--router stats, and the report's) needs a covariance
        held = f" ({len(test)} more held out as test rows, the run's share)" if test is not None and len(test) else ""
        need = ("a new cluster needs at least 2 (its statistics hold a covariance)" if mode == "new-cluster" else
                "an island needs at least 2")
        fewer = (", or hold fewer out as test rows (--params '{\"test_fraction\": 0.1}' for a file)"
                 if held and len(train) + len(test) >= 3 else "")  # a split keeps one test row: 2 rows train 1
        raise DDMError(f"data: {len(train)} new training row(s){held}; {need}: give more rows{fewer}")
    repeated = rows_in(torch.cat([train.x, test.x]) if test is not None and len(test) else train.x,
                       torch.cat([run.train.x, run.test.x]))
    if repeated:
        raise DDMError(f"data: {repeated} of the new rows are in the run already (its training or test data, which "
                       "holds every island added before); they would train a second expert on the same rows, or "
                       "train on rows the run is scored on: give rows that are not in the run yet")
    m, t = run.manifest, run.tensors
    k = m["k"]
    k_new = k + 1 if mode == "new-cluster" else k
    check_grown_networks(run, k_new)
    conditional = run.expert_config["kwargs"].get("num_classes") or run.cfg.router.net.kwargs.get("num_classes")
    truth = None if conditional else joined_truth(run.train.truth, train.truth, len(run.train), len(train))
    offset = run.train.truth.k if truth is not None else 0  # class labels are never shifted
    x_new, y_new = train.x.float(), _labels(run.train.labels, train, offset)
    feats = feature_map(m, t, "add-expert (the partition's features of the new rows)")(x_new).float()
    union_x = torch.cat([run.train.x, x_new.to(run.train.x.dtype)])
    data_hash = content_hash(union_x)

    grow = as_new_cluster if mode == "new-cluster" else into_nearest
    tensors, shards, meta, assign = grow(run, x_new, y_new, feats, data_hash)
    tensors["assignments"] = torch.cat([t["assignments"], assign.to(t["assignments"].dtype)])
    added = torch.bincount(assign, minlength=k_new).tolist()
    counts = [(m["counts"][c] if c < k else 0) + added[c] for c in range(k_new)]

    manifest = {**m, "k": k_new, "counts": counts, "n": len(union_x), "data_hash": data_hash,
                "shards": [dict(s) for s in m["shards"]]}
    if mode == "new-cluster":
        manifest["shards"].append({"cluster": k, "path": shard_name(k), "count": counts[k], "sha256": ""})
    for c in shards:
        manifest["shards"][_entry(manifest, c)]["count"] = counts[c]  # sha256: set once the file is written

    new_test = test if test is not None and len(test) else None
    train_t = {"x": union_x, **({} if y_new is None else {"labels": torch.cat([run.train.labels.long(), y_new])})}
    test_t = {"x": run.test.x}
    if run.test.labels is not None and y_new is not None:
        test_t["labels"] = run.test.labels
    if new_test is not None:  # old and new rows interleaved: the prefix the evaluation takes holds both
        test_t["x"] = torch.cat([run.test.x, new_test.x.to(run.test.x.dtype)])
        if "labels" in test_t:
            test_t["labels"] = torch.cat([run.test.labels.long(), _labels(run.test.labels, new_test, offset)])
        order = interleaved(len(run.test.x), len(new_test.x))
        test_t = {key: value[order] for key, value in test_t.items()}
    info = {**read_json(run.folder.data_info), "n_train": len(union_x), "n_test": len(test_t["x"]),
            "exact_truth": truth is not None}
    retrain = [k] if mode == "new-cluster" else sorted(shards)
    event = {"action": "add-expert", "mode": mode, "router": router, "data": train.name,
             "data_sha256": content_hash(train.x), "rows": len(x_new),
             "test_rows": 0 if new_test is None else len(new_test), "k_before": k, "k_after": k_new,
             "rows_per_cluster": {str(c): added[c] for c in range(k_new) if added[c]},
             "counts_before": list(m["counts"]), "counts_after": counts, "experts_trained": retrain,
             "router_trained": router == "retrain", "exact_truth": truth is not None}
    return Growth(manifest, tensors, shards, meta, retrain, train_t, test_t, truth, info, event)


def rows_in(new: torch.Tensor, old: torch.Tensor) -> int:
    """How many rows of `new` equal a row of `old` exactly (in old's dtype): rows are matched by a random
    projection, then compared whole."""
    if not len(new) or not len(old):
        return 0
    new, old = new.to(old.dtype).reshape(len(new), -1), old.reshape(len(old), -1)
    probe = torch.randn(old.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    index: dict[float, list[int]] = {}
    for i, key in enumerate((old.double() @ probe).tolist()):
        index.setdefault(key, []).append(i)
    return sum(any(torch.equal(row, old[i]) for i in index.get(key, ()))
               for row, key in zip(new, (new.double() @ probe).tolist()))


def interleaved(n_old: int, n_new: int) -> torch.Tensor:
    """An order of n_old + n_new rows (old first, then new) that spreads the new rows evenly: row i of a
    part sits at (i + 1/2) / its length, and the rows are merged by that position, so every prefix holds
    each part in its share to within one row."""
    position = torch.cat([(torch.arange(n_old) + 0.5) / max(n_old, 1), (torch.arange(n_new) + 0.5) / max(n_new, 1)])
    return torch.argsort(position, stable=True)


def _entry(manifest: dict, cluster: int) -> int:
    """The index of a cluster's entry in manifest["shards"]."""
    return next(i for i, s in enumerate(manifest["shards"]) if s["cluster"] == cluster)


# ----- writing ---------------------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    """dst with src's bytes: a hard link where the file system allows, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_partition(old: Path, tmp: Path, plan: Growth) -> list[Path]:
    """The grown partition folder in `tmp`: unchanged files linked from `old`, grown or new shards, the
    tensors, the manifest; returns the shard files in cluster order."""
    entries = {c: plan.manifest["shards"][_entry(plan.manifest, c)] for c in plan.shards}
    rewritten = {e["path"] for e in entries.values()} | {"manifest.json", "partition.safetensors"}
    for path in old.rglob("*"):
        rel = path.relative_to(old).as_posix()
        if path.is_file() and rel not in rewritten:
            _link_or_copy(path, tmp / rel)
    for c, tensors in plan.shards.items():
        save_tensors(tmp / entries[c]["path"], tensors, metadata=plan.shard_meta[c])
        entries[c]["sha256"] = sha256_file(tmp / entries[c]["path"])
    save_tensors(tmp / "partition.safetensors", plan.tensors)
    write_manifest(tmp, plan.manifest)
    return [tmp / s["path"] for s in sorted(plan.manifest["shards"], key=lambda s: s["cluster"])]


def _write_data(tmp: Path, folder: RunFolder, plan: Growth) -> None:
    save_tensors(tmp / folder.split("train").name, plan.train)
    save_tensors(tmp / folder.split("test").name, plan.test)
    if plan.truth is not None:
        t = plan.truth
        save_tensors(tmp / folder.truth.name, {"weights": t.weights, "means": t.means, "eigvals": t.eigvals,
                                               "eigvecs": t.eigvecs})
    write_json(tmp / folder.data_info.name, {**plan.data_info, "sha256": data_sha256(tmp)})  # the new files'


def derived_paths(folder: RunFolder) -> list[Path]:
    """What clear_derived removes: the derived files and folders, and the students, that exist."""
    return [p for p in (*folder.derived, folder.students) if p.exists() or p.is_symlink()]


def check_clearable(folder: RunFolder, command: str) -> None:
    """Refuse, before anything is trained or written, a run whose folder cannot be written or whose derived
    files clear_derived could not remove (a read-only RUN/samples was found after the training, each folder
    removed in turn: the earlier ones gone, the training lost). A path to remove needs a writable parent; a
    folder, every folder in it writable and readable (rmtree lists and empties each)."""
    said = (f"`ddmkit {command}` writes the run and removes the old DDM's samples, scores and students; nothing was "
            "changed")
    if not os.access(folder.root, os.W_OK | os.X_OK):
        raise DDMError(f"{folder.root} is not writable: {said}; make it writable with "
                       f"`chmod u+w {shlex.quote(str(folder.root))}` (or run as its owner) and run the command again")
    for path in derived_paths(folder):
        where = _unwritable(path)
        if where is not None:
            inside = where != path.parent  # the folder itself or one of its folders
            fix = f"chmod -R u+w {shlex.quote(str(path))}" if inside else f"chmod u+w {shlex.quote(str(where))}"
            raise DDMError(f"{path} cannot be removed ({where} is not writable): {said}; make it writable with "
                           f"`{fix}` (or run as its owner) and run the command again")


def _unwritable(path: Path) -> Path | None:
    """The first folder that keeps `path` from being removed: its parent, or (a folder) itself or a folder in it
    that cannot be listed and emptied; None when it can be removed."""
    needs = os.W_OK | os.X_OK
    if not os.access(path.parent, needs):
        return path.parent
    if not path.is_dir() or path.is_symlink():
        return None
    if not os.access(path, needs | os.R_OK):
        return path
    folders = (Path(d) / sub for d, subs, _ in os.walk(path) for sub in subs)  # links to folders are unlinked alone
    return next((f for f in folders if not f.is_symlink() and not os.access(f, needs | os.R_OK)), None)


def clear_derived(folder: RunFolder, log: Log) -> None:
    """Remove what sampling and scoring wrote (RunFolder.derived: the old DDM's samples and scores) and the
    students distilled from the old DDM (RUN/students: `ddmkit distill` would reuse them as up to date)."""
    for path in folder.derived:
        remove(path)
    if folder.students.exists():
        remove(folder.students)
        log(f"removed {folder.students}: students distilled from the old DDM (`ddmkit distill` makes them again)")


def read_log(folder: RunFolder) -> dict:
    """RUN/grow.json: {"format", "router": "learned" | "statistics", "events": [...]} (empty for a new run)."""
    if not folder.grow.exists():
        return {"format": GROW_FORMAT, "router": "learned", "events": []}
    log = read_json(folder.grow)
    if not isinstance(log, dict) or not isinstance(log.get("events"), list):
        raise DDMError(f"{folder.grow}: not a grow log (expected 'events', a list); move it away")
    bad = next((n for n, event in enumerate(log["events"]) if not isinstance(event, dict)), None)
    if bad is not None:
        raise DDMError(f"{folder.grow}: events[{bad}] is {log['events'][bad]!r}, not an entry of add-expert or "
                       "replace-expert (a JSON object); the file was edited or damaged: copy it back from another "
                       "copy of the run")
    return log


def check_not_added_before(log: dict, event: dict, folder: RunFolder) -> None:
    """Refuse an island whose training rows (their content hash) an earlier add-expert added already."""
    earlier = [e.get("n") for e in log["events"] if e.get("data_sha256") == event["data_sha256"]]
    if earlier:
        raise DDMError(f"data: these {event['rows']} rows were added to {folder.root} before ({folder.grow.name} "
                       f"entry {earlier[0]}); adding them again would give the same rows a second cluster and "
                       "expert; give rows that are not in the run yet")


def log_event(folder: RunFolder, event: dict, router: str | None = None) -> dict:
    """Append an event, numbered 1, 2, ... in order, to RUN/grow.json (and set the run's router kind)."""
    log = read_log(folder)
    event = {"n": len(log["events"]) + 1, **event, "ddmkit_version": __version__}
    log = {**log, "format": GROW_FORMAT, "events": [*log["events"], event]}
    if router is not None:
        log["router"] = router
    write_json(folder.grow, log)
    return event


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        hint = did_you_mean(value, list(accepted)) if isinstance(value, str) else ""
        raise DDMError(f"--{name}: unknown value {value!r}; accepted: {', '.join(accepted)}{hint}")


@contextlib.contextmanager
def interrupts_held(log: Log, command: str):
    """Ctrl-C and SIGTERM wait until the block ends: the run's staged folders, grow.json and registry land
    together (a stop between two renames left the old router removed and the entry written; one before the
    registry, a registry that failed verify). A stop that came meanwhile is said; the block, finished, is not
    undone."""
    with signals_held(signal.SIGINT, signal.SIGTERM) as caught:
        yield
    if caught:
        log(f"{command}: Ctrl-C or SIGTERM came while the run was being written: it was finished first")


def _remove_checkpoint_on_exit(stack: contextlib.ExitStack, staged: Path) -> None:
    """Remove, when `stack` closes, the checkpoint that the job writing the staging folder `staged` keeps beside
    it: a finished job removed it already; an interrupted one's goes with the staging folder (its name is this
    process's: no later command could continue from it)."""
    stack.callback(checkpoint_path(staged).unlink, missing_ok=True)


def add_expert(run, data, mode: str = "new-cluster", router: str = "retrain", log: Log = print,
               device: str | None = None) -> dict:
    """Add a new island's data to a trained run (see the module docstring); returns the grow.json entry.

    data: an ArrayData (training rows), a data set name or .npy/.npz path, or a table like [data];
    mode: "new-cluster" (cluster K and its expert) or "nearest" (rows join their nearest clusters,
    whose experts retrain); router: "retrain" (over all shards) or "stats" (statistics-only, no training);
    device: where they train (cpu, cuda, cuda:N, mps, auto; None: the run's train.device)."""
    _check_choice("mode", mode, MODES)
    router = "stats" if router == "statistics" else router  # sample --router's spelling of it
    _check_choice("router", router, ROUTERS)
    if device is not None:
        checked_device(device)
    folder = RunFolder(run)
    check_run_exists(folder.root, needs="trained")  # said before its lock would make the folder
    with run_lock(folder.root):
        refuse_latent(folder)
        state = trained_run(folder.root)
        check_clearable(folder, "add-expert")  # before the training, which a refusal at the end would waste
        if device is not None:
            raw = state.cfg.model_dump()
            state.cfg = validate(RunConfig, apply_overrides(raw, device_overrides(raw, device)), "--device")
        check_devices(state.cfg)
        train, test = island_data(state.cfg, data, held_out_share(state))
        check_not_added_before(read_log(folder), {"data_sha256": content_hash(train.x), "rows": len(train)},
                               folder)  # first: it names the entry that added them (a damaged log is refused too)
        plan = plan_growth(state, train, test, mode, router)
        remove_stale_staging(folder.root)
        cfg = state.cfg
        with contextlib.ExitStack() as held, contextlib.ExitStack() as stack:  # staged folders, renamed into
            # place in reverse order on success; from the removal of the old samples on, interrupts wait (held)
            shards = _write_partition(folder.partition, stack.enter_context(staging_dir(folder.partition)), plan)
            _write_data(stack.enter_context(staging_dir(folder.data)), folder, plan)
            jobs = [ExpertJob(c, shards[c], stack.enter_context(staging_dir(folder.expert(c)))) for c in plan.retrain]
            for job in jobs:
                _remove_checkpoint_on_exit(stack, job.out_dir)
            run_jobs(jobs, cfg.expert, "inline", log=lambda msg: None)
            rows = [plan.manifest["counts"][c] for c in plan.retrain]
            log(f"add-expert: experts {plan.retrain} trained on {rows} rows")
            if router == "retrain":
                router_dir = stack.enter_context(staging_dir(folder.router))
                _remove_checkpoint_on_exit(stack, router_dir)
                with job_threads(cfg.router.train.threads):
                    train_router(shards, cfg.router, router_dir)
                log(f"add-expert: router retrained over {len(shards)} clusters")
            held.enter_context(interrupts_held(log, "add-expert"))
            clear_derived(folder, log)
            event = log_event(folder, plan.event, "learned" if router == "retrain" else "statistics")
            if router == "stats" and folder.router.exists():
                shutil.rmtree(folder.router)
                log(f"add-expert: router removed; the run routes by the islands' statistics ({folder.grow})")
            stack.close()  # the renames, then the registry, with interrupts held
            write_registry(folder.root)
    log(f"add-expert: k = {plan.manifest['k']}, cluster sizes {plan.manifest['counts']}")
    return event


# ----- replace_expert ----------------------------------------------------------------------------
def check_expert_folder(source: Path, run: TrainedRun) -> dict:
    """A model folder that can stand in for an expert of `run`: config.json and weights agree, its
    time convention is ddmkit's, its weights are finite, it is a velocity network (not a router) of
    the run's data shape and class count, and it gives a finite velocity on two rows; returns its config."""
    if RunFolder(source).experts.is_dir():
        raise DDMError(f"FOLDER {source} is a run folder; give one of its model folders, e.g. "
                       f"{RunFolder(source).expert(0)}")
    if not (source / "config.json").is_file():
        what = "is a file" if source.is_file() else "holds no config.json, so it is not a model folder"
        raise DDMError(f"FOLDER {source} {what}; give the folder of the expert that is to replace it (config.json and "
                       "model.safetensors), e.g. RUN/experts/expert_03 of another run, or a `ddmkit train-expert "
                       "--out` folder")
    try:
        model, config = load_model(source)
    except DDMError as e:  # its files, named by their paths (inside '.': by their names alone)
        raise DDMError(f"FOLDER {source}: {e}") from None
    if config.get("role") == "router" or "num_experts" in config.get("kwargs", {}):
        raise DDMError(f"FOLDER {source} holds a router; give an expert's (or a monolith's) model folder")
    shape = tuple(run.manifest["data_shape"])
    check_shape(source, config, shape)
    classes, want = int(config["kwargs"].get("num_classes", 0)), int(run.expert_config["kwargs"].get("num_classes", 0))
    if classes != want:
        raise DDMError(f"FOLDER {source}: its network takes {classes} class labels but the run's experts take "
                       f"{want}; give an expert trained with kwargs num_classes = {want}")
    try:
        with torch.no_grad():
            v = velocity_field(model, config)(torch.zeros(2, *shape), torch.full((2,), 0.5))
    except DDMError as e:  # its config.json's path or prediction
        raise DDMError(f"FOLDER {source}: {e}") from None
    except Exception as e:  # a network that cannot run on the run's data
        raise DDMError(f"FOLDER {source}: the network fails on the run's data ({type(e).__name__}: {str(e)[:200]})")
    if tuple(v.shape) != (2, *shape) or not bool(torch.isfinite(v).all()):
        raise DDMError(f"FOLDER {source}: the network gives {tuple(v.shape)} (finite: {bool(torch.isfinite(v).all())})"
                       f" for 2 rows of shape {shape}; it is not a velocity network of this run's data")
    return config


def replace_expert(run, k: int, folder, log: Log = print) -> dict | None:
    """Expert k of a trained run becomes a copy of the model folder `folder` (see the module
    docstring); returns the grow.json entry (None, and nothing written, when it is a copy of those
    weights already)."""
    run_folder, source = RunFolder(run), Path(folder)
    check_run_exists(run_folder.root, needs="trained")  # said before its lock would make the folder
    with run_lock(run_folder.root):
        refuse_latent(run_folder, k)
        state = trained_run(run_folder.root)
        kk = state.manifest["k"]
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # "1", 1.0: said as what they are
            raise DDMError(f"K: {k!r} is not a whole number ({type(k).__name__}); give one of this run's experts "
                           f"0 .. {kk - 1}, an int")
        if not 0 <= k < kk:
            raise DDMError(f"K: there is no expert {int(k)}; this run has experts 0 .. {kk - 1}")
        k = int(k)  # a NumPy integer (np.argsort's) as the index it is, written to JSON
        if not source.exists():
            raise DDMError(f"FOLDER {source} does not exist; give the model folder that is to replace expert {k} "
                           "(a folder holding config.json and model.safetensors, e.g. RUN/experts/expert_03 of "
                           "another run, or a `ddmkit train-expert --out` folder)")
        if source.resolve() == run_folder.expert(k).resolve():
            raise DDMError(f"FOLDER {source} is expert {k} of this run already; give the model folder that is to "
                           "replace it")
        config = check_expert_folder(source, state)
        read_log(run_folder)
        shard = state.manifest["shards"][_entry(state.manifest, k)]
        slot_meta = read_metadata(run_folder.partition / shard["path"])  # what an expert trained there records
        weights = sha256_file(source / "model.safetensors")
        slot = run_folder.expert(k) / "config.json"
        if slot.is_file() and weights in ((read_json(slot).get("replaced_from") or {}).get("weights_sha256"),
                                          sha256_file(run_folder.expert(k) / "model.safetensors")):
            log(f"replace-expert: expert {k} is a copy of these weights already ({source}); nothing to do")
            return None
        origin = {"source": str(source.resolve()), "cluster": config.get("cluster"), "k": config.get("k"),
                  "shard_sha256": config.get("shard_sha256"), "shard_count": config.get("shard_count"),
                  "data_hash": config.get("data_hash"), "weights_sha256": weights}
        slot_config = {**config, "role": "expert", "cluster": k, "k": kk, "shard_sha256": shard["sha256"],
                       "shard_count": shard["count"], "data_hash": slot_meta.get("data_hash"), "replaced_from": origin}
        check_clearable(run_folder, "replace-expert")
        with contextlib.ExitStack() as held:  # the same tensors, written as the slot's own (identity)
            with staging_dir(run_folder.expert(k)) as tmp:
                save_tensors(tmp / "model.safetensors", load_tensors(source / "model.safetensors"),
                             identity(slot_config))
                if (source / "train_log.jsonl").is_file():
                    shutil.copyfile(source / "train_log.jsonl", tmp / "train_log.jsonl")
                write_json(tmp / "config.json", slot_config)
                held.enter_context(interrupts_held(log, "replace-expert"))
                clear_derived(run_folder, log)
                event = log_event(run_folder, {"action": "replace-expert", "expert": k, **origin})
            write_registry(run_folder.root)
    log(f"replace-expert: expert {k} is now a copy of {source}; the old DDM's samples and scores were removed "
        "(sample and evaluate again)")
    return event
