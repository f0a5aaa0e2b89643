"""Partition: shards, manifest, balance, bad input."""

import numpy as np
import pytest
import torch

from ddmkit.data import ArrayData, load_dataset
from ddmkit.data.partition import balanced_assign, compute_partition, load_partition, partition_data, read_shard
from ddmkit.errors import DDMError


def small(n=600):
    train, _ = load_dataset("ring8", n, 10, seed=3)
    return train


def test_shards_partition_the_data_and_manifest_is_complete(tmp_path):
    train = small()
    m = partition_data(train, 8, tmp_path / "p", seed=0)
    xs = [read_shard(tmp_path / "p" / s["path"])[0] for s in m["shards"]]
    assert sum(len(x) for x in xs) == len(train) == sum(m["counts"])
    joined = torch.cat(xs)
    assert torch.equal(joined[torch.argsort(joined[:, 0])], train.x[torch.argsort(train.x[:, 0])])
    manifest, tensors = load_partition(tmp_path / "p")
    assert manifest["seed"] == 0 and len(manifest["data_hash"]) == 64
    assert tensors["centroids"].shape == (8, 2) and tensors["cluster_covs"].shape == (8, 2, 2)
    for c, x in enumerate(xs):
        assert torch.allclose(tensors["cluster_means"][c], x.mean(0), atol=1e-5)
    # the ring's k-means clusters are its 8 modes: each shard holds one true component
    for s in m["shards"]:
        _, labels, _ = read_shard(tmp_path / "p" / s["path"])
        assert len(set(labels.tolist())) == 1


def test_same_seed_same_bytes(tmp_path):
    train = small()
    partition_data(train, 4, tmp_path / "a", seed=1)
    partition_data(train, 4, tmp_path / "b", seed=1)
    for name in ("shards/cluster_00.safetensors", "partition.safetensors", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_balanced_assignment_caps_cluster_sizes():
    rng = np.random.default_rng(0)
    dist = rng.random((103, 4))
    dist[:80, 0] -= 1  # most rows prefer cluster 0
    labels = balanced_assign(dist)
    assert np.bincount(labels, minlength=4).max() == 26


def test_balanced_partition(tmp_path):
    x = torch.cat([torch.randn(300, 2), torch.randn(60, 2) + 8])
    m = partition_data(ArrayData("skewed", x), 3, tmp_path / "p", balanced=True)
    assert max(m["counts"]) == 120


def test_balanced_distances_in_row_chunks_are_the_whole_array_formula_and_give_the_same_assignment(monkeypatch):
    """The balanced step's (N, K) distances, computed in chunks of rows, equal the (N, K, F) formula's bit for bit,
    so the balanced assignment is the one the whole array gave."""
    import ddmkit.data.partition as partition

    x = torch.randn(1000, 50, generator=torch.Generator().manual_seed(0))
    plain = partition.compute_partition(ArrayData("x", x), 7, seed=0)  # k-means: the centroids balancing starts from
    f, c = x.double().numpy(), plain.centroids
    whole = ((f[:, None, :] - c[None]) ** 2).sum(-1)
    monkeypatch.setattr(partition, "DISTANCE_CHUNK_BYTES", 3 * 7 * 50 * 8 + 1)  # 3 rows a chunk, 1 left at the end
    assert np.array_equal(partition.squared_distances(f, c), whole)
    balanced = partition.compute_partition(ArrayData("x", x), 7, seed=0, balanced=True)
    assert np.array_equal(balanced.labels.numpy(), balanced_assign(whole))


def test_balanced_partition_never_holds_the_n_k_f_array_of_differences(monkeypatch):
    """Balancing held an (N, K, F) float64 array (3.7 GiB for Fashion-MNIST at 32 x 32 and K = 8)."""
    import tracemalloc

    import ddmkit.data.partition as partition

    monkeypatch.setattr(partition, "DISTANCE_CHUNK_BYTES", 2**20)
    n, f, k = 4000, 128, 32
    x = torch.randn(n, f, generator=torch.Generator().manual_seed(0))
    partition.cluster(x[:100], 2, True, seed=0)  # scikit-learn imported before measuring
    tracemalloc.start()
    try:
        partition.cluster(x, k, True, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * k * f * 8 / 4  # about 8 MiB here, against 125 MiB for the whole array


@pytest.mark.parametrize("fine_k", [0, 40])
def test_clustering_runs_on_one_thread_whatever_the_machine(monkeypatch, fine_k):
    """scikit-learn's k-means adds up per-thread partial sums: on its default thread count (the machine's cores)
    the centroids' last bits, and at a near tie a label, depended on the machine."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_info, threadpool_limits

    seen, fit = [], KMeans.fit

    def recording_fit(self, *args, **kwargs):
        out = fit(self, *args, **kwargs)
        seen.append((self._n_threads, sorted({pool["num_threads"] for pool in threadpool_info()})))
        return out

    monkeypatch.setattr(KMeans, "fit", recording_fit)
    with threadpool_limits(limits=2):  # as on a machine of two cores or more
        compute_partition(small(), 4, seed=0, fine_k=fine_k, balanced=True)
    assert seen and all(entry == (1, [1]) for entry in seen), seen


def test_the_pca_features_are_fitted_on_one_thread_whatever_the_machine(monkeypatch):
    """PCA's SVD ran on the BLAS threads of the machine, whose sums' order can change the map's last bits."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_info, threadpool_limits

    seen, fit = [], PCA.fit

    def recording_fit(self, *args, **kwargs):
        seen.append(sorted({pool["num_threads"] for pool in threadpool_info()}))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(PCA, "fit", recording_fit)
    with threadpool_limits(limits=2):  # as on a machine of two cores or more
        compute_partition(small(), 4, features="pca", pca_dim=1, seed=0)
    assert seen == [[1]], seen


def test_two_stage_kmeans_routes_every_training_point_to_its_own_cluster(tmp_path):
    """With fine_k, a point took the coarse cluster of its fine centroid, and up to 40% of the points lay nearer
    another coarse centroid: `nearest` routing sent them to an expert that never saw them. A point now joins
    its nearest coarse centroid."""
    from ddmkit.ddm.load import nearest_cluster_fn

    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))
    partition_data(ArrayData("blob", x), 8, tmp_path / "p", seed=0, fine_k=64)
    manifest, tensors = load_partition(tmp_path / "p")
    assert torch.equal(nearest_cluster_fn(manifest, tensors)(x), tensors["assignments"])


