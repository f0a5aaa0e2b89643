"""The files a data set is read from, and a fingerprint of them, so that a run made from a user's files
can tell when they have changed since it loaded them.

    source_files("data/x.npz", {"test_path": "data/t.npz"})   # [data/x.npz, data/t.npz]
    source_fingerprint("image_folder", {"path": "photos"})    # SHA-256 of every image's name, size, time

The files are those named by the config: a `.npy`/`.npz` data.name, and data.params.path and
data.params.test_path (an image folder's images, or an array file). The fingerprint hashes each file's
path (relative to what the config names), size and modification time, not its bytes: it is cheap to
take on every resume, and a file written again counts as changed. Generated data (the synthetic sets,
a `module:function`) have no files and no fingerprint.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ddmkit.data.arrays import is_array_file
from ddmkit.data.images import image_files


def source_files(name: str, params: dict) -> list[Path]:
    """The files or folders the config names as its data (those that exist), in a fixed order."""
    named = [name] if is_array_file(name) else []
    named += [params[key] for key in ("path", "test_path") if isinstance(params.get(key), str)]
    return [Path(p).expanduser() for p in named if Path(p).expanduser().exists()]


def source_fingerprint(name: str, params: dict) -> str | None:
    """SHA-256 of (path, size, modification time) of every data file the config names (a folder: the image
    files the image loaders read); None when the data come from no file."""
    roots = source_files(name, params)
    if not roots:
        return None
    h = hashlib.sha256()
    for i, root in enumerate(roots):
        for file in [root] if root.is_file() else image_files(root):
            stat = file.stat()
            h.update(f"{i} {file.relative_to(root).as_posix()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()
