"""Launch backends: every backend gives the same bytes as inline, whatever this process's own
torch thread count (each job runs on train.threads threads); resuming under Ray and a Ray task's errors;
Ctrl-C and a killed driver with the process pool; the SLURM script and the options of --emit."""
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig, NetConfig, TrainConfig
from ddmkit.errors import DDMError
from ddmkit.io import save_tensors
from ddmkit.launch import ExpertJob, run_jobs, slurm_script
from ddmkit.train.jobs import checkpoint_path

from conftest import alive, needs_ray, run_cli, started_with_children


def _jobs(root: Path, name: str, k: int = 2) -> list[ExpertJob]:
    jobs = []
    for c in range(k):
        shard = root / "shards" / f"cluster_{c:02d}.safetensors"
        if not shard.exists():
            g = torch.Generator().manual_seed(c)
            save_tensors(shard, {"x": torch.randn(200, 2, generator=g) + 3 * c}, {"cluster": c, "k": k})
        jobs.append(ExpertJob(c, shard, root / name / f"expert_{c:02d}"))
    return jobs


CFG = ExpertConfig(net=NetConfig(arch="mlp", kwargs={"width": 16, "depth": 1}),
                   train=TrainConfig(steps=20, batch_size=32, warmup=2, log_every=10, device="cpu"))


def _weights(jobs):
    return [(j.out_dir / "model.safetensors").read_bytes() for j in jobs]


@pytest.fixture(scope="module")
def inline(tmp_path_factory):
    """Inline in a process whose torch uses 2 threads (the default on a 2-core machine, where the
    process pool's workers used 1 each and gave other weights): the job's own count must win."""
    root = tmp_path_factory.mktemp("launch")
    jobs = _jobs(root, "inline")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_jobs(jobs, CFG, "inline", log=lambda m: None)
        assert torch.get_num_threads() == 2  # restored after the jobs
    finally:
        torch.set_num_threads(before)
    return root, _weights(jobs)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of 2 CPUs for this module's Ray tests (the backend uses a Ray already started)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'ddmkit[ray]' to run the Ray tests")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_processes_backend_matches_inline_bytes(inline):
    root, ref = inline
    jobs = _jobs(root, "processes")
    run_jobs(jobs, CFG, "processes", workers=1, log=lambda m: None)  # one CPU worker runs both jobs in turn
    assert _weights(jobs) == ref


def test_thread_count_is_part_of_the_config_and_changes_the_bytes(inline, tmp_path):
    """train.threads decides the bytes (so every backend sets it): 2 threads give other weights."""
    root, ref = inline
    two = CFG.model_copy(update={"train": CFG.train.model_copy(update={"threads": 2})})
    jobs = _jobs(root, "two_threads")
    run_jobs(jobs, two, "inline", log=lambda m: None)
    assert _weights(jobs) != ref


def test_ray_backend_matches_inline_bytes(inline, local_ray):
    root, ref = inline
    jobs = _jobs(root, "ray")
    run_jobs(jobs, CFG, "ray", workers=2, log=lambda m: None)
    assert _weights(jobs) == ref
    cfg = [(j.out_dir / "config.json").read_bytes() for j in jobs]
    assert cfg == [(root / "inline" / j.out_dir.name / "config.json").read_bytes() for j in jobs]


def test_backend_errors_name_the_accepted_values(tmp_path):
    with pytest.raises(DDMError, match="inline, processes, ray"):
        run_jobs(_jobs(tmp_path, "x"), CFG, "kubernetes")
    with pytest.raises(DDMError, match=r"accepted: inline, processes, ray \(.*ddmkit launch RUN --emit slurm"):
        run_jobs(_jobs(tmp_path, "x"), CFG, "slurm")  # a scheduler ddmkit writes a script for, not a backend
    with pytest.raises(DDMError, match="--address"):
        run_jobs(_jobs(tmp_path, "x"), CFG, "inline", address="auto")


def test_ray_missing_gives_a_clear_error(monkeypatch):
    import builtins

    from ddmkit.launch.ray_backend import import_ray

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda n, *a, **k: (_ for _ in ()).throw(ImportError())
                        if n == "ray" else real(n, *a, **k))
    with pytest.raises(DDMError, match=r"pip install 'ddmkit\[ray\]'"):
        import_ray()


def test_ray_missing_is_refused_before_a_run_is_made(tmp_path, monkeypatch):
    """`ddmkit run CONFIG --backend ray` without Ray made the run's data and partition, then refused."""
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray: ImportError
    done = run_cli("run", Path(__file__).parent / "configs" / "tiny.toml", "--out", tmp_path / "run",
                   "--backend", "ray")
    assert done.returncode == 2 and "backend 'ray' needs Ray: pip install 'ddmkit[ray]'" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_slurm_script_is_a_job_array_calling_train_expert(tmp_path):
    text = slurm_script(tmp_path / "my run", 8, partition="gpu", gpus=1)
    assert "#SBATCH --array=0-7" in text and "#SBATCH --gres=gpu:1" in text and "#SBATCH --partition=gpu" in text
    assert "ddmkit train-expert" in text and "--resume" in text and "config.json" in text
    assert "--nproc" not in text and "--resume --nproc 4" in slurm_script(tmp_path, 8, gpus=4)  # one expert, 4 GPUs
    assert "'" in text.split("RUN=", 1)[1].splitlines()[0]  # the path with a space is shell-quoted
    path = tmp_path / "s.slurm"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    with pytest.raises(DDMError, match="--partition 'gpu.*: give the name of one of the cluster's partitions"):
        slurm_script(tmp_path, 2, partition="gpu\n#SBATCH --uid=0")
    with pytest.raises(DDMError, match="k = 0"):
        slurm_script(tmp_path, 0)


def test_a_slurm_option_without_a_value_is_written_without_an_equals_sign(tmp_path):
    """extra=["requeue"] wrote `#SBATCH --requeue=`, which sbatch refuses (the option takes no argument)."""
    text = slurm_script(tmp_path, 2, extra=["requeue", "mail-type=END"])
    assert "#SBATCH --requeue\n" in text and "#SBATCH --mail-type=END\n" in text, text
    for bad in ("requeue\n#SBATCH --uid=0", "--requeue", "mail type=END"):
        with pytest.raises(DDMError, match="give sbatch's long option name"):
            slurm_script(tmp_path, 2, extra=[bad])


@pytest.mark.parametrize("option, message", [({"time": "forever"}, "--time 'forever'"), ({"time": "24h"}, "--time"),
                                             ({"time": "5-99"}, "--time '5-99'"), ({"time": "1:75"}, "--time"),
                                             ({"time": "10:00:60"}, "--time"), ({"time": "2-23:60"}, "--time"),
                                             ({"mem": "lots"}, "--mem 'lots'"), ({"mem": "16B"}, "--mem '16B'"),
                                             ({"mem": "16GBB"}, "--mem"), ({"mem": "16BG"}, "--mem"),
                                             ({"mem": "16 GB"}, "--mem"), ({"mem": "0B"}, "--mem '0B'"),
                                             ({"cpus": 10**20}, "--cpus"), ({"cpus": 0}, "--cpus"),
                                             ({"gpus": -1}, "--gpus"), ({"gpus": 1000}, "--gpus"),
                                             ({"time": "abc"}, "--time 'abc'"), ({"time": "-5"}, "--time '-5'"),
                                             ({"mem": "10XB"}, "--mem '10XB'"), ({"mem": "1e30"}, "--mem '1e30'"),
                                             ({"time": "35791395"}, "--time '35791395': longer than sbatch counts"),
                                             ({"time": "24855-3:14:08"}, "--time '24855-3:14:08': longer"),
                                             ({"time": "596523:14:08"}, "--time '596523:14:08': longer"),
                                             ({"time": "9" * 20}, "longer than sbatch counts"),
                                             ({"mem": "9007199254740992G"}, "--mem '9007199254740992G': more than"),
                                             ({"mem": "9223372036854775808K"}, "more than sbatch counts"),
                                             ({"mem": "9007199254740992gb"}, "more than sbatch counts"),
                                             ({"mem": "9" * 20 + "G"}, "more than sbatch counts")])
def test_slurm_resources_sbatch_would_refuse_are_refused(tmp_path, option, message):
    """--mem lots, --time forever and --cpus 10**20 went into the script as they were; a time past sbatch's 2**31
    seconds, or memory past its 2**63 megabytes, wrapped round in sbatch's integers."""
    with pytest.raises(DDMError, match=re.escape(message)):
        slurm_script(tmp_path, 2, **option)


def test_slurm_resources_are_checked_when_every_expert_is_trained_too(tmp_path, monkeypatch, capsys):
    """With nothing to write, --mem 16Q was accepted (exit 0): the options are checked before anything."""
    from ddmkit.layout import RunFolder

    run = _tiny_run(tmp_path)
    for c in range(4):  # every expert's weights there: nothing left to train
        RunFolder(run).expert(c).mkdir(parents=True)
        (RunFolder(run).expert(c) / "model.safetensors").write_bytes(b"")
    code, err = cli("launch", run, "--emit", "slurm")
    assert code in (0, None) and "are all trained; no script written" in err, err
    code, err = cli("launch", run, "--emit", "slurm", "--mem", "16Q")
    assert code == 2 and "--mem '16Q'" in err, err


@pytest.mark.parametrize("time", ["90", "90:30", "24:00:00", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED", "0",
                                  "35791394", "24855-3:14:07", "596523:14:07"])
def test_every_form_of_slurm_time_is_accepted(tmp_path, time):
    """sbatch's forms, 0 (no limit to sbatch) and the longest limits its 2**31 - 1 seconds hold."""
    assert f"#SBATCH --time={time}" in slurm_script(tmp_path, 2, time=time, mem="512M")


@pytest.mark.parametrize("mem", ["0", "0G", "512K", "16G", "2T", "9223372036854775807M", "9007199254740991G",
                                 "16GB", "16gb", "16g", "16Gb", "512m", "512MB", "1t", "1TB", "64kB"])
