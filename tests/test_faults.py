"""Fault injection: `ddmkit run` killed with SIGKILL at seeded points (mid-write of a file: data,
partition, checkpoint, weights, registry, samples; or at a seeded time after a stage starts), then
run again on the same folder: every file equals an uninterrupted run's byte for byte, wall-clock
fields aside, and nothing temporary is left. The default suite tries one seeded point; the slow
target tries every write target and several timed kills (`python3 dev.py test-slow`)."""
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ddmkit.config import load_config
from ddmkit.pipeline.run import run_pipeline

TESTS = Path(__file__).parent
SRC = str(TESTS.parent / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "DDMKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}

# `ddmkit ARGS...` that dies (SIGKILL, as kill -9) in the middle of its nth atomic write of a file
# named TARGET: half the bytes are in the temporary file, the rename never happens
KILL_MID_WRITE = r"""
import os, signal, sys
from pathlib import Path
import ddmkit.io as io
target, nth = sys.argv[1], int(sys.argv[2])
real, seen = io.write_bytes_atomic, [0]
def write(path, data):
    path = Path(path)
    if path.name == target:
        seen[0] += 1
        if seen[0] == nth:
            fd = os.open(io._temp_name(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)
io.write_bytes_atomic = write
sys.argv = ["ddmkit", *sys.argv[3:]]
from ddmkit.cli import main
main()
"""

# (file name, which write of it) for a run of the tiny config: every kind of file a run writes
TRAIN_TARGETS = [("config.json", 1), ("train.safetensors", 1), ("truth.safetensors", 1),
                 ("cluster_02.safetensors", 1), ("manifest.json", 1), ("expert_00.checkpoint.safetensors", 2),
                 ("expert_03.checkpoint.safetensors", 1), ("model.safetensors", 2), ("config.json", 3),
                 ("monolith.checkpoint.safetensors", 3), ("model.safetensors", 5), ("model.safetensors", 6),
                 ("registry.json", 1)]
SAMPLE_TARGETS = [("top-2.safetensors", 1), ("info.json", 2), ("metrics.json", 1), ("report.md", 1)]


def config(tmp_path: Path) -> Path:
    """The tiny config with expert checkpoints every 20 steps (so a killed expert resumes), on the CPU (the same
    bytes are a CPU promise: a GPU's kernels may add in another order in another process)."""
    text = (TESTS / "configs" / "tiny.toml").read_text()
    path = tmp_path / "tiny_ckpt.toml"
    text = text.replace("[expert.train]\n", "[expert.train]\ncheckpoint_every = 20\n", 1)
    for section in ("[expert.train]\n", "[router.train]\n"):
        text = text.replace(section, section + 'device = "cpu"\n', 1)
    path.write_text(text)
    return path


def masked(path: Path, rel: str) -> bytes:
    """A file's bytes with its wall-clock values (the only values that differ between runs) masked."""
    data = path.read_bytes()
    if rel.endswith("train_log.jsonl"):
        return re.sub(rb'"seconds": [0-9.e+-]+', b'"seconds": 0', data)
    if rel.endswith(".json"):
        return re.sub(rb'"(wall_time|[a-z_]*seconds)": [0-9.e+-]+', rb'"\1": 0', data)
    if rel.endswith("report.md"):
        data = re.sub(rb"^Training wall time: .*$", b"Training wall time: -", data, flags=re.M)  # the networks'
        return re.sub(rb"\| [0-9.]+ \|\n", b"| - |\n", data)  # the last column of a table row: wall time (s)
    return data


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): masked(p, str(p.relative_to(run))) for p in sorted(run.rglob("*"))
            if p.is_file()}


def killed_mid_write(cfg: Path, run: Path, target: str, nth: int, stages: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, target, str(nth), "run", str(cfg), "--out", str(run),
                           "--stages", stages], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {target} #{nth}: {proc.stderr[-800:]}"


