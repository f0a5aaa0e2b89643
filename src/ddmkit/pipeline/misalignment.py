"""`ddmkit study misalignment CONFIG --out DIR`: the misalignment conditions over training seeds.

    study_misalignment(cfg, "runs/misalignment", seeds=[0, 1, 2],
                       conditions=["disjoint", "overlap-0.25", "tempered-3"], strategies=["full", "top-2"])

Conditions and measurements are defined in ddmkit.analysis.misalignment. Every training condition of a
seed is an ordinary run folder, DIR/runs/{condition}_s{seed}, trained by run_pipeline (stages "train",
so a study resumes like `ddmkit run`: finished runs and stages are skipped); the seed sets the experts'
training seed and the router's (seed + 1); data, partition and sampling noise are the same in every
run. Overlapping and random partitions are written into the run folder before training (the
manifest records the condition); modifiers (exact, tempered, uniform, permuted) are applied to a
loaded DDM and share the run of their base, which they never write. Exact experts do not depend on
the training seed: those conditions are measured once.

DIR/measure/{condition}_s{seed}.json holds one measurement (every strategy, with bootstrap replicates
over samples), skipped when it exists with the same settings; while it is being measured, the finished
strategies are kept in {condition}_s{seed}.parts.json, so an interrupted measurement resumes at the next
strategy (the noise and labels are the same at every start). DIR/report.md, study.json and
plots/quality_vs_stability.png summarise them (ddmkit.pipeline.misalignment_report): per condition and
strategy the mean over seeds with a 95% t-interval across seeds and a 95% bootstrap interval over samples.

Image data (data.name one of ddmkit.data.images.IMAGE_LOADERS, pixel space) have no truth: `exact` is
refused; every strategy draws the same n images from the same noise and class labels as `ddmkit run`
draws a set (sample_labels, the run's guidance), scored by FID and KID against the test split with the
run's evaluate.fid_features and kid_subset (intervals across seeds only: no bootstrap over samples for
FID); amplification and Delta_refine are taken on the first `stability_rows` trajectories; per condition
every expert's error on held-out images of its own cluster and of the others (clusters: the nearest
partition centroid in feature space). Measurements run on `device` (default: the config's
expert.train.device); training runs where the config says.
"""
from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ddmkit.analysis.alignment import heldout_errors
from ddmkit.analysis.misalignment import (
    Condition,
    apply_router,
    bind_labels,
    exact_shard_ddm,
    image_condition,
    measure_image_strategy,
    measure_strategy,
    overlap_members,
    parse_condition,
    random_partition,
    share_matrix,
)
from ddmkit.analysis.stability import data_scale
from ddmkit.config import ROWS, RunConfig, json_digest, validate
from ddmkit.conventions import __version__
from ddmkit.data.arrays import ArrayData, content_hash
from ddmkit.data.features import apply_features
from ddmkit.data.images import IMAGE_LOADERS
from ddmkit.data.partition import (
    cluster_statistics,
    load_partition,
    read_shard,
    shard_name,
    write_manifest,
)
from ddmkit.data.synthetic import MIXTURES
from ddmkit.ddm import load_ddm, start_noise
from ddmkit.ddm.load import nearest_cluster_fn
from ddmkit.errors import DDMError
from ddmkit.evaluation.distances import w2_exact
from ddmkit.evaluation.fid import feature_extractor, fid_kid, gaussian_stats
from ddmkit.evaluation.images import floor_images
from ddmkit.io import (
    check_folder_target,
    read_json,
    save_tensors,
    sha256_file,
    staging_dir,
    write_bytes_atomic,
    write_json,
)
from ddmkit.layout import RunFolder, check_outside_runs, check_own_study, safe_name
from ddmkit.pipeline.checks import check_devices, check_run_plan, checked_device, named_device
from ddmkit.pipeline.prepare import (check_replaceable, config_record, listed, prepare_run_dir, run_config,
                                     trained_differences)
from ddmkit.pipeline.run import run_pipeline
from ddmkit.pipeline.sampling import sample_labels
from ddmkit.pipeline.stages import (
    check_networks,
    load_data,
    load_split,
    plan_partition,
    run_lock,
    write_data,
)
from ddmkit.pipeline.misalignment_report import plot_study, render, render_images, summarize
from ddmkit.registry import shard_files
from ddmkit.routing import parse_strategy
from ddmkit.routing.table import canonical_name
from ddmkit.train.threads import job_threads

