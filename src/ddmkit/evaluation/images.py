"""Image evaluation: FID/KID of sample sets against the test split, and PNG grids.

    scorer = SetScorer(run, fid_features="inception", kid_subset=1000, n_train=10000, device="cuda")
    metrics = scorer("top-2")          # RUN/samples/top-2.safetensors -> {"fid", "kid", ...}, cached in RUN/eval/

Features: "inception" (the standard FID Inception network, ddmkit.evaluation.fid) or
"pixels" (a cheap stand-in for tests).
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch

from ddmkit.data.partition import read_shard
from ddmkit.evaluation.fid import feature_extractor, fid_kid, gaussian_stats
from ddmkit.io import load_tensors, read_json, save_tensors, write_bytes_atomic, write_json
from ddmkit.layout import RunFolder, safe_name
from ddmkit.registry import load_data_file, shard_files


def image_grid(x: torch.Tensor, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad[, 3]) grid; fewer rows when the
    images do not fill them (32 images on an 8 x 8 grid: 4 rows, no blank half)."""
    rows = min(rows, -(-len(x) // cols))
    x = x[: rows * cols].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr


def save_png(arr: np.ndarray, path: Path, scale: int = 2) -> None:
    """Write an image grid as PNG, each pixel scale x scale, atomically (io.write_bytes_atomic)."""
    from PIL import Image

    im = Image.fromarray(arr)
    buffer = io.BytesIO()
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def cluster_grid(run, per_cluster: int = 12) -> np.ndarray:
    """One row of example images per cluster (the first images of each shard)."""
    rows = [read_shard(path)[0][:per_cluster] for path in shard_files(run)]
    rows = [torch.cat([r, torch.full((per_cluster - len(r), *r.shape[1:]), 1.0)]) for r in rows]
    return image_grid(torch.cat(rows), len(rows), per_cluster)


def floor_images(train: torch.Tensor, n: int) -> torch.Tensor:
    """The training images of the floor row: n of them, drawn by a permutation fixed by seed 0."""
    return train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]]


def reference_features(run, extractor, kind: str, n: int, log=print) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Features of the test split and of the floor row's training images, n of them (a sample set's count;
    all of them if fewer), cached in RUN/eval/; and the seconds the test features took. A cache of another
    count of training images (sample.n changed) keeps its test features."""
    folder = RunFolder(run)
    cache = folder.eval / f"reference_{kind}.safetensors"
    t = load_tensors(cache) if cache.exists() else None
    if t is not None and len(t["train"]) == n:
        return t["test"], t["train"], float(t["seconds"])
    train = load_data_file(run, folder.split("train"))["x"]  # checked against data.json
    count = min(n, len(train))  # as many as a sample set: at fewer images FID's bias would lift the floor
    if t is not None and len(t["train"]) == count:
        return t["test"], t["train"], float(t["seconds"])
    if t is None:
        start = time.perf_counter()
        f_test = extractor(load_data_file(run, folder.split("test"))["x"])
        seconds = time.perf_counter() - start
    else:
        f_test, seconds = t["test"], float(t["seconds"])
    f_train = extractor(floor_images(train, count))
    save_tensors(cache, {"test": f_test, "train": f_train, "seconds": torch.tensor(seconds)})
    log(f"reference features: {len(f_test)} test images in {seconds:.1f}s")
    return f_test, f_train, seconds


class SetScorer:
    """FID/KID of one sample set against the test split, cached in RUN/eval/set_<name>.json
    (so sets can be scored as soon as they are sampled, and a re-run skips them); the test
    features are computed once. n_train: training images scored as the floor row. A cached score
    records the features and KID subset it was made with, and is made again under others
    (`ddmkit evaluate RUN --set evaluate.fid_features=...`)."""

    def __init__(self, run, fid_features: str, kid_subset: int, n_train: int, log=print, device="cpu"):
        self.run, self.log, self.kind, self.kid_subset = RunFolder(run), log, fid_features, kid_subset
        self.extractor = feature_extractor(fid_features, device)
        self.f_test, self.f_train, self.ref_seconds = reference_features(run, self.extractor, fid_features, n_train,
                                                                         log)
        self.real_stats = gaussian_stats(self.f_test)

    def cache(self, name: str) -> Path:
        return self.run.eval / f"set_{safe_name(name)}.json"

    def cached(self, cache: Path) -> dict | None:
        """The metrics in `cache` if they were scored as this scorer scores (features, KID subset), else None."""
        if not cache.exists():
            return None
        cached = read_json(cache)
        scored_with = cached.pop("scored_with", None)
        return cached if scored_with == {"features": self.kind, "kid_subset": self.kid_subset} else None

    def write_cache(self, cache: Path, metrics: dict) -> None:
        write_json(cache, {**metrics, "scored_with": {"features": self.kind, "kid_subset": self.kid_subset}})

    def floor(self) -> dict:
        """Training images against the test set: the floor no sampler can beat."""
        return {**fid_kid(self.f_test, self.f_train, self.kid_subset, self.real_stats), "n": len(self.f_train)}

    def reconstruction_floor(self, codec) -> dict:
        """A latent run's floor: the floor row's training images encoded and decoded by its autoencoder
        (no latent sampler can beat the autoencoder's own reconstructions)."""
        cache = self.run.eval / "reconstructions.json"
        cached = self.cached(cache)
        if cached is not None and cached.get("n") == len(self.f_train):
            return cached
        train = floor_images(load_data_file(self.run.root, self.run.split("train"))["x"], len(self.f_train))
        recon = codec.decode(codec.encode(train)).clamp(-1, 1).cpu()
        metrics = {k: float(v) for k, v in fid_kid(self.f_test, self.extractor(recon), self.kid_subset,
                                                   self.real_stats).items()}
        metrics["n"] = len(recon)
        save_png(image_grid(recon, 8, 8), self.run.plots / "reconstructions.png")
        self.write_cache(cache, metrics)
        return metrics

    def __call__(self, name: str, first: int | None = None) -> dict:
        """Metrics of the set `name` (of its first `first` samples, when given)."""
        path = self.run.sample_set(name)
        cache = self.cache(name if first is None else f"{name}_first{first}")
        if cache.exists() and cache.stat().st_mtime >= path.stat().st_mtime:
            cached = self.cached(cache)
            if cached is not None and "n" in cached:  # (scores cached before the count was kept are made again)
                return cached
        x = load_tensors(path, fix="delete it (`ddmkit sample RUN --strategy NAME` draws the set again)")["x"][:first]
        start = time.perf_counter()
        feats = self.extractor(x)
        metrics = fid_kid(self.f_test, feats, self.kid_subset, self.real_stats)
        metrics["fid_seconds"] = time.perf_counter() - start
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["n"] = len(x)
        if first is None:
            save_png(image_grid(x, 8, 8), self.run.plots / f"samples_{path.stem}.png")
        self.write_cache(cache, metrics)
        label = name if first is None else f"{name} (first {first})"
        self.log(f"{label}: FID {metrics['fid']:.2f}, KID {metrics['kid'] * 1e3:.2f}e-3 (n = {len(x)}, "
                 f"{metrics['fid_seconds']:.1f}s)")
        return metrics
