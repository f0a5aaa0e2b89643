"""Known-answer tests of the DDM object and routed sampling, row padding, feature maps, and reading image
folders and arrays: each pins a value a small change of the code would alter (a mutation sweep's survivors)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ddmkit.ddm.load as load
from ddmkit.accel.padding import bucket_size, padded
from ddmkit.config import load_config
from ddmkit.data import load_dataset
from ddmkit.data.arrays import content_hash, data_array_name, split_indices, take_rows
from ddmkit.data.features import apply_features, call_user_features, fit_features
from ddmkit.data.images import read_image, read_image_folder
from ddmkit.ddm import DDM, exact_ddm, load_ddm
from ddmkit.ddm.sampling import checked_guidance, routing_generator
from ddmkit.errors import DDMError
from ddmkit.io import save_tensors
from ddmkit.pipeline.prepare import prepare_run_dir
from ddmkit.pipeline.stages import stage_data, stage_partition
from test_registry import small_run

F64 = torch.float64
TINY = Path(__file__).parent / "configs" / "tiny.toml"


# ----- accel/padding.py ---------------------------------------------------------------------------------------
def test_padding_switches_bucket_widths_above_small_rows_exactly():
    """Calls of at most small_rows rows use per_octave buckets, larger ones large_per_octave; the padded
    answer equals the unpadded one bit for bit."""
    seen = []

    def fn(x, t):
        seen.append(len(x))
        return x * 2 + t[:, None]

    call = padded(fn, per_octave=2, large_per_octave=16, small_rows=100)
    for n in (100, 101, 50):
        x, t = torch.arange(3.0 * n).reshape(n, 3), torch.linspace(0, 1, n)
        assert torch.equal(call(x, t), x * 2 + t[:, None])
    # 100 rows: step 64 / 2 = 32 -> 128; 101 rows: step 64 / 16 = 4 -> 104; 50 rows: step 32 / 2 -> 64
    assert seen == [128, 104, 64] == [bucket_size(100, 2), bucket_size(101, 16), bucket_size(50, 2)]


# ----- data/features.py ---------------------------------------------------------------------------------------
def along_axes(n: int = 64):
    """Points mean + a u + b v (u, v orthonormal; var a >> var b, both of mean 0): PCA's axes are u, v."""
    mean = torch.tensor([5.0, -3.0, 2.0])
    u = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    v = torch.tensor([0.0, 0.0, 1.0])
    a = torch.linspace(-4, 4, n)
    b = torch.tensor([1.0, -1.0, -1.0, 1.0]).repeat(n // 4) * 0.5  # orthogonal to the evenly spaced a
    return mean, u, v, a, b, mean + a[:, None] * u + b[:, None] * v


def test_pca_features_of_data_with_known_axes():
    """Features are (x - mean) projected on the axes, the largest-variance axis first (each up to a sign)."""
    mean, u, v, a, b, x = along_axes()
    spec, tensors = fit_features("pca", x, pca_dim=2)
    assert spec["dim"] == 2 and spec["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(tensors["pca_mean"], mean, atol=1e-5)
    f = apply_features(spec, tensors, x)
    s0, s1 = torch.sign(f[:, 0] @ a), torch.sign(f[:, 1] @ b)
    assert torch.allclose(f[:, 0], s0 * a, atol=1e-4) and torch.allclose(f[:, 1], s1 * b, atol=1e-4)
    # one axis of two: the first axis's share of the variance
    spec1, _ = fit_features("pca", x, pca_dim=1)
    share = float((a.var() / (a.var() + b.var())))
    assert spec1["explained_variance"] == pytest.approx(share, rel=1e-5)
    # float64 data give the same float32 features
    assert torch.equal(apply_features(spec, tensors, x.double()), f)


def test_explained_variance_sums_the_kept_axes():
    """Three orthogonal axes of variances 4 : 1 : 0.25 (columns of +-1 of mean 0), two kept: (4 + 1) / 5.25."""
    signs = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float32)
    x = signs.repeat(16, 1) * torch.tensor([2.0, 1.0, 0.5])
    spec, _ = fit_features("pca", x, pca_dim=2)
    assert spec["explained_variance"] == pytest.approx(5 / 5.25, rel=1e-5)


def test_user_features_are_checked_rows_finite_and_float():
    x = torch.zeros(4, 2)
    assert call_user_features("f", lambda x: torch.arange(8).reshape(4, 2), x).dtype == torch.float32
    with pytest.raises(DDMError, match=r"returned shape \(3, 2\); expected \(4, F\)"):
        call_user_features("f", lambda x: torch.zeros(3, 2), x)
    with pytest.raises(DDMError, match="NaN or infinite"):
        call_user_features("f", lambda x: torch.tensor([[0.0], [1.0], [float("nan")], [2.0]]), x)


# ----- data/arrays.py -----------------------------------------------------------------------------------------
def test_a_row_subset_keeps_the_original_order_and_pairs_labels():
    x, y = torch.arange(20.0)[:, None] * 10, torch.arange(20)
    xs, ys = take_rows(x, y, 6, seed=3)
    assert len(xs) == 6 and torch.equal(xs[:, 0], ys * 10.0)
    assert (ys[1:] > ys[:-1]).all()  # increasing: the rows in the file's order
    xa, ya = take_rows(x, y, 0, seed=3, shuffle=True)  # 0: all rows, in a seeded order
    assert sorted(ya.tolist()) == list(range(20)) and torch.equal(xa[:, 0], ya * 10.0)


@pytest.mark.parametrize("n, fraction, tests", [(10, 0.29, 3), (10, 0.21, 2), (2, 0.9, 1), (5, 0.01, 1), (1, 0.5, 0)])
def test_split_sizes_round_and_leave_a_training_row(n, fraction, tests):
    te, tr = split_indices(n, fraction, seed=0)
    assert len(te) == tests and len(tr) == n - tests
    assert sorted(torch.cat([te, tr]).tolist()) == list(range(n))


def test_content_hash_tells_shapes_of_the_same_bytes_apart():
    x = torch.arange(6.0)
    assert content_hash(x.reshape(2, 3)) != content_hash(x.reshape(3, 2))
    assert content_hash(x.reshape(2, 3)) == content_hash(x.reshape(2, 3).clone())


def test_the_data_array_of_an_npz_is_its_first_without_a_labels_name():
    assert data_array_name(["y", "points"]) == "points"
    assert data_array_name(["targets", "x"]) == "x"
    assert data_array_name(["label"]) == "label" and data_array_name(["labels"]) is None


# ----- data/images.py -----------------------------------------------------------------------------------------
def save_png(path, values) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values)).save(path)


