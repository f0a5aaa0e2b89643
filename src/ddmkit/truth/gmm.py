"""Exact Gaussian-mixture fields under ddmkit's linear path.

Time convention: ddmkit.conventions (x_t = (1 - t) x + t eps, v = eps - x).
Write a = 1 - t, s = t.

For data q = sum_k pi_k N(mu_k, S_k) every noised component is Gaussian:

    x_t | k ~ N(a mu_k, C_k),   C_k = a^2 S_k + s^2 I.

With S_k = U_k diag(l_k) U_k^T (eigendecomposition, done once), C_k shares the
eigenvectors, so every quantity below is a rotation plus a diagonal scaling.
For r = x_t - a mu_k:

    score_k(x, t) = -C_k^{-1} r
    v_k(x, t)     = E[eps - x | x_t, k] = -mu_k + (s I - a S_k) C_k^{-1} r
    w_k(x, t)     = pi_k N(x; a mu_k, C_k) / sum_j pi_j N(x; a mu_j, C_j)
    v(x, t)       = sum_k w_k v_k,   score = sum_k w_k score_k
    dv/dx         = sum_k w_k (s I - a S_k) C_k^{-1} + sum_k w_k v_k (score_k - score)^T

v_k is finite on the whole closed interval [0, 1] (C_k = S_k at t = 0 and I at
t = 1), and v and the score obey v = -(x + t score) / (1 - t) for t < 1.

Shapes: x is (B, d), t is (B,) or a float; results are (B, K) for per-cluster
scalars, (B, K, d) for per-cluster vectors. Everything is float64 by default.
t must be finite and <= 1; t < 0 is accepted (the formulas hold there and
an adaptive solver may step a little past the data end, then interpolate back).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ddmkit.errors import DDMError

Tensor = torch.Tensor


def _cpu_tensor(value, dtype: torch.dtype) -> Tensor:
    """A number array (tensor on any device, numpy array, nested lists) as a CPU tensor of dtype."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


