"""Partition a text corpus into K clusters of documents and write one shard
per cluster, in the same folder layout as vector data (ddmkit.data.partition):

    manifest.json                  k, counts, shard paths and SHA-256s, data hash, feature spec
    partition.safetensors          centroids (feature space), assignments of the training documents
    shards/cluster_XX.safetensors  x: the cluster's training documents as one byte stream (uint8),
                                   each followed by a blank line ("\n\n"): all an expert job ever reads
    test/cluster_XX.safetensors    the same for held-out documents (assigned to the nearest centroid)

Each shard's metadata names its cluster and its split ("train" or "test"). Byte counts (the
manifest's "bytes", the cluster prior) count the stream: the documents and their separators;
a cluster without documents has an empty stream.

Models see fixed-length windows of a stream; `sample_windows` draws them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ddmkit.conventions import __version__
from ddmkit.data.partition import cluster, read_shard, shard_name, write_manifest
from ddmkit.discrete.corpus import Document
from ddmkit.discrete.features import sklearn_seed, tfidf_features
from ddmkit.errors import DDMError
from ddmkit.io import read_json, save_tensors, sha256_file, staging_dir

SEPARATOR = b"\n\n"


def test_name(k: int) -> str:
    return f"test/cluster_{k:02d}.safetensors"


def stream(docs: list[Document]) -> torch.Tensor:
    """Each document followed by a blank line, as a (n_bytes,) uint8 tensor (empty without documents)."""
    data = b"".join(d.text + SEPARATOR for d in docs)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cdist(features.double(), centroids.double()).argmin(1)


def partition_text(train: list[Document], test: list[Document], cfg, out_dir: str | Path,
                   extra: dict | None = None) -> dict:
    """Cluster training documents by TF-IDF features (cfg: TextPartitionConfig),
    assign test documents to the nearest centroid, write the shards; returns the manifest."""
    if cfg.k > len(train):
        raise DDMError(f"partition.k = {cfg.k} is larger than the number of training documents ({len(train)}); "
                       "lower partition.k or use more documents")
    distinct = len({d.text for d in train})
    if cfg.k > distinct:  # copies share their features: k-means would leave clusters empty
        raise DDMError(f"partition.k = {cfg.k} is larger than the number of distinct training documents ({distinct} "
                       f"of {len(train)}; the others are copies); lower partition.k or use more, different text")
    f_train, f_test, spec = tfidf_features(train, test, cfg)
    labels_np, centroids_np = cluster(f_train, cfg.k, cfg.balanced, sklearn_seed(cfg.seed))
    labels, centroids = torch.as_tensor(labels_np), torch.as_tensor(centroids_np)
    test_labels = nearest_centroid(f_test, centroids)
    counts = torch.bincount(labels, minlength=cfg.k)
    if (counts == 0).any():
        raise DDMError(f"partition: clusters {(counts == 0).nonzero().flatten().tolist()} are empty; "
                       "lower partition.k")
    data_hash = hashlib.sha256(b"".join(hashlib.sha256(d.text).digest() for d in train)).hexdigest()
    with staging_dir(out_dir) as tmp:
        shards, tests = [], []
        for c in range(cfg.k):
            docs = [d for d, l in zip(train, labels.tolist()) if l == c]
            held = [d for d, l in zip(test, test_labels.tolist()) if l == c]
            for split, rel, part, rows in (("train", shard_name(c), docs, shards), ("test", test_name(c), held, tests)):
                x = stream(part)
                save_tensors(tmp / rel, {"x": x}, metadata={"cluster": str(c), "k": str(cfg.k), "split": split,
                                                            "data_hash": data_hash})
                rows.append({"cluster": c, "path": rel, "count": len(part), "bytes": len(x),
                             "sha256": sha256_file(tmp / rel), "examples": [d.name for d in part[:5]]})
        save_tensors(tmp / "partition.safetensors", {"centroids": centroids.float(), "assignments": labels})
        manifest = {"k": cfg.k, "counts": counts.tolist(), "shards": shards, "test_shards": tests,
                    "data_hash": data_hash, "data_name": "text", "data_shape": [], "n": len(train),
                    "n_test": len(test), "features": spec, "balanced": cfg.balanced, "seed": cfg.seed,
                    "ddmkit_version": __version__, **(extra or {})}
        write_manifest(tmp, manifest)
    return manifest


def load_streams(folder: str | Path, split: str = "train",
                 fix: str = "partition again in a new run folder") -> tuple[dict, list[torch.Tensor]]:
    """(manifest, one uint8 stream per cluster) of a text partition folder, each shard checked against the
    SHA-256 the manifest records (a shard changed since it was written is a DDMError naming it and, after
    copying the original back, `fix`)."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    key = "shards" if split == "train" else "test_shards"
    if key not in manifest:
        raise DDMError(f"{folder / 'manifest.json'}: no {key!r}; this is not a text partition")
    for s in manifest[key]:
        if s.get("sha256") is not None and sha256_file(folder / s["path"]) != s["sha256"]:
            raise DDMError(f"{folder / s['path']}: SHA-256 differs from the one {folder / 'manifest.json'} records; "
                           f"the shard was changed or replaced after it was written. Copy the original back, or {fix}")
    return manifest, [read_shard(folder / s["path"])[0] for s in manifest[key]]


def sample_windows(x: torch.Tensor, length: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` windows of `length` bytes at uniform offsets of the stream x: (batch, length) int64."""
    if len(x) < length:
        raise DDMError(f"a cluster holds {len(x)} bytes, fewer than model.seq_len = {length}; "
                       "lower model.seq_len or partition.k, or use more text")
    start = torch.randint(0, len(x) - length + 1, (batch,), generator=generator)
    return x[start[:, None] + torch.arange(length)].long()


def eval_windows(x: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream: (min(max_windows, n // length), length)."""
    n = min(max_windows, len(x) // length)
    return x[: n * length].reshape(n, length).long()


def mixed_windows(streams: list[torch.Tensor], length: int, batch: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows from the union of the clusters, cluster k drawn with probability
    pi_k = bytes_k / total (the centralized model's and the router's data); (windows, labels)."""
    prior = cluster_prior(streams)
    labels = torch.multinomial(prior, batch, replacement=True, generator=generator)
    x = torch.empty(batch, length, dtype=torch.long)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        x[rows] = sample_windows(streams[c], length, len(rows), generator)
    return x, labels


def cluster_prior(streams: list[torch.Tensor]) -> torch.Tensor:
    """pi_k proportional to the bytes of cluster k, float64."""
    sizes = torch.tensor([float(len(s)) for s in streams], dtype=torch.float64)
    return sizes / sizes.sum()