Log = Callable[[str], None]
DEFAULT_CONDITIONS = ("disjoint", "overlap-0.25", "undertrained-0.1", "random", "tempered-3", "uniform-0.5",
                      "permuted-0.5", "exact", "exact+tempered-3")
DEFAULT_STRATEGIES = ("full", "top-1", "top-2", "sample-2")
IMAGE_CONDITIONS = tuple(c for c in DEFAULT_CONDITIONS if "exact" not in c)
T_GRID = [0.05 + 0.1 * i for i in range(10)]
STUDY_STAGES = ("all", "train", "report")
BOOT_MAX = 100_000  # bootstrap resamples (--n-boot, --w2-boot): more is no interval that ends
TRAIN_DEVICE_FIX = "pass --set {}=cpu (the study's --device is where it measures; its runs train where the config says)"


# ----- the plan -----------------------------------------------------------------------------------------------------
def split_names(names: Sequence[str] | None, default: Sequence[str], option: str = "--conditions") -> list[str]:
    """Names given repeatedly or comma-separated, in order, each once (the default when none is given; a
    value that names none, such as "" or ",,", is refused: it ran the whole default study)."""
    if not names:
        return list(default)
    out = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
    if not out:
        raise DDMError(f"{option} {','.join(map(str, names))!r}: names nothing; give names (e.g. {option} "
                       f"{','.join(default[:2])}), or leave {option} out for the default ({', '.join(default)})")
    return list(dict.fromkeys(out))


def strategy_names(strategies: Sequence[str] | None) -> list[str]:
    """The --strategy values (the default when none is given), checked, each by its one name (top-02 is
    top-2) and once."""
    names = split_names(strategies, DEFAULT_STRATEGIES, "--strategy")
    for name in names:
        try:
            parse_strategy(name, sampled=True)
        except DDMError as e:
            raise DDMError(f"--strategy: {e}") from None
    return list(dict.fromkeys(canonical_name(name) for name in names))


def is_image_study(cfg: RunConfig) -> bool:
    """Whether the config's data are images (True) or a Gaussian mixture (False); other data are refused."""
    if cfg.data.name in MIXTURES:
        return False
    if cfg.data.name in IMAGE_LOADERS:
        if cfg.latent.enabled:
            raise DDMError("latent.enabled = true: the misalignment study on images works in pixel space; set "
                           "--set latent.enabled=false")
        return True
    raise DDMError(f"data.name = {cfg.data.name!r}: the misalignment study needs data with an exact Gaussian-"
                   f"mixture truth ({', '.join(MIXTURES)}, e.g. --set data.name=ring8) or image data "
                   f"({', '.join(IMAGE_LOADERS)})")


def check_study(cfg: RunConfig, conditions: list[str], strategies: list[str], seeds: list[int], n: int,
                n_boot: int, w2_boot: int, stability_rows: int = 256) -> dict[str, Condition]:
    """Every option against the config, before anything is trained or written; returns the parsed conditions."""
    images = is_image_study(cfg)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise DDMError(f"--seeds: give the number of training seeds, at least 1 (got seeds {seeds})")
    parsed = {name: (image_condition if images else parse_condition)(name) for name in conditions}
    if not strategies:
        raise DDMError("--strategy: give at least one routing strategy, e.g. full")
    if cfg.sample.solver == "adaptive":
        raise DDMError("sample.solver = 'adaptive': the study measures stability step by step, which needs a "
                       "fixed-step solver; pass --set sample.solver=rk4 (or euler, heun, midpoint)")
    if not (2 <= n <= ROWS and 10 <= n_boot <= BOOT_MAX and 2 <= w2_boot <= BOOT_MAX):
        raise DDMError(f"--n must be 2 .. {ROWS}, --n-boot 10 .. {BOOT_MAX} and --w2-boot 2 .. {BOOT_MAX} (got {n}, "
                       f"{n_boot}, {w2_boot}); e.g. --n 1000 --n-boot 200 --w2-boot 50")
    if not 1 <= stability_rows <= ROWS:
        raise DDMError(f"--stability-rows must be 1 .. {ROWS} (got {stability_rows}); e.g. --stability-rows 256")
    if images:
        if cfg.evaluate.kid_subset > n:
            raise DDMError(f"--n {n}: KID draws evaluate.kid_subset = {cfg.evaluate.kid_subset} images of each "
                           f"set; raise --n to {cfg.evaluate.kid_subset} or lower it with "
                           f"--set evaluate.kid_subset={n}")
        return parsed
    if cfg.data.n_test < 2 * n:
        raise DDMError(f"--n {n}: the study scores n samples against n held-out rows and measures the noise floor "
                       f"on another n, so data.n_test must be at least {2 * n} (it is {cfg.data.n_test}); lower --n "
                       f"to {cfg.data.n_test // 2} or raise data.n_test")
    return parsed


