"""The Python API refuses a user's mistakes with a DDMError naming the argument: devices, labels,
counts, x1, expert indices and speed options (DDM, load_ddm, sample_ddm, sample_single, SpeedOptions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddmkit.accel import SpeedOptions
from ddmkit.ddm import DDM, load_ddm, sample_ddm, sample_single
import ddmkit.ddm.load as load
from ddmkit.errors import DDMError

from test_registry import small_run

K, D, C = 3, 2, 4


def constant_experts(k: int = K):
    """Expert j's velocity is the constant j, so Euler from t = 1 to 0 moves x by exactly -j."""
    return [lambda x, t, y=None, j=j: torch.full_like(x, float(j)) for j in range(k)]


def flat_router(x, t, **cond):
    return torch.full((len(x), K), 1.0 / K)


def tiny(classes: int = C) -> DDM:
    """K constant experts, a flat router; with classes: class c lives in cluster c % K."""
    label = torch.nn.functional.one_hot(torch.arange(classes) % K, K).float() if classes else None
    return DDM(experts=constant_experts(), router=flat_router, prior=torch.tensor([0.0, 0.0, 1.0]),
               data_shape=(D,), label_prior=label, num_classes=classes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("api") / "run")


# 1. devices

@pytest.mark.parametrize("device", ["gpu", "cuda:x", 3, None])
def test_an_unknown_device_is_refused_naming_the_accepted_ones(device, tmp_path):
    with pytest.raises(DDMError, match="device: .* is not a device; accepted: auto, cpu, cuda, cuda:N or mps"):
        tiny().to(device)
    with pytest.raises(DDMError, match="device: .* is not a device"):
        load_ddm(tmp_path, device=device)  # checked before the folder is read
    with pytest.raises(DDMError, match="device: .* is not a device"):
        DDM.from_pretrained(tmp_path, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_device_is_refused_and_auto_or_cpu_work(tmp_path):
    for device in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(DDMError, match="device: .*cuda.*, but this machine has 0 CUDA device.*pass device='cpu'"):
            tiny().to(device)
        with pytest.raises(DDMError, match="this machine has 0 CUDA device"):
            DDM.from_pretrained(tmp_path, device=device)
    assert tiny().to("auto").device == torch.device("cpu")
    assert tiny().to(torch.device("cpu")).device == torch.device("cpu")


# 2. labels

def test_the_no_label_class_samples_from_the_cluster_sizes():
    """Label C (= num_classes) is "no label": the oracle draws from the prior (all mass on cluster 2)."""
    ddm, x1 = tiny(), torch.randn(6, D)
    labels = torch.tensor([0, 1, 2, C, C, 3])
    x0, _ = ddm.sample("oracle", n=6, steps=2, labels=labels, x1=x1.clone())
    assert (x1 - x0)[:, 0].round().long().tolist() == [0, 1, 2, 2, 2, 0]


def test_labels_as_a_list_or_numpy_array_are_converted():
    ddm, x1 = tiny(), torch.randn(4, D)
    ref, _ = ddm.sample("oracle", n=4, steps=2, labels=torch.tensor([0, 1, 2, 3]), x1=x1)
    for labels in ([0, 1, 2, 3], np.arange(4), np.arange(4, dtype=np.int32)):
        assert torch.equal(ddm.sample("oracle", n=4, steps=2, labels=labels, x1=x1)[0], ref)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 1, C + 1, 0]), r"labels \[5\] are not class labels.*0 .. 3, or 4 for 'no label'"),
    (torch.tensor([0, -1, 1, 0]), r"labels \[-1\] are not class labels"),
    (torch.tensor([0, 1, 2]), r"labels: shape \(3,\), but n = 4"),
    (torch.tensor([0, 1, 2, 3, 0]), r"labels: shape \(5,\), but n = 4"),
    (torch.zeros(4), "labels: a Tensor of torch.float32, not integer class labels"),
    ([0.0, 1.0, 2.0, 3.0], "labels: a list of torch.float32, not integer"),
    (["a", "b", "c", "d"], "labels: a list, not integer"),
    (np.ones(4, dtype=bool), "labels: a ndarray of torch.bool, not integer"),
])
def test_bad_labels_are_refused_naming_labels(labels, message):
    with pytest.raises(DDMError, match=message):
        tiny().sample("oracle", n=4, steps=2, labels=labels)


def test_sample_ddm_called_directly_checks_the_labels_in_cond():
    with pytest.raises(DDMError, match=r"sample_ddm: labels \[5\] are not class labels.*0 .. 3, or 4 for 'no label'"):
        sample_ddm(tiny(), "oracle", 4, steps=2, cond={"y": torch.tensor([0, 1, C + 1, 0])})
    with pytest.raises(DDMError, match=r"sample_ddm: labels: shape \(3,\), but n = 4"):
        sample_ddm(tiny(), "top-1", 4, steps=2, cond={"y": torch.tensor([0, 1, 2])})


