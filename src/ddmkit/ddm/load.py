"""The pieces of a DDM, read from a run folder (ddmkit.ddm.model puts them together).

    learned_parts(run)     experts and router from their model folders (checked against the
                           registry first, when there is one), the cluster prior, p(cluster | label)
                           for class-conditional experts, the partition's nearest-cluster map, and
                           in a latent run the autoencoder (latent_codec) that decodes samples
    exact_parts(run)       the Gaussian-mixture truth's exact cluster velocities and posterior
    monolith_field(run)    the FLOP-matched baseline's velocity field

Every piece is checked on the way in: shapes against the partition, the router's
K against the partition's, each folder's config and weights by ddmkit.registry.
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddmkit.data.partition import feature_map, read_shard
from ddmkit.errors import DDMError
from ddmkit.flow.convert import VPSchedule
from ddmkit.io import load_tensors, read_json
from ddmkit.layout import RunFolder, check_run_exists
from ddmkit.nets import user_networks
from ddmkit.nets.field import NetworkField, RouterOutput, VelocityOutput
from ddmkit.nets.user import is_user_network
from ddmkit.latent.autoencoder import LatentCodec, load_codec
from ddmkit.registry import (check_shard, check_slot, check_trained_on_partition, checked_model_shards, latent_info,
                             load_data_file, load_model, load_partition_checked, model_config, model_data_shape,
                             model_places, model_shards, partition_shard_hashes, safe_join, verify_registry,
                             warn_missing)
from ddmkit.routing.stats_router import (PUBLISHED_STATISTICS, class_stats_router, island_class_statistics,
                                        island_statistics, load_statistics, publication_parts, stats_router)
from ddmkit.truth import GaussianMixture, follows_device


PATHS = ("linear", "vp", "edm")
VP_KEYS = ("schedule", "steps", "beta_start", "beta_end", "time_scale")


def path_output(config: dict) -> tuple[str, VPSchedule | None]:
    """(path kind, VP schedule) of a model folder's config.json "path": absent or {"kind": "linear"} for
    ddmkit's own experts, {"kind": "vp", "schedule": "linear" | "cosine", "steps": 1000, "beta_start":
    1e-4, "beta_end": 0.02} for a DDPM network (and "time_scale": the network is called with n x
    time_scale; default 1, DDPM's timestep; ddmkit's VP experts write 1 / steps), {"kind": "edm"} for an
    EDM-style denoiser."""
    given = config.get("path") or {"kind": "linear"}
    if not isinstance(given, dict):
        raise DDMError(f"config.json path: {given!r} is not a table; write {{'kind': 'linear'}}, {{'kind': 'edm'}} or "
                       "{'kind': 'vp', ...}")
    path = dict(given)
    kind = path.pop("kind", None)
    extra = set(path) - set(VP_KEYS if kind == "vp" else ())
    if kind not in PATHS or extra:
        raise DDMError(f"config.json path: {config.get('path')!r} is not a path ddmkit converts; write "
                       "{'kind': 'linear'}, {'kind': 'edm'} or {'kind': 'vp', 'schedule': 'linear' or 'cosine', "
                       "'steps': N, 'beta_start': b0, 'beta_end': b1}")
    if kind != "vp":
        return kind, None
    schedule = path.pop("schedule", "linear")
    if schedule not in ("linear", "cosine"):
        raise DDMError(f"config.json path.schedule: {schedule!r}; accepted: linear, cosine")
    checked_vp_numbers(path)
    return kind, VPSchedule(schedule, **path)


def checked_vp_numbers(path: dict) -> None:
    """A model folder's VP steps, betas and time_scale within the bounds a run config has (expert.path), before
    anything is allocated from them (a DDMError naming the field)."""
    def number(name, low, high, integer=False):
        value = path.get(name)
        ok = not isinstance(value, bool) and isinstance(value, int if integer else numbers.Real)
        if value is not None and not (ok and low <= value <= high):
            raise DDMError(f"config.json path.{name}: {value!r}; give {'an integer' if integer else 'a number'} in "
                           f"{low:g} .. {high:g}")
    number("steps", 2, 100_000, integer=True)
    number("beta_start", 1e-12, 0.999)
    number("beta_end", 1e-12, 0.999)
    number("time_scale", 1e-12, 1e6)
    if path.get("beta_end", 0.02) < path.get("beta_start", 1e-4):
        raise DDMError(f"config.json path.beta_end {path.get('beta_end')} is below beta_start "
                       f"{path.get('beta_start', 1e-4)}; betas grow with the timestep")


def velocity_field(model: torch.nn.Module, config: dict, guidance: float = 1.0) -> NetworkField:
    """A velocity network (expert or monolith) as a field, converted to the linear-path velocity by its
    config's prediction type and, for a network trained on another path, by its config's "path"
    (path_output, ddmkit.flow.convert); class-conditional networks take y and apply guidance."""
    return NetworkField(model, velocity_output(config, guidance))


def velocity_output(config: dict, guidance: float = 1.0) -> VelocityOutput:
    """How a velocity network's output becomes the linear-path velocity, from its config.json (path and
    prediction checked: a DDMError naming the field)."""
    kind, schedule = path_output(config)
    accepted = {"linear": ("velocity", "epsilon", "x0"), "vp": ("epsilon", "v"), "edm": ("x0",)}[kind]
    prediction = config.get("prediction", accepted[0])  # velocity, DDPM's epsilon, EDM's x0
    if prediction not in accepted:
        raise DDMError(f"config.json prediction: {prediction!r} on the {kind} path; accepted: {', '.join(accepted)}"
                       + (" (an EDM network is a denoiser: leave prediction out)" if kind == "edm" else ""))
    return VelocityOutput(prediction, int(config["kwargs"].get("num_classes", 0)), float(guidance), kind, schedule)


def router_field(model: torch.nn.Module, config: dict) -> NetworkField:
    """A router network as a field: (x, t) -> probabilities (B, K); a label-conditional router
    (config kwargs num_classes > 0) is called as f(x, t, y=labels)."""
    return NetworkField(model, RouterOutput(bool(config["kwargs"].get("num_classes", 0))))


def check_shape(folder, config: dict, data_shape: tuple, latent_fix: str | None = None) -> None:
    """A model folder's config (checked by ddmkit.registry.model_config) records the data shape of this run;
    `latent_fix`: in a latent run, what its networks take and how to train this one again (latent_fix)."""
    if config.get("data_shape") is None:
        raise DDMError(f"{folder}/config.json has no data_shape (the shape of the data it was trained on, a "
                       "required field); train or copy the folder again")
    if tuple(config["data_shape"]) != tuple(data_shape):
        fix = latent_fix or (f"this run's data are {tuple(data_shape)}; retrain it on this run's partition (images: "
                             "at this resolution)")
        raise DDMError(f"{folder} was trained on data of shape {tuple(config['data_shape'])} but {fix}")


def latent_fix(folder: RunFolder, info: dict, cluster: int | None | str) -> str:
    """The end of a latent run's shape error for its expert `cluster` (None: the monolith, "router"): the latents
    its networks take, of which images, and the command that trains the folder again on them."""
    root, shape = folder.root, tuple(info["latent_shape"])
    if cluster == "router":
        redo = f"remove {folder.router}, then run `ddmkit train-router {root}`"
    elif cluster is None:
        redo = f"remove {folder.monolith}, then run `ddmkit train-monolith {root}`"
    else:
        redo = (f"`ddmkit train-expert {folder.latent_shard(cluster)} --config {folder.config} --out NEW`, then put "
                f"NEW in place of {folder.expert(cluster)} and run `ddmkit register {root}`")
    height, width = info["data_shape"][1:]
    return (f"this run's networks take latents of shape {shape} (of {height}x{width} images, through the run's "
            f"autoencoder, {folder.autoencoder}); train it again on them: {redo}")


def check_loadable(run) -> None:
    """Every expert and monolith folder present in `run` as loading reads it: its path and prediction, its
    data shape and an expert's cluster, and the router's data shape and clusters (a DDMError naming the
    folder). `ddmkit register` and `verify` call it, so that a folder copied in from an island is refused
    there rather than when the DDM samples."""
    folder = run_folder(run)
    manifest, _ = load_partition_checked(folder.partition)
    if manifest.get("data_name") == "text":  # byte-level models: no Gaussian path (ddmkit.discrete loads them)
        return
    info = latent_info(folder.root) if folder.is_latent else None
    shape = tuple(info["latent_shape"]) if info else model_data_shape(folder.root)
    for path, cluster in [*((folder.expert(c), c) for c in range(manifest["k"])), (folder.monolith, None)]:
        if not (path / "config.json").exists():
            continue
        config = model_config(path)
        try:
            velocity_output(config)
        except DDMError as e:
            raise DDMError(f"{path}: {e}") from None
        check_shape(path, config, shape, info and latent_fix(folder, info, cluster))
        if cluster is not None:
            check_slot(path, config.get("cluster", cluster), cluster)
    if (folder.router / "config.json").exists():
        check_router(folder, model_config(folder.router), manifest["k"], shape, info)


def check_router(folder: RunFolder, config: dict, k: int, shape, info: dict | None = None) -> None:
    """The router folder's config (checked by ddmkit.registry.model_config) as loading reads it: its data
    shape, and k, the partition's clusters; `info`: a latent run's latents.json (latent_fix)."""
    check_shape(folder.router, config, shape, info and latent_fix(folder, info, "router"))
    if config.get("k") != k:
        routes = "no number of" if config.get("k") is None else config["k"]
        raise DDMError(f"{folder.router / 'config.json'}: the router routes over {routes} clusters but the partition "
                       f"has {k}; train it again: remove {folder.router}, then run `ddmkit train-router {folder.root}`")


def expert_indices(indices, k: int, argument: str) -> list[int]:
    """The expert indices `indices` (one int or several) sorted and without repeats, each checked to be
    one of 0 .. k - 1, or a DDMError naming `argument`."""
    accepted = f"accepted: expert indices 0 .. {k - 1}, one int or a list of ints"
    items = [indices] if isinstance(indices, numbers.Integral) else indices
    try:
        items = None if isinstance(items, (str, bytes)) else list(items)
    except TypeError:
        items = None
    if items is None:
        raise DDMError(f"{argument}: {indices!r} is not an expert index or a list of them; {accepted}")
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < k]
    if bad:
        raise DDMError(f"{argument}: {bad!r} are not expert indices of these {k} experts; {accepted}")
    return sorted({int(i) for i in items})


def label_prior(counts: torch.Tensor) -> torch.Tensor:
    """p(cluster | class) (C, K) from the count of each class in each cluster, counts (C, K)
    (a class that no cluster holds gets the uniform row)."""
    counts = counts.double()
    k = counts.shape[1]
    total = counts.sum(1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1), torch.full_like(counts, 1.0 / k)).float()


def shard_label_counts(run, classes: int) -> torch.Tensor:
    """(C, K): how many samples of each class each island holds (what the islands publish for
    p(cluster | label)): from each expert folder's published statistics, else from the shard's labels."""
    counts = []
    for published, path in island_sources(run):
        if published is not None:  # the counts alone, not the statistics beside them
            counts.append(publication_parts(load_tensors(published, ["label_counts"]), classes)[2].round().long())
        else:
            labels = load_tensors(path, ["labels"])["labels"]
            counts.append(torch.bincount(labels.long(), minlength=classes)[:classes])
    return torch.stack(counts, dim=1)


def island_sources(run) -> list[tuple[Path | None, Path]]:
    """For each cluster of the run's model: (the statistics file its expert folder publishes, or None where
    the folder has none: an expert trained before ddmkit wrote them, or absent; the cluster's shard file)."""
    folder = RunFolder(run)
    published = [(folder.expert(c) / PUBLISHED_STATISTICS, path) for c, path in enumerate(model_shards(run))]
    return [(p if p.is_file() else None, path) for p, path in published]


