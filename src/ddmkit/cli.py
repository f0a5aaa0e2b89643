"""The `ddmkit` command line: thin; it parses and calls the library.

Every command exits 0 on success, 2 with one clear message on bad input
(DDMError), and never leaves half-written files (writes are atomic).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ddmkit.errors import DDMError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decentralized Diffusion Models: partition, train experts in isolation, route, sample, evaluate.")
console = Console(stderr=True)


def log(msg: str) -> None:
    console.print(msg, highlight=False, soft_wrap=True)


def _config(config: Optional[Path], run: Optional[Path] = None):
    from ddmkit.config import RunConfig, builtin_config, load_config
    from ddmkit.pipeline.run import run_config

    if config is not None:
        if not config.exists() and config.suffix != ".toml":
            return load_config(builtin_config(str(config)))
        return load_config(config)
    if run is not None and (run / "config.json").exists():
        return run_config(run)
    return RunConfig()


@app.command()
def partition(out: Path = typer.Option(..., "--out", help="run folder to create (RUN/data, RUN/partition)"),
              config: Optional[Path] = typer.Option(None, help="TOML config (or a built-in name, e.g. demo)"),
              data: Optional[str] = typer.Option(None, help="data set name or .npy/.npz path (overrides config)"),
              k: Optional[int] = typer.Option(None, help="number of clusters (overrides config)"),
              seed: Optional[int] = typer.Option(None, help="seed for data and k-means (overrides config)"),
              force: bool = typer.Option(False, help="replace a folder that holds a different run")):
    """Load the data, cluster it into K shards, write shards and a manifest."""
    from ddmkit.pipeline.run import prepare_run_dir, stage_data, stage_partition

    cfg = _config(config)
    upd = {}
    if data is not None:
        upd["data"] = cfg.data.model_copy(update={"name": data})
    if k is not None or seed is not None:
        upd["partition"] = cfg.partition.model_copy(update={kk: v for kk, v in (("k", k), ("seed", seed)) if v is not None})
    if seed is not None:
        upd.setdefault("data", cfg.data).__dict__["seed"] = seed
    cfg = cfg.model_copy(update=upd)
    from ddmkit.config import RunConfig, validate

    cfg = validate(RunConfig, cfg.model_dump(), "options")
    run = prepare_run_dir(out, cfg, force)
    stage_data(cfg, run, log)
    stage_partition(cfg, run, log)


@app.command("train-expert")
def train_expert_cmd(shard: Path = typer.Argument(..., help="one shard file, e.g. RUN/partition/shards/cluster_03.safetensors"),
                     out: Path = typer.Option(..., "--out", help="expert folder to write"),
                     config: Optional[Path] = typer.Option(None, help="TOML config whose [expert] section is used"),
                     seed: Optional[int] = typer.Option(None, help="training seed (overrides config)")):
    """Train one expert on one shard, in isolation: it reads that file and nothing else."""
    from ddmkit.pipeline.jobs import train_expert

    cfg = _config(config).expert
    if seed is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
    train_expert(shard, cfg, out)
    log(f"expert written to {out}")


@app.command("train-router")
def train_router_cmd(run: Path = typer.Argument(..., help="run folder with partition/"),
                     config: Optional[Path] = typer.Option(None, help="TOML config (default: the run's)")):
    """Train the router p(cluster | x_t, t) on noised shard data."""
    from ddmkit.pipeline.run import stage_router

    stage_router(_config(config, run), run, log)


@app.command("train-monolith")
def train_monolith_cmd(run: Path = typer.Argument(..., help="run folder with partition/"),
                       config: Optional[Path] = typer.Option(None, help="TOML config (default: the run's)")):
    """Train the FLOP-matched monolith baseline on all shards."""
    from ddmkit.pipeline.run import stage_monolith

    stage_monolith(_config(config, run), run, log)


@app.command()
def sample(run: Path = typer.Argument(..., help="run folder with experts/ and router/"),
           strategy: List[str] = typer.Option(["top-2"], help="routing strategy, repeatable: full, top-K, threshold-P, "
                                              "sample-K[@T], nucleus-P[@T], switch, oracle, nearest, monolith"),
           n: Optional[int] = typer.Option(None, help="number of samples"),
           steps: Optional[int] = typer.Option(None, help="solver steps"),
           solver: Optional[str] = typer.Option(None, help="euler, heun, midpoint, rk4 or adaptive"),
           seed: Optional[int] = typer.Option(None, help="noise seed")):
    """Sample with routing strategies; writes RUN/samples/STRATEGY.safetensors."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.run import sample_one

    cfg = _config(None, run)
    upd = {k: v for k, v in (("n", n), ("steps", steps), ("solver", solver), ("seed", seed)) if v is not None}
    cfg = validate(RunConfig, {**cfg.model_dump(), "sample": {**cfg.sample.model_dump(), **upd,
                                                              "strategies": list(strategy)}}, "options")
    for name in strategy:
        info = sample_one(cfg, run, name)
        log(f"{name}: {info['expert_calls_per_sample']:.1f} expert calls/sample, {info['wall_time']:.2f}s")


@app.command()
def evaluate(run: Path = typer.Argument(..., help="run folder with samples/")):
    """Metrics for every sampled strategy, router accuracy per t, plots and report.md."""
    from ddmkit.pipeline.run import stage_evaluate

    stage_evaluate(_config(None, run), run, log)


@app.command()
def run(config: Path = typer.Argument(..., help="TOML config, or a built-in name (demo)"),
        out: Path = typer.Option(Path("runs/run"), "--out", help="run folder"),
        force: bool = typer.Option(False, help="replace a folder that holds a different run")):
    """Every stage: data, partition, experts, monolith, router, sampling, evaluation, report."""
    from ddmkit.pipeline.run import run_pipeline

    run_pipeline(_config(config), out, force, log)


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="output folder"),
         force: bool = typer.Option(False, help="replace a folder that holds a different run")):
    """The built-in ring-of-8 run, end to end on a CPU in a few minutes; writes report.md."""
    from ddmkit.config import builtin_config, load_config
    from ddmkit.pipeline.run import run_pipeline

    result = run_pipeline(load_config(builtin_config("demo")), out, force, log)
    _print_summary(result)
    log(f"[bold green]demo finished[/]: open {out / 'report.md'}")


def _print_summary(result: dict) -> None:
    from rich.table import Table

    table = Table(title="samples per strategy")
    for col in ("strategy", "W2/floor", "NLL", "modes hit", "expert calls/sample", "wall (s)"):
        table.add_column(col)
    for name, r in result["rows"].items():
        table.add_row(name, f"{r['w2_over_floor']:.2f}", f"{r.get('nll', float('nan')):.3f}",
                      f"{r.get('modes_hit', float('nan')):.2f}", f"{r.get('expert_calls_per_sample', 0):.1f}",
                      f"{r.get('wall_time', 0):.2f}")
    Console().print(table)


def main() -> None:
    try:
        app()
    except DDMError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