def test_an_image_folder_gives_exact_values_channels_and_labels_in_both_splits(tmp_path):
    """Class sub-folders in sorted order give labels 0, 1, 2; each image is one colour (R, G, B) =
    (v, 255 - v, 51), scaled v / 127.5 - 1, channels first; the test split's labels are its own rows'."""
    values = {"ant": (0, 30), "bee": (90, 120, 150), "cow": (210, 255)}
    for label, (name, vs) in enumerate(values.items()):
        for v in vs:
            pixel = np.array([v, 255 - v, 51], np.uint8)
            save_png(tmp_path / name / f"{v}.png", np.broadcast_to(pixel, (2, 3, 3)).copy())
    train, test = load_dataset("image_folder", 0, 0, 0, path=str(tmp_path), test_fraction=0.5)
    assert len(train) + len(test) == 7 and len(test) == 4 and train.meta["classes"] == ["ant", "bee", "cow"]
    for split in (train, test):
        assert split.x.shape[1:] == (3, 2, 3)
        for x, y in zip(split.x, split.labels):
            v = round(float((x[0, 0, 0] + 1) * 127.5))
            want = torch.tensor([v, 255 - v, 51.0]) / 127.5 - 1
            assert torch.equal(x, want[:, None, None].expand(3, 2, 3))
            assert int(y) == next(i for i, vs in enumerate(values.values()) if v in vs)


