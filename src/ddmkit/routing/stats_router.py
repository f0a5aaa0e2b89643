"""The statistics-only router: no raw data leaves an island.

Each island publishes its cluster's count n_k, mean mu_k and covariance S_k
(for high-dimensional data a low-rank + diagonal S_k = U L U^T + D, rank r).
Modelling every cluster as a Gaussian, a noised sample of cluster k is

    x_t | k ~ N((1 - t) mu_k, (1 - t)^2 S_k + t^2 I)

and the router is the posterior under these noised Gaussians,

    r_k(x, t) = pi_k N(x; (1-t) mu_k, C_k(t)) / sum_j pi_j N(x; (1-t) mu_j, C_j(t)),   pi_k = n_k / sum n.

Full covariances reuse GaussianMixture.posterior. For the low-rank + diagonal
form, write C = Delta + W W^T with Delta = (1-t)^2 D + t^2 (diagonal) and
W = (1-t) U L^(1/2); with M = I_r + W^T Delta^-1 W (Woodbury, determinant lemma)

    r^T C^-1 r = r^T Delta^-1 r - z^T M^-1 z,   z = W^T Delta^-1 r,
    log det C  = sum log Delta + log det M,

which costs O(d r^2) per sample and cluster, never a d x d matrix.

    stats = [island_statistics(x_k) for x_k in shards]    # on each island
    router = stats_router(stats)                          # anywhere: (x, t) -> (B, K)

These routers read values on the host (cuSOLVER's error checks; class_stats_router
groups rows by label), so they cannot be captured as CUDA graphs: a DDM routed by
one says so (DDM.router_capturable = False).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ddmkit.errors import DDMError
from ddmkit.io import load_tensors, save_tensors
from ddmkit.truth import GaussianMixture, follows_device

MAX_FULL_DIM = 256
DEFAULT_RANK = 32
JITTER = 1e-6


def island_statistics(x: torch.Tensor, rank: int | None = None, max_full_dim: int = MAX_FULL_DIM) -> dict:
    """What one island publishes about its data x (N, *shape): count, mean,
    and the full covariance (dimension <= max_full_dim and rank None), else
    the top-`rank` eigenpairs of the covariance plus the residual diagonal
    (rank None: DEFAULT_RANK; always at most d and N - 1)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise DDMError(f"rank must be None (full covariance up to max_full_dim dimensions, else {DEFAULT_RANK}) "
                       f"or an integer >= 1; got {rank!r}")
    flat = x.reshape(len(x), -1).double()
    n, d = flat.shape
    if n < 2:
        raise DDMError(f"island statistics need at least 2 samples, got {n}")
    if not bool(torch.isfinite(flat).all()):
        raise DDMError("x: the island's data hold nan or inf; remove or repair those rows first")
    mean = flat.mean(0)
    centred = flat - mean
    if rank is None and d <= max_full_dim:
        return {"count": torch.tensor(float(n)), "mean": mean, "cov": centred.T @ centred / (n - 1)}
    r = min(DEFAULT_RANK if rank is None else rank, d, n - 1)
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    eigvals = sv[:r] ** 2 / (n - 1)
    factors = vh[:r].T  # (d, r), orthonormal columns
    var = (centred**2).sum(0) / (n - 1)
    diag = (var - (factors**2 * eigvals).sum(1)).clamp_min(JITTER)
    return {"count": torch.tensor(float(n)), "mean": mean, "factors": factors, "eigvals": eigvals, "diag": diag}


def stats_from_partition(tensors: dict[str, torch.Tensor]) -> list[dict]:
    """Island statistics from a partition's partition.safetensors (full
    covariances, or variances only: the rank-0 low-rank form)."""
    means, counts = tensors["cluster_means"].double(), tensors["cluster_counts"].double()
    if "cluster_covs" in tensors:
        return [{"count": counts[k], "mean": means[k], "cov": tensors["cluster_covs"][k].double()}
                for k in range(len(means))]
    d = means.shape[1]
    return [{"count": counts[k], "mean": means[k], "factors": torch.zeros(d, 0, dtype=torch.float64),
             "eigvals": torch.zeros(0, dtype=torch.float64), "diag": tensors["cluster_vars"][k].double().clamp_min(JITTER)}
            for k in range(len(means))]


