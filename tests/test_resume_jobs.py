"""Resume of every training job (expert, monolith, router): bit-exact, and only on the same data."""
import re
import shutil
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig, NetConfig, PathConfig, RouterConfig, TrainConfig, load_config
from ddmkit.errors import DDMError
from ddmkit.io import read_json, read_metadata, save_tensors, sha256_file
from ddmkit.layout import RunFolder
from ddmkit.pipeline.stages import stage_data, stage_monolith, stage_partition, stage_router
from ddmkit.train.jobs import checkpoint_path, train_expert, train_monolith, train_router

from conftest import HAS_RAY
from test_resume import _bytes, _log, _tiny_run

TINY = Path(__file__).parent / "configs" / "tiny.toml"


def _shard(path, seed: int):
    g = torch.Generator().manual_seed(seed)
    save_tensors(path, {"x": torch.randn(200, 2, generator=g) + 3.0 * seed}, {"cluster": 0, "k": 2})
    return path


def _train(steps=40) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=32, warmup=5, log_every=7, checkpoint_every=10, device="cpu")


EXPERT = ExpertConfig(net=NetConfig(arch="mlp", kwargs={"width": 16, "depth": 1}), train=_train(20))
ROUTER = RouterConfig(net=NetConfig(arch="router_mlp", kwargs={"width": 16, "depth": 1}), train=_train())
JOBS = {"expert": lambda shards, out: train_expert(shards[0], EXPERT, out, resume=True),
        "monolith": lambda shards, out: train_monolith(shards, EXPERT, out),  # resumes by default, as `run` does
        "router": lambda shards, out: train_router(shards, ROUTER, out)}


def _crash_after(monkeypatch, n: int) -> dict:
    """Make the (n+1)-th loss evaluation of any job raise, as a crash would; returns the count of calls."""
    import ddmkit.train.jobs as jobs

    calls = {"n": 0}

    def crashing(real):
        def loss(*a, **k):
            calls["n"] += 1
            if calls["n"] > n:
                raise KeyboardInterrupt("simulated crash")
            return real(*a, **k)
        return loss

    monkeypatch.setattr(jobs, "flow_matching_loss", crashing(jobs.flow_matching_loss))
    monkeypatch.setattr(jobs, "router_loss", crashing(jobs.router_loss))
    return calls


@pytest.mark.parametrize("job", JOBS)
def test_a_checkpoint_written_on_other_data_is_refused_naming_the_data(tmp_path, monkeypatch, job):
    a, b = _shard(tmp_path / "a.safetensors", 1), _shard(tmp_path / "b.safetensors", 2)
    out = tmp_path / "job"
    with monkeypatch.context() as m:
        _crash_after(m, 15)
        with pytest.raises(KeyboardInterrupt):
            JOBS[job]([a, b], out)
    assert read_metadata(checkpoint_path(out))["step"] == 10
    with pytest.raises(DDMError, match="different training run: other training data") as err:
        JOBS[job]([b, a], out)  # the other shard (expert), or the same shards in another order
    assert sha256_file(a)[:12] in str(err.value) and sha256_file(b)[:12] in str(err.value)
    assert "settings" not in str(err.value) and "Delete it" in str(err.value) and not out.exists()
    checkpoint_path(out).unlink()  # the fix the message names: this job then trains from the start
    assert _bytes(JOBS[job]([b, a], out)) == _bytes(JOBS[job]([b, a], tmp_path / "clean"))


@pytest.mark.parametrize("asked, named", [
    ({"prediction": "x0"}, "prediction ('velocity', asked 'x0')"),
    ({"path": PathConfig(kind="vp", schedule="cosine"), "prediction": "v"},
     "path.kind ('linear', asked 'vp'), path.schedule ('linear', asked 'cosine'), prediction ('velocity', asked 'v')"),
])
def test_a_checkpoint_of_another_prediction_or_path_is_refused_for_the_monolith(tmp_path, monkeypatch, asked, named):
    """The monolith trains with the [expert] section as the experts do: its checkpoint records the same settings."""
    shards, out = [_shard(tmp_path / "a.safetensors", 1), _shard(tmp_path / "b.safetensors", 2)], tmp_path / "monolith"
    with monkeypatch.context() as m:
        _crash_after(m, 15)
        with pytest.raises(KeyboardInterrupt):
            train_monolith(shards, EXPERT, out)
    with pytest.raises(DDMError, match=rf"different training run: other settings: {re.escape(named)}\. Delete it"):
        train_monolith(shards, EXPERT.model_copy(update=asked), out)
    assert read_metadata(checkpoint_path(out))["step"] == 10 and not out.exists()


@pytest.fixture(scope="module")
def tiny_partition(tmp_path_factory):
    """A run folder with data and partition (k = 4), and its config with checkpoints every 10 steps."""
    cfg = load_config(TINY)
    cfg = cfg.model_copy(update={"expert": cfg.expert.model_copy(update={"train": _train(20)}),
                                 "router": cfg.router.model_copy(update={"train": _train()})})
    run = tmp_path_factory.mktemp("resume_jobs") / "run"
    stage_data(cfg, run, log=lambda m: None)
    stage_partition(cfg, run, log=lambda m: None)
    return cfg, run