def _on_cpu(stats: dict | None) -> dict | None:
    return None if stats is None else {name: value.cpu() for name, value in stats.items()}


def island_stats_router(run, classes: int = 0, rank: int | None = None, device="cpu") -> tuple[Callable, bool]:
    """(router, label-conditional) of the statistics-only router of a run's islands: each island's
    count, mean and covariance, per class label too when the experts are class-conditional
    (ddmkit.routing.stats_router). They are read from the statistics each expert folder publishes
    (statistics.safetensors, written by its training); only a cluster whose folder has none is computed
    from its shard (checked against the partition's SHA-256 first, on `device`), as is every cluster for a
    `rank` other than the default."""
    sources = island_sources(run)
    unpublished = [c for c, (published, _) in enumerate(sources) if published is None or rank is not None]
    if unpublished:  # the shards read, their SHA-256 against the partition's (or latents') record
        checked = checked_model_shards(run, unpublished)
    marginal, per_class = [], []
    for c, (published, path) in enumerate(sources):
        if published is not None and rank is None:
            stats, by_class, _ = publication_parts(load_statistics(published), classes)
        else:
            x, y, _ = read_shard(checked[c])
            x, y = x.to(device), (y.to(device) if y is not None else None)
            try:
                stats = island_statistics(x, rank)
            except DDMError as e:  # e.g. a cluster of one row
                raise DDMError(f"the statistics-only router: cluster {c} ({checked[c].name}): {e}") from None
            by_class = island_class_statistics(x, y, classes, rank) if classes else []
            # on the CPU, as published statistics are (the router follows the device of x)
            stats, by_class = _on_cpu(stats), [_on_cpu(s) for s in by_class]
        marginal.append(stats)
        per_class.append(by_class)
    if not classes:
        return stats_router(marginal), False
    return class_stats_router(per_class, marginal), True


