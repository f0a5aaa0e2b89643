"""One loader interface for every data set: `load_dataset(name, ...)` returns
train and test `ArrayData` kept apart (drawn with different seeds, or split
from a file before anything else sees them).

Names: the synthetic presets (ring8, grid25, gmm32: Gaussian mixtures with
exact truth; moons, checkerboard: no closed form), "mixture" (a Gaussian mixture
written in data.params), a path to a `.npy` / `.npz` file of shape (N, ...), or
"package.module:function" (ddmkit.data.function). Image loaders register in LOADERS.

`data.params` are checked before anything is loaded: an unknown keyword is a
DDMError naming the accepted ones, a number must be finite and within PARAM_BOUNDS,
a list is accepted only for LIST_PARAMS (checked by the loader that takes it), and
the data that come out must be finite and non-empty. A file's values must fit float32
(ddmkit computes in it), and image-shaped data (N, C, H, W) with C = 1 or 3, which
the image pipeline takes, must lie in [-1, 1] (images.check_image_range; values all in [0, 1]
are taken with a warning).

An array file's test split is round(N x test_fraction) rows of a seeded permutation
(default 0.2), of which data.n_test are kept (0: all); or the whole of the file
data.params.test_path names.
"""
from __future__ import annotations

import difflib
import errno
import inspect
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import ddmkit.data.synthetic as synthetic
from ddmkit.data.arrays import (LABEL_NAMES, ArrayData, NpzArrays, check_finite, check_float32_range,
                                check_rows_to_split, check_sample_size, checked_labels, data_array_name, is_array_file,
                                load_array_file, no_sample_array, relative_hint, split_indices, take_rows,
                                warn_unread_arrays)
from ddmkit.data.function import is_function_name, load_function_dataset
from ddmkit.data.images import IMAGE_LOADERS, check_image_range, is_image_shape
from ddmkit.errors import DDMError

# the bounds of every numeric keyword a loader takes (data.params); others are strings
PARAM_BOUNDS: dict[str, tuple[type, float, float]] = {
    "k": (int, 1, 1024), "side": (int, 1, 32), "dim": (int, 1, 1024), "squares": (int, 1, 256),
    "seed": (int, 0, 2**32 - 1), "radius": (float, 0, 1e6), "std": (float, 1e-6, 1e6), "spacing": (float, 0, 1e6),
    "separation": (float, 0, 1e6), "noise": (float, 0, 1e6), "pad_to": (int, 1, 4096),
    "test_fraction": (float, 1e-3, 0.999), "resize": (int, 1, 4096), "crop": (int, 1, 4096)}
LIST_PARAMS = ("weights", "means", "covs", "stds")  # lists of numbers ("mixture"), checked by config_mixture
OPTIONAL = ("pad_to", "resize", "crop")  # numeric keywords that may also be left unset
FIXED = ("n", "generator", "n_train", "n_test", "name")  # set by ddmkit, never by data.params


def accepted_params(fn: Callable, skip: tuple[str, ...] = ()) -> list[str]:
    """The keyword arguments of a loader or preset that data.params may set."""
    return [p for p in inspect.signature(fn).parameters if p not in (*FIXED, *skip)]


def check_params(source: str, params: dict[str, Any], accepted: list[str]) -> None:
    """data.params against a loader's keywords: unknown names, wrong types, non-finite or out-of-range
    numbers are a DDMError naming the field and what is accepted."""
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DDMError(f"data.params.{unknown[0]}: unknown keyword for {source}; accepted: "
                       f"{', '.join(accepted) or 'none (leave data.params empty)'}")
    for key, v in params.items():
        where = f"data.params.{key}"
        if key in LIST_PARAMS:
            if not isinstance(v, list):
                raise DDMError(f"{where}: expected a list of numbers, got {v!r}")
            continue
        if key not in PARAM_BOUNDS:
            if v is not None and not isinstance(v, str):
                raise DDMError(f"{where}: expected a string, got {v!r}")
            continue
        kind, low, high = PARAM_BOUNDS[key]
        if key in OPTIONAL and v is None:
            continue
        is_int = isinstance(v, int) and not isinstance(v, bool)
        fits = is_int or (kind is float and isinstance(v, float))
        if not (fits and (is_int or math.isfinite(v)) and low <= v <= high):
            raise DDMError(f"{where}: {wanted_number(kind, low, high)} (it is {shown_value(v)})")


