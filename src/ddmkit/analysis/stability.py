"""Stability of routed sampling: local Lipschitz constants, end-to-end amplification, refinement gap.

Definitions (ddmkit's own; the paper's formulas are not public):

    L_top(x, t)  = sigma_max(J),  J = dv/dx         exact for small D, else power iteration u <- J^T J u
    L_rand(x, t) = |J u|,  u a random unit vector    (E |J u|^2 = |J|_F^2 / D)
    L_fd(x, t)   = |v(x + h u) - v(x)| / h           the routed field as sampled, routing switches included
    A(x_1)       = |Phi(x_1 + d) - Phi(x_1)| / |d|   Phi the whole sampler, |d| = delta
    Delta_refine = E |Phi_N(x_1) - Phi_2N(x_1)| / s  s = RMS distance of held-out data to its mean

J is the Jacobian of the *frozen-routing* field at the point: the experts S the
strategy chose stay chosen and their weights follow the router,
v~(x) = sum_{k in S} r_k(x) v_k(x) / sum_{k in S} r_k(x) (the a.e. derivative of top-k,
threshold, sample-k, ...; one-hot strategies give the chosen expert's Jacobian).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from ddmkit.analysis.trace import Trace, hooked_field, replay_state, trace_strategy
from ddmkit.ddm.model import DDM
from ddmkit.routing import combine, parse_strategy


def row_norm(a: torch.Tensor) -> torch.Tensor:
    """|a_b| for every row b of a (B, *shape), (B,)."""
    return a.reshape(len(a), -1).norm(dim=1)


def unit(a: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm."""
    return a / row_norm(a).clamp_min(1e-30).reshape(-1, *([1] * (a.dim() - 1)))


def renorm(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(1, keepdim=True).clamp_min(1e-30)


def jvp(f, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """J u by forward-mode AD (rows are independent, so one call serves the whole batch);
    no_grad keeps autograd from also recording the parameters (20x faster)."""
    with torch.no_grad(), fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x, u))).tangent