def test_slurm_mem_up_to_what_sbatch_counts_is_accepted(tmp_path, mem):
    """A number with its unit, in either case and optionally followed by B as sbatch reads them (0: all of a node's
    memory, to sbatch), up to sbatch's 2**63 - 1 megabytes; written as given."""
    assert f"#SBATCH --mem={mem}\n" in slurm_script(tmp_path, 2, mem=mem)


def test_slurm_mem_with_a_byte_suffix_is_written_by_the_cli(tmp_path):
    """--mem 16GB, which sbatch accepts, was refused: the script is written with it as given."""
    run = _tiny_run(tmp_path)
    code, err = cli("launch", run, "--emit", "slurm", "--mem", "16GB")
    assert code in (0, None), err
    assert "#SBATCH --mem=16GB\n" in (run / "launch" / "train_experts.slurm").read_text()


def test_slurm_mem_without_a_unit_is_refused_naming_the_unit_to_add(tmp_path):
    """--mem 16 was written into the script as it was: sbatch reads it as 16 MB, a task killed at once for memory."""
    run = _tiny_run(tmp_path)
    code, err = cli("launch", run, "--emit", "slurm", "--mem", "16")
    assert code == 2 and "--mem '16': sbatch reads a number without a unit as megabytes (16 MB)" in err, err
    assert "--mem 16G for gigabytes, or --mem 16M if megabytes are meant" in err
    assert not (run / "launch" / "train_experts.slurm").exists()
    for mem in ("16G", "16000M", "0"):  # 0: all of a node's memory, to sbatch
        assert f"#SBATCH --mem={mem}\n" in slurm_script(tmp_path, 2, mem=mem)


def test_the_slurm_array_holds_the_experts_not_trained_yet(tmp_path):
    import sys

    from ddmkit.config import RunConfig, load_config
    from ddmkit.launch import write_slurm_script
    from ddmkit.pipeline.prepare import prepare_run_dir

    cfg = load_config(Path(__file__).parent / "configs" / "tiny.toml").model_dump()
    cfg["partition"]["k"] = 4
    run = prepare_run_dir(tmp_path / "run", RunConfig.model_validate(cfg), log=lambda m: None)
    for c in (1, 2):  # trained elsewhere already
        (run / "experts" / f"expert_{c:02d}").mkdir(parents=True)
        (run / "experts" / f"expert_{c:02d}" / "model.safetensors").write_bytes(b"")
    text = write_slurm_script(run).read_text()
    assert "#SBATCH --array=0,3" in text and f"{sys.executable} -m ddmkit train-expert" in text
    for c in (0, 3):
        (run / "experts" / f"expert_{c:02d}").mkdir(parents=True)
        (run / "experts" / f"expert_{c:02d}" / "model.safetensors").write_bytes(b"")
    (run / "launch" / "train_experts.slurm").unlink()
    assert write_slurm_script(run) is None and not (run / "launch" / "train_experts.slurm").exists()
    assert "#SBATCH --array=1-3,6" in slurm_script(run, 8, experts=[6, 1, 2, 3])


def test_slurm_task_runs_the_right_expert(tmp_path):
    """Run the script's body as SLURM would for task 1 (ddmkit replaced by a recorder)."""
    text = slurm_script(tmp_path, 3, ddmkit_cmd="echo")
    out = subprocess.run(["bash", "-c", text], env={"SLURM_ARRAY_TASK_ID": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "partition/shards/cluster_01.safetensors" in out.stdout and "experts/expert_01" in out.stdout


# ----- resuming and checkpoints under Ray, the errors of a Ray task ------------------------------------------

CKPT = CFG.model_copy(update={"train": CFG.train.model_copy(update={"checkpoint_every": 5})})


def _killed_at_step_10(job: ExpertJob, monkeypatch, config=CKPT) -> Path:
    """Train job inline until a crash after 12 steps: its checkpoint (of step 10) is left beside its folder."""
    import ddmkit.train.jobs as jobs

    real, calls = jobs.flow_matching_loss, []

    def loss(*a, **k):
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(jobs, "flow_matching_loss", loss)
        with pytest.raises(KeyboardInterrupt):
            run_jobs([job], config, "inline", log=lambda m: None)
    ckpt = checkpoint_path(job.out_dir)
    assert ckpt.exists() and not job.out_dir.exists()
    return ckpt


def test_a_ray_task_resumes_from_the_checkpoint_bytes_it_gets_and_streams_its_checkpoints(inline, tmp_path,
                                                                                            monkeypatch):
    """train_from_bytes (a Ray task's body, run here) continues from a step-10 checkpoint: it trains the 10
    steps left, sends back the checkpoint of step 15 as it writes it, and ends with inline's weights."""
    import ddmkit.train.jobs as jobs
    from ddmkit.io import read_metadata
    from ddmkit.launch.ray_backend import train_from_bytes

    root, ref = inline
    job = _jobs(root, "bytes")[0]
    ckpt = _killed_at_step_10(job, monkeypatch).read_bytes()
    real, calls = jobs.flow_matching_loss, []

    def slow_loss(*a, **k):  # slow enough for a poll every 10 ms to see every checkpoint
        calls.append(1)
        time.sleep(0.05)
        return real(*a, **k)

    monkeypatch.setattr(jobs, "flow_matching_loss", slow_loss)
    items = list(train_from_bytes(str(job.shard), job.shard.read_bytes(), CKPT.model_dump(), str(job.out_dir),
                                  ckpt, poll=0.01))
    assert len(calls) == 10  # steps 11 .. 20 only
    kinds = [kind for kind, _ in items]
    assert kinds[-1] == "expert" and set(kinds[:-1]) == {"checkpoint"}
    steps = []
    for _, data in items[:-1]:
        (tmp_path / "c.safetensors").write_bytes(data)
        steps.append(read_metadata(tmp_path / "c.safetensors")["step"])
    assert steps[0] == 15 and set(steps) <= {15, 20}  # 20's may be removed with the folder written before a look
    assert items[-1][1]["model.safetensors"] == ref[0]


def test_a_ray_tasks_errors_name_the_runs_paths_not_its_temporary_copies(inline, tmp_path, monkeypatch):
    from ddmkit.launch.ray_backend import train_from_bytes

    root, _ = inline
    job = _jobs(root, "paths")[0]
    with pytest.raises(DDMError) as info:
        list(train_from_bytes(str(job.shard), b"not a shard", CFG.model_dump(), str(job.out_dir)))
    assert str(job.shard) in str(info.value) and "ddmkit-expert-" not in str(info.value)
    other = CKPT.model_copy(update={"train": CKPT.train.model_copy(update={"seed": 7})})
    ckpt = _killed_at_step_10(job, monkeypatch, other).read_bytes()
    with pytest.raises(DDMError, match="train.seed") as info:
        list(train_from_bytes(str(job.shard), job.shard.read_bytes(), CKPT.model_dump(), str(job.out_dir), ckpt))
    assert str(checkpoint_path(job.out_dir)) in str(info.value) and "ddmkit-expert-" not in str(info.value)


def test_a_ray_tasks_cancel_between_two_items_still_removes_its_folder(tmp_path, monkeypatch):
    """Ray sends a task's items on between two steps of its generator (`for item in gen: report(item)`), and
    ray.cancel is a KeyboardInterrupt in the main thread (_thread.interrupt_main): one raised there, outside
    the generator, left it suspended at its yield with its temporary folder, which the driver's Ray shutdown
    then left behind (seen once: a SIGTERM-stopped Ray launch under load). The generator now raises it when Ray
    resumes it, its training stopped and its folder removed, and puts the SIGINT handler back."""
    import _thread
    import tempfile

    from ddmkit.launch.ray_backend import train_from_bytes

    job = _jobs(tmp_path, "cancelled", k=1)[0]
    worker = tmp_path / "worker"
    worker.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(worker))
    endless = CKPT.model_copy(update={"train": CKPT.train.model_copy(update={"steps": 10**6})})
    task = train_from_bytes(str(job.shard), job.shard.read_bytes(), endless.model_dump(), str(job.out_dir),
                            poll=0.01)
    handler, sent = signal.getsignal(signal.SIGINT), []

    def report(item):  # Ray's report of an item, where the cancel comes
        sent.append(item[0])
        assert list(worker.glob("ddmkit-expert-*"))
        _thread.interrupt_main()
        time.sleep(0.5)

    with pytest.raises(KeyboardInterrupt):
        for item in task:
            report(item)
    assert sent == ["checkpoint"] and not list(worker.glob("ddmkit-expert-*"))
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_ray_task_sends_back_the_whole_expert_folder_tensorboard_too(tmp_path):
    """A Ray task sent back only the expert folder's top-level files: with train.tensorboard = true an expert
    trained on Ray lacked the tensorboard/ folder the inline backend writes. Paths that would leave the folder
    are refused."""
    from ddmkit.launch.ray_backend import train_from_bytes, write_folder

    logged = CFG.model_copy(update={"train": CFG.train.model_copy(update={"tensorboard": True})})
    job = _jobs(tmp_path, "inline", k=1)[0]
    run_jobs([job], logged, "inline", log=lambda m: None)
    inline = sorted(p.relative_to(job.out_dir).parent / p.name[:20] for p in job.out_dir.rglob("*") if p.is_file())
    assert Path("tensorboard") in [p.parent for p in inline]
    *_, (kind, files) = train_from_bytes(str(job.shard), job.shard.read_bytes(), logged.model_dump(), "expert")
    sent = sorted(Path(name).parent / Path(name).name[:20] for name in files)  # an event file's name holds its time
    assert kind == "expert" and sent == inline
    ray = write_folder(tmp_path / "ray" / "expert_00", files)
    assert {p.relative_to(ray).as_posix(): p.read_bytes() for p in ray.rglob("*") if p.is_file()} == files
    for name in ("../escaped", "/tmp/escaped", "tensorboard/../../escaped", "tensorboard//x", "./x", ""):
        with pytest.raises(DDMError, match="not a relative path of plain names"):
            write_folder(tmp_path / "bad", {name: b"x"})
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "bad").exists()


