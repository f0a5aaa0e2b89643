"""One expert on 2 processes (DDP and FSDP, gloo on the CPU): the loss curve and weights of one process with
the same global batch, the folder of one process, bit-exact resume after a crash, checkpoints that resume
under either, and processes that stop with the command (SIGTERM, kill -9), leaving only the checkpoint."""
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddmkit.cli import app
from ddmkit.config import ExpertConfig, NetConfig, TrainConfig
from ddmkit.errors import DDMError
from ddmkit.io import read_metadata, save_tensors, scratch_dir
from ddmkit.train.distributed import spawn
from ddmkit.train.jobs import checkpoint_path, train_expert, train_expert_ddp

from conftest import alive, children_running, started_with_children

TOML = """
[expert.net]
arch = "mlp"
kwargs = { width = 16, depth = 1 }

[expert.train]
steps = 30
batch_size = 32
warmup = 5
log_every = 6  # checkpoints (every 10) fall between log rows
checkpoint_every = 10
device = "cpu"
"""


MLP = NetConfig(arch="mlp", kwargs={"width": 16, "depth": 1})
DIT = NetConfig(arch="dit", kwargs={"patch": 2, "width": 8, "depth": 2, "heads": 2})  # blocks in an nn.ModuleList


def _cfg(seed: int = 0, net: NetConfig = MLP, parallel: str = "ddp") -> ExpertConfig:
    return ExpertConfig(net=net, train=TrainConfig(steps=30, batch_size=32, warmup=5, log_every=6, checkpoint_every=10,
                                                   device="cpu", seed=seed, parallel=parallel))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def _curve(folder: Path) -> list[dict]:
    """The log rows less their wall-clock seconds."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in _rows(folder)]


def _shard(folder: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    save_tensors(folder / "shard.safetensors", {"x": torch.randn(300, 2, generator=g) + 3.0}, {"cluster": 0, "k": 1})
    (folder / "c.toml").write_text(TOML)
    return folder / "shard.safetensors"


def assert_same_training(one: Path, two: Path) -> None:
    """The loss curve and final weights of `one` (1 process) and `two` (2 processes, same global batch)
    within float rounding, and the same folder but for "processes": 2 in config.json."""
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [6, 12, 18, 24, 30]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=0), key
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-5)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (one, two))
    assert cb.pop("processes") == 2 and "processes" not in ca
    assert cb.pop("final_loss") == pytest.approx(ca.pop("final_loss"), rel=1e-5)
    assert cb == ca


@contextlib.contextmanager
def _crash_after(n: int):
    """Training in this process dies (DDMError) at its (n + 1)-th loss."""
    import ddmkit.train.jobs as jobs

    real, calls = jobs.flow_matching_loss, {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] > n:
            raise DDMError("simulated crash")
        return real(*a, **k)

    jobs.flow_matching_loss = loss
    try:
        yield
    finally:
        jobs.flow_matching_loss = real


def _train_crashing(shard, cfg, out, crash_after, dist):
    """train_expert in a process of a job whose every process dies at its (crash_after + 1)-th loss."""
    with _crash_after(crash_after):
        train_expert(shard, cfg, out, dist=dist)


def test_two_processes_follow_one_and_resume_bit_exactly(tmp_path):
    """One test, so the 2-process run is made once (spawning processes is the cost here)."""
    shard = _shard(tmp_path)
    one = train_expert(shard, _cfg(), tmp_path / "one")
    res = CliRunner().invoke(app, ["train-expert", str(shard), "--config", str(tmp_path / "c.toml"),
                                   "--out", str(tmp_path / "two"), "--nproc", "2"])
    assert res.exit_code == 0, res.output
    two = tmp_path / "two"
    assert_same_training(one, two)
    assert not checkpoint_path(two).exists()

    # killed after its checkpoint at step 20, then resumed: the bytes and log of the uninterrupted job
    out = tmp_path / "resumed"
    with pytest.raises(DDMError, match="simulated crash"):  # a process's DDMError reaches the caller
        spawn(_train_crashing, 2, "cpu", shard, _cfg(), out, 25)
    assert read_metadata(checkpoint_path(out))["step"] == 20 and not out.exists()
    train_expert_ddp(shard, _cfg(), out, nproc=2, resume=True)
    assert (out / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(two)]
    assert not checkpoint_path(out).exists()


def _mark_at_exit(marker: Path, dist) -> None:
    """A job that leaves a file only if its process runs the interpreter's shutdown (atexit)."""
    atexit.register(marker.touch)


