"""Concurrent (stacked) expert training, ddmkit.train.concurrent: its batches, checkpoints and expert folders."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig, NetConfig, TrainConfig
from ddmkit.errors import DDMError
from ddmkit.data.partition import read_shard
from ddmkit.io import load_tensors, read_metadata, save_tensors, sha256_file
from ddmkit.layout import RunFolder
from ddmkit.nets import build_seeded
import ddmkit.train.concurrent as conc
from ddmkit.train.checkpoint import FORMAT
from ddmkit.train.concurrent import stacked_sampler
from ddmkit.train.stacked import StackedExperts
from conftest import raising_after


def test_the_stacked_sampler_draws_every_row_of_a_shard_beyond_2_to_the_24_rows():
    """A float32 u in [0, 1) is m / 2^24, so floor(u n) for n = 2^25 is always even: half the rows were never
    drawn. Integer draws reach the odd rows too, about half the time."""
    n = 2**25
    parity = torch.tensor([0.0, 1.0]).repeat(n // 2)  # row i holds i mod 2
    x, y = stacked_sampler([parity], None, 4000, "cpu")(torch.Generator().manual_seed(0))
    assert x.shape == (1, 4000) and y is None
    assert 0.45 < x.mean().item() < 0.55


def test_the_stacked_sampler_draws_each_experts_rows_from_its_own_shard_uniformly():
    sizes = [3, 7]
    parts = [torch.arange(n, dtype=torch.float32) + 100 * k for k, n in enumerate(sizes)]
    labels = [torch.full((n,), k) for k, n in enumerate(sizes)]
    x, y = stacked_sampler(parts, labels, 70_000, "cpu")(torch.Generator().manual_seed(1))
    for k, n in enumerate(sizes):
        assert torch.equal(y[k], torch.full((70_000,), k))
        counts = torch.bincount((x[k] - 100 * k).long(), minlength=n)
        assert len(counts) == n and (counts - 70_000 / n).abs().max() < 5 * (70_000 / n) ** 0.5


# ----- the concurrent job: checkpoints, resume and each expert's own folder ------------------------------------------


def _shards(folder: Path, scale: float = 1.0, count: int = 2) -> list[Path]:
    """`count` shards of 2-D points (all but the first's values times `scale`: other shards' contents)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range(count):
        paths.append(folder / f"cluster_{c:02d}.safetensors")
        x = torch.randn(50, 2, generator=torch.Generator().manual_seed(c)) + 3 * c
        save_tensors(paths[-1], {"x": x * (scale if c else 1.0)}, {"cluster": c, "k": count})
    return paths


def _config(**train) -> ExpertConfig:
    return ExpertConfig(net=NetConfig(arch="mlp", kwargs={"width": 8, "depth": 1}),
                        train=TrainConfig(**{"steps": 20, "batch_size": 8, "warmup": 1, "log_every": 5,
                                             "checkpoint_every": 5, "device": "cpu", **train}))