def cell_config(cfg: RunConfig, cond: Condition, seed: int, n: int, strategies: list[str]) -> RunConfig:
    """The config of one training run: the seed's expert (seed) and router (seed + 1) training seeds, the
    condition's expert steps and warmup, no monolith; sample.n = n (no sets are drawn by the study), and the
    settings bounded by sample.n within it (sample.sweep_n, evaluate.chunk: at least its minimum, 10), so
    any --n the study accepts makes a valid run. On images sample.sweep_n is also at least evaluate.kid_subset
    (at most n: check_study): the study draws no sweep sets, so their size must not refuse its runs."""
    raw = cfg.model_dump()
    train = raw["expert"]["train"]
    train["seed"], raw["router"]["train"]["seed"] = seed, seed + 1
    train["steps"] = max(1, round(cond.steps_factor * train["steps"]))
    train["warmup"] = round(cond.steps_factor * train["warmup"])
    raw["monolith"]["enabled"] = False
    raw["sample"].update(n=n, strategies=list(strategies), batch_size=None)
    if raw["sample"]["sweep_n"] is not None:
        raw["sample"]["sweep_n"] = min(raw["sample"]["sweep_n"], n)
        if is_image_study(cfg):  # changed only where it was refused: other cells keep their keys
            raw["sample"]["sweep_n"] = max(raw["sample"]["sweep_n"], raw["evaluate"]["kid_subset"])
    raw["evaluate"].update(missing_experts=False, stats_router=False, chunk=max(10, min(raw["evaluate"]["chunk"], n)))
    return validate(RunConfig, raw, f"misalignment run {cond.run_name} seed {seed}")


def run_dir(out: Path, cond: Condition, seed: int) -> Path:
    return out / "runs" / f"{safe_name(cond.run_name)}_s{seed}"


# ----- training runs ------------------------------------------------------------------------------------------------
def condition_members(cond: Condition, cfg: RunConfig, train: ArrayData, plan) -> tuple[list, torch.Tensor, np.ndarray]:
    """(row indices of every shard, the base assignment (N,), centroids) of an overlapping or random partition."""
    if cond.partition == "overlap":
        centroids = torch.as_tensor(plan.centroids)
        return overlap_members(plan.labels, centroids, cond.share, cfg.partition.seed), plan.labels, plan.centroids
    labels = random_partition(len(train), cfg.partition.k, cfg.partition.seed)
    feats = apply_features(plan.spec, plan.feat_tensors, train.x, "partition.features").double()
    centroids = torch.stack([feats[labels == c].mean(0) for c in range(cfg.partition.k)]).numpy()
    return [(labels == c).nonzero().flatten() for c in range(cfg.partition.k)], labels, centroids