@pytest.mark.parametrize("stage, name", [(stage_monolith, "monolith"), (stage_router, "router")])
def test_a_killed_monolith_or_router_stage_resumes_to_the_same_bytes(tiny_partition, tmp_path, monkeypatch,
                                                                     stage, name):
    cfg, base = tiny_partition
    ref, run = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(base, ref)
    shutil.copytree(base, run)
    stage(cfg, ref, log=lambda m: None)
    with monkeypatch.context() as m:
        _crash_after(m, 25)
        with pytest.raises(KeyboardInterrupt):
            stage(cfg, run, log=lambda m: None)
    folder = getattr(RunFolder(run), name)
    assert read_metadata(checkpoint_path(folder))["step"] == 20 and not folder.exists()
    said = []
    with monkeypatch.context() as m:
        calls = _crash_after(m, 10**9)
        stage(cfg, run, log=said.append)  # as `ddmkit run` does again: continues from step 20
    assert f"{name}: continuing from {checkpoint_path(folder)}" in said  # it said nothing of it
    reference = getattr(RunFolder(ref), name)
    assert calls["n"] == read_json(folder / "config.json")["train"]["steps"] - 20  # not trained from the start
    assert _bytes(folder) == _bytes(reference)
    assert (folder / "config.json").read_bytes() == (reference / "config.json").read_bytes()
    assert _log(folder) == _log(reference)
    assert not checkpoint_path(folder).exists() and not checkpoint_path(reference).exists()


def test_continuing_from_a_checkpoint_is_said_only_once_it_is_accepted(tiny_partition, tmp_path, monkeypatch):
    """'expert 1: continuing from ...' (and the same of train-expert --resume, the monolith and the router)
    was printed just before the checkpoint was refused as one of another shard or of other settings."""
    from ddmkit.pipeline.stages import stage_experts
    from ddmkit.train.jobs import train_expert_once

    cfg, base = tiny_partition
    run = tmp_path / "run"
    shutil.copytree(base, run)
    folder = RunFolder(run)
    shards = [folder.partition / "shards" / f"cluster_{c:02d}.safetensors" for c in range(4)]
    for c in (0, 2, 3):
        train_expert(shards[c], cfg.expert, folder.expert(c))
    with monkeypatch.context() as m:  # expert 1's slot holds a checkpoint of cluster 2's shard
        _crash_after(m, 15)
        with pytest.raises(KeyboardInterrupt):
            train_expert(shards[2], cfg.expert, folder.expert(1))
    said = []
    for train in (lambda: stage_experts(cfg, run, log=said.append),
                  lambda: train_expert_once(shards[1], cfg.expert, folder.expert(1), resume=True, log=said.append)):
        with pytest.raises(DDMError, match="belongs to a different training run: other training data"):
            train()
        assert not any("continuing from" in line for line in said), said
    checkpoint_path(folder.expert(1)).unlink()
    with monkeypatch.context() as m:  # its own shard's: accepted, and said
        _crash_after(m, 15)
        with pytest.raises(KeyboardInterrupt):
            train_expert(shards[1], cfg.expert, folder.expert(1))
    stage_experts(cfg, run, log=said.append)
    assert f"expert 1: continuing from {checkpoint_path(folder.expert(1))}" in said, said
    other = cfg.router.model_copy(update={"train": _train(60)})  # the router's checkpoint, of other settings
    with monkeypatch.context() as m:
        _crash_after(m, 15)
        with pytest.raises(KeyboardInterrupt):
            stage_router(cfg, run, log=lambda m: None)
    said.clear()
    with pytest.raises(DDMError, match="belongs to a different training run: other settings"):
        stage_router(cfg.model_copy(update={"router": other}), run, log=said.append)
    assert said == [], said


