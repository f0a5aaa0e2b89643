"""Hardening: no code runs from a run folder; every bad value is a DDMError (CLI exit 2)
naming the field; nothing is written before a run is checked; one writer per run folder; stale
temporary files are removed; every training job runs on train.threads threads. docs/reliability.md lists
these promises and points here."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddmkit.data.features as features
from ddmkit.config import RunConfig, load_config, validate
from ddmkit.data import load_dataset
from ddmkit.data.arrays import ArrayData
from ddmkit.data.partition import partition_data
from ddmkit.ddm import load_ddm
from ddmkit.errors import DDMError
from ddmkit.io import HOST, folder_lock, save_tensors, sha256_file, staging_dir, write_json
from ddmkit.layout import RunFolder
from ddmkit.nets import build_model, save_pretrained
from ddmkit.pipeline.prepare import prepare_run_dir
from ddmkit.pipeline.run import run_pipeline
from ddmkit.pipeline.stages import stage_experts, stage_monolith, stage_registry, stage_router
from ddmkit.registry import load_model, load_partition_checked, write_registry

TESTS = Path(__file__).parent
TINY = TESTS / "configs" / "tiny.toml"
SRC = str(TESTS.parent / "src")
QUIET = lambda m: None  # noqa: E731


def flat_features(x):
    """A user feature function (named by the test configs as tests.test_hardening:flat_features)."""
    return x.reshape(len(x), -1) * 2.0


def nan_features(x):
    return torch.full((len(x), 2), float("nan"))


def vector_features(x):
    return x.reshape(len(x), -1)[:, 0]


def failing_features(x):
    raise ValueError("no features today")


NOT_CALLABLE = 3


def tiny(**sections) -> RunConfig:
    """The tiny test config, smaller (k = 2, 20 steps), with sections overridden."""
    raw = load_config(TINY).model_dump()
    raw["data"].update(n_train=400, n_test=400)
    raw["partition"]["k"] = 2
    raw["sample"]["n"] = 100  # scored against 2 x 100 of the 400 test rows
    for net in ("expert", "router"):
        raw[net]["train"].update(steps=20, warmup=2, log_every=10)
    for name, values in sections.items():
        section, _, sub = name.partition("__")
        (raw[section][sub] if sub else raw[section]).update(values)
    return validate(RunConfig, raw)


def cli(*args) -> tuple[int, str]:
    """`ddmkit ARGS` in this process (conftest's run_cli): (exit code, stderr). An exception other than
    the CLI's own exit would be a traceback for a user, and fails the test."""
    from conftest import run_cli  # here: the module is also imported as user code (tests.test_hardening:...)

    done = run_cli(*args)
    return done.returncode, done.stderr


# ----- 1. nothing in a run folder names code ---------------------------------------------------
@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A trained run partitioned by a user feature function (the config names it)."""
    cfg = tiny(partition={"features": "tests.test_hardening:flat_features"})
    run = prepare_run_dir(tmp_path_factory.mktemp("user") / "run", cfg, log=QUIET)
    for stage in (stage_experts, stage_router, stage_registry):
        stage(cfg, run, QUIET)
    return run


def test_user_features_are_recorded_by_name_and_used_where_the_config_named_them(user_run):
    manifest = json.loads((user_run / "partition" / "manifest.json").read_text())
    assert manifest["features"] == {"kind": "function", "function": "tests.test_hardening:flat_features"}
    x, _ = load_ddm(user_run).sample(strategy="nearest", n=16, steps=2)  # registered by this process's config
    assert torch.isfinite(x).all()


def test_nearest_never_imports_the_function_a_run_folder_names(user_run, monkeypatch):
    monkeypatch.setattr(features, "_USER", {})  # a process that did not run the user's config
    ddm = load_ddm(user_run)  # loading needs no feature function
    assert torch.isfinite(ddm.sample(strategy="top-2", n=16, steps=2)[0]).all()
    with pytest.raises(DDMError, match=r"tests\.test_hardening:flat_features.*never imports from a run folder"):
        ddm.sample(strategy="nearest", n=16, steps=2)


def test_the_nearest_refusal_names_the_set_that_sample_takes(user_run, monkeypatch, capsys, tmp_path):
    """The message named `ddmkit run CONFIG` only; `ddmkit sample` takes --config or --set."""
    run = Path(shutil.copytree(user_run, tmp_path / "run"))
    monkeypatch.setattr(features, "_USER", {})
    code, err = cli("sample", run, "--strategy", "nearest", "--n", "16")
    fix = "--set partition.features=tests.test_hardening:flat_features"
    assert code == 2 and fix in " ".join(err.split()), err
    assert cli("sample", run, "--strategy", "nearest", "--n", "16", *fix.split())[0] == 0


def test_a_manifest_naming_any_module_imports_nothing(user_run, tmp_path, monkeypatch):
    """A run folder from elsewhere names a module with side effects: neither loading nor sampling
    with `nearest` imports it."""
    marker = tmp_path / "imported"
    (tmp_path / "ddmkit_probe_mod.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("imported")
        def features(x):
            open({str(marker)!r}, "w").write("called")
            return x.reshape(len(x), -1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(features, "_USER", {})
    run = tmp_path / "run"
    shutil.copytree(user_run, run)
    manifest = json.loads((run / "partition" / "manifest.json").read_text())
    manifest["features"] = {"kind": "function", "function": "ddmkit_probe_mod:features"}
    (run / "partition" / "manifest.json").write_text(json.dumps(manifest))
    write_registry(run)
    ddm = load_ddm(run)
    with pytest.raises(DDMError, match="ddmkit_probe_mod:features"):
        ddm.sample(strategy="nearest", n=8, steps=2)
    assert not marker.exists() and "ddmkit_probe_mod" not in sys.modules


@pytest.mark.parametrize("name, message", [
    ("tests.test_hardening:nan_features", "NaN or infinite"),
    ("tests.test_hardening:vector_features", r"returned shape \(300,\)"),
    ("tests.test_hardening:failing_features", "raised ValueError"),
    ("tests.test_hardening:NOT_CALLABLE", "not a function"),
    ("tests.no_such_module:f", "cannot import"),
    ("tests.test_hardening:no_such_function", "cannot import"),
])
def test_the_configs_feature_function_is_checked_when_partitioning(tmp_path, name, message):
    train = ArrayData("x", torch.randn(300, 2))
    with pytest.raises(DDMError, match=f"partition.features: .*{message}|{message}"):
        partition_data(train, 2, tmp_path / "p", features=name)
    assert not (tmp_path / "p").exists()


def test_a_feature_name_that_is_not_module_colon_function_is_a_config_error():
    with pytest.raises(DDMError, match="partition.features"):
        validate(RunConfig, {"partition": {"features": "os.system('x')"}})


# ----- 2. one validation layer ------------------------------------------------------------------
@pytest.mark.parametrize("toml, field", [
    ("[expert.train]\nlr = inf", "expert.train.lr"),
    ("[expert.train]\nlr = nan", "expert.train.lr"),
    ("[expert.train]\nweight_decay = inf", "expert.train.weight_decay"),
    ("[router.train]\nema_decay = nan", "router.train.ema_decay"),
    ("[router.train]\ngrad_clip = inf", "router.train.grad_clip"),
    ("[expert.train]\nthreads = 0", "expert.train.threads"),
    ("[sample]\nguidance = inf", "sample.guidance"),
    ("[sample]\nguidance_sweep = [1.0, nan]", "sample.guidance_sweep"),
    ("[data]\nseed = -1", "data.seed"),
    ("[partition]\nseed = 9223372036854775808", "partition.seed"),
    ("[expert.train]\nsteps = 100000000000", "expert.train.steps"),
    ("[expert]\nlabel_dropout = nan", "expert.label_dropout"),
])
def test_every_number_in_the_config_is_finite_and_bounded(tmp_path, toml, field):
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    with pytest.raises(DDMError, match=field.replace(".", r"\.")):
        load_config(path)


@pytest.mark.parametrize("toml, words", [("[partition]\nk = true", "partition.k: true is a boolean"),
                                         ("[expert.train]\nlr = false", "expert.train.lr: false is a boolean")])
def test_a_boolean_is_not_read_as_a_number(tmp_path, toml, words):
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")  # pydantic alone reads true as 1: one cluster
    with pytest.raises(DDMError, match=words):
        load_config(path)


def test_a_seed_too_large_for_64_bits_is_a_clear_error(monkeypatch, capsys, tmp_path):
    with pytest.raises(DDMError, match="seed"):
        RunConfig().with_seed(2**64)
    assert RunConfig().with_seed(2**63 - 1).router.train.seed == 0  # seed + 1 wraps within the range
    code, err = cli("run", TINY, "--seed", 2**64, "--out", tmp_path / "r")
    assert code == 2 and "seed" in err and not (tmp_path / "r").exists()


def test_evaluating_a_run_that_is_not_trained_writes_nothing(monkeypatch, capsys, tmp_path, user_run):
    """`ddmkit run --stages evaluate` on a fresh folder, or on a run without its monolith, exits 2 naming
    what is missing and the command that trains it, before any data or sample is written."""
    code, err = cli("run", TINY, "--stages", "evaluate", "--out", tmp_path / "fresh")
    assert code == 2 and "not trained" in err and "--stages train" in err and not (tmp_path / "fresh").exists()
    run = tmp_path / "partial"
    shutil.copytree(user_run, run)  # experts and router, no monolith
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, err = cli("run", run / "config.json", "--stages", "evaluate", "--out", run)
    assert code == 2 and "monolith" in err and sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # the fix it names works: it named only `--stages train`, which trains a monolith (on a grown run's new data too)
    said = " ".join(err.split())
    assert f"train it with `ddmkit train-monolith {run}`, or sample and score the DDM alone with `ddmkit sample " \
           f"{run}`, then `ddmkit evaluate {run}`" in said, said
    assert cli("sample", run)[0] == 0 and cli("evaluate", run)[0] == 0
    (run / "grow.json").write_text('{"entries": []}')  # grown: its monolith would not be the original's baseline
    code, err = cli("run", run / "config.json", "--stages", "evaluate", "--out", run)
    assert code == 2 and "train-monolith" not in err and "`ddmkit sample" in err, err


def test_evaluate_refuses_another_runs_settings_and_reports_how_each_set_was_drawn(monkeypatch, capsys, tmp_path,
                                                                                   user_run):
    """`ddmkit evaluate --set data.name=...` described another run than it scored; the report's sampling
    line comes from what each set records, so a set drawn with other steps and seed is named."""
    run = Path(shutil.copytree(user_run, tmp_path / "run"))
    assert cli("sample", run, "--strategy", "top-2")[0] == 0
    assert cli("sample", run, "--strategy", "full", "--steps", 3, "--seed", 7)[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    code, err = cli("evaluate", run, "--set", "data.name=grid25", "--set", "partition.k=3")
    assert code == 2 and "data.name ('ring8', asked 'grid25')" in err and "partition.k (2, asked 3)" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    code, err = cli("evaluate", run, "--device", "cpu", "--set", "evaluate.chunk=50")
    assert code == 0, err
    report = (run / "report.md").read_text()
    assert "the sets were drawn with different settings (full: 100 samples, euler, 3 steps, seed 7; top-2: 100 " \
           "samples, euler, 8 steps, seed 0)" in " ".join(report.split()), report[:600]
    assert "W2 and sliced W2 averaged over 2 pair(s) of 50 points, MMD on the first pair." in " ".join(report.split())
    assert "One pair only" not in report
    for row in ("full", "noise floor \\(true vs true\\)"):  # W2 ± its error, the floor's too
        assert __import__("re").search(rf"\| {row} \| [0-9.e-]+ ± [0-9.e-]+ \| [0-9.]+ \|", report), report
    code, err = cli("sample", run, "--strategy", "switch", "--batch-size", 30, "--n", 60)
    assert code == 0 and f"still score the sets as they were; `ddmkit evaluate {run}` scores these" in err, err
    code, err = cli("sample", run, "--strategy", "top-2", "--router-every", 3)
    assert code == 0 and "sample top-2: replaces the set drawn before (router_every 1 -> 3)" in err, err
    assert cli("sample", run, "--strategy", "top-1", "--solver", "adaptive")[0] == 0
    code, err = cli("sample", run, "--strategy", "switch", "--solver", "adaptive")
    assert code == 2 and "or leave them out of --strategy" in " ".join(err.split()), err  # the option, not the field
    assert cli("evaluate", run, "--device", "cpu", "--set", "evaluate.chunk=50")[0] == 0
    said = " ".join((run / "report.md").read_text().split())
    assert "top-2: 100 samples, euler, 8 steps, seed 0, router every 3 evaluations" in said, said[:900]
    assert "switch: 60 samples, euler, 8 steps, seed 0, in chunks of 30" in said, said[:900]
    assert "top-1: 100 samples, adaptive, seed 0)" in said, said[:900]  # it chooses its own steps
    assert "**One pair only**: W2 has no error bar" in said  # 60 samples: one pair of 50


def test_evaluate_refuses_sets_drawn_by_networks_changed_since_and_a_run_without_its_config(monkeypatch, capsys,
                                                                                             tmp_path, user_run):
    """evaluate scored sets drawn before an expert was retrained or a router trained (their registry hash
    differs from the run's now) as the DDM's; and a run that lost its config.json trained the defaults."""
    run = Path(shutil.copytree(user_run, tmp_path / "run"))
    assert cli("sample", run, "--strategy", "top-2", "--strategy", "full")[0] == 0
    code, err = cli("sample", run, "--guidance", 2)  # was "load_ddm: guidance: 2 ..."
    assert code == 2 and "--guidance 2: classifier-free guidance needs class-conditional experts" in err, err
    info_path = run / "samples" / "info.json"
    infos = json.loads(info_path.read_text())
    infos["top-2"]["drawn_with"]["networks"] = "0" * 64  # drawn by other networks than the registered ones
    info_path.write_text(json.dumps(infos))
    code, err = cli("evaluate", run, "--set", "evaluate.chunk=50")
    said = " ".join(err.split())
    assert code == 2 and "sample sets 'top-2' were drawn by networks that have changed since" in said, said
    assert f"draw them again with `ddmkit sample {run} --strategy top-2`" in said and not (run / "report.md").exists()
    assert cli("sample", run, "--strategy", "top-2")[0] == 0
    assert cli("evaluate", run, "--set", "evaluate.chunk=50")[0] == 0
    info_path.unlink()  # was "no samples yet" beside the sample files
    code, err = cli("evaluate", run)
    assert code == 2 and "info.json is missing, the record of how the sets in" in " ".join(err.split()), err

    (run / "config.json").unlink()
    shutil.rmtree(run / "monolith", ignore_errors=True)
    for command in (["train-monolith", run], ["train-router", run], ["launch", run], ["evaluate", run]):
        code, err = cli(*command)
        said = " ".join(err.split())
        assert code == 2 and f"{run} has no config.json, the settings the run was made with" in said, (command, said)
    assert not (run / "monolith").exists()


def test_a_set_is_stale_only_when_the_networks_it_was_drawn_by_change(monkeypatch, capsys, tmp_path, user_run):
    """Any change of registry.json made every set stale: a monolith trained after sampling refused the DDM's
    sets, and the suggested command did not draw a statistics-router set."""
    run = Path(shutil.copytree(user_run, tmp_path / "run"))
    assert cli("sample", run, "--strategy", "top-2")[0] == 0
    assert cli("sample", run, "--strategy", "top-2", "--router", "statistics")[0] == 0
    assert cli("train-monolith", run)[0] == 0
    assert cli("sample", run, "--strategy", "monolith")[0] == 0
    assert cli("evaluate", run, "--set", "evaluate.chunk=50")[0] == 0  # the DDM's are not stale
    shutil.rmtree(run / "router")  # another router (of another seed, which `train-router` refuses): top-2 is stale
    cfg = load_config(run / "config.json")
    stage_router(cfg.model_copy(update={"router": cfg.router.model_copy(update={
        "train": cfg.router.train.model_copy(update={"seed": 5})})}), run, QUIET)
    stage_registry(cfg, run, QUIET)
    code, err = cli("evaluate", run, "--set", "evaluate.chunk=50")
    said = " ".join(err.split())
    assert code == 2 and "sample sets 'top-2' were drawn by networks that have changed since" in said, said
    assert f"`ddmkit sample {run} --strategy top-2`" in said  # the statistics-router set only uses the experts


def test_sets_whose_draws_depend_on_the_chunk_size_record_it():
    """oracle and nearest draw clusters on their first evaluation: on a GPU the draws of a generator depend on how
    many are drawn at once, so their sets in other chunks are other sets (they were kept, said the same)."""
    from ddmkit.pipeline.sampling import chunked_differently
    from ddmkit.pipeline.samplesets import named_set

    chunked = {name: chunked_differently(named_set(name, 10), "euler")
               for name in ("oracle", "nearest", "sample-2", "switch", "top-2", "full", "monolith")}
    assert chunked == {"oracle": True, "nearest": True, "sample-2": True, "switch": True, "top-2": False,
                       "full": False, "monolith": False}
    assert chunked_differently(named_set("monolith", 10), "adaptive")


def test_router_every_is_recorded_only_for_sets_it_changes():
    """A new sample.router_every redrew the monolith and oracle sets, which it does not change."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.sampling import drawn_with
    from ddmkit.pipeline.samplesets import named_set

    cfg = validate(RunConfig, {"sample": {"router_every": 3}})
    every = {name: drawn_with(cfg, named_set(name, 10), None)["router_every"]
             for name in ("monolith", "oracle", "top-2")}
    assert every == {"monolith": 1, "oracle": 1, "top-2": 3}


def test_a_set_drawn_with_the_same_settings_is_the_same_drawing_whatever_ddmkit_recorded():
    """Sets recorded before batch_size, adaptive steps or per-set network hashes were drawn again for nothing."""
    from ddmkit.pipeline.sampling import same_drawing

    now = {"n": 10, "steps": 8, "solver": "euler", "seed": 0, "guidance": 1.0, "router_every": 1,
           "roles": ["expert", "router"], "networks": "a" * 64, "batch_size": None}
    old = {k: v for k, v in now.items() if k not in ("roles", "networks", "batch_size")} | {"registry": "r" * 64}
    assert same_drawing(old, now, "r" * 64) and not same_drawing(old, now, "s" * 64)  # the registry since then
    assert same_drawing({k: v for k, v in now.items() if k != "batch_size"}, now, None)
    assert not same_drawing({**now, "batch_size": 64}, now, None) and not same_drawing({**now, "n": 9}, now, None)
    adaptive = {**now, "solver": "adaptive", "steps": None}
    assert same_drawing({**adaptive, "steps": 50}, adaptive, None)  # it chooses its own steps
    assert not same_drawing(None, now, None)


def test_a_set_records_the_device_and_autocast_it_was_drawn_with_and_the_report_and_metrics_say_them(
        monkeypatch, capsys, tmp_path, user_run):
    """samples/info.json said nothing of where a set was drawn, nor of the bfloat16 autocast image sets are drawn
    under on a GPU (their samples differ from float32 by its rounding). A set of an earlier ddmkit records
    neither, and is reported without them."""
    from ddmkit.pipeline.samplesets import named_set
    from ddmkit.pipeline.sampling import drawn_with, sampling_autocast

    run = Path(shutil.copytree(user_run, tmp_path / "run"))
    on_cpu = ("--device", "cpu")  # (the config's device is auto: a GPU where there is one)
    assert cli("sample", run, "--strategy", "top-2", "--strategy", "full", *on_cpu)[0] == 0
    made = json.loads((run / "samples" / "info.json").read_text())["top-2"]["drawn_with"]
    assert (made["device"], made["autocast"], made["noise_n"], made["n"]) == ("cpu", None, 100, 100)
    assert cli("evaluate", run, "--set", "evaluate.chunk=50")[0] == 0
    said = " ".join((run / "report.md").read_text().split())
    assert "100 samples, euler, 8 steps, the same noise (seed 0) for every set, on cpu without autocast." in said
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert {name: (rows[name]["device"], rows[name]["autocast"]) for name in ("top-2", "full")} == \
        {"top-2": ("cpu", None), "full": ("cpu", None)}
    assert cli("sample", run, "--strategy", "full", "--steps", 3, *on_cpu)[0] == 0
    assert cli("evaluate", run, "--set", "evaluate.chunk=50")[0] == 0
    said = " ".join((run / "report.md").read_text().split())
    assert "full: 100 samples, euler, 3 steps, seed 0" in said and "), all on cpu without autocast." in said, said

    infos = json.loads((run / "samples" / "info.json").read_text())  # as an earlier ddmkit recorded them
    for info in infos.values():
        for key in ("device", "autocast", "noise_n"):
            del info["drawn_with"][key]
    (run / "samples" / "info.json").write_text(json.dumps(infos))
    assert cli("evaluate", run, "--set", "evaluate.chunk=50")[0] == 0
    said = " ".join((run / "report.md").read_text().split())
    assert "full: 100 samples, euler, 3 steps, seed 0" in said and "autocast" not in said, said
    assert "device" not in json.loads((run / "metrics.json").read_text())["rows"]["top-2"]

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    on_gpu = {images: drawn_with(tiny(), named_set("top-2", 10), None, "cuda", images) for images in (True, False)}
    assert {images: (m["device"], m["autocast"]) for images, m in on_gpu.items()} == \
        {True: ("NVIDIA H100 80GB HBM3", "bfloat16"), False: ("NVIDIA H100 80GB HBM3", None)}
    assert sampling_autocast(True, "cpu") is None  # image sets on the CPU: float32


def test_a_set_drawn_on_another_device_or_autocast_is_kept_and_one_of_another_noise_draw_is_drawn_again(tmp_path,
                                                                                                        user_run):
    """Where a set was drawn (the device, and the autocast dtype that follows from it) does not change its law: a
    set drawn on a GPU, in float32 or under bfloat16, is kept where the CPU would draw it in float32 (a run
    copied to a machine without a GPU is not sampled again). An earlier ddmkit's record, which names neither,
    is kept; a record of another noise draw size is drawn again."""
    from ddmkit.pipeline.samplesets import named_set
    from ddmkit.pipeline.sampling import stage_sample

    run = Path(shutil.copytree(user_run, tmp_path / "run"))
    cfg, info_path, path = tiny(), run / "samples" / "info.json", run / "samples" / "top-2.safetensors"
    said: list[str] = []

    def sample() -> None:
        stage_sample(cfg, run, [named_set("top-2", 100)], False, said.append, "cpu")

    def recorded(**changes) -> None:  # the record of top-2 changed as another machine or ddmkit wrote it
        infos = json.loads(info_path.read_text())
        infos["top-2"]["drawn_with"].update(changes)
        infos["top-2"]["drawn_with"] = {k: v for k, v in infos["top-2"]["drawn_with"].items() if v != "absent"}
        info_path.write_text(json.dumps(infos))

    sample()
    drawn = path.read_bytes()
    recorded(device="NVIDIA H100 80GB HBM3")
    sample()
    assert path.read_bytes() == drawn and not [line for line in said if "replaces" in line], said
    recorded(autocast="bfloat16")
    sample()
    assert path.read_bytes() == drawn and not [line for line in said if "replaces" in line], said
    recorded(noise_n=1000)
    sample()
    assert "sample top-2: replaces the set drawn before (noise_n 1000 -> 100, autocast bfloat16 -> None, device " \
           "NVIDIA H100 80GB HBM3 -> cpu)" in said, said
    assert path.read_bytes() == drawn  # drawn again on the CPU: the same bytes
    said.clear()
    recorded(device="absent", autocast="absent", noise_n="absent")
    sample()
    assert path.read_bytes() == drawn and said == [], said  # kept: nothing drawn


def test_a_record_of_an_earlier_ddmkit_is_compared_and_described_on_what_it_records():
    """A set recorded before noise_n, autocast and device were is the same drawing where the rest agrees, and the
    message of its replacement names only what it recorded (not 'noise_n None -> 100, device None -> cpu')."""
    from ddmkit.pipeline.sampling import replaced_text, same_drawing

    now = {"n": 100, "noise_n": 100, "steps": 8, "solver": "euler", "seed": 0, "guidance": 1.0, "router_every": 1,
           "roles": ["expert", "router"], "networks": "a" * 64, "autocast": None, "device": "cpu"}
    old = {k: v for k, v in now.items() if k not in ("noise_n", "autocast", "device")}
    assert same_drawing(old, now, None) and not same_drawing({**old, "steps": 2}, now, None)
    assert replaced_text({**old, "steps": 2}, now) == "steps 2 -> 8"
    assert not same_drawing({**now, "noise_n": 90}, now, None)
    assert same_drawing({**now, "device": "NVIDIA H100 80GB HBM3", "autocast": "bfloat16"}, now, None)


def test_a_set_of_the_first_rows_of_the_noise_draw_is_the_set_its_record_names(tmp_path, user_run):
    """A set of sample.sweep_n rows takes the first rows of a noise draw of sample.n rows, and torch.randn's rows
    near the end of a draw depend on its size: after sample.n changed, such a set was kept (its n had not), though
    the noise now drawn for it differs. info.json records the draw's size (noise_n); a set of another is drawn
    again, and is then the set a run with the new sample.n draws."""
    from ddmkit.ddm import start_noise
    from ddmkit.io import load_tensors
    from ddmkit.pipeline.samplesets import named_set
    from ddmkit.pipeline.sampling import stage_sample

    assert not torch.equal(start_noise(37, (2,), 0)[:30], start_noise(40, (2,), 0)[:30])  # the last rows differ
    said: list[str] = []
    kept, fresh = Path(shutil.copytree(user_run, tmp_path / "kept")), Path(shutil.copytree(user_run, tmp_path / "new"))
    stage_sample(tiny(sample={"n": 37}), kept, [named_set("top-2", 30)], False, said.append, "cpu")
    stage_sample(tiny(sample={"n": 40}), kept, [named_set("top-2", 30)], False, said.append, "cpu")
    stage_sample(tiny(sample={"n": 40}), fresh, [named_set("top-2", 30)], False, QUIET, "cpu")
    assert torch.equal(load_tensors(kept / "samples" / "top-2.safetensors")["x"],
                       load_tensors(fresh / "samples" / "top-2.safetensors")["x"])
    assert "sample top-2: replaces the set drawn before (noise_n 37 -> 40)" in said, said
    assert json.loads((kept / "samples" / "info.json").read_text())["top-2"]["drawn_with"]["noise_n"] == 40


def test_evaluate_keeps_the_studies_measured_with_the_same_networks_data_and_settings(monkeypatch, capsys, tmp_path,
                                                                                       user_run):
    """The missing-expert and statistics-router studies were drawn again at every evaluate (most of its time).
    Kept, the statistics-only router's rows are reported in the order they are drawn: read back from
    metrics.json (keys sorted) they were reported full first, so a run resumed after a kill while writing
    report.md ended with another report than one never stopped."""
    run = Path(shutil.copytree(user_run, tmp_path / "run"))
    assert cli("sample", run, "--strategy", "top-2")[0] == 0
    code, err = cli("evaluate", run, "--set", "evaluate.chunk=50")
    assert code == 0 and "kept from" not in err, err
    first = json.loads((run / "metrics.json").read_text())
    assert first["missing_experts"] and first["stats_router"]["rows"]
    section = lambda: (run / "report.md").read_text().split("## Statistics-only router")[1]  # noqa: E731
    drawn = section()
    assert drawn.index("| top-1 (learned router) |") < drawn.index("| full (learned router) |")
    code, err = cli("evaluate", run, "--set", "evaluate.chunk=50")
    assert code == 0 and "studies: missing_experts, stats_router kept from" in " ".join(err.split()), err
    again = json.loads((run / "metrics.json").read_text())
    assert again["missing_experts"] == first["missing_experts"] and again["stats_router"] == first["stats_router"]
    assert section() == drawn
    code, err = cli("evaluate", run, "--set", "evaluate.chunk=40")  # another setting
    assert code == 0 and "kept from" not in err, err


def test_guidance_on_unconditional_experts_is_refused_before_anything_is_written(tmp_path):
    """A guidance sweep on unconditional experts drew identical sets under other names."""
    for field, value in (("guidance_sweep", [2.0]), ("guidance", 3.0)):
        with pytest.raises(DDMError, match=f"sample.{field}: classifier-free guidance needs class-conditional"):
            prepare_run_dir(tmp_path / "run", tiny(sample={field: value}), log=QUIET)
    assert list(tmp_path.iterdir()) == []


def test_unknown_or_non_finite_data_params_name_the_field_and_the_accepted_keywords(tmp_path):
    with pytest.raises(DDMError, match=r"data\.params\.radiuss: unknown keyword .*accepted: k, radius, std"):
        prepare_run_dir(tmp_path / "a", tiny(data={"params": {"radiuss": 3.0}}), log=QUIET)
    with pytest.raises(DDMError, match=r"data\.params\.radius: give a number from 0 to 1e\+06 \(it is nan\)"):
        prepare_run_dir(tmp_path / "b", tiny(data={"params": {"radius": float("nan")}}), log=QUIET)
    with pytest.raises(DDMError, match=r"data\.params\.noise"):
        prepare_run_dir(tmp_path / "c", tiny(data={"name": "moons", "params": {"noise": "lots"}}), log=QUIET)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["resize", "crop", "pad_to"])
@pytest.mark.parametrize("value, shown", [
    (0, "0"), (5000, "5000"), (2.5, "2.5"), (True, "true"),
    ("32", "'32', text: write the number unquoted in TOML and --set"), ("big", "'big', text")])
def test_an_image_loaders_whole_number_param_is_refused_in_one_wording(tmp_path, key, value, shown):
    """resize = 0 said 'a finite number in 1 .. 4096' and resize = "32" 'expected a whole number': one wording
    now, out of range or of another type, for every whole-number keyword of the image loaders."""
    for name in ("image_folder", "image_array"):
        with pytest.raises(DDMError, match=rf"^data\.params\.{key}: give a whole number from 1 to 4096 "
                                           rf"\(it is {re.escape(shown)}\)$"):
            load_dataset(name, 10, 10, params={"path": str(tmp_path), key: value})


def test_a_presets_own_seed_is_a_data_param(tmp_path):
    """data.params may set a preset's own `seed` (gmm32's truth), apart from data.seed."""
    run = prepare_run_dir(tmp_path / "run", tiny(data={"name": "gmm32", "params": {"seed": 3, "dim": 4}}),
                          log=QUIET)
    assert json.loads((run / "data" / "data.json").read_text())["data_shape"] == [4]


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    model = build_model("mlp", data_shape=[2], width=8, depth=1)
    save_pretrained(folder, model, {"role": "expert", "arch": "mlp", "data_shape": [2],
                                    "kwargs": {"data_shape": [2], "width": 8, "depth": 1}})
    return folder


def test_a_config_json_that_is_a_folder_is_a_clear_error(model_dir):
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").mkdir()
    with pytest.raises(DDMError, match=r"config\.json is a folder"):
        load_model(model_dir)


def test_a_config_json_asking_for_a_billion_layers_is_refused_at_once(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["kwargs"]["depth"] = 10**9  # would build for ever, even on the meta device
    (model_dir / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    with pytest.raises(DDMError, match="far larger than model.safetensors"):
        load_model(model_dir)
    assert time.perf_counter() - start < 10


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    save_tensors(folder / "model.safetensors", {k: change(k, v) for k, v in state.items()})


def test_nan_weights_are_refused_naming_the_file_and_the_tensor(model_dir):
    first = []
    _rewrite_weights(model_dir, lambda k, v: v.fill_(float("nan")) if not first and not first.append(k) else v)
    with pytest.raises(DDMError, match=rf"model\.safetensors: tensor '{first[0]}' holds NaN"):
        load_model(model_dir)


def test_weights_of_another_dtype_are_refused(model_dir):
    _rewrite_weights(model_dir, lambda k, v: v.to(torch.int8))
    with pytest.raises(DDMError, match="is I8 but the network's is F32"):
        load_model(model_dir)
    from ddmkit.nets import from_pretrained  # the loader behind load_model checks it too

    with pytest.raises(DDMError, match="torch.int8 but the network's is torch.float32"):
        from_pretrained(model_dir)


def _partition_folder(tmp_path) -> Path:
    train = ArrayData("x", torch.cat([torch.randn(40, 2), torch.randn(40, 2) + 6]))
    partition_data(train, 2, tmp_path / "partition")
    return tmp_path / "partition"


@pytest.mark.parametrize("patch, message", [
    ({"features": {"kind": "module", "path": "os:system"}}, "features"),
    ({"features": {"kind": "function", "function": "os.system('rm')"}}, r"features\.function"),
    ({"counts": [0, 0]}, r"counts\.0: Input should be greater than or equal to 1"),
    ({"counts": [-5, 85]}, r"counts\.0: Input should be greater than or equal to 1"),
    ({"counts": [1, 1]}, r"shards\[0\]\.count"),
])
def test_bad_manifests_are_refused_naming_the_field(tmp_path, patch, message):
    folder = _partition_folder(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **patch}))
    with pytest.raises(DDMError, match=message):
        load_partition_checked(folder)


def test_nan_centroids_are_refused(tmp_path):
    from safetensors.torch import load_file

    folder = _partition_folder(tmp_path)
    tensors = load_file(str(folder / "partition.safetensors"))
    tensors["centroids"][0, 0] = float("nan")
    save_tensors(folder / "partition.safetensors", tensors)
    with pytest.raises(DDMError, match="partition.safetensors: SHA-256 differs from the one manifest.json records"):
        load_partition_checked(folder)
    manifest = json.loads((folder / "manifest.json").read_text())  # the record made to agree: the values checked
    manifest["tensors_sha256"] = sha256_file(folder / "partition.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDMError, match="'centroids' holds NaN"):
        load_partition_checked(folder)


def test_registry_is_checked_before_any_network_is_built(user_run, tmp_path, monkeypatch):
    import ddmkit.nets.folders as nets
    import ddmkit.registry as registry

    run = tmp_path / "run"
    shutil.copytree(user_run, run)
    w = run / "experts" / "expert_01" / "model.safetensors"
    w.write_bytes((run / "experts" / "expert_00" / "model.safetensors").read_bytes())

    def refuse(*a, **k):
        raise AssertionError("a network was built before the registry check")
    monkeypatch.setattr(nets, "build_model", refuse)
    monkeypatch.setattr(registry, "build_model", refuse)
    with pytest.raises(DDMError, match="SHA-256 differs"):
        load_ddm(run)


def test_wrong_kind_paths_are_clear_errors(user_run, tmp_path, monkeypatch, capsys):
    from ddmkit.pipeline.run import sample_run
    from ddmkit.train.jobs import train_expert

    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(DDMError, match="is a file, not a folder"):
        write_json(file / "out.json", {})
    shard = user_run / "partition" / "shards" / "cluster_00.safetensors"
    with pytest.raises(DDMError, match="is a file"):
        train_expert(shard, tiny().expert, file)
    code, err = cli("run", TINY, "--out", file)
    assert code == 2 and "is a file" in err
    run = tmp_path / "run"
    shutil.copytree(user_run, run)
    shutil.rmtree(run / "samples", ignore_errors=True)
    (run / "samples").write_text("not a folder")
    with pytest.raises(DDMError, match="samples is a file"):
        sample_run(run, ["top-2"], log=QUIET)
    cfg = tiny(partition={"features": "tests.test_hardening:flat_features"})
    with pytest.raises(DDMError, match="samples is a file"):
        prepare_run_dir(run, cfg, log=QUIET)  # found before a run resumes, not at its last stage


# ----- 3. nothing written before the checks; one writer; stale temporary files ------------------
@pytest.mark.parametrize("case", ["k_too_large", "nan_param", "empty_array"])
def test_a_run_that_fails_its_checks_writes_nothing(tmp_path, case):
    if case == "k_too_large":
        cfg = tiny(partition={"k": 500})
    elif case == "nan_param":
        cfg = tiny(data={"params": {"std": float("nan")}})
    else:
        np.save(tmp_path / "empty.npy", np.zeros((0, 2), dtype=np.float32))
        cfg = tiny(data={"name": str(tmp_path / "empty.npy")})
    with pytest.raises(DDMError):
        run_pipeline(cfg, tmp_path / "run", log=QUIET)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DDMError):  # nor the folders above a run folder it made (--out runs/a/run)
        run_pipeline(cfg, tmp_path / "runs" / "a" / "run", log=QUIET)
    assert not (tmp_path / "runs").exists()


def test_a_config_edited_after_it_was_made_is_checked_before_anything_is_written(tmp_path):
    cfg = tiny()
    cfg.sample.n = 0  # pydantic does not check an assignment; run_pipeline checks the config again
    with pytest.raises(DDMError, match=r"sample\.n: Input should be greater than or equal to 1"):
        run_pipeline(cfg, tmp_path / "run", log=QUIET)
    assert not (tmp_path / "run").exists()


def test_a_config_by_path_or_built_in_name(tmp_path):
    from ddmkit.config import BUILTIN_CONFIGS, checked_config, load_config

    assert checked_config("demo") == load_config(BUILTIN_CONFIGS / "demo.toml") == load_config("demo")
    with pytest.raises(DDMError, match="no built-in config 'dmeo'.*accepted: demo"):
        checked_config("dmeo")
    with pytest.raises(DDMError, match="expected a RunConfig or a config file's path, got dict"):
        checked_config({"data": {}})


def test_a_network_that_cannot_be_built_is_found_before_anything_is_written(tmp_path):
    with pytest.raises(DDMError, match=r"expert\.net: arch: unknown architecture 'mlpp'"):
        run_pipeline(tiny(expert__net={"arch": "mlpp"}), tmp_path / "a", log=QUIET)
    with pytest.raises(DDMError, match=r"router\.net\.kwargs\.widht: .*; did you mean 'width'\?"):
        run_pipeline(tiny(router__net={"kwargs": {"widht": 8}}), tmp_path / "b", log=QUIET)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_config_with_force_leaves_the_old_run_as_it_was(tmp_path):
    run = prepare_run_dir(tmp_path / "run", tiny(), log=QUIET)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(DDMError, match="larger than the number of samples"):
        run_pipeline(tiny(partition={"k": 500}), run, force=True, log=QUIET)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


HOLDER = """
import sys, time
from ddmkit.io import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(RunFolder(run).lock)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(DDMError, match=rf"in use by process {holder.pid}\b"):
            run_pipeline(tiny(), run, log=QUIET)
        code, err = cli("run", TINY, "--out", run)
        assert code == 2 and f"in use by process {holder.pid}" in err
        with pytest.raises(DDMError, match=f"in use by process {holder.pid}"):  # `ddmkit launch`, train-router...
            stage_router(tiny(), run, QUIET)
        assert not RunFolder(run).config.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunFolder(run).lock.read_text().split()[0] == str(holder.pid)  # left behind by the killed holder
    prepare_run_dir(run, tiny(), log=QUIET)  # taken over
    assert RunFolder(run).config.exists() and not RunFolder(run).lock.exists()


def test_a_run_refuses_an_expert_folder_a_train_expert_job_holds_and_takes_a_dead_ones_over(tmp_path):
    """`ddmkit train-expert --out RUN/experts/expert_01` running while the run trains its experts: before, both
    trained into the folder. A killed run's expert locks (all of them) are taken over and removed by the next."""
    run = prepare_run_dir(tmp_path / "run", tiny(), log=QUIET)
    lock = RunFolder(run).expert(1).with_name(".expert_01.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(DDMError, match=rf"expert folder {RunFolder(run).expert(1)} is in use by process "
                                           rf"{holder.pid}\b"):
            stage_experts(tiny(), run, QUIET)
        assert sorted(p.name for p in RunFolder(run).experts.iterdir()) == [".expert_01.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    stage_experts(tiny(), run, QUIET)  # the dead holder's lock is taken over
    left = sorted(p.name for p in RunFolder(run).experts.iterdir())
    assert "expert_01" in left and not [name for name in left if name.endswith(".lock")], left


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    lock = tmp_path / "run" / ".lock"
    with folder_lock(lock):
        with folder_lock(lock):
            assert lock.read_text().split()[0] == str(os.getpid())
        assert lock.exists()
    assert not lock.exists()


def test_stale_temporary_files_are_removed_by_the_next_run(tmp_path):
    run = prepare_run_dir(tmp_path / "run", tiny(), log=QUIET)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [run / "experts" / ".expert_00.k3j2h1g0.tmp",                       # an older ddmkit's (no writer)
             run / "experts" / f".expert_01.{dead.pid}-{HOST}.a1b2c3d4.tmp",     # a writer that died
             run / f".config.json.{dead.pid}-{HOST}.zz9y8x7w.tmp"]
    live = [run / f".report.md.{os.getpid()}-{HOST}.q1w2e3r4.tmp",               # a live writer's
            run / "experts" / f".expert_02.{dead.pid}-ffffff.a1b2c3d4.tmp"]     # another machine's
    for p in stale[:2] + live[1:]:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "train_log.jsonl").write_text("{}\n")
    for p in stale[2:] + live[:1]:
        p.write_text("half")
    prepare_run_dir(run, tiny(), log=QUIET)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)
    killed = tmp_path / "killed"  # killed while writing its config.json: only that temporary is there
    (killed / f".config.json.{dead.pid}-{HOST}.zz9y8x7w.tmp").parent.mkdir()
    (killed / f".config.json.{dead.pid}-{HOST}.zz9y8x7w.tmp").write_text("half")
    prepare_run_dir(killed, tiny(), log=QUIET)
    assert not list(killed.glob(".*.tmp")) and (killed / "config.json").exists()