def has_default_router(run) -> bool:
    """Whether load_ddm(run) has a router to route by: RUN/router, or the statistics-only router that
    RUN/grow.json records for a grown run. False for a run sampled with `--router statistics` before (or
    instead of) training one."""
    return (RunFolder(run).router / "model.safetensors").exists() or recorded_router(run) == "statistics"


def recorded_router(run) -> str:
    """The router a run routes by when it has no router folder: "statistics" where `ddmkit add-expert
    --router stats` recorded it in RUN/grow.json (ddmkit.pipeline.grow), else "learned"."""
    path = RunFolder(run).grow
    if not path.exists():
        return "learned"
    log = read_json(path)
    kind = log.get("router", "learned") if isinstance(log, dict) else None
    if kind not in ("learned", "statistics"):
        raise DDMError(f"{path}: router {kind!r}; accepted: learned, statistics (train a router with "
                       f"`ddmkit train-router {RunFolder(run).root}` and remove the file's 'router' field)")
    return kind


@dataclass(frozen=True, eq=False)
class NearestCluster:
    """x -> index (B,) of the nearest cluster centroid in the partition's feature space, among the
    `present` clusters (a (K,) bool mask) when given. In a latent run x is a latent, decoded by `codec`
    first: the partition's features are of the images."""

    features: Callable[[torch.Tensor], torch.Tensor]
    centroids: torch.Tensor  # (K, F)
    present: torch.Tensor | None = None
    codec: LatentCodec | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.codec is not None:
            x = self.codec.decode(x)
        d = torch.cdist(self.features(x.float()), self.centroids.to(x.device))
        if self.present is not None:
            d = d.masked_fill(~self.present.to(x.device), float("inf"))
        return d.argmin(1)

    def among(self, present: torch.Tensor) -> "NearestCluster":
        """The same map, among the clusters `present` (a (K,) bool mask) of those it answers already."""
        mask = present if self.present is None else present & self.present.to(present.device)
        return dataclasses.replace(self, present=mask)


