"""Alignment diagnostics against known answers."""
import torch

from ddmkit.analysis.alignment import cluster_alignment, disagreement, heldout_errors
from ddmkit.ddm import DDM
from ddmkit.routing import parse_strategy
from ddmkit.truth import GaussianMixture

GMM = GaussianMixture.from_covariances([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], [0.3, 0.2, 0.4])


def gmm_ddm(gmm: GaussianMixture) -> DDM:
    """One exact expert per component (its noised velocity) and the exact posterior as router."""
    experts = [lambda x, t, k=k: gmm.component_velocities(x.double(), t.double())[:, k].float() for k in range(gmm.k)]
    return DDM(experts, lambda x, t: gmm.posterior(x.double(), t.double()).float(), gmm.weights.float(), (2,),
               lambda x: torch.cdist(x.double(), gmm.means).argmin(1))


def test_disagreement_is_zero_for_identical_experts_and_90_for_orthogonal_ones():
    v = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)).double()
    probs = torch.softmax(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)), 1).double()
    same = disagreement(v[:, None].expand(10, 3, 4), probs, v)
    assert same["pair"].abs().max() < 1e-4 and same["mean"].abs().max() < 1e-4
    ortho = torch.eye(2, dtype=torch.float64).expand(10, 2, 2)
    d = disagreement(ortho, torch.full((10, 2), 0.5, dtype=torch.float64), ortho.sum(1))
    assert torch.allclose(d["pair"], torch.full((10,), 90.0, dtype=torch.float64))
    assert torch.allclose(d["mean"], torch.full((10,), 45.0, dtype=torch.float64))


def test_cluster_alignment_at_the_centroids():
    c = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    w = torch.eye(3)
    al = cluster_alignment(c, w, lambda x: x, c)
    assert al["hit"].tolist() == [1, 1, 1] and al["rank"].tolist() == [1, 1, 1]
    al = cluster_alignment(c, w[[2, 0, 1]], lambda x: x, c)  # routed to a far cluster
    assert al["hit"].sum() == 0 and (al["rank"] > 1).all()


def test_exact_experts_and_router_have_zero_error_against_the_exact_mixture():
    ddm = gmm_ddm(GMM)
    x = GMM.sample(400, torch.Generator().manual_seed(0)).float()
    grid = [0.05, 0.5, 0.95]
    strategies = {"top-1": parse_strategy("top-1"), "full": parse_strategy("full")}
    held = heldout_errors(ddm, x, grid, strategies, exact=gmm_ddm(GMM))
    assert max(max(row) for row in held["expert_vs_exact"]) < 1e-10
    assert max(held["router_tv"]) < 1e-6
    assert all(v < 1e-10 for v in held["routed_vs_exact"]["top-1"])
    # near the data the routed (right) expert predicts eps - x better than the others
    assert held["routed"]["top-1"][0] < 0.8 * held["not_routed"]["top-1"][0]