def test_images_both_at_the_top_and_in_class_folders_are_refused(tmp_path):
    save_png(tmp_path / "a" / "0.png", np.zeros((2, 2), np.uint8))
    save_png(tmp_path / "b" / "0.png", np.zeros((2, 2), np.uint8))
    save_png(tmp_path / "top.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(DDMError, match="both at the top and in class sub-folders; use one layout"):
        read_image_folder(tmp_path)


def test_images_both_at_the_top_and_in_class_folders_are_named_before_any_other_check(tmp_path):
    """The layout is said first, naming a top image and the class sub-folders, before an empty sub-folder or a
    damaged image (which the user may not need to fix once the layout is one)."""
    save_png(tmp_path / "holiday" / "deeper" / "0.png", np.zeros((2, 2), np.uint8))
    save_png(tmp_path / "top.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "holiday" / "damaged.png").write_bytes(b"\x89PNG\r\n")
    said = (f"use one layout: 1 image(s) directly in it (e.g. {tmp_path / 'top.png'}) are unlabelled, and those in "
            "its sub-folders (holiday) are classes")
    with pytest.raises(DDMError, match=re.escape(said)):
        read_image_folder(tmp_path)


def test_a_sixteen_bit_edge_resized_is_clipped_to_the_byte_range(tmp_path):
    """Bicubic upscaling overshoots a black-white edge; the values are clipped to 0 .. 255, as for 8 bits."""
    edge = np.zeros((4, 4), np.uint16)
    edge[:, 2:] = 65535
    save_png(tmp_path / "edge.png", edge)
    got = read_image(tmp_path / "edge.png", resize=8)
    assert got.shape == (8, 8) and got.min() == 0.0 and got.max() == 255.0


def save_image_array(tmp_path, x, **arrays):
    np.savez(tmp_path / "a.npz", x=x, **arrays)
    return str(tmp_path / "a.npz")


def test_an_image_array_resized_stays_in_range_and_is_cropped_before_padding(tmp_path):
    edge = -np.ones((2, 1, 4, 4), np.float32)
    edge[..., 2:] = 1.0
    train, test = load_dataset("image_array", 0, 0, 0, path=save_image_array(tmp_path, edge), resize=8,
                               test_fraction=0.5)
    x = torch.cat([train.x, test.x])
    assert x.shape == (2, 1, 8, 8) and x.min() == -1.0 and x.max() == 1.0  # the bicubic overshoot clamped
    ramp = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4).repeat(2, 0) / 8 - 1
    train, test = load_dataset("image_array", 0, 0, 0, path=save_image_array(tmp_path, ramp), crop=2, pad_to=4,
                               test_fraction=0.5)
    want = -torch.ones(1, 4, 4)
    want[0, 1:3, 1:3] = torch.tensor([[5.0, 6.0], [9.0, 10.0]]) / 8 - 1  # the centre 2 x 2, then padded with -1
    assert torch.equal(train.x[0], want) and torch.equal(test.x[0], want)


def test_float_image_arrays_just_outside_the_range_are_refused_and_unit_range_ones_warned_of(tmp_path):
    x = np.zeros((2, 1, 2, 2), np.float32)
    x[1, 0, 0, 0] = 1.01
    with pytest.raises(DDMError, match=r"must lie in \[-1, 1\]; .*first bad rows: \[1\]"):
        load_dataset("image_array", 0, 0, 0, path=save_image_array(tmp_path, x))
    x[1, 0, 0, 0] = 1.00005  # within rounding of 1: accepted, and the values lie in [0, 1] (from 0)
    with pytest.warns(UserWarning, match=r"lie in \[0, 1\]"):
        load_dataset("image_array", 0, 0, 0, path=save_image_array(tmp_path, x))


def test_a_folder_of_other_sizes_names_a_turned_photo_by_its_upright_size(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 high x 30 wide: shown 30 x 40
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "a.jpg", exif=exif)
    save_png(tmp_path / "b.png", np.zeros((50, 20), np.uint8))
    with pytest.raises(DDMError, match=r"a.jpg: 30x40, .*b.png: 50x20\)"):
        read_image_folder(tmp_path)


# ----- ddm/model.py and ddm/sampling.py -----------------------------------------------------------------------
def constant_experts(k: int):
    """Expert j's velocity is the constant j: Euler from t = 1 to 0 moves x by exactly -j."""
    return [lambda x, t, y=None, j=j: torch.full_like(x, float(j)) for j in range(k)]


def uniform_router(k: int):
    return lambda x, t, y=None: torch.full((len(x), k), 1.0 / k)


def moved(x1, x0):
    """The expert each row followed (constant_experts): x1 - x0, rounded."""
    return (x1 - x0)[:, 0].round().long()


def test_restrict_renormalises_the_prior_and_each_labels_cluster_probabilities():
    label = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0], [0.2, 0.2, 0.6]])
    ddm = DDM(constant_experts(3), uniform_router(3), torch.tensor([0.5, 0.3, 0.2]), (1,), label_prior=label)
    part = ddm.restrict([0, 1])
    assert torch.allclose(part.prior, torch.tensor([0.625, 0.375, 0.0]))
    # label 1 had all its mass on the removed cluster 2: uniform over the present ones
    want = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    assert torch.allclose(part.label_prior, want)
    assert torch.allclose(ddm.restrict([1, 2]).prior, torch.tensor([0.0, 0.6, 0.4]))