def nearest_cluster_fn(manifest: dict, tensors: dict, codec: LatentCodec | None = None) -> NearestCluster:
    """The partition's nearest-cluster map (NearestCluster) over all its clusters."""
    return NearestCluster(feature_map(manifest, tensors), tensors["centroids"], codec=codec)


def run_folder(run) -> RunFolder:
    """The RunFolder of `run`, or a DDMError when there is no such folder, or when it is one model folder
    rather than a run folder (check_run_exists)."""
    folder = RunFolder(run)
    check_run_exists(folder.root)
    return folder


def unregistered_networks(folders: list[Path]) -> None:
    """Before any network is built: when the model folders name two or more network classes of the user's
    that this process has not registered, one DDMError naming them all with their config fields (one alone
    is named by ddmkit.nets.user_network as the network is built)."""
    missing = {}
    for path in folders:
        arch = model_config(path)["arch"] if (path / "config.json").is_file() else None
        if isinstance(arch, str) and is_user_network(arch) and arch not in user_networks():
            missing.setdefault(arch, "router.net.arch" if path.name == "router" else "expert.net.arch")
    if len(missing) > 1:
        names = " and ".join(f"{arch!r} ({field})" for arch, field in missing.items())
        sets = " ".join(f"--set {field}={arch}" for arch, field in missing.items())
        raise DDMError(f"the network classes {names} are not registered in this process: ddmkit imports your code "
                       "only from the config you run, never because a run or model folder names it. Pass the config "
                       f"that names them (--config CONFIG), or, where the command takes --set (sample, evaluate, "
                       f"...), name them with {sets}; from Python call ddmkit.nets.use_network(NAME) for each first")


