"""Which time grid makes the better few-step student of a DDM: uniform in t, or uniform in Lambda (the
integrated Lipschitz constant of the flow)? And how do the students compare with their teacher and the
monolith at equal sampling cost?

    python benchmarks/distill.py --quick                     # a tiny ring8 run, 1 seed: under a minute or two
    python benchmarks/distill.py --run runs/demo             # a trained run (e.g. `ddmkit run demo --stages train`)

For each seed the trained run is copied and distilled with the command line,

    ddmkit distill RUN --teacher T --seed SEED --few-step S --grid G      for every S in --few-step, G in both grids

(the dense student is trained once per seed and shared by the four few-step students), and the rows of
RUN/students/report.json are gathered: W2 / floor and NLL against the run's exact truth (Gaussian mixtures),
and each sampler's pathwise distance to the teacher's samples from the same noise,
E |x0 - x0_teacher|^2 / E |x0_teacher|^2. Prints a Markdown table: mean and standard deviation over the
seeds, with the network calls per sample of each row. Measured numbers: docs/distill.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddmkit import __version__

QUICK = ["data.n_train=1600", "data.n_test=1600", "expert.train.steps=200", "router.train.steps=200",
         "sample.n=800", "sample.steps=16", "evaluate.chunk=400"]


def ddmkit(*args: str) -> float:
    """`ddmkit ARGS` on one CPU thread; returns its wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddmkit.cli", *map(str, args)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4g}" if len(values) < 2 else f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="a trained run folder (default: train the demo run)")
    p.add_argument("--quick", action="store_true", help="a tiny demo run, 1 seed, S = 4, 200 student steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the students' training seeds")
    p.add_argument("--few-step", type=int, nargs="+", default=[4, 8], help="segments S of the few-step students")
    p.add_argument("--teacher", default="top-2", help="the routing strategy distilled")
    p.add_argument("--steps", type=int, default=None, help="training steps of each student (default: the run's)")
    p.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ddmkit-distill-"))
    options = ["--teacher", args.teacher]
    if args.quick:
        args.seeds, args.few_step = args.seeds[:1], args.few_step[:1]
        options += ["--steps", str(args.steps or 200), "--trajectories", "1024"]
    elif args.steps:
        options += ["--steps", str(args.steps)]
    run = args.run
    if run is None:
        run = out / "trained"
        quick = [arg for s in QUICK for arg in ("--set", s)] if args.quick else []
        print(f"training the demo run: {ddmkit('run', 'demo', '--out', run, '--stages', 'train', *quick):.0f}s",
              file=sys.stderr)
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        copy = out / f"seed{seed}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        for s in args.few_step:
            for grid in ("uniform", "lambda"):
                seconds = ddmkit("distill", copy, *options, "--seed", seed, "--few-step", s, "--grid", grid)
                print(f"seed {seed}, S = {s}, {grid}: {seconds:.0f}s", file=sys.stderr)
        report = json.loads((copy / "students" / "report.json").read_text())
        for name, r in report["scores"]["rows"].items():
            row = rows.setdefault(name, {})
            for key in ("expert_calls_per_sample", "w2_over_floor", "nll", "to_teacher_samples"):
                if r.get(key) is not None:
                    row.setdefault(key, []).append(r[key])

    print(f"ddmkit {__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU threads seen, teacher {args.teacher}, student seeds {args.seeds}\n")
    print("| samples | network calls/sample | W2 / floor | NLL | to teacher's samples |")
    print("|---|---|---|---|---|")
    for name, r in sorted(rows.items(), key=lambda item: (-item[1]["expert_calls_per_sample"][0], item[0])):
        cells = [summary(r[key]) if key in r else "-" for key in ("w2_over_floor", "nll", "to_teacher_samples")]
        print(f"| {name} | {r['expert_calls_per_sample'][0]:g} | " + " | ".join(cells) + " |")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
