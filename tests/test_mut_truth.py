"""Fast unit tests of ddmkit.truth's input checks and sampling, on hand-made mixtures."""
import numpy as np
import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.truth import GaussianMixture

F64 = torch.float64


def test_weights_must_be_non_negative_with_a_positive_sum():
    for bad in ([-1.0, 2.0], [0.0, 0.0], [-1.0, -1.0]):
        with pytest.raises(DDMError, match=r"^weights must be >= 0 with a positive sum \(they are normalised\); got \["):
            GaussianMixture.from_covariances(bad, [[0.0], [1.0]], [1.0, 1.0])
    ok = GaussianMixture.from_covariances([0.0, 2.0], [[0.0], [1.0]], [1.0, 1.0])
    assert ok.weights.tolist() == [0.0, 1.0]


def test_covariance_checks():
    means = [[0.0, 0.0]]
    for skew in (5e-9, 0.5):  # 5e-9: above atol 1e-10 where the entry it is compared with is 0
        cov = torch.tensor([[[1.0, 0.0], [skew, 1.0]]], dtype=F64)
        with pytest.raises(DDMError, match=r"^covs must be symmetric: covs\[k\] == covs\[k\]\.T \(to 1e-10\) for every k$"):
            GaussianMixture.from_covariances([1.0], means, cov)
    with pytest.raises(DDMError, match=r"^covs must have shape \(1,\) \(isotropic\), \(1, 2\) \(diagonal\) or \(1, 2, 2\) \(full\); got \(3,\)$"):
        GaussianMixture.from_covariances([1.0], means, [1.0, 2.0, 3.0])
    with pytest.raises(DDMError, match=r"^covs must be positive definite; the smallest eigenvalue is -1$"):
        GaussianMixture.from_covariances([1.0], means, [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(DDMError, match=r"^weights must have shape \(1,\), one per mean; got \(2,\)$"):
        GaussianMixture.from_covariances([1.0, 1.0], means, [1.0])


def test_from_covariances_takes_the_dtype_for_every_part():
    g = GaussianMixture.from_covariances(np.array([1.0, 3.0]), [[0.0], [2.0]], [1.0, 4.0], dtype=torch.float32)
    assert {p.dtype for p in (g.weights, g.means, g.eigvals, g.eigvecs)} == {torch.float32}
    assert g.weights.tolist() == [0.25, 0.75]


def test_sample_is_fixed_by_the_generator_and_follows_the_formula():
    cov = torch.tensor([[[1.0, 0.5], [0.5, 2.0]], [[0.25, 0.0], [0.0, 4.0]]], dtype=F64)
    g = GaussianMixture.from_covariances([1.0, 3.0], [[5.0, 0.0], [-5.0, 1.0]], cov)
    x, labels = g.sample(50, torch.Generator().manual_seed(3), return_labels=True)
    assert x.dtype == F64
    gen = torch.Generator().manual_seed(3)
    want_labels = torch.multinomial(g.weights, 50, replacement=True, generator=gen)
    z = torch.randn(50, 2, generator=gen, dtype=F64)
    root = torch.linalg.cholesky(cov)  # any square root gives the law; the eigen one gives the path:
    sqrt = g.eigvecs @ torch.diag_embed(g.eigvals.sqrt())
    want = g.means[want_labels] + torch.einsum("nij,nj->ni", sqrt[want_labels], z)
    assert torch.equal(labels, want_labels) and torch.allclose(x, want, atol=1e-12)
    assert torch.allclose(sqrt @ sqrt.transpose(1, 2), root @ root.transpose(1, 2))
    assert torch.equal(g.sample(50, torch.Generator().manual_seed(3)), x)
    assert not torch.equal(g.sample(50, torch.Generator().manual_seed(4)), x)
    assert g.sample(0).shape == (0, 2)
