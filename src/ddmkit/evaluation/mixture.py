"""Quality of samples measured against a known Gaussian mixture.

- nll: mean of -log p_0(x) under the true mixture.
- mode coverage: each sample is assigned to its most probable component;
  a mode is "hit" when it receives at least a tenth of its expected count
  (pi_k n / 10). Reported as the share of modes hit and the KL divergence
  KL(hist || pi) of the assignment histogram (with add-half smoothing).
- off-manifold rate: share of samples outside the 99.9% ellipsoid of every
  component (squared Mahalanobis distance above the chi-square 0.999
  quantile with d degrees of freedom); true samples give about 0.001.
"""
from __future__ import annotations

import numpy as np
import torch

from ddmkit.truth import GaussianMixture


def _t(x, gmm: GaussianMixture) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(gmm.means.dtype).reshape(len(x), -1)


def nll(x, gmm: GaussianMixture) -> float:
    return float(-gmm.log_prob(_t(x, gmm), 0.0).mean())


def mode_coverage(x, gmm: GaussianMixture) -> dict:
    """{"modes_hit": share of modes hit, "mode_kl": KL(hist || weights)}."""
    x = _t(x, gmm)
    assign = gmm.component_log_prob(x, 0.0).add(gmm.weights.log()).argmax(1)
    counts = torch.bincount(assign, minlength=gmm.k).double()
    expected = gmm.weights * len(x)
    hit = (counts >= expected / 10).double().mean()
    p = (counts + 0.5) / (counts + 0.5).sum()
    kl = (p * (p / gmm.weights).log()).sum()
    return {"modes_hit": float(hit), "mode_kl": float(kl)}


def off_manifold_rate(x, gmm: GaussianMixture, quantile: float = 0.999) -> float:
    from scipy.stats import chi2  # scipy.stats takes a second to import: on first use, not at start-up

    x = _t(x, gmm)
    z = torch.einsum("kji,bkj->bki", gmm.eigvecs, x[:, None, :] - gmm.means[None])
    maha = (z**2 / gmm.eigvals[None]).sum(-1)
    return float((maha.min(1).values > chi2.ppf(quantile, gmm.dim)).double().mean())