def test_an_expert_folder_cut_short_is_trained_again_and_one_with_other_files_is_refused(tmp_path, ddmkit):
    """experts/expert_03 holding config.json and train_log.jsonl but no weights (an rsync cut short) made `ddmkit
    launch` and a SLURM task (train-expert --out ... --resume) fail: "--out ... holds files that are not an expert
    (config.json, train_log.jsonl)". They are an expert's own files: the expert is trained again. A folder
    holding other files is still refused, by launch without naming an --out it does not have, and nothing in it
    is deleted."""
    run, _ = _tiny_run(tmp_path / "run", "expert.train.steps=20")
    assert ddmkit("launch", run)[0] == 0
    expert = RunFolder(run).expert(3)
    weights = _bytes(expert)
    task = ["train-expert", run / "partition" / "shards" / "cluster_03.safetensors", "--out", expert,
            "--config", run / "config.json", "--resume"]  # as a SLURM task of `launch --emit slurm` runs
    for command in (["launch", run], task):
        (expert / "model.safetensors").unlink()
        assert sorted(p.name for p in expert.iterdir()) == ["config.json", "statistics.safetensors", "train_log.jsonl"]
        code, _, err = ddmkit(*command)
        assert code == 0, err
        assert _bytes(expert) == weights

    (expert / "model.safetensors").unlink()
    (expert / "notes.txt").write_text("mine")
    code, _, err = ddmkit("launch", run)
    assert code == 2 and f"error: {expert} holds files that are not an expert (notes.txt); an expert is written " \
                         "into a folder of its own, which it replaces: move them elsewhere" in err, err
    assert "--out" not in err
    if HAS_RAY:  # without Ray, the launch is refused naming Ray first
        code, _, err = ddmkit("launch", run, "--backend", "ray")  # refused before Ray starts (it replaced the folder)
        assert code == 2 and f"error: {expert} holds files that are not an expert (notes.txt)" in err, err
    code, _, err = ddmkit(*task)
    assert code == 2 and f"--out {expert} holds files that are not an expert (notes.txt)" in err, err
    assert sorted(p.name for p in expert.iterdir()) == ["config.json", "notes.txt", "statistics.safetensors", "train_log.jsonl"]

    job = tmp_path / "job"  # a folder holding a run's config.json (docs/distributed.md copies it there) is no expert
    job.mkdir()
    shutil.copy(run / "config.json", job / "config.json")
    code, _, err = ddmkit(*task[:3], job, *task[4:])
    assert code == 2 and f"--out {job} holds files that are not an expert (config.json)" in err, err
    assert (job / "config.json").read_bytes() == (run / "config.json").read_bytes()


def test_an_expert_whose_weights_were_cut_short_mid_file_is_trained_again(tmp_path, ddmkit):
    """An expert folder copied with model.safetensors cut short mid-file: `register` said to "re-train or re-copy
    it", and `train-expert` into the folder said "this expert is trained already ... nothing to do" (exit 0),
    leaving the damaged file. train-expert trains it again; register's message names fixes that work."""
    run, _ = _tiny_run(tmp_path / "run", "expert.train.steps=20")
    assert ddmkit("launch", run)[0] == 0
    expert = RunFolder(run).expert(2)
    weights = _bytes(expert)
    (run / "registry.json").unlink()  # copied in anew: not registered yet
    whole = (expert / "model.safetensors").read_bytes()
    (expert / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    code, _, err = ddmkit("register", run)
    assert code == 2 and "model.safetensors is corrupt" in err and "remove the folder and train it again" in err, err
    task = ["train-expert", run / "partition" / "shards" / "cluster_02.safetensors", "--out", expert,
            "--config", run / "config.json", "--resume"]  # as a SLURM task of `launch --emit slurm` runs
    code, _, err = ddmkit(*task)
    assert code == 0 and "does not read (a copy cut short?)" in err and "trained already" not in err, err
    assert _bytes(expert) == weights
    assert ddmkit("register", run)[0] == 0
    shutil.rmtree(expert)  # the other fix register names: remove the folder, and launch trains it again
    code, _, err = ddmkit("launch", run)
    assert code == 0 and _bytes(expert) == weights, err


def test_concurrent_experts_replace_a_folder_cut_short_but_not_one_with_other_files(tiny_partition, tmp_path):
    from ddmkit.train.concurrent import train_experts_concurrently

    cfg, run = tiny_partition
    shard = run / "partition" / "shards" / "cluster_00.safetensors"
    cut_short, other = tmp_path / "cut_short", tmp_path / "other"
    for folder in (cut_short, other):
        folder.mkdir()
        (folder / "config.json").write_text('{"role": "expert", "arch": "mlp"}')
        (folder / "train_log.jsonl").write_text("")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DDMError, match=rf"{other} holds files that are not an expert \(notes.txt\)"):
        train_experts_concurrently([shard, shard], cfg.expert, [cut_short, other], log=lambda m: None)
    assert (other / "notes.txt").read_text() == "mine" and not (cut_short / "model.safetensors").exists()
    train_experts_concurrently([shard], cfg.expert, [cut_short], log=lambda m: None)
    assert (cut_short / "model.safetensors").exists()


def test_a_damaged_checkpoint_is_named_before_any_job_trains(tmp_path, ddmkit):
    """launch found a damaged checkpoint of expert 2 only when that job started: expert 0 (inline: experts 0
    and 1) trained first, for nothing."""
    run, _ = _tiny_run(tmp_path / "run", "expert.train.steps=20")
    (RunFolder(run).experts).mkdir(exist_ok=True)
    (RunFolder(run).experts / "expert_02.checkpoint.safetensors").write_text("junk")
    code, _, err = ddmkit("launch", run)
    assert code == 2 and "expert_02.checkpoint.safetensors is corrupt" in err, err
    assert not any((RunFolder(run).expert(c) / "model.safetensors").exists() for c in range(4))
