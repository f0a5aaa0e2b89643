"""Evaluation: every strategy's samples against held-out data, beside the noise floor.

Exact W2 between two n-point sets fluctuates a lot from draw to draw (on a
mixture, mostly through how many points land in each mode), so every
distance is an average over R independent pairs: the generated samples are
cut into R chunks of `chunk` points, each compared with its own disjoint
held-out reference set. The noise floor is the same measurement with R
further held-out chunks in place of the generated ones: what a perfect
sampler scores at this sample size. Scores under the truth (NLL, mode
coverage, off-manifold rate) use all samples and need a Gaussian mixture.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ddmkit.errors import DDMError
from ddmkit.evaluation.distances import mmd_rbf, w2_exact, w2_sliced
from ddmkit.evaluation.mixture import mode_coverage, nll, off_manifold_rate
from ddmkit.layout import safe_name
from ddmkit.progress import track
from ddmkit.truth import GaussianMixture

FLOOR = "noise floor (true vs true)"


def reference_sets(test: torch.Tensor, chunk: int, r: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(floor chunks, reference chunks): 2 r disjoint sets of `chunk` rows from the test split."""
    if len(test) < 2 * r * chunk:
        raise DDMError(f"evaluation needs 2 x {r} held-out sets of {chunk} points ({2 * r * chunk}) but the test "
                       f"split has {len(test)}; raise data.n_test or lower sample.n / evaluate.chunk")
    sets = list(test[: 2 * r * chunk].reshape(2 * r, chunk, *test.shape[1:]))
    return sets[:r], sets[r:]


def w2_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """w2_exact of each pair, in order, the pairs spread over torch's CPU threads (POT's solver releases the
    GIL, so they run side by side: the same numbers, in about 1 / threads of the time)."""
    with ThreadPoolExecutor(max(1, min(len(pairs), torch.get_num_threads()))) as pool:
        return list(pool.map(lambda pair: w2_exact(*pair), pairs))


def sample_metrics(x: torch.Tensor, refs: list[torch.Tensor], truth: GaussianMixture | None) -> dict:
    """Distances averaged over chunk pairs (x is cut into len(refs) chunks), truth scores over all of x."""
    flat = x.reshape(len(x), -1).double()
    if not torch.isfinite(flat).all():
        return {"w2": math.inf, "w2_sem": None, "sliced_w2": math.inf, "mmd": math.inf, "non_finite": True}
    chunks = flat[: len(refs) * len(refs[0])].reshape(len(refs), len(refs[0]), -1)
    w2s = torch.tensor(w2_pairs(list(zip(chunks, refs))))
    row = {"w2": float(w2s.mean()), "w2_sem": float(w2s.std() / math.sqrt(len(w2s))) if len(w2s) > 1 else None,
           "sliced_w2": sum(w2_sliced(c, ref) for c, ref in zip(chunks, refs)) / len(refs),
           "mmd": mmd_rbf(chunks[0], refs[0])}
    if truth is not None:
        row.update({"nll": nll(flat, truth), **mode_coverage(flat, truth), "off_manifold": off_manifold_rate(flat, truth)})
    return row


def evaluate_all(samples: dict[str, torch.Tensor], infos: dict[str, dict], test: torch.Tensor,
                 truth: GaussianMixture | None, chunk: int = 1000,
                 redraw: Callable[[str], str] = lambda name: f"--strategy {name}") -> dict:
    """{"rows": {name: metrics}, "floor": metrics, "chunk": chunk, "pairs": R}. Every set is scored on the
    same R pairs of `chunk` points (W2 between n-point sets shrinks as n grows, so rows of other sizes
    would not compare): chunk is evaluate.chunk, or the largest set's size when that is smaller; a set
    with fewer points is refused, naming it and the `ddmkit sample` options that draw it again
    (redraw(name)); R is what the smallest set holds, at most what the test split holds (2 R chunks: R
    for the floor, R as references)."""
    chunk = min(chunk, max(len(x) for x in samples.values()))
    short = {name: len(x) for name, x in samples.items() if len(x) < chunk}
    if short:
        listed = ", ".join(f"{name!r} ({size})" for name, size in short.items())
        commands = "; ".join(f"`ddmkit sample RUN {redraw(name)} --n {chunk}`" for name in short)
        raise DDMError(f"sample sets {listed} hold fewer than the {chunk} points every set is scored on (W2 of "
                       f"smaller sets is larger by itself); draw them again with {commands} (or more rows, or "
                       f"leave --n out), or delete their files from RUN/samples/ "
                       f"({', '.join(safe_name(name) + '.safetensors' for name in short)})")
    r = min(min(len(x) for x in samples.values()) // chunk, len(test) // (2 * chunk))  # as many as both hold
    if r == 0:
        raise DDMError(f"evaluation needs 2 held-out sets of {chunk} points (a floor set and a reference set) but "
                       f"the test split has {len(test)}; lower evaluate.chunk to {len(test) // 2} or less (--set "
                       f"evaluate.chunk={len(test) // 2}), or make a run with a larger data.n_test")
    floor_sets, refs = reference_sets(test, chunk, r)
    floor = sample_metrics(torch.cat(floor_sets), refs, truth)
    rows = {}
    for name, x in track(samples.items(), "scoring", lambda item: item[0]):
        row = sample_metrics(x, refs, truth)
        row["w2_over_floor"] = row["w2"] / floor["w2"]
        for key in ("expert_calls_per_sample", "wall_time", "router_calls", "velocity_evaluations"):
            if key in infos.get(name, {}):
                row[key] = infos[name][key]
        rows[name] = row
    return {"rows": rows, "floor": floor, "chunk": chunk, "pairs": r}