def test_ray_resumes_the_checkpoint_a_killed_job_left_and_removes_it(inline, local_ray, monkeypatch):
    """A killed inline launch left expert 0's checkpoint: `ray` continues from it (one of other settings is
    refused, naming the run's checkpoint, without a remote traceback), writes inline's weights and leaves no
    checkpoint."""
    root, ref = inline
    jobs = _jobs(root, "ray_resume")
    other = CKPT.model_copy(update={"train": CKPT.train.model_copy(update={"seed": 7})})
    _killed_at_step_10(jobs[0], monkeypatch, other)
    with pytest.raises(DDMError) as info:
        run_jobs(jobs, CKPT, "ray", resume=True, log=lambda m: None)
    message = str(info.value)
    assert str(checkpoint_path(jobs[0].out_dir)) in message and "train.seed" in message
    assert "Traceback" not in message and "\x1b[" not in message and "ddmkit-expert-" not in message
    checkpoint_path(jobs[0].out_dir).unlink()
    _killed_at_step_10(jobs[0], monkeypatch)
    run_jobs(jobs, CKPT, "ray", resume=True, log=lambda m: None)
    assert _weights(jobs) == ref
    assert not list((root / "ray_resume").glob("*.checkpoint.safetensors"))


@pytest.mark.slow  # its tasks start workers of their own (TMPDIR set), importing torch: 10 to 15 s on 2 busy cores
def test_a_stopped_ray_launch_leaves_no_temporary_folder_on_its_workers(local_ray, tmp_path, monkeypatch):
    """Ctrl-C once both tasks train: the tasks were killed with their workers (ray.cancel with force), each
    leaving its temporary folder (a copy of its shard) in the worker's temporary directory. Now each stops its
    training and removes its folder before the launch ends; the checkpoints that came back are kept."""
    import ddmkit.launch.ray_backend as ray_backend

    workers_tmp = tmp_path / "workers"
    workers_tmp.mkdir()
    remote = local_ray.remote  # the tasks' workers get TMPDIR=workers_tmp
    env = {"env_vars": {"TMPDIR": str(workers_tmp)}}
    monkeypatch.setattr(local_ray, "remote", lambda function: remote(runtime_env=env)(function))
    jobs, came, training = _jobs(tmp_path, "stopped"), set(), []
    real_write = ray_backend.write_bytes_atomic

    def write(path, data):  # the driver writes a checkpoint that came back: Ctrl-C once each task sent one
        real_write(path, data)
        came.add(path)
        if len(came) == len(jobs):
            training.extend(workers_tmp.glob("ddmkit-expert-*"))
            raise KeyboardInterrupt

    monkeypatch.setattr(ray_backend, "write_bytes_atomic", write)
    endless = CKPT.model_copy(update={"train": CKPT.train.model_copy(update={"steps": 10**6})})
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, endless, "ray", log=lambda m: None)
    assert len(training) == len(jobs)  # each task's folder while it trained
    assert not list(workers_tmp.glob("ddmkit-expert-*"))
    assert all(checkpoint_path(job.out_dir).exists() and not job.out_dir.exists() for job in jobs)


# ----- the process pool stops on Ctrl-C, and its workers die with it ------------------------------------------

def _tiny_run(root: Path, *overrides: str) -> Path:
    from ddmkit.config import RunConfig, apply_overrides, load_config
    from ddmkit.pipeline.prepare import prepare_run_dir

    raw = apply_overrides(load_config(Path(__file__).parent / "configs" / "tiny.toml").model_dump(), list(overrides))
    return prepare_run_dir(root / "run", RunConfig.model_validate(raw), log=lambda m: None)


@pytest.fixture
def launched(tmp_path):
    """`ddmkit launch RUN --backend processes --workers 2` in its own session (two experts of 10^6 steps),
    once a job wrote a checkpoint: (driver, its workers' ids, run); any process left is killed after."""
    run = _tiny_run(tmp_path, "partition.k=2", "expert.train.steps=1000000", "expert.train.checkpoint_every=20")
    # the jobs on the CPU: on a machine with one GPU the pool would run one job at a time (one per GPU)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "CUDA_VISIBLE_DEVICES": ""}
    argv = [sys.executable, "-m", "ddmkit", "launch", str(run), "--backend", "processes", "--workers", "2"]
    ready = lambda: bool(list((run / "experts").glob("*.checkpoint.safetensors")))
    with started_with_children(argv, env, tmp_path / "launch.log", ready) as (driver, workers):
        yield driver, workers, run


@pytest.mark.slow  # once, in a fresh clone's first suite on 2 busy cores, the launch exited 1 (cause not found)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("to", ["group", "driver"])  # Ctrl-C in a terminal, or kill -INT of the driver
def test_ctrl_c_stops_the_process_pool_at_once(launched, to):
    """SIGINT while both workers train: exit 130 within seconds saying so, no worker left, no expert folder or
    staging folder written, each job's last checkpoint kept."""
    driver, workers, run = launched
    (os.killpg if to == "group" else os.kill)(driver.pid, signal.SIGINT)
    code = driver.wait(timeout=30)
    out = (run.parent / "launch.log").read_text()
    assert code == 130, out
    assert "interrupted" in out and "Traceback" not in out, out
    assert not any(alive(pid) for pid in workers)
    names = sorted(p.name for p in (run / "experts").iterdir())
    assert names and all(n.endswith(".checkpoint.safetensors") for n in names), names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_pool_workers_die_with_a_killed_driver(launched):
    driver, workers, run = launched
    driver.kill()
    deadline = time.monotonic() + 60  # a hang guard: a loaded machine takes seconds to end torch processes
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived their driver"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_killed_from_outside_is_a_clear_error(launched):
    """kill -9 of one pool worker (as the kernel's out-of-memory killer does): exit 2 with one message saying a
    worker died and that the same command resumes (before: a BrokenProcessPool traceback, exit 1); no worker
    left, each job's last checkpoint kept (and the killed worker's staging folder, removed by the next run)."""
    driver, workers, run = launched
    os.kill(workers[0], signal.SIGKILL)
    code = driver.wait(timeout=30)
    out = (run.parent / "launch.log").read_text()
    assert code == 2, out
    assert "a worker process of the pool died" in out and "run the same command" in out, out
    assert "Traceback" not in out, out
    assert not any(alive(pid) for pid in workers)
    names = sorted(p.name for p in (run / "experts").iterdir() if f".{workers[0]}-" not in p.name)
    assert names and all(n.endswith(".checkpoint.safetensors") for n in names), names


def test_a_failed_pool_job_stops_the_others_at_once(tmp_path):
    """Job 1 fails at once (its shard is not a safetensors file) while job 0 has 20000 steps to go: the error
    is raised without waiting for job 0, which is stopped before it writes its expert (before: the jobs were
    awaited in order, so job 0 trained to its end first)."""
    jobs = _jobs(tmp_path, "experts")
    jobs[1].shard.write_bytes(b"not a safetensors file")
    config = CFG.model_copy(update={"train": CFG.train.model_copy(update={"steps": 20000})})
    with pytest.raises(DDMError, match="cluster_01.safetensors"):
        run_jobs(jobs, config, "processes", workers=2, log=lambda m: None)
    assert not jobs[0].out_dir.exists()


def test_launch_settings_may_change_how_jobs_run_not_what_they_train(tmp_path, monkeypatch, capsys):
    """`ddmkit launch RUN --set expert.train.steps=30` trained 30-step experts in a run whose config.json says 60,
    and nothing noticed. check_same_training (called by launch) refuses it naming the field; settings of how the
    jobs run are accepted. So do `launch --emit slurm`, `train-router` and `train-monolith`, which took such
    --set items (the monolith, FLOP-matched to 60-step experts, then trained for other ones)."""
    from ddmkit.config import RunConfig, apply_overrides
    from ddmkit.pipeline.prepare import check_same_training, run_config

    run = _tiny_run(tmp_path)
    made = run_config(run)

    def asked(*sets):
        return RunConfig.model_validate(apply_overrides(made.model_dump(), list(sets)))

    for sets, named in ((["expert.train.steps=30"], "expert.train.steps (60, asked 30)"),
                        (["expert.net.kwargs.width=8"], "expert.net.kwargs.width (32, asked 8)"),
                        (["router.train.lr=0.1"], "router.train.lr")):
        with pytest.raises(DDMError) as info:
            check_same_training(run, asked(*sets))
        assert named in str(info.value) and "change only how the jobs run" in str(info.value), str(info.value)
    check_same_training(run, asked("expert.train.checkpoint_every=7", "expert.train.log_every=5",
                                   "expert.train.device=cpu", "router.train.tensorboard=true"))
    check_same_training(tmp_path / "no run here", asked("expert.train.steps=30"))  # nothing to compare with
    code, said = cli("launch", run, "--set", "expert.train.steps=30")
    assert code == 2 and said.startswith(f"error: --set: {run} was made") and "expert.train.steps (60, asked 30)" \
        in said, said  # the option given, not --config too
    assert not (run / "experts").exists()  # the command trained nothing
    for args, named in ((["launch", run, "--emit", "slurm", "--gpus", "0", "--set", "expert.train.steps=30"],
                         "expert.train.steps (60, asked 30)"),
                        (["train-router", run, "--set", "router.train.steps=5"], "router.train.steps"),
                        (["train-monolith", run, "--set", "expert.train.steps=5"], "expert.train.steps (60, asked 5)")):
        code, said = cli(*args)
        assert code == 2 and named in said and "change only how the jobs run" in said, said
    assert not (run / "launch").exists() and not (run / "router").exists() and not (run / "monolith").exists()
    code, said = cli("launch", run, "--emit", "slurm", "--gpus", "0", "--set",
                     "expert.train.checkpoint_every=7")
    assert code in (0, None) and (run / "launch" / "train_experts.slurm").exists(), said


