"""Two probability-flow ODEs of one Gaussian mixture: ddmkit's linear path
and the Ornstein-Uhlenbeck (variance-preserving) path of the distillation paper.

Linear (ddmkit's convention), t in [0, 1], sampled from t = 1 down to 0:

    x_t = (1 - t) x + t eps,      dx/dt = v(x, t)  (GaussianMixture.velocity)

Ornstein-Uhlenbeck, tau in [0, T], sampled from tau = T down to 0:

    x_tau = alpha x + sigma eps,  alpha = e^(-tau),  sigma = sqrt(1 - alpha^2)
    dx/dtau = -x - score_tau(x)   (the probability-flow ODE of dX = -X dtau + sqrt(2) dW)

Both paths have the same signal-to-noise ratio curve, so one is a rescaling
of the other: with c = alpha + sigma and t = sigma / c,

    x_tau = c x_t,   score_tau(x) = score_t(x / c) / c,
    d score_tau / dx = (1 / c^2) H_t(x / c),   H_t = Hessian of log p_t.

The probability-flow ODEs are then the same curves (x_tau(tau) = c x_t(t(tau))),
which the tests use as an independent check of the OU field.

The Hessian of log p_t of a mixture is closed form:

    H_t(x) = - sum_k w_k C_k^{-1} + Cov_w(score_k),   C_k = a^2 S_k + s^2 I.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddmkit.errors import DDMError
from ddmkit.theory.report import is_number, value_error
from ddmkit.truth import GaussianMixture

Tensor = torch.Tensor


def _time(t, x: Tensor) -> Tensor:
    """Time as a (B,) tensor of x's dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def score_hessian(gmm: GaussianMixture, x: Tensor, t) -> Tensor:
    """H_t(x) = Hessian of log p_t at x under the linear path, (B, d, d)."""
    t = _time(t, x)
    a, s = (1 - t)[:, None, None], t[:, None, None]
    inv_c = 1.0 / (a**2 * gmm.eigvals[None] + s**2)  # (B, K, d) in each component's eigenbasis
    w = gmm.posterior(x, t)
    own = torch.einsum("kij,bkj,klj->bkil", gmm.eigvecs, inv_c, gmm.eigvecs)
    scores = gmm.component_scores(x, t)
    centred = scores - torch.einsum("bk,bkd->bd", w, scores)[:, None]
    return -torch.einsum("bk,bkij->bij", w, own) + torch.einsum("bk,bki,bkj->bij", w, centred, centred)


