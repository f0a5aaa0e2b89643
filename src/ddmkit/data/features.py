"""Feature maps for partitioning: identity, PCA (scikit-learn), a pretrained image encoder or a user function.

A fitted map is a small pure description (`spec` dict + `tensors`) stored next
to the manifest and applied again later (nearest-centroid routing, routing
diagnostics on x0_hat). What a file may describe is a closed set of kinds that
ddmkit applies itself:

    {"kind": "identity"}
    {"kind": "pca", "dim": D, ...}         + tensors pca_mean (F0,), pca_components (D, F0)
    {"kind": "function", "function": "package.module:function"}
    {"kind": "encoder", "folder": ABSOLUTE_PATH, "pool": "cls", "size": S, "normalize": true, "model_type": T,
     "weights_sha256": H, "cls_output": "pooler_output"}    (cls_output: with pool "cls" only)

A "function" spec is a record, by name only: ddmkit never imports code named in a
file. A user function ("package.module:function", mapping a (N, *data_shape)
tensor to (N, F) features) is named only by the config the user runs; it is
imported, checked and registered in this process by `use_features` (the
partition stage does so), and applying a "function" spec looks it up there.
Where it was not registered, applying the map is a DDMError that says so.
An "encoder" spec names a saved transformers vision model (DINOv2, CLIP, ...) that ddmkit loads
again with transformers' own classes, never running code from the folder (ddmkit.data.encoder).
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch

from ddmkit.data.encoder import check_images, encode, encoder_spec
from ddmkit.errors import DDMError
from ddmkit.user_code import import_named, what_it_is

CLUSTER_THREADS = 1  # OpenMP and BLAS threads of the partition's fits (k-means, PCA; scikit-learn's default: cores)
KINDS = ("identity", "pca", "function", "encoder")  # the feature specs a manifest may hold
_USER: dict[str, Callable] = {}  # user feature functions registered in this process, by name


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def is_user_function(name: str) -> bool:
    return name not in ("identity", "pca", "encoder")


def use_features(name: str, fn: Callable | None = None) -> Callable:
    """Register the user feature function `name` ("package.module:function") for this process:
    `fn` when given, else imported by name. Call it only with a name from the config the user
    runs (never one read from a run folder). Returns the function."""
    if fn is None:
        module, _, attr = name.partition(":")
        if not module or not attr:
            raise DDMError(f"partition.features: {name!r} is not 'identity', 'pca', 'encoder' or "
                           "'package.module:function'")
        fn = import_named(name, "partition.features")
    if not callable(fn):
        raise DDMError(f"partition.features: {name!r} is {what_it_is(fn)}, not a function; name a function "
                       "mapping a (N, ...) tensor to (N, F) features")
    _USER[name] = fn
    return fn


def user_features(name: str, what: str = "this") -> Callable:
    """The registered user function `name`, or a DDMError saying how to provide it."""
    if name not in _USER:
        raise DDMError(f"{what} needs the partition's feature function {name!r}, which the run folder names but "
                       "ddmkit never imports from a run folder. Pass the config that names it (--config CONFIG, "
                       f"or `ddmkit run CONFIG`), or, where the command takes --set (sample, evaluate, ...), "
                       f"name it with --set partition.features={name}; from Python call "
                       f"ddmkit.data.features.use_features({name!r}) first; or choose another strategy")
    return _USER[name]


def call_user_features(name: str, fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """fn(x) as a float tensor, checked: a numeric (N, F) array, F >= 1, every value finite."""
    try:
        with torch.no_grad():
            out = fn(x)
    except DDMError:
        raise
    except Exception as e:
        raise DDMError(f"partition.features: {name} raised {type(e).__name__} ({str(e)[:200]}) on a "
                       f"{tuple(x.shape)} tensor; it must map a (N, ...) tensor to (N, F) features") from None
    try:
        arr = out.detach().cpu() if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
    except Exception:
        arr = None
    if arr is None or not (arr.is_floating_point() or arr.dtype in (torch.int8, torch.int16, torch.int32,
                                                                    torch.int64, torch.uint8)):
        raise DDMError(f"partition.features: {name} returned {type(out).__name__}; expected a numeric tensor or "
                       f"array of shape ({x.shape[0]}, F)")
    if arr.ndim != 2 or arr.shape[0] != x.shape[0] or arr.shape[1] < 1:
        raise DDMError(f"partition.features: {name} returned shape {tuple(arr.shape)}; "
                       f"expected ({x.shape[0]}, F), one feature row per input")
    arr = arr.float()
    if not bool(torch.isfinite(arr).all()):
        raise DDMError(f"partition.features: {name} returned NaN or infinite features; fix the function")
    return arr


def pca_components(pca_dim: int | None, rows: int, width: int) -> int:
    """The PCA components fitted: pca_dim (default min(64, width)), at most the data's width and rows (PCA has
    no more); a pca_dim the user set that is lowered so is warned of."""
    dim = min(pca_dim or 64, width, rows)
    if pca_dim is not None and dim < pca_dim:
        warnings.warn(f"partition.pca_dim = {pca_dim} is lowered to {dim}: PCA has at most as many components as "
                      f"the data have dimensions ({width}) and training rows ({rows}); set partition.pca_dim = {dim} "
                      "(or less) to fit the same map without this warning", UserWarning)
    return dim


def fit_features(kind: str, x: torch.Tensor, pca_dim: int | None = None, seed: int = 0,
                 encoder: dict | None = None) -> tuple[dict, dict]:
    """Fit a feature map on x; returns (spec, tensors). A user function (named by the config the
    user runs) is imported and registered here, and checked each time it is applied. `encoder`
    holds the "encoder" kind's settings: {"folder", "pool", "size", "normalize"} (as encoder_spec)."""
    if kind == "identity":
        return {"kind": "identity"}, {}
    if kind == "encoder":
        check_images(x)
        if not encoder or not encoder.get("folder"):
            raise DDMError("partition.encoder: partition.features = 'encoder' needs the folder of a saved "
                           "transformers vision model, e.g. partition.encoder = 'models/dinov2-small'")
        return encoder_spec(**encoder), {}
    if kind == "pca":
        flat = _flat(x).numpy()
        dim = pca_components(pca_dim, *flat.shape)
        from sklearn.decomposition import PCA  # imported on first use: commands that never fit features start faster

        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        with threadpool_limits(limits=CLUSTER_THREADS):  # BLAS sums on the machine's cores would change the bits
            pca = PCA(n_components=dim, random_state=seed).fit(flat)
        return ({"kind": "pca", "dim": dim, "explained_variance": float(pca.explained_variance_ratio_.sum())},
                {"pca_mean": torch.as_tensor(pca.mean_, dtype=torch.float32),
                 "pca_components": torch.as_tensor(pca.components_, dtype=torch.float32)})
    use_features(kind)
    return {"kind": "function", "function": kind}, {}