def check_some_expert(folder: RunFolder, k: int) -> None:
    """A DDMError, naming how to train them, when none of the run's k experts is present (a run that holds only
    its partition): no DDM to sample."""
    if any((folder.expert(c) / "model.safetensors").exists() for c in range(k)):
        return
    raise DDMError(f"{folder.root}: no expert is present (experts/expert_XX/model.safetensors); train them "
                   f"with `ddmkit launch {folder.root}` (or `ddmkit run CONFIG --out {folder.root}`), one per "
                   f"shard with `ddmkit train-expert {folder.training_shards}/cluster_XX.safetensors --config "
                   f"{folder.config} --out {folder.experts}/expert_XX`, or copy them")


def learned_parts(run, device="cpu", exclude=(), allow_missing: bool = True, guidance: float = 1.0,
                  router_kind: str = "learned") -> tuple[dict, list[int]]:
    """(the DDM's fields by name, the experts that are absent). Experts whose folder is missing, and
    those in `exclude`, are absent (allow_missing=False refuses instead). router_kind "statistics"
    routes by the islands' published statistics instead of the learned router, as does "learned" in a
    run without a router folder whose RUN/grow.json records "statistics" (recorded_router)."""
    folder = run_folder(run)
    router_kind = "statistics" if router_kind == "stats" else router_kind  # add-expert's spelling of it
    if router_kind not in ("learned", "statistics"):
        raise DDMError(f"router: unknown kind {router_kind!r}; accepted: learned, statistics (or stats)")
    manifest, ptensors = load_partition_checked(folder.partition)
    if manifest.get("data_name") == "text":  # byte-level models, no velocity field
        raise DDMError(f"{folder.root} is a text run: its models draw bytes, not a DDM of velocity fields; sample it "
                       f"with `ddmkit sample {folder.root}` (in Python: ddmkit.pipeline.text.sample_text)")
    k, shape = manifest["k"], model_data_shape(folder.root)
    model_places(folder.root, k)  # a link that leads nowhere where a model folder goes is named, not taken as absent
    exclude = expert_indices(exclude, k, "exclude")
    gone = [c for c in range(k) if not (folder.expert(c) / "model.safetensors").exists()]
    absent = sorted(set(gone) | set(exclude))
    if gone and not allow_missing:
        raise DDMError(f"{folder.root}: experts {gone} are missing (no experts/expert_XX/model.safetensors"
                       f"{folder.missing_expert_hints(gone)})")
    if len(gone) == k:  # no expert present: named with how to train them
        check_some_expert(folder, k)
    if len(absent) == k:
        raise DDMError(f"exclude: {sorted(exclude)} leaves none of the run's experts "
                       f"{[c for c in range(k) if c not in gone]}; exclude fewer")
    if router_kind == "learned" and not (folder.router / "model.safetensors").exists() \
            and recorded_router(folder.root) == "statistics":
        router_kind = "statistics"  # grown with `ddmkit add-expert --router stats`: no learned router
    if not (folder.router / "model.safetensors").exists() and router_kind == "learned":
        raise DDMError(f"{folder.root}: no router (router/model.safetensors); run `ddmkit train-router {folder.root}` "
                       "first, or route by the islands' published statistics: router='statistics' in Python "
                       "(load_ddm, DDM.from_pretrained), `--router statistics` on the command line")
    if folder.registry.exists():
        verify_registry(folder.root, allow_missing, router_needed=router_kind != "statistics")
    else:
        warnings.warn(f"{folder.root} has no registry.json: its weights are loaded unchecked; `ddmkit register "
                      f"{folder.root}` records their SHA-256 (and `ddmkit verify` checks them)", stacklevel=3)
        shard_hash = partition_shard_hashes(folder.root, manifest)  # without hashes, still each slot's own expert
        for c in range(k):
            if c not in absent and (folder.expert(c) / "config.json").exists():
                trained_on = model_config(folder.expert(c)).get("shard_sha256")
                check_shard(f"experts/expert_{c:02d}", c, trained_on, shard_hash)
        if router_kind == "learned":
            check_trained_on_partition(folder.root, "router", "router", shard_hash)
    unregistered_networks([folder.expert(c) for c in range(k) if c not in absent]
                          + ([folder.router] if router_kind == "learned" else []))
    experts, configs = [], []
    for c in range(k):
        if c in absent:
            experts.append(None)
            continue
        field, cfg = load_velocity(folder.expert(c), shape, device, guidance)
        experts.append(field)
        configs.append(cfg)
    classes = int(configs[0]["kwargs"].get("num_classes", 0))
    codec = latent_codec(folder.root, device)
    parts = {"data_shape": shape, "codec": codec, "num_classes": classes, "device": torch.device(device),
             "prior": (torch.tensor(manifest["counts"], dtype=torch.float32) / sum(manifest["counts"])).to(device),
             "label_prior": label_prior(shard_label_counts(folder.root, classes)).to(device) if classes else None,
             "nearest": nearest_cluster_fn(manifest, {n: v.to(device) for n, v in ptensors.items()}, codec=codec),
             "meta": {"kind": "learned", "router": router_kind, "missing_experts": [], "expert_configs": configs}}
    if router_kind == "statistics":
        route, conditional = island_stats_router(folder.root, classes, device=device)
        parts.update(router=route, router_conditional=conditional, router_capturable=False)
    else:
        model, rcfg = load_model(folder.router, device)
        check_router(folder, rcfg, k, shape)
        classes_routed = int(rcfg["kwargs"].get("num_classes", 0))
        parts.update(router=router_field(model, rcfg), router_conditional=bool(classes_routed),
                     router_classes=classes_routed)
        parts["meta"]["router_config"] = rcfg
    parts["experts"] = experts
    missing = [c for c in gone if c not in exclude]  # left out on purpose: no warning
    if missing:
        warn_missing(missing, k, folder.missing_expert_hints(missing))
    return parts, absent


