"""What does a DDM lose when a new island joins after training and only its expert (and the router) is
trained, against training everything again on all the data?

    python benchmarks/grow.py --quick          # 1 seed, short training: under a few minutes on a 2-core CPU
    python benchmarks/grow.py                  # 3 seeds

The data are an exact Gaussian mixture in 2-D: 8 components in 4 well-separated pairs (pair centres at
(+-4, +-4), the two components of a pair at +-0.8 along x, standard deviation 0.35, equal weights).
Islands 0-2 hold three pairs; the new island holds the fourth pair, a separate mode. Per seed:

    (a) without   `ddmkit run` on islands 0-2 only (k = 3): no expert knows the fourth pair
    (b) retrain   (a), then `ddmkit add-expert RUN --data new.npz`: expert 3 trains on the new island's
                  rows alone, the router is retrained over the 4 shards
    (c) stats     (a), then `ddmkit add-expert RUN --data new.npz --router stats`: expert 3 only, routed by
                  the islands' published count, mean and covariance (no router training)
    (d) all       `ddmkit run` on all the data from the start (k = 4)

Experts and routers use the same settings everywhere (an MLP each; --steps training steps). Every setting
is sampled through the public API (DDM.from_pretrained(RUN).sample, Euler, the same noise) with full and
top-1 routing, and scored against the exact mixture as the vector report scores sets: W2 by exact optimal
transport between sets of --chunk points, each chunk of the samples against its own set drawn from the truth,
averaged (the floor: the same with fresh draws from the truth in place of samples), NLL under the truth,
the number of the 8 modes hit and the mode KL. Training time is the wall time of what each setting
trains beyond (a) (for (a) and (d): the whole run). Prints a Markdown table: mean and standard deviation
over the seeds. Measured numbers: docs/grow.md.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddmkit import DDM, DDMError, GaussianMixture, __version__, load_config, parse_strategy, run_pipeline
from ddmkit.evaluation import mode_coverage, nll, w2_exact

from arguments import fill, nonnegative, positive

CONFIG = """
[data]
name = "{data}"
n_train = 1000000
n_test = 0

[partition]
k = {k}

[expert.net]
arch = "mlp"
kwargs = {{ width = 128, depth = 3 }}

[expert.train]
steps = {steps}
batch_size = 256
warmup = 50
ema_decay = 0.995

[router.net]
arch = "router_mlp"
kwargs = {{ width = 64, depth = 2 }}

[router.train]
steps = {steps}
batch_size = 256
warmup = 50
ema_decay = 0.995

[monolith]
enabled = false

[sample]   # the benchmark samples through the API; the run's own plan, never drawn, fits any --rows >= MIN_ROWS
n = 10

[evaluate]
chunk = 10
"""
MIN_ROWS = 200  # the run's checks: its test split (a fifth of islands 0-2, about 0.15 x --rows) holds 2 x sample.n


def truth() -> GaussianMixture:
    centres = np.array([[-4.0, -4.0], [4.0, -4.0], [-4.0, 4.0], [4.0, 4.0]])
    means = np.concatenate([centres + [-0.8, 0.0], centres + [0.8, 0.0]])  # component i and i + 4: pair i
    return GaussianMixture.from_covariances(np.ones(8), means, np.full(8, 0.35**2))


def write_data(gmm: GaussianMixture, n: int, seed: int, folder: Path) -> None:
    """old.npz (pairs 0-2), new.npz (pair 3) and all.npz (both) from one draw of n rows."""
    x, labels = gmm.sample(n, torch.Generator().manual_seed(seed), return_labels=True)
    new = labels % 4 == 3
    for name, rows in (("old", ~new), ("new", new), ("all", torch.ones_like(new))):
        np.savez(folder / f"{name}.npz", x=x[rows].float().numpy(), labels=labels[rows].numpy())


def train_run(folder: Path, data: str, k: int, steps: int, seed: int) -> float:
    """`ddmkit run CONFIG --out folder --stages train` through the Python API; returns its wall time."""
    config = folder.parent / f"{folder.name}.toml"
    config.write_text(CONFIG.format(data=data, k=k, steps=steps))
    start = time.perf_counter()
    run_pipeline(load_config(config).with_seed(seed), folder, log=lambda m: None, stages="train")
    return time.perf_counter() - start


def add_expert(run: Path, data: Path, *options: str) -> float:
    """`ddmkit add-expert RUN --data DATA OPTIONS` (the command line); returns its wall time. If it fails,
    its messages are shown and the script exits with its status (2: a user error)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ddmkit.cli", "add-expert", str(run), "--data", str(data), *options],
                          capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        sys.exit(done.returncode)
    return time.perf_counter() - start


def chunked_w2(x: torch.Tensor, refs: list[torch.Tensor]) -> float:
    """The report's W2: x cut into len(refs) chunks, each against its own held-out set, averaged."""
    return statistics.fmean(w2_exact(part, ref) for part, ref in zip(x.double().chunk(len(refs)), refs))


