"""Label-aware routing: p(cluster | label) for the oracle, the label reaching a
conditional router, and the label-conditional statistics-only router."""
from __future__ import annotations

import pytest
import torch

from ddmkit.ddm import DDM
from ddmkit.ddm.load import label_prior
from ddmkit.ddm.sampling import sample_ddm
from ddmkit.errors import DDMError
from ddmkit.routing.stats_router import class_stats_router, island_class_statistics, island_statistics, stats_router


def constant_experts(k: int):
    """Expert j's velocity is the constant j, so Euler from t = 1 to 0 moves x by exactly -j."""
    return [lambda x, t, y=None, j=j: torch.full_like(x, float(j)) for j in range(k)]


def test_label_prior_known_counts():
    counts = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
    p = label_prior(counts)
    assert torch.allclose(p, torch.tensor([[0.75, 0.25, 0], [1 / 3, 1 / 3, 1 / 3], [0, 0.5, 0.5]]))


def test_oracle_draws_the_cluster_from_the_label():
    k, n = 3, 64
    y = torch.arange(n) % k
    flat = lambda x, t, **c: torch.full((len(x), k), 1.0 / k)  # noqa: E731 (an uninformative router)
    ddm = DDM(constant_experts(k), flat, torch.full((k,), 1.0 / k), (2,), label_prior=torch.eye(k).flip(0))
    x1 = torch.randn(n, 2)
    x0, _ = sample_ddm(ddm, "oracle", n, steps=4, x1=x1.clone(), cond={"y": y})
    chosen = (x1 - x0)[:, 0].round().long()
    assert torch.equal(chosen, k - 1 - y)  # class c -> cluster K-1-c, as the label prior says


def test_the_label_reaches_a_conditional_router_only():
    k, n = 4, 32
    y = torch.arange(n) % k
    seen = []

    def router(x, t, y=None):
        seen.append(y)
        return torch.nn.functional.one_hot(y, k).float() if y is not None else torch.full((len(x), k), 1.0 / k)

    x1 = torch.randn(n, 3)
    cond = DDM(constant_experts(k), router, torch.full((k,), 0.25), (3,), router_conditional=True)
    x0, _ = sample_ddm(cond, "top-1", n, steps=3, x1=x1.clone(), cond={"y": y})
    assert torch.equal((x1 - x0)[:, 0].round().long(), y)
    assert all(s is not None for s in seen)
    plain = DDM(constant_experts(k), router, torch.full((k,), 0.25), (3,))
    with pytest.raises(DDMError, match="labels need class-conditional experts"):  # nothing would read them
        sample_ddm(plain, "top-1", n, steps=1, x1=x1.clone(), cond={"y": y})
    # with experts missing, the conditional router is masked and renormalised: label 1 -> expert 0 or 2 only
    part = cond.restrict([0, 2, 3])
    x0, _ = sample_ddm(part, "full", n, steps=2, x1=x1.clone(), cond={"y": y})
    assert set((x1 - x0)[:, 0].round().long()[y == 0].tolist()) == {0}


def test_labels_for_a_label_conditional_router_of_unconditional_experts_are_checked():
    """With unconditional experts the labels reached the router unchecked: a list failed inside routing
    (no index_select), labels 99 or -5 reached it as they were."""
    k, n = 4, 3
    router = lambda x, t, y=None: torch.nn.functional.one_hot(y, k).float()  # noqa: E731
    x1 = torch.randn(n, 3)
    learned = DDM(constant_experts(k), router, torch.full((k,), 0.25), (3,), router_conditional=True,
                  router_classes=3)
    x0, _ = sample_ddm(learned, "top-1", n, steps=2, x1=x1.clone(), cond={"y": [0, 1, 2]})  # a list, converted
    assert torch.equal((x1 - x0)[:, 0].round().long(), torch.tensor([0, 1, 2]))
    with pytest.raises(DDMError, match=r"labels \[-5, 99\] are not class labels .* accepted: 0 .. 2, or 3"):
        sample_ddm(learned, "top-1", n, steps=2, x1=x1.clone(), cond={"y": torch.tensor([-5, 99, 1])})
    ten_classes = lambda x, t, y=None: torch.full((len(x), k), 1.0 / k)  # noqa: E731 (a router of 10 classes)
    swapped = learned.with_router(ten_classes, "mine", conditional=True)  # its classes: not the old router's 3
    sample_ddm(swapped, "top-1", n, steps=2, x1=x1.clone(), cond={"y": [7, 2, 1]})
    own = DDM(constant_experts(k), router, torch.full((k,), 0.25), (3,), router_conditional=True)  # classes unknown
    with pytest.raises(DDMError, match=r"labels \[-5\] are negative"):
        sample_ddm(own, "top-1", n, steps=2, x1=x1.clone(), cond={"y": torch.tensor([-5, 1, 2])})
    with pytest.raises(DDMError, match="not integer class labels"):
        sample_ddm(own, "top-1", n, steps=2, x1=x1.clone(), cond={"y": torch.tensor([0.5, 1.0, 2.0])})


def test_class_stats_router_known_answers():
    gen = torch.Generator().manual_seed(0)
    # island 0 holds classes 0 and 1, island 1 only class 1
    x0, y0 = torch.randn(200, 3, generator=gen) + 2, torch.arange(200) % 2
    x1, y1 = torch.randn(100, 3, generator=gen) - 2, torch.ones(100, dtype=torch.long)
    per_class = [island_class_statistics(x0, y0, 2), island_class_statistics(x1, y1, 2)]
    assert per_class[1][0] is None  # island 1 has no image of class 0
    marginal = [island_statistics(x0), island_statistics(x1)]
    router = class_stats_router(per_class, marginal)
    x, t = torch.randn(50, 3, generator=gen) * 3, torch.rand(50)
    # class 0 lives on island 0 alone: all its mass goes there, wherever x is
    assert torch.allclose(router(x, t, torch.zeros(50, dtype=torch.long)), torch.tensor([1.0, 0.0]).expand(50, 2))
    # class 1: the posterior of the two islands' class-1 statistics, rows grouped by label
    direct = stats_router([per_class[0][1], per_class[1][1]])(x, t)
    y = torch.arange(50) % 2
    got = router(x, t, y)
    assert torch.allclose(got[y == 1], direct[y == 1], atol=1e-6)
    # no label: the marginal router
    assert torch.allclose(router(x, t), stats_router(marginal)(x, t))
