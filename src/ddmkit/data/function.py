"""A data set from a function of the user's code: data.name = "package.module:function".

The config the user runs names the function; ddmkit imports it there and then, and never from
anything written in a run folder (a run folder records the name only as a label). It is called as

    fn(n_train=..., n_test=..., seed=..., **data.params)

with only the keywords its signature accepts (all of them when it takes **kwargs): n_train and
n_test are data.n_train and data.n_test (0: all the function has), seed is data.seed. A data.params
key the function does not take, or a required argument ddmkit cannot supply, is a DDMError. It
returns one of

    (train, test)                                     arrays or tensors of shape (N, ...)
    {"train": ..., "test": ..., "train_labels": ..., "test_labels": ...}     (labels optional)
    (train_dataset, test_dataset)                     torch Datasets of tensors or (tensor, label)

Everything returned is checked (numeric, finite, within float32's range, (N, ...) with the same
trailing shape in both splits, image-shaped data (N, C, H, W) with C = 1 or 3 in [-1, 1], integer
labels one per row) with a message naming data.name. ddmkit then keeps at most
n_train / n_test rows of each split (a seeded subset).
"""
from __future__ import annotations

import inspect
import math
import re
import traceback
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ddmkit.data.arrays import ArrayData, check_float32_range, check_sample_size, take_rows
from ddmkit.data.images import check_image_range
from ddmkit.errors import DDMError
from ddmkit.user_code import import_named, what_it_is

FUNCTION_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # package.module:function
PASSED = ("n_train", "n_test", "seed")  # what ddmkit passes besides data.params


def is_function_name(name: str) -> bool:
    return bool(FUNCTION_NAME.match(name))


def import_function(name: str) -> Callable:
    """The function `name` names, or a DDMError saying how to make it importable."""
    where = f"data.name = {name!r}"
    fn = import_named(name, where)
    attr = name.partition(":")[2]
    if not callable(fn):
        raise DDMError(f"{where}: {attr!r} is {what_it_is(fn)}, not a function")
    return fn


