"""Typer commands for text, mounted by the main CLI as `ddmkit text ...`:

    ddmkit text run configs/text_ar.toml [--out DIR] [--force] [--seed N]
    ddmkit text exactness [--k 3] [--vocab 4] [--length 6] [--seed 0] [--out FILE]
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ddmkit.errors import DDMError

app = typer.Typer(help="Decentralized text generation: autoregressive and discrete flow matching experts.",
                  no_args_is_help=True)
console = Console()


def _fail(e: DDMError):
    console.print(f"[red]error:[/red] {escape(str(e))}")
    raise typer.Exit(2)


@app.command()
def run(config: Path = typer.Argument(..., help="TOML with kind = 'text_ar' or 'text_dfm'"),
        out: Optional[Path] = typer.Option(None, "--out", help="output folder (default runs/<config name>)"),
        force: bool = typer.Option(False, "--force", help="delete the output folder first"),
        seed: Optional[int] = typer.Option(None, "--seed", help="override every seed of the config")):
    """Partition a corpus, train experts, centralized model and router, evaluate, write the report."""
    from ddmkit.discrete.pipeline import run_text

    try:
        report = run_text(config, out, force, seed)
    except DDMError as e:
        _fail(e)
    folder = out or Path("runs") / config.stem
    table = Table("model", "held-out bits per byte")
    for name, row in report["bits_per_byte"].items():
        table.add_row(name, f"{row['all']:.3f}")
    console.print(table)
    console.print(f"report: {folder / 'report.md'}", markup=False)


@app.command()
def exactness(k: int = typer.Option(3, help="number of Markov chains (clusters)"),
              vocab: int = typer.Option(4, help="symbols per chain"),
              length: int = typer.Option(6, help="sequence length enumerated (vocab**length sequences)"),
              seed: int = typer.Option(0, help="seed of the random chains"),
              out: Optional[Path] = typer.Option(None, "--out", help="also write the rows as JSON here")):
    """Exact experts + exact posterior reproduce the global next-token law; KL against router error."""
    from ddmkit.discrete.markov import MarkovMixture, exactness_rows
    from ddmkit.io import write_json

    try:
        if vocab ** length > 2_000_000:
            raise DDMError(f"--vocab {vocab} --length {length}: {vocab ** length} sequences to enumerate; "
                           "keep vocab**length <= 2e6")
        rows = exactness_rows(MarkovMixture.random(k, vocab, seed), length)
    except DDMError as e:
        _fail(e)
    table = Table("router eps", "max KL(global||decentralized)", "mean KL", "mean KL(P||r)", "mean TV(P, r)")
    for r in rows:
        table.add_row(f"{r['router_eps']:g}", f"{r['kl_max']:.3g}", f"{r['kl_mean']:.3g}",
                      f"{r['router_kl_mean']:.3g}", f"{r['router_tv_mean']:.3g}")
    console.print(table)
    if out:
        write_json(out, {"k": k, "vocab": vocab, "length": length, "seed": seed, "rows": rows})


if __name__ == "__main__":
    app()
