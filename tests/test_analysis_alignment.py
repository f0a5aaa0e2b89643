"""Alignment diagnostics against known answers."""
import math

import pytest
import torch

from ddmkit.analysis.alignment import (
    angle,
    cluster_alignment,
    disagreement,
    exact_alignment,
    exact_x0,
    heldout_errors,
    own_cluster_errors,
    trajectory_alignment,
)
from ddmkit.analysis.trace import trace_strategy
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
    assert torch.equal(al["dist_nearest"], torch.zeros(3, dtype=torch.float64))
    al = cluster_alignment(c, w[[2, 0, 1]], lambda x: x, c)  # routed to a far cluster
    assert al["hit"].sum() == 0 and (al["rank"] > 1).all()
    assert torch.allclose(al["dist_routed"], torch.tensor([5.0, 5.0, 50**0.5], dtype=torch.float64))
    half = cluster_alignment(c[:1], torch.tensor([[0.5, 0.5, 0.0]]), lambda x: x, c)  # weighted distance
    assert float(half["dist_routed"]) == 2.5 and float(half["rank"]) == 1.5


def test_cluster_rank_counts_the_strictly_nearer_clusters_so_ties_share_a_rank():
    """rank_k = 1 + #{j : d_j < d_k} (docs/analysis.md): x0_hat halfway between two centroids has them both at
    rank 1 (an order-based rank gave the second 2), the far one at rank 3."""
    c = torch.tensor([[0.0, 0.0], [2.0, 0.0], [9.0, 0.0]])
    x = torch.tensor([[1.0, 0.0]])
    ranks = [float(cluster_alignment(x, torch.eye(3)[[k]], lambda v: v, c)["rank"]) for k in range(3)]
    assert ranks == [1.0, 1.0, 3.0]


def test_angle_of_opposite_and_equal_vectors():
    """Rounding can push the cosine of opposite vectors below -1: the angle is still 180, never nan."""
    a = torch.randn(200, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(angle(a, -3 * a), torch.full((200,), 180.0, dtype=torch.float64))
    assert float(angle(a, 2 * a).max()) < 1e-5


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


def test_disagreement_is_router_weighted_against_a_closed_form():
    """Two identical experts and a third at 90 degrees, r = (0.45, 0.45, 0.1): the pairs (1, 2) weigh
    2 * 0.45^2 at 0 degrees, the four pairs with expert 3 weigh 4 * 0.045 at 90 degrees, so
    D_pair = 90 * 0.18 / 0.585 = 27.69 (an unweighted mean over pairs would give 60);
    D_mean = sum_k r_k theta(v_k, v) against the routed v = 0.9 e1 + 0.1 e2."""
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    vk = torch.stack([e1, e1, e2])[None]
    probs = torch.tensor([[0.45, 0.45, 0.1]], dtype=torch.float64)
    v = (probs[0, :, None] * vk[0]).sum(0)[None]
    d = disagreement(vk, probs, v)
    assert float(d["pair"]) == pytest.approx(90 * 0.18 / 0.585, abs=1e-9)
    off = math.degrees(math.atan2(0.1, 0.9))
    assert float(d["mean"]) == pytest.approx(0.9 * off + 0.1 * (90 - off), abs=1e-9)


def test_disagreement_matches_a_loop_over_pairs():
    """Random experts and router probabilities: D_pair and D_mean from a plain double loop with math.acos."""
    g = torch.Generator().manual_seed(3)
    vk = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
    probs = torch.softmax(3 * torch.randn(6, 4, generator=g, dtype=torch.float64), 1)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    d = disagreement(vk, probs, v)

    def theta(a, b):
        return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b) / float(a.norm() * b.norm())))))

    for b in range(6):
        r = probs[b].tolist()
        num = sum(r[j] * r[k] * theta(vk[b, j], vk[b, k]) for j in range(4) for k in range(4) if j != k)
        den = sum(r[j] * r[k] for j in range(4) for k in range(4) if j != k)
        assert float(d["pair"][b]) == pytest.approx(num / den, abs=1e-6)
        assert float(d["mean"][b]) == pytest.approx(sum(r[k] * theta(vk[b, k], v[b]) for k in range(4)), abs=1e-6)


def test_disagreement_ignores_experts_the_router_gives_no_weight():
    """An expert with r = 0 pointing the opposite way changes neither D_pair nor D_mean."""
    vk = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]]], dtype=torch.float64)
    with_zero = disagreement(vk, torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), vk[:, :2].mean(1))
    without = disagreement(vk[:, :2], torch.tensor([[0.5, 0.5]], dtype=torch.float64), vk[:, :2].mean(1))
    assert torch.allclose(with_zero["pair"], without["pair"]) and torch.allclose(with_zero["mean"], without["mean"])
    assert float(with_zero["pair"]) == pytest.approx(math.degrees(math.atan(0.1)), abs=1e-9)