def apply_features(spec: dict, tensors: dict, x: torch.Tensor, what: str = "this",
                   batch: int = 256) -> torch.Tensor:
    """Features (N, F) of x under a fitted map (a user function only if registered in this process;
    an encoder in batches of `batch` images); F must be the width of the partition's centroids, when
    `tensors` holds them (an encoder folder or a user function changed since gives another)."""
    f = _features(spec, tensors, x, what, batch)
    width = tensors["centroids"].shape[1] if "centroids" in tensors else f.shape[1]
    if f.ndim != 2 or f.shape[1] != width:
        source = {"encoder": f"the encoder folder {spec.get('folder')}",
                  "function": f"the feature function {spec.get('function')!r}"}.get(spec.get("kind"), "the feature map")
        raise DDMError(f"{what}: {source} now gives features of shape {tuple(f.shape[1:])}, but the partition's "
                       f"centroids have {width}: it is not the one the partition was made with; restore it, or "
                       "partition again (`ddmkit partition --config CONFIG --out NEW_RUN`)")
    return f


def _features(spec: dict, tensors: dict, x: torch.Tensor, what: str, batch: int) -> torch.Tensor:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "identity":
        return _flat(x)
    if kind == "pca":
        mean, comp = tensors["pca_mean"].to(x.device), tensors["pca_components"].to(x.device)
        return (_flat(x) - mean) @ comp.T
    if kind == "function":
        name = spec["function"]
        return call_user_features(name, user_features(name, what), x).to(x.device)
    if kind == "encoder":
        return encode(spec, x, batch, what)
    raise DDMError(f"features: unknown kind {kind!r}; accepted: {', '.join(KINDS)}")
