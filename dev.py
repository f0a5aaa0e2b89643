#!/usr/bin/env python3
"""Set up ddmkit in ./.venv and run a target; needs nothing but Python 3.10-3.12.

    python3 dev.py demo        # set up, then `ddmkit demo` on the built-in CPU config
    python3 dev.py test        # set up, then the default test suite (about 5 minutes on 2 cores)
    python3 dev.py test-slow   # set up, then the slow tests only
    python3 dev.py setup       # set up only

Torch: on a machine without an NVIDIA driver the setup installs the CPU build
(`torch==2.13.0`, which this project's machines serve as a CPU wheel; elsewhere
set e.g. DDMKIT_TORCH="torch --index-url https://download.pytorch.org/whl/cpu");
with a driver it lets pip pick the default (CUDA) build. Setup is skipped when pyproject.toml has not
changed since the last one.
"""
from __future__ import annotations

import hashlib
import shlex
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".ddmkit-setup"
TARGETS = ("setup", "demo", "test", "test-slow")


def run(cmd: list[str], **kw) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def must(cmd: list[str]) -> None:
    code = run(cmd)
    if code != 0:
        sys.exit(f"dev.py: command failed with exit code {code}: {' '.join(map(str, cmd))}")


def torch_spec() -> str:
    if os.environ.get("DDMKIT_TORCH"):
        return os.environ["DDMKIT_TORCH"]
    has_gpu = shutil.which("nvidia-smi") is not None
    return "torch>=2.3" if has_gpu else "torch==2.13.0"


def setup(extras: str = "dev") -> None:
    """Create ./.venv and install ddmkit (with `extras`, e.g. "dev" for the tests; "" for the demo,
    which needs none of them). A setup that already holds what is asked for is kept."""
    if not (sys.version_info[:2] >= (3, 10) and sys.version_info[:2] <= (3, 12)):
        sys.exit(f"dev.py: ddmkit needs Python 3.10 to 3.12, this is {sys.version.split()[0]}")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + torch_spec().encode()).hexdigest()
    have = STAMP.read_text().split() if STAMP.exists() else []
    if PY.exists() and have[:1] == [want] and (not extras or extras in have[1:]):
        return
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # Torch first, so the package's own `torch>=` range is already met and pip
    # never reaches for the multi-GB CUDA build on a CPU-only machine.
    must(pip + shlex.split(torch_spec()))
    must(pip + ["-e", f".[{extras}]" if extras else "."])
    STAMP.write_text(" ".join([want, *([extras] if extras else [])]))


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else "help"
    extra = argv[2:]
    if target in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    if target not in TARGETS:  # before the setup: a mistyped target installs nothing
        print(__doc__)
        print(f"dev.py: unknown target {target!r}; choose one of {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    setup("" if target == "demo" else "dev")
    env = dict(os.environ)
    if target == "setup":
        return 0
    if target == "demo":
        return run([BIN / "ddmkit", "demo", *extra], env=env)
    if target in ("test", "test-slow"):
        marker = "not slow" if target == "test" else "slow"
        code = run([PY, "-m", "pytest", "-m", marker, "-n", "2", "-q", *extra], env=env)
        return 0 if code == 5 and target == "test-slow" else code
    return 2  # not reached: every target of TARGETS is handled above


if __name__ == "__main__":
    sys.exit(main(sys.argv))
