"""Document features for partitioning text: TF-IDF of character n-grams
(scikit-learn), reduced by truncated SVD and scaled to unit length, so that
k-means on them is spherical k-means (cosine similarity of TF-IDF vectors).

    f(d) = normalize(SVD(tfidf_char_ngrams(d)))     (N, F), ||f|| = 1
"""
from __future__ import annotations

import numpy as np
import torch

from ddmkit.discrete.corpus import Document


def _texts(docs: list[Document]) -> list[str]:
    return [d.text.decode("utf-8", errors="replace") for d in docs]


def sklearn_seed(seed: int) -> int:
    """A seed of 0 .. 2**63 - 1 in scikit-learn's range, 0 .. 2**32 - 1 (taken modulo 2**32)."""
    return seed % 2**32


def tfidf_features(train: list[Document], other: list[Document], cfg) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit on `train` only; return (train features, other features, spec).
    cfg: a TextPartitionConfig (ngram range, vocabulary size, SVD dimension)."""
    # scikit-learn is imported on first use: commands that never partition text start faster
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(cfg.ngram_min, cfg.ngram_max),
                          max_features=cfg.max_features, sublinear_tf=True, dtype=np.float64)
    a = vec.fit_transform(_texts(train))
    # at least 2 dimensions: scaled to unit length, 1-dimensional features are all +1 (TF-IDF is >= 0)
    dim = min(max(2, min(cfg.svd_dim, a.shape[1] - 1, a.shape[0] - 1)), a.shape[1])
    svd = TruncatedSVD(n_components=dim, random_state=sklearn_seed(cfg.seed)).fit(a)
    f_train = normalize(svd.transform(a))
    f_other = normalize(svd.transform(vec.transform(_texts(other)))) if other else np.zeros((0, dim))
    spec = {"kind": "tfidf_char_ngrams", "ngram_range": [cfg.ngram_min, cfg.ngram_max],
            "vocabulary": len(vec.vocabulary_), "svd_dim": dim,
            "explained_variance": float(svd.explained_variance_ratio_.sum())}
    return torch.as_tensor(f_train), torch.as_tensor(f_other), spec