def write_condition_partition(cond: Condition, cfg: RunConfig, train: ArrayData, out_dir: Path) -> dict:
    """RUN/partition of an overlapping or random partition (one staged folder): one shard per cluster
    with its rows (shards overlap for overlap-S), assignments = the base partition's cluster of every
    row, per-shard statistics, and the condition in the manifest."""
    plan = plan_partition(cfg, train)
    members, assignments, centroids = condition_members(cond, cfg, train, plan)
    k, data_hash = len(members), content_hash(train.x)
    with staging_dir(out_dir) as tmp:
        shards = []
        for c, idx in enumerate(members):
            tensors = {"x": train.x[idx].contiguous()}
            if train.labels is not None:
                tensors["labels"] = train.labels[idx].contiguous()
            save_tensors(tmp / shard_name(c), tensors, metadata={"cluster": c, "k": k, "data_hash": data_hash})
            shards.append({"cluster": c, "path": shard_name(c), "count": len(idx),
                           "sha256": sha256_file(tmp / shard_name(c))})
        shard_of = torch.cat([torch.full((len(idx),), c) for c, idx in enumerate(members)])
        save_tensors(tmp / "partition.safetensors", {
            "centroids": torch.as_tensor(centroids, dtype=torch.float32), "assignments": assignments,
            **cluster_statistics(train.x[torch.cat(members)], shard_of, k), **plan.feat_tensors})
        manifest = {"k": k, "counts": [len(i) for i in members], "shards": shards, "data_hash": data_hash,
                    "data_name": train.name, "data_shape": list(train.data_shape), "n": len(train),
                    "features": plan.spec, "balanced": plan.balanced, "seed": plan.seed, "fine_k": plan.fine_k,
                    "condition": cond.run_name, "ddmkit_version": __version__}
        write_manifest(tmp, manifest)
    return manifest


def prepare_cell(cfg: RunConfig, cond: Condition, folder: RunFolder, force: bool, log: Log) -> None:
    """config.json, data and partition of a run; an overlapping or random partition is written here,
    every check done first. A run trained otherwise is refused, naming what differs (force: removed and made
    again); one that differs only in how it is sampled, scored or run (threads, device) is kept."""
    check_replaceable(folder)  # a folder of the user's files is never written into
    differs = trained_otherwise(cfg, folder)
    if differs:
        if not force:
            raise DDMError(f"{folder.root} holds a run trained otherwise ({listed(differs)}); use the study's config, "
                           "another --out, or --force to train it again")
        shutil.rmtree(folder.root)
    if cond.partition != "kmeans" and not folder.config.exists():
        with run_lock(folder.root):
            train, test = load_data(cfg)
            check_run_plan(cfg, len(train), len(test), train.data_shape, train.truth is not None)
            check_networks(cfg, train.data_shape)
            if not folder.split("train").exists():
                write_data(cfg, folder.root, train, test, log)
            if not folder.manifest.exists():
                m = write_condition_partition(cond, cfg, train, folder.partition)
                log(f"partition ({cond.run_name}): shard sizes {m['counts']}")
            write_json(folder.config, config_record(cfg))
    prepare_run_dir(folder.root, cfg, False, log)


def check_condition(cond: Condition, folder: RunFolder) -> None:
    """The run's partition is of the condition's kind (its manifest records it; k-means: nothing)."""
    recorded = read_json(folder.manifest).get("condition", "disjoint")
    wanted = "disjoint" if cond.partition == "kmeans" else cond.run_name
    if recorded != wanted:
        raise DDMError(f"{folder.manifest}: the partition is of condition {recorded!r}, not {wanted!r}; remove "
                       f"{folder.root} (or pass --force) and run the study again")


def trained_otherwise(cfg: RunConfig, folder: RunFolder) -> list[str]:
    """The trained settings (prepare.trained_differences) in which the run in `folder` differs from cfg;
    [] for no run yet, or a run of the same training (its sampling, scoring, threads or device may differ)."""
    if not folder.config.exists():
        return []
    return trained_differences(run_config(folder.root), cfg)


def ready(cfg: RunConfig, cond: Condition, folder: RunFolder) -> bool:
    """Whether the run holds this training and what the condition needs (the partition; trained networks:
    the registry, written last), so that nothing in it is touched again."""
    if not folder.config.exists() or trained_otherwise(cfg, folder):
        return False
    return folder.manifest.exists() and (not cond.trained or folder.registry.exists())


# ----- measurements -------------------------------------------------------------------------------------------------
def shard_shares(folder: RunFolder, truth, train: ArrayData) -> torch.Tensor:
    """M (C, K) of a run's shards (ddmkit.analysis.misalignment.share_matrix)."""
    labels = [read_shard(path)[1] for path in shard_files(folder.root)]
    return share_matrix(labels, train.labels, truth.k)


