"""The one in-memory form of a data set: `ArrayData`, with its content hash, a seeded row subset and the
checks of a file's values (finite, within float32's range) and labels (one whole number 0, 1, ... per row)."""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddmkit.errors import DDMError
from ddmkit.truth import GaussianMixture


@dataclass
class ArrayData:
    """x (N, *data_shape) float32; labels (N,) int64 or None (true component,
    class or source); truth: the exact mixture when known."""

    name: str
    x: torch.Tensor
    labels: torch.Tensor | None = None
    truth: GaussianMixture | None = None
    meta: dict = field(default_factory=dict)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


def content_hash(x: torch.Tensor) -> str:
    """SHA-256 of the array's bytes and shape (the data's identity in manifests)."""
    a = np.ascontiguousarray(x.detach().cpu().numpy())
    h = hashlib.sha256(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def take_rows(x: torch.Tensor, labels: torch.Tensor | None, n: int, seed: int, shuffle: bool = False):
    """(x, labels) cut to n rows: a seeded subset in the original order (all rows when n is 0 or
    not smaller than len(x)). shuffle: the rows in a seeded random order instead, as a test split needs
    them (its held-out sets are cut in consecutive blocks, which a file sorted by class would bias)."""
    if shuffle:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n or len(x)]
    elif not n or n >= len(x):
        return x, labels
    else:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx], (labels[idx] if labels is not None else None)


def relative_hint(path: str | Path) -> str:
    """What a message about a missing `path` adds when the path is relative: where it was looked for."""
    if Path(path).expanduser().is_absolute():
        return ""
    return (f"; a relative path is read from the folder ddmkit runs in ({Path.cwd()}), not the config's: run ddmkit "
            "from the folder it is relative to, or give an absolute path")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as a model hub spells it
FOLDER_NAMES = frozenset({"models", "model", "runs", "run", "checkpoints", "checkpoint", "weights", "pretrained",
                          "data", "vae", "autoencoder", "encoder", "encoders", "outputs", "output", "out", "saved"})


def looks_like_hub_id(text: str) -> bool:
    """Whether a missing folder given as `text` reads as a model hub id, 'owner/name': one slash between two names
    of a hub's characters (letters, digits, '-', '_', '.'; no '..', no './'), neither a usual folder name
    (models/vae is a path), and no folder named like its owner here."""
    owner, _, name = text.partition("/")
    return (HUB_ID.fullmatch(text) is not None and ".." not in text and not name.endswith(".")
            and not {owner.lower(), name.lower()} & FOLDER_NAMES and not Path(owner).exists())


def named_as_given(given: str | Path, resolved: Path) -> str:
    """A path as the user wrote it, quoted, and the absolute path it resolved to where that differs:
    "'enc' (resolved to /home/me/enc)"."""
    text = str(given)
    return f"{text!r}" if str(resolved) == text else f"{text!r} (resolved to {resolved})"


def missing_folder_text(field: str, given: str | Path, resolved: Path, wanted: str, saving: str,
                        other: str = "") -> str:
    """The one line of a model folder `given` (as the user wrote it) that does not exist: the path as given, the
    absolute path it resolved to (`resolved`: where it was looked for), the fix (`wanted`: the folder
    save_pretrained writes; `other`: another, as ", or ...") and that ddmkit downloads nothing; where `given`
    looks_like_hub_id, how to save that model as a folder too (`saving`: the Python, with ID and FOLDER)."""
    text, where = str(given), named_as_given(given, resolved)
    hub = (f"; if {text!r} is a model hub id: on a machine with network access, {saving.replace('ID', repr(text))}, "
           "then copy FOLDER here and give its path" if looks_like_hub_id(text) else "")
    return (f"{field}: folder {where} does not exist; give {wanted} by its absolute path or one relative to the "
            f"folder ddmkit runs in{other}; ddmkit reads local folders only and cannot download from a model hub{hub}")


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(test rows, train rows) of n: round(n x test_fraction) rows of a seeded permutation for the
    test split (at least one, and at least one row left for training when n > 1), the rest for training."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, int(round(n * test_fraction)))) if n > 1 else 0
    return perm[:n_test], perm[n_test:]


def check_rows_to_split(n: int, where: str, fix: str = "add rows") -> None:
    """A data set of one row cannot give split_indices both a test row and a training row: a DDMError."""
    if n < 2:
        raise DDMError(f"{where} holds {n} row{'' if n == 1 else 's'}; splitting it into a test split (at least one "
                       f"row) and a training split (at least one) needs 2 rows or more: {fix}")


def check_sample_size(shape: tuple, where: str) -> None:
    """Samples whose shape (shape[1:] of (N, ...)) has an axis of length 0 hold no values: a DDMError opening
    with `where` (a slice past the end, x[:, :, 16:32] of 16-pixel images, makes them)."""
    if len(shape) > 1 and 0 in shape[1:]:
        raise DDMError(f"{where}: its samples, of shape {tuple(shape[1:])}, hold no values (an axis of length 0: "
                       "a slice past the end?); give samples of at least one value, (N, D) or (N, C, H, W)")


