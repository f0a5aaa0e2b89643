"""Stopping a running training job at its next step.

A job is stopped by raising KeyboardInterrupt into it: from a signal handler (a process pool's worker,
ddmkit.launch.backends; a spawned process of a job on several, ddmkit.train.distributed) or from another
thread (PyThreadState_SetAsyncExc, ddmkit.pipeline.run). Such an exception can be lost: Python drops one
raised while it runs a __del__ or a weakref callback, and the job then trains on to its end. So whoever
stops a job also sets its stop flag, and the training loop (ddmkit.train.loop.fit) looks at the flag
once per step and raises KeyboardInterrupt there: the job ends as an interrupted one does (its staging
folder removed, its last checkpoint kept).

A flag belongs to one thread's stop scope, so stopping one thread's job stops no other thread:

    with stop_scope() as stop:   # the flag (a threading.Event) of the jobs this thread runs in the body
        train(...)               # fit() raises KeyboardInterrupt at the step after stop.set()

    stop.set()                   # from another thread: stop that thread's job
    request_stop()               # in the thread itself (a signal handler runs in the main thread)

A few steps must not be cut in two (renaming a run's folders into place, shutting Ray down): there the
signals wait for the end of the block,

    with signals_held(signal.SIGINT, signal.SIGTERM) as caught:
        ...                      # caught: the signals that came meanwhile; the caller says or sends them on
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_scope = threading.local()  # .flag: the Event of this thread's innermost stop scope (none outside one)


@contextlib.contextmanager
def stop_scope(flag: threading.Event | None = None) -> Iterator[threading.Event]:
    """Run the body with `flag` (a new Event when None) as this thread's stop flag; the scope before it is
    restored on leaving, so the flag stops only the jobs of this body."""
    flag = threading.Event() if flag is None else flag
    before = getattr(_scope, "flag", None)
    _scope.flag = flag
    try:
        yield flag
    finally:
        _scope.flag = before


def request_stop() -> None:
    """Set the stop flag of this thread's stop scope (nothing outside one)."""
    flag = getattr(_scope, "flag", None)
    if flag is not None:
        flag.set()


def stop_requested() -> bool:
    """Whether this thread's stop scope was asked to stop."""
    flag = getattr(_scope, "flag", None)
    return flag is not None and flag.is_set()


def check_stop() -> None:
    """Raise KeyboardInterrupt when this thread's stop scope was asked to stop: the training loop's safe point."""
    if stop_requested():
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_held(*signums: int) -> Iterator[list[int]]:
    """The signals `signums` only noted during the block, in the list it yields; the handlers they had are set
    again at its end. In the main thread only, where Python runs signal handlers (elsewhere the list stays
    empty). What a held signal means afterwards is the caller's: sent on, or said."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signums}
    try:
        yield caught
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