def noised(gmm: GaussianMixture, n: int, t0: float, seed: int = 0):
    """Samples x_t of the marginal at time t0 with their components, and t as a (n,) tensor."""
    g = torch.Generator().manual_seed(seed)
    x0, labels = gmm.sample(n, g, return_labels=True)
    xt = (1 - t0) * x0 + t0 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return xt, torch.full((n,), t0, dtype=torch.float64), labels


def test_exact_x0_alignment_sees_a_router_that_the_strategys_own_x0_hat_hides():
    """Exact experts, but a router that always picks cluster 0, at t = 0.5: x0_hat = x_t - t v_0 is
    expert 0's own estimate, pulled into cluster 0, so the usual hit is 1 by construction. The exact
    posterior mean x0* = E[x0 | x_t] lands in the point's own cluster, so hit* is the share of points
    from cluster 0 (pi_0 = 0.5); with the exact router's top-1 choice hit* is about 1."""
    xt, t, labels = noised(GMM, 4000, 0.5)
    vk = GMM.component_velocities(xt, t)
    x0_star = exact_x0(GMM, xt, t)
    assert torch.allclose(x0_star, xt - 0.5 * GMM.velocity(xt, t))
    always0 = torch.zeros(4000, 3, dtype=torch.float64)
    always0[:, 0] = 1
    own = cluster_alignment(xt - 0.5 * vk[:, 0], always0, lambda x: x, GMM.means)
    ex = exact_alignment(xt - 0.5 * vk[:, 0], x0_star, always0, lambda x: x, GMM.means)
    assert float(own["hit"].mean()) == 1.0
    share0 = float((labels == 0).double().mean())
    assert float(ex["hit_exact"].mean()) == pytest.approx(share0, abs=0.03)
    assert float(ex["same"].mean()) == pytest.approx(share0, abs=0.03)
    top1 = torch.nn.functional.one_hot(GMM.posterior(xt, t).argmax(1), 3).double()
    ex = exact_alignment(x0_star, x0_star, top1, lambda x: x, GMM.means)
    assert float(ex["hit_exact"].mean()) > 0.99 and float(ex["same"].mean()) == 1.0


def test_trajectory_alignment_with_the_truth_of_an_exact_ddm():
    """With exact experts and the exact router the full strategy's x0_hat is the exact x0*: hit* = hit,
    rank* = rank, and x0_hat and x0* always share their nearest cluster; without the truth no such keys.
    (The third mean is moved from GMM's (0, 3) to (0, 4): at t = 1 every x0 estimate is the mixture mean, which
    is equally far from GMM's first and third means.)"""
    gmm = GaussianMixture.from_covariances([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], [0.3, 0.2, 0.4])
    ddm = gmm_ddm(gmm)
    tr = trace_strategy(ddm, "full", torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), 6)
    al = trajectory_alignment(ddm, tr, lambda x: x, gmm.means, truth=gmm)
    assert al["hit_exact"].shape == (6, 64)
    assert torch.allclose(al["hit_exact"], al["hit"]) and torch.allclose(al["rank_exact"], al["rank"], atol=1e-6)
    assert float(al["same"].min()) == 1.0
    assert "hit_exact" not in trajectory_alignment(ddm, tr, lambda x: x, gmm.means)


def test_own_cluster_error_of_exact_component_experts_is_the_irreducible_variance():
    """Expert k = component k's exact velocity, on points of component k: E|v_k(x_t) - (eps - x)|^2 / D is the
    conditional variance of eps - x = (x_t - x) / t, i.e. Var(x | x_t) / t^2 = s2_k / ((1 - t)^2 s2_k + t^2)
    per dimension (s2 = 0.3, 0.2, 0.4). On the other clusters' points the error is larger."""
    ddm = gmm_ddm(GMM)
    x, labels = GMM.sample(6000, torch.Generator().manual_seed(1), return_labels=True)
    t0 = 0.5
    held = heldout_errors(ddm, x.float(), [t0], {}, seed=2, clusters=labels)
    by = held["by_cluster"][0]
    s2 = torch.tensor([0.3, 0.2, 0.4])
    expect = s2 / ((1 - t0) ** 2 * s2 + t0**2)
    assert torch.allclose(torch.tensor(by["own_by_expert"]), expect, rtol=0.08)
    assert all(o > 2 * w for o, w in zip(by["other_by_expert"], by["own_by_expert"]))
    counts = torch.bincount(labels, minlength=3).double()
    assert by["own"] == pytest.approx(float((counts * expect).sum() / counts.sum()), rel=0.05)


