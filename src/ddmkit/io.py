"""Files: atomic writes, JSON metadata, safetensors weights, folder locks; no pickle anywhere.

Every write goes to a temporary name in the same folder and is renamed into
place, so a crash never leaves a half-written file. `staging_dir` does the
same for a whole folder. Temporary names are hidden and carry the writer's
process id and machine (`.NAME.PID-HOST.XXXXXXXX.tmp`), so `remove_stale_staging`
can remove those of writers that died (kill -9) without touching a live one's.
`folder_lock` makes one process at a time the writer of a folder; `scratch_dir`
is a private working folder that the next user removes if its writer was killed.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ddmkit.errors import DDMError, with_fix

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]  # this machine, in temporary names
STAGING = re.compile(r"^\..+\.tmp$")
_OWNER = re.compile(r"\.(\d+)-([0-9a-f]{6})\.[^.]+\.tmp$")


def _temp_name(path: Path) -> Path:
    """A fresh hidden temporary name beside `path`: .NAME.PID-HOST.XXXXXXXX.tmp. It is chosen before the
    file or folder is made, so a signal (Ctrl-C, SIGTERM) that lands while it is being made still finds
    the name to remove."""
    return path.with_name(f".{path.name}.{os.getpid()}-{HOST}.{secrets.token_hex(4)}.tmp")


def sibling(path: Path, suffix: str) -> Path:
    """A file beside `path` named after it, NAME.SUFFIX; beside a staging folder (.NAME.PID-HOST.R.tmp),
    .NAME.SUFFIX.PID-HOST.R.tmp: a staging name of the same writer, removed with the folder's leftovers
    once that writer is gone (remove_stale_staging)."""
    owner = _OWNER.search(path.name)
    if STAGING.match(path.name) and owner:
        return path.with_name(f"{path.name[:owner.start()]}.{suffix}{path.name[owner.start():]}")
    return path.with_name(f"{path.name}.{suffix}")


def ensure_folder(folder: str | Path) -> Path:
    """Create `folder` (and its parents); a file where a folder is expected is a DDMError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        check_folder_target(folder)
        raise
    return folder


