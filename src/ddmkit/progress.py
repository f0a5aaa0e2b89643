"""Progress bars (Rich) that stay quiet when output is not a terminal or
when DDMKIT_QUIET=1, so logs and tests are not flooded."""
from __future__ import annotations

import contextlib
import os
import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("DDMKIT_QUIET") != "1"


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """Yield advance(n, **fields); a no-op when progress is disabled."""
    if not enabled():
        yield lambda n=1, **kw: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  transient=False) as p:
        task = p.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            p.update(task, advance=n, info=info)
        yield advance
