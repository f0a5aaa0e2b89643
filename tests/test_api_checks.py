"""The Python API refuses a user's mistakes with a DDMError naming the argument: devices, labels,
counts, x1, expert indices, speed options, guidance, cond, keywords and folders (DDM, load_ddm, sample_ddm,
sample_single, start_noise, SpeedOptions); restrict limits nearest routing; info, dir, repr and docstrings."""
from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ddmkit.accel import SpeedOptions
from ddmkit.ddm import DDM, exact_ddm, load_ddm, sample_ddm, sample_single, start_noise
import ddmkit.ddm.load as load
from ddmkit.errors import DDMError
from ddmkit.routing import CallCounter

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
    monkeypatch.setattr(load, "island_sources", lambda run: [(None, path) for path in shards])  # nothing published
    monkeypatch.setattr(load, "checked_model_shards", lambda run, clusters=None: list(shards))
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

def test_n_below_one_is_refused_naming_n_on_one_line():
    """One bad argument was told over two lines ("sample_ddm: invalid arguments", then "  n: ..."); several
    keep the list."""
    with pytest.raises(DDMError) as refused:
        sample_ddm(tiny(0), "top-1", n=0)
    assert str(refused.value) == "sample_ddm: n: Input should be greater than or equal to 1"
    with pytest.raises(DDMError) as refused:
        tiny(0).sample("top-1", n=0, seed=-1)
    assert str(refused.value) == ("DDM.sample: invalid arguments\n  n: Input should be greater than or equal to 1\n"
                                  "  seed: Input should be greater than or equal to 0")
    with pytest.raises(DDMError, match="^sample_single: n: Input should be greater than or equal to 1$"):
        sample_single(lambda x, t: x, (2,), n=0)
    with pytest.raises(DDMError, match="sample_single: n: 2.0 .* is not an integer"):
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_x1_is_refused(bad):
    """NaN or infinite starting noise was accepted and gave all-NaN samples."""
    x1 = torch.randn(5, D)
    x1[3, 1] = bad
    with pytest.raises(DDMError, match="x1: the starting noise holds NaN or infinite values"):
        tiny(0).sample("top-1", n=5, steps=2, x1=x1)
    with pytest.raises(DDMError, match="x1: the starting noise holds NaN"):
        sample_single(lambda x, t: x, (D,), n=5, x1=x1)


def test_a_good_x1_is_where_sampling_starts():
    x1 = torch.randn(5, D)
    x0, _ = tiny(0).sample("oracle", n=5, steps=2, x1=x1.clone())
    assert torch.allclose(x1 - x0, torch.full((5, D), 2.0))  # the prior's one cluster: expert 2, velocity 2


def test_n_defaults_to_the_rows_of_x1_and_else_to_1000():
    x1 = torch.arange(7 * D, dtype=torch.float32).reshape(7, D) / 4  # quarters: two Euler steps of -1 are exact
    assert torch.equal(tiny(0).sample("oracle", steps=2, x1=x1.clone())[0], x1 - 2.0)
    assert tiny(0).sample("oracle", steps=1)[0].shape == (1000, D)
    with pytest.raises(DDMError, match=r"x1: the starting noise must be a float32 torch tensor of shape \(6, "):
        tiny(0).sample("oracle", n=6, steps=2, x1=x1)  # a given n is still checked against x1