def test_train_router_and_monolith_refuse_another_seed_as_another_training_setting(tmp_path):
    """`train-router RUN --seed N` / `train-monolith RUN --seed N` applied the seed after the check that refuses
    other training settings: a seed other than RUN/config.json's trained a router (monolith) that no record of
    the run knew of. The seed is a trained setting like any --set: another one is refused, naming the field, and
    the run's own trains as before."""
    import json

    run = tmp_path / "run"
    code, said = cli("partition", "--config", Path(__file__).parent / "configs" / "tiny.toml", "--out", run,
                     "--set", "expert.train.steps=3", "--set", "router.train.steps=3")
    assert code == 0, said
    made = json.loads((run / "config.json").read_text())["config"]
    seeds = {"router": made["router"]["train"]["seed"], "monolith": made["expert"]["train"]["seed"]}
    for command, folder, field in (("train-router", "router", "router"), ("train-monolith", "monolith", "expert")):
        seed = seeds[folder]
        code, said = cli(command, run, "--seed", seed + 5)  # named: the option given, not --set / --config too
        assert code == 2 and said.startswith(f"error: --seed: {run} was made with other "), said
        assert f"{field}.train.seed ({seed}, asked {seed + 5})" in said and "change only how the jobs run" in said
        code, said = cli(command, run, "--seed", seed + 5, "--set", f"{field}.train.log_every=7")
        assert code == 2 and said.startswith(f"error: --seed / --set: {run} was made with other "), said
        assert not (run / folder).exists()
    record = (run / "config.json").read_bytes()
    for command, folder in (("train-router", "router"), ("train-monolith", "monolith")):
        code, said = cli(command, run, "--seed", seeds[folder])  # the run's own seed: trained as config.json says
        assert code == 0 and (run / folder / "model.safetensors").exists(), said
        assert json.loads((run / folder / "config.json").read_text())["train"]["seed"] == seeds[folder]
    assert (run / "config.json").read_bytes() == record


# ----- the process pool's GPUs ---------------------------------------------------------------------------------

def test_a_pool_job_trains_on_one_of_the_gpus_this_process_was_given(monkeypatch):
    """A process given GPUs 2 and 3 (CUDA_VISIBLE_DEVICES=2,3, as SLURM without device cgroups or a user sets it)
    ran its pool's jobs on GPUs 0 and 1, someone else's: the job's GPU index was written as the GPU's name; UUID
    and MIG lists were lost the same way."""
    import queue

    import ddmkit.launch.backends as backends

    on_gpus = CFG.model_copy(update={"train": CFG.train.model_copy(update={"device": "auto"})})
    monkeypatch.setattr(backends, "cuda_count", lambda: 2)
    for visible, gpus in (("2,3", ["2", "3"]), ("GPU-5e1f,GPU-77a0", ["GPU-5e1f", "GPU-77a0"]),
                          ("MIG-0c1d,MIG-9f2e", ["MIG-0c1d", "MIG-9f2e"]), ("4,6,7", ["4", "6"]), (None, ["0", "1"])):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert backends.job_gpus(on_gpus) == gpus, visible
        assert backends.job_gpus(CFG) == []  # jobs that train on the CPU take no GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    free = queue.Queue()
    free.put("3")  # what the pool's queue holds once a job on GPU 2 has started
    monkeypatch.setattr(backends, "_FREE_GPUS", free)
    monkeypatch.setattr(backends, "train_expert", lambda *a, **k: os.environ["CUDA_VISIBLE_DEVICES"])
    assert backends._process_job(ExpertJob(1, Path("s"), Path("o")), CFG.model_dump(), False) == "3"
    assert free.get_nowait() == "3"  # given back when the job ended


def test_a_pool_job_on_cuda_n_trains_on_the_one_gpu_its_process_sees(monkeypatch):
    """train.device = "cuda:1" failed in every pool job: a job's process sees its GPU alone, as cuda:0."""
    import queue

    import ddmkit.launch.backends as backends

    on_gpu_1 = CFG.model_copy(update={"train": CFG.train.model_copy(update={"device": "cuda:1"})})
    free = queue.Queue()
    free.put("3")
    monkeypatch.setattr(backends, "_FREE_GPUS", free)
    monkeypatch.setattr(backends, "train_expert", lambda shard, config, *a, **k: config.train.device)
    assert backends._process_job(ExpertJob(1, Path("s"), Path("o")), on_gpu_1.model_dump(), False) == "cuda"
    monkeypatch.setattr(backends, "_FREE_GPUS", None)  # on CPUs nothing is changed
    assert backends._process_job(ExpertJob(1, Path("s"), Path("o")), on_gpu_1.model_dump(), False) == "cuda:1"


def _job_on_a_gpu(job: ExpertJob, config_dump: dict, resume: bool, networks: tuple = ()) -> str:
    """A pool job's body (backends._process_job) that trains nothing: on the GPU job_gpu gives it, job 0 runs
    until job 2 has started (60 s at most), the others end at once; returns 'GPU|start|end'."""
    from ddmkit.launch.backends import job_gpu

    with job_gpu() as gpu:
        start = time.time()
        (job.out_dir.parent / f"started_{job.cluster}").touch()
        while job.cluster == 0 and not (job.out_dir.parent / "started_2").exists() and time.time() < start + 60:
            time.sleep(0.05)
        return f"{gpu}|{start}|{time.time()}"


def test_no_two_running_pool_jobs_share_a_gpu(tmp_path, monkeypatch):
    """Each job's GPU was fixed when it was queued (job index mod GPUs), but the pool starts a queued job on
    whichever worker frees up: with 2 GPUs, job 2 (GPU 0) started when job 1 ended, beside job 0 on GPU 0,
    while GPU 1 idled. Now a job takes a free GPU when it starts: job 2 runs on the GPU job 1 left; and
    --workers 3 on 2 GPUs runs 2 jobs at a time, saying so."""
    import ddmkit.launch.backends as backends

    monkeypatch.setattr(backends, "cuda_count", lambda: 2)
    monkeypatch.setattr(backends, "_process_job", _job_on_a_gpu)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5e1f,GPU-77a0")
    on_gpus = CFG.model_copy(update={"train": CFG.train.model_copy(update={"device": "auto"})})
    jobs = [ExpertJob(c, tmp_path / f"cluster_{c:02d}", tmp_path / f"expert_{c:02d}") for c in range(3)]
    said = []
    rows = [str(out).split("|") for out in backends.run_processes(jobs, on_gpus, workers=3, log=said.append)]
    assert "--workers 3: 2 GPUs here, one job on each at a time, so 2 workers" in said
    runs = [(gpu, float(start), float(end)) for gpu, start, end in rows]
    assert {gpu for gpu, _, _ in runs} <= {"GPU-5e1f", "GPU-77a0"}, runs
    assert runs[0][2] > runs[2][1], runs  # job 0 ran until job 2 had started
    for i, (gpu, start, end) in enumerate(runs):
        for other, other_start, other_end in runs[i + 1:]:
            assert gpu != other or end <= other_start or other_end <= start, runs


# ----- launch --emit slurm: the options it uses, and those it refuses ---------------------------------------

def cli(*args) -> tuple[int, str]:
    """`ddmkit ARGS` in this process (conftest's run_cli): (exit code, stderr on one line)."""
    done = run_cli(*args)
    return done.returncode, " ".join(done.stderr.split())


@pytest.mark.parametrize("option, default", [("--partition", "the cluster's default partition"),
                                             ("--time", "24:00:00"), ("--mem", "16G")])
@pytest.mark.parametrize("value", ["", " ", "\t"])
def test_an_empty_slurm_option_is_refused_before_anything_is_written(tmp_path, option, default, value):
    """--partition '' wrote a script without a partition (exit 0), and --partition ' ' said 'slurm option
    partition=' ': only letters ...', naming neither the option nor leaving it out; --time '' and --mem '' were
    checked as their defaults first."""
    from ddmkit.layout import RunFolder

    run = _tiny_run(tmp_path)
    before = sorted(run.rglob("*"))
    code, err = cli("launch", run, "--emit", "slurm", option, value)
    said = f"{option} {value!r} is empty: leave {option} out to use {default}, or give a value"
    assert code == 2 and said in err, err
    assert sorted(run.rglob("*")) == before and not (run / "launch").exists()
    for c in range(4):  # every expert's weights there: nothing to write, the option refused all the same
        RunFolder(run).expert(c).mkdir(parents=True)
        (RunFolder(run).expert(c) / "model.safetensors").write_bytes(b"")
    code, err = cli("launch", run, "--emit", "slurm", option, value)
    assert code == 2 and said in err, err
    if option == "--partition":
        code, err = cli("launch", run, "--emit", "slurm", option, "a b")
        assert code == 2 and "leave --partition out to use the cluster's default partition" in err, err


