"""Two measurements for the report: sampling with experts removed, and the
statistics-only router against the learned one.

    missing_expert_study(cfg, run)   quality as 0, 1, 2, ... K-1 experts are removed
                                     (a fixed random order), the router renormalised
                                     over the rest: the DDM's resilience to lost nodes
    stats_router_study(cfg, run)     samples routed by the Gaussian posterior of the
                                     islands' published statistics (no raw data)
"""
from __future__ import annotations

import warnings

import torch

from ddmkit.config import RunConfig
from ddmkit.ddm import load_ddm, sample_ddm
from ddmkit.ddm.load import island_stats_router
from ddmkit.ddm.sampling import config_options
from ddmkit.evaluation.sets import evaluate_all
from ddmkit.progress import track

STATS_STRATEGIES = ("top-1", "top-2", "full")


def study_size(cfg: RunConfig) -> int:
    """Samples per study row: evaluate.study_n, at most the main rows' sample.n."""
    return min(cfg.evaluate.study_n, cfg.sample.n)


def removal_order(k: int, seed: int) -> list[int]:
    """The order in which experts are removed: a permutation fixed by seed."""
    return torch.randperm(k, generator=torch.Generator().manual_seed(seed)).tolist()


def study_set(cfg: RunConfig, ddm, strategy: str, device, drawn: dict | None = None) -> tuple[torch.Tensor, dict]:
    """(samples on the CPU, info) of one study row: `strategy` on `ddm` with the config's [sample] settings at
    study_size samples. drawn: the rows of the learned router with every expert the run has, by strategy, drawn
    by an earlier study of this evaluation (missing_expert_study's row 0 is stats_router_study's learned row of
    its strategy: the same DDM, noise and settings, so the same samples); None: ddm is another DDM."""
    if drawn is not None and strategy in drawn:
        return drawn[strategy]
    s = cfg.sample
    x0, info = sample_ddm(ddm, strategy, study_size(cfg), s.steps, s.solver, s.seed, device, **config_options(s))
    row = (x0.cpu(), info)  # scored on the CPU, beside the test split and the truth
    if drawn is not None:
        drawn[strategy] = row
    return row


def missing_expert_study(cfg: RunConfig, run, test: torch.Tensor, truth, strategy: str = "top-2",
                         device="cpu", drawn: dict | None = None) -> list[dict]:
    """One row per number of removed experts m = 0 .. P-1 of the P experts the run has (experts whose
    folders are missing are absent from every row, "already_missing"): which were removed and the
    sample metrics. drawn: see study_set (row 0 is kept there, or taken from there)."""
    s = cfg.sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing experts: named in the rows
        whole = load_ddm(run, device)
    absent = list(whole.meta.get("missing_experts", []))
    order = [c for c in removal_order(whole.k, s.seed) if c not in absent]
    samples, infos, removed = {}, {}, {}
    for m in track(range(len(order)), "missing experts", lambda m: f"{m} removed"):
        if m == 0:  # none removed: the DDM loaded whole above
            ddm = whole
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ddm = load_ddm(run, device, exclude=order[:m])
        name = f"{m} removed"
        samples[name], infos[name] = study_set(cfg, ddm, strategy, device, drawn if m == 0 else None)
        removed[name] = sorted(order[:m])
    result = evaluate_all(samples, infos, test, truth, cfg.evaluate.chunk)
    return [{"removed": m, "experts_removed": removed[name], "already_missing": absent, "strategy": strategy,
             **result["rows"][name]} for m, name in enumerate(samples)]


def stats_row_name(strategy: str, label: str) -> str:
    """A row of the statistics-only router study: "top-1 (learned router)", "top-1 (statistics-only router)"."""
    return f"{strategy} ({label} router)"


def stats_row_order(rows: dict) -> list[str]:
    """The study's row names in the order it draws them (STATS_STRATEGIES, each learned then statistics-only),
    any other after: a metrics.json keeps them with its keys sorted (full first)."""
    order = [stats_row_name(s, label) for s in STATS_STRATEGIES for label in ("learned", "statistics-only")]
    return [name for name in order if name in rows] + [name for name in rows if name not in order]


def stats_router_study(cfg: RunConfig, run, test: torch.Tensor, truth, device="cpu",
                       drawn: dict | None = None) -> dict:
    """Sample metrics of learned vs statistics-only routing for STATS_STRATEGIES (drawn: see study_set; the
    learned router's rows are taken from there, or kept there)."""
    learned = load_ddm(run, device)
    stats = learned.with_router(island_stats_router(run)[0], "statistics-only", capturable=False)
    samples, infos = {}, {}
    for strategy in track(STATS_STRATEGIES, "statistics-only router"):
        for label, ddm in (("learned", learned), ("statistics-only", stats)):
            name = stats_row_name(strategy, label)
            samples[name], infos[name] = study_set(cfg, ddm, strategy, device, drawn if label == "learned" else None)
    return evaluate_all(samples, infos, test, truth, cfg.evaluate.chunk)
