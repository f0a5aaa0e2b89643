import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DDMKIT_QUIET", "1")
torch.set_num_threads(1)


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