def test_emit_slurm_where_sbatch_is_not_on_the_path_says_where_to_submit(tmp_path, monkeypatch):
    """Without sbatch the command said only "submit it with: sbatch ...", a command this machine has not; the
    script names this machine's run folder and Python, so it must be submitted where both are the same."""
    run = _tiny_run(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, err = cli("launch", run, "--emit", "slurm")
    assert code in (0, None) and "note: sbatch is not on this machine's PATH" in err, err
    assert str(run.resolve()) in err and sys.executable in err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    code, err = cli("launch", run, "--emit", "slurm")
    assert code in (0, None) and "sbatch is not" not in err, err


def test_emit_slurm_writes_the_set_fields_into_its_tasks_and_refuses_what_it_does_not_use(tmp_path, monkeypatch,
                                                                                          capsys):
    run = _tiny_run(tmp_path / "it's here")
    script = run / "launch" / "train_experts.slurm"
    for args, named in ((["--set", "expert.train.stepz=5"], "expert.train.stepz"),
                        (["--set", "router.train.steps=5"], "router.train.steps=5"),
                        (["--workers", "2", "--device", "cpu"], "--workers, --device"),
                        (["--backend", "ray"], "--backend"), (["--config", "demo"], "--config")):
        code, err = cli("launch", run, "--emit", "slurm", *args)
        assert code == 2 and named in err and not script.exists(), err
    code, err = cli("launch", run, "--time", "1:00:00")
    assert code == 2 and "--time" in err and "--emit slurm" in err, err
    code, err = cli("launch", run, "--emit", "slurm", "--mem", "16Q")  # checked first
    assert code == 2 and "--mem '16Q'" in err and not script.exists(), err
    code, err = cli("launch", run, "--emit", "slurm", "--set", "expert.train.checkpoint_every=7",
                    "--set", "expert.train.log_every=3", "--time", "01:00:00")
    assert code in (0, None), err
    assert f"sbatch {shlex.quote(str(script))}" in err
    text = script.read_text()
    assert "#SBATCH --time=01:00:00" in text
    env = {"SLURM_ARRAY_TASK_ID": "1", "PATH": "/usr/bin:/bin"}
    echoed = subprocess.run(["bash", "-c", text.replace(f"{sys.executable} -m ddmkit", "echo")], env=env,
                            capture_output=True, text=True).stdout.split()
    assert echoed[-4:] == ["--set", "expert.train.checkpoint_every=7", "--set", "expert.train.log_every=3"]


def test_emit_slurm_refuses_gpus_its_tasks_would_not_use_and_notes_a_job_without_checkpoints(tmp_path, monkeypatch,
                                                                                               capsys):
    """A run made on the CPU (expert.train.device = 'cpu', as `ddmkit run ... --device cpu` makes it) gave tasks
    that held a GPU each and trained on the CPU; a batch that --gpus does not split was told to change the batch,
    which the next emit refused (a setting of what the experts train); a script whose tasks never write a
    checkpoint promised --resume in silence."""
    run = _tiny_run(tmp_path, "expert.train.device=cpu", "expert.train.batch_size=64")
    script = run / "launch" / "train_experts.slurm"
    code, err = cli("launch", run, "--emit", "slurm")  # --gpus 1 by default
    assert code == 2 and "--gpus 1: the run's expert.train.device is 'cpu'" in err and "--gpus 0" in err, err
    assert not script.exists()
    code, err = cli("launch", run, "--emit", "slurm", "--gpus", "3", "--set",
                    "expert.train.device=auto")
    assert code == 2 and "use --gpus dividing it (one process per GPU of a task), e.g. --gpus 2" in err, err
    assert "--set" not in err, err
    code, err = cli("launch", run, "--emit", "slurm", "--gpus", "0", "--set",
                    "expert.train.device=cuda")
    assert code == 2 and "--gpus 0: the run's expert.train.device is 'cuda'" in err, err
    code, err = cli("launch", run, "--emit", "slurm", "--gpus", "0")
    assert code in (0, None) and script.exists() and "note: expert.train.checkpoint_every is 0" in err, err
    assert "note: each task holds 4 CPU cores (--cpus) and trains on 1 x expert.train.threads = 1; give --cpus 1" in err
    code, err = cli("launch", run, "--emit", "slurm", "--gpus", "2", "--cpus", "1", "--set",
                    "expert.train.device=auto", "--set", "expert.train.checkpoint_every=50")
    said = " ".join(err.split())
    assert code in (0, None) and "--nproc 2" in script.read_text() and "checkpoint_every" not in said, err
    assert "note: each task holds 1 CPU core (--cpus) for 2 x expert.train.threads = 2 threads" in said, err


def test_emit_slurm_names_gpus_for_a_batch_of_fewer_rows_than_a_tasks_gpus():
    """A task's --gpus N processes split the batch as --nproc N does (distributed.check_batch), named by its flag."""
    from ddmkit.config import RunConfig
    from ddmkit.launch.slurm import task_overrides

    cfg = RunConfig.model_validate({"expert": {"train": {"batch_size": 8, "device": "auto"}}})
    with pytest.raises(DDMError, match=r"^--gpus 16: expert\.train\.batch_size = 8 is fewer rows than the 16 "
                                       r"processes, one slice each; use 8 processes, or another count that divides 8 "):
        task_overrides(cfg, [], 16)
    with pytest.raises(DDMError, match=r"^--gpus 3: expert\.train\.batch_size = 8 does not split into 3 equal "
                                       r"slices, one per process; use --gpus dividing it .*, e\.g\. --gpus 2 "):
        task_overrides(cfg, [], 3)
    assert task_overrides(cfg, [], 4) == []


def test_emit_slurm_refuses_several_gpus_per_task_for_a_run_of_cuda_graphs(tmp_path, monkeypatch, capsys):
    """A run made with expert.train.cuda_graph = true and emitted with --gpus 2 wrote a script whose every task
    was refused on its node (a graph of one process's step cannot hold the exchange of gradients of --nproc 2).
    The script is refused before it is written; --gpus 1 writes it."""
    run = _tiny_run(tmp_path, "expert.train.cuda_graph=true")
    script = run / "launch" / "train_experts.slurm"
    code, err = cli("launch", run, "--emit", "slurm", "--gpus", "2")
    said = " ".join(err.split())
    assert code == 2 and "--gpus 2: the run's expert.train.cuda_graph is true" in said and "give --gpus 1" in said, err
    assert not script.exists()
    code, err = cli("launch", run, "--emit", "slurm", "--gpus", "1")
    assert code in (0, None) and script.exists() and "--nproc" not in script.read_text(), err


def test_distributed_md_says_what_emit_slurm_writes_for_several_gpus(tmp_path, monkeypatch, capsys):
    """The page said --emit slurm writes single-process tasks and that a task of N GPUs "would run" --nproc N,
    while --gpus N writes exactly that: the page now says so, as the script shows."""
    run = _tiny_run(tmp_path)
    code, err = cli("launch", run, "--emit", "slurm", "--gpus", "2")
    script = (run / "launch" / "train_experts.slurm").read_text()
    assert code in (0, None) and "#SBATCH --gres=gpu:2" in script and "--resume --nproc 2" in script, err
    page = " ".join((Path(__file__).parents[1] / "docs" / "distributed.md").read_text().split())
    assert ("`ddmkit launch --emit slurm` writes one task per expert, on one node: with `--gpus N` (N > 1) each task "
            "runs its line with `--nproc N` (and `#SBATCH --gres=gpu:N`)") in page
    assert "single-process task" not in page


def test_emit_slurm_replaces_only_a_script_it_wrote_and_writes_in_the_run_only_in_launch(tmp_path, monkeypatch,
                                                                                           capsys):
    """--script overwrote any file: RUN/config.json (every later command then failed), an expert's weights, the
    shard a task would train on, a user's notes. Now a path in the run outside RUN/launch/ and an existing file
    that is not a script ddmkit wrote are refused (exit 2), and nothing is written."""
    from ddmkit.launch.slurm import HEAD

    run = _tiny_run(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (tmp_path / "link.slurm").symlink_to(run / "config.json")
    kept = {p: p.read_bytes() for p in (run / "config.json", run / "partition" / "shards" / "cluster_00.safetensors",
                                        notes)}
    for script, said in ((run / "config.json", "inside the run folder"),
                         (run / "partition" / "shards" / "cluster_00.safetensors", "inside the run folder"),
                         (run / "mine.slurm", "inside the run folder"), (tmp_path / "link.slurm", "inside the run"),
                         (notes, "the file exists and is not a script ddmkit wrote")):
        code, err = cli("launch", run, "--emit", "slurm", "--script", script)
        assert code == 2 and f"--script {script}: {said}" in err, err
    assert {p: p.read_bytes() for p in kept} == kept and not (run / "mine.slurm").exists()
    assert not (run / "launch").exists()
    for script in (run / "launch" / "mine.slurm", tmp_path / "jobs.slurm", tmp_path / "jobs.slurm"):  # new, again
        code, err = cli("launch", run, "--emit", "slurm", "--script", script)
        assert code in (0, None) and script.read_text().startswith(HEAD) and "#SBATCH --array=0-3" in script.read_text()


def test_emit_slurm_for_some_experts_only(tmp_path, monkeypatch, capsys):
    """An organisation holding shards 0 and 1 of a run had no way to emit tasks for those alone: the array
    held every untrained expert (the tasks of the others would fail on shards it does not have)."""
    run = _tiny_run(tmp_path)
    script = run / "launch" / "train_experts.slurm"
    code, err = cli("launch", run, "--emit", "slurm", "--expert", "1", "--expert", "0")
    assert code in (0, None) and "#SBATCH --array=0-1\n" in script.read_text(), err
    code, err = cli("launch", run, "--emit", "slurm", "--expert", "4")
    assert code == 2 and "--expert 4: the run has experts 0 .. 3" in err, err
    code, err = cli("launch", run, "--expert", "0")
    assert code == 2 and "--expert: options of the SLURM script; add --emit slurm" in err, err
    for c in (0, 1):  # trained: nothing to do for those
        (run / "experts" / f"expert_{c:02d}").mkdir(parents=True)
        (run / "experts" / f"expert_{c:02d}" / "model.safetensors").write_bytes(b"")
    script.unlink()
    code, err = cli("launch", run, "--emit", "slurm", "--expert", "0", "--expert", "1")
    assert code in (0, None) and "the experts asked (0, 1) of" in err and not script.exists(), err


def test_emit_slurm_at_a_site_without_some_shards_names_them(tmp_path, monkeypatch, capsys):
    """A site holding shards 0 and 1 got an array of every expert, whose other tasks failed on the cluster."""
    run = _tiny_run(tmp_path)
    for c in (2, 3):
        (run / "partition" / "shards" / f"cluster_{c:02d}.safetensors").unlink()
    script = run / "launch" / "train_experts.slurm"
    code, err = cli("launch", run, "--emit", "slurm")
    assert code == 2 and "lacks the shards of clusters 2, 3, whose tasks would fail; give --expert for the shards " \
        "here (--expert 0 --expert 1)" in " ".join(err.split()) and not script.exists(), err
    code, err = cli("launch", run, "--emit", "slurm", "--expert", "0", "--expert", "1")
    assert code in (0, None) and "#SBATCH --array=0-1\n" in script.read_text(), err
    code, err = cli("launch", run)  # refused: it left an empty experts/ folder
    assert code == 2 and "cluster_02.safetensors is missing" in err and not (run / "experts").exists(), err


def test_emit_slurm_refuses_a_shard_cut_short_naming_the_fix(tmp_path, monkeypatch, capsys):
    """A shard cut short in copying (or changed since partitioning) was emitted as a task, which failed on the
    cluster saying to "re-train or re-copy it"; `ddmkit launch` refused the same run at once."""
    run = _tiny_run(tmp_path)
    shard = run / "partition" / "shards" / "cluster_02.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    script = run / "launch" / "train_experts.slurm"
    code, err = cli("launch", run, "--emit", "slurm")
    assert code == 2 and "cluster_02.safetensors: SHA-256 differs" in err and "Copy the original back" in err, err
    assert not script.exists()
    code, err = cli("launch", run, "--emit", "slurm", "--expert", "0", "--expert", "1")  # the tasks of good shards
    assert code in (0, None) and "#SBATCH --array=0-1\n" in script.read_text(), err
    shard.write_bytes(whole)  # the fix it names
    code, err = cli("launch", run, "--emit", "slurm")
    assert code in (0, None) and "#SBATCH --array=0-3\n" in script.read_text(), err


# ----- a Ray cluster that cannot be reached -------------------------------------------------------------------

def test_a_ray_address_that_cannot_be_reached_is_named_with_rays_last_line():
    """A failure of ray.init can hold a whole traceback: only its last line is shown."""
    import socket
    from types import SimpleNamespace

    from ddmkit.launch.ray_backend import start_ray

    def init(**kwargs):
        raise ConnectionError("Initialization failure:\nTraceback (most recent call last):\n  File "
                              "\"node.py\", line 772\nRuntimeError: Failed to connect to Ray cluster.")

    fake = SimpleNamespace(is_initialized=lambda: False, init=init)
    with socket.socket() as server, pytest.raises(DDMError) as info:  # an address that answers: ray.init is called
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start_ray(fake, address, None)
    assert str(info.value).startswith(f"--address: cannot connect to Ray at {address}: RuntimeError: Failed to "
                                      "connect to Ray cluster;")
    assert "Traceback" not in str(info.value)


class AuthenticationError(Exception):
    """As ray.exceptions.AuthenticationError: its str adds Ray's own help to its message."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message + ". Ensure that the token for the cluster is available in a local file ..."


def _wrapped_auth_error():
    """As ray.init raises a refused token: ConnectionError('Failed to connect ...') from the GCS client's error."""
    try:
        raise RuntimeError("GCS call failed:\nInvalidAuthToken: Authentication token is missing or incorrect")
    except RuntimeError as e:
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from e


def _no_token_error():
    """As ray.init raises with RAY_AUTH_MODE=token and no token to read."""
    raise AuthenticationError("Token authentication is enabled but no authentication token was found")


@pytest.mark.parametrize("init, said", [
    (_wrapped_auth_error, "(InvalidAuthToken: Authentication token is missing or incorrect)"),
    (_no_token_error, "(Token authentication is enabled but no authentication token was found);")])
def test_a_ray_cluster_refusing_the_token_says_how_to_give_it(init, said):
    """A cluster with Ray's token authentication refused ray.init, and the error said to start the cluster or fix
    --address: it says the cluster requires its token and where Ray reads one (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    import socket
    from types import SimpleNamespace

    from ddmkit.launch.ray_backend import start_ray

    fake = SimpleNamespace(is_initialized=lambda: False, init=lambda **kwargs: init())
    with socket.socket() as server, pytest.raises(DDMError) as info:  # an address that answers: ray.init is called
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start_ray(fake, address, None)
    message = str(info.value)
    assert message.startswith(f"--address: the Ray cluster at {address} requires its authentication token {said}")
    assert "set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, or in a file named by " \
        "RAY_AUTH_TOKEN_PATH or at ~/.ray/auth_token" in message and "ray start --head" not in message, message
    assert "Ensure that" not in message and "\n" not in message, message


def test_a_ray_client_address_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """Ray Client (ray://HOST:10001) cannot run the streaming tasks that bring the checkpoints back: `launch
    --address ray://...` failed after Ray started, with a traceback ending in Ray's 'Streaming ... are not
    currently supported when using Ray Client'."""
    from types import SimpleNamespace

    import ddmkit.launch.ray_backend as ray_backend

    run = _tiny_run(tmp_path, "partition.k=2")
    before = sorted(run.rglob("*"))
    monkeypatch.setattr(ray_backend, "import_ray", lambda: pytest.fail("Ray was imported"))
    code, err = cli("launch", run, "--backend", "ray", "--address", "ray://127.0.0.1:10001")
    assert code == 2 and err.startswith("error: --address ray://127.0.0.1:10001: Ray Client (a ray:// address) "
                                        "cannot run the streaming tasks"), err
    assert "--address auto or HOST:6379" in err and "ray job submit --address http://HOST:8265 -- ddmkit " \
        "launch RUN --backend ray --address auto" in err, err
    assert sorted(run.rglob("*")) == before  # nothing written: no experts/ folder, no lock
    fake = SimpleNamespace(is_initialized=lambda: False, init=lambda **kwargs: pytest.fail("ray.init was called"))
    with pytest.raises(DDMError, match="^--address ray://head:10001: Ray Client"):  # run_ray called from Python
        ray_backend.start_ray(fake, "ray://head:10001", None)


@needs_ray
@pytest.mark.parametrize("address", ["auto", "head:6379", "10.0.0.5:6379", None])
def test_the_addresses_ray_runs_streaming_tasks_on_pass_the_launch_check(address):
    from ddmkit.launch import check_launch

    check_launch("ray", None, address)


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_workers_below_one_are_refused_with_what_works(backend):
    """--workers 0 was told "must be >= 1, got 0" and no more: the one line names what works, 1 or more, or the
    option left out for its default."""
    from ddmkit.launch import check_launch

    with pytest.raises(DDMError, match=r"^--workers must be >= 1, got 0; give 1 or more, or leave --workers out for "
                                       r"the default \(one per job, .*\)$"):
        check_launch(backend, 0)


@needs_ray
def test_ray_address_in_the_environment_is_the_cluster_ray_connects_to_and_a_client_one_is_refused(monkeypatch):
    """Ray reads RAY_ADDRESS (set inside a Ray job) when no address or auto is given: a ray:// one reached Ray
    Client's streaming refusal (a traceback), and a cluster's one made ddmkit's local Ray ask an existing cluster
    for num_cpus (Ray refuses that). It is checked as --address is, named as RAY_ADDRESS, and connected to."""
    from types import SimpleNamespace

    import ddmkit.launch.ray_backend as ray_backend
    from ddmkit.launch import check_launch

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    for address in (None, "auto"):
        with pytest.raises(DDMError, match=r"^RAY_ADDRESS=ray://head:10001: Ray Client .* unset RAY_ADDRESS and run "):
            check_launch("ray", None, address)
    check_launch("ray", None, "head:6379")  # given, --address wins
    check_launch("processes", None, None)  # no Ray: the variable is not read
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    inits, reached = [], []
    monkeypatch.setattr(ray_backend, "check_reachable", lambda address, given: reached.append((address, given)))
    fake = SimpleNamespace(is_initialized=lambda: False, init=lambda **kwargs: inits.append(kwargs))
    assert ray_backend.start_ray(fake, None, 2)
    assert reached == [("head:6379", "RAY_ADDRESS=head:6379")] and inits[0]["address"] == "head:6379" \
        and "num_cpus" not in inits[0]
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_backend.start_ray(fake, None, 2) and inits[1]["num_cpus"] == 2 and "address" not in inits[1]


def test_a_host_port_address_where_nothing_answers_is_refused_before_ray_retries_it_for_ever():
    """ray.init(address="HOST:6379") with no cluster there retried for ever (12 minutes and more, Ctrl-C slow)."""
    import socket
    from types import SimpleNamespace

    from ddmkit.launch.ray_backend import start_ray

    reached = []

    def init(**kwargs):  # a real ray.init would retry the address for ever
        reached.append(kwargs["address"])
        raise ConnectionError("ray.init reached")

    with socket.socket() as closed:  # a port of this machine that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    fake = SimpleNamespace(is_initialized=lambda: False, init=init)
    with pytest.raises(DDMError, match=rf"--address: cannot connect to Ray at 127.0.0.1:{port}: .*ray start --head"):
        start_ray(fake, f"127.0.0.1:{port}", None)
    assert reached == []
    with socket.socket() as server:  # one that answers: handed on to ray.init
        server.bind(("127.0.0.1", 0))
        server.listen()
        with pytest.raises(DDMError, match="ray.init reached"):
            start_ray(fake, f"127.0.0.1:{server.getsockname()[1]}", None)
    assert len(reached) == 1


def test_a_connection_error_is_not_reported_as_a_file_system_error(tmp_path, monkeypatch, capsys):
    import ddmkit.pipeline.stages as stages

    run = _tiny_run(tmp_path, "partition.k=2")

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("Traceback (most recent call last):\n  ...\nthe server said no")

    monkeypatch.setattr(stages, "run_jobs", refused)
    code, err = cli("launch", run)
    assert code == 2 and "a connection failed: the server said no; check the server's address" in err, err
    assert "check that path" not in err and "Traceback" not in err


def test_starting_ray_keeps_the_commands_sigterm_handler():
    """ray.init sets a SIGTERM handler of its own (sys.exit): `ddmkit launch --backend ray` stopped by SIGTERM
    printed Ray's crash dump and exited 1, not 'stopped by SIGTERM' and 143 with its checkpoints kept."""
    from types import SimpleNamespace

    from ddmkit.launch.ray_backend import start_ray

    def init(**kwargs):  # what ray.init does to the driver's SIGTERM
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    ours = lambda signum, frame: None
    before = signal.signal(signal.SIGTERM, ours)
    try:
        assert start_ray(SimpleNamespace(is_initialized=lambda: False, init=init), None, 1)
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)


def test_stopping_ray_puts_the_commands_sigterm_handler_back_in_c():
    """ray.shutdown() resets SIGTERM's action in C to the default while signal.getsignal still names the command's
    handler: a SIGTERM after a Ray launch (while the registry was written) killed `ddmkit launch` outright, with no
    'stopped by SIGTERM', and its locks left in the run."""
    import ctypes
    from types import SimpleNamespace

    from ddmkit.launch.ray_backend import stop_ray

    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]

    def action_in_c():  # the address of the C-level handler (None: SIG_DFL), read by setting it and back
        current = libc.signal(signal.SIGTERM, None)
        libc.signal(signal.SIGTERM, current)
        return current

    ours = lambda signum, frame: None
    before = signal.signal(signal.SIGTERM, ours)
    try:
        handled = action_in_c()
        assert handled
        stop_ray(SimpleNamespace(shutdown=lambda: libc.signal(signal.SIGTERM, None)))  # what Ray's shutdown does
        assert signal.getsignal(signal.SIGTERM) is ours
        assert action_in_c() == handled
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_while_ray_shuts_down_is_raised_once_ray_is_down():
    """A SIGTERM during ray.shutdown() (after the jobs, or after a Ctrl-C) raised the command's Terminated inside it:
    Ray was left half stopped. It now waits for the shutdown's end, and the command's handler is set again."""
    from types import SimpleNamespace

    from ddmkit.launch.ray_backend import stop_ray

    class Stop(KeyboardInterrupt):
        pass

    def ours(signum, frame):
        raise Stop

    steps = []

    def shutdown():
        steps.append("began")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # a handler that raises does so here
        steps.append("ended")

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with pytest.raises(Stop):
            stop_ray(SimpleNamespace(shutdown=shutdown))
        assert steps == ["began", "ended"] and signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)