def test_a_restricted_ddm_never_runs_a_removed_expert():
    def removed(x, t, **cond):
        raise AssertionError("a removed expert was run")

    ddm = DDM([*constant_experts(2), removed], uniform_router(3), torch.full((3,), 1 / 3), (1,))
    x1 = torch.zeros(6, 1)
    x0, info = ddm.restrict([0, 1]).sample("full", steps=2, x1=x1.clone())
    assert torch.allclose(x0, torch.full((6, 1), -0.5))  # the mean of the velocities 0 and 1, for unit time
    assert info["expert_rows"] == [12, 12, 0]


def test_labels_of_a_label_prior_ddm_accept_its_classes_and_no_label_only():
    """p(cluster | label) of 3 classes: labels 0 .. 2 pick their rows, 3 ("no label") the cluster sizes,
    4 is refused (the experts are unconditional: num_classes 0)."""
    label = torch.eye(2)[[1, 0, 1]]  # class 0 -> cluster 1, class 1 -> cluster 0, class 2 -> cluster 1
    ddm = DDM(constant_experts(2), uniform_router(2), torch.tensor([1.0, 0.0]), (1,), label_prior=label)
    x1 = torch.zeros(4, 1)
    x0, _ = ddm.sample("oracle", steps=1, x1=x1.clone(), labels=[0, 1, 2, 3])
    assert moved(x1, x0).tolist() == [1, 0, 1, 0]
    with pytest.raises(DDMError, match=r"labels \[4\] are not class labels .* accepted: 0 .. 2, or 3"):
        ddm.sample("oracle", steps=1, x1=x1.clone(), labels=[0, 1, 2, 4])


def test_with_router_makes_the_ddm_label_conditional():
    k = 3
    ddm = DDM(constant_experts(k), uniform_router(k), torch.full((k,), 1 / k), (2,))
    one_hot = lambda x, t, y=None: torch.nn.functional.one_hot(y, k).float()  # noqa: E731
    routed = ddm.with_router(one_hot, "mine", conditional=True, classes=k)
    assert routed.router_conditional and routed.router_classes == k and routed.meta["router"] == "mine"
    y = torch.tensor([2, 0, 1, 2])
    x1 = torch.randn(4, 2)
    x0, _ = routed.sample("top-1", steps=2, x1=x1.clone(), labels=y)
    assert torch.equal(moved(x1, x0), y)


