"""The statistics-only router against the learned router on the image config, on a CPU: routing accuracy
and calibration (ECE) per noise level, without and with the class label.

Partitions Fashion-MNIST as configs/fashion_mnist.toml does (PCA-32 of the pixels, k-means, K = 8),
trains the config's label-conditional CNN router (--steps of its 1500), builds the statistics-only
router from each shard's count, mean and rank-R + diagonal covariance (no raw data leaves a shard),
overall and per class label, and scores both on held-out test images labelled by their nearest
partition centroid: p(k | x_t, t) (no label) and p(k | x_t, t, y) (with it).

    python benchmarks/stats_router_images.py                       # about 4 minutes on 2 CPU cores
    python benchmarks/stats_router_images.py --quick               # a check in about a minute (45 s of CPU time)

Prints a Markdown table (t, then accuracy / ECE of each router) and the mean accuracy over t. Measured
numbers: docs/distributed.md.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ddmkit import __version__, load_config
from ddmkit.data import load_dataset, load_partition, partition_data, read_shard
from ddmkit.ddm import nearest_cluster_fn
from ddmkit.evaluation import router_report
from ddmkit.nets import from_pretrained, router_probabilities
from ddmkit.routing import class_stats_router, island_class_statistics, island_statistics
from ddmkit.train import train_router

from arguments import fill, positive

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"steps": 20, "n_train": 2000, "n_eval": 200, "rank": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive, default=None, help="router training steps (default 400; config 1500)")
    p.add_argument("--n-train", type=positive, default=None, help="training images partitioned (default 20000)")
    p.add_argument("--n-eval", type=positive, default=None, help="held-out test images scored (default 2000)")
    p.add_argument("--rank", type=positive, default=None, help="low-rank factors per island (default 32)")
    p.add_argument("--quick", action="store_true", help="20 steps, 2000 images, 200 scored, rank 4: a check; "
                   "options given explicitly are kept")
    args = p.parse_args(argv)
    if args.quick:
        fill(args, QUICK)
    fill(args, {"steps": 400, "n_train": 20000, "n_eval": 2000, "rank": 32})
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs" / "fashion_mnist.toml")
    d, p = cfg.data, cfg.partition
    print(f"# statistics-only against learned router, image config; torch {torch.__version__}; ddmkit {__version__}; "
          f"{args.steps} router steps, {args.n_train} training images, rank {args.rank}", flush=True)
    train, test = load_dataset(d.name, args.n_train, d.n_test, d.seed, d.params)
    work = Path(tempfile.mkdtemp(prefix="stats_router_"))
    start = time.perf_counter()
    partition_data(train, p.k, work / "partition", p.features, p.pca_dim, p.balanced, p.seed)
    manifest, ptensors = load_partition(work / "partition")
    shards = [work / "partition" / s["path"] for s in manifest["shards"]]
    print(f"partition: k={p.k}, sizes {manifest['counts']} ({time.perf_counter() - start:.0f} s)", flush=True)

    train_cfg = cfg.router.train.model_copy(update={"steps": args.steps, "device": "cpu", "bf16": False,
                                                    "warmup": min(100, args.steps // 10)})
    start = time.perf_counter()
    train_router(shards, cfg.router.model_copy(update={"train": train_cfg}), work / "router")
    model, _ = from_pretrained(work / "router")
    print(f"learned router: {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)

    start = time.perf_counter()
    data = [read_shard(s) for s in shards]
    stats = [island_statistics(x, args.rank) for x, _, _ in data]
    per_class = [island_class_statistics(x, y, 10, args.rank) for x, y, _ in data]
    print(f"island statistics (overall and per class): {time.perf_counter() - start:.0f} s", flush=True)

    xs, ys = test.x[:args.n_eval], test.labels[:args.n_eval].long()
    by_class = class_stats_router(per_class, stats)  # y = None: the marginal router of the whole-shard statistics
    cnn = lambda x, t, y=None: router_probabilities(model(x, t, y))  # noqa: E731 (y None: its "no label" token)
    routers = {"learned CNN, no label": cnn,
               "statistics-only, no label": by_class,
               "learned CNN, with label": lambda x, t: cnn(x, t, y=ys),
               "statistics-only, with label": lambda x, t: by_class(x, t, y=ys)}
    report = router_report(routers, xs, nearest_cluster_fn(manifest, ptensors)(xs))
    names = [n for n in report if n != "t"]
    print("\n| t | " + " | ".join(f"{n}: acc / ECE" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for i, t in enumerate(report["t"]):
        print(f"| {t:.2f} | " + " | ".join(f"{report[n]['accuracy'][i]:.3f} / {report[n]['ece'][i]:.3f}"
                                          for n in names) + " |")
    means = {n: sum(report[n]["accuracy"]) / len(report["t"]) for n in names}
    print("\nmean accuracy over t: " + ", ".join(f"{n} {v:.3f}" for n, v in means.items()))


if __name__ == "__main__":
    main()
