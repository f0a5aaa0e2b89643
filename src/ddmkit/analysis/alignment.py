"""Expert-data alignment: where the routed experts' data lies, how well each expert predicts,
and how much the experts disagree. Definitions are ddmkit's own (the paper's are not public).

Cluster distance, at every step of a trajectory, with phi the partition's feature map and c_k
its centroids:

    x0_hat = x_t - t v,   d_k = |phi(x0_hat) - c_k|,   rank_k = 1 + #{j : d_j < d_k}
    hit    = [argmax_k w_k = argmin_k d_k]             (the main routed expert is the nearest cluster)
    rank   = sum_k w_k rank_k                          (1 = all weight on the nearest cluster)

x0_hat comes from the strategy's own routed velocity, so a one-expert strategy tends to hit by
construction (expert k pulls x0_hat into cluster k). The same measures are also taken with a
reference estimate x0* in place of x0_hat (hit*, rank*, with `same` = [argmin_k d_k = argmin_k d*_k]),
one that uses neither the strategy's router nor its experts: on Gaussian-mixture data the exact
posterior mean E[x0 | x_t] of the truth (exact_reference), otherwise the posterior-mean estimate of a
velocity field of its own, the monolith's, x0* = x_t - t v_monolith(x_t) (velocity_reference).

Disagreement, from all K expert velocities v_k at the state, router probabilities r and
routed velocity v, with theta(a, b) = arccos(a.b / |a||b|) in degrees:

    D_pair = sum_{j != k} r_j r_k theta(v_j, v_k) / sum_{j != k} r_j r_k
    D_mean = sum_k r_k theta(v_k, v)

Per-expert error on held-out data x noised to x_t = (1 - t) x + t eps:

    e_k = |v_k(x_t) - (eps - x)|^2 / D,   split by whether the strategy routes x_t to k;
    e*_k = E[r*_k(x_t) |v_k(x_t) - v*_k(x_t)|^2 / D] / E[r*_k(x_t)]
           (mixtures: v*_k the exact velocity of cluster k, weighted by the exact posterior
           r*_k so that it measures expert k where its cluster has mass)
    TV  = 1/2 sum_k |r_k(x_t) - r*_k(x_t)|  (r* the exact posterior of the clusters)

and, independent of any strategy, every expert's error on held-out points of its own cluster
(c(x) = k) and on points of the other clusters (c(x) != k), reported apart:

    e_own  = mean over (x, k) with c(x) = k  of e_k(x_t)
    e_other = mean over (x, k) with c(x) != k of e_k(x_t)   (likewise against v*_k on mixtures)

k runs over the experts that are present: a missing expert (its zero stand-in) is in none of these.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ddmkit.analysis.trace import strategy_weights
from ddmkit.ddm.model import DDM
from ddmkit.flow.path import x0_from_velocity
from ddmkit.truth import GaussianMixture

Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> an estimate of x0 in x_t's shape


def expert_velocities(experts: Sequence, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Every expert on every row, flattened: (B, K, D)."""
    return torch.stack([e(x, t).reshape(len(x), -1) for e in experts], 1)


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """theta(a, b) in degrees along the last dimension."""
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def disagreement(vk: torch.Tensor, probs: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """D_pair and D_mean per row from expert velocities vk (B, K, D), r (B, K), routed v (B, D)."""
    theta = angle(vk[:, :, None, :], vk[:, None, :, :])  # (B, K, K)
    off = 1 - torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)
    pw = probs[:, :, None] * probs[:, None, :] * off
    pair = (pw * theta).sum((1, 2)) / pw.sum((1, 2)).clamp_min(1e-30)
    to_mean = (probs * angle(vk, v.reshape(len(v), 1, -1))).sum(1)
    return {"pair": pair, "mean": to_mean}


def cluster_alignment(x0_hat: torch.Tensor, w: torch.Tensor, features, centroids: torch.Tensor) -> dict:
    """hit, rank, distance to the nearest centroid and weighted distance to the routed centroids, per row."""
    d = torch.cdist(features(x0_hat).double(), centroids.double())
    rank = 1 + (d[:, None, :] < d[:, :, None]).sum(-1).double()  # rank_k = 1 + #{j : d_j < d_k}: ties share it
    w = w.double()
    return {"hit": (w.argmax(1) == d.argmin(1)).double(), "rank": (w * rank).sum(1),
            "dist_nearest": d.min(1).values, "dist_routed": (w * d).sum(1)}