def measure_cell(cond: Condition, folder: RunFolder, seed: int, settings: dict, log: Log,
                 device: torch.device = torch.device("cpu"), kept: dict | None = None,
                 keep: Callable[[dict], None] = lambda per: None) -> dict:
    """Every strategy under one condition and training seed, and the condition's mechanism: the router's
    TV distance to the exact shard posterior and the experts' error against their shards' exact
    velocities (posterior-weighted), averaged over t = 0.05, 0.15, ..., 0.95 on held-out data. Networks,
    truth and data on `device` (the noise drawn on the CPU and moved there: the same on every device).
    kept: strategies measured before (not measured again); keep(per) is called after each strategy."""
    train, test = load_split(folder.root, "train"), load_split(folder.root, "test")
    truth, n, s = test.truth.to(device=device), settings["n"], settings["sample_seed"]
    manifest, ptensors = load_partition(folder.partition)
    exact = exact_shard_ddm(truth, shard_shares(folder, truth, train), tuple(manifest["data_shape"]),
                            nearest_cluster_fn(manifest, ptensors))
    ddm = apply_router(exact if cond.exact else load_ddm(folder.root, device), cond)
    x1 = start_noise(n, ddm.data_shape, s, device)
    reference, scale = test.x[:n].to(device), data_scale(test.x)
    per = dict(kept or {})
    for name in settings["strategies"]:
        if name in per:
            log(f"  {cond.name} seed {seed} {name}: kept from an earlier call")
            continue
        start = time.perf_counter()
        per[name] = measure_strategy(ddm, name, x1, truth, reference, scale, settings["steps"], settings["solver"],
                                     s, settings["jvp_rows"], settings["max_steps"], settings["n_boot"],
                                     settings["w2_boot"])
        v = per[name]["value"]
        log(f"  {cond.name} seed {seed} {name}: NLL {v['nll']:.4g}, W2 {v['w2']:.4g}, Delta_refine "
            f"{v['delta_refine']:.4g}, field error {v['field_error']:.4g} ({time.perf_counter() - start:.1f}s)")
        keep(per)
    held = heldout_errors(ddm, test.x[-n:].to(device), T_GRID, {}, s, exact=exact)
    mechanism = {"t": T_GRID, "router_tv": held["router_tv"], "expert_error": [float(np.mean(e)) for e in
                                                                                held["expert_vs_exact"]]}
    mechanism.update(router_tv_mean=float(np.mean(held["router_tv"])),
                     expert_error_mean=float(np.mean(mechanism["expert_error"])))
    return {"condition": cond.name, "seed": seed, "run": str(folder.root), "strategies": per, "mechanism": mechanism}


def image_scorer(cfg: RunConfig, folder: RunFolder, n: int, extractor: Callable) -> tuple[Callable, dict]:
    """(score(images) -> {"fid", "kid", "kid_std"} against the run's test split, the floor: n training images
    scored so), with the features of `extractor` (the run's evaluate.fid_features) and its kid_subset: the
    functions the run's SetScorer uses (ddmkit.pipeline.images.scorer_for); nothing is written into the run."""
    f_test = extractor(load_split(folder.root, "test").x)
    real = gaussian_stats(f_test)

    def score(images: torch.Tensor) -> dict:
        return fid_kid(f_test, extractor(images), cfg.evaluate.kid_subset, real)

    train = floor_images(load_split(folder.root, "train").x, n)
    floor = {**{k: float(v) for k, v in score(train).items()}, "n": len(train), "n_test": len(f_test)}
    return score, floor


def image_mechanism(plain, test, folder: RunFolder, rows: int, seed: int, device) -> dict:
    """Every expert's error |v_k(x_t) - (eps - x)|^2 / D on the last `rows` held-out images (their class labels
    given to class-conditional experts, guidance 1) at t = 0.05, ..., 0.95, pooled over (image, expert) pairs
    of the expert's own cluster and of the others (ddmkit.analysis.alignment.own_cluster_errors; an image's
    cluster: the nearest partition centroid in feature space)."""
    x = test.x[-rows:].to(device)
    y = None if test.labels is None else test.labels[-rows:].long().to(device)
    manifest, ptensors = load_partition(folder.partition)
    clusters = nearest_cluster_fn(manifest, ptensors)(x)
    held = heldout_errors(bind_labels(plain, y), x, T_GRID, {}, seed, clusters=clusters)
    own, other = ([c[key] for c in held["by_cluster"]] for key in ("own", "other"))
    return {"t": T_GRID, "expert_own": own, "expert_other": other, "heldout_rows": len(x),
            "expert_own_mean": float(np.nanmean(own)), "expert_other_mean": float(np.nanmean(other))}