def test_a_finished_process_skips_the_interpreters_shutdown(tmp_path):
    """Where gloo's threads can abort a process whose job has finished (SIGABRT, the job counted failed)."""
    spawn(_mark_at_exit, 2, "cpu", tmp_path / "shutdown-ran")
    assert not (tmp_path / "shutdown-ran").exists()


def test_a_batch_that_does_not_split_is_refused_before_starting(tmp_path):
    with pytest.raises(DDMError, match=r"expert\.train\.batch_size = 32 does not split into 3 equal slices, one per "
                                       r"process; use a multiple of 3, e\.g\. --set expert\.train\.batch_size=30"):
        train_expert_ddp(tmp_path / "none.safetensors", _cfg(), tmp_path / "e", nproc=3)
    with pytest.raises(DDMError, match=r"expert\.train\.batch_size = 32 is fewer rows than the 40 processes, one "
                                       r"slice each; use 32 processes, or another count that divides 32 \(the "
                                       r"batch is the global one, over all processes\)$"):  # it offered a batch of 40
        train_expert_ddp(tmp_path / "none.safetensors", _cfg(), tmp_path / "e", nproc=40)


def test_a_batch_of_fewer_rows_than_processes_names_a_count_that_splits_it():
    """A batch of 6 over 8 processes said 'use at most 6 processes', yet 5 and 4 were refused next: the count named
    divides the batch, and is taken."""
    from ddmkit.train.distributed import check_batch

    for batch, world in ((6, 8), (1, 3), (7, 100)):
        with pytest.raises(DDMError) as refused:
            check_batch(batch, world)
        count = int(re.search(r"; use (\d+) process", str(refused.value)).group(1))
        assert batch % count == 0 and count <= world and f"another count that divides {batch} " in str(refused.value)
        check_batch(batch, count)  # taken
    with pytest.raises(DDMError, match=r"use 1 process, or another"):
        check_batch(1, 2)


def test_more_processes_than_gpus_names_the_cpu_way_out(tmp_path, monkeypatch):
    """On a machine with one GPU, device auto is CUDA: two processes need two GPUs. The message names the CPU
    (gloo) too, and that setting is accepted on the same machine."""
    from ddmkit.train.distributed import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    auto = _cfg().model_copy(update={"train": _cfg().train.model_copy(update={"device": "auto"})})
    with pytest.raises(DDMError, match=r"process 1 of this machine needs GPU 1, but 1 are visible; start at most that "
                                       r"many processes per machine, or train the processes on the CPU \(gloo\): "
                                       r'train\.device = "cpu" \(--device cpu\)'):
        train_expert_ddp(tmp_path / "none.safetensors", auto, tmp_path / "e", nproc=2)
    assert _device("cpu", 1) == torch.device("cpu")


