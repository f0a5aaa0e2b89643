"""The one in-memory form of a data set: `ArrayData`, with its content hash and a finiteness check."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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


def check_finite(x: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.reshape(len(x), -1).any(1).nonzero().flatten()[:5].tolist()
        raise DDMError(f"{where}: data holds NaN or infinite values (first bad rows: {rows}); "
                       "clean or drop those rows before partitioning")