def wanted_number(kind: type, low: float, high: float) -> str:
    """What a numeric data.params keyword takes: 'give a whole number from 1 to 4096', 'give a number from 0 to
    1e+06'; one wording whether the value is out of range or of another type."""
    if kind is int:
        return f"give a whole number from {low} to {high}"
    return f"give a number from {low:g} to {high:g}"


def shown_value(v: Any) -> str:
    """A data.params value as a message shows it: 0, 2.5, nan; '32', text (with the fix where the text is a number);
    true; [1.0], a list."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return f"{v!r}, text"
        return f"{v!r}, text: write the number unquoted in TOML and --set"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return f"{v!r}, a {'list' if isinstance(v, list) else 'table'}"
    return repr(v)


def _check_loaded(name: str, *splits: ArrayData) -> None:
    for data in splits:
        if len(data) == 0 and data.meta.get("split") == "train":
            raise DDMError(f"data set {name!r} gave no training samples; check data.name, data.params and n_train")
        check_finite(data.x, f"data set {name!r} ({data.meta.get('split', 'data')})")


def _synthetic(name: str, n_train: int, n_test: int, seed: int, params: dict) -> tuple[ArrayData, ArrayData]:
    preset = synthetic.MIXTURES.get(name) or synthetic.SAMPLERS[name]
    check_params(f"the {name!r} preset", params, accepted_params(preset))
    out = []
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1)):
        gen = torch.Generator().manual_seed(seed * 2 + offset)
        if name in synthetic.MIXTURES:
            truth = synthetic.MIXTURES[name](**params)
            x, labels = truth.sample(n, gen, return_labels=True)
        else:
            truth = None
            x, labels = synthetic.SAMPLERS[name](n, gen, **params)
        out.append(ArrayData(name, x.float(), labels, truth, {"split": split, "params": params}))
    return out[0], out[1]


def _read_array(path: str, key: str | None, field: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x (N, ...) float32, labels (N,) or None) of a .npy/.npz file, read without pickle and checked;
    an .npz gives the array `key` (default "x", else its first) and `labels` when it holds one. A path
    starting with "~" is read as a shell reads it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DDMError(f"{field}: data file {path!r} does not exist (or is not a file){relative_hint(path)}")
    arr = load_array_file(p, f"{field}: data file {path!r}")
    labels = None
    if key is not None and not isinstance(arr, NpzArrays):
        raise DDMError(f"data.params.key: {path!r} is a .npy file, which holds one array; key names an array of "
                       "an .npz file: remove it")
    if isinstance(arr, NpzArrays):
        if not arr.files:
            raise DDMError(f"{field}: data file {path!r} holds no arrays")
        samples = [name for name in arr.files if name != "labels"]
        chosen = key or data_array_name(arr.files)
        if not samples or key is None and chosen in LABEL_NAMES and arr[chosen].ndim < 2:
            raise DDMError(no_sample_array(f"{field}: data file {path!r}", arr.files))
        if chosen not in samples:
            said = (f"the array 'labels' of {path!r} holds the labels, not samples" if chosen in arr.files
                    else f"{path!r} holds no array {chosen!r}")
            raise DDMError(f"data.params.key: {said}; accepted: {', '.join(samples)}")
        if key is None:
            warn_unread_arrays(f"{field}: data file {path!r}", arr.files, chosen, "to read another as the "
                               "samples, set data.params.key (a test split of your own: a file of its own, "
                               "data.params.test_path)")
        key = chosen
        labels = arr["labels"] if "labels" in arr.files else None
        arr = arr[key]
    if arr.dtype.kind not in "fiu":  # bool, complex, strings, dates: no silent cast to float32
        raise DDMError(f"{field}: data file {path!r} holds an array of {arr.dtype}; expected numbers (float or int, "
                       "not bool or complex): convert it, e.g. np.save(path, x.astype(np.float32))")
    if arr.dtype == np.uint8 and (arr.ndim == 3 or arr.ndim == 4 and arr.shape[-1] in (1, 3, 4)):
        kind = "grey images (N, H, W)" if arr.ndim == 3 else "channels-last images"
        raise DDMError(f"{field}: data file {path!r} holds uint8 arrays of shape {arr.shape[1:]}, {kind} "
                       f"by the look of them, which would train as vectors of 0 .. 255: for images give "
                       f"data.name = \"image_array\" with data.params.path = {path!r} (it scales the pixels to [-1, 1] "
                       "and puts the channels first); to train on the values as they are, save them as floats, "
                       "np.save(path, x.astype(np.float32))")
    check_float32_range(arr, f"{field}: data file {path!r}")
    try:
        x = torch.as_tensor(np.asarray(arr, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise DDMError(f"{field}: data file {path!r}: not a numeric array ({e})") from None
    if x.ndim < 2 or len(x) == 0:
        raise DDMError(f"{field}: data file {path!r}: expected a non-empty array of samples with at least 2 "
                       f"dimensions, (N, D) or (N, C, H, W), got shape {tuple(x.shape)} (one value per sample: "
                       "save it as (N, 1))")
    check_sample_size(tuple(x.shape), f"{field}: data file {path!r}")
    check_finite(x, f"data file {path!r}")
    check_image_range(x, f"{field}: data file {path!r}", "scale them before saving, e.g. np.save(path, x / 127.5 - 1) "
                      "for values in 0 .. 255")
    return x, checked_labels(labels, len(x), f"{field}: data file {path!r}")


def _warn_channels_last(shape: tuple, path: str) -> None:
    """Warn that samples of shape (H, W, C), C = 1, 3 or 4, look like channels-last images, which train as
    vectors (a uint8 array of them is refused by _read_array, pointing to image_array): how to save them so
    that the image stages read them. Samples the image stages take, (C, H, W) with C = 1 or 3, say nothing."""
    if len(shape) != 3 or shape[-1] not in (1, 3, 4) or is_image_shape(shape):
        return
    fix = "x[..., :3].transpose(0, 3, 1, 2)" if shape[-1] == 4 else "x.transpose(0, 3, 1, 2)"
    warnings.warn(f"data.name: data file {path!r} holds samples of shape {shape}, channels-last images by the look of "
                  f"them, which train as vectors of {math.prod(shape)} values (the MLP networks), not as images: for "
                  f"images, save them channels first with values in [-1, 1], np.save(path, {fix}) (x / 127.5 - 1 "
                  "first for 0 .. 255 pixels), and use the image networks (docs/own-data.md#images)", UserWarning)


def _array_file(path: str, n_train: int, n_test: int, seed: int, params: dict) -> tuple[ArrayData, ArrayData]:
    """Train and test splits of an array file: a test_fraction of its rows (seeded), of which n_test
    are kept (0: all), or the whole file test_path names; then at most n_train training rows."""
    check_params(f"the array file {path!r}", params, ["key", "test_fraction", "test_path"])
    x, lab = _read_array(path, params.get("key"), "data.name")
    _warn_channels_last(tuple(x.shape[1:]), path)
    test_path = params.get("test_path")
    if test_path is None:
        check_rows_to_split(len(x), f"data.name: data file {path!r}", "add rows, or give the test rows a file of "
                            "their own (data.params.test_path; then every row of this file trains)")
        test_idx, train_idx = split_indices(len(x), params.get("test_fraction", 0.2), seed)
        test_idx = test_idx[:n_test] if n_test else test_idx
        train_idx = train_idx[:n_train] if n_train else train_idx
        (xtr, ytr), (xte, yte) = [(x[i], lab[i] if lab is not None else None) for i in (train_idx, test_idx)]
    else:
        if "test_fraction" in params:
            raise DDMError("data.params.test_fraction: not used with data.params.test_path (that file is the whole "
                           "test split); remove one of them")
        xt, lt = _read_array(test_path, params.get("key"), "data.params.test_path")
        if xt.shape[1:] != x.shape[1:]:
            raise DDMError(f"data.params.test_path: {test_path!r} holds samples of shape {tuple(xt.shape[1:])} but "
                           f"{path!r} holds {tuple(x.shape[1:])}; both files must hold samples of one shape")
        if (lab is None) != (lt is None):
            raise DDMError(f"data.params.test_path: only one of {path!r} and {test_path!r} holds 'labels'; give "
                           "both files labels or neither")
        xtr, ytr = take_rows(x, lab, n_train, seed)
        xte, yte = take_rows(xt, lt, n_test, seed + 1, shuffle=True)  # the file's rows in a seeded order
    meta = {"test_path": test_path} if test_path else {}
    return (ArrayData(Path(path).stem, xtr, ytr, None, {"split": "train", **meta}),
            ArrayData(Path(path).stem, xte, yte, None, {"split": "test", **meta}))


LOADERS: dict[str, Callable[..., tuple[ArrayData, ArrayData]]] = {
    **{k: (lambda n_train, n_test, seed, params, _k=k: _synthetic(_k, n_train, n_test, seed, params))
       for k in (*synthetic.MIXTURES, *synthetic.SAMPLERS)},
}


def _image_loader(kind: str) -> Callable[..., tuple[ArrayData, ArrayData]]:
    """A loader from ddmkit.data.images (params: see that module), with bad params a clear error."""
    fn = IMAGE_LOADERS[kind]
    accepted = accepted_params(fn, ("seed",))

    def load(n_train, n_test, seed, params):
        check_params(f"the {kind!r} loader", params, accepted)
        return fn(n_train, n_test, seed, **params)
    return load


LOADERS.update({k: _image_loader(k) for k in IMAGE_LOADERS})


def takes_test_fraction(name: str) -> bool:
    """Whether data set `name` splits its rows by data.params.test_fraction (array files, image folders
    and arrays) rather than by data.n_test alone."""
    if is_array_file(name):
        return True
    return name in IMAGE_LOADERS and "test_fraction" in accepted_params(IMAGE_LOADERS[name], ("seed",))


def _npz_pick(path: str, preferred: tuple[str, ...]) -> str | None:
    """The array of .npz file `path` that a loader preferring `preferred` reads (None: not an .npz, or unreadable)."""
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as f:
            return data_array_name(f.files, preferred) if f.files else None
    except Exception:  # a .npy file (no .files), or one the loader refuses itself
        return None


def pad_fix(name: str | None, side: int, params: dict | None = None, size: tuple[int, int] | None = None) -> str:
    """The data setting that pads data set `name`'s images with black to side x side (None: a loader's
    data.params.pad_to). An array file with data.params `params` is pointed to image_array, which takes
    pad_to, when image_array reads the same rows (no test_path, a key it picks itself); else it gets a line of
    numpy that pads the file (and test_path's) itself, images of size (H, W) centred as pad_to centres them."""
    if name is None or name in IMAGE_LOADERS:
        return f"set data.params.pad_to = {side} (each image padded with black to {side}x{side})"
    if not is_array_file(name):
        return (f"make your data set function {name} return images of {side}x{side} (e.g. padded with -1, black; "
                "ddmkit pads no function's images)")
    params = params or {}
    key, test_path = params.get("key"), params.get("test_path")
    if test_path is None and (key is None or key == _npz_pick(name, ("x", "images"))):
        # read as vectors, which take no pad_to; image_array reads its (N, C, H, W) floats
        fraction = f", data.params.test_fraction = {params['test_fraction']}" if "test_fraction" in params else ""
        keyed = f" (it reads the array {key!r} without data.params.key, which it does not take)" if key else ""
        return (f'read the file as images, which pad_to pads with black: set data.name = "image_array", '
                f'data.params.path = "{name}"{fraction} and data.params.pad_to = {side}{keyed}')
    h, w = size or (side, side)
    top, left = (side - h) // 2, (side - w) // 2
    files = [name] + ([test_path] if test_path else [])
    out = {p: str(Path(p).expanduser().with_name(f"{Path(p).stem}_{side}{Path(p).suffix.lower()}")) for p in files}
    lines = []
    for p in files:
        source = str(Path(p).expanduser())
        if p.lower().endswith(".npz"):
            k = key or _npz_pick(p, ("x",)) or "x"
            lines.append(f"f = dict(np.load({source!r})); f[{k!r}] = np.pad(f[{k!r}], w, constant_values=-1); "
                         f"np.savez({out[p]!r}, **f)")
        else:
            lines.append(f"np.save({out[p]!r}, np.pad(np.load({source!r}), w, constant_values=-1))")
    code = (f"import numpy as np; w = ((0, 0), (0, 0), ({top}, {side - h - top}), ({left}, {side - w - left})); "
            + "; ".join(lines))
    given = " or ".join(f"data.params.{n}" for n, v in (("key", key), ("test_path", test_path)) if v is not None)
    return (f"pad the file{'s' if test_path else ''} with black (-1) to {side}x{side} with numpy, in Python: {code}; "
            f'then set data.name = "{out[name]}"'
            + (f' and data.params.test_path = "{out[test_path]}"' if test_path else "")
            + f" (image_array, the image loader that takes pad_to, takes no {given}: it reads the array 'x' or "
            "'images' of one file and holds out test_fraction of its rows)")


def dataset_names() -> list[str]:
    return sorted(LOADERS)


def load_dataset(name: str, n_train: int = 20000, n_test: int = 5000, seed: int = 0, params: dict | None = None,
                 **more) -> tuple[ArrayData, ArrayData]:
    """Train and test splits of a named data set or an array file. `params` (data.params, which may
    hold a preset's own `seed`) and keyword arguments are the loader's; they are checked first, the
    data checked to be finite and non-empty after."""
    params = {**(params or {}), **more}
    if not all(isinstance(k, str) for k in params):
        raise DDMError("data.params: keys must be names")
    if name not in LOADERS and not is_function_name(name):
        check_path_length(name)
    if name in LOADERS:
        out = LOADERS[name](n_train, n_test, seed, params)
    elif is_array_file(name):
        out = _array_file(name, n_train, n_test, seed, params)
    elif is_function_name(name):
        out = load_function_dataset(name, n_train, n_test, seed, params)
    else:
        out = None
    if out is not None:
        _check_loaded(name, *out)
        return out
    raise DDMError(f"data.name: unknown data set {name!r}{unknown_name_hint(name)}; accepted: "
                   f"{', '.join(dataset_names())}, a path to a .npy/.npz file, or a function of your code as "
                   "'package.module:function'")


def check_path_length(name: str) -> None:
    """data.name, read as a path, short enough for the file system, else a DDMError naming data.name and what to
    give (the file system's own 'File name too long' said to check the path's permissions and its disk)."""
    try:
        Path(name).expanduser().exists()
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        names = ", ".join(dataset_names())
        raise DDMError(f"data.name: {name!r} is too long for a path of this file system; give a built-in data set "
                       f"({names}) or the path of a .npy/.npz file") from None


def unknown_name_hint(name: str) -> str:
    """What the error for an unknown data.name adds: the data set it is a typo of, or, for the path of a folder or
    of a file of another type, the settings that read it."""
    path = Path(name).expanduser()
    if path.is_dir():
        return (f" (it is a folder: for a folder of images set data.name = \"image_folder\" and data.params.path = "
                f"\"{name}\"; for IDX files data.name = \"idx\" and data.params.dir = \"{name}\")")
    if path.is_file():
        return (f" (it is a {path.suffix or 'suffix-less'} file; ddmkit reads arrays from .npy/.npz files: save yours "
                "with np.save(\"data.npy\", x), x of shape (N, D), and set data.name = \"data.npy\")")
    close = difflib.get_close_matches(name, dataset_names(), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