def test_ray_is_shut_down_when_a_stop_interrupts_the_wait_for_its_tasks(monkeypatch):
    """A SIGTERM (Ray turns it into a KeyboardInterrupt) while stop_tasks waited for the tasks of a launch stopped
    by Ctrl-C skipped ray.shutdown(): the local Ray went only at the interpreter's exit."""
    from types import SimpleNamespace

    import ddmkit.launch.ray_backend as ray_backend

    def ctrl_c():
        raise KeyboardInterrupt

    fake = SimpleNamespace(cluster_resources=ctrl_c)
    stopped = []
    monkeypatch.setattr(ray_backend, "import_ray", lambda: fake)
    monkeypatch.setattr(ray_backend, "start_ray", lambda ray, address, workers: True)
    monkeypatch.setattr(ray_backend, "stop_tasks", lambda ray, generators: ctrl_c())
    monkeypatch.setattr(ray_backend, "stop_ray", stopped.append)
    with pytest.raises(KeyboardInterrupt):
        ray_backend.run_ray([], CFG)
    assert stopped == [fake]


SIGTERM_CAUGHT = """
import signal, sys, threading
from ddmkit.launch.ray_backend import import_ray, start_ray, stop_ray

def caught():  # whether SIGTERM has a handler in C (else the default action: the process dies), read from /proc
    with open("/proc/self/status") as f:
        mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)

signal.signal(signal.SIGTERM, lambda signum, frame: None)
ray = import_ray()
assert start_ray(ray, None, 1)
lost, done = [], threading.Event()

def watch():
    while not done.is_set():
        if not caught():
            lost.append(1)
        done.wait(0.001)

watcher = threading.Thread(target=watch)
watcher.start()
stop_ray(ray)
done.set()
watcher.join()
sys.exit(3 if lost or not caught() else 0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_keeps_its_handler_while_a_local_ray_shuts_down():
    """ray.shutdown() set SIGTERM's action in C back to the default for about a second (Ray's crash handler
    removed): a SIGTERM then killed `ddmkit launch --backend ray` outright, with no 'stopped by SIGTERM'."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'ddmkit[ray]' to run the Ray tests")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", SIGTERM_CAUGHT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_sigterm_that_a_library_turns_into_a_keyboardinterrupt_still_reads_as_sigterm(tmp_path, monkeypatch):
    """Ray's ray.wait turns the exception a signal handler raises into a plain KeyboardInterrupt: `ddmkit launch
    --backend ray` stopped by SIGTERM said 'interrupted' and exited 130, not 'stopped by SIGTERM' and 143."""
    import ddmkit.pipeline.stages as stages

    run = _tiny_run(tmp_path, "partition.k=2")

    def stopped_in_ray_wait(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the command's handler raises its Terminated here
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        raise KeyboardInterrupt  # what Ray's check_status raises instead, with no cause or context

    monkeypatch.setattr(stages, "run_jobs", stopped_in_ray_wait)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a command of its own (a Ray started in this
    try:  # process by another test set its own)
        code, err = cli("launch", run)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143 and err.startswith("stopped by SIGTERM") and "the finished experts are kept" in err, err

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_jobs", ctrl_c)  # the next command starts afresh: a Ctrl-C is Ctrl-C again
    code, err = cli("launch", run)
    assert code == 130 and err.startswith("interrupted:"), err


class _RayStoppedBySigterm:
    """A stand-in for the ray module whose start (ray.init, before or after it sets its own SIGTERM handler, as
    Ray's sets sys.exit) or first look at the cluster (the jobs' start) gets a SIGTERM, sent to the main thread."""

    def __init__(self, at: str):
        self.at, self.up, self.shut_down = at, False, 0

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **kwargs) -> None:
        if self.at == "init, after ray's handler":
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        if self.at.startswith("init"):
            self.sigterm()
        self.up = True

    def cluster_resources(self) -> dict:
        self.sigterm()
        return {"CPU": 2}

    def shutdown(self) -> None:
        self.up, self.shut_down = False, self.shut_down + 1

    @staticmethod
    def sigterm() -> None:
        import threading

        main = threading.main_thread().ident
        threading.Thread(target=signal.pthread_kill, args=(main, signal.SIGTERM)).start()
        time.sleep(30)  # the handler's exception ends it


@pytest.mark.parametrize("at", ["init, before ray's handler", "init, after ray's handler"])
def test_a_sigterm_while_ray_starts_stops_the_launch_as_one_while_its_jobs_run(tmp_path, monkeypatch, at):
    """A SIGTERM during ray.init (once Ray set its handler: sys.exit) ended `ddmkit launch --backend ray` with
    status 15 and no word; now it says what a SIGTERM while the jobs run says, exits 143, and Ray is shut down."""
    run = _tiny_run(tmp_path, "partition.k=2")
    said = {}
    for when in (at, "jobs"):
        ray = _RayStoppedBySigterm(when)
        monkeypatch.setitem(sys.modules, "ray", ray)
        before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a command of its own
        try:
            said[when] = cli("launch", run, "--backend", "ray")
        finally:
            signal.signal(signal.SIGTERM, before)
        assert ray.shut_down == 1 and not ray.up, when
    code, err = said["jobs"]
    assert code == 143 and err.startswith("stopped by SIGTERM") and "Traceback" not in err, err
    assert said[at] == said["jobs"]


@pytest.mark.slow  # a local Ray starts in about 10 s on 2 busy cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_a_ray_launch_keeping_its_checkpoints(tmp_path):
    """SIGTERM (a scheduler's time limit) to `ddmkit launch --backend ray` once a checkpoint came back: exit 143
    saying so, no traceback, each job's checkpoint kept and no expert folder written; the tasks' temporary
    folders are removed."""
    import tempfile

    pytest.importorskip("ray", reason="Ray is not installed: pip install 'ddmkit[ray]' to run the Ray tests")
    run = _tiny_run(tmp_path, "partition.k=2", "expert.train.steps=1000000", "expert.train.checkpoint_every=20")
    workers_tmp = tmp_path / "workers"  # the tasks' TMPDIR (Ray's own folder stays where it was: a socket's path
    workers_tmp.mkdir()  # has at most 107 characters)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "CUDA_VISIBLE_DEVICES": "",
           "DDMKIT_QUIET": "1", "TMPDIR": str(workers_tmp),
           "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", tempfile.gettempdir())}
    argv = [sys.executable, "-m", "ddmkit", "launch", str(run), "--backend", "ray", "--workers", "2"]
    with open(tmp_path / "launch.log", "w") as log:
        driver = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list((run / "experts").glob("*.checkpoint.safetensors")) and time.monotonic() < deadline:
            assert driver.poll() is None, (tmp_path / "launch.log").read_text()
            time.sleep(0.2)
        training = list(workers_tmp.glob("ddmkit-expert-*"))
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    out = (tmp_path / "launch.log").read_text()
    assert code == 143 and "stopped by SIGTERM" in out and "Traceback" not in out, out
    assert training and not list(workers_tmp.glob("ddmkit-expert-*"))
    names = sorted(p.name for p in (run / "experts").iterdir())
    assert names and all(n.endswith(".checkpoint.safetensors") for n in names), names