def monolith_field(run, device="cpu", guidance: float = 1.0) -> NetworkField:
    """The monolith's velocity field (run `ddmkit train-monolith RUN` to make it)."""
    folder = RunFolder(run)
    safe_join(folder.root, "monolith")  # a link that leads nowhere there is named, not taken for no monolith
    if not (folder.monolith / "model.safetensors").exists():
        raise DDMError(f"{folder.root}: no monolith (monolith/model.safetensors); run "
                       f"`ddmkit train-monolith {folder.root}` first")
    if folder.registry.exists():
        verify_registry(folder.root)  # as the DDM's folders are: listed, with the recorded hashes
    return load_velocity(folder.monolith, model_data_shape(folder.root), device, guidance)[0]


def load_velocity(folder: Path, shape: tuple, device="cpu", guidance: float = 1.0) -> tuple[NetworkField, dict]:
    """(field, config) of a velocity network's model folder (an expert, the monolith): config and weights
    checked (load_model), its data shape against the run's, its path and prediction (a DDMError naming the
    folder)."""
    model, cfg = load_model(folder, device)
    check_shape(folder, cfg, shape)
    try:
        return velocity_field(model, cfg, guidance), cfg
    except DDMError as e:
        raise DDMError(f"{folder}: {e}") from None


def latent_codec(run, device="cpu") -> LatentCodec | None:
    """The autoencoder of a latent run (None for other runs), checked against latents/latents.json."""
    folder = RunFolder(run)
    if not folder.is_latent:
        return None
    info = latent_info(run)  # checks the autoencoder's SHA-256
    return load_codec(folder.autoencoder, info["data_shape"][0], device=device, run_copy=True)


