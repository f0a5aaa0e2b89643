"""Controlled expert-data misalignment on exact Gaussian mixtures: conditions and measurements.

The claim under test (Villagra et al., 2026): full-ensemble routing samples most stably yet generates
worst, because experts are wrong away from their own cluster and routing a state to many experts mixes
in wrong velocities. On a run whose experts are nearly exact and whose router is nearly the posterior,
no such mechanism exists. Each condition below induces it in one controlled way; `measure_strategy`
measures one strategy's stability and quality under it.

A condition is written BASE[+MOD...]:

    disjoint            the run's partition (k-means on features): the baseline
    overlap-S           each shard also holds a share S of the rows of each of its 2 nearest clusters
                        (by centroid distance); the base assignment is kept for everything else
    undertrained-F      experts trained for F x the config's steps (and warmup); the router as configured
    random              a random balanced partition instead of k-means on features
  and modifiers, applied at load time (the trained run is never written):
    exact               experts and router replaced by the exact ones of the base partition (exact_ddm)
    tempered-T          r'_k = r_k^(1/T) / sum_j r_j^(1/T)                 (T > 1 flattens, T = 1: r' = r)
    uniform-A           r'_k = (1 - A) r_k + A / K
    permuted-A          r'  = (1 - A) r + A P r,  (P r)_{(j + 1) mod K} = r_j   (A of the mass moved to the
                        next expert, a wrong permutation; permuted-1 routes everything there)

Exact experts of any partition, overlapping or not: with M[c, k] the share of component c's training
rows that shard k holds, shard k is the mixture q_k with component weights pi_c M[c, k] (normalised),
the exact router is the posterior of the shard over the pooled shards,

    r_k(x, t) = sum_c w_c(x, t) M[c, k] / sum_c w_c(x, t) m_c,    m_c = sum_k M[c, k],

(w_c the truth's component posterior), and full routing gives sum_k r_k v_k = the velocity of the
mixture with weights pi_c m_c: the true field when every component is held equally often (m_c equal;
disjoint partitions: m_c = 1).

Per strategy on a Gaussian mixture (same noise x_1 for every strategy and condition, so everything is
paired):

    NLL          per sample -log p_0(x_0) under the truth                (quality)
    W2           exact W2 of the samples to held-out data                (quality, a set distance)
    L_top, L_fd  local Lipschitz constants (ddmkit.analysis.stability)  (stability)
    amplification, Delta_refine  per sample (ddmkit.analysis.stability)  (stability)
    field error  e_v = mean over steps of |v(x_i, t_i) - v*(x_i, t_i)|^2 / D along the strategy's own
                 trajectory, v the routed velocity, v* the truth's velocity (the mechanism: 0 for full
                 routing with exact experts and router)

On images (`measure_image_strategy`) there is no truth: `exact` is refused (`image_condition`), and per
strategy the samples drawn as `ddmkit run` draws them (`routed_samples`: the run's labels reach the
experts and a label-conditional router, guidance inside the experts) are scored by a given FID / KID
function, and amplification and Delta_refine (the definitions of ddmkit.analysis.stability) are taken on
the first `rows` trajectories only (`image_stability`); NLL, W2, L_top and the field error are absent.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ddmkit.analysis.quality import per_sample_quality
from ddmkit.analysis.stability import amplification, local_lipschitz, random_unit, refinement_gap, row_norm
from ddmkit.analysis.trace import trace_strategy
from ddmkit.ddm.model import DDM
from ddmkit.ddm.sampling import sample_ddm
from ddmkit.errors import DDMError
from ddmkit.evaluation.distances import w2_exact
from ddmkit.truth import GaussianMixture

Field = Callable[..., torch.Tensor]
NEIGHBOURS = 2  # overlap-S: the clusters whose rows a shard shares

CONDITION_FORMS = ("disjoint, overlap-S (0 < S <= 1), undertrained-F (0 < F <= 1), random; modifiers +exact, "
                   "+tempered-T (T > 0), +uniform-A and +permuted-A (0 <= A <= 1), e.g. overlap-0.25+tempered-3")
IMAGE_CONDITION_FORMS = CONDITION_FORMS.replace("+exact, ", "")  # data without a truth: no exact experts


# ----- conditions ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """One parsed condition: how the run is trained (partition, steps) and what is applied at load."""

    name: str
    partition: str = "kmeans"  # kmeans | overlap | random
    share: float = 0.0  # overlap-S
    steps_factor: float = 1.0  # undertrained-F
    exact: bool = False
    router: tuple = ()  # (("tempered", T) | ("uniform", A) | ("permuted", A), ...) in the order written

    @property
    def run_name(self) -> str:
        """The training condition (the run folder it needs): modifiers never change training."""
        if self.partition == "overlap":
            return f"overlap-{self.share:g}"
        if self.partition == "random":
            return "random"
        return "disjoint" if self.steps_factor == 1.0 else f"undertrained-{self.steps_factor:g}"

    @property
    def trained(self) -> bool:
        """Whether the measured networks depend on the training seed (exact experts do not)."""
        return not self.exact


def _number(text: str, name: str, ok: Callable[[float], bool], rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise DDMError(f"--conditions {name!r}: {text!r} is not a number with {rule}; accepted: {CONDITION_FORMS}")
    return value


def parse_condition(name: str) -> Condition:
    """A Condition from its name (see the module docstring), or a DDMError listing the forms."""
    parts = [p.strip() for p in str(name).split("+")]
    spaced = next((p for p in parts if len(p.split()) > 1), None)  # 'disjoint tempered-3': a list with spaces
    if spaced:
        raise DDMError(f"--conditions {name!r}: separate conditions with commas, e.g. --conditions "
                       f"{','.join(spaced.split())}")
    if not all(parts):
        raise DDMError(f"--conditions {name!r}: an empty part; accepted: {CONDITION_FORMS}")
    fields: dict = {"name": str(name)}
    first, *mods = parts
    if first == "disjoint" or first == "random":
        fields["partition"] = "kmeans" if first == "disjoint" else "random"
    elif m := re.fullmatch(r"overlap-(.+)", first):
        fields.update(partition="overlap", share=_number(m.group(1), name, lambda s: 0 < s <= 1, "0 < S <= 1"))
    elif m := re.fullmatch(r"undertrained-(.+)", first):
        fields["steps_factor"] = _number(m.group(1), name, lambda f: 0 < f <= 1, "0 < F <= 1")
    else:
        mods = parts  # only modifiers: the disjoint base
    router = []
    for mod in mods:
        if mod == "exact":
            if fields.get("exact"):
                raise DDMError(f"--conditions {name!r}: 'exact' twice; name it once")
            fields["exact"] = True
        elif m := re.fullmatch(r"tempered-(.+)", mod):
            router.append(("tempered", _number(m.group(1), name, lambda t: t > 0, "T > 0")))
        elif m := re.fullmatch(r"(uniform|permuted)-(.+)", mod):
            router.append((m.group(1), _number(m.group(2), name, lambda a: 0 <= a <= 1, "0 <= A <= 1")))
        elif re.fullmatch(r"disjoint|random|(overlap|undertrained)-.+", mod):
            raise DDMError(f"--conditions {name!r}: {mod!r} is a base; write it first, once (BASE[+MOD...]), e.g. "
                           f"{mod}+tempered-3")
        else:
            raise DDMError(f"--conditions {name!r}: unknown part {mod!r}; accepted: {CONDITION_FORMS}")
    return Condition(**fields, router=tuple(router))


def image_condition(name: str) -> Condition:
    """parse_condition for data without a truth: `exact` (the exact experts of a Gaussian mixture) is refused."""
    cond = parse_condition(name)
    if cond.exact:
        raise DDMError(f"--conditions {name!r}: 'exact' replaces the experts and router by the exact ones of a "
                       f"Gaussian-mixture truth, which image data have not; accepted on images: "
                       f"{IMAGE_CONDITION_FORMS}")
    return cond


def random_partition(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A random balanced partition of n rows into k clusters: labels (n,), cluster sizes differ by at most 1."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    labels = torch.empty(n, dtype=torch.long)
    labels[perm] = torch.arange(n) % k
    return labels


def nearest_clusters(centroids: torch.Tensor, m: int = NEIGHBOURS) -> list[list[int]]:
    """For every cluster the m other clusters whose centroids are nearest (ties: lower index first)."""
    d = torch.cdist(centroids.double(), centroids.double())
    d.fill_diagonal_(math.inf)
    m = min(m, len(centroids) - 1)
    return [sorted(range(len(d)), key=lambda j: (float(d[k, j]), j))[:m] for k in range(len(d))]


def overlap_members(labels: torch.Tensor, centroids: torch.Tensor, share: float, seed: int = 0,
                    neighbours: int = NEIGHBOURS) -> list[torch.Tensor]:
    """Row indices of every shard: the rows of its own cluster, then round(share x n_j) rows of each of
    its `neighbours` nearest clusters j (drawn without replacement, fixed by seed)."""
    gen = torch.Generator().manual_seed(seed)
    own = [(labels == k).nonzero().flatten() for k in range(len(centroids))]
    members = []
    for k, near in enumerate(nearest_clusters(centroids, neighbours)):
        extra = [own[j][torch.randperm(len(own[j]), generator=gen)[:round(share * len(own[j]))]] for j in near]
        members.append(torch.cat([own[k], *[e.sort().values for e in extra]]))
    return members


def share_matrix(shard_labels: list[torch.Tensor], all_labels: torch.Tensor, n_components: int) -> torch.Tensor:
    """M (C, K): the share of component c's training rows (labels all_labels) that shard k (labels
    shard_labels[k]) holds; every row of M sums to 1 for a partition."""
    total = torch.bincount(all_labels.long(), minlength=n_components).double().clamp_min(1)
    return torch.stack([torch.bincount(y.long(), minlength=n_components).double() / total for y in shard_labels], 1)


def exact_shard_ddm(truth: GaussianMixture, shares: torch.Tensor, data_shape: tuple,
                    nearest: Callable | None = None) -> DDM:
    """The exact DDM of shards with component shares M (C, K): shard k's exact velocity and the exact
    posterior of the shards (see the module docstring), on the truth's device."""
    shares = shares.to(truth.means)
    mass = truth.weights[:, None] * shares  # (C, K): pi_c M[c, k]
    if (mass.sum(0) <= 0).any():
        empty = (mass.sum(0) <= 0).nonzero().flatten().tolist()
        raise DDMError(f"shards {empty} hold no mixture component, so they have no exact expert")
    subs = []
    for k in range(shares.shape[1]):
        idx = (mass[:, k] > 0).nonzero().flatten()
        subs.append(dataclasses.replace(truth.subset(idx), weights=mass[idx, k] / mass[idx, k].sum()))

    def expert(sub):
        return lambda x, t: sub.velocity(x.double().reshape(len(x), -1), t.double()).to(x.dtype).reshape(x.shape)

    def router(x, t):
        joint = truth.posterior(x.double().reshape(len(x), -1), t.double()) @ shares  # (B, K)
        return (joint / joint.sum(1, keepdim=True)).to(x.dtype)

    prior = mass.sum(0) / mass.sum()
    return DDM([expert(s) for s in subs], router, prior.float(), tuple(data_shape), nearest,
               meta={"kind": "exact", "router": "exact"})