def measure_image_cell(cond: Condition, folder: RunFolder, seed: int, settings: dict, score: Callable, log: Log,
                       device: torch.device = torch.device("cpu"), kept: dict | None = None,
                       keep: Callable[[dict], None] = lambda per: None) -> dict:
    """Every strategy under one condition and training seed on images (measure_image_strategy), from the same
    noise and class labels as a run's sample sets, and the experts' own- and other-cluster errors. kept:
    strategies measured before (not measured again); keep(per) is called after each strategy."""
    test = load_split(folder.root, "test")
    n, s = settings["n"], settings["sample_seed"]
    plain = load_ddm(folder.root, device)  # guidance 1: the field the experts were trained to predict
    ddm = apply_router(plain.with_guidance(settings["guidance"]), cond)
    x1 = start_noise(n, ddm.data_shape, s, device)
    y = sample_labels(ddm.num_classes, n, s, device)
    scale = data_scale(test.x)
    per = dict(kept or {})
    for name in settings["strategies"]:
        if name in per:
            log(f"  {cond.name} seed {seed} {name}: kept from an earlier call")
            continue
        start = time.perf_counter()
        per[name] = measure_image_strategy(ddm, name, x1, score, scale, settings["steps"], settings["solver"], s, y,
                                           settings["stability_rows"], settings["n_boot"], settings["batch_size"])
        v = per[name]["value"]
        log(f"  {cond.name} seed {seed} {name}: FID {v['fid']:.4g}, KID {v['kid']:.4g}, Delta_refine "
            f"{v['delta_refine']:.4g}, amplification {v['amp']:.4g} ({time.perf_counter() - start:.1f}s)")
        keep(per)
    mechanism = image_mechanism(plain, test, folder, min(n, len(test)), s, device)
    return {"condition": cond.name, "seed": seed, "run": str(folder.root), "strategies": per, "mechanism": mechanism}


def measure_path(out: Path, cond: Condition, seed: int) -> Path:
    return out / "measure" / f"{safe_name(cond.name)}_s{seed}.json"


def parts_path(path: Path) -> Path:
    """Where the strategies of an unfinished measurement are kept (CONDITION_sSEED.parts.json)."""
    return path.with_name(path.stem + ".parts.json")


def keep_parts(path: Path, key: str, per: dict) -> None:
    """Keep the strategies measured so far."""
    write_json(parts_path(path), {"key": key, "strategies": per})


def kept_parts(path: Path, key: str) -> dict:
    """The strategies an interrupted measurement with the same key finished; {} when there are none."""
    parts = parts_path(path)
    kept = read_json(parts) if parts.exists() else {}
    return kept["strategies"] if kept.get("key") == key else {}


# ----- the study ----------------------------------------------------------------------------------------------------
def kept_measurement(path: Path, key: str, typed_key: str) -> dict:
    """The measurement kept at `path` ({} for none): as it is, or, when it was made under `typed_key` (the
    --strategy names as typed, as earlier ddmkit recorded them), with its strategies renamed to their one
    names and the current key, so that it is not measured again."""
    measured = read_json(path) if path.exists() else {}
    if typed_key != key and measured.get("key") == typed_key and isinstance(measured.get("strategies"), dict):
        renamed = {canonical_name(name): value for name, value in measured["strategies"].items()}
        measured = {**measured, "key": key, "strategies": renamed}
    return measured