def _train(shards, config, root: Path, crash_after: int | None = None, monkeypatch=None) -> list[Path]:
    """train_experts_concurrently into root/expert_0K; with crash_after, killed at its (crash_after + 1)-th step."""
    outs = [root / f"expert_{c:02d}" for c in range(len(shards))]
    if crash_after is None:
        return conc.train_experts_concurrently(shards, config, outs, log=lambda m: None)
    with monkeypatch.context() as m:
        m.setattr(conc, "stacked_loss", raising_after(conc.stacked_loss, crash_after, KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            conc.train_experts_concurrently(shards, config, outs, log=lambda m: None)
    return outs


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def _log(folder: Path) -> str:
    return re.sub(r'"seconds": [0-9.e+-]+', '"seconds": 0', (folder / "train_log.jsonl").read_text())


def _config_json(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "train_seconds_all"}


def test_a_killed_concurrent_job_resumes_from_its_checkpoint_to_the_same_bytes(tmp_path, monkeypatch):
    """checkpoint_every was ignored with expert.concurrent: a killed stage trained all K experts from step 0."""
    shards = _shards(tmp_path)
    reference = _train(shards, _config(), tmp_path / "ref")
    outs = _train(shards, _config(), tmp_path / "run", crash_after=12, monkeypatch=monkeypatch)
    checkpoint = conc.stacked_checkpoint_path(outs)
    assert checkpoint.name == "expert_00.stacked.checkpoint.safetensors"
    assert read_metadata(checkpoint)["step"] == 10 and not any(out.exists() for out in outs)
    said = []
    conc.train_experts_concurrently(shards, _config(), outs, log=said.append)
    assert said == [f"experts: continuing from {checkpoint}"]
    for out, ref in zip(outs, reference):
        assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
        assert _log(out) == _log(ref) and _config_json(out) == _config_json(ref)
    assert not checkpoint.exists() and not conc.stacked_checkpoint_path(reference).exists()


def test_a_concurrent_checkpoint_of_other_shards_is_refused(tmp_path, monkeypatch):
    """The fingerprint holds every shard's SHA-256: the same job on another second shard does not continue it."""
    outs = _train(_shards(tmp_path), _config(), tmp_path / "run", crash_after=12, monkeypatch=monkeypatch)
    other = _shards(tmp_path / "other", scale=2.0)
    with pytest.raises(DDMError, match=rf"{re.escape(str(conc.stacked_checkpoint_path(outs)))} belongs to a "
                                       r"different training run: other training data"):
        conc.train_experts_concurrently(other, _config(), outs, log=lambda m: None)


def test_each_concurrent_expert_folder_logs_its_own_loss_and_keeps_its_tensorboard(tmp_path):
    """Each folder held the joint log (the sum of the K losses), final_loss the mean over the experts, and no
    tensorboard/ (written to a temporary folder and deleted). Now an expert's log, final_loss and TensorBoard
    curve are its own (its loss and grad_norm): they do not change when another shard does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _train(_shards(tmp_path), _config(tensorboard=True), tmp_path / "a")
    second = _train(_shards(tmp_path / "shards_b", scale=5.0),
                    _config(tensorboard=True), tmp_path / "b")
    for out in first:
        rows = _rows(out)
        assert [list(row) for row in rows] == [["step", "lr", "seconds", "loss", "grad_norm"]] * 4
        assert [row["step"] for row in rows] == [5, 10, 15, 20]
        assert json.loads((out / "config.json").read_text())["final_loss"] == rows[-1]["loss"]
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        for name in ("loss", "grad_norm"):
            assert [(e.step, e.value) for e in events.Scalars(name)] == \
                [(row["step"], pytest.approx(row[name])) for row in rows]
    assert _log(first[0]) == _log(second[0])  # expert 0's own curve: shard 1 changed, it did not
    assert _log(first[1]) != _log(second[1]) and _log(first[0]) != _log(first[1])


# ----- each expert's gradient norm -----------------------------------------------------------------------------------


def test_each_concurrent_expert_logs_the_norm_of_its_own_gradient_before_clipping(tmp_path):
    """The expert folders' rows had no grad_norm. Known answer: at the first step, the norm of the gradient of
    expert k's own loss, by autograd here from the job's networks and draws; grad_clip far below it, so the norm
    logged is the one before clipping."""
    shards = _shards(tmp_path)
    outs = _train(shards, _config(steps=1, log_every=1, grad_clip=1e-3), tmp_path / "run")
    model = StackedExperts([build_seeded("mlp", 0, data_shape=[2], width=8, depth=1) for _ in shards])
    gen = torch.Generator().manual_seed(0)  # fit's batch generator: train.seed
    x, _ = stacked_sampler([read_shard(s)[0] for s in shards], None, 8, "cpu")(gen)
    losses = conc.stacked_loss(model, x, None, gen, "velocity")
    for k, out in enumerate(outs):
        grads = torch.autograd.grad(losses[k], list(model.parameters()), retain_graph=True)
        norm = torch.sqrt(sum(g[k].double().square().sum() for g in grads)).item()
        [row] = _rows(out)
        assert row["loss"] == pytest.approx(losses[k].item(), rel=1e-6)  # the same draws
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 100 * 1e-3
    assert _rows(outs[0])[0]["grad_norm"] != pytest.approx(_rows(outs[1])[0]["grad_norm"], rel=1e-3)


def _without_gradient_norms(checkpoint: Path) -> None:
    """Rewrite a concurrent job's checkpoint as ddmkit wrote it before each expert's norm was logged: no
    grad_norm_K in its log rows or its running sums (the job's grad_norm, the largest, stays)."""
    meta, tensors = read_metadata(checkpoint), load_tensors(checkpoint)
    ours = re.compile(r"grad_norm_\d+$")
    meta["history"] = [[pair for pair in row if not ours.match(pair[0])] for row in meta["history"]]
    meta["running_is_tensor"] = [pair for pair in meta["running_is_tensor"] if not ours.match(pair[0])]
    save_tensors(checkpoint, {k: v for k, v in tensors.items() if not ours.match(k.removeprefix("running."))}, meta)


def test_a_concurrent_checkpoint_of_earlier_ddmkit_resumes_without_the_norms_it_did_not_sum(tmp_path, monkeypatch):
    """A checkpoint written between two rows holds the sums since the last row; one of earlier ddmkit has none for
    grad_norm_K, and that row's mean would have held only the steps after it (or the job failed on the missing
    key). Its rows and that row have no grad_norm; the later rows have the uninterrupted job's."""
    shards, config = _shards(tmp_path), _config(checkpoint_every=7)  # rows at 5, 10, 15, 20; checkpoint at 7
    reference = _train(shards, config, tmp_path / "ref")
    outs = _train(shards, config, tmp_path / "run", crash_after=12, monkeypatch=monkeypatch)
    _without_gradient_norms(conc.stacked_checkpoint_path(outs))
    conc.train_experts_concurrently(shards, config, outs, log=lambda m: None)
    for out, ref in zip(outs, reference):
        rows, expected = _rows(out), _rows(ref)
        assert ["grad_norm" in row for row in rows] == [False, False, True, True]
        assert [row["grad_norm"] for row in rows[2:]] == [row["grad_norm"] for row in expected[2:]]
        assert [row["loss"] for row in rows] == [row["loss"] for row in expected]
        assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


# ----- a job stopped while moving its folders into place -------------------------------------------------------------


def _moves_killed_after(monkeypatch, n: int) -> None:
    """The job killed (KeyboardInterrupt) at its (n + 1)-th move of a staged expert folder into place."""
    real = os.replace
    move = raising_after(real, n, KeyboardInterrupt("killed"))

    def replace(src, dst, *args, **kwargs):
        moving = Path(dst).name.startswith("expert_") and Path(src).is_dir()
        return (move if moving else real)(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)


def _folder(out: Path) -> dict[str, bytes]:
    """An expert folder's files, the wall-clock values masked (the only ones that differ between runs)."""
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    files["train_log.jsonl"] = _log(out).encode()
    files["config.json"] = json.dumps(_config_json(out)).encode()
    return files


@pytest.mark.parametrize("moved, every", [(1, 10), (2, 7)])
def test_a_concurrent_job_stopped_between_its_moves_keeps_the_folders_moved_when_run_again(tmp_path, monkeypatch,
                                                                                           moved, every):
    """The same job again continues from its checkpoint (of its last step, or of step 14: it trains to its end
    again), keeps the folders it moved, whole and untouched, and writes the others: the bytes of a job never
    stopped."""
    shards, config = _shards(tmp_path, count=3), _config(checkpoint_every=every)
    reference = _train(shards, config, tmp_path / "ref")
    outs = [tmp_path / "run" / f"expert_{c:02d}" for c in range(3)]
    with monkeypatch.context() as m:
        _moves_killed_after(m, moved)
        with pytest.raises(KeyboardInterrupt):
            conc.train_experts_concurrently(shards, config, outs, log=lambda m: None)
    placed = {out: (out / "config.json").stat().st_ino for out in outs if out.exists()}
    assert len(placed) == moved and all((out / "model.safetensors").is_file() for out in placed)
    checkpoint = conc.stacked_checkpoint_path(outs)
    assert read_metadata(checkpoint)["step"] == 20 // every * every
    said = []
    conc.train_experts_concurrently(shards, config, outs, log=said.append)
    assert said == [f"experts: continuing from {checkpoint}",
                    *[f"{out}: moved into place before the job was stopped; kept" for out in outs if out in placed]]
    assert {out: (out / "config.json").stat().st_ino for out in placed} == placed  # not written again
    assert [_folder(out) for out in outs] == [_folder(ref) for ref in reference]
    assert not checkpoint.exists() and sorted(p.name for p in outs[0].parent.iterdir()) == [o.name for o in outs]


def test_a_folder_in_place_with_other_weights_is_written_again_when_the_stopped_job_runs_again(tmp_path, monkeypatch):
    """Only a folder of the very weights the job ends with is kept: one whose model.safetensors was changed since
    the job moved it (here another expert's weights under its config.json) is written again."""
    shards, config = _shards(tmp_path, count=3), _config(checkpoint_every=10)
    reference = _train(shards, config, tmp_path / "ref")
    outs = [tmp_path / "run" / f"expert_{c:02d}" for c in range(3)]
    with monkeypatch.context() as m:
        _moves_killed_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            conc.train_experts_concurrently(shards, config, outs, log=lambda m: None)
    [placed] = [out for out in outs if out.exists()]
    other = next(ref for ref in reference if ref.name != placed.name)
    (placed / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    said = []
    conc.train_experts_concurrently(shards, config, outs, log=said.append)
    assert not any("kept" in line for line in said)
    assert [_folder(out) for out in outs] == [_folder(ref) for ref in reference]


def _run_args(run: Path) -> list:
    return ["run", Path(__file__).parent / "configs" / "tiny.toml", "--out", run, "--stages", "train",
            "--set", "expert.concurrent=true", "--set", "expert.train.steps=20", "--set",
            "expert.train.checkpoint_every=10", "--set", "monolith.enabled=false", "--set", "router.train.steps=4"]


@pytest.mark.parametrize("moved", [1, 3])
def test_a_run_stopped_between_moving_its_concurrent_experts_finishes_them_to_the_bytes_of_one_never_stopped(
        tmp_path, monkeypatch, ddmkit, moved):
    """ddmkit run trained the experts not in place: the stopped job's others alone, a job of K - moved experts,
    refused by its checkpoint of K ('delete it'), which would then have trained them anew, not as the job did."""
    code, _, err = ddmkit(*_run_args(tmp_path / "ref"))
    assert code == 0, err
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _moves_killed_after(m, moved)
        code, _, err = ddmkit(*_run_args(run))
    assert code == 130 and "run the same command to continue" in err, err
    folder = RunFolder(run)
    assert sum((folder.expert(c) / "model.safetensors").exists() for c in range(4)) == moved
    code, _, err = ddmkit(*_run_args(run))  # ddmkit run logs to stderr
    assert code == 0, err
    assert f"experts: continuing from {folder.experts / 'expert_00.stacked.checkpoint.safetensors'}" in err
    assert err.count("moved into place before the job was stopped; kept") == moved
    assert [_folder(folder.expert(c)) for c in range(4)] == [_folder(RunFolder(tmp_path / "ref").expert(c))
                                                             for c in range(4)]
    assert sorted(p.name for p in folder.experts.iterdir()) == [f"expert_{c:02d}" for c in range(4)]


def test_a_run_stopped_before_removing_its_concurrent_checkpoint_removes_it(tmp_path, monkeypatch, ddmkit):
    """Every expert moved into place, then killed before the checkpoint was removed: the run trains nothing and
    removes that checkpoint (a later job of those experts would have continued from it)."""
    run = tmp_path / "run"
    real = Path.unlink

    def unlink(path, *args, **kwargs):
        if path.name.endswith(".stacked.checkpoint.safetensors"):
            raise KeyboardInterrupt("killed")
        return real(path, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", unlink)
        assert ddmkit(*_run_args(run))[0] == 130
    folder = RunFolder(run)
    checkpoint = folder.experts / "expert_00.stacked.checkpoint.safetensors"
    before = [_folder(folder.expert(c)) for c in range(4)]
    assert checkpoint.is_file() and all((folder.expert(c) / "model.safetensors").is_file() for c in range(4))
    code, _, err = ddmkit(*_run_args(run))
    assert code == 0, err
    assert f"experts: removed {checkpoint}: the job that wrote it had moved all its experts into place" in err
    assert not checkpoint.exists() and [_folder(folder.expert(c)) for c in range(4)] == before


def test_the_concurrent_jobs_of_a_run_take_a_stopped_job_whole_and_first(tmp_path):
    """Experts 0 and 2 missing, 1 and 3 in place; a checkpoint beside expert 2 of the job of shards 2 and 3: that
    job whole, then expert 0 alone. A checkpoint of other shards, or named after another expert, is no such job."""
    shards = _shards(tmp_path / "shards", count=4)
    outs = [tmp_path / "experts" / f"expert_{c:02d}" for c in range(4)]
    for c in (1, 3):
        outs[c].mkdir(parents=True)
        (outs[c] / "model.safetensors").write_bytes(b"")

    def checkpoint(beside: int, shards_of_job: list[Path]) -> Path:
        path = conc.stacked_checkpoint_path([outs[beside]])
        fingerprint = {"data": [sha256_file(s) for s in shards_of_job]}
        save_tensors(path, {"step": torch.zeros(1)}, {"format": FORMAT, "fingerprint": fingerprint})
        return path

    path = checkpoint(2, shards[2:])
    assert conc.concurrent_jobs(shards, outs) == [[2, 3], [0]]
    assert conc.stopped_job(shards, outs) == (path, [2, 3])
    path.unlink()
    checkpoint(2, _shards(tmp_path / "other", scale=2.0, count=4)[2:])  # other shards
    assert conc.concurrent_jobs(shards, outs) == [[0, 2]]
    checkpoint(0, shards[2:])  # not named after the job's first expert
    assert conc.concurrent_jobs(shards, outs) == [[0, 2]]


def test_a_backend_for_experts_trained_together_is_refused_and_leaving_it_out_trains_them_as_logged(tmp_path, ddmkit):
    """expert.concurrent = true trains the K experts as one job in this process: --backend processes or ray (with
    --workers, --address) was silently not used by `ddmkit run`, `launch` and `sweep`. Refused before any folder
    is made, naming the options given; leaving them out trains the experts."""
    from ddmkit.launch import check_launch

    run = tmp_path / "run"
    code, _, err = ddmkit(*_run_args(run), "--backend", "processes", "--workers", "2")
    assert code == 2 and not run.exists(), err
    assert ("--backend processes: expert.concurrent = true trains the K experts as one job, in this process, so no "
            "backend runs them; leave --backend and --workers out") in err
    code, _, err = ddmkit("partition", "--config", Path(__file__).parent / "configs" / "tiny.toml", "--out", run,
                          "--set", "expert.concurrent=true", "--set", "expert.concurrent_networks=streams",
                          "--set", "expert.train.steps=20")
    assert code == 0, err
    code, _, err = ddmkit("launch", run, "--backend", "processes")
    assert code == 2 and "leave --backend out, or train them as jobs of their own" in err
    assert not list((run / "experts").glob("*/model.safetensors"))
    code, _, err = ddmkit("launch", run)
    assert code == 0 and len(list((run / "experts").glob("*/model.safetensors"))) == 4, err
    # the log names how they trained ('concurrent backend' named no backend, and not the networks)
    assert re.search(r"experts: 4 trained in [\d.]+s \(in one job, expert.concurrent_networks = 'streams'\)", err), err
    code, _, err = ddmkit("sweep", Path(__file__).parent / "configs" / "tiny.toml", "--out", tmp_path / "sweep",
                          "--k", "2", "--budget", "1", "--backend", "processes", "--set", "expert.concurrent=true")
    assert code == 2 and "--backend processes: expert.concurrent = true trains the K experts as one job" in err, err
    assert "sweep cell" not in err and not (tmp_path / "sweep").exists()  # before any cell starts
    with pytest.raises(DDMError, match="leave --backend out"):
        check_launch("processes", concurrent=True)
    check_launch("processes")
    check_launch("inline", concurrent=True)