def check_values(name: str, params: dict[str, Any]) -> None:
    """data.params for a function: TOML values (numbers finite, nested lists and tables allowed)."""
    def walk(key: str, v) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise DDMError(f"data.params.{key}: {v!r}; numbers passed to {name} must be finite")
        if isinstance(v, dict):
            for k, item in v.items():
                walk(f"{key}.{k}", item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(key, item)
    for key, v in params.items():
        if key in PASSED:
            raise DDMError(f"data.params.{key}: set by ddmkit (data.{key}), not by data.params, for {name}")
        walk(key, v)


def call_arguments(name: str, fn: Callable, given: dict[str, Any]) -> dict[str, Any]:
    """The keywords fn is called with: those of `given` its signature accepts; a data.params key it
    does not take, or a required argument not given, is a DDMError."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return given
    params = sig.parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return given
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(k for k in given if k not in named and k not in PASSED)
    if unknown:
        settable = sorted(named - set(PASSED))
        raise DDMError(f"data.params.{unknown[0]}: {name} takes no argument {unknown[0]!r}; the arguments data.params "
                       f"may set: {', '.join(settable) or 'none'} ({', '.join(PASSED)} come from data.n_train, "
                       "data.n_test and data.seed)")
    missing = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and p.name not in given]
    if missing:
        raise DDMError(f"data.name = {name!r}: its argument {missing[0]!r} has no default and ddmkit does not pass "
                       f"it (ddmkit passes {', '.join(PASSED)} and the keys of data.params); set "
                       f"data.params.{missing[0]} or give it a default")
    return {k: v for k, v in given.items() if k in named}


def _from_dataset(name: str, split: str, ds) -> tuple[Any, Any]:
    """(x stacked (N, ...), labels (N,) or None) of a torch Dataset of tensors or (tensor, label)."""
    try:
        items = [ds[i] for i in range(len(ds))]
    except Exception as e:
        raise DDMError(f"data.name = {name!r}: reading its {split} Dataset failed ({type(e).__name__}: "
                       f"{str(e)[:200]}); items must be tensors or (tensor, label) pairs, indexed 0 .. len - 1") from None
    if not items:
        return np.zeros((0, 1), np.float32), None
    pairs = isinstance(items[0], (tuple, list))
    if pairs and not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
        raise DDMError(f"data.name = {name!r}: {split} Dataset items must all be tensors or all (tensor, label) pairs")
    xs = [torch.as_tensor(it[0] if pairs else it) for it in items]
    if len({tuple(x.shape) for x in xs}) > 1:
        raise DDMError(f"data.name = {name!r}: {split} Dataset items have different shapes "
                       f"({tuple(xs[0].shape)}, {next(tuple(x.shape) for x in xs if x.shape != xs[0].shape)})")
    labels = torch.as_tensor([int(it[1]) for it in items]) if pairs else None
    return torch.stack(xs), labels


def _tensor(name: str, what: str, value, ndim_min: int) -> torch.Tensor:
    """value (an array, tensor or nested list of numbers) as a tensor of at least ndim_min dimensions, or a
    DDMError naming data.name and `what`. A torch Dataset is refused before numpy reads it as a sequence (one
    whose __getitem__ never raises IndexError would be read for ever)."""
    if isinstance(value, Dataset):
        raise DDMError(f"data.name = {name!r}: {what} is a torch Dataset ({type(value).__name__}); return both splits "
                       "as Datasets, (train_dataset, test_dataset), or both as arrays or tensors (in a tuple or the "
                       "dict {'train': ..., 'test': ...})")
    try:
        t = value.detach().cpu() if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
    except Exception:
        t = None
    if t is None or t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in (
            torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        dtype = t.dtype if t is not None else getattr(value, "dtype", None)
        raise DDMError(f"data.name = {name!r}: {what} is {type(value).__name__}"
                       f"{f' of {dtype}' if dtype is not None else ''}; expected a numeric array or tensor "
                       "(floats or integers: e.g. np.stack(rows).astype(np.float32))")
    if t.ndim < ndim_min:
        raise DDMError(f"data.name = {name!r}: {what} has shape {tuple(t.shape)}; expected "
                       f"{'(N, ...): one row per sample' if ndim_min == 2 else '(N,)'}")
    return t


def _checked_values(name: str, split: str, t: torch.Tensor) -> torch.Tensor:
    """A split as float32, its values checked: within float32's range, finite, and image-shaped data
    (N, C, H, W) with C = 1 or 3 in [-1, 1] (as the image pipeline takes them)."""
    where = f"data.name = {name!r}: the {split} split"
    check_sample_size(tuple(t.shape), where)
    if t.dtype == torch.uint8 and (t.ndim == 3 or t.ndim == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] > 4):
        fix = "x[:, None] / 127.5 - 1" if t.ndim == 3 else \
            "x.permute(0, 3, 1, 2) / 127.5 - 1 (an array: x.transpose(0, 3, 1, 2))"
        raise DDMError(f"{where} is uint8 of shape {tuple(t.shape)}, images by the look of it, which would train as "
                       f"vectors of 0 .. 255: return float images (N, C, H, W) in [-1, 1], e.g. {fix}; to train on "
                       "the values as they are, return them as floats")
    if t.dtype == torch.float64:
        check_float32_range(t.numpy(), where)
    x = t.float()
    if not torch.isfinite(x).all():
        rows = (~torch.isfinite(x)).reshape(len(x), -1).any(1).nonzero().flatten()[:5].tolist()
        raise DDMError(f"{where} holds NaN or infinite values (first bad rows: {rows}); fix the function")
    check_image_range(x, where, "scale them in the function, e.g. return x / 127.5 - 1 for values in 0 .. 255")
    return x


def _splits(name: str, out) -> list[tuple[str, Any, Any]]:
    """[(split, x, labels)] of what the function returned, in any of the accepted forms."""
    if isinstance(out, dict):
        unknown = sorted(set(out) - {"train", "test", "train_labels", "test_labels"})
        if unknown or not {"train", "test"} <= set(out):
            raise DDMError(f"data.name = {name!r}: returned a dict with keys {sorted(out)}; expected 'train', 'test' "
                           "and optionally 'train_labels', 'test_labels'")
        return [(s, out[s], out.get(f"{s}_labels")) for s in ("train", "test")]
    if isinstance(out, (tuple, list)) and len(out) == 2:
        if all(isinstance(o, Dataset) for o in out):
            return [(s, *_from_dataset(name, s, ds)) for s, ds in zip(("train", "test"), out)]
        return [("train", out[0], None), ("test", out[1], None)]
    raise DDMError(f"data.name = {name!r}: returned {type(out).__name__}; expected (train, test) arrays or "
                   "Datasets, or a dict {'train': ..., 'test': ...}")


def load_function_dataset(name: str, n_train: int, n_test: int, seed: int,
                          params: dict[str, Any]) -> tuple[ArrayData, ArrayData]:
    """Train and test ArrayData from the user function `name` (see the module docstring)."""
    check_values(name, params)
    fn = import_function(name)
    kwargs = call_arguments(name, fn, {"n_train": n_train, "n_test": n_test, "seed": seed, **params})
    try:
        out = fn(**kwargs)
    except DDMError:
        raise
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]  # where in the user's code (or below it) it raised
        raise DDMError(f"data.name = {name!r}: the function raised {type(e).__name__} ({str(e)[:200]}) at "
                       f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()[:120]}) when called with "
                       f"{', '.join(kwargs) if kwargs else 'no arguments'}") from None
    data, shapes = [], {}
    for i, (split, x, labels) in enumerate(_splits(name, out)):
        x = _checked_values(name, split, _tensor(name, f"the {split} split", x, 2))
        if labels is not None:
            if getattr(labels, "dtype", None) in (torch.bool, np.bool_):  # two classes 0, 1, as a file's labels
                labels = labels.long() if torch.is_tensor(labels) else labels.astype(np.int64)
            lab = _tensor(name, f"{split}_labels", labels, 1)
            if lab.shape != (len(x),):
                raise DDMError(f"data.name = {name!r}: {split}_labels has shape {tuple(lab.shape)}; expected "
                               f"({len(x)},), one label per {split} row")
            if lab.is_floating_point():
                raise DDMError(f"data.name = {name!r}: {split}_labels holds {lab.dtype} values; expected whole "
                               "numbers 0, 1, 2, ... of an integer type: return labels.astype(np.int64) (an array) "
                               "or labels.long() (a tensor)")
            if len(lab) and int(lab.min()) < 0:
                raise DDMError(f"data.name = {name!r}: {split}_labels holds negative values (first rows: "
                               f"{(lab < 0).nonzero().flatten()[:5].tolist()}); labels are class indices 0, 1, 2, ...")
            labels = lab.long()
        shapes[split] = tuple(x.shape[1:])
        x, labels = take_rows(x, labels, n_train if split == "train" else n_test, seed + i, shuffle=split == "test")
        data.append(ArrayData(name.rpartition(":")[2], x, labels, None, {"split": split, "function": name}))
    if shapes["train"] != shapes["test"]:
        raise DDMError(f"data.name = {name!r}: train samples have shape {shapes['train']} but test samples "
                       f"{shapes['test']}; both splits must hold samples of one shape")
    if (data[0].labels is None) != (data[1].labels is None):
        raise DDMError(f"data.name = {name!r}: only one split has labels; return labels for both or neither")
    if len(data[0]) == 0:
        raise DDMError(f"data.name = {name!r}: the train split is empty; return at least one sample")
    return data[0], data[1]
