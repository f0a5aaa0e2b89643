"""Evaluation: every strategy's samples against held-out data, beside the noise floor.

The reference is the held-out test split cut into R + 1 disjoint sets of n
samples (n = the number of generated samples): set 0 plays "true samples"
for the noise floor, sets 1..R are references. Distances (W2, sliced W2,
MMD) are averaged over the R references, so a row and the floor are measured
the same way. Scores under the truth (NLL, mode coverage, off-manifold rate)
need a Gaussian mixture and are blank otherwise.
"""
from __future__ import annotations

import math

import torch

from ddmkit.errors import DDMError
from ddmkit.metrics import mmd_rbf, mode_coverage, nll, off_manifold_rate, w2_exact, w2_sliced
from ddmkit.truth import GaussianMixture

FLOOR = "noise floor (true vs true)"


def reference_sets(test: torch.Tensor, n: int, r: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(floor set, [reference sets]) of n rows each, disjoint, from the test split."""
    if len(test) < 2 * n:
        raise DDMError(f"the test split has {len(test)} samples but evaluation needs at least 2 x sample.n = {2 * n}; "
                       "raise data.n_test or lower sample.n")
    r = min(r, len(test) // n - 1)
    chunks = test[: (r + 1) * n].reshape(r + 1, n, *test.shape[1:])
    return chunks[0], list(chunks[1:])


def sample_metrics(x: torch.Tensor, refs: list[torch.Tensor], truth: GaussianMixture | None) -> dict:
    flat = x.reshape(len(x), -1).double()
    if not torch.isfinite(flat).all():
        return {"w2": math.inf, "w2_std": 0.0, "sliced_w2": math.inf, "mmd": math.inf, "non_finite": True}
    w2s = torch.tensor([w2_exact(flat, ref) for ref in refs])
    row = {"w2": float(w2s.mean()), "w2_std": float(w2s.std()) if len(w2s) > 1 else 0.0,
           "sliced_w2": sum(w2_sliced(flat, ref) for ref in refs) / len(refs),
           "mmd": mmd_rbf(flat, refs[0])}
    if truth is not None:
        row.update({"nll": nll(flat, truth), **mode_coverage(flat, truth), "off_manifold": off_manifold_rate(flat, truth)})
    return row


def evaluate_all(samples: dict[str, torch.Tensor], infos: dict[str, dict], test: torch.Tensor,
                 truth: GaussianMixture | None, reference_count: int = 4) -> dict:
    """{"rows": {name: metrics}, "floor": metrics, "n": n, "references": R}."""
    n = len(next(iter(samples.values())))
    floor_set, refs = reference_sets(test, n, reference_count)
    floor = sample_metrics(floor_set, refs, truth)
    rows = {}
    for name, x in samples.items():
        row = sample_metrics(x, refs, truth)
        row["w2_over_floor"] = row["w2"] / floor["w2"]
        for key in ("expert_calls_per_sample", "wall_time", "router_calls", "velocity_evaluations"):
            if key in infos.get(name, {}):
                row[key] = infos[name][key]
        rows[name] = row
    return {"rows": rows, "floor": floor, "n": n, "references": len(refs)}