# ----- the Ornstein-Uhlenbeck path -------------------------------------------
def ou_alpha_sigma(tau: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = e^(-tau), sigma = sqrt(1 - e^(-2 tau)); tau is clamped at 0
    (an adaptive solver may step a little past the data end and interpolate back)."""
    tau = tau.clamp_min(0.0)
    alpha = torch.exp(-tau)
    return alpha, torch.sqrt(-torch.expm1(-2 * tau))


def ou_to_linear(tau: Tensor) -> tuple[Tensor, Tensor]:
    """(c, t): the scale c = alpha + sigma and linear time t = sigma / c of OU time tau."""
    alpha, sigma = ou_alpha_sigma(tau)
    c = alpha + sigma
    return c, sigma / c


def ou_score(gmm: GaussianMixture, x: Tensor, tau) -> Tensor:
    """score_tau(x) = score_t(x / c) / c, (B, d)."""
    c, t = ou_to_linear(_time(tau, x))
    return gmm.score(x / c[:, None], t) / c[:, None]


def ou_velocity(gmm: GaussianMixture, x: Tensor, tau) -> Tensor:
    """dx/dtau = -x - score_tau(x), (B, d)."""
    return -x - ou_score(gmm, x, tau)


def ou_velocity_jacobian(gmm: GaussianMixture, x: Tensor, tau) -> Tensor:
    """d/dx of the OU velocity: -I - H_t(x / c) / c^2, (B, d, d)."""
    c, t = ou_to_linear(_time(tau, x))
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return -eye - score_hessian(gmm, x / c[:, None], t) / (c**2)[:, None, None]


# ----- one object per path ---------------------------------------------------
@dataclass(frozen=True)
class FlowPath:
    """A probability path of a mixture: its ODE, Jacobian and time span.

    Sampling integrates from `t_noise` down to `t_data` (= 0)."""

    name: str
    t_noise: float

    def velocity(self, gmm: GaussianMixture, x: Tensor, t) -> Tensor:
        return gmm.velocity(x, t) if self.name == "linear" else ou_velocity(gmm, x, t)

    def jacobian(self, gmm: GaussianMixture, x: Tensor, t) -> Tensor:
        return gmm.velocity_jacobian(x, t) if self.name == "linear" else ou_velocity_jacobian(gmm, x, t)

    def sample_noise_end(self, gmm: GaussianMixture, n: int, generator: torch.Generator) -> Tensor:
        """n exact samples of the marginal at t_noise (N(0, I) for the linear path)."""
        if self.name == "linear":
            return torch.randn(n, gmm.dim, generator=generator, dtype=gmm.means.dtype)
        alpha, sigma = ou_alpha_sigma(torch.tensor(self.t_noise, dtype=gmm.means.dtype))
        x0 = gmm.sample(n, generator=generator)
        return alpha * x0 + sigma * torch.randn(n, gmm.dim, generator=generator, dtype=x0.dtype)

    def lipschitz_bound(self, gmm: GaussianMixture, t: Tensor) -> Tensor:
        """sup_x ||dv/dx||_2 for equal isotropic components sigma^2 I (exact for two modes).

        With a weighted covariance Cov_w(mu) of the means (0 <= Cov_w <= D^2/4,
        D the largest distance between means; both ends attained by two modes):

            linear: dv/dx = (s - a sig^2)/c I - (a s / c^2) Cov_w(mu),    c = a^2 sig^2 + s^2
            OU:     dv/dx = (1/c - 1) I - (alpha^2 / c^2) Cov_w(mu),      c = alpha^2 sig^2 + 1 - alpha^2

        so ||dv/dx|| <= max(|g|, |g - h D^2 / 4|) with g the identity part and h
        the covariance factor."""
        var = _shared_isotropic_variance(gmm)
        dmax = float(torch.cdist(gmm.means, gmm.means).max())
        t = torch.as_tensor(t, dtype=gmm.means.dtype)
        if self.name == "linear":
            a, s = 1 - t, t
            c = a**2 * var + s**2
            g, h = (s - a * var) / c, a * s / c**2
        else:
            alpha, _ = ou_alpha_sigma(t)
            c = alpha**2 * var + 1 - alpha**2
            g, h = 1 / c - 1, alpha**2 / c**2
        return torch.maximum(g.abs(), (g - h * dmax**2 / 4).abs())


PATHS = {"linear": FlowPath("linear", 1.0), "ou": FlowPath("ou", 4.0)}


def get_path(name: str, t_noise: float | None = None) -> FlowPath:
    """The path named `name` ('linear' or 'ou'); t_noise is the OU path's end time (default 4), checked for
    either path and unused by the linear one (a study passes one end time for all its paths)."""
    if not isinstance(name, str) or name not in PATHS:
        raise value_error("get_path: name", name, f"one of {', '.join(map(repr, PATHS))}")
    if t_noise is not None and not is_number(t_noise, "positive"):
        raise value_error("get_path: t_noise", t_noise, "a positive finite number (the OU path's end time), or None "
                                                         f"for {PATHS['ou'].t_noise:g}")
    if name == "linear" or t_noise is None:
        return PATHS[name]
    return FlowPath("ou", float(t_noise))


def _shared_isotropic_variance(gmm: GaussianMixture) -> float:
    """sigma^2 when every component is sigma^2 I; a DDMError otherwise."""
    var = gmm.eigvals
    if not torch.allclose(var, var.flatten()[0].expand_as(var), rtol=1e-9, atol=0):
        raise DDMError("the Lipschitz bound needs components with one shared isotropic covariance sigma^2 I")
    return float(var.flatten()[0])