def _check_x(x: Tensor, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """A DDMError unless x is a (B, dim) batch of floats the mixture's dtype can take (a float64 x meets
    a float32 mixture's tensors in products that need one dtype; an integer x would make t an integer),
    on the mixture's device."""
    if not isinstance(x, Tensor):
        raise DDMError(f"x must be a torch tensor (B, {dim}); got {type(x).__name__}: torch.as_tensor(x, "
                       f"dtype={dtype}) makes one")
    if x.device != device:
        raise DDMError(f"x is on {x.device} and the mixture on {device}: give x.to({str(device)!r}), or the "
                       f"mixture on x's device: mixture.to({str(x.device)!r})")
    if not x.is_floating_point():
        raise DDMError(f"x must be floating point; got {x.dtype}: give x.to({dtype})")
    if torch.finfo(x.dtype).bits > torch.finfo(dtype).bits:
        raise DDMError(f"x is {x.dtype} and the mixture {dtype}: give x.to({dtype}), or the mixture in x's "
                       f"dtype: mixture.to({x.dtype})")
    if x.ndim != 2 or x.shape[1] != dim:
        raise DDMError(f"x must have shape (B, {dim}): a batch of points of the mixture's dimension; "
                       f"got {tuple(x.shape)}")


def _as_t(t, x: Tensor) -> Tensor:
    """Time as a (B,) tensor of x's dtype and device; a DDMError unless t is a number or (B,),
    finite and <= 1 (values are not read while a CUDA graph is being captured)."""
    if isinstance(t, (str, bytes)) or t is None:
        raise DDMError(f"t must be a number or a tensor of shape ({x.shape[0]},); got {t!r}")
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise DDMError(f"t must be a number or of shape ({x.shape[0]},), one time per row of x; "
                       f"got shape {tuple(t.shape)}")
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    bad = ~(torch.isfinite(t) & (t <= 1))
    if not capturing and bool(bad.any()):
        raise DDMError(f"t must be finite and <= 1 (t = 0 is data, t = 1 noise); got {t[bad][0].item()}")
    return t


def follows_device(mixture: "GaussianMixture"):
    """device -> the mixture on that device, moved once per device: for a field of the mixture that is
    called wherever its input is (the exact experts and router of a DDM sampled on a GPU)."""
    copies = {mixture.means.device: mixture}

    def on(device: torch.device) -> GaussianMixture:
        if device not in copies:
            copies[device] = mixture.to(device)
        return copies[device]
    return on


@dataclass(frozen=True)
class GaussianMixture:
    """A Gaussian mixture with full covariances, stored by eigendecomposition.

    weights (K,) >= 0 summing to 1, means (K, d), eigvals (K, d) > 0, eigvecs
    (K, d, d) orthonormal, with covariance S_k = eigvecs[k] @ diag(eigvals[k]) @ eigvecs[k].T.
    The sum of the weights and eigvecs^T eigvecs = I are checked to sqrt(machine epsilon)
    of the dtype.
    """

    weights: Tensor
    means: Tensor
    eigvals: Tensor
    eigvecs: Tensor

    def __post_init__(self):
        parts = {"weights": self.weights, "means": self.means, "eigvals": self.eigvals, "eigvecs": self.eigvecs}
        for name, value in parts.items():
            if not isinstance(value, Tensor):
                raise DDMError(f"{name} must be a torch tensor; got {type(value).__name__} "
                               "(GaussianMixture.from_covariances takes arrays)")
        if self.means.ndim != 2:
            raise DDMError(f"means must have shape (K, d); got {tuple(self.means.shape)}")
        k, d = self.means.shape
        for name, shape in (("weights", (k,)), ("eigvals", (k, d)), ("eigvecs", (k, d, d))):
            if parts[name].shape != shape:
                raise DDMError(f"{name} must have shape {shape} for {k} means of dimension {d}; "
                               f"got {tuple(parts[name].shape)}")
        for name, value in parts.items():
            if not bool(torch.isfinite(value).all()):
                raise DDMError(f"{name} must be finite; got nan or inf")
        tol = torch.finfo(self.means.dtype).eps ** 0.5
        if (self.weights < 0).any() or abs(float(self.weights.sum()) - 1) > tol:
            raise DDMError(f"weights must be >= 0 and sum to 1; got sum {float(self.weights.sum()):.9g} "
                           "(GaussianMixture.from_covariances normalises them)")
        if (self.eigvals <= 0).any():
            raise DDMError("eigvals must be > 0 (covariances positive definite)")
        eye = torch.eye(d, dtype=self.eigvecs.dtype, device=self.eigvecs.device)
        if float((self.eigvecs.transpose(1, 2) @ self.eigvecs - eye).abs().max()) > tol:
            raise DDMError("eigvecs must be orthonormal: eigvecs[k].T @ eigvecs[k] = I for every k "
                           "(eigenvectors of the covariances, e.g. from torch.linalg.eigh)")

    # ----- construction -------------------------------------------------
    @staticmethod
    def from_covariances(weights, means, covs, dtype=torch.float64) -> "GaussianMixture":
        """Build from weights (K,), means (K, d) and covariances given as
        full (K, d, d), diagonal (K, d) or isotropic (K,) arrays; dtype: a floating-point torch dtype."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and not dtype.is_complex):
            raise DDMError("dtype must be a floating-point torch dtype (torch.float64, the default, or "
                           f"torch.float32); got {dtype!r}")
        w, mu, cov = (_cpu_tensor(value, dtype) for value in (weights, means, covs))
        for name, value in (("weights", w), ("means", mu), ("covs", cov)):
            if not bool(torch.isfinite(value).all()):
                raise DDMError(f"{name} must be finite; got nan or inf")
        if mu.ndim != 2:
            raise DDMError(f"means must have shape (K, d); got {tuple(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,):
            raise DDMError(f"weights must have shape ({k},), one per mean; got {tuple(w.shape)}")
        if (w < 0).any() or float(w.sum()) <= 0:
            raise DDMError(f"weights must be >= 0 with a positive sum (they are normalised); got {w.tolist()}")
        w = w / w.sum()
        if cov.shape == (k,):
            lam, vec = cov[:, None].expand(k, d).clone(), torch.eye(d, dtype=dtype).expand(k, d, d).clone()
        elif cov.shape == (k, d):
            lam, vec = cov.clone(), torch.eye(d, dtype=dtype).expand(k, d, d).clone()
        elif cov.shape == (k, d, d):
            if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-10):
                raise DDMError("covs must be symmetric: covs[k] == covs[k].T (to 1e-10) for every k")
            lam, vec = torch.linalg.eigh(cov)
        else:
            raise DDMError(f"covs must have shape ({k},) (isotropic), ({k}, {d}) (diagonal) or ({k}, {d}, {d}) (full); "
                           f"got {tuple(cov.shape)}")
        if (lam <= 0).any():
            raise DDMError(f"covs must be positive definite; the smallest eigenvalue is {float(lam.min()):.3g}")
        return GaussianMixture(w, mu, lam, vec)

    @property
    def k(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covariances(self) -> Tensor:
        """Full covariances (K, d, d)."""
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(1, 2)

    def to(self, *args, dtype=None, device=None) -> "GaussianMixture":
        """The mixture in another dtype and/or on another device, given in any order, as for a tensor:
        mixture.to(torch.float32), mixture.to("cuda"), mixture.to("cuda", torch.float64). A dtype is a torch
        dtype: a string is a device, and one naming a dtype ("float32") is refused, saying so."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg

        def torch_name(value) -> str | None:  # "float32" -> "torch.float32"
            named = isinstance(value, str) and isinstance(getattr(torch, value.strip(), None), torch.dtype)
            return f"torch.{value.strip()}" if named else None

        if torch_name(device):  # "float32" would reach torch as a device string ("Invalid device string")
            raise DDMError(f"GaussianMixture.to({device!r}): a string names a device (cpu, cuda, cuda:N); give a "
                           f"dtype as a torch dtype, e.g. mixture.to({torch_name(device)})")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise DDMError(f"GaussianMixture.to: dtype must be a torch dtype, e.g. "
                           f"dtype={torch_name(dtype) or 'torch.float32'}; got {dtype!r}")
        return GaussianMixture(*(p.to(dtype=dtype, device=device) for p in
                                 (self.weights, self.means, self.eigvals, self.eigvecs)))

    def subset(self, idx) -> "GaussianMixture":
        """The mixture of components idx, weights renormalised."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.ndim != 1 or ((idx < 0) | (idx >= self.k)).any():
            raise DDMError(f"idx must be a list of component indices in 0 .. {self.k - 1}; got {idx.tolist()}")
        w = self.weights[idx]
        if not float(w.sum()) > 0:
            raise DDMError(f"idx: components {idx.tolist()} have total weight 0; name at least one with weight > 0")
        return GaussianMixture(w / w.sum(), self.means[idx], self.eigvals[idx], self.eigvecs[idx])

    # ----- sampling -------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n samples of the data distribution (t = 0), optionally with component labels."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise DDMError(f"n (the number of samples) must be an integer >= 0; got {n!r}")
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long, device=self.means.device)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self.eigvecs[labels], z * self.eigvals[labels].sqrt())
        return (x, labels) if return_labels else x

    # ----- the noised components -----------------------------------------
    def _parts(self, x: Tensor, t) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rotated residuals z = U_k^T (x - a mu_k) (B, K, d), the noised
        eigenvalues c = a^2 l + s^2 (B, K, d), and a, s as (B, 1, 1)."""
        _check_x(x, self.dim, self.means.dtype, self.means.device)
        t = _as_t(t, x)
        a, s = (1 - t)[:, None, None], t[:, None, None]
        r = x[:, None, :] - a * self.means[None]
        z = torch.einsum("kji,bkj->bki", self.eigvecs, r)
        c = a**2 * self.eigvals[None] + s**2
        return z, c, a, s

    def _rotate_back(self, y: Tensor) -> Tensor:
        """U_k y for y (B, K, d)."""
        return torch.einsum("kij,bkj->bki", self.eigvecs, y)

    def component_log_prob(self, x: Tensor, t=0.0) -> Tensor:
        """log N(x; a mu_k, C_k) for every component, (B, K)."""
        z, c, _, _ = self._parts(x, t)
        return -0.5 * ((z**2 / c).sum(-1) + c.log().sum(-1) + self.dim * math.log(2 * math.pi))

    def log_prob(self, x: Tensor, t=0.0) -> Tensor:
        """log p_t(x), (B,)."""
        return torch.logsumexp(self.component_log_prob(x, t) + self.weights.log(), dim=1)

    def posterior(self, x: Tensor, t) -> Tensor:
        """w_k(x, t) = P(component k | x_t = x), (B, K)."""
        return torch.softmax(self.component_log_prob(x, t) + self.weights.log(), dim=1)

    def component_velocities(self, x: Tensor, t) -> Tensor:
        """v_k(x, t) = E[eps - x | x_t = x, k], (B, K, d)."""
        z, c, a, s = self._parts(x, t)
        return -self.means[None] + self._rotate_back((s - a * self.eigvals[None]) / c * z)

    def component_scores(self, x: Tensor, t) -> Tensor:
        """grad log N(x; a mu_k, C_k), (B, K, d)."""
        z, c, _, _ = self._parts(x, t)
        return -self._rotate_back(z / c)

    def velocity(self, x: Tensor, t) -> Tensor:
        """The marginal velocity v(x, t) = sum_k w_k v_k, (B, d)."""
        return torch.einsum("bk,bkd->bd", self.posterior(x, t), self.component_velocities(x, t))

    def score(self, x: Tensor, t) -> Tensor:
        """grad_x log p_t(x), (B, d)."""
        return torch.einsum("bk,bkd->bd", self.posterior(x, t), self.component_scores(x, t))

    def x0_mean(self, x: Tensor, t) -> Tensor:
        """E[x_0 | x_t = x] = x - t v(x, t), (B, d)."""
        return x - _as_t(t, x)[:, None] * self.velocity(x, t)

    def velocity_jacobian(self, x: Tensor, t) -> Tensor:
        """dv/dx in closed form, (B, d, d)."""
        z, c, a, s = self._parts(x, t)
        w = self.posterior(x, t)
        scale = (s - a * self.eigvals[None]) / c  # (B, K, d)
        jk = torch.einsum("kij,bkj,klj->bkil", self.eigvecs, scale, self.eigvecs)
        vk = self.component_velocities(x, t)
        sk = self.component_scores(x, t)
        sbar = torch.einsum("bk,bkd->bd", w, sk)
        return torch.einsum("bk,bkij->bij", w, jk) + torch.einsum("bk,bki,bkj->bij", w, vk, sk - sbar[:, None])

    def velocity_lipschitz_bound(self, t) -> Tensor:
        """Upper bound on the operator norm of dv/dx at time t, uniform in x,
        for components with one shared isotropic covariance sigma^2 I.

        dv/dx = sum_k w_k J_k + Cov_w(v_k, score_k). With S_k = sigma^2 I,
        J_k = (s - a sigma^2) / c I, v_j - v_k = -(s / c)(mu_j - mu_k) and
        score_j - score_k = (a / c)(mu_j - mu_k), so a weighted covariance of
        two vectors along one direction has norm at most a quarter of their
        largest product:

            L(t) <= |s - a sigma^2| / c  +  a s D^2 / (4 c^2),   c = a^2 sigma^2 + s^2,

        D the largest distance between means. Near the data end
        (s ~ sigma) the second term peaks at order D^2 / sigma^3 and dominates
        when modes are well separated. For other covariances the same formula
        with sigma^2 replaced by each eigenvalue is used as an estimate
        (not a proven bound); compare with `velocity_jacobian` norms.
        """
        t = torch.as_tensor(t, dtype=self.means.dtype, device=self.means.device)
        a, s = (1 - t)[..., None, None], t[..., None, None]
        c = a**2 * self.eigvals + s**2
        own = ((s - a * self.eigvals).abs() / c).amax(dim=(-1, -2))
        cmin = c.amin(dim=(-1, -2))
        dmax = torch.cdist(self.means, self.means).max()
        a, s = a[..., 0, 0], s[..., 0, 0]
        return own + a * s * dmax**2 / (4 * cmin**2)
