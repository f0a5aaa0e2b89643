"""Stability diagnostics against known answers: linear fields, smooth fields, replayed traces."""
import torch

from ddmkit.analysis.stability import (amplification, data_scale, jacobian_norms, local_lipschitz,
                                       refinement_gap)
from ddmkit.analysis.trace import trace_strategy
from ddmkit.ddm import DDM
from ddmkit.ddm.sampling import sample_ddm, start_noise

A = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 0.5], [0.3, 0.0, 0.7]])


def linear_ddm(k: int = 2) -> DDM:
    """k identical experts v = A x under a router that depends on x: the routed field is A x whatever the weights."""
    experts = [lambda x, t: x @ A.T for _ in range(k)]
    b = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    return DDM(experts, lambda x, t: torch.softmax(x @ b, 1), torch.full((k,), 1 / k), (3,))


def test_lipschitz_of_a_linear_field_is_its_matrix_norm():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    norms = jacobian_norms(lambda x: x @ A.T, x, iters=30)
    assert torch.allclose(norms["top"], torch.linalg.matrix_norm(A, 2).expand(64), rtol=1e-4)
    assert (norms["rand"] <= norms["top"] + 1e-5).all()


def test_power_iteration_in_high_dimension_finds_the_top_singular_value():
    q = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(2)))[0]
    sv = torch.linspace(2.0, 0.1, 40)
    sv[0] = 5.0  # singular values 5, 2, ...: power iteration converges like (2/5)^(2 iters)
    m = q @ torch.diag(sv) @ q.T.roll(1, 0)
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(3))
    norms = jacobian_norms(lambda x: x @ m.T, x, iters=15)  # D = 40 > 2 * 15 + 1: power iteration
    assert torch.allclose(norms["top"], torch.tensor(5.0).expand(8), rtol=2e-2)


def test_lipschitz_along_routed_trajectories_of_a_linear_field():
    ddm = linear_ddm()
    tr = trace_strategy(ddm, "full", start_noise(32, (3,), 0), steps=5)
    lip = local_lipschitz(ddm, tr, torch.arange(32), max_steps=5, iters=30)
    sigma = float(torch.linalg.matrix_norm(A, 2))
    assert all(abs(v - sigma) < 1e-3 * sigma for v in lip["top"])
    assert all(abs(f - r) < 1e-2 * r for f, r in zip(lip["fd"], lip["rand"]))  # FD agrees with JVP, random directions


def test_amplification_of_a_linear_field_is_the_flow_matrix_applied_to_the_direction():
    ddm = linear_ddm()
    x1 = start_noise(16, (3,), 0)
    tr = trace_strategy(ddm, "top-1", x1, steps=4, record=False)
    amp = amplification(ddm, tr, steps=4, solver="euler", seed=0)
    m = torch.linalg.matrix_power(torch.eye(3) - 0.25 * A, 4)  # Euler from t = 1 to 0: x <- x - h A x
    assert (amp <= torch.linalg.matrix_norm(m, 2) * (1 + 1e-3)).all()
    assert (amp >= torch.linalg.matrix_norm(m, -2) * (1 - 1e-3)).all()


def test_refinement_gap_shrinks_as_steps_grow_for_a_smooth_field():
    ddm = DDM([lambda x, t: torch.sin(x) * (1 + t[:, None]) - 0.5 * x], lambda x, t: torch.ones(len(x), 1),
              torch.ones(1), (2,))
    x1 = start_noise(200, (2,), 0)
    gaps = []
    for n in (4, 8, 16, 32):
        x_n = trace_strategy(ddm, "full", x1, n, record=False).x0
        x_2n = trace_strategy(ddm, "full", x1, 2 * n, record=False).x0
        gaps.append(float(refinement_gap(x_n, x_2n, data_scale(x1)).mean()))
    assert all(b < 0.6 * a for a, b in zip(gaps, gaps[1:]))  # first order: halves with every doubling


def test_trace_reproduces_sample_ddm_including_random_strategies():
    ddm = DDM([lambda x, t, s=s: x * s - t[:, None] for s in (0.5, 1.0, -1.0)],
              lambda x, t: torch.softmax(torch.stack([x[:, 0], x[:, 1], -x[:, 0]], 1), 1),
              torch.tensor([0.2, 0.3, 0.5]), (2,), nearest=lambda x: (x[:, 0] > 0).long() + (x[:, 1] > 1).long())
    for strategy in ("top-2", "switch", "sample-2", "oracle", "nearest"):
        x0, info = sample_ddm(ddm, strategy, 50, steps=6, seed=3)
        tr = trace_strategy(ddm, strategy, start_noise(50, (2,), 3), 6, seed=3)
        assert torch.equal(tr.x0, x0), strategy
        assert tr.expert_calls_per_sample == info["expert_calls_per_sample"]
        assert tr.x.shape == (6, 50, 2) and tr.w.shape == (6, 50, 3)


def test_lipschitz_of_several_steps_in_one_call_equals_one_step_at_a_time():
    """Each row keeps its own t, probes and frozen routing when steps share a network call."""
    ddm = DDM([lambda x, t, s=s: torch.tanh(s * x) * (1 + 3 * t[:, None]) - x * t[:, None] ** 2
               for s in (0.5, 2.0, -1.0)],
              lambda x, t: torch.softmax(torch.stack([x[:, 0] * (1 + t), x[:, 1], -x[:, 0] * t], 1), 1),
              torch.tensor([0.2, 0.3, 0.5]), (2,))
    for strategy in ("top-1", "full"):
        tr = trace_strategy(ddm, strategy, start_noise(24, (2,), 5), steps=8)
        one = local_lipschitz(ddm, tr, torch.arange(12), max_steps=6, batch_rows=1)  # a call per step
        many = local_lipschitz(ddm, tr, torch.arange(12), max_steps=6, batch_rows=48)  # 4 steps per call
        assert one["t"] == many["t"] and len(set(one["top"])) == 6
        for key in ("top", "rand", "fd"):
            assert torch.allclose(torch.tensor(many[key]), torch.tensor(one[key]), rtol=1e-5), (strategy, key)
