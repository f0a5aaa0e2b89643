"""Feature maps for partitioning: identity, PCA (scikit-learn), or any
user function named "package.module:function" that maps a (N, *data_shape)
tensor to a (N, F) array.

A fitted map is a small pure description (`spec` dict + `tensors`) so it can
be stored next to the manifest and applied again later, e.g. to x0_hat
during routing diagnostics.
"""
from __future__ import annotations

import importlib

import numpy as np
import torch
from sklearn.decomposition import PCA

from ddmkit.errors import DDMError


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def _import(path: str):
    module, _, name = path.partition(":")
    if not module or not name:
        raise DDMError(f"partition.features: {path!r} is not 'identity', 'pca' or 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DDMError(f"partition.features: cannot import {path!r} ({e})") from e


def fit_features(kind: str, x: torch.Tensor, pca_dim: int | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Fit a feature map on x; returns (spec, tensors)."""
    if kind == "identity":
        return {"kind": "identity"}, {}
    if kind == "pca":
        flat = _flat(x).numpy()
        dim = min(pca_dim or min(64, flat.shape[1]), flat.shape[1], flat.shape[0])
        pca = PCA(n_components=dim, random_state=seed).fit(flat)
        return ({"kind": "pca", "dim": dim, "explained_variance": float(pca.explained_variance_ratio_.sum())},
                {"pca_mean": torch.as_tensor(pca.mean_, dtype=torch.float32),
                 "pca_components": torch.as_tensor(pca.components_, dtype=torch.float32)})
    _import(kind)
    return {"kind": "function", "function": kind}, {}


def apply_features(spec: dict, tensors: dict, x: torch.Tensor) -> torch.Tensor:
    """Features (N, F) of x under a fitted map."""
    if spec["kind"] == "identity":
        return _flat(x)
    if spec["kind"] == "pca":
        mean, comp = tensors["pca_mean"].to(x.device), tensors["pca_components"].to(x.device)
        return (_flat(x) - mean) @ comp.T
    f = _import(spec["function"])
    with torch.no_grad():
        out = f(x)
    out = torch.as_tensor(np.asarray(out.detach().cpu()) if torch.is_tensor(out) else np.asarray(out)).float()
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise DDMError(f"partition.features: {spec['function']} returned shape {tuple(out.shape)}; "
                       f"expected ({x.shape[0]}, F), one feature row per input")
    return out
