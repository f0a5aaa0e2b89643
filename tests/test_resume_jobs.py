"""Resume of every training job (expert, monolith, router): bit-exact, and only on the same data."""
import shutil
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig, NetConfig, RouterConfig, TrainConfig, load_config
from ddmkit.errors import DDMError
from ddmkit.io import read_json, read_metadata, save_tensors, sha256_file
from ddmkit.layout import RunFolder
from ddmkit.pipeline.stages import stage_data, stage_monolith, stage_partition, stage_router
from ddmkit.train.jobs import checkpoint_path, train_expert, train_monolith, train_router

from test_resume import _bytes, _log

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
    with monkeypatch.context() as m:
        calls = _crash_after(m, 10**9)
        stage(cfg, run, log=lambda m: None)  # as `ddmkit run` does again: continues from step 20
    reference = getattr(RunFolder(ref), name)
    assert calls["n"] == read_json(folder / "config.json")["train"]["steps"] - 20  # not trained from the start
    assert _bytes(folder) == _bytes(reference)
    assert (folder / "config.json").read_bytes() == (reference / "config.json").read_bytes()
    assert _log(folder) == _log(reference)
    assert not checkpoint_path(folder).exists() and not checkpoint_path(reference).exists()