def tempered(router: Field, temperature: float) -> Field:
    """r'_k = r_k^(1/T) / sum_j r_j^(1/T), as softmax(log r / T) with r clamped at 1e-30 (finite
    derivatives where a probability underflows to 0)."""
    def f(x, t, **cond):
        return torch.softmax(router(x, t, **cond).clamp_min(1e-30).log() / temperature, 1)

    return f


def mixed_uniform(router: Field, a: float) -> Field:
    """r' = (1 - a) r + a / K."""
    def f(x, t, **cond):
        p = router(x, t, **cond)
        return (1 - a) * p + a / p.shape[1]

    return f


def permuted(router: Field, a: float = 1.0) -> Field:
    """r' = (1 - a) r + a P r with (P r)_{(j + 1) mod K} = r_j: a share a of cluster j's mass goes to expert j + 1."""
    def f(x, t, **cond):
        p = router(x, t, **cond)
        return (1 - a) * p + a * p.roll(1, dims=1)

    return f


ROUTER_MODS = {"tempered": tempered, "uniform": mixed_uniform, "permuted": permuted}


def apply_router(ddm: DDM, condition: Condition) -> DDM:
    """The DDM with the condition's router modifiers applied in order (the same DDM when it has none)."""
    router, kind = ddm.router, ddm.meta.get("router", "learned")
    for mod, value in condition.router:
        router, kind = ROUTER_MODS[mod](router, value), f"{kind}+{mod}-{value:g}"
    if not condition.router:
        return ddm
    return ddm.with_router(router, kind, ddm.router_conditional, ddm.router_capturable, ddm.router_classes)