def test_a_folder_that_is_not_a_run_keeps_its_hidden_temporary_files(tmp_path):
    """Temporary names are a run folder's business: `--out` naming another folder is refused, and no file
    of it (nor of its subfolders) is removed first."""
    mine = [tmp_path / "notes.txt", tmp_path / ".draft.tmp", tmp_path / "sub" / ".cache.tmp"]
    for p in mine:
        p.parent.mkdir(exist_ok=True)
        p.write_text("mine")
    with pytest.raises(DDMError, match="is not a ddmkit run folder"):
        prepare_run_dir(tmp_path, tiny(), log=QUIET)
    assert all(p.read_text() == "mine" for p in mine)


def test_force_never_removes_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    """`ddmkit run CONFIG --out FOLDER --force` on a folder of the user's removed everything in it (the refusal
    without --force even offered --force). A config.json that is not a run's is not one either."""
    mine = tmp_path / "thesis"
    (mine / "figures").mkdir(parents=True)
    (mine / "thesis.tex").write_text("precious")
    (mine / "config.json").write_text('{"lr": 0.1}')  # another program's
    before = files_but_the_lock(mine)
    for force in (False, True):
        with pytest.raises(DDMError, match=rf"{mine} is not a ddmkit run folder and is not empty \(it holds "
                                           r"config.json, figures, thesis.tex\); .*--force replaces only a run it "
                                           r"wrote, never other files: choose another --out$"):
            prepare_run_dir(mine, tiny(), force=force, log=QUIET)
    for command in (["run", TINY], ["partition", "--config", TINY]):
        code, err = cli(*command, "--out", mine, "--force")
        assert code == 2 and "is not a ddmkit run folder and is not empty" in err, err
    assert files_but_the_lock(mine) == before and (mine / "figures").is_dir()
    prepare_run_dir(tmp_path / "run", tiny(), log=QUIET)  # a run ddmkit wrote is replaced with --force
    prepare_run_dir(tmp_path / "run", tiny(partition={"k": 3}), force=True, log=QUIET)


