import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DDMKIT_QUIET", "1")
torch.set_num_threads(1)


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


@pytest.fixture
def ddmkit(monkeypatch, capsys):
    """`ddmkit ARGS` in this process: (exit code, stdout, stderr on one line)."""
    from ddmkit.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["ddmkit", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            main()
        out, err = capsys.readouterr()
        return exit.value.code, out, " ".join(err.split())
    return run


def spawned_children(parent: int) -> list[int]:
    """The processes multiprocessing spawned (spawn_main) whose parent is `parent`, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmd:
            out.append(int(stat.parent.name))
    return out


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
