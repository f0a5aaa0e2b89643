"""Which time grid makes the better few-step student of a DDM: uniform in t, or uniform in Lambda (the
integrated Lipschitz constant of the flow)? And how do the students compare with their teacher and the
monolith at equal sampling cost?

    python benchmarks/distill.py --quick              # a tiny ring8 run, 1 seed: a minute or two
    ddmkit run demo --out runs/demo --stages train    # a trained run, then its students over 3 seeds:
    python benchmarks/distill.py --run runs/demo

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

from ddmkit import DDMError, __version__, parse_strategy

from arguments import fill, nonnegative, positive

QUICK = ["data.n_train=1600", "data.n_test=1600", "expert.train.steps=200", "router.train.steps=200",
         "sample.n=800", "sample.steps=16", "evaluate.chunk=400"]


def ddmkit(*args: str) -> float:
    """`ddmkit ARGS` on one CPU thread; returns its wall time. If it fails, its messages are shown and the
    script exits with its status (2: a user error)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ddmkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.stderr.write(done.stderr)
        sys.exit(done.returncode)
    return time.perf_counter() - start


def distill_seed(run: Path, copy: Path, seed: int, few_step: list[int], options: list[str]) -> dict:
    """Copy the trained run to `copy` and distill its students there (every S in few_step, both grids);
    returns the rows of copy/students/report.json. A copy whose distillation failed is removed."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    try:
        for s in few_step:
            for grid in ("uniform", "lambda"):
                seconds = ddmkit("distill", copy, *options, "--seed", seed, "--few-step", s, "--grid", grid)
                print(f"seed {seed}, S = {s}, {grid}: {seconds:.0f}s", file=sys.stderr)
    except SystemExit:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    return json.loads((copy / "students" / "report.json").read_text())["scores"]["rows"]


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4g}" if len(values) < 2 else f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def segments(text: str) -> int:
    """An argparse type: a few-step student's segments S, 1 .. 32 (as `ddmkit distill --few-step`)."""
    value = int(text)
    if not 1 <= value <= 32:
        raise argparse.ArgumentTypeError(f"{text}: give 1 .. 32")
    return value


def parse_args():
    """The options, checked before anything trains."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None,
                   help="a trained run folder, e.g. made by `ddmkit run demo --out runs/demo --stages train` "
                        "(default: train the demo run)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny demo run, 1 seed, S = 4, 200 student steps (options given explicitly are kept)")
    p.add_argument("--seeds", type=nonnegative, nargs="+", default=None,
                   help="the students' training seeds (default 0 1 2)")
    p.add_argument("--few-step", type=segments, nargs="+", default=None,
                   help="segments S of the few-step students, 1 .. 32 (default 4 8)")
    p.add_argument("--teacher", default="top-2", help="the routing strategy distilled")
    p.add_argument("--steps", type=positive, default=None, help="training steps of each student (default: the run's)")
    p.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    args = p.parse_args()
    if args.quick:
        fill(args, {"seeds": [0], "few_step": [4], "steps": 200})
    fill(args, {"seeds": [0, 1, 2], "few_step": [4, 8]})
    try:
        parse_strategy(args.teacher)
    except DDMError as e:
        p.error(f"--teacher: {e}")
    if args.run is not None and not args.run.is_dir():
        p.error(f"--run {args.run} does not exist; make the run with `ddmkit run demo --out {args.run} --stages train`")
    if args.run is not None and not (args.run / "config.json").is_file():
        p.error(f"--run {args.run} is not a ddmkit run folder (no config.json); give a trained run folder")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; give a folder")
    return args


def main() -> None:
    args = parse_args()
    options = ["--teacher", args.teacher]
    options += ["--steps", str(args.steps)] if args.steps is not None else []
    options += ["--trajectories", "1024"] if args.quick else []
    out = args.out or Path(tempfile.mkdtemp(prefix="ddmkit-distill-"))
    rows: dict[str, dict[str, list[float]]] = {}
    try:
        run = args.run
        if run is None:
            run = out / "trained"
            quick = [arg for s in QUICK for arg in ("--set", s)] if args.quick else []
            print(f"training the demo run: {ddmkit('run', 'demo', '--out', run, '--stages', 'train', *quick):.0f}s",
                  file=sys.stderr)
        for seed in args.seeds:
            for name, r in distill_seed(run, out / f"seed{seed}", seed, args.few_step, options).items():
                row = rows.setdefault(name, {})
                for key in ("expert_calls_per_sample", "w2_over_floor", "nll", "to_teacher_samples"):
                    if r.get(key) is not None:
                        row.setdefault(key, []).append(r[key])
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    print(f"ddmkit {__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU threads seen, teacher {args.teacher}, student seeds {args.seeds}\n")
    print("| samples | network calls/sample | W2 / floor | NLL | to teacher's samples |")
    print("|---|---|---|---|---|")
    for name, r in sorted(rows.items(), key=lambda item: (-item[1]["expert_calls_per_sample"][0], item[0])):
        cells = [summary(r[key]) if key in r else "-" for key in ("w2_over_floor", "nll", "to_teacher_samples")]
        print(f"| {name} | {r['expert_calls_per_sample'][0]:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