def test_out_receives_the_samples_and_may_be_the_noise_itself():
    """out=x1 writes each chunk's samples over its own noise (the device holds n rows, not 2n): the same
    samples as into a new tensor, returned in x1's storage; an out of another shape, dtype or device is refused."""
    ddm = DDM(experts=[lambda x, t, j=j: x * (j - 1.0) + t[:, None] for j in range(K)],
              router=lambda x, t: torch.softmax(torch.stack([x[:, 0], x[:, 1], -x[:, 0]], 1), 1),
              prior=torch.full((K,), 1 / K), data_shape=(D,))
    x1 = start_noise(7, (D,), 3)
    for sample, args in ((sample_ddm, (ddm, "top-2")), (sample_single, (lambda x, t: x * t[:, None], (D,)))):
        want, _ = sample(*args, 7, steps=3, x1=x1.clone(), batch_size=3)
        given = x1.clone()
        got, _ = sample(*args, 7, steps=3, x1=given, batch_size=3, out=given)
        assert got.data_ptr() == given.data_ptr() and torch.equal(got, want)
        with pytest.raises(DDMError, match=r"out: torch.float32 \(6, 2\) on cpu, but the samples are torch.float32 "
                                           r"\(7, 2\) on cpu; pass out=x1"):
            sample(*args, 7, steps=3, x1=x1, out=torch.empty(6, D))
        with pytest.raises(DDMError, match="out: list"):
            sample(*args, 7, steps=3, out=[0.0] * 7)
    given = x1.clone()
    got, _ = ddm.sample("top-2", 7, steps=3, x1=given, batch_size=3, out=given)  # DDM.sample passes it on
    assert got.data_ptr() == given.data_ptr() and torch.equal(got, sample_ddm(ddm, "top-2", 7, steps=3, x1=x1)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_samples_written_over_the_callers_noise_need_only_the_chunks_work():
    """With out=x1, a caller's noise (the pipeline's sets) costs no second n rows on the device."""
    n, d, chunk = 4096, 16384, 256  # 256 MiB of float32 rows, 16 MiB a chunk
    x1 = torch.randn(n, d, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    samples, _ = sample_single(lambda x, t: -x, (d,), n, steps=2, x1=x1, batch_size=chunk, out=x1)
    peak = torch.cuda.max_memory_allocated() - base  # (without out: the n rows of samples besides)
    assert samples.data_ptr() == x1.data_ptr() and peak < 8 * chunk * d * 4, peak / (chunk * d * 4)


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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # left out on purpose: not warned about as "missing" (it was)
        ddm = load_ddm(run, exclude=1)
    assert ddm.meta["missing_experts"] == [1] and ddm.meta["present_experts"] == [0, 2, 3]
    with pytest.raises(DDMError, match=r"^exclude: \[0, 1, 2, 3\] leaves none of the run's experts \[0, 1, 2, 3\]; "
                                       r"exclude fewer$"):
        load_ddm(run, exclude=[0, 1, 2, 3])
    assert load_ddm(run, exclude=[0, 2], allow_missing=False).meta["present_experts"] == [1, 3]


def test_a_run_folder_under_the_home_folder_may_be_written_with_a_tilde(run, monkeypatch):
    """DDM.from_pretrained("~/run") said 'is not a run folder (no such folder)'."""
    monkeypatch.setenv("HOME", str(run.parent))
    assert DDM.from_pretrained(f"~/{run.name}").k == 4 and load_ddm(Path("~") / run.name).k == 4


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


# 8. restrict limits nearest-cluster routing to the present experts

def test_restrict_sends_nearest_routing_only_to_present_experts():
    """Centroids at x = -1, 0, 1 and expert j's velocity j: with only expert 1 kept, every row of every step
    goes to it, so x0 = x1 - 1 exactly (the removed clusters' rows went to a zero stand-in before)."""
    centroids = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    ddm = dataclasses.replace(tiny(0), nearest=load.NearestCluster(lambda x: x, centroids)).restrict([1])
    x1 = torch.randn(50, D, generator=torch.Generator().manual_seed(0))
    x0, info = ddm.sample("nearest", n=50, steps=4, x1=x1.clone())
    assert torch.allclose(x1 - x0, torch.ones(50, D))
    assert info["expert_rows"] == [0, 200, 0] and info["expert_calls_per_sample"] == 4


def test_restrict_limits_a_learned_ddms_nearest_routing(run):
    excluded = load_ddm(run, exclude=[1, 2, 3])
    for ddm in (DDM.from_pretrained(run).restrict([0]), excluded):
        _, info = ddm.sample("nearest", n=40, steps=5)
        assert info["expert_rows"] == [200, 0, 0, 0] and info["expert_calls_per_sample"] == 5


def test_restrict_checks_a_nearest_function_of_ones_own():
    ddm = dataclasses.replace(tiny(0), nearest=lambda x: torch.zeros(len(x), dtype=torch.long)).restrict([1, 2])
    with pytest.raises(DDMError, match=r"restrict: .*sent rows to removed experts \[0\]; pass restrict\(present, "
                                       "nearest=f\\)"):
        ddm.sample("nearest", n=4, steps=3)


# 9. guidance: one check in DDM.sample, DDM.with_guidance, load_ddm and DDM.from_pretrained

@pytest.mark.parametrize("guidance, message", [(float("nan"), "guidance: Input should be a finite number"),
                                               (-1.0, "guidance: Input should be greater than or equal to 0"),
                                               (1e9, "guidance: Input should be less than or equal to 1000"),
                                               ("2", "guidance: '2' is not a number")])
def test_guidance_is_checked_wherever_it_is_given(guidance, message, run):
    for name, call in (("DDM.with_guidance", lambda: tiny().with_guidance(guidance)),
                       ("load_ddm", lambda: load_ddm(run, guidance=guidance)),
                       ("load_ddm", lambda: DDM.from_pretrained(run, guidance=guidance))):
        with pytest.raises(DDMError, match=f"{name}: {message}"):
            call()


def test_guidance_on_unconditional_experts_is_refused_and_one_is_accepted(run):
    need = "guidance: 2; classifier-free guidance would need class-conditional experts"
    for name, call in (("DDM.with_guidance", lambda: tiny(0).with_guidance(2.0)),
                       ("load_ddm", lambda: load_ddm(run, guidance=2.0)),
                       ("DDM.sample", lambda: tiny(0).sample("top-1", n=2, steps=1, guidance=2.0))):
        with pytest.raises(DDMError, match=f"{name}: {need}"):
            call()
    assert load_ddm(run, guidance=1).num_classes == 0 and tiny(0).with_guidance(1.0).k == K


# 10. sample_ddm, sample_single and start_noise check their arguments as DDM.sample does

BAD_ARGUMENTS = [(dict(steps=2.5), r"steps: 2.5 \(float\) is not an integer"),
                 (dict(steps=0), "steps: Input should be greater than or equal to 1"),
                 (dict(batch_size=0), "batch_size: Input should be greater than or equal to 1"),
                 (dict(solver="rk5"), "solver: Input should be 'euler', 'heun', 'midpoint', 'rk4' or 'adaptive'"),
                 (dict(seed=-1), "seed: Input should be greater than or equal to 0"),
                 (dict(seed=2**64), "seed: Input should be less than or equal to 9223372036854775807")]


@pytest.mark.parametrize("bad, message", [*BAD_ARGUMENTS, (dict(router_every=0), "router_every: Input should be")])
def test_sample_ddm_refuses_what_ddm_sample_refuses(bad, message):
    for name, call in (("sample_ddm", lambda: sample_ddm(tiny(0), "top-1", 4, **{"steps": 2, **bad})),
                       ("DDM.sample", lambda: tiny(0).sample("top-1", n=4, **{"steps": 2, **bad}))):
        with pytest.raises(DDMError, match=f"{name}: {message}"):
            call()


def test_the_sampler_refuses_gated_routing_naming_analyze_and_lists_only_what_it_samples():
    """DDM.sample and sample_ddm parsed strategy names as the analysis sampler does: a misspelt name was answered
    with forms that included gated-K@A, and gated-2@30 failed only at the first routing, without the command
    that measures it (docs/routing.md: the sampler refuses it and leaves it out of the forms it lists)."""
    for call in (lambda s: tiny(0).sample(s, n=4, steps=2), lambda s: sample_ddm(tiny(0), s, 4, steps=2)):
        with pytest.raises(DDMError, match=r"`ddmkit analyze RUN --strategy gated-2@30`"):
            call("gated-2@30")
        with pytest.raises(DDMError, match="did you mean 'top-2'") as refused:
            call("topp-2")
        assert "gated" not in str(refused.value)


@pytest.mark.parametrize("bad, message", BAD_ARGUMENTS)
def test_sample_single_refuses_bad_arguments(bad, message):
    with pytest.raises(DDMError, match=f"sample_single: {message}"):
        sample_single(lambda x, t: x, (D,), 4, **{"steps": 2, **bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sampling_functions_refuse_a_device_as_ddm_to_does():
    for device, message in (("cuda", "device: 'cuda', but this machine has 0 CUDA device"),
                            ("gpu", "device: 'gpu' is not a device; accepted: auto, cpu, cuda, cuda:N or mps")):
        for name, call in (("sample_ddm", lambda: sample_ddm(tiny(0), "top-1", 4, device=device)),
                           ("sample_single", lambda: sample_single(lambda x, t: x, (D,), 4, device=device)),
                           ("start_noise", lambda: start_noise(4, (D,), 0, device))):
            with pytest.raises(DDMError, match=f"{name}: {message}"):
                call()


def test_sample_ddm_checks_cond():
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(DDMError, match=r"sample_ddm: labels need class-conditional experts .* leave the labels out"):
        sample_ddm(tiny(0), "top-1", 4, cond={"y": y})
    with pytest.raises(DDMError, match=r"DDM.sample: labels need class-conditional experts"):
        tiny(0).sample("top-1", n=4, labels=y)
    with pytest.raises(DDMError, match=r"sample_ddm: cond: \['label'\]; accepted: None or \{'y': class labels"):
        sample_ddm(tiny(), "top-1", 4, cond={"label": y})
    with pytest.raises(DDMError, match=r"sample_ddm: cond: list; accepted"):
        sample_ddm(tiny(), "top-1", 4, cond=[y])
    x1 = torch.zeros(4, D)
    x0, _ = sample_ddm(tiny(), "oracle", 4, steps=2, x1=x1, cond={"y": [0, 1, 2, 4]})  # a list is converted
    assert (x1 - x0)[:, 0].tolist() == [0.0, 1.0, 2.0, 2.0]  # label 4: "no label", the prior's cluster 2


def test_start_noise_and_sample_single_check_shape_and_n():
    for bad in (2, "2", (2, 0), (2.0,)):
        with pytest.raises(DDMError, match="start_noise: data_shape: .* is not a shape; pass a tuple of positive"):
            start_noise(3, bad, 0)
        with pytest.raises(DDMError, match="sample_single: data_shape: .* is not a shape"):
            sample_single(lambda x, t: x, bad, 3)
    with pytest.raises(DDMError, match="start_noise: n: Input should be greater than or equal"):
        start_noise(-1, (D,), 0)
    assert start_noise(np.int64(2), [D], np.int64(0)).shape == (2, D)


# 11. the starting noise keeps its bytes; a subset is the first rows of a larger draw

def test_start_noise_keeps_its_bytes_and_subsets_are_first_rows():
    """torch.randn's values for a seed are pinned (the pipeline's samples and the documented numbers depend
    on them); 3 rows of seed 0 are not the first 3 of 10, so subsets take the first rows of the larger draw."""
    x = start_noise(3, (D,), 0)
    assert torch.allclose(x, torch.tensor([[1.5410, -0.2934], [-2.1788, 0.5684], [-1.0845, -1.3986]]), atol=1e-4)
    assert not torch.equal(x, start_noise(10, (D,), 0)[:3])
    assert "take the first rows of a larger draw" in " ".join(start_noise.__doc__.split())
    assert "take the first rows of a larger draw" in " ".join(DDM.sample.__doc__.split())


# 12. DDM.sample's keywords

@pytest.mark.parametrize("extra, message", [
    (dict(device="cpu"), r"DDM.sample: device: a DDM samples on its own device \(cpu\); move the DDM with "
                         r"\.to\(device\) first"),
    (dict(cond={}), r"DDM.sample: cond: pass class labels as labels=\.\.\."),
    (dict(stepz=3), r"DDM.sample: unknown argument 'stepz'; accepted: strategy, n, steps, solver, seed, labels, "
                    r"guidance, decode, x1, batch_size, router_every, speed, callback"),
    (dict(batch_size=1, callback=lambda *a: None), r"DDM.sample: callback: a callback sees whole trajectories, so "
                                                   r"it needs all 3 rows in one batch; got batch_size=1"),
    (dict(callback=3), r"DDM.sample: callback: int is not callable; pass a function of one argument"),
    (dict(speed={"cuda_graphs": True}), r"sample_ddm: speed: dict is not a SpeedOptions; pass ddmkit.SpeedOptions"),
    (dict(speed=True), r"sample_ddm: speed: bool is not a SpeedOptions"),
    (dict(strategy="monolith"), r"strategy 'monolith' is not a routing of the DDM's experts: sample the monolith of a "
                                r"run with ddmkit.ddm.sample_single\(ddmkit.ddm.load.monolith_field\(RUN\)")])
def test_ddm_sample_names_a_keyword_it_does_not_take(extra, message):
    """(also: a callback or speed of another type, and the monolith asked of the DDM, failed deep in torch or with
    'unknown routing strategy')"""
    with pytest.raises(DDMError, match=message):
        tiny(0).sample(**{"strategy": "top-1", "n": 3, "steps": 2, **extra})


@pytest.mark.parametrize("bad", ["no", 0, None, "latents"])
def test_ddm_sample_takes_a_bool_decode_only(bad):
    """decode="no" (or 0, None) on a DDM of vectors was taken without a word (and "no" is true: a latent DDM would
    decode where the caller asked for its latents); decode=True or False is as before."""
    with pytest.raises(DDMError, match=r"DDM.sample: decode: .*; pass True \(a latent DDM's samples decoded to "
                                       r"images\) or False \(its latents\)"):
        tiny(0).sample("top-1", n=3, steps=2, decode=bad)
    for decode in (True, False):
        assert tiny(0).sample("top-1", n=3, steps=2, decode=decode)[0].shape == (3, D)


def test_sample_single_names_what_is_not_a_velocity_field():
    with pytest.raises(DDMError, match=r"sample_single: field: DDM is not a velocity field field\(x, t\); sample a "
                                       r"DDM with DDM.sample"):
        sample_single(tiny(0), (D,), 3, steps=2)
    with pytest.raises(DDMError, match=r"sample_single: speed: str is not a SpeedOptions"):
        sample_single(lambda x, t: -x, (D,), 3, steps=2, speed="fast")


def test_sample_single_names_a_data_shape_other_than_the_networks():
    """A loaded monolith or student (an MLP built for (2,)) sampled with data_shape (3,) was torch's
    "mat1 and mat2 shapes cannot be multiplied": one DDMError names the shape given and the network's."""
    from ddmkit.nets.field import NetworkField, VelocityOutput
    from ddmkit.nets.mlp import VelocityMLP

    field = NetworkField(VelocityMLP([D], width=8, depth=1), VelocityOutput())
    with pytest.raises(DDMError, match=r"^sample_single: data_shape \(3,\) is not the shape the field's network "
                                       r"was built for, \(2,\); pass data_shape=\(2,\)"):
        sample_single(field, (D + 1,), 3, steps=2)
    assert sample_single(field, (D,), 3, steps=2)[0].shape == (3, D)


class UserNet(torch.nn.Module):
    """A user's velocity network of no data_shape attribute: (x (B, D), t (B,)) -> (B, out); it draws noise."""

    def __init__(self, out: int):
        super().__init__()
        self.linear = torch.nn.Linear(D, out)

    def forward(self, x, t):
        return self.linear(x) + 0.01 * torch.randn(len(x), 1)


class Normed(torch.nn.Module):
    """A user's network of no data_shape with BatchNorm (which counts its calls in training mode)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(D)

    def forward(self, x, t):
        return self.norm(x)


@pytest.mark.parametrize("out, shape", [(D + 1, r"\(1, 3\)"), (1, r"\(1, 1\)")])
def test_sample_single_names_a_user_network_whose_output_is_not_its_inputs_shape(out, shape):
    """A user's nn.Module of no data_shape was not checked: an output (B, 3) for data_shape (2,) was torch's
    "size of tensor a must match" from inside the solver, and (B, 1) broadcast into wrong samples silently. The
    probe of one row runs the network in eval mode: a BatchNorm left training refused one row (ValueError)."""
    from ddmkit.nets.field import NetworkField, VelocityOutput

    for field in (UserNet(out), NetworkField(UserNet(out), VelocityOutput())):
        with pytest.raises(DDMError, match=rf"^sample_single: data_shape \(2,\): the field's network returns shape "
                                           rf"{shape} for one row of shape \(1, 2\), but a velocity has its input's "
                                           r"shape; pass the data_shape the network was built for"):
            sample_single(field, (D,), 3, steps=2)
    net = UserNet(D)  # of the right shape: sampled, and the probe (its draw too) leaves the samples as they were
    torch.manual_seed(0)
    samples, info = sample_single(net, (D,), 3, steps=2)
    assert info["velocity_evaluations"] == 2
    torch.manual_seed(0)
    assert torch.equal(samples, sample_single(lambda x, t: net(x, t), (D,), 3, steps=2)[0])
    normed = Normed()  # left in training mode: the probe runs it in eval mode, so only the steps' calls count
    sample_single(normed, (D,), 3, steps=2)
    assert int(normed.norm.num_batches_tracked) == 2 and normed.training


class Wide(torch.nn.Module):
    """A user's network of no data_shape built for 3 columns (a Linear of another width than the data's)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(D + 1, D + 1)

    def forward(self, x, t, y=None):
        return self.linear(x)


def test_sample_single_names_data_shape_when_a_user_network_raises_on_it():
    """A user's nn.Module that raises on the data shape it is given (a Linear built for 3 columns, given 2) was
    torch's "mat1 and mat2 shapes cannot be multiplied" from inside the solver: one DDMError names data_shape and
    what the network was given (the conditioning too), torch's message kept; the network's mode is put back."""
    from ddmkit.nets.field import NetworkField, VelocityOutput

    net = Wide()
    for field in (net, NetworkField(net, VelocityOutput())):
        with pytest.raises(DDMError, match=r"^sample_single: data_shape \(2,\): the field's network raised on x of "
                                           r"shape \(1, 2\), t = 1: RuntimeError: mat1 and mat2 shapes cannot be "
                                           r"multiplied.*; pass the data_shape the network was built for") as err:
            sample_single(field, (D,), 3, steps=2)
        assert isinstance(err.value.__cause__, RuntimeError) and net.training
    with pytest.raises(DDMError, match=r"raised on x of shape \(1, 2\), t = 1, y of shape \(1,\): RuntimeError"):
        sample_single(net, (D,), 3, steps=2, cond={"y": torch.zeros(3, dtype=torch.long)})
    assert sample_single(net, (D + 1,), 3, steps=2)[0].shape == (3, D + 1)


# 13. info["expert_rows"] has one entry per expert

def test_expert_rows_has_one_entry_per_expert():
    """A router that always picks expert 0: the row counts of the other two are 0, not left out."""
    first = lambda x, t, **c: torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), K)  # noqa: E731
    ddm = dataclasses.replace(tiny(0), router=first)
    _, info = ddm.sample("top-1", n=5, steps=3)
    assert info["expert_rows"] == [15, 0, 0]
    assert CallCounter(4).expert_rows == [0, 0, 0, 0] and CallCounter().expert_rows == []


# 14. notebook ergonomics

def test_dir_lists_the_lazy_public_names():
    import ddmkit

    assert {"DDM", "load_ddm", "sample_ddm", "sample_single", "start_noise", "SpeedOptions", "DDMError"} <= set(
        dir(ddmkit))


def test_help_of_every_public_name_reads_its_own_docstring():
    """help(ddmkit.RunConfig) showed pydantic's BaseModel docstring, help(ddmkit.SpeedOptions) sent the reader to a
    module docstring help does not show, and the package's docstring left some public names out."""
    import ddmkit

    for name in ddmkit.__all__:
        obj = getattr(ddmkit, name)
        if isinstance(obj, type) or callable(obj):
            own = vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__
            assert own and len(own.split()) >= 8, f"ddmkit.{name} has no docstring of its own"
        assert re.search(rf"(?<![\w.]){re.escape(name)}\b", ddmkit.__doc__), f"ddmkit's docstring omits {name}"
    for field in dataclasses.fields(SpeedOptions):
        assert field.name in SpeedOptions.__doc__


def test_a_subpackage_is_reachable_from_import_ddmkit_alone():
    """The README's ddmkit.ddm.sample_single(...) was an AttributeError in a fresh interpreter."""
    import subprocess
    import sys
    code = ("import ddmkit; print(ddmkit.ddm.sample_single.__name__, ddmkit.routing.combine.__name__)\n"
            "try:\n    ddmkit.nope\nexcept AttributeError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split("\n")[:2] == ["sample_single combine", "module 'ddmkit' has no attribute 'nope'"], \
        done.stderr


def test_the_ddm_has_a_docstring_a_short_repr_and_explicit_loading_options(run):
    assert DDM.__doc__.startswith("K expert velocity fields")
    assert repr(tiny()) == "DDM(K=3, data_shape=(2,), router='custom', device='cpu', class-conditional, 4 classes)"
    assert repr(DDM.from_pretrained(run)) == "DDM(K=4, data_shape=(2,), router='learned', device='cpu', unconditional)"
    assert repr(DDM.from_pretrained(run).restrict([0, 2])).endswith("unconditional, missing experts [1, 3])")
    params = inspect.signature(DDM.from_pretrained).parameters
    assert list(params) == ["run", "device", "exclude", "allow_missing", "guidance", "router"]
    assert DDM.from_pretrained(run, exclude=[2]).meta["missing_experts"] == [2]


# 15. messages for the wrong folder

def test_a_wrong_folder_is_named_as_such(run, tmp_path):
    with pytest.raises(DDMError, match="nope is not a run folder \\(no such folder\\)"):
        exact_ddm(tmp_path / "nope")
    expert = run / "experts" / "expert_00"
    with pytest.raises(DDMError, match=f"{expert} is a model folder \\(config.json \\+ model.safetensors\\), not a "
                                       f"run folder; pass the run folder that holds it: {run}$"):
        DDM.from_pretrained(expert)
    with pytest.raises(DDMError, match=f"{run / 'router'} is a model folder .* holds it: {run}$"):
        exact_ddm(run / "router")
    assert exact_ddm(run).k == 4  # the tiny run is a Gaussian mixture


@pytest.mark.parametrize("bad", [None, 3])
def test_a_run_that_is_no_path_is_refused_naming_run(bad):
    """None (an unset variable) or a number was a TypeError from deep in the loading."""
    for load_run in (DDM.from_pretrained, load_ddm, exact_ddm):
        with pytest.raises(DDMError, match=f"run: {bad} \\({type(bad).__name__}\\) is not a folder; pass the path"):
            load_run(bad)


def test_allow_missing_takes_a_bool_only(run):
    """allow_missing="no" was true: missing experts were left out where the caller meant them refused."""
    with pytest.raises(DDMError, match="allow_missing: 'no'; pass True or False"):
        DDM.from_pretrained(run, allow_missing="no")
    assert DDM.from_pretrained(run, allow_missing=False).k == 4


def test_a_run_without_a_router_names_the_statistics_router(run, tmp_path):
    islands = tmp_path / "islands"
    shutil.copytree(run, islands, ignore=shutil.ignore_patterns("router", "registry.json"))
    with pytest.raises(DDMError, match="no router .* run `ddmkit train-router .*` first, or route by the islands' "
                                       "published statistics: router='statistics' in Python"):
        load_ddm(islands)
    with pytest.warns(UserWarning, match="no registry.json"):
        assert DDM.from_pretrained(islands, router="statistics").meta["router"] == "statistics"
    with pytest.warns(UserWarning, match="no registry.json"):  # add-expert's spelling, refused before
        assert DDM.from_pretrained(islands, router="stats").meta["router"] == "statistics"


def test_the_strategy_name_is_reported_without_spaces_around_it():
    ddm = DDM([lambda x, t: torch.zeros_like(x)] * 2, lambda x, t: torch.full((len(x), 2), 0.5), torch.full((2,), 0.5), (2,))
    assert sample_ddm(ddm, " top-1 ", 3, steps=1)[1]["strategy"] == "top-1"


@pytest.mark.parametrize("strategy", ["sample-1", "sample-2@0.5", "nucleus-0.9", "switch"])
def test_the_adaptive_solver_refuses_strategies_that_redraw_at_every_evaluation(strategy):
    """dopri5 with a strategy that draws its experts anew at every evaluation rejected step after step (sample-1
    on 20 rows: 27,734 evaluations; `ddmkit sample --solver adaptive` seemed to hang). Refused in the config and
    in sample_ddm; deterministic strategies and the oracle (one draw per sample) are accepted."""
    from ddmkit.config import SampleConfig, validate

    with pytest.raises(DDMError, match=f"solver = 'adaptive' with {re.escape(strategy)}"):
        validate(SampleConfig, {"solver": "adaptive", "strategies": ["full", strategy]})
    validate(SampleConfig, {"solver": "adaptive", "strategies": ["full", "top-2", "oracle", "monolith"]})
    validate(SampleConfig, {"solver": "euler", "strategies": [strategy]})
    # the other sets the section draws: they were drawn (after the first sets) and then refused
    for extra, field in (({"stats_router_strategies": [strategy]}, "sample.stats_router_strategies"),
                         ({"sweep_strategy": strategy, "guidance_sweep": [2.0]}, "sample.sweep_strategy")):
        with pytest.raises(DDMError, match=f"solver = 'adaptive' with {re.escape(strategy)}.*out of {field}"):
            validate(SampleConfig, {"solver": "adaptive", "strategies": ["full"], **extra})
    validate(SampleConfig, {"solver": "adaptive", "strategies": ["full"], "sweep_strategy": strategy})  # no sweep
    with pytest.raises(DDMError, match="solver 'adaptive' with strategy"):
        sample_ddm(tiny(0), strategy, 4, solver="adaptive")
    assert sample_ddm(tiny(0), "oracle", 4, solver="adaptive")[0].shape == (4, D)


def test_a_hand_built_ddm_needs_one_prior_entry_per_expert():
    """A prior of 3 entries for 2 experts let oracle pick expert 2: no expert called, samples = the noise;
    a prior given as a list failed deep in sampling."""
    with pytest.raises(DDMError, match=r"prior must hold one proportion per expert, \(2,\) floats .* \(3,\)"):
        DDM(experts=constant_experts(2), router=flat_router, prior=torch.tensor([0.0, 0.0, 1.0]), data_shape=(D,))
    with pytest.raises(DDMError, match="experts must be a non-empty list"):
        DDM(experts=[], router=flat_router, prior=torch.tensor([]), data_shape=(D,))
    ddm = DDM(experts=constant_experts(), router=flat_router, prior=[0.0, 0.0, 1.0], data_shape=[D])
    assert ddm.prior.dtype == torch.float32 and ddm.data_shape == (D,)
    x, _ = ddm.sample("oracle", n=4, steps=2)
    assert torch.allclose(x, start_noise(4, (D,), 0) - 2)  # expert 2, velocity 2, from t = 1 to 0


def test_nearest_routing_without_a_nearest_map_is_refused():
    """It silently became sample-1 at every step."""
    with pytest.raises(DDMError, match="strategy 'nearest' needs the nearest-cluster map"):
        tiny(0).sample("nearest", n=4, steps=2)


def test_experts_or_router_replaced_in_place_after_sampling_are_used():
    """The prepared networks were kept after the first sample, so later changes were ignored."""
    ddm = tiny(0)
    before, _ = ddm.sample("full", n=4, steps=2)
    ddm.experts[:] = [lambda x, t, j=j: torch.full_like(x, 10.0 * j) for j in range(K)]
    ddm.router = lambda x, t: torch.tensor([[0.0, 1.0, 0.0]]).expand(len(x), -1)
    after, _ = ddm.sample("full", n=4, steps=2)
    assert torch.allclose(after, start_noise(4, (D,), 0) - 10.0) and not torch.equal(before, after)
    assert len(ddm.accelerated) == 1  # the old experts' calls are dropped


def test_to_moves_a_plain_module_expert_and_router():
    """Only networks wrapped in a NetworkField were moved (checked here with the meta device's tensors)."""
    expert, router = torch.nn.Linear(D, D), torch.nn.Linear(D, K)
    ddm = DDM(experts=[expert] * K, router=router, prior=torch.full((K,), 1 / K), data_shape=(D,))
    ddm.to("cpu")  # the same device works; a module's .to is what is called
    moved = []
    expert.to = router.to = lambda device: moved.append(device)
    ddm.to("cpu")
    assert len(moved) == K + 1


def test_none_for_a_sampling_argument_is_refused_not_read_as_the_default():
    """seed=None gave the seed-0 samples exactly, where a user meant new noise (n=None is n's default: len(x1),
    else 1000)."""
    for name in ("seed", "steps", "solver"):
        with pytest.raises(DDMError, match=f"DDM.sample: {name}: None; give a value"):
            tiny(0).sample("full", **{"n": 4, "steps": 2, name: None})


def test_sample_single_checks_its_cond():
    """cond=[1] was an AttributeError inside sampling."""
    for cond in ([1], {"y": [1, 2]}, {"y": torch.zeros(3)}):
        with pytest.raises(DDMError, match="sample_single: cond: .*give None or a dict of tensors of n = 4 rows"):
            sample_single(lambda x, t, y=None: -x, (D,), n=4, steps=2, cond=cond)
    sample_single(lambda x, t, y=None: -x, (D,), n=4, steps=2, cond={"y": torch.zeros(4)})


def test_a_strategy_object_samples_as_its_name_does():
    """DDM.sample took names only: a one-off strategy had to be added to the global table first; and
    routed_velocity given a name said "routing strategy 'str' is not a Strategy"."""
    from ddmkit.routing import parse_strategy, routed_velocity
    a, info_a = tiny(0).sample("top-2", n=6, steps=3)
    b, info_b = tiny(0).sample(parse_strategy("top-2"), n=6, steps=3)
    assert torch.equal(a, b) and info_b["strategy"] == "top-2" == info_a["strategy"]
    with pytest.raises(DDMError, match=r"routed_velocity takes a Strategy object; make one from its name with "
                                       r"ddmkit.routing.parse_strategy\('full'\)"):
        routed_velocity([], flat_router, "full", None)


# 16. a broken router is refused before sampling, by one probe of its probabilities

SAMPLED = ["full", "top-1", "top-2", "threshold-0.3", "sample-1", "sample-2", "nucleus-0.9", "switch", "oracle",
           "nearest", "adaptive-0.9", "adaptive-ent-0.5"]


def rows_of(row):
    """A router whose every row is `row` (K values)."""
    return lambda x, t, **cond: torch.tensor([row]).expand(len(x), K).clone()


@pytest.mark.parametrize("row, said", [
    ([float("nan")] * K, "NaN"),
    ([float("inf"), 0.0, 0.0], "infinite values"),
    ([-0.5, 0.2, 1.3], r"negative values \(as low as -0.5\)"),
    ([2.0, -1.0, 0.5], r"negative values \(as low as -1\)"),  # logits where probabilities belong
    ([0.5, 1.0, 0.5], r"a row summing to 2 \(not 1\)"),
    ([0.0, 0.0, 0.0], r"a row summing to 0 \(not 1\)"),
])
def test_a_router_of_nan_inf_negative_or_unnormalised_rows_is_refused_under_every_strategy(row, said):
    """switch and sample-1 drew from a NaN row as from a uniform one (plausible, wrong samples), top-1 gave a
    velocity of zero, full and top-2 NaN samples, nucleus a RuntimeError from torch.multinomial."""
    ddm = dataclasses.replace(tiny(0), router=rows_of(row), nearest=lambda x: torch.zeros(len(x), dtype=torch.long))
    for strategy in SAMPLED:
        with pytest.raises(DDMError, match=rf"^the router \('custom'\) returned, on the starting noise at t = 1, "
                                           rf"{said}; a router returns probabilities \(B, K\): finite, >= 0, rows "
                                           r"summing to 1. Check its last layer \(a softmax over the experts\), or "
                                           r"retrain a run's router with `ddmkit train-router RUN`$"):
            ddm.sample(strategy, n=6, steps=2)


def test_a_router_broken_below_t_1_or_on_one_row_is_refused_naming_the_time():
    def late(x, t, **cond):
        p = flat_router(x, t)
        p[t < 0.75] = float("nan")
        return p

    def one_row(x, t, **cond):
        p = flat_router(x, t)
        p[0] = float("nan")
        return p

    with pytest.raises(DDMError, match="returned, on the starting noise at t = 0.5, NaN"):
        dataclasses.replace(tiny(0), router=late).sample("switch", n=6, steps=2)
    with pytest.raises(DDMError, match="returned, on the starting noise at t = 1, NaN"):
        dataclasses.replace(tiny(0), router=one_row).sample("switch", n=6, steps=2)


def test_a_router_of_the_wrong_shape_is_refused_before_sampling():
    wide = lambda x, t, **cond: torch.full((len(x), K + 1), 1 / (K + 1))  # noqa: E731
    with pytest.raises(DDMError, match=r"^the router returned torch.float32 \(4, 4\); expected float probabilities "
                                       r"\(B, K\) = \(4, 3\)"):
        sample_ddm(dataclasses.replace(tiny(0), router=wide), "oracle", n=6, steps=2)


def test_a_learned_router_whose_weights_went_nan_is_refused_naming_it_and_a_restricted_one_too(run):
    """The router of a run with a missing expert (restrict) answered a NaN row with the uniform one."""
    ddm = DDM.from_pretrained(run)
    with torch.no_grad():
        for p in ddm.router.network.parameters():
            p.fill_(float("nan"))
    for broken in (ddm, ddm.restrict([0, 2])):
        with pytest.raises(DDMError, match=r"^the router \('learned'\) returned, on the starting noise at t = 1, NaN; "
                                           r".*retrain a run's router with `ddmkit train-router RUN`$"):
            broken.sample("switch", n=6, steps=2)


def test_rows_rounded_in_half_precision_pass_and_a_float32_row_off_by_1e_2_does_not():
    def soft(dtype):
        return lambda x, t, **cond: torch.softmax(torch.stack([x[:, 0], x[:, 1], -x[:, 0]], 1), 1).to(dtype)

    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        dataclasses.replace(tiny(0), router=soft(dtype)).sample("top-2", n=64, steps=2)
    with pytest.raises(DDMError, match=r"a row summing to 1.01 \(not 1\)"):
        dataclasses.replace(tiny(0), router=rows_of([0.34, 0.34, 0.33])).sample("top-2", n=6, steps=2)


def test_the_probe_reads_a_few_rows_with_their_labels_and_leaves_the_samples_and_the_global_rng_alone():
    """A label-conditional router gets the probed rows' labels; the probe's calls are not counted, and a router
    that draws from the global RNG draws at the sampler's first routing what it drew without the probe."""
    from ddmkit.ddm.sampling import PROBE_ROWS, PROBE_TIMES
    torch.manual_seed(0)
    first = torch.rand(()).item()
    seen = []

    def drawing(x, t, y):
        seen.append((len(x), y[:2].tolist(), torch.rand(()).item()))
        return flat_router(x, t)

    ddm = dataclasses.replace(tiny(), router=drawing, router_conditional=True)
    torch.manual_seed(0)
    x0, info = ddm.sample("top-1", n=6, steps=3, labels=[1, 2, 0, 0, 1, 2])
    assert [rows for rows, _, _ in seen] == [PROBE_ROWS] * len(PROBE_TIMES) + [6] * 3
    assert all(y == [1, 2] for _, y, _ in seen) and seen[len(PROBE_TIMES)][2] == first
    assert info["router_calls"] == 3
    assert torch.equal(x0, start_noise(6, (D,), 0))  # top-1 of a flat row: expert 0, of velocity 0


def test_the_analysis_sampler_distillations_teacher_and_the_convergence_study_probe_the_router(monkeypatch):
    """They route without sample_ddm (their own loops over the steps): each refuses a NaN router before its
    first step, with sampling's message."""
    from ddmkit.analysis.trace import trace_strategy
    from ddmkit.theory import convergence
    from ddmkit.train.distill import teacher_velocity
    said = r"^the router \('custom'\) returned, on the starting noise at t = 1, NaN; a router returns probabilities"
    ddm = dataclasses.replace(tiny(0), router=rows_of([float("nan")] * K))
    with pytest.raises(DDMError, match=said):
        trace_strategy(ddm, "top-2", start_noise(6, (D,), 0), steps=2)
    with pytest.raises(DDMError, match=said):
        teacher_velocity(ddm, "top-2")
    settings = convergence.ConvergenceSettings.quick()
    nan = lambda x, t: torch.full((len(x), settings.clusters), float("nan"))  # noqa: E731
    monkeypatch.setattr(convergence, "make_router", lambda gmm, groups, temperature: nan)
    with pytest.raises(DDMError, match=said):
        convergence.routed_sample(convergence.make_problem(settings), "euler:switch", torch.randn(6, 2, dtype=torch.float64), 4, 0)


@pytest.mark.parametrize("given", ["", "  "])
def test_a_run_folder_given_as_empty_text_is_refused_by_the_library_too(given, tmp_path, monkeypatch):
    """The command line refused RUN '' (Path('') is '.', the current folder), but load_ddm(''), run_pipeline(cfg, '')
    and the other library entry points acted on the current folder ("no partition yet ... --out ."), and
    run_pipeline would have made a run there. Each refuses it in one line; nothing is written."""
    from ddmkit.config import load_config
    from ddmkit.pipeline.analyze import analyze_run
    from ddmkit.pipeline.distill import distill_run
    from ddmkit.pipeline.run import run_pipeline
    from ddmkit.registry import verify_registry, write_registry

    monkeypatch.chdir(tmp_path)
    said = "empty" if given == "" else f"only whitespace ({given!r})"
    calls = {"the run folder": [lambda: run_pipeline(load_config("demo"), given, log=lambda m: None),
                                lambda: distill_run(given, log=lambda m: None), lambda: analyze_run(given),
                                lambda: write_registry(given), lambda: verify_registry(given)],
             "load_ddm: run": [lambda: load_ddm(given)], "exact_ddm: run": [lambda: exact_ddm(given)]}
    for what, entries in calls.items():
        for call in entries:
            with pytest.raises(DDMError, match=rf"^{what} is {re.escape(said)}: give its path \('\.' for the current "
                                               r"folder\)$"):
                call()
    assert list(tmp_path.iterdir()) == []


def test_a_restricted_router_renormalises_a_mass_below_float32s_normal_numbers():
    """A statistics-only router far from the present islands gives them ~1e-35 (grown with add-expert --router
    stats, the report's missing-expert study removed the island it routes to): the row still sums to 1."""
    ddm = dataclasses.replace(tiny(0), router=rows_of([1.0, 1e-35, 3e-35])).restrict([1, 2])
    probs = ddm.router(torch.zeros(4, D), torch.full((4,), 0.5))
    assert torch.allclose(probs, torch.tensor([[0.0, 0.25, 0.75]]).expand(4, K), atol=1e-6)
    ddm.sample("top-2", n=6, steps=2)  # the probe of the router accepts it