def test_a_router_with_slightly_negative_values_is_refused():
    ddm = DDM(constant_experts(2), lambda x, t: torch.tensor([[1.0001, -0.0001]]).expand(len(x), 2),
              torch.full((2,), 0.5), (1,))
    with pytest.raises(DDMError, match=r"negative values \(as low as -0.0001\)"):
        ddm.sample("top-1", n=4, steps=1)


def test_a_callback_needs_every_row_in_one_batch():
    ddm = DDM(constant_experts(1), uniform_router(1), torch.ones(1), (1,))
    with pytest.raises(DDMError, match="needs all 4 rows in one batch; got batch_size=3"):
        ddm.sample("top-1", n=4, steps=1, batch_size=3, callback=lambda step: None)
    ddm.sample("top-1", n=4, steps=1, batch_size=4, callback=lambda step: None)


def test_guidance_other_than_one_is_refused_for_unconditional_experts():
    ddm = DDM(constant_experts(1), uniform_router(1), torch.ones(1), (1,))
    for guidance in (0.5, 2.0):
        with pytest.raises(DDMError, match="leave guidance at 1"):
            ddm.sample("top-1", n=2, steps=1, guidance=guidance)
    assert checked_guidance(1.0, "x", 0) == 1.0


def test_the_routing_draws_take_the_seed_after_the_noise_seed():
    """The noise is drawn with seed, the routing with seed + 1: two streams, not one used twice."""
    assert routing_generator(5, "cpu").initial_seed() == 6


def test_chunks_draw_their_routings_from_one_generator_in_turn():
    """batch_size chunks: the routing generator goes on from chunk to chunk, so equal rows in two chunks
    get their own draws (a generator seeded anew per chunk repeats the first chunk's)."""
    ddm = DDM(constant_experts(2), uniform_router(2), torch.full((2,), 0.5), (1,))
    x1 = torch.zeros(16, 1)
    x0, _ = ddm.sample("sample-1", steps=4, x1=x1.clone(), batch_size=8, seed=3)
    assert not torch.equal(x0[:8], x0[8:])


def test_velocity_evaluations_count_each_solver_evaluation_and_average_adaptive_chunks():
    def expert(x, t):
        return 5 * torch.sin(10 * x)

    ddm = DDM([expert], uniform_router(1), torch.ones(1), (1,))
    x1 = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    _, info = ddm.sample("top-1", steps=3, solver="heun", x1=x1.clone())
    assert info["velocity_evaluations"] == 6 and info["router_calls"] == 6
    halves = [ddm.sample("top-1", steps=4, solver="adaptive", x1=x1[rows].clone())[1]["velocity_evaluations"]
              for rows in (slice(0, 2), slice(2, 4))]
    assert halves[0] != halves[1]  # the still rows take fewer steps
    _, info = ddm.sample("top-1", steps=4, solver="adaptive", x1=x1.clone(), batch_size=2)
    assert info["velocity_evaluations"] == round(sum(halves) / 2)


def test_a_latent_ddm_decodes_unless_told_not_to():
    class Codec:
        def decode(self, z):
            return z * 2 + 1

    ddm = DDM(constant_experts(2), uniform_router(2), torch.full((2,), 0.5), (1,), codec=Codec())
    x1 = torch.zeros(3, 1)
    latents, _ = ddm.sample("top-1", steps=1, x1=x1.clone(), decode=False)
    images, _ = ddm.sample("top-1", steps=1, x1=x1.clone())
    assert torch.equal(images, latents * 2 + 1)


