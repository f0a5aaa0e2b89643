"""Command-line helpers shared by the benchmark scripts (imported as `arguments`: a script's own folder is on
its path): argparse types for counts, --quick's defaults, and the --device check."""
from __future__ import annotations

import argparse

import torch


def positive(text: str) -> int:
    """An argparse type: an integer, 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give 1 or more")
    return value


def nonnegative(text: str) -> int:
    """An argparse type: an integer, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: give 0 or more")
    return value


def fill(args, values: dict) -> None:
    """Set each option the user left out (None) to its value in `values`."""
    for name, value in values.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_device(p: argparse.ArgumentParser, name: str) -> None:
    """--device names a CPU or a CUDA GPU that this machine has (else an argparse error)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        p.error(f"--device {name}: not a device; give cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {name}: give cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {name}: this machine has no CUDA GPU that PyTorch can use; give --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        p.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