@pytest.mark.parametrize("command", ["evaluate", "sample", "register", "train-router", "train-monolith"])
def test_a_command_on_a_folder_that_is_not_a_run_says_so(tmp_path, monkeypatch, capsys, command):
    """`ddmkit evaluate CORPUS` said "no data yet; run ddmkit partition --out CORPUS" (writing into it), and
    `register` of a missing folder "no partition yet": each now names what the folder is."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text")
    code, err = cli(command, corpus)
    assert code == 2 and f"{corpus} is not a ddmkit run folder (no config.json); give the folder `ddmkit run` or " \
        "`ddmkit partition` wrote" in " ".join(err.split()), err
    code, err = cli(command, tmp_path / "nosuch")
    assert code == 2 and f"{tmp_path / 'nosuch'} is not a run folder (no such folder)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"] and [p.name for p in corpus.iterdir()] == ["a.txt"]


def test_an_interrupted_staged_write_leaves_no_folder_it_made(tmp_path):
    """Ctrl-C while `ddmkit distill` trained its first student left an empty RUN/students."""
    (tmp_path / "run").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(tmp_path / "run" / "students" / "dense") as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.rglob("*")] == ["run"]
    with staging_dir(tmp_path / "run" / "students" / "dense") as tmp:  # a write that finishes keeps them
        (tmp / "model.safetensors").write_text("whole")
    assert (tmp_path / "run" / "students" / "dense" / "model.safetensors").read_text() == "whole"


def test_staging_names_carry_the_writer(tmp_path):
    with staging_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.{os.getpid()}-{HOST}.") and tmp.name.endswith(".tmp")
    assert (tmp_path / "out").is_dir() and not tmp.exists()


def test_a_job_inside_a_staging_folder_checkpoints_under_a_staging_name_of_its_writer(tmp_path):
    """ddmkit add-expert trains into staging folders: a checkpoint beside one carries the same writer, so a
    killed writer's checkpoint is removed with its other leftovers (it was left for ever)."""
    from ddmkit.io import remove_stale_staging, stale_staging
    from ddmkit.train.jobs import checkpoint_path

    experts = tmp_path / "experts"
    assert checkpoint_path(experts / "expert_03") == experts / "expert_03.checkpoint.safetensors"
    with staging_dir(tmp_path / "router") as tmp:
        ckpt = checkpoint_path(tmp)
        ckpt.write_bytes(b"state")
        assert ckpt.parent == tmp.parent and ckpt.name.startswith(".router.checkpoint.safetensors.")
        assert ckpt.name.endswith(tmp.name.removeprefix(".router"))  # the same writer
        assert stale_staging(tmp_path) == []  # this writer is alive
        dead = ckpt.with_name(ckpt.name.replace(f".{os.getpid()}-", ".999999999-"))
        ckpt.rename(dead)
    assert stale_staging(tmp_path) == [dead] and remove_stale_staging(tmp_path) and not dead.exists()


