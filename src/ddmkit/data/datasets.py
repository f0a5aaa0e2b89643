"""One loader interface for every data set: `load_dataset(name, ...)` returns
train and test `ArrayData` kept apart (drawn with different seeds, or split
from a file before anything else sees them).

Names: the synthetic presets (ring8, grid25, gmm32: Gaussian mixtures with
exact truth; moons, checkerboard: no closed form), or a path to a `.npy` /
`.npz` file of shape (N, ...). Later data kinds (images, text) register in
LOADERS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

import ddmkit.data.synthetic as synthetic
from ddmkit.data.arrays import ArrayData, check_finite
from ddmkit.data.images import IMAGE_LOADERS
from ddmkit.errors import DDMError


def _synthetic(name: str, n_train: int, n_test: int, seed: int, **params) -> tuple[ArrayData, ArrayData]:
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


def _array_file(path: str, n_train: int, n_test: int, seed: int, **params) -> tuple[ArrayData, ArrayData]:
    p = Path(path)
    if not p.exists():
        raise DDMError(f"data file {path!r} does not exist")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:  # a corrupt or pickled file
        raise DDMError(f"data file {path!r} could not be read as .npy/.npz without pickle: {e}") from e
    labels = None
    if isinstance(arr, np.lib.npyio.NpzFile):
        key = params.get("key", "x" if "x" in arr.files else arr.files[0])
        labels = arr["labels"] if "labels" in arr.files else None
        arr = arr[key]
    x = torch.as_tensor(np.asarray(arr, dtype=np.float32))
    check_finite(x, f"data file {path!r}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = min(n_test, len(x) // 5) if n_test else len(x) // 5
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    if n_train:
        train_idx = train_idx[:n_train]
    lab = torch.as_tensor(labels).long() if labels is not None else None
    mk = lambda idx, split: ArrayData(p.stem, x[idx], lab[idx] if lab is not None else None, None, {"split": split})
    return mk(train_idx, "train"), mk(test_idx, "test")


LOADERS: dict[str, Callable[..., tuple[ArrayData, ArrayData]]] = {
    **{k: (lambda *a, _k=k, **kw: _synthetic(_k, *a, **kw)) for k in (*synthetic.MIXTURES, *synthetic.SAMPLERS)},
}


def _image_loader(kind: str) -> Callable[..., tuple[ArrayData, ArrayData]]:
    """A loader from ddmkit.data.images (params: see that module), with bad params a clear error."""
    def load(n_train, n_test, seed, **params):
        try:
            return IMAGE_LOADERS[kind](n_train, n_test, seed, **params)
        except TypeError as e:
            raise DDMError(f"data.params for {kind!r}: {e}") from e
    return load


LOADERS.update({k: _image_loader(k) for k in IMAGE_LOADERS})


def dataset_names() -> list[str]:
    return sorted(LOADERS)


def load_dataset(name: str, n_train: int = 20000, n_test: int = 5000, seed: int = 0, **params) -> tuple[ArrayData, ArrayData]:
    """Train and test splits of a named data set or an array file."""
    if name in LOADERS:
        return LOADERS[name](n_train, n_test, seed, **params)
    if name.endswith((".npy", ".npz")):
        return _array_file(name, n_train, n_test, seed, **params)
    raise DDMError(f"data.name: unknown data set {name!r}; accepted: {', '.join(dataset_names())}, "
                   "or a path to a .npy/.npz file")
