"""Held-out bits per byte of a text DDM over several seeds: mean and 95% t-interval per model.

    python benchmarks/text_seeds.py configs/text_ar.toml --out runs/text_ar_seeds --seeds 0 1 2

Runs `ddmkit text run CONFIG --out OUT/sSEED --seed SEED` for every seed whose folder has no report.json
yet (a seed sets every seed of the text config: the corpus sample, the partition and every network's
training), then prints one Markdown row per model and routing (the rows of each run's report): the mean
bits per byte over all clusters, the 95% t-interval half-width, and each seed's value.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from scipy import stats


def run_seed(config: Path, folder: Path, seed: int) -> dict:
    report = folder / "report.json"
    if not report.exists():
        subprocess.run([sys.executable, "-m", "ddmkit.cli", "text", "run", str(config), "--out", str(folder),
                        "--force", "--seed", str(seed)], check=True)
    return json.loads(report.read_text())


def interval(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean (0 for one value)."""
    if len(values) < 2:
        return 0.0
    return float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    reports = [run_seed(args.config, args.out / f"s{seed}", seed) for seed in args.seeds]
    rows = list(reports[0]["bits_per_byte"])
    seeds = ", ".join(f"seed {s}" for s in args.seeds)
    print(f"| model | mean bits per byte | 95% interval | {seeds.replace(', ', ' | ')} |")
    print("|---|---|---|" + "---|" * len(args.seeds))
    for row in rows:
        values = [r["bits_per_byte"][row]["all"] for r in reports]
        print(f"| {row} | {statistics.mean(values):.3f} | ± {interval(values):.3f} | "
              + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
