"""Checkpoints and bit-for-bit resume, including a real SIGKILL mid-run."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig, NetConfig, PathConfig, TrainConfig
from ddmkit.errors import DDMError
from ddmkit.io import read_metadata, save_tensors
import ddmkit.train.jobs as jobs
from ddmkit.train.jobs import checkpoint_path, train_expert


def _shard(path: Path, n: int = 300) -> Path:
    g = torch.Generator().manual_seed(1)
    save_tensors(path, {"x": torch.randn(n, 2, generator=g) + 3.0}, {"cluster": 0, "k": 1})
    return path


def _cfg(steps=40, every=10, seed=0) -> ExpertConfig:
    return ExpertConfig(net=NetConfig(arch="mlp", kwargs={"width": 16, "depth": 1}),
                        train=TrainConfig(steps=steps, batch_size=32, warmup=5, log_every=7, seed=seed,
                                          checkpoint_every=every, device="cpu"))


def _bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def _log(folder: Path) -> str:
    """train_log.jsonl with its one wall-clock field masked (the only value that differs between runs)."""
    return re.sub(r'"seconds": [0-9.e+-]+', '"seconds": 0', (folder / "train_log.jsonl").read_text())


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    shard = _shard(tmp_path / "shard.safetensors")
    ref = train_expert(shard, _cfg(), tmp_path / "ref")
    assert not checkpoint_path(tmp_path / "ref").exists()  # removed once the folder is written

    with monkeypatch.context() as m:
        _crash_after(m, 25)
        with pytest.raises(KeyboardInterrupt):
            train_expert(shard, _cfg(), tmp_path / "b")
    assert not (tmp_path / "b").exists()  # no partial output folder
    assert read_metadata(checkpoint_path(tmp_path / "b"))["step"] == 20
    out = train_expert(shard, _cfg(), tmp_path / "b", resume=True)
    assert _bytes(out) == _bytes(ref)
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    assert _log(out) == _log(ref)  # the same rows, keys in the same order, byte for byte (seconds aside)
    assert _log(out).count("\n") == 6


def _crash_after(monkeypatch, n: int) -> None:
    """Make the (n+1)-th loss evaluation raise, as a crash would."""
    real, calls = jobs.flow_matching_loss, {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(jobs, "flow_matching_loss", loss)


def test_checkpoint_of_other_settings_or_format_is_refused(tmp_path, monkeypatch):
    shard = _shard(tmp_path / "shard.safetensors")
    with monkeypatch.context() as m:
        _crash_after(m, 15)
        with pytest.raises(KeyboardInterrupt):
            train_expert(shard, _cfg(), tmp_path / "a")
    with pytest.raises(DDMError, match="different training run"):
        train_expert(shard, _cfg(seed=1), tmp_path / "a", resume=True)
    wider = _cfg().model_copy(update={"net": NetConfig(arch="mlp", kwargs={"width": 24, "depth": 1})})
    with pytest.raises(DDMError, match=r"another network: parameter shapes differ \(.*\[16, .*asked \[24, "):
        train_expert(shard, wider, tmp_path / "a", resume=True)  # the shapes named, not only "another network"
    save_tensors(checkpoint_path(tmp_path / "c"), {"x": torch.zeros(1)}, {"format": "other"})
    with pytest.raises(DDMError, match="not a ddmkit checkpoint"):
        train_expert(shard, _cfg(), tmp_path / "c", resume=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# ----- the fingerprint: what is trained, not how the job runs ----------------------------------------------------

DIT = NetConfig(arch="dit", kwargs={"patch": 1, "width": 16, "depth": 1, "heads": 2, "num_classes": 3})
VP = PathConfig(kind="vp")


def _labelled_shard(path: Path, n: int = 200) -> Path:
    g = torch.Generator().manual_seed(1)
    save_tensors(path, {"x": torch.randn(n, 2, 4, 4, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)},
                 {"cluster": 0, "k": 1})
    return path


def _cut_short(monkeypatch, shard: Path, config: ExpertConfig, out: Path, n: int = 15) -> None:
    """A job killed after n loss evaluations, leaving its checkpoint (every 10 steps)."""
    with monkeypatch.context() as m:
        _crash_after(m, n)
        with pytest.raises(KeyboardInterrupt):
            train_expert(shard, config, out)
    assert checkpoint_path(out).exists()


@pytest.mark.parametrize("made, asked, named", [
    ({}, {"prediction": "x0"}, "prediction ('velocity', asked 'x0')"),
    ({}, {"path": VP, "prediction": "epsilon"}, "path.kind ('linear', asked 'vp'), prediction ('velocity', asked "
                                                "'epsilon')"),
    ({"path": VP, "prediction": "v"}, {"path": PathConfig(kind="vp", schedule="cosine"), "prediction": "v"},
     "path.schedule ('linear', asked 'cosine')"),
    ({"path": VP, "prediction": "v"}, {"path": PathConfig(kind="vp", steps=500), "prediction": "v"},
     "path.steps (1000, asked 500)"),
    ({"net": DIT, "label_dropout": 0.1}, {"net": DIT, "label_dropout": 0.3}, "label_dropout (0.1, asked 0.3)"),
])
def test_a_checkpoint_of_another_path_prediction_or_label_dropout_is_refused_naming_the_field(
        tmp_path, monkeypatch, made, asked, named):
    """`train-expert --resume --set expert.prediction=x0` continued a velocity job's checkpoint (the loss jumped;
    the expert said x0 but had trained most of its steps as velocity): the fingerprint held [expert.train] alone."""
    shard = (_labelled_shard if "net" in made else _shard)(tmp_path / "shard.safetensors")
    config = _cfg().model_copy(update=made)
    _cut_short(monkeypatch, shard, config, tmp_path / "e")
    with pytest.raises(DDMError, match=rf"different training run: other settings: {re.escape(named)}\. Delete it to "
                                       "train this job from the start, or train into another folder"):
        train_expert(shard, config.model_copy(update=asked), tmp_path / "e", resume=True)
    assert not (tmp_path / "e").exists() and checkpoint_path(tmp_path / "e").exists()  # kept, as it was


def test_how_a_job_runs_may_change_when_it_resumes(tmp_path, monkeypatch):
    """device, threads, log_every, checkpoint_every and parallel (train.jobs.EXECUTION) are not what is trained:
    a checkpoint continues under others (before, threads and log_every were refused)."""
    shard = _shard(tmp_path / "shard.safetensors")
    ref = train_expert(shard, _cfg(), tmp_path / "ref")
    # "auto" is the CPU here unless there is a GPU (a CPU checkpoint cannot continue there: its own test)
    elsewhere = {"device": "cpu" if torch.cuda.is_available() else "auto", "log_every": 5, "checkpoint_every": 15,
                 "parallel": "fsdp"}
    for name, runs_otherwise in (("a", elsewhere), ("b", {"threads": 2})):
        _cut_short(monkeypatch, shard, _cfg(), tmp_path / name, 25)
        config = _cfg().model_copy(update={"train": _cfg().train.model_copy(update=runs_otherwise)})
        calls, real = [], jobs.flow_matching_loss

        def counted(*a, **k):
            calls.append(1)
            return real(*a, **k)

        with monkeypatch.context() as m:
            m.setattr(jobs, "flow_matching_loss", counted)
            out = train_expert(shard, config, tmp_path / name, resume=True)
        assert len(calls) == 40 - 20  # continued from the checkpoint's step 20
    assert _bytes(tmp_path / "a") == _bytes(ref)  # threads may change float rounding; the rest changes nothing
    assert out.is_dir()


def test_a_checkpoint_of_an_earlier_ddmkit_is_refused_saying_what_to_do(tmp_path, monkeypatch):
    """A checkpoint written before the fingerprint recorded the network, path, prediction and label_dropout
    cannot show which it trained with: refused (not a crash), with the fix."""
    from ddmkit.io import load_tensors

    shard = _shard(tmp_path / "shard.safetensors")
    _cut_short(monkeypatch, shard, _cfg(), tmp_path / "e")
    path = checkpoint_path(tmp_path / "e")
    meta, tensors = read_metadata(path), load_tensors(path)
    fp = meta["fingerprint"]
    meta["fingerprint"] = {"settings": {**fp["config"]["train"], "threads": 1, "log_every": 7}, "network": fp["network"],
                           "job": fp["job"], "data": fp["data"]}  # as ddmkit wrote it before
    save_tensors(path, tensors, meta)
    with pytest.raises(DDMError, match=r"belongs to a different training run: it was written by another version of "
                                       r"ddmkit\. Delete it to train this job from the start"):
        train_expert(shard, _cfg(), tmp_path / "e", resume=True)


def test_a_checkpoint_of_a_gpu_job_resumed_on_the_cpu_names_the_device(tmp_path, monkeypatch):
    """The batch generator of a GPU job (a 16-byte Philox state) cannot continue on a CPU generator: the
    resume failed as "incomplete or damaged; delete it", which it is not."""
    from ddmkit.io import load_tensors

    shard = _shard(tmp_path / "shard.safetensors")
    _cut_short(monkeypatch, shard, _cfg(), tmp_path / "g")
    path = checkpoint_path(tmp_path / "g")
    meta, tensors = read_metadata(path), load_tensors(path)
    tensors["rng.batches"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA generator's state is saved
    save_tensors(path, tensors, meta)
    with pytest.raises(DDMError, match=r"written by a job training on a GPU, and its batch draws cannot continue on "
                                       r"cpu: .*--set expert\.train\.device=cuda"):
        train_expert(shard, _cfg(), tmp_path / "g", resume=True)


def test_checkpoint_is_safetensors_with_every_state(tmp_path, monkeypatch):
    """One safetensors file: model, EMA, optimizer moments, RNG states; the rest JSON."""
    from safetensors.torch import load_file

    from ddmkit.train.checkpoint import FORMAT

    shard = _shard(tmp_path / "shard.safetensors")
    _crash_after(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        train_expert(shard, _cfg(), tmp_path / "e")
    path = checkpoint_path(tmp_path / "e")
    meta = read_metadata(path)
    assert meta["format"] == FORMAT and meta["step"] == 10 and "param_groups" in meta["optimizer"]
    keys = set(load_file(str(path)))
    assert {"rng.cpu", "rng.batches"} <= keys
    assert any(k.startswith("optim.") for k in keys) and any(k.startswith("ema.") for k in keys)


def _gpus_visible(monkeypatch, count: int) -> None:
    """This machine as one with `count` GPUs for the checkpoints' RNG code (CUDA initialised; restoring more GPU
    states than there are GPUs raises IndexError, as torch.cuda.set_rng_state_all does)."""
    def set_all(states):
        if len(states) > count:
            raise IndexError("tuple index out of range")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)] * count)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)


def test_a_cpu_jobs_checkpoint_holds_no_cuda_state_on_a_machine_with_gpus(tmp_path, monkeypatch):
    """A CPU job saved every visible GPU's RNG state where CUDA was up (rng.cuda.0, ...): its checkpoint then
    differed from the same job's on another machine (and from an FSDP job's on the CPU)."""
    from safetensors.torch import load_file

    shard = _shard(tmp_path / "shard.safetensors")
    _gpus_visible(monkeypatch, 2)
    _cut_short(monkeypatch, shard, _cfg(), tmp_path / "e")
    assert not [k for k in load_file(str(checkpoint_path(tmp_path / "e"))) if k.startswith("rng.cuda")]


def test_a_checkpoint_holding_more_gpus_rng_states_than_are_visible_resumes(tmp_path, monkeypatch):
    """A checkpoint of earlier ddmkit holds every GPU's state its machine had (8 here); resumed where one GPU is
    visible, restoring them all was an uncaught IndexError. States a job does not use are ignored."""
    from ddmkit.io import load_tensors

    shard = _shard(tmp_path / "shard.safetensors")
    ref = train_expert(shard, _cfg(), tmp_path / "ref")
    _cut_short(monkeypatch, shard, _cfg(), tmp_path / "b", n=25)
    path = checkpoint_path(tmp_path / "b")
    meta, tensors = read_metadata(path), load_tensors(path)
    save_tensors(path, {**tensors, **{f"rng.cuda.{i}": torch.zeros(16, dtype=torch.uint8) for i in range(8)}}, meta)
    _gpus_visible(monkeypatch, 1)
    out = train_expert(shard, _cfg(), tmp_path / "b", resume=True)
    assert _bytes(out) == _bytes(ref) and _log(out) == _log(ref)


class _GpuGenerator:
    """A batch generator on GPU `index` (only what the checkpoint's RNG code reads of one)."""

    def __init__(self, index: int):
        self.device, self.state = torch.device("cuda", index), torch.arange(16, dtype=torch.uint8)

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


def test_a_gpu_job_saves_and_restores_the_rng_of_its_own_gpu_only(monkeypatch):
    from ddmkit.train.checkpoint import restore_rng, rng_tensors

    states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(4)}
    restored = []
    _gpus_visible(monkeypatch, 4)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    saved = rng_tensors(_GpuGenerator(2))
    assert sorted(saved) == ["rng.batches", "rng.cpu", "rng.cuda"] and torch.equal(saved["rng.cuda"], states[2])

    restore_rng(saved, _GpuGenerator(0))  # resumed on another GPU (e.g. one process of fewer): its own GPU's RNG
    assert [(torch.equal(s, states[2]), d) for s, d in restored] == [(True, torch.device("cuda", 0))]
    restored.clear()
    earlier = {"rng.cpu": saved["rng.cpu"], "rng.batches": saved["rng.batches"],  # earlier ddmkit: every GPU's
               **{f"rng.cuda.{i}": state for i, state in states.items()}}
    restore_rng(earlier, _GpuGenerator(1))
    assert [(torch.equal(s, states[1]), d) for s, d in restored] == [(True, torch.device("cuda", 1))]
    restored.clear()
    restore_rng(earlier, _GpuGenerator(5))  # no state of that GPU: its RNG is left as seeded
    restore_rng({**earlier, "rng.batches": torch.Generator().get_state()}, torch.Generator())  # a CPU job's
    assert restored == []


