"""W2 with common noise: zero for the exact solution, at most the pathwise RMS, equal to it for small
deterministic errors (OT keeps the noise pairing)."""
import torch

from ddmkit.evaluation import w2_exact
from ddmkit.theory.convergence import ConvergenceSettings, exact_solution, make_problem, routed_sample


def test_common_noise_w2_against_pathwise():
    problem = make_problem(ConvergenceSettings.quick())
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_solution(problem.gmm, noise)
    assert w2_exact(exact, exact) < 1e-6
    for sampler, steps in (("euler:full", 16), ("euler:switch", 8)):
        x = routed_sample(problem, sampler, noise, steps, seed=1)
        rms = float(((x - exact) ** 2).sum(1).mean().sqrt())
        w2 = w2_exact(x, exact)
        assert w2 <= rms + 1e-9
        if sampler == "euler:full":
            assert abs(w2 - rms) < 1e-3 * rms