def test_balanced_partition_warns_when_it_splits_copies_of_one_point():
    """The cap of ceil(N / K) cuts a group of identical points that all prefer one cluster: their copies then sit
    in different shards, which was silent."""
    import warnings

    copies = torch.tensor([[0.0, 0.0]] * 6 + [[1.0, 1.0]] * 6 + [[5.0, 5.0]] * 6)  # 3 points, 6 copies each
    with pytest.warns(UserWarning, match=r"partition.balanced: 3 group\(s\) of identical points \(18 points\) are "
                                         r"split over several clusters, cut by the cap of ceil\(N / K\) = 5 .*Remove "
                                         r"duplicate rows"):
        plan = compute_partition(ArrayData("copies", copies), 4, balanced=True)
    assert sorted(plan.counts.tolist()) == [3, 5, 5, 5]
    x = torch.cat([torch.randn(300, 2), torch.randn(60, 2) + 8, torch.zeros(30, 2) + 8])  # 30 copies kept together
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plan = compute_partition(ArrayData("skewed", x), 3, balanced=True, seed=0)
    assert len(set(plan.labels[-30:].tolist())) == 1


def test_pca_features(tmp_path):
    train, _ = load_dataset("gmm32", 800, 10)
    m = partition_data(train, 8, tmp_path / "p", features="pca", pca_dim=5)
    assert m["features"]["kind"] == "pca" and m["features"]["dim"] == 5


def test_bad_inputs_leave_nothing_behind(tmp_path):
    train = small(50)
    with pytest.raises(DDMError, match="larger than the number of samples"):
        partition_data(train, 51, tmp_path / "p")
    x = train.x.clone()
    x[3, 0] = float("nan")
    with pytest.raises(DDMError, match="NaN"):
        partition_data(ArrayData("bad", x), 2, tmp_path / "p")
    dup = ArrayData("dup", torch.zeros(20, 2))
    with pytest.raises(DDMError, match="empty"):
        partition_data(dup, 3, tmp_path / "p")
    with pytest.raises(DDMError, match="returned shape"):
        partition_data(train, 2, tmp_path / "p", features="tests.test_partition:bad_feature")
    assert not (tmp_path / "p").exists()
    assert list(tmp_path.iterdir()) == []


def bad_feature(x):
    return torch.zeros(3)


def test_array_file_loader(tmp_path):
    x = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    train, test = load_dataset(str(tmp_path / "a.npy"), 0, 100)
    assert len(train) == 400 and len(test) == 100
    assert not set(map(tuple, train.x.tolist())) & set(map(tuple, test.x.tolist()))
    with pytest.raises(DDMError, match="unknown data set"):
        load_dataset("ring9")