SCRIPT = """
import sys, time, torch
import ddmkit.train.jobs as jobs
from ddmkit.config import ExpertConfig, NetConfig, TrainConfig
from ddmkit.train.jobs import train_expert
torch.set_num_threads(1)
real = jobs.flow_matching_loss
def slow(*a, **k):  # 5 ms a step, so the test can kill it mid-run on any machine
    time.sleep(0.005)
    return real(*a, **k)
jobs.flow_matching_loss = slow
cfg = ExpertConfig(net=NetConfig(arch="mlp", kwargs={"width": 16, "depth": 1}),
                   train=TrainConfig(steps=int(sys.argv[3]), batch_size=32, warmup=5, log_every=7,
                                     checkpoint_every=10, device="cpu"))
train_expert(sys.argv[1], cfg, sys.argv[2], resume=sys.argv[4] == "1")
"""


def _train_proc(shard, out, steps, resume):
    env = {**os.environ, "DDMKIT_QUIET": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(shard), str(out), str(steps), str(int(resume))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_mid_run_then_resume_gives_same_weights(tmp_path):
    """A real signal: SIGKILL once a checkpoint exists, resume, compare bytes."""
    shard = _shard(tmp_path / "shard.safetensors")
    steps = 300
    out = tmp_path / "killed"
    proc = _train_proc(shard, out, steps, False)
    ckpt = checkpoint_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and read_metadata(ckpt).get("step", 0) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_metadata(ckpt)["step"]
    assert 0 < killed_at < steps and not out.exists()
    assert list(tmp_path.glob(".killed.*.tmp"))  # the killed writer's staging folder, left behind

    resumed = _train_proc(shard, out, steps, True)
    reference = _train_proc(shard, tmp_path / "reference", steps, False)
    for p in (resumed, reference):
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-800:]
    assert _bytes(out) == _bytes(tmp_path / "reference")
    assert _log(out) == _log(tmp_path / "reference")
    assert not ckpt.exists()
    assert not list(tmp_path.glob(".*.tmp"))  # removed by the resumed writer