def scores(run: Path, gmm: GaussianMixture, strategy: str, n: int, steps: int, seed: int,
           refs: list[torch.Tensor]) -> dict:
    x0, _ = DDM.from_pretrained(run).sample(strategy=strategy, n=n, steps=steps, seed=seed)
    x0 = x0.double()
    return {"w2": chunked_w2(x0, refs), "nll": nll(x0, gmm), **mode_coverage(x0, gmm)}


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def measure(args, gmm: GaussianMixture, out: Path) -> tuple[dict, dict, list[float]]:
    """Per seed: train and grow the four settings in OUT/seedN, then score every setting and strategy.
    Returns the scores per (setting, strategy), the training times per setting and the W2 floors."""
    settings = ["(a) without", "(b) retrain", "(c) stats", "(d) all"]
    rows = {(s, strategy): [] for s in settings for strategy in args.strategies}
    cost = {s: [] for s in settings}
    floor = []
    for seed in args.seeds:
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        write_data(gmm, args.rows, seed, folder)
        runs = {s: folder / s.split()[1] for s in settings}
        cost["(a) without"].append(train_run(runs["(a) without"], str(folder / "old.npz"), 3, args.steps, seed))
        for s, options in (("(b) retrain", ()), ("(c) stats", ("--router", "stats"))):
            shutil.copytree(runs["(a) without"], runs[s], dirs_exist_ok=False)
            cost[s].append(add_expert(runs[s], folder / "new.npz", *options))
        cost["(d) all"].append(train_run(runs["(d) all"], str(folder / "all.npz"), 4, args.steps, seed))
        gen = torch.Generator().manual_seed(10_000 + seed)
        refs = [gmm.sample(args.chunk, gen) for _ in range(args.n // args.chunk)]
        floor.append(chunked_w2(gmm.sample(args.n, gen), refs))
        for s in settings:
            for strategy in args.strategies:
                rows[(s, strategy)].append(scores(runs[s], gmm, strategy, args.n, args.sample_steps, seed, refs))
        print(f"seed {seed} done", file=sys.stderr)
    return rows, cost, floor


def parse_args():
    """The options, checked before anything trains."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 300 training steps, 2000 samples (options given explicitly are kept)")
    p.add_argument("--seeds", type=nonnegative, nargs="+", default=None, help="the seeds (default 0 1 2)")
    p.add_argument("--steps", type=positive, default=None,
                   help="training steps of every expert and router (default 1000)")
    p.add_argument("--rows", type=positive, default=8000,
                   help=f"rows drawn per seed (a fifth held out as test), at least {MIN_ROWS}")
    p.add_argument("--n", type=positive, default=None, help="samples per setting and strategy (default 4000)")
    p.add_argument("--chunk", type=positive, default=1000,
                   help="points per W2 set (n / chunk sets are averaged), at most --n")
    p.add_argument("--sample-steps", type=positive, default=50, help="Euler steps")
    p.add_argument("--strategies", nargs="+", default=["full", "top-1"], help="routing strategies sampled")
    p.add_argument("--out", type=Path, default=None,
                   help="keep the run folders here, a new folder or one without seedN folders yet (default: a "
                        "temporary folder)")
    args = p.parse_args()
    if args.quick:
        fill(args, {"seeds": [0], "steps": 300, "n": 2000})
    fill(args, {"seeds": [0, 1, 2], "steps": 1000, "n": 4000})
    if args.rows < MIN_ROWS:
        p.error(f"--rows {args.rows}: give {MIN_ROWS} or more (the runs hold out a test split)")
    if args.chunk > args.n:
        p.error(f"--chunk {args.chunk} is larger than --n {args.n}: give --chunk {args.n} or lower")
    for strategy in args.strategies:
        try:
            parse_strategy(strategy)
        except DDMError as e:
            p.error(f"--strategies: {e}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; give a folder")
    done = [args.out / f"seed{seed}" for seed in args.seeds if args.out and (args.out / f"seed{seed}").exists()]
    if done:
        p.error(f"--out {args.out} already holds {', '.join(map(str, done))} (an earlier run); give another --out")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    gmm = truth()
    out = args.out or Path(tempfile.mkdtemp(prefix="ddmkit-grow-"))
    try:
        rows, cost, floor = measure(args, gmm, out)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    print(f"ddmkit {__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"seeds {args.seeds}, {args.steps} training steps, {args.n} samples (W2 over sets of {args.chunk}), "
          f"{args.sample_steps} Euler steps\n")
    print("| setting | strategy | W2 to truth | W2 / floor | NLL | modes hit (of 8) | mode KL | training (s) |")
    print("|---|---|---|---|---|---|---|---|")
    truth_nll = nll(gmm.sample(args.n, torch.Generator().manual_seed(1)), gmm)
    print(f"| truth (floor) | - | {summary(floor)} | 1 | {truth_nll:.3f} | - | - | - |")
    for (s, strategy), results in rows.items():
        w2 = [r["w2"] for r in results]
        ratio = [r["w2"] / f for r, f in zip(results, floor)]
        print(f"| {s} | {strategy} | {summary(w2)} | {summary(ratio)} | {summary([r['nll'] for r in results])} | "
              f"{summary([8 * r['modes_hit'] for r in results])} | {summary([r['mode_kl'] for r in results])} | "
              f"{summary(cost[s])} |")


if __name__ == "__main__":
    main()