def study_settings(cfg: RunConfig, images: bool, strategies: list[str], n: int, n_boot: int, w2_boot: int,
                   jvp_rows: int, max_steps: int, stability_rows: int) -> dict:
    """The settings a measurement depends on (part of its key; the device is not: it changes rounding only)."""
    s = cfg.sample
    if not images:
        return {"n": n, "n_boot": n_boot, "w2_boot": w2_boot, "jvp_rows": jvp_rows, "max_steps": max_steps,
                "steps": s.steps, "solver": s.solver, "sample_seed": s.seed, "strategies": strategies}
    return {"kind": "images", "n": n, "n_boot": n_boot, "stability_rows": min(stability_rows, n), "steps": s.steps,
            "solver": s.solver, "sample_seed": s.seed, "strategies": strategies, "guidance": s.guidance,
            "batch_size": s.batch_size, "fid_features": cfg.evaluate.fid_features,
            "kid_subset": cfg.evaluate.kid_subset}


def report_only(measures: dict[str, list[dict]], parsed: dict[str, Condition], missing: list[str], out: Path,
                log: Log) -> tuple[dict[str, list[dict]], dict[str, Condition]]:
    """The kept measurements and their conditions (a condition with none left out); the missing ones named.
    Nothing kept: DDMError."""
    if missing:
        log(f"misalignment study: not measured, left out of the report: {', '.join(missing)}")
    kept = {name: ms for name, ms in measures.items() if ms}
    if not kept:
        raise DDMError(f"--stages report: no measurement of these conditions and seeds is kept in {out / 'measure'}"
                       "; measure them first with --stages all (or bring back their measure/*.json)")
    return kept, {name: parsed[name] for name in kept}