def test_a_file_that_cannot_be_removed_is_named_by_its_whole_path(tmp_path, monkeypatch):
    """add-expert removes the old DDM's samples: a read-only RUN/samples was said as `Permission denied:
    top-1.safetensors` (shutil.rmtree names a file relative to the folder it empties); now by its whole path."""
    from ddmkit.pipeline.grow import clear_derived

    folder = RunFolder(tmp_path / "run")
    folder.samples.mkdir(parents=True)
    (folder.samples / "top-1.safetensors").write_bytes(b"x")
    unlink = os.unlink

    def read_only(path, *args, **kwargs):
        if Path(path).name == "top-1.safetensors":
            raise PermissionError(13, "Permission denied", path)
        return unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(PermissionError) as refused:
        clear_derived(folder, lambda m: None)
    assert refused.value.filename == str(folder.samples / "top-1.safetensors")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_a_killed_writer_not_yet_reaped_counts_as_gone(tmp_path):
    """A writer killed with SIGKILL stays a zombie until its parent reaps it: its staging is stale."""
    import ddmkit.io as io

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert io._alive(child.pid)
        child.kill()
        for _ in range(200):  # until the kernel has made it a zombie (not reaped: no wait() yet)
            if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert not io._alive(child.pid)
    finally:
        child.wait()


