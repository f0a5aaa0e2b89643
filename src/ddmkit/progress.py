"""Progress bars (Rich, on stderr) that stay quiet when stderr is not a terminal or
when DDMKIT_QUIET=1, so logs and tests are not flooded.

    with progress_bar("expert 3", total=steps) as advance:
        advance(1, loss=0.12)                    # one step, and the fields shown beside the bar
    for name in track(names, "sampling"):        # a bar over a loop, showing the item in progress
        ...

A bar opened while another is showing (sampling inside a run, training inside a sweep)
is one more line of the same display, removed when it ends.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_live: list[Progress] = []  # the display now showing, if any


def enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("DDMKIT_QUIET") != "1"


def _fields(fields: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """Yield advance(n, **fields); a no-op when progress is disabled."""
    if not enabled():
        yield lambda n=1, **kw: None
        return
    outer = not _live
    if outer:
        _live.append(Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                              console=Console(stderr=True), transient=False))
        _live[0].start()
    p = _live[0]
    task = p.add_task(description, total=total, info="")

    def advance(n: int = 1, **fields):
        p.update(task, advance=n, **({"info": _fields(fields)} if fields else {}))
    try:
        yield advance
    finally:
        if outer:
            p.stop()
            _live.clear()
        else:
            p.remove_task(task)


def track(items: Iterable[T], description: str, label: Callable[[T], str] = str) -> Iterator[T]:
    """The items, with a bar that advances after each and shows label(item) of the one in progress."""
    items = list(items)
    with progress_bar(description, len(items)) as advance:
        for item in items:
            advance(0, now=label(item))
            yield item
            advance(1)