def test_the_statistics_router_routes_the_no_label_class_by_the_marginal_statistics(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    shards = {"a": (torch.randn(60, D, generator=gen) + 2, torch.arange(60) % 2, {}),
              "b": (torch.randn(60, D, generator=gen) - 2, torch.ones(60, dtype=torch.long), {})}
    monkeypatch.setattr(load, "checked_model_shards", lambda run: list(shards))
    monkeypatch.setattr(load, "read_shard", lambda path: shards[path])
    router, conditional = load.island_stats_router("run", classes=2)
    x, t = torch.randn(8, D, generator=gen), torch.rand(8, generator=gen)
    assert conditional
    assert torch.allclose(router(x, t, y=torch.full((8,), 2)), router(x, t))


# 3. counts and guidance

@pytest.mark.parametrize("name, value", [("n", 4.0), ("n", "4"), ("n", True), ("steps", 2.0), ("seed", 1.5),
                                         ("batch_size", 2.0), ("router_every", False)])
def test_non_integer_counts_are_refused_naming_them(name, value):
    args = {"n": 4, "steps": 2, name: value}
    with pytest.raises(DDMError, match=f"DDM.sample: {name}: .* is not an integer"):
        tiny(0).sample("top-1", **args)


def test_the_checked_counts_are_the_ones_used():
    ddm = tiny(0)
    x0, info = ddm.sample("top-1", n=np.int64(5), steps=np.int32(3), seed=np.int64(1))
    assert x0.shape == (5, D) and info["velocity_evaluations"] == 3
    assert torch.equal(x0, ddm.sample("top-1", n=5, steps=3, seed=1)[0])


@pytest.mark.parametrize("guidance, message", [(-1.0, "guidance: Input should be greater than or equal to 0"),
                                               (1e4, "guidance: Input should be less than or equal to 1000"),
                                               (float("nan"), "guidance"), (True, "guidance: True is not a number"),
                                               ("2", "guidance: '2' is not a number")])
def test_guidance_has_the_bounds_of_the_config(guidance, message):
    with pytest.raises(DDMError, match=message):
        tiny().sample("top-1", n=4, steps=2, labels=[0, 1, 2, 3], guidance=guidance)


# 4. n first

def test_n_below_one_is_refused_naming_n():
    with pytest.raises(DDMError, match="n: 0 samples asked; pass n >= 1"):
        sample_ddm(tiny(0), "top-1", n=0)
    with pytest.raises(DDMError, match="n: 0 samples asked"):
        sample_single(lambda x, t: x, (2,), n=0)
    with pytest.raises(DDMError, match="n: 2.0 .* is not an integer"):
        sample_single(lambda x, t: x, (2,), n=2.0)


# 5. x1

@pytest.mark.parametrize("x1, got", [(torch.zeros(7, D), r"float32 \(7, 2\)"),
                                     (torch.zeros(5, D, dtype=torch.float64), r"float64 \(5, 2\)"),
                                     (torch.zeros(5, 3), r"float32 \(5, 3\)"),
                                     (np.zeros((5, D), np.float32), "got ndarray")])
def test_a_bad_x1_is_refused_naming_x1(x1, got):
    with pytest.raises(DDMError, match=rf"x1: the starting noise must be a float32 torch tensor of shape \(5, 2\).*"
                                       rf"{got}"):
        tiny(0).sample("top-1", n=5, steps=2, x1=x1)
    with pytest.raises(DDMError, match="x1: "):
        sample_single(lambda x, t: x, (D,), n=5, x1=x1)


def test_a_good_x1_is_where_sampling_starts():
    x1 = torch.randn(5, D)
    x0, _ = tiny(0).sample("oracle", n=5, steps=2, x1=x1.clone())
    assert torch.allclose(x1 - x0, torch.full((5, D), 2.0))  # the prior's one cluster: expert 2, velocity 2


# 6. expert indices

@pytest.mark.parametrize("present, message", [([5], r"\[5\] are not expert indices of these 3 experts"),
                                              ([-1], r"\[-1\] are not expert indices"),
                                              ([0, 1.0], r"\[1.0\] are not expert indices"),
                                              ([True], r"\[True\] are not expert indices"),
                                              ("1", "'1' is not an expert index or a list of them"),
                                              (None, "None is not an expert index")])
def test_restrict_refuses_indices_outside_the_experts(present, message):
    with pytest.raises(DDMError, match=f"restrict: present: {message}.*; accepted: expert indices 0 .. 2"):
        tiny().restrict(present)


def test_restrict_takes_one_index_or_a_list():
    assert tiny().restrict(1).meta["present_experts"] == [1]
    kept = tiny().restrict(np.array([2, 0, 2]))
    assert kept.meta == {"missing_experts": [1], "present_experts": [0, 2]}


def test_absent_experts_calls_are_not_counted():
    """full calls every expert on the dense path, the absent one's zero stand-in too: only the present count."""
    ddm = tiny().restrict([0, 2])
    for strategy, calls in (("full", 2 * 4), ("top-1", 4)):
        _, info = ddm.sample(strategy, n=6, steps=4)
        assert info["expert_calls_per_sample"] == calls and sum(info["expert_rows"][1:2]) == 0


def test_load_ddm_refuses_a_bad_exclude_and_takes_one_index(run):
    for exclude, message in (("1", "'1' is not an expert index"), ([7], r"\[7\] are not expert indices of these 4"),
                             ([-1], r"\[-1\] are not"), (1.0, "1.0 is not an expert index")):
        with pytest.raises(DDMError, match=f"exclude: {message}"):
            load_ddm(run, exclude=exclude)
    with pytest.warns(UserWarning):
        ddm = load_ddm(run, exclude=1)
    assert ddm.meta["missing_experts"] == [1] and ddm.meta["present_experts"] == [0, 2, 3]


# 7. speed options

@pytest.mark.parametrize("value", ["bf16", "int8", torch.bfloat16, "float32"])
def test_speed_options_accept_only_the_documented_autocast(value):
    with pytest.raises(DDMError, match="SpeedOptions autocast: .* accepted: None .*'bfloat16' or 'float16'"):
        SpeedOptions(autocast=value)


def test_speed_options_switches_are_bools():
    with pytest.raises(DDMError, match="SpeedOptions cuda_graphs: 'no'; pass True or False"):
        SpeedOptions(cuda_graphs="no")
    for value in (None, "bfloat16", "float16"):
        assert SpeedOptions(autocast=value).autocast == value
