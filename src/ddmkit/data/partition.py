"""Partition a data set into K clusters and write one shard per cluster.

    partition_data(train, k, out_dir, features="identity", balanced=False, seed=0)

k-means (scikit-learn) on the features; `balanced=True` then re-assigns with
a capacity of ceil(N / K) per cluster (points with the clearest preference
first), a simple balanced k-means. Output folder:

    manifest.json            counts, shard paths and SHA-256s, data hash, seed, feature spec
    partition.safetensors    centroids (feature space), per-cluster mean and covariance (data space),
                             feature-map tensors
    shards/cluster_XX.safetensors   x (and labels) of one cluster: all an expert job ever reads
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from ddmkit.conventions import TIME_CONVENTION, __version__
from ddmkit.data.arrays import ArrayData, check_finite, content_hash
from ddmkit.data.features import apply_features, fit_features
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors, read_json, read_metadata, save_tensors, sha256_file, staging_dir, write_json

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


def cluster(features: torch.Tensor, k: int, balanced: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), centroids (K, F)) by k-means, optionally balanced."""
    f = features.double().numpy()
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(f)
    labels, centroids = km.labels_.astype(np.int64), km.cluster_centers_
    if balanced:
        dist = ((f[:, None, :] - centroids[None]) ** 2).sum(-1)
        labels = balanced_assign(dist)
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


def partition_data(train: ArrayData, k: int, out_dir: str | Path, features: str = "identity",
                   pca_dim: int | None = None, balanced: bool = False, seed: int = 0) -> dict:
    """Cluster `train` into k shards under out_dir; returns the manifest."""
    if k < 1:
        raise DDMError(f"partition.k must be >= 1, got {k}")
    if k > len(train):
        raise DDMError(f"partition.k = {k} is larger than the number of samples ({len(train)}); "
                       "lower k or use more data")
    check_finite(train.x, f"data set {train.name!r}")
    spec, feat_tensors = fit_features(features, train.x, pca_dim, seed)
    feats = apply_features(spec, feat_tensors, train.x)
    labels_np, centroids = cluster(feats, k, balanced, seed)
    labels = torch.as_tensor(labels_np)
    counts = torch.bincount(labels, minlength=k)
    if (counts == 0).any():
        empty = (counts == 0).nonzero().flatten().tolist()
        raise DDMError(f"partition: clusters {empty} are empty; lower partition.k or use features that "
                       "separate the data (e.g. partition.features = 'pca')")
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
            "centroids": torch.as_tensor(centroids, dtype=torch.float32),
            "assignments": labels, **cluster_statistics(train.x, labels, k), **feat_tensors})
        manifest = {"k": k, "counts": counts.tolist(), "shards": shards, "data_hash": data_hash,
                    "data_name": train.name, "data_shape": list(train.data_shape), "n": len(train),
                    "features": spec, "balanced": balanced, "seed": seed,
                    "ddmkit_version": __version__, "time_convention": TIME_CONVENTION}
        write_json(tmp / "manifest.json", manifest)
    return manifest


def load_partition(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a partition folder."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    for key in ("k", "shards", "features", "data_shape"):
        if key not in manifest:
            raise DDMError(f"{folder / 'manifest.json'}: missing field {key!r}; re-run `ddmkit partition`")
    return manifest, load_tensors(folder / "partition.safetensors")


def read_shard(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(x, labels or None, metadata) of one shard file."""
    tensors = load_tensors(path)
    meta = read_metadata(path)
    if "x" not in tensors:
        raise DDMError(f"{path}: not a ddmkit shard (no 'x' tensor)")
    return tensors["x"], tensors.get("labels"), meta


def feature_map(manifest: dict, tensors: dict):
    """The partition's feature map as a function x -> (N, F)."""
    return lambda x: apply_features(manifest["features"], tensors, x)
