"""A DDM assembled from folders: K expert fields, a router, the cluster prior.

    ddm = load_ddm(run_dir)          # learned experts + learned router
    ddm = exact_ddm(run_dir)         # Gaussian-mixture truth: exact cluster velocities + exact posterior
    ddm = restrict(ddm, present)     # only some experts: router renormalised over them

Missing experts: an expert whose folder is gone (a failed node) is left out;
the router's probabilities are masked to the present experts and
renormalised, w_k = r_k 1[k present] / sum_j r_j 1[j present], the cluster
prior likewise; a warning names the missing ones and ddm.meta records them.

Every field is a plain callable (x (B, *shape), t (B,)) -> tensor; experts
return velocities (epsilon- and x0-predicting networks are converted here),
the router returns probabilities (B, K).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ddmkit.data.partition import feature_map, load_partition
from ddmkit.errors import DDMError
from ddmkit.flow.path import to_velocity
from ddmkit.io import load_tensors
from ddmkit.routing.combine import router_probabilities
from ddmkit.sample.graphs import with_network
from ddmkit.truth import GaussianMixture

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DDM:
    experts: list[Field]
    router: Field
    prior: torch.Tensor  # (K,) cluster proportions
    data_shape: tuple[int, ...]
    nearest: Callable[[torch.Tensor], torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)
    label_prior: torch.Tensor | None = None  # (C, K) p(cluster | class label), for labelled data
    router_conditional: bool = False  # the router takes the class label: router(x, t, y=...)

    @property
    def k(self) -> int:
        return len(self.experts)


def velocity_field(model: torch.nn.Module, config: dict) -> Field:
    """A network's output converted to velocity by its config's prediction type."""
    prediction = config.get("prediction", "velocity")

    @torch.no_grad()
    def f(x, t):
        return to_velocity(model(x, t), prediction, x, t)

    return with_network(f, model, lambda other: velocity_field(other, config), ("velocity", prediction))


def router_field(model: torch.nn.Module, conditional: bool = False) -> Field:
    """(x, t) -> probabilities (B, K); a label-conditional router is called as f(x, t, y=labels)."""
    @torch.no_grad()
    def f(x, t, y=None):
        return router_probabilities(model(x, t, y) if conditional else model(x, t))

    return f


def label_prior(counts: torch.Tensor) -> torch.Tensor:
    """p(cluster | class) (C, K) from the count of each class in each cluster, counts (C, K)
    (a class that no cluster holds gets the uniform row)."""
    counts = counts.double()
    k = counts.shape[1]
    total = counts.sum(1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1), torch.full_like(counts, 1.0 / k)).float()


def expert_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / "experts" / f"expert_{k:02d}"


def nearest_cluster_fn(manifest: dict, tensors: dict,
                       present: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> index of the nearest cluster centroid in the partition's feature space
    (among the `present` clusters, a (K,) bool mask, when given)."""
    feats = feature_map(manifest, tensors)
    centroids = tensors["centroids"]

    def nearest(x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(feats(x.float()), centroids.to(x.device))
        if present is not None:
            d = d.masked_fill(~present.to(x.device), float("inf"))
        return d.argmin(1)

    return nearest


def masked_router(router: Field, present: torch.Tensor) -> Field:
    """r_k 1[k present] / sum_j r_j 1[j present]; uniform over the present
    experts where the router gives them no mass at all."""

    def f(x, t, **cond):
        p = router(x, t, **cond)
        m = present.to(p.device, p.dtype)
        p = p * m
        total = p.sum(1, keepdim=True)
        return torch.where(total > 0, p / total.clamp_min(1e-30), m / m.sum())

    return f


def _absent(c: int) -> Field:
    """Stand-in for a missing expert: its router weight is 0, so a dense
    combiner that still evaluates it adds 0 * 0."""
    def f(x, t, **cond):
        return torch.zeros_like(x)
    return f


def restrict(ddm: DDM, present: list[int], nearest: Callable | None = None) -> DDM:
    """The DDM with only the experts `present`: router and prior masked and renormalised."""
    if not present:
        raise DDMError("no expert is present: at least one expert folder is needed to sample")
    mask = torch.zeros(ddm.k, dtype=torch.bool)
    mask[present] = True
    missing = [c for c in range(ddm.k) if not mask[c]]
    prior = ddm.prior * mask
    experts = [e if mask[c] else _absent(c) for c, e in enumerate(ddm.experts)]
    meta = {**ddm.meta, "missing_experts": missing, "present_experts": sorted(present)}
    label = ddm.label_prior
    if label is not None:
        label = label * mask
        label = torch.where(label.sum(1, keepdim=True) > 0, label, mask.float())
        label = label / label.sum(1, keepdim=True)
    return DDM(experts, masked_router(ddm.router, mask), prior / prior.sum(), ddm.data_shape,
               nearest or ddm.nearest, meta, label, ddm.router_conditional)


def load_ddm(run_dir: str | Path, device: str | torch.device = "cpu", exclude=(), allow_missing: bool = True) -> DDM:
    """The learned DDM of a run folder (partition/, experts/, router/).

    Experts whose folder is missing, and those in `exclude`, are left out
    (see `restrict`; allow_missing=False refuses instead). When RUN/registry.json
    exists every file is checked against it (ddmkit.registry)."""
    from ddmkit.registry import REGISTRY, load_model, load_partition_checked, verify_registry, warn_missing

    run_dir = Path(run_dir)
    manifest, ptensors = load_partition_checked(run_dir / "partition")
    k = manifest["k"]
    absent = [c for c in range(k) if c in set(exclude) or not (expert_dir(run_dir, c) / "model.safetensors").exists()]
    if absent and not allow_missing:
        raise DDMError(f"{run_dir}: experts {absent} are missing (no experts/expert_XX/model.safetensors)")
    if len(absent) == k:
        raise DDMError(f"{run_dir}: no expert is present (experts/expert_XX/model.safetensors); train or copy them")
    experts, shapes = [], set()
    for c in range(k):
        if c in absent:
            experts.append(_absent(c))
            continue
        model, cfg = load_model(expert_dir(run_dir, c), device)
        shapes.add(tuple(cfg["data_shape"]))
        experts.append(velocity_field(model, cfg))
    router, rcfg = load_model(run_dir / "router", device)
    if tuple(rcfg["data_shape"]) not in shapes or len(shapes) != 1:
        raise DDMError(f"{run_dir}: experts have data shapes {sorted(shapes)} but the router expects "
                       f"{tuple(rcfg['data_shape'])}; train them on the same partition")
    if rcfg.get("k") != k:
        raise DDMError(f"{run_dir}: the router routes over {rcfg.get('k')} clusters but the partition has {k}")
    if (run_dir / REGISTRY).exists():
        verify_registry(run_dir, allow_missing)
    prior = torch.tensor(manifest["counts"], dtype=torch.float32)
    ddm = DDM(experts, router_field(router), prior / prior.sum(), tuple(manifest["data_shape"]),
              nearest_cluster_fn(manifest, ptensors), {"kind": "learned", "missing_experts": []})
    if not absent:
        return ddm
    warn_missing(absent, k)
    present = [c for c in range(k) if c not in absent]
    mask = torch.zeros(k, dtype=torch.bool)
    mask[present] = True
    return restrict(ddm, present, nearest_cluster_fn(manifest, ptensors, mask))


def load_monolith(run_dir: str | Path, device: str | torch.device = "cpu") -> Field:
    from ddmkit.registry import load_model

    model, cfg = load_model(Path(run_dir) / "monolith", device)
    return velocity_field(model, cfg)


def load_truth(run_dir: str | Path) -> GaussianMixture | None:
    """The exact mixture stored with a run's data, or None."""
    path = Path(run_dir) / "data" / "truth.safetensors"
    if not path.exists():
        return None
    t = load_tensors(path)
    return GaussianMixture(t["weights"], t["means"], t["eigvals"], t["eigvecs"])


def component_groups(component_labels: torch.Tensor, clusters: torch.Tensor, n_components: int, k: int) -> list[list[int]]:
    """Assign every mixture component to the cluster holding most of its samples."""
    counts = torch.zeros(n_components, k, dtype=torch.long)
    counts.index_put_((component_labels, clusters), torch.ones_like(clusters), accumulate=True)
    owner = counts.argmax(1)
    return [(owner == c).nonzero().flatten().tolist() for c in range(k)]


def exact_ddm(run_dir: str | Path) -> DDM:
    """Exact experts and router from the Gaussian-mixture truth, grouped by the partition.

    Each cluster's exact expert is the velocity of the sub-mixture of the
    components it owns; the exact router is the posterior of those groups.
    """
    run_dir = Path(run_dir)
    truth = load_truth(run_dir)
    if truth is None:
        raise DDMError(f"{run_dir}: the data set has no closed-form truth; exact experts need a Gaussian mixture")
    manifest, ptensors = load_partition(run_dir / "partition")
    train = load_tensors(run_dir / "data" / "train.safetensors")
    groups = component_groups(train["labels"], ptensors["assignments"], truth.k, manifest["k"])
    if any(len(g) == 0 for g in groups):
        empty = [c for c, g in enumerate(groups) if not g]
        raise DDMError(f"{run_dir}: clusters {empty} own no mixture component, so they have no exact expert")
    subs = [truth.subset(g) for g in groups]
    member = torch.zeros(truth.k, manifest["k"], dtype=truth.means.dtype)
    for c, g in enumerate(groups):
        member[g, c] = 1.0

    def expert(sub):
        return lambda x, t: sub.velocity(x.double().reshape(len(x), -1), t.double()).to(x.dtype).reshape(x.shape)

    def router(x, t):
        return (truth.posterior(x.double().reshape(len(x), -1), t.double()) @ member).to(x.dtype)

    prior = truth.weights @ member
    return DDM([expert(s) for s in subs], router, prior.float(), tuple(manifest["data_shape"]),
               nearest_cluster_fn(manifest, ptensors), {"kind": "exact", "groups": groups})