def records_truth(folder: RunFolder) -> bool:
    """Whether RUN/data/data.json records an exact truth (data/truth.safetensors belongs with the data)."""
    info = read_json(folder.data_info) if folder.data_info.exists() else {}
    return isinstance(info, dict) and bool(info.get("exact_truth"))


def load_truth(run) -> GaussianMixture | None:
    """The exact mixture stored with a run's data, or None (data without one). A run whose data.json
    records an exact truth but whose truth.safetensors is gone is a DDMError: its exact-truth scores
    would be dropped silently."""
    folder = RunFolder(run)
    path = folder.truth
    if not path.exists():
        if records_truth(folder):
            raise DDMError(f"{path} is missing, but {folder.data_info} records an exact truth; make it again with "
                           f"`ddmkit partition --out {folder.root} --config {folder.config}` (the run's own "
                           "config: the same data are made again), or copy the run's data/ folder back")
        return None
    t = load_data_file(folder.root, path)  # checked against data.json's SHA-256
    return GaussianMixture(t["weights"], t["means"], t["eigvals"], t["eigvecs"])


def component_groups(component_labels: torch.Tensor, clusters: torch.Tensor, n_components: int,
                     k: int) -> list[list[int]]:
    """Assign every mixture component to the cluster holding most of its samples."""
    counts = torch.zeros(n_components, k, dtype=torch.long)
    counts.index_put_((component_labels, clusters), torch.ones_like(clusters), accumulate=True)
    owner = counts.argmax(1)
    return [(owner == c).nonzero().flatten().tolist() for c in range(k)]


def exact_parts(run) -> dict:
    """Exact experts and router from the Gaussian-mixture truth, grouped by the partition.

    Each cluster's exact expert is the velocity of the sub-mixture of the components it owns;
    the exact router is the posterior of those groups."""
    folder = run_folder(run)
    manifest, ptensors = load_partition_checked(folder.partition)
    truth = load_truth(folder.root)
    if truth is None:
        raise DDMError(f"{folder.root}: the data set has no closed-form truth; exact experts need a Gaussian mixture")
    train = load_data_file(folder.root, folder.split("train"), ["labels"])
    groups = component_groups(train["labels"], ptensors["assignments"], truth.k, manifest["k"])
    if any(len(g) == 0 for g in groups):
        empty = [c for c, g in enumerate(groups) if not g]
        raise DDMError(f"{folder.root}: clusters {empty} own no mixture component, so they have no exact expert")
    subs = [truth.subset(g) for g in groups]
    member = torch.zeros(truth.k, manifest["k"], dtype=truth.means.dtype)
    for c, g in enumerate(groups):
        member[g, c] = 1.0

    def expert(sub):  # on the device of x, as every field of the DDM
        on = follows_device(sub)
        return lambda x, t: on(x.device).velocity(x.double().reshape(len(x), -1), t.double()).to(x.dtype).reshape(
            x.shape)

    truth_on, members = follows_device(truth), {member.device: member}

    def router(x, t):
        if x.device not in members:
            members[x.device] = member.to(x.device)
        return (truth_on(x.device).posterior(x.double().reshape(len(x), -1), t.double()) @ members[x.device]).to(
            x.dtype)

    return {"experts": [expert(s) for s in subs], "router": router, "prior": (truth.weights @ member).float(),
            "data_shape": tuple(manifest["data_shape"]), "nearest": nearest_cluster_fn(manifest, ptensors),
            "meta": {"kind": "exact", "groups": groups}}