def test_experts_wrong_off_their_cluster_show_apart_from_their_own_cluster():
    """Expert k = v*_k + delta (1 - r*_k(x_t)) u, with r*_k the exact posterior of component k: right where its
    cluster has mass, off by delta elsewhere. Against the exact v*_k at t = 0.05 (well separated components,
    r* one-hot) the error on its own cluster is ~0 and on the others delta^2 / D = 0.5."""
    delta, u = 1.0, torch.tensor([1.0, 0.0], dtype=torch.float64)

    def wrong(k):
        def f(x, t):
            x, t = x.double(), t.double()
            r = GMM.posterior(x, t)[:, k:k + 1]
            return (GMM.component_velocities(x, t)[:, k] + delta * (1 - r) * u).float()
        return f

    exact = gmm_ddm(GMM)
    ddm = DDM([wrong(k) for k in range(3)], exact.router, exact.prior, (2,), exact.nearest)
    x, labels = GMM.sample(3000, torch.Generator().manual_seed(3), return_labels=True)
    held = heldout_errors(ddm, x.float(), [0.05], {"top-1": parse_strategy("top-1")}, exact=exact, clusters=labels)
    vs = held["by_cluster_vs_exact"][0]
    assert vs["own"] < 1e-3 and vs["other"] == pytest.approx(delta**2 / 2, rel=0.02)
    assert held["routed_vs_exact"]["top-1"][0] < 1e-3  # the exact router routes each point to its own cluster


def test_the_oracle_routes_held_out_points_to_their_own_cluster():
    """The oracle's routed experts on held-out points were drawn from the prior, a random split: its err routed
    (the own cluster's expert) and not routed now equal by_cluster's own and other errors."""
    ddm = gmm_ddm(GMM)
    x, labels = GMM.sample(3000, torch.Generator().manual_seed(4), return_labels=True)
    held = heldout_errors(ddm, x.float(), [0.15], {"oracle": parse_strategy("oracle")}, seed=0, clusters=labels)
    by = held["by_cluster"][0]
    assert held["routed"]["oracle"][0] == pytest.approx(by["own"], rel=1e-5)
    assert held["not_routed"]["oracle"][0] == pytest.approx(by["other"], rel=1e-5)


def test_own_cluster_errors_split_by_the_points_cluster():
    """err (points x experts); points 0, 1 in cluster 0, points 2, 3 in cluster 1, none in cluster 2."""
    err = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    by = own_cluster_errors(err, torch.tensor([0, 0, 1, 1]))
    assert by["own"] == (0 + 3 + 7 + 10) / 4 and by["other"] == (66 - 20) / 8
    assert by["own_by_expert"][:2] == [1.5, 8.5] and math.isnan(by["own_by_expert"][2])
    assert by["other_by_expert"] == [7.5, 2.5, 6.5]
    x = GMM.sample(5, torch.Generator().manual_seed(0)).float()
    assert exact_x0(GMM, x, torch.full((5,), 0.3)).dtype == torch.float32


def test_own_cluster_errors_of_some_experts_only():
    """err columns are experts 0 and 2 (expert 1 missing); points 0, 1 in cluster 0, 2 in cluster 1, 3 in 2."""
    err = torch.arange(8, dtype=torch.float64).reshape(4, 2)  # [[0, 1], [2, 3], [4, 5], [6, 7]]
    by = own_cluster_errors(err, torch.tensor([0, 0, 1, 2]), experts=[0, 2])
    assert by["own_by_expert"] == [1.0, 7.0] and by["other_by_expert"] == [5.0, 3.0]
    assert by["own"] == (0 + 2 + 7) / 3 and by["other"] == (1 + 3 + 4 + 5 + 6) / 5


def test_a_missing_expert_is_left_out_of_the_heldout_errors():
    """The zero stand-in of a missing expert (1) is in no per-expert number: experts 0 and 2 score as they do
    in the whole DDM, and full routing leaves no present expert unrouted."""
    whole = gmm_ddm(GMM)
    ddm = whole.restrict([0, 2])
    x, labels = GMM.sample(600, torch.Generator().manual_seed(4), return_labels=True)
    strategies = {"full": parse_strategy("full"), "top-1": parse_strategy("top-1")}
    ref, held = [heldout_errors(d, x.float(), [0.5], strategies, clusters=labels) for d in (whole, ddm)]
    assert held["experts"] == [0, 2] and ref["experts"] == [0, 1, 2]
    assert held["expert"][0] == pytest.approx(ref["expert"][0][::2])
    assert held["by_cluster"][0]["own_by_expert"] == pytest.approx(ref["by_cluster"][0]["own_by_expert"][::2])
    assert math.isnan(held["not_routed"]["full"][0]) and not math.isnan(held["not_routed"]["top-1"][0])
