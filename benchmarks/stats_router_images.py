"""Statistics-only router vs learned router on the image config, on CPU.

Partitions Fashion-MNIST as configs/fashion_mnist.toml does (PCA-32 of pixels,
k-means, K = 8), trains the config's label-conditional CNN router (fewer steps
with --steps), builds the statistics-only router from each shard's count, mean
and low-rank + diagonal covariance (no raw data leaves a shard), overall and per
class label, and prints routing accuracy and calibration per noise level on
held-out test images, labelled by their nearest partition centroid, for both
routers without the class label (p(k | x_t, t)) and with it (p(k | x_t, t, y)).

    PYTHONPATH=src python benchmarks/stats_router_images.py --steps 600 --n-train 20000
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ddmkit.config import load_config
from ddmkit.data import load_dataset
from ddmkit.data.partition import load_partition, partition_data, read_shard
from ddmkit.pipeline.ddm import nearest_cluster_fn, router_field
from ddmkit.train.jobs import train_router
from ddmkit.evaluation.routers import router_report
from ddmkit.nets import from_pretrained
from ddmkit.routing.stats_router import class_stats_router, island_class_statistics, island_statistics, stats_router

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="router training steps (config: 1500)")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--rank", type=int, default=32, help="low-rank factors per island")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs" / "fashion_mnist.toml")
    d, p = cfg.data, cfg.partition
    train, test = load_dataset(d.name, args.n_train, d.n_test, d.seed, **d.params)
    work = Path(tempfile.mkdtemp(prefix="stats_router_"))
    start = time.perf_counter()
    partition_data(train, p.k, work / "partition", p.features, p.pca_dim, p.balanced, p.seed)
    manifest, ptensors = load_partition(work / "partition")
    shards = [work / "partition" / s["path"] for s in manifest["shards"]]
    print(f"partition: k={p.k}, sizes {manifest['counts']} ({time.perf_counter() - start:.0f}s)")

    rcfg = cfg.router.model_copy(update={"train": cfg.router.train.model_copy(
        update={"steps": args.steps, "device": "cpu", "bf16": False, "warmup": min(100, args.steps // 10)})})
    start = time.perf_counter()
    train_router(shards, rcfg, work / "router")
    learned, _ = from_pretrained(work / "router")
    print(f"learned router: {args.steps} steps in {time.perf_counter() - start:.0f}s")

    start = time.perf_counter()
    data = [read_shard(s) for s in shards]
    stats = [island_statistics(x, args.rank) for x, _, _ in data]
    per_class = [island_class_statistics(x, y, 10, args.rank) for x, y, _ in data]
    print(f"island statistics (overall and per class): {time.perf_counter() - start:.0f}s")
    xs, ys = test.x[: args.n_eval], test.labels[: args.n_eval].long()
    cnn = router_field(learned, conditional=True)
    by_class = class_stats_router(per_class, stats)
    routers = {"learned CNN, no label": cnn, "statistics-only, no label": stats_router(stats),
               "learned CNN, with label": lambda x, t: cnn(x, t, y=ys),
               "statistics-only, with label": lambda x, t: by_class(x, t, y=ys)}
    labels = nearest_cluster_fn(manifest, ptensors)(xs)
    rep = router_report(routers, xs, labels)
    names = [n for n in rep if n != "t"]
    print("\n| t | " + " | ".join(f"{n} acc / ECE" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for i, t in enumerate(rep["t"]):
        print(f"| {t:.2f} | " + " | ".join(f"{rep[n]['accuracy'][i]:.3f} / {rep[n]['ece'][i]:.3f}" for n in names) + " |")
    means = {n: sum(rep[n]["accuracy"]) / len(rep["t"]) for n in names}
    print("\nmean accuracy over t: " + ", ".join(f"{n} {v:.3f}" for n, v in means.items()))


if __name__ == "__main__":
    main()
