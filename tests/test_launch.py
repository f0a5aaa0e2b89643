"""Launch backends: every backend gives the same bytes as inline, whatever this process's own
torch thread count (each job runs on train.threads threads); the SLURM script."""
import subprocess
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig, NetConfig, TrainConfig
from ddmkit.errors import DDMError
from ddmkit.io import save_tensors
from ddmkit.launch import ExpertJob, run_jobs, slurm_script


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


def test_ray_backend_matches_inline_bytes(inline):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'ddmkit[ray]' to run the Ray backend test")
    root, ref = inline
    jobs = _jobs(root, "ray")
    run_jobs(jobs, CFG, "ray", workers=2, log=lambda m: None)
    assert _weights(jobs) == ref
    cfg = [(j.out_dir / "config.json").read_bytes() for j in jobs]
    assert cfg == [(root / "inline" / j.out_dir.name / "config.json").read_bytes() for j in jobs]


def test_backend_errors_name_the_accepted_values(tmp_path):
    with pytest.raises(DDMError, match="inline, processes, ray"):
        run_jobs(_jobs(tmp_path, "x"), CFG, "kubernetes")
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


def test_slurm_script_is_a_job_array_calling_train_expert(tmp_path):
    text = slurm_script(tmp_path / "my run", 8, partition="gpu", gpus=1)
    assert "#SBATCH --array=0-7" in text and "#SBATCH --gres=gpu:1" in text and "#SBATCH --partition=gpu" in text
    assert "ddmkit train-expert" in text and "--resume" in text and "config.json" in text
    assert "'" in text.split("RUN=", 1)[1].splitlines()[0]  # the path with a space is shell-quoted
    path = tmp_path / "s.slurm"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    with pytest.raises(DDMError, match="only letters"):
        slurm_script(tmp_path, 2, partition="gpu\n#SBATCH --uid=0")
    with pytest.raises(DDMError, match="k = 0"):
        slurm_script(tmp_path, 0)


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