# ----- a resumed run whose RUN/data/ lost a file ---------------------------------------------------------------

def _tiny_run(run: Path, *overrides: str) -> tuple[Path, object]:
    """A tiny run's data and partition (nothing trained): (run folder, its config)."""
    from ddmkit.config import RunConfig, apply_overrides, load_config
    from ddmkit.pipeline.prepare import prepare_run_dir

    raw = apply_overrides(load_config(Path(__file__).parent / "configs" / "tiny.toml").model_dump(), list(overrides))
    cfg = RunConfig.model_validate(raw)
    return prepare_run_dir(run, cfg, log=lambda m: None), cfg


@pytest.mark.parametrize("lost", [["test.safetensors"], ["truth.safetensors"], ["data.json", "train.safetensors"]])
def test_a_resumed_run_makes_lost_data_files_again_byte_for_byte(tmp_path, lost):
    """RUN/data/test.safetensors or truth.safetensors deleted (before: `ddmkit run` drew every sample set, then
    failed for the test split; the exact-truth scores were dropped silently), or data.json and the train split:
    `ddmkit run` / `ddmkit partition` on the run make the data again, the same bytes as before."""
    from ddmkit.pipeline.prepare import prepare_run_dir

    run, cfg = _tiny_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    assert sorted(before) == ["data.json", "test.safetensors", "train.safetensors", "truth.safetensors"]
    for name in lost:
        (run / "data" / name).unlink()
    said = []
    prepare_run_dir(run, cfg, log=said.append)
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == before
    assert any("missing; made again from the config" in line for line in said), said