# ----- ddm/load.py --------------------------------------------------------------------------------------------
def test_label_counts_per_island_are_class_by_cluster(tmp_path, monkeypatch):
    """(C, K) counts from a shard's labels (classes it lacks counted 0) and from published label counts."""
    save_tensors(tmp_path / "a.safetensors", {"labels": torch.tensor([0, 0, 1])})
    save_tensors(tmp_path / "b.safetensors", {"labels": torch.tensor([1])})
    save_tensors(tmp_path / "pub.safetensors", {"label_counts": torch.tensor([0.9999, 3.0, 1.0], dtype=F64)})
    sources = [(None, tmp_path / "a.safetensors"), (None, tmp_path / "b.safetensors"),
               (tmp_path / "pub.safetensors", tmp_path / "unread.safetensors")]
    monkeypatch.setattr(load, "island_sources", lambda run: sources)
    counts = load.shard_label_counts("run", 3)
    assert torch.equal(counts, torch.tensor([[2, 0, 1], [1, 1, 3], [0, 0, 1]]))


def test_expert_indices_stop_below_k_and_are_sorted_without_repeats():
    assert load.expert_indices([2, 0, 2], 3, "exclude") == [0, 2]
    with pytest.raises(DDMError, match=r"exclude: \[3\] are not expert indices of these 3 experts"):
        load.expert_indices([0, 3], 3, "exclude")


def test_a_nearest_map_among_present_clusters_keeps_those_removed_before():
    centroids = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    nearest = load.NearestCluster(lambda x: x, centroids)
    x = torch.tensor([[0.1], [0.9], [2.1], [2.9]])
    assert nearest(x).tolist() == [0, 1, 2, 3]
    once = nearest.among(torch.tensor([True, False, True, True]))
    assert once(x).tolist() == [0, 0, 2, 3]
    twice = once.among(torch.tensor([True, True, True, False]))  # cluster 1 stays removed
    assert twice(x).tolist() == [0, 0, 2, 2]


def test_a_vp_path_whose_betas_fall_is_refused():
    config = {"path": {"kind": "vp", "beta_start": 0.02, "beta_end": 0.01}}
    with pytest.raises(DDMError, match="beta_end 0.01 is below beta_start 0.02"):
        load.path_output(config)
    assert load.path_output({"path": {"kind": "vp", "beta_start": 0.01, "beta_end": 0.02}})[0] == "vp"


def test_a_loaded_runs_prior_is_its_cluster_proportions(tmp_path):
    run = small_run(tmp_path / "run")
    counts = torch.tensor(json.loads((run / "partition" / "manifest.json").read_text())["counts"], dtype=F64)
    ddm = load_ddm(run)
    assert torch.allclose(ddm.prior.double(), counts / counts.sum())
    part = load_ddm(run, exclude=[1])
    assert torch.allclose(part.prior.double(), counts * torch.tensor([1.0, 0, 1, 1], dtype=F64)
                          / (counts.sum() - counts[1]))
    assert part.meta["missing_experts"] == [1]


def test_a_model_folder_of_another_data_shape_is_refused():
    load.check_shape("experts/expert_00", {"data_shape": [2]}, (2,))
    with pytest.raises(DDMError, match=r"experts/expert_00 was trained on data of shape \(3,\) but this run's data "
                                       r"are \(2,\)"):
        load.check_shape("experts/expert_00", {"data_shape": [3]}, (2,))


def test_the_exact_ddms_prior_is_each_clusters_share_of_the_mixture_weights(tmp_path):
    """Two components of weights 3 : 1, far apart, in two clusters: the exact prior is (0.75, 0.25) in the
    clusters' order, not the share of components (0.5 each)."""
    cfg = load_config(TINY)
    data = {"name": "mixture", "n_train": 400, "n_test": 800,
            "params": {"weights": [3, 1], "means": [[-4.0, 0.0], [4.0, 0.0]], "std": 0.3}}
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=data),
                                 "partition": cfg.partition.model_copy(update={"k": 2})})
    run = prepare_run_dir(tmp_path / "run", cfg)
    for stage in (stage_data, stage_partition):
        stage(cfg, run, lambda m: None)
    ddm = exact_ddm(run)
    heavy = int(ddm.meta["groups"].index([0]))  # the cluster owning component 0 (weight 3 / 4)
    assert torch.allclose(ddm.prior, torch.tensor([0.75, 0.25]) if heavy == 0 else torch.tensor([0.25, 0.75]))
