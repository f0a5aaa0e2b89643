"""ODE solvers from t = 1 (noise) to t = 0 (data)."""
from ddmkit.sample.solvers import (SOLVERS, evaluations_per_step, get_solver, sample_adaptive, sample_euler,
                                   sample_heun, sample_midpoint, sample_rk4, time_grid)

__all__ = ["SOLVERS", "evaluations_per_step", "get_solver", "sample_adaptive", "sample_euler", "sample_heun",
           "sample_midpoint", "sample_rk4", "time_grid"]
