"""Partition a data set into K clusters and write one shard per cluster.

    partition_data(train, k, out_dir, features="identity", balanced=False, seed=0)
    plan = compute_partition(train, k, ...); write_partition(plan, train, out_dir)   # the same, in two steps

k-means (scikit-learn) on the features; `balanced=True` then re-assigns with
a capacity of ceil(N / K) per cluster (points with the clearest preference
first), a simple balanced k-means; it warns when the cap splits copies of one
point over several clusters. With `fine_k = M` (> 0) the clustering has
two stages, as in the Decentralized Diffusion Models paper: k-means with M
centroids on the points, then k-means of the M fine centroids into K, each
weighted by its number of points; its K centroids are the partition's, and every
point joins its nearest one, so nearest-centroid routing sends each training
point to its own cluster, as with one k-means. With both, the balanced step
re-assigns the points to the K coarse centroids.
Everything that can fail is found by
compute_partition, in memory, before write_partition writes anything. Output folder:

    manifest.json            counts, shard paths and SHA-256s, data hash, seed, feature spec
    partition.safetensors    centroids (feature space), per-cluster mean and covariance (data space),
                             feature-map tensors
    shards/cluster_XX.safetensors   x (and labels) of one cluster: all an expert job ever reads

`load_partition` reads a folder back as untrusted input: the manifest is validated by
schema (PartitionManifest: counts >= 1, a closed set of feature kinds, consistent k)
and every tensor is checked (shapes against the manifest, finite values).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ddmkit.config import FEATURES, validate
from ddmkit.conventions import TIME_CONVENTION, __version__
from ddmkit.data.arrays import ArrayData, check_finite, content_hash
from ddmkit.data.features import CLUSTER_THREADS, apply_features, fit_features
from ddmkit.errors import DDMError
from ddmkit.io import (check_finite_tensors, load_tensors, read_json, read_metadata, save_tensors, sha256_file,
                       staging_dir, write_json)
from ddmkit.layout import RunFolder, enclosing_run, is_run_folder, remake_partition

MAX_FULL_COV_DIM = 256


def shard_name(k: int) -> str:
    return f"shards/cluster_{k:02d}.safetensors"


def balanced_assign(dist: np.ndarray) -> np.ndarray:
    """Assign rows of a (N, K) distance matrix to columns with at most
    ceil(N / K) rows each; rows with the largest gap between their best and
    second-best column choose first."""
    n, k = dist.shape
    cap = math.ceil(n / k)
    order = np.argsort(dist, axis=1)
    gap = dist[np.arange(n), order[:, 1]] - dist[np.arange(n), order[:, 0]] if k > 1 else np.zeros(n)
    counts = np.zeros(k, dtype=int)
    labels = np.empty(n, dtype=np.int64)
    for i in np.argsort(-gap, kind="stable"):
        for c in order[i]:
            if counts[c] < cap:
                labels[i] = c
                counts[c] += 1
                break
    return labels


DISTANCE_CHUNK_BYTES = 2**26  # squared_distances holds at most this much of (rows, K, F) differences at once


def squared_distances(f: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, K) squared distances sum_j (f_ij - c_kj)^2, in row chunks of at most DISTANCE_CHUNK_BYTES of
    differences, never the whole (N, K, F) array (3.7 GiB for 60 000 images of 32 x 32 and K = 8); each
    chunk's arithmetic is the whole array's, so the values are the same bits."""
    n, k = len(f), len(centroids)
    rows = max(1, DISTANCE_CHUNK_BYTES // max(1, k * f.shape[1] * f.itemsize))
    dist = np.empty((n, k), dtype=np.result_type(f, centroids))
    for i in range(0, n, rows):
        dist[i:i + rows] = ((f[i:i + rows, None, :] - centroids[None]) ** 2).sum(-1)
    return dist


def warn_split_copies(f: np.ndarray, dist: np.ndarray, labels: np.ndarray) -> None:
    """Warn when the balanced step put copies of one point (identical feature rows) in several clusters: the
    cap cuts a group of copies that all prefer the same cluster. Copies have identical rows of distances
    (squared_distances computes each row alike), so rows are grouped by those K numbers, then compared."""
    n, k = dist.shape
    keys = np.ascontiguousarray(dist).view(np.dtype((np.void, k * dist.itemsize))).ravel()
    _, group = np.unique(keys, return_inverse=True)
    group = group.ravel()
    pairs = np.unique(group * k + labels)  # each (group, cluster) once
    split = np.flatnonzero(np.bincount(pairs // k) > 1)
    copies = [rows for g in split for rows in [np.flatnonzero(group == g)] if (f[rows] == f[rows[0]]).all()]
    if copies:
        count = sum(len(rows) for rows in copies)
        warnings.warn(f"partition.balanced: {len(copies)} group(s) of identical points ({count} points) are split "
                      f"over several clusters, cut by the cap of ceil(N / K) = {math.ceil(n / k)} points per "
                      "cluster: copies of one point sit in different shards, and `nearest` routing sends them all "
                      "to one expert. Remove duplicate rows from the data, or set partition.balanced = false to "
                      "keep copies together", UserWarning, stacklevel=2)


MINIBATCH_WORK = 50_000_000  # fine k-means runs mini-batch when N * M exceeds this


def two_stage_kmeans(f: np.ndarray, k: int, fine_k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), centroids (K, F)): k-means with fine_k centroids, then a count-weighted k-means of
    those centroids into k, whose centroids are the coarse ones; point i joins its nearest coarse centroid,
    so nearest-centroid routing sends every training point to its own cluster. (Taking the coarse cluster
    of the point's fine centroid instead left up to 40% of the points nearer another coarse centroid.)"""
    from sklearn.cluster import KMeans, MiniBatchKMeans  # imported on first use: commands that never cluster start faster

    if len(f) * fine_k > MINIBATCH_WORK:
        fine = MiniBatchKMeans(n_clusters=fine_k, batch_size=4096, n_init=1, random_state=seed).fit(f)
    else:
        fine = KMeans(n_clusters=fine_k, n_init=1, random_state=seed).fit(f)
    counts = np.bincount(fine.labels_, minlength=fine_k).astype(np.float64)
    coarse = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(fine.cluster_centers_, sample_weight=counts)
    centroids = coarse.cluster_centers_
    return squared_distances(f, centroids).argmin(1).astype(np.int64), centroids


def cluster(features: torch.Tensor, k: int, balanced: bool, seed: int,
            fine_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), centroids (K, F)) by k-means (two-stage when fine_k > 0), optionally balanced, on
    CLUSTER_THREADS threads: scikit-learn's k-means adds up each thread's partial sums, so their float
    rounding (and with it, at a near tie, a label) would otherwise depend on the machine's core count."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    f = features.double().numpy()
    with threadpool_limits(limits=CLUSTER_THREADS):
        if fine_k:
            labels, centroids = two_stage_kmeans(f, k, fine_k, seed)
        else:
            km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(f)
            labels, centroids = km.labels_.astype(np.int64), km.cluster_centers_
        if balanced:
            dist = squared_distances(f, centroids)
            labels = balanced_assign(dist)
            warn_split_copies(f, dist, labels)
            centroids = np.stack([f[labels == c].mean(0) for c in range(k)])
    return labels, centroids


def cluster_statistics(x: torch.Tensor, labels: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per-cluster mean (K, D) and covariance (K, D, D), or variances (K, D)
    when D > MAX_FULL_COV_DIM, in data space (flattened)."""
    flat = x.reshape(len(x), -1).double()
    means, covs = [], []
    for c in range(k):
        xc = flat[labels == c]
        mu = xc.mean(0)
        d = xc - mu
        means.append(mu)
        if flat.shape[1] <= MAX_FULL_COV_DIM:
            covs.append(d.T @ d / max(len(xc) - 1, 1))
        else:
            covs.append((d**2).sum(0) / max(len(xc) - 1, 1))
    key = "cluster_covs" if flat.shape[1] <= MAX_FULL_COV_DIM else "cluster_vars"
    return {"cluster_means": torch.stack(means).float(), key: torch.stack(covs).float(),
            "cluster_counts": torch.bincount(labels, minlength=k).float()}


@dataclass
class PartitionPlan:
    """A partition computed in memory (nothing written yet)."""

    k: int
    labels: torch.Tensor       # (N,) cluster of every training row
    centroids: np.ndarray      # (K, F) in feature space
    counts: torch.Tensor       # (K,)
    spec: dict                 # the feature map's description
    feat_tensors: dict         # the feature map's tensors
    balanced: bool
    seed: int
    fine_k: int = 0


def check_fine_k(fine_k: int, k: int, n: int) -> None:
    """Two-stage k-means needs k <= fine_k <= n (0: one k-means)."""
    if fine_k and not k <= fine_k <= n:
        hint = max(k, min(n, 16 * k))
        raise DDMError(f"partition.fine_k = {fine_k} must lie between partition.k = {k} and the number of training "
                       f"samples ({n}); e.g. partition.fine_k = {hint}, or 0 for one k-means")


def compute_partition(train: ArrayData, k: int, features: str = "identity", pca_dim: int | None = None,
                      balanced: bool = False, seed: int = 0, fine_k: int = 0, encoder: dict | None = None,
                      encoder_batch: int = 256) -> PartitionPlan:
    """Cluster `train` into k clusters in memory; every bad input is a DDMError here. `fine_k` > 0
    clusters in two stages; `encoder` holds the settings of features = "encoder" ({"folder",
    "pool", "size", "normalize"}, see ddmkit.data.encoder), run in batches of `encoder_batch`."""
    if k < 1:
        raise DDMError(f"partition.k must be >= 1, got {k}")
    if len(train) == 0:
        raise DDMError(f"data set {train.name!r} is empty; give it samples")
    if k > len(train):
        raise DDMError(f"partition.k = {k} is larger than the number of samples ({len(train)}); "
                       "lower k or use more data")
    check_fine_k(fine_k, k, len(train))
    check_finite(train.x, f"data set {train.name!r}")
    spec, feat_tensors = fit_features(features, train.x, pca_dim, seed, encoder)
    feats = apply_features(spec, feat_tensors, train.x, "partition.features", encoder_batch)
    labels_np, centroids = cluster(feats, k, balanced, seed, fine_k)
    labels = torch.as_tensor(labels_np)
    counts = torch.bincount(labels, minlength=k)
    if (counts == 0).any():
        empty = (counts == 0).nonzero().flatten().tolist()
        raise DDMError(f"partition: clusters {empty} are empty; lower partition.k or use features that "
                       "separate the data (e.g. partition.features = 'pca')")
    if not np.isfinite(centroids).all():
        raise DDMError("partition: k-means gave non-finite centroids; check the features (partition.features)")
    return PartitionPlan(k, labels, centroids, counts, spec, feat_tensors, balanced, seed, fine_k)


def write_partition(plan: PartitionPlan, train: ArrayData, out_dir: str | Path) -> dict:
    """Write a computed partition's shards, tensors and manifest (one staged folder); returns the manifest."""
    k, labels, counts = plan.k, plan.labels, plan.counts
    data_hash = content_hash(train.x)
    with staging_dir(out_dir) as tmp:
        shards = []
        for c in range(k):
            idx = (labels == c).nonzero().flatten()
            tensors = {"x": train.x[idx].contiguous()}
            if train.labels is not None:
                tensors["labels"] = train.labels[idx].contiguous()
            save_tensors(tmp / shard_name(c), tensors, metadata={"cluster": c, "k": k, "data_hash": data_hash})
            shards.append({"cluster": c, "path": shard_name(c), "count": int(counts[c]),
                           "sha256": sha256_file(tmp / shard_name(c))})
        save_tensors(tmp / "partition.safetensors", {
            "centroids": torch.as_tensor(plan.centroids, dtype=torch.float32),
            "assignments": labels, **cluster_statistics(train.x, labels, k), **plan.feat_tensors})
        manifest = {"k": k, "counts": counts.tolist(), "shards": shards, "data_hash": data_hash,
                    "data_name": train.name, "data_shape": list(train.data_shape), "n": len(train),
                    "features": plan.spec, "balanced": plan.balanced, "seed": plan.seed, "fine_k": plan.fine_k,
                    "ddmkit_version": __version__, "time_convention": TIME_CONVENTION}
        write_manifest(tmp, manifest)
    return manifest


TENSORS_HASH = "tensors_sha256"  # the manifest's record of partition.safetensors


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write a partition's manifest.json beside its partition.safetensors, recording that file's SHA-256
    (load_partition checks it: the centroids route `nearest`, the statistics describe the clusters)."""
    manifest[TENSORS_HASH] = sha256_file(folder / "partition.safetensors")
    write_json(folder / "manifest.json", manifest)


def partition_data(train: ArrayData, k: int, out_dir: str | Path, features: str = "identity",
                   pca_dim: int | None = None, balanced: bool = False, seed: int = 0, **options) -> dict:
    """Cluster `train` into k shards under out_dir; returns the manifest. `options`: fine_k, encoder,
    encoder_batch of compute_partition."""
    plan = compute_partition(train, k, features, pca_dim, balanced, seed, **options)
    return write_partition(plan, train, out_dir)


# ----- reading a partition back (untrusted input) ------------------------------------------
class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class IdentityFeatures(_Loose):
    kind: Literal["identity"]


class PcaFeatures(_Loose):
    kind: Literal["pca"]
    dim: int = Field(ge=1, le=100_000)


class FunctionFeatures(_Loose):
    """A user function, recorded by name only: never imported from the file."""
    kind: Literal["function"]
    function: str = Field(pattern=FEATURES.pattern)


class EncoderFeatures(_Loose):
    """A saved transformers vision model, loaded again with transformers' own classes only."""
    kind: Literal["encoder"]
    folder: str = Field(min_length=1, max_length=4096)
    pool: Literal["cls", "mean"]
    size: int = Field(ge=1, le=16_384)
    normalize: bool
    model_type: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    cls_output: Literal["image_embeds", "pooler_output", "first_token"] | None = None  # pool "cls" only

    @field_validator("folder")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not Path(v).is_absolute():
            raise ValueError(f"{v!r} is not an absolute path")
        return v


class TextFeatures(_Loose):
    """Text partitions (ddmkit.discrete): the TF-IDF settings, a record."""
    kind: Literal["tfidf_char_ngrams"]


FeatureSpec = Annotated[Union[IdentityFeatures, PcaFeatures, FunctionFeatures, EncoderFeatures, TextFeatures],
                        Field(discriminator="kind")]
Count = Annotated[int, Field(ge=1, le=10**12)]


class ShardEntry(_Loose):
    cluster: int = Field(ge=0, le=100_000)
    path: str = Field(min_length=1, max_length=1000)
    count: Count
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PartitionManifest(_Loose):
    k: int = Field(ge=1, le=100_000)
    counts: list[Count]
    shards: list[ShardEntry]
    features: FeatureSpec
    data_shape: list[Annotated[int, Field(ge=1, le=10**6)]] = Field(max_length=8)  # [] for text (byte streams)
    data_hash: str | None = None


def check_manifest(raw: Any, source: str | Path) -> dict:
    """A partition manifest validated by schema and for consistency; returns it as read."""
    m = validate(PartitionManifest, raw, str(source), "partition manifest")
    if len(m.shards) != m.k or len(m.counts) != m.k or sorted(s.cluster for s in m.shards) != list(range(m.k)):
        raise DDMError(f"{source}: k = {m.k} but the manifest lists {len(m.shards)} shards and {len(m.counts)} "
                       "counts (clusters 0 .. k-1 each once are expected); re-run `ddmkit partition`")
    for s in m.shards:
        if s.count != m.counts[s.cluster]:
            raise DDMError(f"{source}: shards[{s.cluster}].count = {s.count} but counts[{s.cluster}] = "
                           f"{m.counts[s.cluster]}; re-run `ddmkit partition`")
    return raw


def check_partition_tensors(manifest: dict, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """The partition's tensors against its manifest: centroids (K, F), the feature map's tensors, all finite."""
    k, spec = manifest["k"], manifest["features"]
    c = tensors.get("centroids")
    if c is None or c.ndim != 2 or c.shape[0] != k or not c.is_floating_point() or c.shape[1] < 1:
        raise DDMError(f"{source}: 'centroids' must be a float (k, F) = ({k}, F) tensor, got "
                       f"{None if c is None else (str(c.dtype), tuple(c.shape))}; re-run `ddmkit partition`")
    check_finite_tensors(tensors, source)
    dim = math.prod(manifest["data_shape"]) if manifest["data_shape"] else None
    want = {"identity": dim, "pca": spec.get("dim")}.get(spec["kind"])
    if want is not None and c.shape[1] != want:
        raise DDMError(f"{source}: centroids have {c.shape[1]} features but the {spec['kind']} map gives {want}; "
                       "re-run `ddmkit partition`")
    if spec["kind"] == "pca":
        mean, comp = tensors.get("pca_mean"), tensors.get("pca_components")
        if (mean is None or comp is None or mean.ndim != 1 or comp.shape != (spec["dim"], mean.shape[0])
                or (dim is not None and mean.shape[0] != dim)):
            raise DDMError(f"{source}: the PCA map's tensors pca_mean (D,) and pca_components (dim, D) are "
                           "missing or of the wrong shape; re-run `ddmkit partition`")


def load_partition(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a partition folder, both checked (check_manifest, partition_tensors)."""
    folder = Path(folder)
    manifest = check_manifest(read_json(folder / "manifest.json"), folder / "manifest.json")
    return manifest, partition_tensors(folder, manifest)


def partition_tensors(folder: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The tensors of a partition folder whose manifest (checked) is `manifest`: partition.safetensors, its
    SHA-256 checked against the one the manifest records and its tensors against the manifest
    (check_partition_tensors)."""
    recorded = manifest.get(TENSORS_HASH)  # manifests of ddmkit before it recorded one: unchecked
    run = RunFolder(folder.parent)  # missing, damaged or changed: one fix, a damaged shard's (remake_partition)
    fix = f"delete {folder} and run `ddmkit run CONFIG --out {run.root}` (it partitions the same data again, to the " \
          "same bytes; experts trained on other shards are then refused)"
    if folder.name == "partition" and is_run_folder(run.root):
        fix = remake_partition(run)
    if not run.grow.exists():  # a grown run's fix is this one
        fix = f"copy the run's partition/ folder back whole, or {fix}"
    if recorded is not None and (folder / "partition.safetensors").is_file() and \
            sha256_file(folder / "partition.safetensors") != recorded:
        raise DDMError(f"{folder / 'partition.safetensors'}: SHA-256 differs from the one manifest.json records; "
                       f"the file was changed after partitioning (its centroids route `nearest`). {fix[0].upper()}"
                       f"{fix[1:]}")
    tensors = load_tensors(folder / "partition.safetensors", fix=fix)
    check_partition_tensors(manifest, tensors, folder / "partition.safetensors")
    return tensors


SHARD_FIX = "copy the shard again, whole, from its run's partition/shards/ (a latent run's: latents/)"


def _what_file(path: Path) -> str | None:
    """What a file given as a shard is when it is plainly not one: JSON or TOML text (a config, a manifest), or a
    file without the .safetensors suffix; None for a .safetensors file that may be a (damaged) shard."""
    import json
    import tomllib

    data = path.read_bytes() if path.stat().st_size <= 1 << 20 else b"\0"  # a config is small; a shard is binary
    names = {"config.json": "a run's config", "manifest.json": "a partition's manifest",
             "latents.json": "a latent run's manifest"}
    try:
        text = "" if b"\0" in data else data.decode()
    except UnicodeDecodeError:  # binary
        text = ""
    if text.strip():
        for parse, kind, other in ((json.loads, "JSON", "a config or a manifest"), (tomllib.loads, "TOML", "a config")):
            try:
                parse(text)
            except ValueError:
                continue
            return f"{names.get(path.name, other)} ({kind} text), given where a shard goes"
    if path.suffix != ".safetensors":
        return f"not a shard file (a shard is a .safetensors file, this is a {path.suffix or 'suffix-less'} file)"
    return None


def _shard_example(folder: Path) -> Path:
    """A shard to name to one who gave `folder` as SHARD: the first shard of the run the folder is (or lies in),
    spelt from `folder` where it lies inside it; else folder/cluster_00.safetensors (a shards folder)."""
    run = folder if is_run_folder(folder) else enclosing_run(folder)
    if run is None:
        return folder / "cluster_00.safetensors"
    shard = RunFolder(run).training_shard(0)
    try:
        return folder / shard.resolve().relative_to(folder.resolve())
    except ValueError:  # the run's shards are not inside the folder (RUN/data, an expert folder)
        return shard


def check_given_shard(shard: str | Path) -> None:
    """A file given as SHARD to `ddmkit train-expert` that is plainly no shard (a run's config.json, a TOML, a
    manifest, a file without the .safetensors suffix) is a DDMError showing the command's right form, not a
    shard called corrupt, to be copied again; so is a folder, naming a shard of it (or of the run it is in)."""
    path = Path(shard)
    if path.is_dir():
        example = _shard_example(path)
        where = " in it" if example.is_relative_to(path) else ""
        raise DDMError(f"shard {path} is a folder; give one shard file{where}, e.g. {example}")
    what = _what_file(path) if path.is_file() else None
    if what is None:
        return
    run = next((p for p in (path.parent, path.parent.parent) if is_run_folder(p)), None)  # RUN/config.json, ...
    r = RunFolder(run if run is not None else Path("RUN"))
    raise DDMError(f"shard {path} is {what}; the shard goes first, the config to --config: `ddmkit train-expert "
                   f"{r.training_shard(0)} --config {r.config} --out {r.expert(0)}`")


def read_shard(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(x, labels or None, metadata) of one shard file."""
    tensors = load_tensors(path, fix=SHARD_FIX)
    meta = read_metadata(path)
    if "x" not in tensors:
        raise DDMError(f"{path}: not a ddmkit shard (no 'x' tensor)")
    x = tensors["x"]
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        rows = (~torch.isfinite(x)).reshape(len(x), -1).any(1).nonzero().flatten()[:5].tolist()
        raise DDMError(f"{path}: its rows hold NaN or infinite values (first bad rows: {rows}); the shard was damaged "
                       "after it was written: copy the original back, or partition again")
    return x, tensors.get("labels"), meta


def shard_cluster(path: str | Path, meta: dict) -> int:
    """The cluster a shard's metadata `meta` names; a DDMError for a file whose metadata names none (not a
    partition shard, or one re-saved without its metadata)."""
    if "cluster" not in meta:
        raise DDMError(f"{path} is not a cluster's shard (its metadata names no cluster); give a file of "
                       "RUN/partition/shards/ (`ddmkit partition` writes them)")
    return int(meta["cluster"])


def feature_map(manifest: dict, tensors: dict, what: str = "nearest-centroid routing"):
    """The partition's feature map as a function x -> (N, F). A user function's map works only where
    the user's config registered it in this process (ddmkit.data.features.use_features); otherwise
    calling the map is a DDMError naming `what` needs it. Nothing is imported here."""
    spec = manifest["features"]
    return lambda x: apply_features(spec, tensors, x, what)
