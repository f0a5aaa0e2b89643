"""A DDM assembled from folders: K expert fields, a router, the cluster prior.

    ddm = load_ddm(run_dir)          # learned experts + learned router
    ddm = exact_ddm(run_dir)         # Gaussian-mixture truth: exact cluster velocities + exact posterior

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
from ddmkit.nets import from_pretrained
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

    @property
    def k(self) -> int:
        return len(self.experts)


def velocity_field(model: torch.nn.Module, config: dict) -> Field:
    """A network's output converted to velocity by its config's prediction type."""
    prediction = config.get("prediction", "velocity")

    @torch.no_grad()
    def f(x, t):
        return to_velocity(model(x, t), prediction, x, t)

    return f


def router_field(model: torch.nn.Module) -> Field:
    @torch.no_grad()
    def f(x, t):
        return torch.softmax(model(x, t).float(), dim=1)

    return f


def expert_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / "experts" / f"expert_{k:02d}"


def nearest_cluster_fn(manifest: dict, tensors: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> index of the nearest cluster centroid in the partition's feature space."""
    feats = feature_map(manifest, tensors)
    centroids = tensors["centroids"]

    def nearest(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(feats(x.float()), centroids.to(x.device)).argmin(1)

    return nearest


def load_ddm(run_dir: str | Path, device: str | torch.device = "cpu") -> DDM:
    """The learned DDM of a run folder (partition/, experts/, router/)."""
    run_dir = Path(run_dir)
    manifest, ptensors = load_partition(run_dir / "partition")
    k = manifest["k"]
    experts, shapes = [], set()
    for c in range(k):
        model, cfg = from_pretrained(expert_dir(run_dir, c), device)
        shapes.add(tuple(cfg["data_shape"]))
        experts.append(velocity_field(model, cfg))
    router, rcfg = from_pretrained(run_dir / "router", device)
    if tuple(rcfg["data_shape"]) not in shapes or len(shapes) != 1:
        raise DDMError(f"{run_dir}: experts have data shapes {sorted(shapes)} but the router expects "
                       f"{tuple(rcfg['data_shape'])}; train them on the same partition")
    if rcfg.get("k") != k:
        raise DDMError(f"{run_dir}: the router routes over {rcfg.get('k')} clusters but the partition has {k}")
    prior = torch.tensor(manifest["counts"], dtype=torch.float32)
    return DDM(experts, router_field(router), prior / prior.sum(), tuple(manifest["data_shape"]),
               nearest_cluster_fn(manifest, ptensors), {"kind": "learned"})


def load_monolith(run_dir: str | Path, device: str | torch.device = "cpu") -> Field:
    model, cfg = from_pretrained(Path(run_dir) / "monolith", device)
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
