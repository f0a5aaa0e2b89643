"""The sample sets of a run: which sets a config asks for, and how a name maps to one.

A set is drawn by the DDM with one routing strategy (and a guidance scale and a router), by the
monolith, or by the exact DDM of a Gaussian mixture. Every set of a run starts from the same
noise (and, for class-conditional experts, the same labels): a set of n samples takes the first n.

    plan = planned_sets(cfg, has_truth=True)     # [SampleSet(name="exact (...)", ...), SampleSet("monolith"), ...]
    named_set("top-2", n=1000)                   # a set from a name given on the command line
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import Enum

from ddmkit.config import MONOLITH, RunConfig
from ddmkit.errors import DDMError
from ddmkit.routing import parse_strategy
from ddmkit.routing.table import canonical_name
from ddmkit.routing.strategies import SampleK, TopK, number


class SetKind(Enum):
    DDM = "ddm"  # the learned DDM with a routing strategy
    MONOLITH = "monolith"  # the FLOP-matched monolith
    EXACT = "exact"  # exact cluster velocities and the exact posterior (Gaussian-mixture data only)


EXACT = "exact (full, exact experts + router)"  # the exact DDM's set (full routing)
STATISTICS = "statistics"  # the statistics-only router
STATISTICS_SUFFIX = " (statistics-only router)"  # the name of a set it routed: "top-2 (statistics-only router)"


@dataclass(frozen=True)
class SampleSet:
    name: str  # the set's name (its file is RunFolder.sample_set(name))
    kind: SetKind
    strategy: str  # the routing strategy (DDM and exact sets)
    n: int
    guidance: float = 1.0
    router: str = "learned"  # "learned" or "statistics"


def named_set(name: str, n: int, guidance: float = 1.0) -> SampleSet:
    """The set a name stands for: "monolith", "exact", or a routing strategy (checked; spaces around it
    dropped, so "top-2 " is the set top-2)."""
    name = name.strip()
    if name == MONOLITH:
        return SampleSet(MONOLITH, SetKind.MONOLITH, "", n, guidance)
    if name in ("exact", EXACT):
        return SampleSet(EXACT, SetKind.EXACT, "full", n, guidance)
    try:
        name = canonical_name(name)  # top-02 is the set top-2
    except DDMError as e:
        raise DDMError(f"{e}; or '{MONOLITH}' (the monolith) or 'exact' (mixtures)") from None
    return SampleSet(name, SetKind.DDM, name, n, guidance)


def statistics_set(name: str, n: int, guidance: float = 1.0) -> SampleSet:
    """The set of a routing strategy drawn with the statistics-only router (no learned router needed)."""
    base = named_set(name, n, guidance)
    if base.kind != SetKind.DDM:
        raise DDMError(f"the statistics-only router routes the DDM's experts; {name!r} is not a routing strategy")
    return SampleSet(f"{base.name}{STATISTICS_SUFFIX}", SetKind.DDM, base.name, n, guidance, STATISTICS)


def calls_every_expert(name: str, k: int) -> bool:
    """Whether a strategy, on a DDM of k experts, is full routing under another name: top-n or sample-n
    (at any temperature) with n >= k (every expert, weights r)."""
    strategy = parse_strategy(name)
    return isinstance(strategy, (TopK, SampleK)) and strategy.k >= k


def full_routing_note(name: str, k: int) -> str:
    """The words of the note (after 'note: ') on a strategy that calls every expert (calls_every_expert)."""
    experts = "1 expert" if k == 1 else f"{k} experts"
    return f"{name} on a DDM of K = {experts} calls every expert: the same routing as full"


def sample_options(name: str) -> str:
    """The `ddmkit sample` options that draw the set `name` again, e.g. "--strategy top-2 --router statistics"
    for "top-2 (statistics-only router)", "--strategy top-2 --guidance 2" for "top-2 @ cfg 2"."""
    options = []
    if name.endswith(STATISTICS_SUFFIX):
        name, options = name[:-len(STATISTICS_SUFFIX)], ["--router", "statistics"]
    if " @ cfg " in name:
        name, scale = name.rsplit(" @ cfg ", 1)
        options += ["--guidance", scale]
    return " ".join(["--strategy", shlex.quote("exact" if name == EXACT else name), *options])


def _guided_name(name: str, guidance: float, default: float) -> str:
    return name if guidance == default else f"{name} @ cfg {number(guidance)}"  # reads back as the scale


def planned_sets(cfg: RunConfig, has_truth: bool) -> list[SampleSet]:
    """Every set the config asks for: the exact DDM's (when the data have a closed-form truth), each of
    sample.strategies (and the monolith) at sample.guidance, sample.stats_router_strategies with the
    statistics-only router, and the monolith and sample.sweep_strategy at each extra guidance scale
    of sample.guidance_sweep. The extra sets hold sample.sweep_n samples (default sample.n)."""
    s = cfg.sample
    extra_n = min(s.sweep_n, s.n) if s.sweep_n else s.n
    plan = [named_set(EXACT, s.n)] if has_truth else []
    plan += [named_set(name, s.n, s.guidance) for name in s.strategies]
    plan += [statistics_set(name, extra_n, s.guidance) for name in s.stats_router_strategies]
    for g in s.guidance_sweep:
        if g != s.guidance:
            for name in (MONOLITH, s.sweep_strategy):
                base = named_set(name, extra_n, g)
                plan.append(SampleSet(_guided_name(name, g, s.guidance), base.kind, base.strategy, extra_n, g))
    return [p for p in plan if p.kind != SetKind.MONOLITH or cfg.monolith.enabled]
