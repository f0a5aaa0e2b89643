"""Held-out bits per byte of a text DDM over several seeds: mean and 95% t-interval per model.

    python benchmarks/text_seeds.py configs/text_ar.toml --out runs/text_ar_seeds --seeds 0 1 2

Runs `ddmkit text run CONFIG --out OUT/sSEED --seed SEED` for every seed whose folder has no report.json
yet (a seed sets every seed of the text config: the corpus sample, the partition and every network's
training; an interrupted run resumes), then prints one Markdown row per model and routing (the rows of
each run's report): the mean bits per byte over all clusters, the 95% t-interval half-width, and each
seed's value. A seed folder made with another config is refused before anything runs: every setting
of CONFIG with --seed SEED (its defaults included) must be what the folder's config.json records; give
another --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from scipy import stats

from ddmkit import DDMError
from ddmkit.discrete import TextRunConfig, load_text_config


def nonnegative(text: str) -> int:
    """An argparse type: a seed, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a seed is 0 or more")
    return value


def differences(given: dict, recorded: dict, where: str = "") -> list[str]:
    """The settings (dotted names) whose values differ between two config dicts."""
    found = []
    for key in sorted(given.keys() | recorded.keys()):
        name, mine, theirs = f"{where}{key}", given.get(key), recorded.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            found += differences(mine, theirs, name + ".")
        elif mine != theirs:
            found.append(name)
    return found


def other_config(config: TextRunConfig, folder: Path) -> list[str]:
    """What differs between `config` (with its seed) and the run in `folder` (nothing when there is no
    run yet). A text run's config.json records {"digest": ..., "config": the settings it ran with}."""
    saved = folder / "config.json"
    if not saved.exists():
        return []
    recorded = json.loads(saved.read_text()).get("config", {})
    return differences(json.loads(json.dumps(config.model_dump())), recorded)


def run_seed(config: Path, folder: Path, seed: int) -> dict:
    """The report of the run of `config` in `folder`, made first if the folder has none; if ddmkit fails,
    its message stands and the script exits with its status."""
    report = folder / "report.json"
    if not report.exists():
        done = subprocess.run([sys.executable, "-m", "ddmkit.cli", "text", "run", str(config), "--out", str(folder),
                               "--seed", str(seed)])
        if done.returncode:
            sys.exit(done.returncode)
    return json.loads(report.read_text())


def interval(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean (0 for one value)."""
    if len(values) < 2:
        return 0.0
    return float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="a text config (TOML with kind = 'text_ar' or 'text_dfm')")
    p.add_argument("--out", type=Path, required=True,
                   help="folder of the runs, one per seed (OUT/s0, OUT/s1, ...); finished runs are reused")
    p.add_argument("--seeds", type=nonnegative, nargs="+", default=[0, 1, 2],
                   help="the seeds, one run each (default 0 1 2)")
    args = p.parse_args()
    try:
        config = load_text_config(args.config)
    except DDMError as e:
        p.error(f"config: {e}")
    for s in args.seeds:
        changed = other_config(config.with_seed(s), args.out / f"s{s}")
        if changed:
            p.error(f"--out: {args.out / f's{s}'} holds a run of another config ({', '.join(changed)} differ from "
                    f"{args.config} with --seed {s}); give another --out")
    reports = [run_seed(args.config, args.out / f"s{s}", s) for s in args.seeds]
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
