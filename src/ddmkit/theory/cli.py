"""`ddmkit theory ...`: the two theory studies as a Typer sub-app.

The main CLI mounts it with app.add_typer(theory_app, name="theory").
"""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Theory studies on exact Gaussian-mixture truth: convergence and distillation.",
                  no_args_is_help=True)

QUICK = typer.Option(False, "--quick", help="A small version that runs in under a minute (what the tests run).")
SEED = typer.Option(0, "--seed", help="Random seed; the same seed gives the same numbers.")


def _echo(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def convergence(quick: bool = QUICK,
                out: Path = typer.Option(Path("theory-convergence"), "--out", help="Folder for the report."),
                seed: int = SEED) -> None:
    """W2 and pathwise convergence of routed Euler/Heun samplers with full, top-k and switching routing."""
    from ddmkit.theory.convergence import ConvergenceSettings, run_convergence

    settings = ConvergenceSettings.quick(seed) if quick else ConvergenceSettings(seed=seed)
    run_convergence(settings, out, log=_echo)
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'} and plots")


@app.command()
def distill(quick: bool = QUICK,
            out: Path = typer.Option(Path("theory-distill"), "--out", help="Folder for the report."),
            seed: int = SEED) -> None:
    """L(t), Lambda(t) and student flow maps on uniform and Lambda-uniform grids (linear and OU paths)."""
    from ddmkit.theory.distill import DistillSettings, run_distill

    settings = DistillSettings.quick(seed) if quick else DistillSettings(seed=seed)
    run_distill(settings, out, log=_echo)
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'} and plots")
