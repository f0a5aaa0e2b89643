"""ODE solvers for dx/dt = v(x, t), integrated from t = 1 (noise) down to t = 0 (data).

Each solver is one short pure function in the k-diffusion style:

    x0 = sample_euler(velocity, x1, ts, callback=None)

`velocity(x, t)` takes x (B, *shape) and t (B,) and returns v of x's shape;
`ts` is a decreasing 1-D grid from 1 to 0 (see `time_grid`). The callback gets
a dict {i, t, t_next, x, v} for every step, with the state x at the step's
start t and v its first velocity evaluation there (the end state is the
return value), which is how diagnostics reuse a trajectory. The adaptive
solver reports after its whole solve, with the states at the grid's times
and v None.
"""
from __future__ import annotations

from typing import Callable

import torch

from ddmkit.errors import DDMError

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, kind: str = "uniform", t_max: float = 1.0, t_min: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """A decreasing grid of steps + 1 times from t_max to t_min.

    kind: "uniform", or "cosine" (denser near both ends).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DDMError(f"steps must be an integer >= 1, got {steps!r}")
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "uniform":
        g = u
    elif kind == "cosine":
        g = 0.5 - 0.5 * torch.cos(torch.pi * u)
    else:
        raise DDMError(f"time grid kind must be one of 'uniform', 'cosine'; got {kind!r}")
    return (t_max + (t_min - t_max) * g).to(dtype)


def check_grid(ts) -> None:
    """A time grid is a 1-D tensor from noise to data (decreasing: time_grid makes one); an increasing one would
    integrate from data to noise. Its values are read only where it lives on the CPU (no GPU sync)."""
    if not isinstance(ts, torch.Tensor) or ts.dim() != 1 or len(ts) < 2:
        got = f"shape {tuple(ts.shape)}" if isinstance(ts, torch.Tensor) else type(ts).__name__
        raise DDMError(f"ts: a time grid is a 1-D tensor of at least 2 times (got {got}); make one with time_grid(steps)")
    if ts.device.type == "cpu" and not bool((ts[1:] < ts[:-1]).all()):
        raise DDMError(f"ts: the times must decrease, from noise (t = 1) to data (t = 0); got {ts[:3].tolist()} ...: "
                       "make the grid with time_grid(steps)")


def _tb(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x).expand(x.shape[0])


@torch.no_grad()
def _integrate(step, velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, callback=None) -> torch.Tensor:
    """Run a one-step method over the grid: x <- step(velocity, x, t, t_next, v) with
    v = velocity(x, t) evaluated here once (and reported to the callback)."""
    check_grid(ts)
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        v = velocity(x, _tb(t, x))
        if callback is not None:
            callback({"i": i, "t": t, "t_next": tn, "x": x, "v": v})
        x = step(velocity, x, t, tn, v)
    return x


def _euler_step(velocity, x, t, tn, v):
    return x + (tn - t).to(x.dtype) * v


def _heun_step(velocity, x, t, tn, v):
    h = (tn - t).to(x.dtype)
    return x + h * 0.5 * (v + velocity(x + h * v, _tb(tn, x)))


def _midpoint_step(velocity, x, t, tn, v):
    h = (tn - t).to(x.dtype)
    return x + h * velocity(x + 0.5 * h * v, _tb(t + 0.5 * (tn - t), x))


def _rk4_step(velocity, x, t, tn, k1):
    h = (tn - t).to(x.dtype)
    tm = _tb(t + 0.5 * (tn - t), x)
    k2 = velocity(x + 0.5 * h * k1, tm)
    k3 = velocity(x + 0.5 * h * k2, tm)
    k4 = velocity(x + h * k3, _tb(tn, x))
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def sample_euler(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, callback=None) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i); one velocity evaluation per step."""
    return _integrate(_euler_step, velocity, x, ts, callback)


def sample_heun(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, callback=None) -> torch.Tensor:
    """Heun's method (explicit trapezoid); two velocity evaluations per step."""
    return _integrate(_heun_step, velocity, x, ts, callback)


def sample_midpoint(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, callback=None) -> torch.Tensor:
    """Explicit midpoint; two velocity evaluations per step."""
    return _integrate(_midpoint_step, velocity, x, ts, callback)


def sample_rk4(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, callback=None) -> torch.Tensor:
    """Classical fourth-order Runge-Kutta; four velocity evaluations per step."""
    return _integrate(_rk4_step, velocity, x, ts, callback)


ADAPTIVE_RK = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's, which take step_t


@torch.no_grad()
def sample_adaptive(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, callback=None,
                    method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5) -> torch.Tensor:
    """Adaptive solve through torchdiffeq from ts[0] to ts[-1]; the grid only
    gives the end points (and the callback's report times). The last step ends at ts[-1] exactly, so the
    velocity is never evaluated past it (the solver would step beyond t = 0 and interpolate back), nor is the
    first step's size probed past it."""
    from torchdiffeq import odeint

    times = ts.to(x.dtype)
    lo, hi = torch.aminmax(times[[0, -1]])
    clamp = method in ADAPTIVE_RK  # its steps stay inside (step_t); only the first-step probe at t0 + 0.01 |y| / |v|
    #                                (Hairer's heuristic) may fall past the end, for a slow field: moved onto the end

    def f(t, y):
        t = t.to(y.dtype)
        return velocity(y, (t.clamp(lo, hi) if clamp else t).expand(y.shape[0]))

    options = {"step_t": times[-1:]} if method in ADAPTIVE_RK else None
    path = odeint(f, x, times, method=method, rtol=rtol, atol=atol, options=options)
    if callback is not None:
        for i in range(len(ts) - 1):
            callback({"i": i, "t": ts[i], "t_next": ts[i + 1], "x": path[i], "v": None})
    return path[-1]


SOLVERS = {
    "euler": (sample_euler, 1),
    "heun": (sample_heun, 2),
    "midpoint": (sample_midpoint, 2),
    "rk4": (sample_rk4, 4),
    "adaptive": (sample_adaptive, None),
}


def get_solver(name: str):
    """The solver function for a name in SOLVERS."""
    if name not in SOLVERS:
        raise DDMError(f"solver must be one of {sorted(SOLVERS)}; got {name!r}")
    return SOLVERS[name][0]


def evaluations_per_step(name: str) -> int | None:
    """Velocity evaluations a fixed-step solver makes per step (None if adaptive)."""
    get_solver(name)
    return SOLVERS[name][1]