def test_a_plot_is_written_like_every_other_file(tmp_path, monkeypatch):
    """Through io.write_bytes_atomic, whose temporary name carries the writer (so a killed writer's is
    removed by the next run)."""
    import ddmkit.evaluation.plots as plots

    written = []
    monkeypatch.setattr(plots, "write_bytes_atomic", lambda path, data: written.append((path, data[:4])))
    fig = plots.pyplot().figure()
    plots.save_figure(fig, tmp_path / "plots" / "a.png")
    assert written == [(tmp_path / "plots" / "a.png", b"\x89PNG")] and not (tmp_path / "plots").exists()


# ----- 5. every training job runs on train.threads threads -------------------------------------
@pytest.fixture
def two_threads():
    """This process's torch on 2 threads (the default on a 2-core machine; conftest sets 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_train_expert_writes_the_inline_pipelines_bytes_on_any_thread_count(user_run, tmp_path, monkeypatch,
                                                                               capsys, two_threads):
    """`ddmkit train-expert` (a job by hand, a SLURM task) runs on train.threads (1) threads like every
    backend: from a process on 2 threads it writes the pipeline's expert byte for byte."""
    shard = user_run / "partition" / "shards" / "cluster_01.safetensors"
    code, err = cli("train-expert", shard, "--config", user_run / "config.json",
                    "--out", tmp_path / "expert")
    assert code == 0, err
    for name in ("model.safetensors", "config.json", "train_log.jsonl"):
        mine, ref = (tmp_path / "expert" / name).read_bytes(), (RunFolder(user_run).expert(1) / name).read_bytes()
        if name == "train_log.jsonl":  # the wall-clock seconds differ
            mine, ref = ([{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in t.splitlines()]
                         for t in (mine, ref))
        assert mine == ref, name
    assert torch.get_num_threads() == 2  # restored after the job


def test_every_process_of_a_job_trains_on_train_threads(user_run, tmp_path, monkeypatch, two_threads):
    """train_expert sets the count itself, so a DDP rank (spawned or started by torchrun, which calls it
    with its `dist`) trains on train.threads too: here a rank other than 0, in this process."""
    import ddmkit.train.jobs as jobs
    from ddmkit.train.distributed import Distributed

    seen = []
    monkeypatch.setattr(jobs, "fit", lambda *a, **k: seen.append(torch.get_num_threads()))
    cfg = tiny().expert
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": 3})})
    shard = user_run / "partition" / "shards" / "cluster_00.safetensors"
    jobs.train_expert(shard, cfg, tmp_path / "rank1", dist=Distributed(rank=1, world=1))
    assert seen == [3] and torch.get_num_threads() == 2


@pytest.mark.slow
def test_a_ddp_job_writes_the_same_bytes_whatever_the_callers_thread_count(user_run, tmp_path):
    """`train-expert --nproc 2` spawned from a process on 4 threads or on 2 (which were split between the
    processes before): every process trains on train.threads, so the same weights (2 jobs: about 12 s)."""
    from ddmkit.train.jobs import train_expert_ddp

    shard = user_run / "partition" / "shards" / "cluster_00.safetensors"
    before = torch.get_num_threads()
    try:
        for threads in (4, 2):
            torch.set_num_threads(threads)
            cfg = tiny().expert  # gloo on the CPU (two processes would need two GPUs where there is one)
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})})
            train_expert_ddp(shard, cfg, tmp_path / f"from_{threads}", nproc=2)
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "from_4" / "model.safetensors").read_bytes() == \
        (tmp_path / "from_2" / "model.safetensors").read_bytes()