def check_finite(x: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.reshape(len(x), -1).any(1).nonzero().flatten()[:5].tolist()
        raise DDMError(f"{where}: data holds NaN or infinite values (first bad rows: {rows}); "
                       "clean or drop those rows before partitioning")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float32_range(a: np.ndarray, where: str) -> None:
    """Finite values too large for float32 (ddmkit computes in float32), e.g. 1e39 in a float64 file, are a
    DDMError naming the first rows, said before the cast to float32 would turn them into infinities."""
    if a.dtype.kind != "f" or a.dtype.itemsize <= 4 or a.size == 0:
        return
    with np.errstate(invalid="ignore"):
        big = np.isfinite(a) & (np.abs(a) > FLOAT32_MAX)
    if big.any():
        rows = np.flatnonzero(big.reshape(len(a), -1).any(1))[:5].tolist() if a.ndim else [0]
        raise DDMError(f"{where}: values exceed float32's range (up to {np.abs(a[big]).max():.3g}; float32, which "
                       f"ddmkit computes in, holds at most {FLOAT32_MAX:.3g}; first bad rows: {rows}); rescale the "
                       "data, e.g. x / np.abs(x).max(), and save it again")


ARRAY_SUFFIXES = (".npy", ".npz")


def is_array_file(name: str) -> bool:
    """Whether data.name is the path of a .npy or .npz file (the suffix in any case: x.NPY too), read as vectors."""
    return name.lower().endswith(ARRAY_SUFFIXES)


LABEL_NAMES = ("labels", "label", "y", "targets", "target", "classes")


def data_array_name(files: list[str], preferred: tuple[str, ...] = ("x",)) -> str | None:
    """The array of an .npz file that holds the data: the first of `preferred` it holds, else its first
    array without a label's name (an .npz saved as labels=..., points=... holds its data second), else its
    first other than "labels"; None when "labels" is all it holds."""
    return next((name for name in preferred if name in files),
                next((name for name in files if name not in LABEL_NAMES),
                     next((name for name in files if name != "labels"), None)))


def warn_unread_arrays(where: str, files: list[str], chosen: str, samples_fix: str) -> None:
    """Warn of the arrays of an .npz file (`where`, arrays `files`) read neither as the samples (`chosen`) nor as
    the labels ('labels'): a file saved as train=..., test=... or x=..., y=... trained on part of what it holds
    without a word. `samples_fix` says how to read another array as the samples."""
    unread = [name for name in files if name not in (chosen, "labels")]
    if not unread:
        return
    fixes = [samples_fix] if any(name not in LABEL_NAMES for name in unread) else []
    if any(name in LABEL_NAMES for name in unread):
        fixes.append("labels are read only from an array named 'labels': np.savez(path, x=x, labels=y)")
    labels = " and 'labels' as the labels" if "labels" in files else ""
    warnings.warn(f"{where} holds {len(files)} arrays: {chosen!r} is read as the samples{labels}, and "
                  f"{', '.join(map(repr, unread))} not read; {'; '.join(fixes)}", UserWarning)


def no_sample_array(where: str, files: list[str]) -> str:
    """The message for an .npz file (`where`) whose arrays, `files`, are all labels: the key to add."""
    named = ", ".join(repr(name) for name in files)
    labels = "labels" if "labels" in files else files[0]
    return (f"{where} holds no sample array, only labels ({named}): save the samples under 'x', "
            f"np.savez(path, x=x, labels={labels}), x of shape (N, D) or (N, C, H, W)")


def _not_numbers(where: str, e: Exception) -> DDMError:
    return DDMError(f"{where} is not a .npy/.npz array file, or holds Python objects (ddmkit reads arrays of "
                    f"numbers only, never pickle: save a numeric array with np.save or np.savez) "
                    f"({type(e).__name__})")  # numpy's own text suggests loading pickle


def _numeric(name: str) -> str:
    """How to save the array `name` as numbers: labels as whole numbers, samples as float32 rows."""
    return f"np.asarray({name}, dtype=np.int64)" if name in LABEL_NAMES else "np.stack(rows).astype(np.float32)"


class NpzArrays:
    """The arrays of an .npz file (np.load's NpzFile reads each one only when asked): `files`, and
    arrays[name], whose array of Python objects (or damaged member) is a DDMError opening with `where`
    and naming the array, as load_array_file's for a .npy file."""

    def __init__(self, npz, where: str):
        self.npz, self.where, self.files = npz, where, npz.files

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.npz[name]
        except Exception as e:  # an object array (pickle refused) or a damaged member
            raise DDMError(f"{self.where}: its array {name!r} holds Python objects (an object array, e.g. rows of "
                           "several lengths) or is damaged; ddmkit reads arrays of numbers only, never pickle: save "
                           f"one numeric array, e.g. np.savez(path, {name}={_numeric(name)}) "
                           f"({type(e).__name__})") from None


def load_array_file(path, where: str):
    """np.load of a .npy/.npz file without pickle (an array, or NpzArrays); a file that is not one, or
    holds Python objects, is a DDMError opening with `where` that says what to save instead."""
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # a corrupt or pickled file
        raise _not_numbers(where, e) from None
    return NpzArrays(arr, where) if isinstance(arr, np.lib.npyio.NpzFile) else arr


def checked_labels(labels, n: int, where: str) -> torch.Tensor | None:
    """A file's labels as int64 (n,), or None: one whole number 0, 1, 2, ... per row (a class or source
    index; class-conditional networks look them up in a table), else a DDMError naming the file."""
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise DDMError(f"{where}: 'labels' has shape {lab.shape}, expected ({n},): one label per row")
    if lab.dtype.kind not in "iub":
        raise DDMError(f"{where}: 'labels' holds {lab.dtype} values; expected whole numbers 0, 1, 2, ... (an integer "
                       "array, e.g. labels.astype(np.int64))")
    if n and lab.min() < 0:
        rows = np.flatnonzero(lab < 0)[:5].tolist()
        raise DDMError(f"{where}: 'labels' holds negative values (first rows: {rows}); labels are class indices "
                       "0, 1, 2, ...")
    return torch.as_tensor(lab.astype(np.int64))
