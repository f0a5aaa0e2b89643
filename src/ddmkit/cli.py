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
from rich.markup import escape

from ddmkit.errors import DDMError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decentralized Diffusion Models: partition, train experts in isolation, route, sample, evaluate.")
console = Console(stderr=True)


def log(msg: str) -> None:
    """A progress line on stderr, printed as it is (no rich markup: '[sample]' or 'ddmkit[ray]' stay)."""
    console.print(msg, highlight=False, soft_wrap=True, markup=False)


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
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.run import prepare_run_dir, stage_data, stage_partition

    cfg = _config(config).with_seed(seed).model_dump()
    if data is not None:
        cfg["data"]["name"] = data
    if k is not None:
        cfg["partition"]["k"] = k
    cfg = validate(RunConfig, cfg, "options")
    run = prepare_run_dir(out, cfg, force, log)
    stage_data(cfg, run, log)
    stage_partition(cfg, run, log)


def _with_train_seed(section, seed: Optional[int]):
    """An [expert] or [router] section with its training seed replaced (unchanged when seed is None)."""
    if seed is None:
        return section
    return section.model_copy(update={"train": section.train.model_copy(update={"seed": seed})})


@app.command("train-expert")
def train_expert_cmd(shard: Path = typer.Argument(..., help="one shard file, e.g. RUN/partition/shards/cluster_03.safetensors"),
                     out: Path = typer.Option(..., "--out", help="expert folder to write"),
                     config: Optional[Path] = typer.Option(None, help="TOML config (or a run's config.json) whose [expert] section is used"),
                     seed: Optional[int] = typer.Option(None, help="training seed (overrides config)"),
                     checkpoint_every: Optional[int] = typer.Option(None, help="write a checkpoint every N steps (overrides config)"),
                     resume: bool = typer.Option(False, help="continue from OUT.checkpoint.safetensors if a killed run left one")):
    """Train one expert on one shard, in isolation: it reads that file and nothing else."""
    from ddmkit.config import ExpertConfig, validate
    from ddmkit.pipeline.jobs import train_expert

    cfg = _config(config).expert
    upd = {k: v for k, v in (("seed", seed), ("checkpoint_every", checkpoint_every)) if v is not None}
    cfg = validate(ExpertConfig, {**cfg.model_dump(), "train": {**cfg.train.model_dump(), **upd}}, "options")
    train_expert(shard, cfg, out, resume=resume)
    log(f"expert written to {out}")


@app.command("train-router")
def train_router_cmd(run: Path = typer.Argument(..., help="run folder with partition/"),
                     config: Optional[Path] = typer.Option(None, help="TOML config (default: the run's)"),
                     seed: Optional[int] = typer.Option(None, help="training seed (overrides config)")):
    """Train the router p(cluster | x_t, t) on noised shard data."""
    from ddmkit.pipeline.run import stage_router

    cfg = _config(config, run)
    stage_router(cfg.model_copy(update={"router": _with_train_seed(cfg.router, seed)}), run, log)


@app.command("train-monolith")
def train_monolith_cmd(run: Path = typer.Argument(..., help="run folder with partition/"),
                       config: Optional[Path] = typer.Option(None, help="TOML config (default: the run's)"),
                       seed: Optional[int] = typer.Option(None, help="training seed (overrides config)")):
    """Train the FLOP-matched monolith baseline on all shards."""
    from ddmkit.pipeline.run import stage_monolith

    cfg = _config(config, run)
    stage_monolith(cfg.model_copy(update={"expert": _with_train_seed(cfg.expert, seed)}), run, log)