def test_a_pool_broken_by_ctrl_c_reads_as_ctrl_c():
    """Ctrl-C to the process group can end a worker (exit 130) before the driver's own KeyboardInterrupt: the
    broken pool then read as 'a worker process died' (exit 2; seen once in a full suite) instead of Ctrl-C."""
    from types import SimpleNamespace

    from ddmkit.launch.backends import stopped_by_ctrl_c

    running, writer = os.pipe()  # a running worker's sentinel: not ready
    try:
        ended = lambda *codes: [SimpleNamespace(exitcode=c, sentinel=running) for c in codes]  # noqa: E731
        assert stopped_by_ctrl_c(ended(130, None)) and stopped_by_ctrl_c(ended(-signal.SIGINT, 0))
        assert not stopped_by_ctrl_c(ended(-signal.SIGKILL, 130)) and not stopped_by_ctrl_c(ended(None, 0))
        assert not stopped_by_ctrl_c([])
    finally:
        os.close(running)
        os.close(writer)


def _reaped_late_by_another_thread(monkeypatch) -> None:
    """os.waitpid as it runs when another thread (the pool's own) reaps a process at the same time as the main
    thread: the other thread reaps it first and records its status late (descheduled right after its waitpid),
    so the main thread's waitpid finds no such child and multiprocessing reads None, as for a running process."""
    import threading

    real_waitpid, reaped = os.waitpid, threading.Event()

    def waitpid(pid, options):
        if threading.current_thread() is threading.main_thread():
            reaped.wait(30)
            return real_waitpid(pid, options)
        out = real_waitpid(pid, options)
        if out[0] == pid:
            reaped.set()
            time.sleep(1.0)
        return out
    monkeypatch.setattr(os, "waitpid", waitpid)