def test_more_cpu_processes_than_cores_are_warned_of_but_start(tmp_path, monkeypatch):
    """train-expert --nproc 8 on a 2-core CPU machine started its 8 gloo processes without a word, all of them
    slow. One warning line now names the cores and a --nproc that fits them; the job still starts (legal for
    trying DDP). Jobs on CUDA, and those that fit, say nothing."""
    import ddmkit.train.distributed as distributed
    import ddmkit.train.jobs as jobs
    from conftest import run_cli

    shard, started = _shard(tmp_path), []
    monkeypatch.setattr(jobs, "train_expert_ddp", lambda shard, cfg, out, nproc, resume: started.append(nproc))
    monkeypatch.setattr(distributed, "cpu_cores", lambda: 2)

    def said(nproc: int, *more: str) -> str:
        done = run_cli("train-expert", shard, "--config", tmp_path / "c.toml", "--out", tmp_path / "e", "--nproc",
                       nproc, *more)
        assert done.returncode == 0, done.stderr
        return " ".join(done.stderr.split())

    assert ("warning: --nproc 4: the 4 processes share this machine's 2 CPU cores and will be slow; use --nproc 2 "
            "or fewer, unless the point is to try DDP with gloo") in said(4)
    assert ("the 2 processes, 2 threads each (expert.train.threads), share this machine's 2 CPU cores and will be "
            "slow; use --nproc 1, or --set expert.train.threads=1") in said(2, "--set", "expert.train.threads=2")
    assert "warning" not in said(2) and started == [4, 2, 2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [distributed.crowded_cpu(4, 1, device) for device in ("cuda", "cuda:0", "auto")] == [None] * 3
    assert "use --nproc 2 or fewer" in distributed.crowded_cpu(4, 1, "cpu")


def test_a_batch_that_does_not_split_is_refused_without_the_crowded_cpu_warning(tmp_path, monkeypatch):
    """train-expert --nproc 3 with a batch of 32 on a 2-core machine warned that 3 processes crowd the cores, then
    refused the batch: the warning was about a job that never starts. The refusal now comes first, alone."""
    import ddmkit.train.distributed as distributed
    from conftest import run_cli

    shard = _shard(tmp_path)
    monkeypatch.setattr(distributed, "cpu_cores", lambda: 2)
    done = run_cli("train-expert", shard, "--config", tmp_path / "c.toml", "--out", tmp_path / "e", "--nproc", 3)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "expert.train.batch_size = 32 does not split into 3 equal slices" in said, said
    assert "warning" not in said and "CPU core" not in said, said
    assert not (tmp_path / "e" / "model.safetensors").exists()


def test_a_batch_that_does_not_split_names_fixes_that_work(tmp_path, monkeypatch):
    """--nproc 3 on a batch of 32 offered only --set expert.train.batch_size=30, which a --resume then refused (the
    checkpoint holds the batch of 32); under torchrun a process found it only after joining the job, and offered
    --set train.batch_size=30, no field of the config. Both now name the fixes that work, before anything starts."""
    import ddmkit.train.distributed as distributed
    from ddmkit.train.jobs import train_expert_once

    shard, out = _shard(tmp_path), tmp_path / "e"
    checkpoint_path(out).write_bytes(b"")  # only whether it is there counts: the batch is checked before reading it
    with pytest.raises(DDMError) as resumed:
        train_expert_once(shard, _cfg(), out, nproc=3, resume=True)
    assert "use --nproc 2 (2 divides 32; " in str(resumed.value) and "--set" not in str(resumed.value)
    with pytest.raises(DDMError, match=r"--nproc 3: .* use --nproc 2 \(2 divides 32\), or a multiple of 3, e\.g\. "
                                       r"--set expert\.train\.batch_size=30"):
        train_expert_once(shard, _cfg(), out, nproc=3)  # no --resume: the checkpoint is not continued
    for name, value in (("WORLD_SIZE", "3"), ("RANK", "0"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "from_env", lambda *a, **k: pytest.fail("joined the job before the refusal"))
    with pytest.raises(DDMError, match=r"torchrun's 3 processes: expert\.train\.batch_size = 32 does not split into "
                                       r"3 equal slices, one per process; use a job of 2 processes"):
        train_expert_once(shard, _cfg(), tmp_path / "e2")


def test_a_shard_that_names_no_cluster_is_refused_before_the_processes_start(tmp_path, monkeypatch):
    """A partition shard re-saved without its metadata was refused only in the spawned processes of --nproc 2
    (seconds later, with a torch warning line); now before any starts, in the words of one process (the command
    and train_expert_ddp)."""
    import ddmkit.train.distributed as distributed
    from safetensors.torch import save_file

    from conftest import run_cli

    shard = _shard(tmp_path)
    save_file(load_file(str(shard)), str(tmp_path / "bare.safetensors"))  # its tensors, no metadata
    monkeypatch.setattr(distributed, "run", lambda *args: pytest.fail("the job's processes started"))
    done = run_cli("train-expert", tmp_path / "bare.safetensors", "--config", tmp_path / "c.toml", "--out",
                   tmp_path / "e", "--nproc", 2)
    assert done.returncode == 2 and done.stderr == (f"error: {tmp_path / 'bare.safetensors'} is not a cluster's shard "
                                                    "(its metadata names no cluster); give a file of "
                                                    "RUN/partition/shards/ (`ddmkit partition` writes them)\n")
    assert not (tmp_path / "e").exists()
    with pytest.raises(DDMError, match="is not a cluster's shard"):  # from Python too
        train_expert_ddp(tmp_path / "bare.safetensors", _cfg(), tmp_path / "e", nproc=2)


def test_nproc_unlike_the_launchers_is_named_first_without_joining(tmp_path, monkeypatch):
    """--nproc 3 inside a 2-process launcher was told about the batch split first, and named only after
    joining the launcher's job."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DDMError, match=r"--nproc 3 inside a launcher that started 2 processes \(WORLD_SIZE\); leave "
                                       "--nproc out"):
        train_expert_ddp(tmp_path / "none.safetensors", _cfg(), tmp_path / "e", nproc=3)


@pytest.mark.slow
def test_torchrun_starts_the_same_job(tmp_path):
    """The entry for several machines: processes that torchrun starts join one job (env://). Slow only
    in that the default suite already trains on 2 processes (spawned); this adds torchrun's start-up."""
    shard = _shard(tmp_path)
    one = train_expert(shard, _cfg(), tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ddmkit.cli", "train-expert", str(shard), "--config", str(tmp_path / "c.toml"),
           "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, env={**os.environ, "DDMKIT_QUIET": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_training(one, tmp_path / "two")


def test_an_error_of_every_torchrun_process_is_said_once(tmp_path):
    """A DDMError that every process of torchrun's job raised after joining it (a shard that names no cluster,
    read by each) was printed once per process; now process 0 says it and the others exit with its status."""
    save_tensors(tmp_path / "bare.safetensors", {"x": torch.randn(64, 2)}, {})
    (tmp_path / "c.toml").write_text(TOML)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ddmkit.cli", "train-expert", str(tmp_path / "bare.safetensors"), "--config", str(tmp_path / "c.toml"),
           "--out", str(tmp_path / "e")]
    env = {**os.environ, "DDMKIT_QUIET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    said = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and said == [f"error: {tmp_path / 'bare.safetensors'} is not a cluster's shard (its "
                                            "metadata names no cluster); give a file of RUN/partition/shards/ "
                                            "(`ddmkit partition` writes them)"], res.stderr


class _Said(list):
    def __call__(self, text: str) -> None:
        self.append(text)


def test_a_processs_own_error_is_said_with_its_rank(monkeypatch):
    """say_error_once against a store of torchrun's agent (here one of this process): process 0 says its error and
    leaves it there; another process says nothing of the same error, and says its own (or any, where process 0
    left none in time) with its rank."""
    from ddmkit.train import distributed

    port = _free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    said = _Said()
    distributed.say_error_once("x: bad", said, wait=0.5)  # no process 0 yet: its rank's own
    assert said == ["x: bad"] and store.get("ddmkit-error/job/0") == b"x: bad"
    monkeypatch.setenv("RANK", "1")
    distributed.say_error_once("x: bad", said, wait=5)
    assert said == ["x: bad"]
    distributed.say_error_once("no GPU 1", said, wait=5)
    assert said == ["x: bad", "process 1 of 2: no GPU 1"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted job: process 0 has said nothing (yet)
    distributed.say_error_once("x: bad", said, wait=0.5)
    assert said[-1] == "process 1 of 2: x: bad"
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.say_error_once("alone", said)
    assert said[-1] == "alone"


def _dit_cfg(parallel: str = "fsdp") -> ExpertConfig:
    return _cfg(net=DIT, parallel=parallel)


def _image_shard(folder: Path) -> Path:
    g = torch.Generator().manual_seed(2)
    save_tensors(folder / "images.safetensors", {"x": torch.randn(300, 1, 4, 4, generator=g)}, {"cluster": 0, "k": 1})
    return folder / "images.safetensors"


def _fsdp_jobs(shard, vectors, root, dist):
    """The 2-process FSDP runs, in one job (spawning processes is the cost): uninterrupted (the DiT and the mlp);
    killed after its checkpoint at step 20 (rank 0 keeps a copy of it) and resumed; resumed from one process's
    checkpoint."""
    train_expert(shard, _dit_cfg(), root / "fsdp", dist=dist)
    train_expert(vectors, _cfg(parallel="fsdp"), root / "mlp_fsdp", dist=dist)
    with pytest.raises(DDMError, match="simulated crash"), _crash_after(25):
        train_expert(shard, _dit_cfg(), root / "resumed", dist=dist)
    if dist.is_main:
        shutil.copy(checkpoint_path(root / "resumed"), root / "fsdp.step20.safetensors")
    train_expert(shard, _dit_cfg(), root / "resumed", resume=True, dist=dist)
    train_expert(shard, _dit_cfg(), root / "from_one", resume=True, dist=dist)


def test_fsdp_follows_one_process_resumes_bit_exactly_and_shares_checkpoints(tmp_path):
    """FSDP on a DiT (blocks sharded one by one) and on the mlp (sharded whole): the loss curve and weights of one
    process; a killed job resumes to the same bytes; a checkpoint resumes under FSDP, one process or DDP alike."""
    shard, vectors = _image_shard(tmp_path), _shard(tmp_path)
    one = train_expert(shard, _dit_cfg(), tmp_path / "one")  # parallel is ignored with one process
    mlp_one = train_expert(vectors, _cfg(parallel="fsdp"), tmp_path / "mlp_one")
    with pytest.raises(DDMError, match="simulated crash"), _crash_after(25):  # one process's checkpoint, DDP's settings
        train_expert(shard, _dit_cfg("ddp"), tmp_path / "from_one")
    shutil.copy(checkpoint_path(tmp_path / "from_one"), tmp_path / "one.step20.safetensors")
    spawn(_fsdp_jobs, 2, "cpu", shard, vectors, tmp_path)
    fsdp = tmp_path / "fsdp"
    assert_same_training(one, fsdp)
    assert_same_training(mlp_one, tmp_path / "mlp_fsdp")
    assert not checkpoint_path(fsdp).exists()

    # killed after its checkpoint at step 20, then resumed: the bytes and log of the uninterrupted job
    resumed = tmp_path / "resumed"
    assert (resumed / "model.safetensors").read_bytes() == (fsdp / "model.safetensors").read_bytes()
    assert _curve(resumed) == _curve(fsdp)

    # the FSDP checkpoint is one process's (DDP settings): the same tensors (names, shapes, dtypes), equal values
    # up to float rounding, the same metadata but for the log's values
    a, b = (load_file(str(tmp_path / f"{n}.step20.safetensors")) for n in ("one", "fsdp"))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
    ma, mb = (read_metadata(tmp_path / f"{n}.step20.safetensors") for n in ("one", "fsdp"))
    assert ma.keys() == mb.keys() and ma["step"] == mb["step"] == 20
    assert [ma[k] for k in ("fingerprint", "optimizer", "scheduler", "running_is_tensor")] == \
        [mb[k] for k in ("fingerprint", "optimizer", "scheduler", "running_is_tensor")]

    # one process's checkpoint (written with parallel = "ddp") continued under FSDP: its rows, then one's curve
    from_one = tmp_path / "from_one"
    assert _curve(from_one)[:3] == _curve(one)[:3]
    assert [r["loss"] for r in _rows(from_one)] == pytest.approx([r["loss"] for r in _rows(one)], rel=1e-5, abs=0)
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(from_one / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-5)
    assert json.loads((from_one / "config.json").read_text())["train"]["parallel"] == "fsdp"

    # and back: the FSDP checkpoint continued by one process
    back = tmp_path / "back"
    shutil.copy(tmp_path / "fsdp.step20.safetensors", checkpoint_path(back))
    train_expert(shard, _dit_cfg(), back, resume=True)
    wb = load_file(str(back / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-5)


@pytest.fixture
def training(tmp_path):
    """`ddmkit train-expert --nproc 2` (10^6 steps, a checkpoint every 5) in its own session, started as a shell
    script's background job is (`ddmkit ... &`: SIGINT ignored), once it wrote a checkpoint: (the command's process,
    its two processes' ids, the expert folder); any process of it left is killed after."""
    shard, out = _shard(tmp_path), tmp_path / "e"
    (tmp_path / "tmpdir").mkdir()  # where the processes' rendezvous folder goes
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "DDMKIT_QUIET": "1",
           "TMPDIR": str(tmp_path / "tmpdir")}
    argv = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", sys.executable, "-m", "ddmkit", "train-expert", str(shard),
            "--config", str(tmp_path / "c.toml"), "--out", str(out), "--nproc", "2",
            "--set", "expert.train.steps=1000000", "--checkpoint-every", "5"]
    with started_with_children(argv, env, tmp_path / "log", lambda: checkpoint_path(out).exists()) as (command, ranks):
        yield command, ranks, out


def _resource_trackers(parent: int) -> list[int]:
    """The ids of the multiprocessing resource trackers that process `parent` started."""
    return children_running(parent, b"resource_tracker")


def _left(out: Path) -> list[str]:
    """What the folder of the expert folder `out` holds, less the test's own files."""
    ours = ("shard.safetensors", "c.toml", "log", "tmpdir")
    return sorted(p.name for p in out.parent.iterdir() if p.name not in ours)


def _rendezvous(tmpdir: Path) -> list[str]:
    """The rendezvous folders in $TMPDIR (torch may keep its own caches there)."""
    return sorted(p.name for p in tmpdir.glob("*ddmkit-ddp*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_processes_die_with_a_killed_command(training):
    """kill -9 of the command left its two processes training (torch's parent-death signal is SIGINT, which a
    background job ignores): they wrote the checkpoint on and finished the expert with no command running."""
    command, ranks, out = training
    trackers = _resource_trackers(command.pid)
    command.kill()
    deadline = time.monotonic() + 60  # a hang guard: a loaded machine takes seconds to end torch processes
    while any(alive(pid) for pid in ranks + trackers):
        assert time.monotonic() < deadline, "the processes outlived the command"
        time.sleep(0.05)
    # Python's resource tracker, once the command and its processes are gone, warned of 'leaked semaphore
    # objects' (the locks of a multiprocessing queue)
    assert trackers and "leaked" not in (out.parent / "log").read_text()
    written = checkpoint_path(out).stat().st_mtime_ns
    time.sleep(1)
    assert checkpoint_path(out).stat().st_mtime_ns == written
    # rank 0 stopped as on Ctrl-C: no staging folder left; the folder's lock file holds no lock (the next command
    # takes it over)
    assert _left(out) == [".e.lock", checkpoint_path(out).name]
    tmpdir = out.parent / "tmpdir"
    left = _rendezvous(tmpdir)  # the killed command's rendezvous folder, named after it
    assert len(left) == 1 and left[0].startswith(f".ddmkit-ddp.{command.pid}-"), left
    with scratch_dir(tmpdir, "ddmkit-ddp") as mine:  # the next command's removes it
        assert _rendezvous(tmpdir) == [mine.name]
    assert _rendezvous(tmpdir) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, reads /proc")
@pytest.mark.parametrize("to", ["group", pytest.param("command", marks=pytest.mark.slow)])  # timeout, or kill
def test_sigterm_stops_every_process_and_keeps_only_the_checkpoint(training, to):
    """SIGTERM to the process group killed the two processes where they stood (exit 143 all the same), leaving
    rank 0's staging folder beside the checkpoint; SIGTERM to the command alone left them training."""
    command, ranks, out = training
    (os.killpg if to == "group" else os.kill)(command.pid, signal.SIGTERM)
    code = command.wait(timeout=60)
    said = " ".join((out.parent / "log").read_text().split())
    assert code == 143, said
    assert "stopped by SIGTERM" in said and "Traceback" not in said, said
    assert not any(alive(pid) for pid in ranks)
    assert _left(out) == [checkpoint_path(out).name]
    assert _rendezvous(out.parent / "tmpdir") == []  # nor the rendezvous folder


def _refuse(dist):
    """A job's part that refuses, as a bad config does."""
    raise DDMError(f"rank {dist.rank} refused")


def test_a_ranks_ddmerror_is_raised_in_the_command_with_its_message(tmp_path, monkeypatch):
    """The message of a spawned process's DDMError reaches the command (through a file in the rendezvous folder,
    not a multiprocessing queue), and the folder is removed."""
    from ddmkit.train import distributed

    monkeypatch.setattr(distributed.tempfile, "gettempdir", lambda: str(tmp_path))
    with pytest.raises(DDMError, match=r"^rank [01] refused$"):
        distributed.spawn(_refuse, 2, "cpu")
    assert _rendezvous(tmp_path) == []


def test_a_rank_asked_to_stop_ends_stopped_also_where_its_keyboardinterrupt_was_lost(monkeypatch):
    """A rank whose KeyboardInterrupt Python dropped (raised in a __del__) trained on; now _stop_rank sets the
    stop flag as well, and the rank ends STOPPED at fit's next check or at the collective its stopped peers
    left, where an error without a stop is still raised and a DDMError is still a failure with its message."""
    import queue

    from ddmkit.train import distributed
    from ddmkit.train.stop import check_stop

    monkeypatch.setattr(distributed.signal, "signal", lambda *args: None)  # this process keeps its handlers
    errors = queue.SimpleQueue()

    def lost_then(then):
        def job():
            try:
                distributed._stop_rank(signal.SIGTERM, None)
            except KeyboardInterrupt:
                pass  # dropped, as in a __del__
            then()
        return job

    def collective_left_by_peers():
        raise RuntimeError("Connection closed by peer")

    assert distributed._rank_status(lost_then(check_stop), errors) == distributed.STOPPED  # fit's next step
    assert distributed._rank_status(lost_then(collective_left_by_peers), errors) == distributed.STOPPED
    with pytest.raises(RuntimeError, match="Connection closed"):  # no stop asked: a real error; no flag kept
        distributed._rank_status(collective_left_by_peers, errors)

    def refused():
        check_stop()  # the flag of the stop above is not this job's
        raise DDMError("train.lr: bad")
    assert distributed._rank_status(refused, errors) == distributed.FAILED and errors.get() == "train.lr: bad"


def test_ctrl_c_and_sigterm_arriving_together_stop_a_rank_without_a_traceback(tmp_path):
    """Ctrl-C reaches the process group and the command's SIGTERM follows at once: a rank in a long C call
    (backward) had both pending; _stop_rank, run for SIGINT, set SIGTERM to SIG_IGN, and Python then printed
    "OSError: Signal 15 ignored due to race condition" with a traceback."""
    script = tmp_path / "both.py"
    script.write_text(
        "import signal, threading\n"
        "from ddmkit.train import distributed\n"
        "signal.signal(signal.SIGINT, distributed._stop_rank)\n"
        "signal.signal(signal.SIGTERM, distributed._stop_rank)\n"
        "both = {signal.SIGINT, signal.SIGTERM}\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, both)\n"
        "main = threading.get_ident()  # sent to this thread: os.kill's could reach a thread of torch's at once\n"
        "signal.pthread_kill(main, signal.SIGINT)\n"
        "signal.pthread_kill(main, signal.SIGTERM)\n"
        "try:\n"
        "    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)\n"
        "    for _ in range(100):\n"
        "        pass\n"
        "except KeyboardInterrupt:\n"
        "    pass\n"
        "for _ in range(100):\n"
        "    pass\n"
        "print('stopped')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr
    assert done.stderr == ""


def _free_port() -> int:
    import socket
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_launcher_environment_without_its_other_processes_is_named_and_ctrl_c_stops_the_wait(monkeypatch):
    """RANK and WORLD_SIZE left set in a shell: train-expert waited 30 minutes for processes that never came,
    printing nothing, and Ctrl-C or SIGTERM did not stop it (the wait blocks in C++)."""
    from ddmkit.train.distributed import from_env
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DDMError, match="process 0 of 2 waited 2 s for the job's other processes .* to train in "
                                       "this process alone, unset them: env -u RANK"):
        from_env("cpu", timeout=2)
    code = "from ddmkit.train.distributed import from_env; from_env('cpu', timeout=120)"
    env["MASTER_PORT"] = str(_free_port())
    waiting = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stderr=subprocess.PIPE,
                               text=True)
    lines, joining = [], threading.Event()  # its stderr, read in a thread; set once it says it waits

    def read() -> None:
        for line in waiting.stderr:
            lines.append(line)
            if "joining a job of 2 processes" in line:
                joining.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # SIGINT only once the wait has begun: sent after a fixed 4 s, it reached a child on a busy machine
        # while it was still importing torch (a KeyboardInterrupt there, not in the wait)
        assert joining.wait(timeout=120), "".join(lines)
        time.sleep(1)  # from the message into the wait itself
        start = time.monotonic()
        waiting.send_signal(signal.SIGINT)
        waiting.wait(timeout=60)
        reader.join(timeout=10)
        err = "".join(lines)
        assert time.monotonic() - start < 10 and waiting.returncode != 0, err
        assert "KeyboardInterrupt" in err, err
    finally:
        waiting.kill()