def test_a_lost_truth_is_an_error_naming_the_file_and_the_fix(tmp_path):
    from ddmkit.ddm.load import load_truth

    run, _ = _tiny_run(tmp_path / "run")
    assert load_truth(run) is not None
    (run / "data" / "truth.safetensors").unlink()
    with pytest.raises(DDMError, match=r"truth\.safetensors is missing, but .*data\.json records an exact truth; "
                                       r"make it again with `ddmkit partition --out .* --config .*config\.json`"):
        load_truth(run)


def test_data_that_the_config_no_longer_makes_are_not_made_again(tmp_path):
    """A run of a .npy file that changed since: its lost test split is refused (nothing written), not made
    from other data than the partition's."""
    import numpy as np

    from ddmkit.pipeline.prepare import prepare_run_dir

    array = tmp_path / "points.npy"
    np.save(array, np.random.default_rng(0).normal(size=(1000, 2)).astype(np.float32))
    run, cfg = _tiny_run(tmp_path / "run", f"data.name={array}", "data.params.test_fraction=0.5", "sample.n=200",
                         "sample.strategies=['full']")
    (run / "data" / "test.safetensors").unlink()
    np.save(array, np.random.default_rng(1).normal(size=(1000, 2)).astype(np.float32))
    with pytest.raises(DDMError, match=r"data/test\.safetensors missing, and the data the config makes now are not "
                                       r"those .*manifest\.json was made of"):
        prepare_run_dir(run, cfg, log=lambda m: None)
    assert sorted(p.name for p in (run / "data").iterdir()) == ["data.json", "train.safetensors"]


