import contextlib
import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

# Ray is an optional dependency (`pip install 'ddmkit[ray]'`, which dev.py's setup installs): the tests that start
# or check the Ray backend skip where it is not installed (a GPU machine with torch alone)
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'ddmkit[ray]')")

os.environ.setdefault("DDMKIT_QUIET", "1")
torch.set_num_threads(1)
# a suite started in the background of a shell (`cmd &`) inherits SIGINT ignored, and so would every command the
# tests start, whose Ctrl-C handling they check: such commands get SIGINT's default action back
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def raising_after(real, n: int, error: BaseException):
    """`real`, wrapped to raise `error` from its (n + 1)-th call on: a job killed or crashing mid-way."""
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > n:
            raise error
        return real(*args, **kwargs)
    return wrapped


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def run_cli(*args) -> subprocess.CompletedProcess:
    """`ddmkit ARGS` in this process, answered as subprocess.run answers (returncode, stdout, stderr as printed):
    no interpreter to start and no torch to import per command (seconds each), on the CPU threads set above.
    An exception other than the CLI's own exit (a traceback for a user) fails the test. What main() sets for
    the process (argv, the SIGTERM handler, how warnings print) is put back after. Tests about the command as
    a process of its own (signals, exit by the interpreter, start-up) start one instead."""
    from ddmkit.cli import main

    argv, sigterm, formatwarning = sys.argv, signal.getsignal(signal.SIGTERM), warnings.formatwarning
    sys.argv, out, err = ["ddmkit", *map(str, args)], io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with pytest.raises(SystemExit) as raised:
                main()
    finally:
        sys.argv, warnings.formatwarning = argv, formatwarning
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(["ddmkit", *map(str, args)], raised.value.code or 0, out.getvalue(),
                                       err.getvalue())


@pytest.fixture
def cli():
    """run_cli: `ddmkit ARGS` in this process, as subprocess.run would answer."""
    return run_cli


@pytest.fixture
def ddmkit():
    """`ddmkit ARGS` in this process (run_cli): (exit code, stdout, stderr on one line)."""
    def run(*args):
        done = run_cli(*args)
        return done.returncode, done.stdout, " ".join(done.stderr.split())
    return run


def children_running(parent: int, marker: bytes) -> list[int]:
    """The ids of the processes whose parent is `parent` and whose command line holds `marker`, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and marker in cmd:
            out.append(int(stat.parent.name))
    return out


def spawned_children(parent: int) -> list[int]:
    """The processes multiprocessing spawned (spawn_main) whose parent is `parent`."""
    return children_running(parent, b"spawn_main")


def alive(pid: int) -> bool:
    """Whether process pid runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def started_with_children(argv: list, env: dict, log_path: Path, ready, children: int = 2):
    """Run argv in a session of its own (output to log_path) until ready() holds and it has spawned
    `children` processes: yields (its process, their ids); any of them still alive after is killed."""
    log = open(log_path, "w+")
    process = subprocess.Popen(argv, start_new_session=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    spawned = []
    try:
        deadline = time.monotonic() + 120
        while not ready() or len(spawned) < children:
            assert process.poll() is None and time.monotonic() < deadline, Path(log_path).read_text()
            time.sleep(0.05)
            spawned = spawned_children(process.pid)
        yield process, spawned
    finally:
        for pid in [process.pid, *spawned]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        log.close()