def killed_after(cfg: Path, run: Path, line: str, delay: float, stages: str) -> None:
    """Start `ddmkit run`, wait for a log line containing `line`, wait `delay` seconds, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", "from ddmkit.cli import main; main()", "run", str(cfg), "--out",
                             str(run), "--stages", stages], env=ENV, stderr=subprocess.PIPE, text=True)
    seen = threading.Event()

    def read():
        for text in proc.stderr:
            if line in text:
                seen.set()
    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(120), f"no {line!r} line"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def resume_and_compare(cfg: Path, run: Path, reference: dict[str, bytes], stages: str, in_process: bool) -> None:
    if in_process:
        run_pipeline(load_config(cfg), run, log=lambda m: None, stages=stages)
    else:
        done = subprocess.run([sys.executable, "-c", "from ddmkit.cli import main; main()", "run", str(cfg), "--out",
                               str(run), "--stages", stages], env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-800:]
    got = snapshot(run)
    assert sorted(got) == sorted(reference)  # no file missing, none left over (lock, temporary files, checkpoints)
    differ = [rel for rel in reference if got[rel] != reference[rel]]
    lines = {rel: [(a, b) for a, b in zip(got[rel].splitlines(), reference[rel].splitlines()) if a != b][:3]
             for rel in differ}
    assert differ == [], lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = config(root)
    run_pipeline(load_config(cfg), root / "reference", log=lambda m: None, stages="train")
    return cfg, snapshot(root / "reference")


def test_a_run_killed_mid_write_at_a_seeded_point_resumes_to_the_same_bytes(trained, tmp_path):
    cfg, reference = trained
    target, nth = random.Random(19).choice(TRAIN_TARGETS)
    killed_mid_write(cfg, tmp_path / "run", target, nth, "train")
    assert (tmp_path / "run" / ".lock").exists()  # the dead writer's lock, taken over by the next run
    resume_and_compare(cfg, tmp_path / "run", reference, "train", in_process=True)


@pytest.mark.slow
@pytest.mark.parametrize("target, nth", TRAIN_TARGETS)
def test_killed_mid_write_of_every_training_file(trained, tmp_path, target, nth):
    cfg, reference = trained
    killed_mid_write(cfg, tmp_path / "run", target, nth, "train")
    resume_and_compare(cfg, tmp_path / "run", reference, "train", in_process=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_killed_at_seeded_times(trained, tmp_path, seed):
    cfg, reference = trained
    rng = random.Random(seed)
    line = rng.choice(["data:", "partition:", "expert 0: written", "expert 2: written", "monolith:"])
    killed_after(cfg, tmp_path / "run", line, rng.uniform(0.0, 0.5), "train")
    resume_and_compare(cfg, tmp_path / "run", reference, "train", in_process=True)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A whole uninterrupted run through the CLI (sampling and evaluation use the process's threads)."""
    root = tmp_path_factory.mktemp("faults_all")
    cfg = config(root)
    done = subprocess.run([sys.executable, "-c", "from ddmkit.cli import main; main()", "run", str(cfg), "--out",
                           str(root / "reference")], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]
    return cfg, snapshot(root / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("target, nth", SAMPLE_TARGETS)
def test_killed_while_sampling_or_scoring(evaluated, tmp_path, target, nth):
    cfg, reference = evaluated
    killed_mid_write(cfg, tmp_path / "run", target, nth, "all")
    resume_and_compare(cfg, tmp_path / "run", reference, "all", in_process=False)


# ----- Ctrl-C while the monolith trains in a thread beside the process pool -----------------------------------

def test_an_error_in_the_body_stops_the_side_thread_before_it_is_raised():
    """in_thread: an exception in the body (here Ctrl-C) interrupts work() and waits for it to end, so no
    thread is left inside torch when the process exits."""
    import torch

    from ddmkit.pipeline.run import in_thread

    steps, ended = [], threading.Event()

    def work():
        try:
            while True:  # a training loop that never ends by itself
                torch.ones(32, 32) @ torch.ones(32, 32)
                steps.append(1)
        finally:
            ended.set()

    with pytest.raises(KeyboardInterrupt):
        with in_thread(work):
            while not steps:
                time.sleep(0.01)
            raise KeyboardInterrupt
    assert ended.is_set()


def test_a_side_thread_whose_keyboardinterrupt_is_lost_stops_at_its_next_step(monkeypatch):
    """The KeyboardInterrupt in_thread raises in its thread can be lost (Python drops one raised in a __del__),
    and the thread trained on: here it is never raised, and the thread's stop flag ends its training loop within
    a step or two. The loop's own guard ends it after 200 more steps, so this fails rather than hangs."""
    import torch

    import ddmkit.pipeline.run as run
    from ddmkit.config import TrainConfig
    from ddmkit.train import fit

    monkeypatch.setattr(run, "interrupt", lambda thread: None)
    steps, stopped_at = [], []

    def batch_loss(m, step, g):
        steps.append(step)
        if stopped_at and len(steps) > stopped_at[0] + 200:
            raise RuntimeError("trained on")
        return m(torch.ones(1, 2)).square().sum(), {}

    cfg = TrainConfig(steps=10 ** 6, batch_size=1, log_every=10 ** 6, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        with run.in_thread(lambda: fit(torch.nn.Linear(2, 2), batch_loss, cfg)):
            while len(steps) < 3:
                time.sleep(0.01)
            stopped_at.append(len(steps))
            raise KeyboardInterrupt
    assert len(steps) <= stopped_at[0] + 2, (stopped_at, len(steps))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a process group's Ctrl-C")
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_while_the_monolith_trains_beside_the_pool_says_so(tmp_path, stop):
    """`ddmkit run --backend processes` trains the monolith in a thread while the pool trains the experts: Ctrl-C
    then exits with status 130 (before: SIGABRT, "terminate called without an active exception", the thread
    still inside torch at exit), keeping the monolith's last checkpoint and leaving no staging folder. SIGTERM
    (a scheduler stopping the job) does the same with status 143 (before: killed where it stood, in silence,
    leaving the run's lock and staging folders)."""
    run = tmp_path / "run"
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ddmkit", "run", str(config(tmp_path)), "--out", str(run),
                             "--backend", "processes", "--workers", "2", "--set", "expert.train.steps=1000000"],
                            env={**ENV, "CUDA_VISIBLE_DEVICES": ""},  # with a GPU the monolith trains after the pool
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "monolith.checkpoint.safetensors").exists()  # the workers train too: their Ctrl-C
                   and list((run / "experts").glob("*.checkpoint.safetensors"))):  # handler is set
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, getattr(signal, stop))
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    out = (tmp_path / "run.log").read_text()
    assert code == {"SIGINT": 130, "SIGTERM": 143}[stop], (code, out)
    assert "terminate called" not in out and "Traceback" not in out, out
    first = {"SIGINT": "interrupted", "SIGTERM": "stopped by SIGTERM (a scheduler's time limit or preemption, or kill)"}
    assert f"{first[stop]}: what is finished is kept" in " ".join(out.split()), out
    assert (run / "monolith.checkpoint.safetensors").exists() and not (run / ".lock").exists()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert not (run / "monolith").exists() and not [p for p in (run / "experts").iterdir() if p.is_dir()]


def test_a_folder_where_a_file_is_read_is_told_to_move_away(tmp_path):
    """A checkpoint path that was a folder was told 'train or copy it again', which cannot replace a folder."""
    from ddmkit.errors import DDMError
    from ddmkit.io import read_metadata
    (tmp_path / "e.checkpoint.safetensors").mkdir()
    with pytest.raises(DDMError, match=r"is a folder \(or another non-file\) where ddmkit reads a file; move it away "
                                       r"\(then, if the file is needed, train or copy it again\)"):
        read_metadata(tmp_path / "e.checkpoint.safetensors")