# ----- 6. every writer holds the run lock -------------------------------------------------------
@contextlib.contextmanager
def held_lock(run: Path):
    """RUN/.lock held by another (live) process for the body; that process is killed after it, which
    leaves its lock file behind (a dead holder's)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(RunFolder(run).lock)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == b"held"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunFolder(run).lock.read_text().split()[0] == str(holder.pid)


def dead_holders_lock(run: Path) -> None:
    """RUN/.lock as a writer killed with SIGKILL leaves it: its process id, no process holding it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.mkdir(parents=True, exist_ok=True)
    RunFolder(run).lock.write_text(f"{dead.pid} {HOST}\n")


def files_but_the_lock(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def _analyze(run, **kw):
    from ddmkit.pipeline.analyze import analyze_run

    return analyze_run(run, log=QUIET, **{"strategies": ["top-2", "full", "switch"], "n": 16, "max_steps": 2,
                                          "jvp_rows": 4, "n_boot": 10, "n_heldout": 50, **kw})


def _sample(run):
    from ddmkit.pipeline.run import sample_run

    return sample_run(run, ["top-2"], log=QUIET)


def _evaluate(run):
    from ddmkit.pipeline.run import evaluate_run

    return evaluate_run(run, log=QUIET)


WRITERS = {  # every library call and command that writes a vector or image run folder
    "run_pipeline": lambda run: run_pipeline(tiny(), run, log=QUIET),
    "prepare_run_dir": lambda run: prepare_run_dir(run, tiny(), log=QUIET),
    "stage_experts": lambda run: stage_experts(tiny(), run, QUIET),
    "stage_monolith": lambda run: stage_monolith(tiny(), run, QUIET),
    "stage_router": lambda run: stage_router(tiny(), run, QUIET),
    "stage_registry": lambda run: stage_registry(tiny(), run, QUIET),
    "sample_run": _sample,
    "evaluate_run": _evaluate,
    "analyze_run": _analyze,
    "ddmkit run": lambda run: ["run", TINY, "--out", run],
    "ddmkit partition": lambda run: ["partition", "--config", TINY, "--out", run],
    "ddmkit launch": lambda run: ["launch", run],
    "ddmkit train-monolith": lambda run: ["train-monolith", run],
    "ddmkit train-router": lambda run: ["train-router", run],
    "ddmkit sample": lambda run: ["sample", run, "--strategy", "top-2"],
    "ddmkit evaluate": lambda run: ["evaluate", run],
    "ddmkit analyze": lambda run: ["analyze", run, "--n", "16"],
    "ddmkit register": lambda run: ["register", run],
    "ddmkit launch --emit slurm": lambda run: ["launch", run, "--emit", "slurm"],
}


@pytest.fixture(scope="module")
def locked_run(user_run, tmp_path_factory):
    """A copy of the trained run whose lock another live process holds: (run, its pid, its files)."""
    run = Path(shutil.copytree(user_run, tmp_path_factory.mktemp("locked") / "run"))
    with held_lock(run) as pid:
        yield run, pid, files_but_the_lock(run)


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_is_refused_while_another_process_holds_the_lock(locked_run, writer, monkeypatch, capsys):
    run, pid, before = locked_run
    if writer.startswith("ddmkit "):
        code, err = cli(*WRITERS[writer](run))
        assert code == 2 and f"in use by process {pid}" in err, err
    else:
        with pytest.raises(DDMError, match=rf"in use by process {pid}\b"):
            WRITERS[writer](run)
    assert files_but_the_lock(run) == before  # nothing written


@pytest.mark.parametrize("writer", [_sample, _evaluate, _analyze], ids=["sample", "evaluate", "analyze"])
def test_sample_evaluate_and_analyze_take_over_a_dead_holders_lock(user_run, tmp_path, writer):
    run = Path(shutil.copytree(user_run, tmp_path / "run"))
    saved = json.loads(RunFolder(run).config.read_text())  # small sample and evaluation settings
    saved["config"]["sample"].update(n=100, steps=2)
    saved["config"]["evaluate"].update(chunk=50)
    write_json(RunFolder(run).config, saved)
    if writer is _evaluate:
        _sample(run)
    dead_holders_lock(run)
    writer(run)
    assert not RunFolder(run).lock.exists()  # taken over, and released after


def test_results_get_the_permissions_of_a_plain_file_not_those_of_a_private_temporary(tmp_path, monkeypatch):
    import ddmkit.io

    for mask in (0o022, 0o077):
        monkeypatch.setattr(ddmkit.io, "UMASK", mask)
        write_json(tmp_path / f"r{mask}.json", {"a": 1})
        with staging_dir(tmp_path / f"d{mask}") as tmp:
            (tmp / "x").write_text("x")
        assert (tmp_path / f"r{mask}.json").stat().st_mode & 0o777 == 0o666 & ~mask
        assert (tmp_path / f"d{mask}").stat().st_mode & 0o777 == 0o777 & ~mask
    assert ddmkit.io._process_umask() == ddmkit.io._process_umask()  # reading the mask leaves it as it was


@pytest.mark.parametrize("make", ["open", "mkdir"])
def test_a_signal_while_the_temporary_is_made_leaves_nothing_behind(tmp_path, monkeypatch, make):
    """Ctrl-C or SIGTERM (KeyboardInterrupt) landing just after the temporary file or folder was made,
    before its name was known, left it behind: a rank stopped mid-checkpoint left `.NAME....tmp`."""
    real = getattr(os, make)

    def made_then_interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, make, made_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        if make == "open":
            write_json(tmp_path / "r.json", {"a": 1})
        else:
            with staging_dir(tmp_path / "d"):
                pass
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


class NoWeights(torch.nn.Module):
    """A velocity with nothing to train."""

    def __init__(self, data_shape):
        super().__init__()

    def forward(self, x, t, y=None):
        return -x


def test_a_network_with_nothing_to_train_is_refused_before_any_write(tmp_path):
    with pytest.raises(DDMError, match="builds a network with no trainable parameters"):
        run_pipeline(tiny(expert__net={"arch": "tests.test_hardening:NoWeights", "kwargs": {}}), tmp_path / "run",
                     log=QUIET)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, words", [({"width": 0}, r"expert\.net: 'mlp' with kwargs \{'width': 0\} builds a "
                                                          r"network with layers with no weights"),
                                           ({"depth": -3}, r"depth = -3: the number of residual blocks is 0 or more")])
def test_a_network_with_empty_layers_or_a_negative_depth_is_refused_before_any_write(tmp_path, kwargs, words):
    with pytest.raises(DDMError, match=words):
        run_pipeline(tiny(expert__net={"kwargs": kwargs}), tmp_path / "run", log=QUIET)
    assert not (tmp_path / "run").exists()


def test_a_broken_samples_info_says_to_delete_it(tmp_path):
    """`ddmkit sample` fails on a broken info.json as every command does: the fix is to delete it (the sets
    are drawn again), not to re-create it with the command that fails."""
    from ddmkit.pipeline.sampling import read_info

    folder = RunFolder(tmp_path)
    folder.sample_info.parent.mkdir(parents=True)
    folder.sample_info.write_text("{not json")
    with pytest.raises(DDMError, match=r"info\.json is not valid JSON .*; delete it \(the sets are drawn again"):
        read_info(folder)