def test_a_ctrl_c_reads_as_ctrl_c_when_another_thread_reaped_the_worker(monkeypatch):
    """The pool's own thread reaps its workers too: a worker ended by Ctrl-C (exit 130) that it reaped while the
    driver read the exit statuses read as running (None), and the pool as broken by a worker that died."""
    import multiprocessing.connection
    import threading

    from ddmkit.launch.backends import stopped_by_ctrl_c

    worker = multiprocessing.get_context("spawn").Process(target=os._exit, args=(130,))
    worker.start()
    assert multiprocessing.connection.wait([worker.sentinel], 60)
    _reaped_late_by_another_thread(monkeypatch)
    threading.Thread(target=worker.join, daemon=True).start()
    assert stopped_by_ctrl_c([worker]) and worker.exitcode == 130


def test_stop_workers_returns_with_the_exit_status_of_a_worker_the_pool_reaped(monkeypatch):
    """The pool's own thread reaps its workers too: stop_workers took a worker it reaped for a running one (killed
    it again) and returned while its exit status was still None (the lost-KeyboardInterrupt pool test failed so,
    2 times in about 60 runs)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ddmkit.launch.backends import stop_workers

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(time.sleep, 600)
    worker = next(iter(pool._processes.values()))
    _reaped_late_by_another_thread(monkeypatch)
    sent, kill = [], os.kill
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(signum) or kill(pid, signum))
    stop_workers(pool, grace=30.0)
    assert worker.exitcode == -signal.SIGTERM and signal.SIGKILL not in sent, (worker.exitcode, sent)


def test_task_notes_say_when_a_tasks_threads_outnumber_its_cores():
    """--gpus 2 --cpus 1 ran two processes on one core without a word."""
    from ddmkit.config import RunConfig
    from ddmkit.launch.slurm import task_notes
    cfg = RunConfig()
    notes = task_notes(cfg, cpus=1, gpus=2)
    assert any(f"for 2 x expert.train.threads = {2 * cfg.expert.train.threads} threads, which then share cores" in n
               for n in notes), notes
    assert not any("share cores" in n for n in task_notes(cfg, cpus=2 * cfg.expert.train.threads, gpus=2))


def test_counts_of_one_are_said_in_the_singular(tmp_path, monkeypatch):
    """'each task holds 1 CPU cores', and on a machine of one GPU '1 GPU(s) here, ... so 1 workers' and
    '(process pool, 1 workers)'."""
    import ddmkit.launch.backends as backends
    from ddmkit.config import RunConfig
    from ddmkit.launch.slurm import task_notes

    assert [n for n in task_notes(RunConfig(), cpus=1, gpus=2) if n.startswith("each task holds 1 CPU core (--cpus)")]
    monkeypatch.setattr(backends, "cuda_count", lambda: 1)
    monkeypatch.setattr(backends, "_process_job", _job_on_a_gpu)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    on_gpu = CFG.model_copy(update={"train": CFG.train.model_copy(update={"device": "auto"})})
    said = []
    backends.run_processes([ExpertJob(1, tmp_path / "cluster_01", tmp_path / "expert_01")], on_gpu, workers=2,
                           log=said.append)
    assert said == ["--workers 2: 1 GPU here, one job on it at a time, so 1 worker",
                    f"expert 1: written to {tmp_path / 'expert_01'} (process pool, 1 worker)"], said


def _deaf_to_sigterm(ready) -> None:
    """A pool worker whose stop was lost: it ignores SIGTERM and works on."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(600)


def test_a_pool_worker_that_does_not_stop_is_killed_after_the_grace_time():
    """stop_workers waited for ever on a worker whose stop (the KeyboardInterrupt raised by its SIGTERM handler)
    was lost: it now kills a worker still alive after the grace time."""
    import multiprocessing
    from types import SimpleNamespace

    from ddmkit.launch.backends import stop_workers

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    worker = ctx.Process(target=_deaf_to_sigterm, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(60)
    pool = SimpleNamespace(_processes={worker.pid: worker}, shutdown=lambda **kwargs: None)
    start = time.monotonic()
    stop_workers(pool, grace=1.0)
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL and time.monotonic() - start < 30


class _DroppedStop:
    """Calls a pool worker's stop handler (_stop_job) from its __del__: Python drops the KeyboardInterrupt it
    raises there ("Exception ignored in ..."), as it did when SIGTERM came while a __del__ ran."""

    def __del__(self):
        from ddmkit.launch.backends import _stop_job
        _stop_job(signal.SIGTERM, None)


def _job_whose_stop_is_lost(job: ExpertJob, config_dump: dict, resume: bool) -> str:
    """A pool job (backends._process_job) whose SIGTERM runs its handler inside a __del__."""
    from ddmkit.launch.backends import _process_job

    signal.signal(signal.SIGTERM, lambda signum, frame: _DroppedStop())  # dies at once: its __del__ runs
    return _process_job(job, config_dump, resume)


@pytest.mark.slow  # failed 2 times in about 60 runs (once its exit status None after a stop of 0.06 s: the pool's
#                    thread had reaped the worker, see test_stop_workers_returns_with_the_exit_status_of_a_worker_the_
#                    pool_reaped); the default suite keeps the in-process and fit-level tests of the flag
def test_a_pool_job_whose_keyboardinterrupt_is_lost_stops_at_its_next_step(tmp_path):
    """A stopped job whose KeyboardInterrupt was lost trained all its steps, and stop_workers waited for it; now
    the handler's flag stops it at its next step: the worker exits 130 well within the grace time (not killed),
    leaving the job's last checkpoint and no staging folder."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ddmkit.launch.backends import _start_worker, stop_workers

    job = _jobs(tmp_path, "experts", k=1)[0]
    config = CFG.model_copy(update={"train": CFG.train.model_copy(update={"steps": 10 ** 6, "checkpoint_every": 5})})
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(os.getpid(),)) as pool:
        pool.submit(_job_whose_stop_is_lost, job, config.model_dump(), False)
        worker = next(iter(pool._processes.values()))
        deadline = time.monotonic() + 120
        while not checkpoint_path(job.out_dir).exists():
            assert worker.is_alive() and time.monotonic() < deadline, (worker.exitcode, time.monotonic() - deadline)
            time.sleep(0.05)
        start = time.monotonic()
        stop_workers(pool, grace=30.0)
        stopped = time.monotonic() - start
    assert worker.exitcode == 130 and stopped < 30, (worker.exitcode, stopped)
    assert [p.name for p in job.out_dir.parent.iterdir()] == [checkpoint_path(job.out_dir).name]


def test_a_pool_job_stopped_after_its_last_step_leaves_the_pool(tmp_path, monkeypatch):
    """A stop whose KeyboardInterrupt was lost after the job's last step (while it wrote its folder): the worker
    leaves the pool as a stopped one does (exit 130, sending no result, taking no other job); a job after a
    stopped one in the same process (were there one) starts unstopped."""
    import ddmkit.launch.backends as backends

    def stopped_while_writing(shard, config, out_dir, resume=False):
        try:
            backends._stop_job(signal.SIGTERM, None)
        except KeyboardInterrupt:  # lost
            pass
        return out_dir

    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(backends.os, "_exit", exit_)
    monkeypatch.setattr(backends, "train_expert", stopped_while_writing)
    job = ExpertJob(0, tmp_path / "shard", tmp_path / "expert_00")
    with pytest.raises(SystemExit) as info:
        backends._process_job(job, CFG.model_dump(), False)
    assert info.value.code == 130 and backends._STATE == "idle"
    monkeypatch.setattr(backends, "train_expert", lambda shard, config, out_dir, resume=False: out_dir)
    assert backends._process_job(job, CFG.model_dump(), False) == str(job.out_dir)


def test_task_notes_say_that_experts_trained_together_train_alone_in_the_tasks():
    """A run of expert.concurrent = true got a SLURM array whose tasks each trained one expert alone
    (train-expert), weights other than the run's one job trains, without a word."""
    from ddmkit.config import ExpertConfig, RunConfig
    from ddmkit.launch.slurm import task_notes

    together = RunConfig(expert=ExpertConfig(concurrent=True))
    assert any(n.startswith("expert.concurrent is true, but each task trains its expert alone (`ddmkit train-expert`)")
               and "run `ddmkit launch RUN` on one GPU node" in n for n in task_notes(together)), task_notes(together)
    assert not any("expert.concurrent" in n for n in task_notes(RunConfig()))