def study_misalignment(cfg: RunConfig, out: str | Path, seeds: Sequence[int] = (0, 1, 2),
                       conditions: Sequence[str] | None = None, strategies: Sequence[str] | None = None,
                       n: int = 1000, n_boot: int = 200, w2_boot: int = 50, jvp_rows: int = 64, max_steps: int = 10,
                       force: bool = False, log: Log = print, threads: int | None = 1,
                       device: str | torch.device | None = None, stability_rows: int = 256,
                       stages: str = "all") -> dict | None:
    """Train what is missing, measure what is missing, write DIR/report.md, study.json and the plot.
    device: where the measurements run (auto, cpu, cuda, cuda:N, mps; default: the config's
    expert.train.device; present on this machine only where stages measure); stability_rows: images only, the
    trajectories amplification and Delta_refine use;
    stages = "train": train every run the conditions need, measure nothing and write no report (None), e.g.
    on a machine without the FID weights; the same call with "all" later measures and reports. stages =
    "report": train and measure nothing, report the kept measurements (e.g. brought back from several
    machines) and name the missing ones; a condition with none is left out."""
    images = is_image_study(cfg)
    if stages not in STUDY_STAGES:
        raise DDMError(f"--stages: unknown value {stages!r}; accepted: {', '.join(STUDY_STAGES)}")
    names = split_names(conditions, IMAGE_CONDITIONS if images else DEFAULT_CONDITIONS)
    typed = split_names(strategies, DEFAULT_STRATEGIES, "--strategy")  # as given, each once
    strategies, seeds = strategy_names(typed), list(seeds)
    parsed = check_study(cfg, names, strategies, seeds, n, n_boot, w2_boot, stability_rows)
    if "full" not in strategies or len(strategies) < 2:  # said before the training, not only in the report
        log(f"note: --strategy {' '.join(strategies)}: each condition's verdict compares full with the best other "
            "strategy, so this study gives the tables without verdicts; add --strategy full and another (e.g. top-1)")
    # --device is where the measurements run: checked before any work where they run (stages all); the
    # report reads kept measurements (a folder measured on a GPU is reported on a laptop with the same command)
    if stages == "report":
        device = named_device(device) if device is not None else cfg.expert.train.device
    elif stages == "all":
        device = checked_device(device) if device is not None else checked_device(cfg.expert.train.device, True)
    check_folder_target(out, "--out")  # --out FILE (or inside one): named before any work
    check_outside_runs(out, "the study writes a run folder per condition and seed into --out/runs",
                       "runs/misalignment")
    check_own_study(out, "misalignment")  # not a sweep's folder, nor a report.md the study did not write
    # images: the scorer's features, made (so checked) before anything is trained
    extractor = feature_extractor(cfg.evaluate.fid_features, device) if images and stages == "all" else None
    missing: list[str] = []  # stages "report": the measurements not kept
    out = Path(out)
    settings = study_settings(cfg, images, strategies, n, n_boot, w2_boot, jvp_rows, max_steps, stability_rows)
    # the settings as ddmkit recorded them before it wrote every strategy by its one name (top-02 is top-2)
    typed_settings = study_settings(cfg, images, typed, n, n_boot, w2_boot, jvp_rows, max_steps, stability_rows)
    scoring: dict = {}  # images: the FID / KID scorer and the floor, made once from the first trained run
    start = time.perf_counter()
    measures: dict[str, list[dict]] = {}
    for name, cond in parsed.items():
        measures[name] = []
        for seed in seeds if cond.trained else seeds[:1]:
            cell_cfg = cell_config(cfg, cond, seed, n, strategies)
            folder = RunFolder(run_dir(out, cond, seed))
            path = measure_path(out, cond, seed)
            key = json_digest({"settings": settings, "run": cell_cfg.digest(), "condition": name, "seed": seed})
            typed_key = json_digest({"settings": typed_settings, "run": cell_cfg.digest(), "condition": name,
                                     "seed": seed})
            measured = kept_measurement(path, key, typed_key)
            if measured.get("key") == key:
                measures[name].append(measured)
                continue
            if stages == "report":
                missing.append(f"{name} seed {seed}")
                continue
            log(f"misalignment: {name}, seed {seed} (run {folder.root})")
            if not ready(cell_cfg, cond, folder):
                if cond.trained:  # before the cell's folder is made; --device does not move the training
                    check_devices(cell_cfg, TRAIN_DEVICE_FIX)
                prepare_cell(cell_cfg, cond, folder, force, log)
                if cond.trained:
                    run_pipeline(cell_cfg, folder.root, False, log, stages="train")
            if stages == "train":
                continue
            check_condition(cond, folder)
            kept = kept_parts(path, key)
            keep = functools.partial(keep_parts, path, key)
            with job_threads(threads), run_lock(folder.root):
                if images:
                    if not scoring:
                        scoring.update(zip(("score", "floor"), image_scorer(cfg, folder, n, extractor)))
                    cell = measure_image_cell(cond, folder, seed, settings, scoring["score"], log, device,
                                              kept, keep)
                    cell["floor"] = scoring["floor"]  # the report needs no run folder when all is measured
                else:
                    cell = measure_cell(cond, folder, seed, settings, log, device, kept, keep)
                result = {"key": key, **cell, "device": str(device)}
            write_json(path, result)
            parts_path(path).unlink(missing_ok=True)
            measures[name].append(result)
    if stages == "train":
        log(f"misalignment study: every run trained in {out / 'runs'}; the same command with --stages all "
            "measures and reports")
        return None
    if stages == "report":
        measures, parsed = report_only(measures, parsed, missing, out, log)
    first = RunFolder(run_dir(out, next(iter(parsed.values())), seeds[0]))
    report = summarize(measures, parsed, strategies, seeds, images)
    measured_on = sorted({m.get("device", str(device)) for ms in measures.values() for m in ms})
    report.update(settings=settings, config=cfg.model_dump(), version=__version__, device=", ".join(measured_on),
                  not_measured=missing)
    if images:
        kept = [m["floor"] for ms in measures.values() for m in ms if "floor" in m]  # made now or brought back
        if not kept and extractor is None:
            raise DDMError(f"{out / 'measure'}: the kept measurements hold no FID floor; measure them again "
                           "with --stages all")
        report.update(kind="images", floor=kept[0] if kept else image_scorer(cfg, first, n, extractor)[1])
    else:
        test = load_split(first.root, "test") if first.split("test").exists() else load_data(cfg)[1]
        report["w2_floor"] = w2_exact(test.x[:n], test.x[n:2 * n])
    report["wall_time"] = time.perf_counter() - start
    write_json(out / "study.json", report)
    plot_study(report, out / "plots" / "quality_vs_stability.png")
    write_bytes_atomic(out / "report.md", (render_images if images else render)(report).encode())
    log(f"misalignment study: {out / 'report.md'}")
    return report