def full_mixture(stats: list[dict]) -> GaussianMixture:
    """The cluster Gaussians as one GaussianMixture (full covariances)."""
    covs = torch.stack([(s["cov"] + s["cov"].T) / 2 for s in stats])
    d = covs.shape[-1]
    scale = covs.diagonal(dim1=1, dim2=2).mean().clamp_min(1.0)
    covs = covs + JITTER * scale * torch.eye(d, dtype=covs.dtype, device=covs.device)
    return GaussianMixture.from_covariances(torch.stack([s["count"] for s in stats]),
                                            torch.stack([s["mean"] for s in stats]), covs)


def lowrank_log_prob(x: torch.Tensor, t: torch.Tensor, means, factors, eigvals, diag) -> torch.Tensor:
    """log N(x; (1-t) mu_k, (1-t)^2 (U L U^T + D) + t^2 I) for every cluster, (B, K).
    means (K, d), factors (K, d, r), eigvals (K, r), diag (K, d); x (B, d), t (B,)."""
    a, s = (1 - t)[:, None, None], t[:, None, None]
    res = x[:, None, :] - a * means[None]                              # (B, K, d)
    delta = a**2 * diag[None] + s**2                                   # (B, K, d)
    w_scale = a * eigvals.clamp_min(0).sqrt()[None]                    # (B, K, r): W = U diag(w_scale)
    z = torch.einsum("kdr,bkd->bkr", factors, res / delta) * w_scale   # W^T Delta^-1 r
    m = torch.einsum("kdr,bkd,kds->bkrs", factors, 1 / delta, factors) * w_scale[..., :, None] * w_scale[..., None, :]
    m = m + torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    chol = torch.linalg.cholesky(m)
    y = torch.cholesky_solve(z[..., None], chol)[..., 0]
    quad = (res**2 / delta).sum(-1) - (z * y).sum(-1)
    logdet = delta.log().sum(-1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (quad + logdet + x.shape[1] * math.log(2 * math.pi))


def _check_dimensions(stats: list[dict]) -> None:
    """A DDMError naming the islands whose mean is not of the first island's dimension."""
    dims = [s["mean"].numel() for s in stats]
    other = [k for k, d in enumerate(dims) if d != dims[0]]
    if other:
        raise DDMError(f"island statistics of different dimensions: island 0 has {dims[0]}, islands {other} have "
                       f"{[dims[k] for k in other]}; every island must describe data of one shape")


def stats_router(stats: list[dict]):
    """The router (x (B, *shape), t (B,)) -> probabilities (B, K) of the published statistics."""
    if not stats:
        raise DDMError("the statistics-only router needs the statistics of at least one island")
    _check_dimensions(stats)
    if all("cov" in s for s in stats):
        gmm_on = follows_device(full_mixture(stats))

        def router(x, t):
            t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(len(x))
            return gmm_on(x.device).posterior(x.reshape(len(x), -1).double(), t).to(torch.float32)

        return router
    if not all("factors" in s for s in stats):
        raise DDMError("island statistics mix full covariances and low-rank ones; publish all in one form")
    rank = max(s["factors"].shape[1] for s in stats)
    pad = lambda v, n: torch.nn.functional.pad(v, (0, n - v.shape[-1]))  # noqa: E731  (zero eigenvalues)
    means = torch.stack([s["mean"] for s in stats]).double()
    factors = torch.stack([pad(s["factors"], rank) for s in stats]).double()
    eigvals = torch.stack([pad(s["eigvals"], rank) for s in stats]).double()
    diag = torch.stack([s["diag"] for s in stats]).double()
    log_pi = torch.stack([s["count"] for s in stats]).double()
    log_pi = (log_pi / log_pi.sum()).log()

    def router(x, t):
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(len(x))
        parts = [p.to(x.device) for p in (means, factors, eigvals, diag)]
        logp = lowrank_log_prob(x.reshape(len(x), -1).double(), t, *parts) + log_pi.to(x.device)
        return torch.softmax(logp, dim=1).to(torch.float32)

    return router


def island_class_statistics(x: torch.Tensor, labels: torch.Tensor, classes: int, rank: int | None = None) -> list:
    """What an island publishes per class label: island_statistics of its images of class c,
    or None where it holds fewer than 2 of them (it then claims no mass for that class)."""
    return [island_statistics(x[labels == c], rank) if int((labels == c).sum()) >= 2 else None
            for c in range(classes)]


def class_stats_router(per_class: list[list[dict | None]], marginal: list[dict]):
    """The label-conditional statistics-only router p(k | x_t, t, y):

        r_k(x, t, y=c) = n_kc N(x; (1-t) mu_kc, C_kc(t)) / sum_j n_jc N(x; (1-t) mu_jc, C_jc(t))

    from each island k's statistics of its class-c images (per_class[k][c], None: n_kc = 0);
    y=None, and the label C = classes ("no label"), give the marginal router of the islands'
    whole-shard statistics `marginal`. Rows are grouped by label, one posterior per label present."""
    k, classes = len(per_class), len(per_class[0]) if per_class else 0
    if k != len(marginal):
        raise DDMError(f"class statistics of {k} islands but marginal statistics of {len(marginal)}")
    marginal_router = stats_router(marginal)

    def absent(j: int) -> dict:  # the island's marginal statistics with count 0: weight 0 for this class
        return {**marginal[j], "count": torch.zeros((), dtype=torch.float64)}

    routers = []
    for c in range(classes):
        stats = [per_class[j][c] if per_class[j][c] is not None else absent(j) for j in range(k)]
        routers.append(stats_router(stats) if any(per_class[j][c] is not None for j in range(k)) else marginal_router)

    def router(x, t, y=None):
        if y is None:
            return marginal_router(x, t)
        t = torch.as_tensor(t, device=x.device).expand(len(x))
        out = torch.empty(len(x), k, device=x.device)
        for c in torch.unique(y).tolist():
            rows = (y == c).nonzero().squeeze(1)
            out[rows] = (routers[c] if c < classes else marginal_router)(x[rows], t[rows])
        return out

    return router


PUBLISHED_STATISTICS = "statistics.safetensors"  # in each expert folder: what its island publishes


def island_publication(x: torch.Tensor, labels: torch.Tensor | None = None, classes: int = 0) -> dict:
    """Everything an island publishes for the statistics-only router, as one flat dict of tensors (one
    file, save_statistics): its island_statistics, and for class-conditional experts (classes > 0) the count
    of each class ("label_counts", (C,)) and island_class_statistics ("class_3.mean", ...; none for a class
    it holds fewer than 2 of)."""
    out = dict(island_statistics(x))
    if classes:
        labels = labels.long()
        out["label_counts"] = torch.bincount(labels, minlength=classes)[:classes].double()
        for c, stats in enumerate(island_class_statistics(x, labels, classes)):
            out.update({f"class_{c}.{name}": value for name, value in (stats or {}).items()})
    return out


def publication_parts(published: dict, classes: int) -> tuple[dict, list[dict | None], torch.Tensor | None]:
    """(statistics, statistics per class, label counts (C,)) of an island_publication; the per-class list
    and the counts are empty and None for classes = 0. A DDMError when a class-conditional DDM reads a
    publication without label counts (one of experts without classes)."""
    marginal = {name: value for name, value in published.items() if "." not in name and name != "label_counts"}
    if not classes:
        return marginal, [], None
    if "label_counts" not in published or published["label_counts"].numel() < classes:
        raise DDMError(f"island statistics without counts of {classes} class labels: published by an expert that "
                       "was not class-conditional; train the experts again, or delete the experts' "
                       f"{PUBLISHED_STATISTICS} to compute them from the shards")
    per_class = []
    for c in range(classes):
        prefix = f"class_{c}."
        stats = {name[len(prefix):]: value for name, value in published.items() if name.startswith(prefix)}
        per_class.append(stats or None)
    return marginal, per_class, published["label_counts"][:classes]


def save_statistics(path: str | Path, stats: dict) -> None:
    """Write one island's statistics (safetensors; what it sends to the router's builder): island_statistics,
    or the whole island_publication."""
    save_tensors(path, {k: v.double() for k, v in stats.items()}, {"role": "island_statistics"})


def load_statistics(path: str | Path) -> dict:
    stats = load_tensors(path)
    if not ({"count", "mean", "cov"} <= set(stats) or {"count", "mean", "factors", "eigvals", "diag"} <= set(stats)):
        raise DDMError(f"{path}: not island statistics (needs count, mean and cov, or factors, eigvals, diag)")
    return stats
