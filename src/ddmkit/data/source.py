"""The files a data set is read from, and a fingerprint of them, so that a run made from a user's files
can tell when they have changed since it loaded them.

    source_files("data/x.npz", {"test_path": "data/t.npz"})   # [data/x.npz, data/t.npz]
    source_fingerprint("image_folder", {"path": "photos"})    # SHA-256 of every image's name, size, time

The files are those named by the config: a `.npy`/`.npz` data.name, data.params.path and
data.params.test_path (an image folder's images, or an array file), and data.params.dir (an IDX folder's
train-* and t10k-* files). The fingerprint hashes each file's path (relative to what the config names), size
and modification time, not its bytes: it is cheap to take on every resume, and a file written again counts
as changed. Generated data (the synthetic sets,
a `module:function`) have no files and no fingerprint.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ddmkit.data.arrays import is_array_file
from ddmkit.data.images import image_files


IDX_STEMS = tuple(f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))
FOLDER_KEYS = ("path", "test_path", "dir")  # data.params naming files or folders (dir: an IDX folder)


def _named(name: str, params: dict) -> list[tuple[str, Path]]:
    """(how it is read, path) of every file or folder the config names as its data that exists."""
    named = [("file", name)] if is_array_file(name) else []
    named += [(key, params[key]) for key in FOLDER_KEYS if isinstance(params.get(key), str)]
    return [(key, Path(p).expanduser()) for key, p in named if Path(p).expanduser().exists()]


def source_files(name: str, params: dict) -> list[Path]:
    """The files or folders the config names as its data (those that exist), in a fixed order."""
    return [path for _, path in _named(name, params)]


def _files_of(key: str, root: Path) -> list[Path]:
    """The files read from `root`: itself (a file), an IDX folder's *-ubyte[.gz] files, or an image folder's images."""
    if root.is_file():
        return [root]
    if key == "dir":
        return [root / n for stem in IDX_STEMS for n in (f"{stem}.gz", stem) if (root / n).is_file()]
    return image_files(root)


def source_fingerprint(name: str, params: dict) -> str | None:
    """SHA-256 of (path, size, modification time) of every data file the config names (a folder: the image
    files the image loaders read, or an IDX folder's files); None when the data come from no file."""
    roots = _named(name, params)
    if not roots:
        return None
    h = hashlib.sha256()
    for i, (key, root) in enumerate(roots):
        for file in _files_of(key, root):
            stat = file.stat()
            h.update(f"{i} {file.relative_to(root).as_posix()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()