def check_folder_target(folder: str | Path, option: str | None = None) -> Path:
    """A DDMError when `folder` or one of its parents is a file or a symbolic link that leads nowhere, or when the
    folder (or the nearest of its parents that exists) cannot be written to (nothing is created): an output folder
    checked before a long computation that writes it at the end. `option` (e.g.
    "--out"), when the folder came from one, is named at the start of the message."""
    folder = Path(folder)
    named = f"{option} {folder}: " if option else ""
    broken = next((p for p in (folder, *folder.parents) if p.is_symlink() and not p.exists()), None)
    if broken is not None:
        raise DDMError(f"{named}{broken} is a symbolic link that leads nowhere (to itself, in a loop, or to a path "
                       f"that does not exist), where ddmkit writes a folder; remove it "
                       f"(rm {shlex.quote(str(broken))}) and run the command again")
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        instead = f"give {option} another folder" if option else "write to another folder"
        raise DDMError(f"{named}{blocker} is a file, not a folder; move it away (or {instead})")
    nearest = next(p for p in (folder, *folder.parents) if p.exists())  # the folder, or where it would be made
    if not os.access(nearest, os.W_OK | os.X_OK):  # a read-only disk or another user's folder: said before the work
        instead = f"give {option} a folder you can write to" if option else "write to another folder"
        raise DDMError(f"{named}{nearest} cannot be written to (a read-only file system, or not your folder); "
                       f"{instead}")
    return folder


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The permission mask of this process, read once at import: temporary files and folders are made private
# (0600 / 0700) and are given the permissions of an ordinary file or folder (0666 / 0777 less the mask)
# before they take their final name, so results stay readable by whoever could read a plain file there.
UMASK = _process_umask()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    ensure_folder(path.parent)
    if path.is_dir():
        raise DDMError(f"{path} is a folder, but a file is written there; move it away")
    tmp = _temp_name(path)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def nan_as_null(obj):
    """obj with every float NaN replaced by None, in nested dicts, lists and tuples: JSON null (strict JSON
    has no NaN, and readers other than Python's refuse it)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_as_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_as_null(v) for v in obj]
    return obj


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _existing_file(path: Path, fix: str) -> Path:
    if not path.exists():
        raise DDMError(with_fix(f"{path} is missing", fix))
    if not path.is_file():  # the fix for a missing file (train it, copy it) would not remove this one
        raise DDMError(f"{path} is a folder (or another non-file) where ddmkit reads a file; move it away (then, "
                       f"if the file is needed, {fix})")
    return path


def read_json(path: str | Path, fix: str = "re-create it with the ddmkit command that wrote it") -> dict:
    """A JSON file's content; a missing or broken file is a DDMError that ends with `fix`."""
    path = _existing_file(Path(path), fix)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DDMError(with_fix(f"{path} is not valid JSON ({str(e)[:200]})", fix)) from None
    except OSError as e:
        raise DDMError(f"{path} cannot be read ({e}); check its permissions") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors as safetensors. Metadata is stored as one sorted JSON
    string under the key "ddmkit", so equal inputs give equal bytes (the
    format's own string map has no fixed order)."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"ddmkit": json.dumps(metadata, sort_keys=True)} if metadata else None
    write_bytes_atomic(path, save(data, metadata=meta))


def read_metadata(path: str | Path, fix: str = "re-create it") -> dict:
    """The metadata written by save_tensors (empty if none); a missing or corrupt file is a DDMError that
    ends with `fix`."""
    path = _existing_file(Path(path), "train or copy it again")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        out = json.loads(meta.get("ddmkit", "{}"))
    except Exception as e:
        raise DDMError(with_fix(f"{path} is corrupt or not a safetensors file ({str(e)[:200]})", fix)) from None
    if not isinstance(out, dict):
        raise DDMError(with_fix(f"{path}: its ddmkit metadata is not a JSON object", fix))
    return out


def load_tensors(path: str | Path, keys: list[str] | None = None,
                 fix: str = "re-train or re-copy it") -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (only `keys` that it holds, when given, read
    without loading the rest); a missing or corrupt file is a DDMError that ends with `fix`."""
    path = _existing_file(Path(path), fix)
    try:
        if keys is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys if k in f.keys()}
    except (SafetensorError, OSError, ValueError, Exception) as e:
        raise DDMError(f"{path} is corrupt or not a safetensors file ({str(e)[:200]}); {fix}") from None


def load_tensors_hashed(path: str | Path, fix: str = "re-train or re-copy it",
                        keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(the tensors of a safetensors file (only `keys` that it holds, when given), the SHA-256 of all its
    bytes): the file is hashed as it is streamed (sha256_file: a small buffer), then loaded by safetensors,
    so no copy of its bytes is held beside the tensors (the second read comes from the page cache when the
    file fits in it). A missing or corrupt file is a DDMError that ends with `fix`."""
    path = _existing_file(Path(path), fix)
    digest = sha256_file(path)
    return load_tensors(path, keys, fix), digest


def check_finite_tensors(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Every floating tensor finite (no NaN or infinity), else a DDMError naming the file and the tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DDMError(f"{source}: tensor {name!r} holds NaN or infinite values; the file is damaged "
                           "(or the training diverged): re-train or re-copy it")


def sha256_file(path: str | Path) -> str:
    path = _existing_file(Path(path), "copy it back or re-create it")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def removing_new_empty_folders(folder: str | Path):
    """For a body that may create `folder` and its missing parents: those of them left empty at its end are
    removed again (a write that failed or was interrupted leaves no empty folder behind)."""
    created = [path for path in (Path(folder), *Path(folder).parents) if not path.exists()]  # deepest first
    try:
        yield
    finally:
        for path in created:
            try:
                path.rmdir()  # only when empty
            except OSError:
                break


def check_named(folder: Path) -> Path:
    """folder, a folder that a new one replaces: refused when it has no name of its own in its parent ('.', '..',
    '/', an empty --out), whose replacement is written beside it under that name."""
    if folder.name in ("", ".."):
        raise DDMError(f"{folder} is the current, a parent or the root folder, which the folder written there would "
                       f"replace; give a new folder by its name, e.g. {folder / 'out'}")
    return folder


@contextlib.contextmanager
def staging_dir(final: str | Path):
    """Yield a temporary folder next to `final`; on success it replaces
    `final` (which must not exist or is removed; a file or a symbolic link there is a DDMError), on error it is
    deleted (with the parent folders it made, when left empty)."""
    final = check_named(Path(final))
    with removing_new_empty_folders(final.parent):
        ensure_folder(final.parent)
        if final.is_symlink():  # the folder would replace the link, not be written where it points
            raise DDMError(f"{final} is a symbolic link, but a folder is written there; remove the link (rm "
                           f"{shlex.quote(str(final))}), or copy what it points to in its place, and run the command "
                           "again")
        if final.exists() and not final.is_dir():
            raise DDMError(f"{final} is a file, but a folder is written there; move it away, and run the command "
                           "again")
        _remove_dead_writers(final)
        tmp = _temp_name(final)
        try:
            os.mkdir(tmp, 0o700)
            yield tmp
            os.chmod(tmp, 0o777 & ~UMASK)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def scratch_dir(folder: str | Path, name: str):
    """Yield a new private folder FOLDER/.NAME.PID-HOST.R.tmp, removed on leaving; one of NAME left by a
    writer that died (kill -9, where nothing of this process runs on) is removed first."""
    where = Path(folder) / name
    _remove_dead_writers(where)
    tmp = _temp_name(where)
    try:
        os.mkdir(tmp, 0o700)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----- stale temporary files ---------------------------------------------------------
def _remove_dead_writers(path: Path) -> None:
    """Remove the temporary files and folders of `path` (.NAME.PID-HOST.R.tmp beside it) whose writer is gone."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if _writer_gone(old.name):
            remove(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process pid of this machine still runs (a zombie, killed but not yet reaped by its
    parent, does not: it writes nothing more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): the signal's answer stands
        return True
    return state != "Z"


def _writer_gone(name: str) -> bool:
    """Whether the writer named in a temporary name is gone: a process of this machine that no longer
    runs, or a name without a writer (older ddmkit). Another machine's writer counts as alive."""
    owner = _OWNER.search(name)
    return owner is None or (owner.group(2) == HOST and not _alive(int(owner.group(1))))


def stale_staging(root: str | Path) -> list[Path]:
    """Hidden temporary files and folders (`.NAME....tmp`) under root whose writer is gone: a
    process of this machine that no longer runs, or a name without a writer (older ddmkit).
    A live writer's, and another machine's, are left alone."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if not STAGING.match(name):
                continue
            if _writer_gone(name):
                out.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if not STAGING.match(d)]
    return sorted(out)


def remove_stale_staging(root: str | Path) -> list[Path]:
    """Remove what stale_staging finds (left by a writer killed mid-write); returns the paths."""
    found = stale_staging(root)
    for p in found:
        remove(p, ignore_errors=True)
    return found


def remove(path: Path, ignore_errors: bool = False) -> None:
    """Remove a file, a link or a folder tree (nothing when it is gone; ignore_errors: also what cannot be
    removed, e.g. a folder another process empties at the same time)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors, **{RMTREE_HANDLER: _named_in_full})
    else:
        path.unlink(missing_ok=True)


RMTREE_HANDLER = "onexc" if sys.version_info >= (3, 12) else "onerror"  # onerror is deprecated from 3.12


def _named_in_full(function, path, error) -> None:
    """shutil.rmtree's error handler: the error again, naming the file by its whole path (rmtree's own names it
    relative to the folder it was emptying, e.g. `Permission denied: top-1.safetensors`)."""
    error = error[1] if isinstance(error, tuple) else error  # onerror's exc_info, or onexc's exception
    if isinstance(error, OSError) and error.errno is not None and error.filename != path:
        raise type(error)(error.errno, error.strerror, path) from error
    raise error


def entries(folder: Path, but: Path | None = None) -> list[Path]:
    """What a folder holds, `but` aside (e.g. its lock file); nothing when there is no such folder."""
    return [p for p in folder.iterdir() if p != but] if folder.is_dir() else []


# ----- folder locks -----------------------------------------------------------------
_HELD: dict[str, list] = {}  # lock path -> [file descriptor, depth] of the locks this process holds


def _owner(path: Path) -> tuple[int | None, str | None]:
    """(process id, host name) written in a lock file, as far as it can be read."""
    try:
        words = path.read_text().split()
    except OSError:
        words = []
    return (int(words[0]) if words and words[0].isdigit() else None), (words[1] if len(words) > 1 else None)


def _holder(path: Path) -> str:
    pid, host = _owner(path)
    if pid is None:
        return "another process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a lock path that is a link fails to open, not writes where it points


def _acquire(path: Path) -> int:
    """An open descriptor of the lock file holding its lock, or -1 when another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): an exclusive create, a dead holder's file removed first
        for _ in range(2):
            try:
                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid, _ = _owner(path)
                if pid is not None and _alive(pid):
                    return -1
                path.unlink(missing_ok=True)
        return -1
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return -1
        try:  # the holder may have removed the file between our open and flock: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def folder_lock(path: str | Path, what: str = "the folder"):
    """Hold the lock file `path` (an exclusive flock, with this process's id written in it) for the
    duration. Another holder, live in any process, makes it a DDMError naming that process; a file
    left by a process that died holds no lock and is taken over. Re-entrant within one process. The
    folders made for the lock file are removed again at the end if left empty."""
    path = Path(path)
    key = os.path.abspath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    with removing_new_empty_folders(path.parent), _locked(path, what):  # a refused lock leaves no new folder
        yield


@contextlib.contextmanager
def _locked(path: Path, what: str):
    """folder_lock's first hold in this process."""
    key = os.path.abspath(path)
    ensure_folder(path.parent)
    if path.is_symlink() or (path.exists() and not path.is_file()):  # a link: it would write into its target
        what_it_is = "a symbolic link" if path.is_symlink() else "a folder"
        raise DDMError(f"{path} is {what_it_is}, not a lock file; remove it (ddmkit creates the lock itself)")
    fd = _acquire(path)
    if fd < 0:
        raise DDMError(f"{what} is in use by {_holder(path)} (lock {path}); wait for it to finish or stop it. "
                       "A lock left by a process that died is taken over by the next run")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