def vjp(f, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """J^T g by reverse-mode AD."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        return torch.autograd.grad(f(xg), xg, g)[0]


def random_unit(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random unit direction per row of x, drawn on x's device (the generator must live there)."""
    return unit(torch.randn(x.shape, generator=generator, device=x.device).to(x))


def full_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """J (B, D, D) row by row: one forward pass and D reverse passes (J[b, j] = grad of output j)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = f(xg).reshape(len(x), -1)
        rows = [torch.autograd.grad(y[:, j].sum(), xg, retain_graph=j < y.shape[1] - 1)[0].reshape(len(x), -1)
                for j in range(y.shape[1])]
    return torch.stack(rows, 1)


def jacobian_norms(f, x: torch.Tensor, iters: int = 6, u: torch.Tensor | None = None) -> dict:
    """Per row: L_rand = |J u| for the unit direction u (random if None), and L_top = sigma_max(J):
    exact from the full Jacobian when D <= 2 iters + 1 (cheaper), else by `iters` power
    iterations on J^T J from u (just |J u| if f has no reverse mode)."""
    u = random_unit(x) if u is None else u
    flat_u = u.reshape(len(x), -1)
    if flat_u.shape[1] <= 2 * iters + 1:
        jac = full_jacobian(f, x)
        return {"top": torch.linalg.matrix_norm(jac, 2), "rand": (jac @ flat_u[:, :, None]).squeeze(2).norm(dim=1)}
    ju = jvp(f, x, u)
    rand = row_norm(ju)
    try:
        for _ in range(iters):
            u = unit(vjp(f, x, ju))
            ju = jvp(f, x, u)
        top = row_norm(ju)
    except RuntimeError:  # no reverse mode through f
        top = rand
    return {"top": top, "rand": rand}


def frozen_field(ddm: DDM, t: torch.Tensor, probs: torch.Tensor, w: torch.Tensor):
    """v~(x) at time t with the routing decision w frozen (see the module docstring)."""
    experts, router = ddm.experts, ddm.router  # plain fields: differentiable where the caller enables grad
    mask = (w > 0).to(w.dtype)
    follows_router = (renorm(probs * mask) - w).abs().amax(1, keepdim=True) < 1e-4

    def f(x):
        wt = torch.where(follows_router, renorm(router(x, t) * mask), w)
        return combine(experts, wt, x, t)

    return f


@torch.no_grad()
def fd_lipschitz(ddm: DDM, tr: Trace, i: int, rows: torch.Tensor, u: torch.Tensor, h: float,
                 seed: int = 0) -> torch.Tensor:
    """L_fd per row at step i along unit directions u: the strategy re-run at x and x + h u with
    the same random numbers."""
    strat = parse_strategy(tr.strategy)
    x = tr.x[i][rows]
    t = tr.t[i].expand(len(rows)).to(x.dtype)
    v = [hooked_field(ddm, strat, replay_state(ddm, tr, i, rows, seed))(xx, t) for xx in (x, x + h * u)]
    return row_norm(v[1] - v[0]) / h


@torch.no_grad()  # the Jacobian products enable grad where they need it
def local_lipschitz(ddm: DDM, tr: Trace, rows: torch.Tensor, max_steps: int = 25, iters: int = 6,
                    h: float = 1e-3, seed: int = 0, batch_rows: int = 512) -> dict:
    """L_top, L_rand, L_fd averaged over `rows` at up to max_steps evenly spaced steps of the trace
    (the probes drawn on the trace's device). Rows are independent, so the Jacobian products of several
    steps go through the networks together, up to `batch_rows` rows at once (each row keeps its own t and
    frozen routing): fewer, larger network calls, the same numbers up to rounding."""
    gen = torch.Generator(device=tr.x.device).manual_seed(seed)
    steps = torch.linspace(0, len(tr.t) - 1, min(max_steps, len(tr.t))).round().long().unique().tolist()
    probes = [random_unit(tr.x[i][rows], gen) for i in steps]  # one unit direction per row and step
    out = {"t": [float(tr.t[i]) for i in steps], "top": [], "rand": [], "fd": []}
    per_call = max(1, batch_rows // len(rows))
    for lo in range(0, len(steps), per_call):
        group = steps[lo:lo + per_call]
        x = torch.cat([tr.x[i][rows] for i in group])
        t = torch.cat([tr.t[i].expand(len(rows)) for i in group]).to(x.dtype)
        field = frozen_field(ddm, t, torch.cat([tr.probs[i][rows] for i in group]),
                             torch.cat([tr.w[i][rows] for i in group]))
        norms = jacobian_norms(field, x, iters, torch.cat(probes[lo:lo + per_call]))
        for key in ("top", "rand"):
            out[key] += [float(v.mean()) for v in norms[key].detach().split(len(rows))]
    out["fd"] = [float(fd_lipschitz(ddm, tr, i, rows, u, h, seed).mean()) for i, u in zip(steps, probes)]
    return out


@torch.no_grad()
def amplification(ddm: DDM, tr: Trace, steps: int, solver: str, seed: int, delta: float = 1e-3) -> torch.Tensor:
    """A(x_1) per sample: the sampler re-run from x_1 + d (|d| = delta, same random numbers; d drawn on
    x_1's device)."""
    gen = torch.Generator(device=tr.x1.device).manual_seed(seed + 7)
    d = delta * random_unit(tr.x1, gen)
    moved = trace_strategy(ddm, tr.strategy, tr.x1 + d, steps, solver, seed, record=False).x0
    return row_norm(moved - tr.x0) / delta


def refinement_gap(x0_n: torch.Tensor, x0_2n: torch.Tensor, scale: float) -> torch.Tensor:
    """Delta_refine per sample: |x0(N steps) - x0(2N steps)| / scale."""
    return row_norm(x0_2n - x0_n) / scale


def data_scale(x: torch.Tensor) -> float:
    """s = sqrt(E |x - mean|^2): the normaliser of Delta_refine."""
    flat = x.reshape(len(x), -1).double()
    return float(((flat - flat.mean(0)) ** 2).sum(1).mean().sqrt())
