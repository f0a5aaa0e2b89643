"""Files: atomic writes, JSON metadata, safetensors weights; no pickle anywhere.

Every write goes to a temporary name in the same folder and is renamed into
place, so a crash never leaves a half-written file. `staging_dir` does the
same for a whole folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ddmkit.errors import DDMError


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DDMError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DDMError(f"{path} is not valid JSON ({e}); re-create it with the ddmkit command that wrote it") from e


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors as safetensors. Metadata is stored as one sorted JSON
    string under the key "ddmkit", so equal inputs give equal bytes (the
    format's own string map has no fixed order)."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"ddmkit": json.dumps(metadata, sort_keys=True)} if metadata else None
    write_bytes_atomic(path, save(data, metadata=meta))


def read_metadata(path: str | Path) -> dict:
    """The metadata written by save_tensors (empty if none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("ddmkit", "{}"))
    except Exception as e:
        raise DDMError(f"{path} is corrupt or not a safetensors file ({e}); re-create it") from e


def load_tensors(path: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (only `keys` that it holds, when given, read
    without loading the rest), with a clear error when missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise DDMError(f"{path} is missing; train or copy it again")
    try:
        if keys is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys if k in f.keys()}
    except (SafetensorError, OSError, ValueError, Exception) as e:
        raise DDMError(f"{path} is corrupt or not a safetensors file ({e}); re-train or re-copy it") from e


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staging_dir(final: str | Path):
    """Yield a temporary folder next to `final`; on success it replaces
    `final` (which must not exist or is removed), on error it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