# ----- measurement --------------------------------------------------------------------------------------------------
def bootstrap(values, stat: Callable = np.mean, n_boot: int = 200, seed: int = 0) -> np.ndarray:
    """stat of n_boot resamples (with replacement) of the per-sample values."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    return np.array([stat(v[rng.integers(0, len(v), len(v))]) for _ in range(n_boot)])


def w2_bootstrap(x0: torch.Tensor, reference: torch.Tensor, n_boot: int = 50, seed: int = 0) -> np.ndarray:
    """Exact W2 of n_boot resamples of the samples to the (fixed) reference set."""
    rng = np.random.default_rng(seed)
    return np.array([w2_exact(x0[torch.as_tensor(rng.integers(0, len(x0), len(x0)))], reference)
                     for _ in range(n_boot)])


@torch.no_grad()
def field_error(tr, truth: GaussianMixture) -> torch.Tensor:
    """e_v per sample: mean over the recorded steps of |v - v*|^2 / D (v* the truth's velocity)."""
    steps, b = tr.x.shape[:2]
    x = tr.x.reshape(steps * b, -1).double()
    t = tr.t.double().repeat_interleave(b)
    exact = truth.velocity(x, t)
    return ((tr.v.reshape(steps * b, -1).double() - exact) ** 2).mean(1).reshape(steps, b).mean(0)


def measure_strategy(ddm: DDM, strategy: str, x1: torch.Tensor, truth: GaussianMixture, reference: torch.Tensor,
                     scale: float, steps: int = 50, solver: str = "euler", seed: int = 0, jvp_rows: int = 64,
                     max_steps: int = 10, n_boot: int = 200, w2_boot: int = 50) -> dict:
    """One strategy's quality and stability from the same noise x1: point values ("value") and bootstrap
    replicates over samples ("boot") of NLL, W2, amplification (median), Delta_refine and the field error;
    L_top / L_rand / L_fd (means over up to max_steps steps and jvp_rows trajectories, no replicates)."""
    tr = trace_strategy(ddm, strategy, x1, steps, solver, seed)
    lip = local_lipschitz(ddm, tr, torch.arange(min(jvp_rows, len(x1))), max_steps, seed=seed)
    amp = amplification(ddm, tr, steps, solver, seed).double().cpu().numpy()
    x0_2n = trace_strategy(ddm, strategy, x1, 2 * steps, solver, seed, record=False).x0
    dref = refinement_gap(tr.x0, x0_2n, scale).double().cpu().numpy()
    nll = per_sample_quality(tr.x0, truth, reference, None)[0].double().cpu().numpy()
    ferr = field_error(tr, truth).cpu().numpy()
    per_sample = {"nll": (nll, np.mean), "amp": (amp, np.median), "delta_refine": (dref, np.mean),
                  "field_error": (ferr, np.mean)}
    value = {k: float(stat(v)) for k, (v, stat) in per_sample.items()}
    boot = {k: bootstrap(v, stat, n_boot, seed).tolist() for k, (v, stat) in per_sample.items()}
    value["w2"] = w2_exact(tr.x0, reference)
    boot["w2"] = w2_bootstrap(tr.x0, reference, w2_boot, seed).tolist()
    value.update(L_top=float(np.mean(lip["top"])), L_rand=float(np.mean(lip["rand"])), L_fd=float(np.mean(lip["fd"])),
                 calls=tr.expert_calls_per_sample)
    return {"value": value, "boot": boot}


# ----- measurement on images (no truth) ------------------------------------------------------------------------------
def bind_labels(ddm: DDM, y: torch.Tensor | None) -> DDM:
    """The DDM with the labels y (B,) of a fixed batch bound into its fields: experts (class-conditional)
    and a label-conditional router called as f(x, t) get y=y, for diagnostics that call every field on all
    B rows at once (ddmkit.analysis.alignment.heldout_errors); a call on another number of rows is an error."""
    if y is None or not (ddm.num_classes or ddm.router_conditional):
        return ddm

    def bound(f, takes_labels: bool):
        if not takes_labels:
            return f

        def g(x, t, **cond):
            if len(x) != len(y):
                raise ValueError(f"bind_labels: {len(y)} labels are bound, the field got {len(x)} rows")
            return f(x, t, y=y, **cond)

        return g

    experts = [bound(e, bool(ddm.num_classes)) for e in ddm.experts]
    return dataclasses.replace(ddm, experts=experts, router=bound(ddm.router, ddm.router_conditional),
                               router_conditional=False, accelerated={})


def routed_samples(ddm: DDM, strategy: str, x1: torch.Tensor, steps: int, solver: str, seed: int,
                   y: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
    """x0 of one strategy from x1, drawn as `ddmkit run` draws a sample set (ddmkit.ddm.sampling.sample_ddm:
    the labels y reach the experts and a label-conditional router, the oracle draws clusters from
    p(cluster | y); the routing generator seeded with seed + 1), in float32 on x1's device (no autocast)."""
    cond = None if y is None else {"y": y}
    return sample_ddm(ddm, strategy, len(x1), steps, solver, seed, x1.device, x1=x1, cond=cond,
                      batch_size=batch_size)[0]


@torch.no_grad()
def image_stability(ddm: DDM, strategy: str, x1: torch.Tensor, steps: int, solver: str, seed: int, scale: float,
                    y: torch.Tensor | None = None, batch_size: int | None = None,
                    delta: float = 1e-3) -> dict[str, torch.Tensor]:
    """Per trajectory from x1 (with labels y): amplification |Phi(x_1 + d) - Phi(x_1)| / |d| (|d| = delta, d
    drawn as ddmkit.analysis.stability.amplification draws it, the same random numbers of the routing) and
    Delta_refine |Phi_N(x_1) - Phi_2N(x_1)| / scale, with Phi the labelled sampler (routed_samples)."""
    x0 = routed_samples(ddm, strategy, x1, steps, solver, seed, y, batch_size)
    gen = torch.Generator(device=x1.device).manual_seed(seed + 7)
    d = delta * random_unit(x1, gen)
    moved = routed_samples(ddm, strategy, x1 + d, steps, solver, seed, y, batch_size)
    x0_2n = routed_samples(ddm, strategy, x1, 2 * steps, solver, seed, y, batch_size)
    return {"amp": row_norm(moved - x0) / delta, "delta_refine": refinement_gap(x0, x0_2n, scale)}


def measure_image_strategy(ddm: DDM, strategy: str, x1: torch.Tensor, score: Callable[[torch.Tensor], dict],
                           scale: float, steps: int = 50, solver: str = "euler", seed: int = 0,
                           y: torch.Tensor | None = None, rows: int = 256, n_boot: int = 200,
                           batch_size: int | None = None) -> dict:
    """One strategy on images from the same noise x1 and labels y: FID, KID and KID's spread over subsets
    from score(samples clamped to [-1, 1]) (one number per set: no replicates), amplification (median)
    and Delta_refine (mean) on the first `rows` trajectories with bootstrap replicates over them."""
    x0 = routed_samples(ddm, strategy, x1, steps, solver, seed, y, batch_size)
    value = {k: float(v) for k, v in score(x0.float().clamp(-1, 1)).items()}
    m = min(rows, len(x1))
    per = image_stability(ddm, strategy, x1[:m], steps, solver, seed, scale, None if y is None else y[:m],
                          batch_size)
    stats = {"amp": np.median, "delta_refine": np.mean}
    boot = {}
    for key, stat in stats.items():
        v = per[key].double().cpu().numpy()
        value[key] = float(stat(v))
        boot[key] = bootstrap(v, stat, n_boot, seed).tolist()
    value["stability_rows"] = m
    return {"value": value, "boot": boot}