def test_a_corrupt_checkpoint_says_delete_it_and_one_not_resumed_is_noted(tmp_path, monkeypatch):
    """A damaged checkpoint said "re-create it" (a checkpoint cannot be); train-expert without --resume replaced
    a checkpoint a killed run left without a word."""
    from ddmkit.train.jobs import train_expert_once

    shard = _shard(tmp_path / "shard.safetensors")
    checkpoint_path(tmp_path / "a").write_bytes(b"not a checkpoint")
    with pytest.raises(DDMError, match=r"corrupt or not a safetensors file .*; a checkpoint cannot be made again: "
                                       r"delete it to train this job from the start"):
        train_expert(shard, _cfg(), tmp_path / "a", resume=True)
    with monkeypatch.context() as m:
        _crash_after(m, 15)
        with pytest.raises(KeyboardInterrupt):
            train_expert(shard, _cfg(), tmp_path / "b")
    said = []
    assert train_expert_once(shard, _cfg(), tmp_path / "b", log=said.append)
    assert said == [f"note: {checkpoint_path(tmp_path / 'b')} is not continued (no --resume): this job trains from "
                    "the start and replaces it"]
    said.clear()
    assert train_expert_once(shard, _cfg(), tmp_path / "c", log=said.append) and said == []  # no checkpoint, no note
    with monkeypatch.context() as m:  # with --resume it says that it continues, as run and launch do
        _crash_after(m, 15)
        with pytest.raises(KeyboardInterrupt):
            train_expert(shard, _cfg(), tmp_path / "d")
    assert train_expert_once(shard, _cfg(), tmp_path / "d", resume=True, log=said.append)
    assert said == [f"{tmp_path / 'd'}: continuing from {checkpoint_path(tmp_path / 'd')}"]


@pytest.mark.parametrize("command", ["sample", "evaluate", "analyze"])
def test_sample_evaluate_and_analyze_remove_what_killed_writers_left(tmp_path, command):
    """A killed `ddmkit sample` leaves RUN/samples/.NAME.PID-HOST.R.tmp; only `ddmkit run` removed such files.
    sample, evaluate and analyze remove them too (here on a run with no networks yet, so the command then
    stops), and leave a live writer's."""
    import os
    import subprocess

    from ddmkit.io import HOST
    from ddmkit.pipeline.run import evaluate_run, sample_run

    run, _ = _tiny_run(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [run / "samples" / f".top-1.safetensors.{dead.pid}-{HOST}.a1b2c3d4.tmp", run / ".x.k3j2h1g0.tmp"]
    live = run / "samples" / f".full.safetensors.{os.getpid()}-{HOST}.q1w2e3r4.tmp"
    for path in [*stale, live]:
        path.parent.mkdir(exist_ok=True)
        path.write_text("half")
    said = []
    from ddmkit.pipeline.analyze import analyze_run

    calls = {"sample": (lambda: sample_run(run, ["top-1"], log=said.append), "no expert is present"),
             "evaluate": (lambda: evaluate_run(run, log=said.append), "no samples yet, and no expert is trained"),
             "analyze": (lambda: analyze_run(run, log=said.append), "is not trained yet")}
    call, refusal = calls[command]
    with pytest.raises(DDMError, match=refusal):
        call()
    assert not any(p.exists() for p in stale) and live.exists()
    assert said == [f"{run}: removed 2 temporary files or folders left by an interrupted run"]