@app.command()
def sample(run: Path = typer.Argument(..., help="run folder with experts/ and router/"),
           strategy: List[str] = typer.Option(["top-2"], help="routing strategy, repeatable: full, top-K, threshold-P, "
                                              "sample-K[@T], nucleus-P[@T], switch, oracle, nearest, monolith"),
           n: Optional[int] = typer.Option(None, help="number of samples"),
           steps: Optional[int] = typer.Option(None, help="solver steps"),
           solver: Optional[str] = typer.Option(None, help="euler, heun, midpoint, rk4 or adaptive"),
           seed: Optional[int] = typer.Option(None, help="noise seed"),
           router_every: Optional[int] = typer.Option(None, help="call the router every m steps and reuse its "
                                                      "routing in between (1: every step)"),
           batch_size: Optional[int] = typer.Option(None, help="integrate the samples in chunks of this many rows"),
           cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                                      help="on a GPU, replay the networks from CUDA graphs (pays at "
                                                      "batches up to a few thousand rows; ignored on the CPU)"),
           cuda_streams: Optional[bool] = typer.Option(None, "--cuda-streams/--no-cuda-streams",
                                                       help="on a GPU, run a step's experts on concurrent CUDA "
                                                       "streams (default on; with --cuda-graphs, a set of graphs per expert)")):
    """Sample with routing strategies; writes RUN/samples/STRATEGY.safetensors."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.run import sample_one

    cfg = _config(None, run)
    upd = {k: v for k, v in (("n", n), ("steps", steps), ("solver", solver), ("seed", seed),
                             ("router_every", router_every), ("batch_size", batch_size),
                             ("cuda_graphs", cuda_graphs), ("cuda_streams", cuda_streams)) if v is not None}
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
def analyze(run: Path = typer.Argument(..., help="trained run folder (experts/, router/, partition/)"),
            out: Optional[Path] = typer.Option(None, "--out", help="output folder (default RUN/analysis)"),
            strategy: Optional[List[str]] = typer.Option(None, help="routing strategy, repeatable (default: full, "
                                                         "top-1, top-2, sample-2, threshold-P, switch, oracle, "
                                                         "nearest, adaptive-0.9, adaptive-ent-0.5, gated-2@30)"),
            n: int = typer.Option(1000, help="trajectories per strategy"),
            seed: Optional[int] = typer.Option(None, help="noise seed (default: the run's)"),
            max_steps: int = typer.Option(20, help="steps at which Jacobians are measured"),
            jvp_rows: int = typer.Option(128, help="trajectories on which Jacobians are measured")):
    """Stability vs expert-data alignment diagnostics; writes analysis.md, analysis.json, plots/."""
    from ddmkit.analysis import analyze_run

    analyze_run(run, out, strategy, n=n, seed=seed, max_steps=max_steps, jvp_rows=jvp_rows, log=log)


@app.command()
def run(config: Path = typer.Argument(..., help="TOML config, or a built-in name (demo)"),
        out: Path = typer.Option(Path("runs/run"), "--out", help="run folder"),
        seed: Optional[int] = typer.Option(None, help="one seed for every stage (overrides config)"),
        force: bool = typer.Option(False, help="replace a folder that holds a different run"),
        backend: str = typer.Option("inline", help="where experts train: inline, processes or ray"),
        workers: Optional[int] = typer.Option(None, help="parallel expert jobs (processes, local ray)"),
        address: Optional[str] = typer.Option(None, help="ray cluster address (ray://host:10001 or auto)")):
    """Every stage: data, partition, experts, monolith, router, sampling, evaluation, report.

    A TOML with `kind = "text_ar"` or `"text_dfm"` runs the text pipeline (see `ddmkit text --help`)."""
    from ddmkit.launch import check_backend
    from ddmkit.pipeline.run import run_pipeline

    if _text_kind(config):
        from ddmkit.discrete.pipeline import run_text

        run_text(config, out, force, seed)
        return
    check_backend(backend)
    run_pipeline(_config(config).with_seed(seed), out, force, log, backend, workers, address)


@app.command()
def launch(run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder with partition/"),
           backend: str = typer.Option("inline", help="inline, processes or ray"),
           workers: Optional[int] = typer.Option(None, help="parallel expert jobs (processes, local ray)"),
           address: Optional[str] = typer.Option(None, help="ray cluster address (ray://host:10001 or auto)"),
           emit: Optional[str] = typer.Option(None, help="write a scheduler script instead of training: slurm"),
           script: Optional[Path] = typer.Option(None, help="where --emit writes (default RUN/launch/train_experts.slurm)"),
           time: str = typer.Option("24:00:00", help="slurm --time per expert"),
           cpus: int = typer.Option(4, help="slurm --cpus-per-task"),
           gpus: int = typer.Option(1, help="slurm GPUs per expert (0: none)"),
           mem: str = typer.Option("16G", help="slurm --mem"),
           partition_name: Optional[str] = typer.Option(None, "--partition", help="slurm partition")):
    """Train the run's missing experts on a backend, or emit a SLURM job array (one task per expert)."""
    from ddmkit.pipeline.run import run_config, stage_experts, stage_registry

    if emit is not None:
        from ddmkit.launch import write_slurm_script

        if emit != "slurm":
            raise DDMError(f"--emit: unknown scheduler {emit!r}; accepted: slurm")
        path = write_slurm_script(run_dir, script, time=time, cpus=cpus, gpus=gpus, mem=mem, partition=partition_name)
        log(f"wrote {path}; submit it with: sbatch {path}")
        return
    from ddmkit.launch import check_backend

    check_backend(backend)
    cfg = run_config(run_dir)
    stage_experts(cfg, run_dir, log, backend, workers, address)
    stage_registry(cfg, run_dir, log)


@app.command()
def register(run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder with partition/, experts/, router/")):
    """Write RUN/registry.json: SHA-256 of every model folder, shard hashes, version, time convention."""
    from ddmkit.registry import write_registry

    reg = write_registry(run_dir)
    log(f"registry: {len(reg['models'])} model folders recorded in {run_dir / 'registry.json'}")


@app.command()
def verify(run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder with registry.json")):
    """Check every model folder against RUN/registry.json; exit 2 on a mismatch."""
    from ddmkit.registry import verify_registry

    res = verify_registry(run_dir)
    log(f"verified {len(res['verified'])} model folders" + (f"; missing experts {res['missing']}" if res["missing"] else ""))


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="output folder"),
         seed: Optional[int] = typer.Option(None, help="one seed for every stage (default: the config's)"),
         backend: str = typer.Option("processes", help="where experts train: inline, processes or ray"),
         workers: Optional[int] = typer.Option(None, help="parallel expert jobs (default: one per CPU core)"),
         force: bool = typer.Option(False, help="replace a folder that holds a different run")):
    """The built-in ring-of-8 run, end to end on a CPU in a few minutes; writes report.md."""
    from ddmkit.config import builtin_config, load_config
    from ddmkit.launch import check_backend
    from ddmkit.pipeline.run import run_pipeline

    check_backend(backend)
    result = run_pipeline(load_config(builtin_config("demo")).with_seed(seed), out, force, log, backend, workers)
    _print_summary(result)
    console.print(f"[bold green]demo finished[/]: open {escape(str(out / 'report.md'))}", highlight=False, soft_wrap=True)


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


def _text_kind(config: Path) -> bool:
    """Whether a config file declares a text pipeline (top-level `kind = "text_..."`)."""
    from ddmkit.discrete.config import is_text_config

    return is_text_config(config)


def _mount_subcommands() -> None:
    from ddmkit.discrete.cli import app as text_app
    from ddmkit.theory.cli import app as theory_app

    app.add_typer(theory_app, name="theory", help="Theory studies: convergence with expert switching, distillation.")
    app.add_typer(text_app, name="text", help="Decentralized text generation: autoregressive and discrete flow matching.")


_mount_subcommands()


def main() -> None:
    try:
        app()
    except DDMError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