def exact_x0(truth: GaussianMixture, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact posterior mean E[x0 | x_t = x] of the truth, in x's shape and dtype."""
    return truth.x0_mean(x.reshape(len(x), -1).double(), t.double()).to(x.dtype).reshape(x.shape)


def exact_reference(truth: GaussianMixture) -> Reference:
    """x0* = E[x0 | x_t], the exact posterior mean of a Gaussian-mixture truth, as a reference."""
    return lambda x, t: exact_x0(truth, x, t)


def velocity_reference(field) -> Reference:
    """x0* = x_t - t v(x_t) from a velocity field (x, t) -> v: with the monolith's field, its posterior-mean
    estimate, made with neither the router nor the experts. The field is called as the recorded pass
    calls the experts (no conditioning), and its output is taken in x_t's shape and dtype."""
    return lambda x, t: x0_from_velocity(field(x, t).reshape(x.shape).to(x.dtype), x, t)


def exact_alignment(x0_hat: torch.Tensor, x0_star: torch.Tensor, w: torch.Tensor, features,
                    centroids: torch.Tensor) -> dict:
    """cluster_alignment with the reference x0* in place of x0_hat (keys with a "_exact" suffix, whatever
    the reference), and "same": whether x0_hat and x0* have the same nearest cluster."""
    al = cluster_alignment(x0_star, w, features, centroids)
    near = torch.cdist(features(x0_hat).double(), centroids.double()).argmin(1)
    near_star = torch.cdist(features(x0_star).double(), centroids.double()).argmin(1)
    return {**{f"{k}_exact": v for k, v in al.items()}, "same": (near == near_star).double()}


EXACT_KEYS = ("hit_exact", "rank_exact", "dist_nearest_exact", "dist_routed_exact", "same")


@torch.no_grad()
def trajectory_alignment(ddm: DDM, tr, features, centroids: torch.Tensor, max_steps: int | None = None,
                         truth: GaussianMixture | None = None, reference: Reference | None = None) -> dict:
    """Cluster alignment and disagreement at the steps of a trace: (steps, B) tensors + step times, on the
    CPU. With a reference x0* (`reference`, or the truth's exact posterior mean) also the alignment of x0*
    (EXACT_KEYS). centroids and the feature map work on the trace's device."""
    if truth is not None and reference is not None:
        raise ValueError("trajectory_alignment: give the truth or a reference, not both")
    reference = exact_reference(truth) if truth is not None else reference
    n = len(tr.t)
    steps = list(range(n)) if not max_steps or max_steps >= n else \
        torch.linspace(0, n - 1, max_steps).round().long().unique().tolist()
    x0_hat = tr.x0_hat
    keys = ("hit", "rank", "dist_nearest", "dist_routed", "pair", "mean")
    keys += EXACT_KEYS if reference is not None else ()
    out: dict[str, list] = {k: [] for k in keys}
    for i in steps:
        t = tr.t[i].expand(tr.x.shape[1]).to(tr.x.dtype)
        al = cluster_alignment(x0_hat[i], tr.w[i], features, centroids)
        if reference is not None:
            al |= exact_alignment(x0_hat[i], reference(tr.x[i], t), tr.w[i], features, centroids)
        vk = expert_velocities(ddm.experts, tr.x[i], t)
        dis = disagreement(vk.double(), tr.probs[i].double(), tr.v[i].reshape(len(vk), -1).double())
        for k in keys:
            out[k].append((al | dis)[k])
    res = {k: torch.stack(v).cpu() for k, v in out.items()}
    res["t"] = tr.t[steps].double().cpu()
    return res


def own_cluster_errors(err: torch.Tensor, clusters: torch.Tensor, experts: Sequence[int] | None = None) -> dict:
    """Errors err (B, E) of experts `experts` (default 0 .. E - 1) on every point split by the point's cluster
    (B,): pooled over (point, expert) pairs with the expert's own cluster ("own") and the others ("other"),
    and per expert."""
    experts = list(range(err.shape[1])) if experts is None else list(experts)
    own = clusters.long()[:, None] == torch.tensor(experts, device=clusters.device)[None, :]
    return {"own": masked_mean(err, own), "other": masked_mean(err, ~own),
            "own_by_expert": [masked_mean(err[:, k], own[:, k]) for k in range(err.shape[1])],
            "other_by_expert": [masked_mean(err[:, k], ~own[:, k]) for k in range(err.shape[1])]}


def present_experts(ddm: DDM) -> list[int]:
    """The experts of a DDM that are not missing (DDM.restrict records the missing ones)."""
    missing = set(ddm.meta.get("missing_experts", []))
    return [c for c in range(ddm.k) if c not in missing]


@torch.no_grad()
def heldout_errors(ddm: DDM, x: torch.Tensor, t_grid: Sequence[float], strategies: dict, seed: int = 0,
                   exact: DDM | None = None, clusters: torch.Tensor | None = None) -> dict:
    """Per t of the grid: every present expert's error on held-out data (a missing expert is left out of every
    number; "experts" lists the present ones, in the order of the per-expert lists), routed vs not routed per
    strategy;
    with an exact DDM also the error against the exact cluster velocity and the router's TV error;
    with the held-out points' clusters (B,) also every expert's error on its own cluster and on the
    others (independent of any strategy; "by_cluster", and "by_cluster_vs_exact" with an exact DDM), and
    the oracle routes each point to its own cluster (without them, to one drawn from the prior).
    The noise and times are drawn on x's device (a generator there, seeded with seed)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    present = present_experts(ddm)
    out: dict = {"t": list(t_grid), "experts": present, "expert": [], "routed": {s: [] for s in strategies},
                 "not_routed": {s: [] for s in strategies}}
    if exact is not None:
        out.update(expert_vs_exact=[], routed_vs_exact={s: [] for s in strategies}, router_tv=[])
    if clusters is not None:
        clusters = clusters.to(x.device)
        out["by_cluster"] = []
        if exact is not None:
            out["by_cluster_vs_exact"] = []
    for t0 in t_grid:
        eps = torch.randn(x.shape, generator=gen, device=x.device).to(x)
        t = torch.full((len(x),), float(t0), dtype=x.dtype, device=x.device)
        xt = (1 - t0) * x + t0 * eps
        vk = expert_velocities(ddm.experts, xt, t)
        err = ((vk - (eps - x).reshape(len(x), 1, -1)) ** 2).mean(-1)[:, present]  # (B, present experts)
        probs = ddm.router(xt, t)
        x0_hat = xt - t0 * (probs[:, :, None] * vk).sum(1).reshape(xt.shape)
        out["expert"].append(err.mean(0).tolist())
        if exact is not None:
            err_exact = ((vk - expert_velocities(exact.experts, xt, t)) ** 2).mean(-1)[:, present]
            post = exact.router(xt, t).to(err_exact.dtype)  # (B, K)
            mass = post[:, present]
            out["expert_vs_exact"].append(((mass * err_exact).sum(0) / mass.sum(0).clamp_min(1e-30)).tolist())
            out["router_tv"].append(float(0.5 * (probs - post).abs().sum(1).mean()))
        if clusters is not None:
            out["by_cluster"].append(own_cluster_errors(err, clusters, present))
            if exact is not None:
                out["by_cluster_vs_exact"].append(own_cluster_errors(err_exact, clusters, present))
        for name, strat in strategies.items():
            routed = (strategy_weights(ddm, strat, probs, xt, t, x0_hat, seed, clusters) > 0)[:, present]
            out["routed"][name].append(masked_mean(err, routed))
            out["not_routed"][name].append(masked_mean(err, ~routed))
            if exact is not None:
                out["routed_vs_exact"][name].append(masked_mean(err_exact, routed))
    return out


def masked_mean(a: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of the entries of a where mask holds (nan when none)."""
    return float(a[mask].mean()) if mask.any() else math.nan
