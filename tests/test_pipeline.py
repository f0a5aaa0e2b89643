"""The pipeline end to end on a tiny config, step by step through the CLI, and bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from ddmkit.config import load_config
from ddmkit.errors import DDMError
from ddmkit.ddm import exact_ddm, load_ddm
from ddmkit.layout import RunFolder
from ddmkit.pipeline.run import run_pipeline, sample_run
from ddmkit.pipeline.samplesets import EXACT
from ddmkit.truth import GaussianMixture

TINY = Path(__file__).parent / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_pipeline(load_config(TINY), out, log=lambda m: None)
    return out, result


def test_run_writes_every_artifact(tiny_run):
    out, result = tiny_run
    for rel in ("config.json", "data/train.safetensors", "data/truth.safetensors", "partition/manifest.json",
                "experts/expert_03/model.safetensors", "experts/expert_00/train_log.jsonl", "monolith/config.json",
                "router/model.safetensors", "samples/info.json", "report.md", "metrics.json",
                "plots/samples.png", "plots/router_accuracy.png", "plots/training.png"):
        assert (out / rel).exists(), rel
    rows = result["rows"]
    assert set(rows) == {EXACT, "monolith", "full", "top-2", "switch", "oracle", "nearest"}
    assert rows["full"]["expert_calls_per_sample"] == pytest.approx(4 * 8)
    assert rows["top-2"]["expert_calls_per_sample"] == pytest.approx(2 * 8)
    assert rows["switch"]["expert_calls_per_sample"] == pytest.approx(8)
    assert rows["monolith"]["expert_calls_per_sample"] == pytest.approx(8)
    report = (out / "report.md").read_text()
    assert "noise floor" in report and "| top-2 |" in report
    # the studies draw their own rows (the config's [sample] at evaluate.study_n): their sections say how
    assert report.count("Each row: 400 samples, euler, 8 steps, seed 0") == 2 and "over 2 pair(s) of 200" in report
    # the training wall time of every network, from their logs (the experts': their sum and the longest)
    seconds = [round(json.loads((out / f"experts/expert_{c:02d}/train_log.jsonl").read_text().splitlines()[-1])[
        "seconds"], 3) for c in range(4)]
    assert (f"Training wall time: experts {round(sum(seconds), 3):.1f} s in all (the longest {max(seconds):.1f} s), "
            "monolith ") in report
    routers = {name: info["router"] for name, info in json.loads((out / "samples/info.json").read_text()).items()}
    assert routers == {EXACT: "exact posterior", "monolith": "none", "full": "learned", "top-2": "learned",
                       "switch": "learned", "oracle": "learned", "nearest": "learned"}


def test_exact_ddm_is_the_global_field(tiny_run):
    """Grouped exact experts mixed by the exact router reproduce the global velocity (the DDM identity)."""
    out, _ = tiny_run
    ddm = exact_ddm(out)
    t = load_tensors_truth(out)
    x = torch.randn(128, 2, dtype=torch.float64) * 2
    for tt in (0.1, 0.5, 0.9):
        tb = torch.full((128,), tt, dtype=torch.float64)
        p = ddm.router(x, tb)
        mixed = sum(p[:, k:k + 1] * ddm.experts[k](x, tb) for k in range(ddm.k))
        assert torch.allclose(mixed, t.velocity(x, tb), atol=1e-10)


def load_tensors_truth(out) -> GaussianMixture:
    from ddmkit.ddm.load import load_truth
    return load_truth(out)


def test_rerun_skips_finished_stages_and_is_deterministic(tiny_run, tmp_path):
    out, result = tiny_run
    before = (out / "experts" / "expert_00" / "model.safetensors").stat().st_mtime_ns
    again = run_pipeline(load_config(TINY), out, log=lambda m: None)
    assert (out / "experts" / "expert_00" / "model.safetensors").stat().st_mtime_ns == before
    assert again["rows"]["top-2"]["w2"] == result["rows"]["top-2"]["w2"]
    fresh = tmp_path / "fresh"
    run_pipeline(load_config(TINY), fresh, log=lambda m: None)
    for rel in ("experts/expert_02/model.safetensors", "router/model.safetensors", "samples/top-2.safetensors"):
        assert (fresh / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_on_the_processes_backend_the_monolith_and_router_train_beside_the_pool(tiny_run, tmp_path, monkeypatch):
    """With a process pool on the CPU, the monolith and the router train in a thread of this process
    while the pool trains the experts, and every network's bytes are those of the inline run. On a machine
    with a GPU they train after the pool, in this thread: the pool's jobs hold the GPUs, one each, and a
    network trained beside them would share one (the bytes are compared on the CPU only, as reliability.md
    promises them)."""
    import threading

    import ddmkit.pipeline.run as run_module

    trained_in = {}

    def recorded(name, stage):
        def wrapper(*args, **kwargs):
            trained_in.setdefault(name, threading.current_thread().name)  # where it trained (then it skips itself)
            return stage(*args, **kwargs)
        return wrapper
    for name in ("monolith", "router"):
        stage = getattr(run_module, f"stage_{name}")
        monkeypatch.setattr(run_module, f"stage_{name}", recorded(name, stage))  # beside the pool
        monkeypatch.setattr(run_module, "TRAINING_STAGES", tuple(getattr(run_module, f"stage_{name}") if s is stage
                                                                 else s for s in run_module.TRAINING_STAGES))  # after
    out = tmp_path / "pool"
    run_pipeline(load_config(TINY), out, log=lambda m: None, backend="processes", workers=1, stages="train")
    if torch.cuda.is_available():
        assert trained_in == {"monolith": "MainThread", "router": "MainThread"}
        return
    assert trained_in == {"monolith": "ddmkit-beside-pool", "router": "ddmkit-beside-pool"}
    inline, _ = tiny_run
    for rel in ("experts/expert_03/model.safetensors", "monolith/model.safetensors", "router/model.safetensors"):
        assert (out / rel).read_bytes() == (inline / rel).read_bytes(), rel


def test_in_thread_runs_its_work_during_the_body_and_raises_its_error():
    """The work and the body wait for each other: run before the body or after it, one of the waits
    would time out."""
    import threading

    from ddmkit.pipeline.run import in_thread

    work_started, body_ran, work_saw_body = threading.Event(), threading.Event(), []

    def work():
        work_started.set()
        work_saw_body.append(body_ran.wait(timeout=60))
    with in_thread(work):
        assert work_started.wait(timeout=60)
        body_ran.set()
    assert work_saw_body == [True]

    def fails():
        raise ValueError("from the thread")
    with pytest.raises(ValueError, match="from the thread"):
        with in_thread(fails):
            pass
    with in_thread(fails, enabled=False):  # not enabled: nothing runs
        pass


def test_sample_section_speed_options_reach_the_sampler(tiny_run, tmp_path, cli):
    """sample.router_every = m calls the router ceil(steps / m) times per trajectory and is refused
    below 1, naming the field; sample.cuda_graphs and cuda_streams on the CPU give the same samples as
    without (the CLI flags too)."""
    from ddmkit.io import load_tensors

    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    cfg = load_config(TINY)
    cfg.sample.router_every = 3
    info = sample_run(run, ["top-2"], cfg)[0]
    assert info["router_calls"] == 3 and info["velocity_evaluations"] == 8  # evaluations 0, 3, 6 of 8
    assert info["expert_calls_per_sample"] == pytest.approx(2 * 8)
    reused = load_tensors(RunFolder(run).sample_set("top-2"))["x"]
    drawn_by_the_run = load_tensors(RunFolder(out).sample_set("top-2"))["x"]
    assert not torch.equal(reused, drawn_by_the_run)  # stale routing: other samples
    cfg.sample.router_every, cfg.sample.cuda_graphs = 1, True
    assert sample_run(run, ["top-2"], cfg)[0]["router_calls"] == 8
    assert torch.equal(load_tensors(RunFolder(run).sample_set("top-2"))["x"], drawn_by_the_run)
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace("[sample]\n", "[sample]\nrouter_every = 0\n"))
    with pytest.raises(DDMError, match="router_every"):
        load_config(bad)
    done = cli("sample", run, "--strategy", "top-2", "--router-every", "4", "--batch-size", "150", "--n", "300")
    assert done.returncode == 0, done.stderr
    info = json.loads((run / "samples" / "info.json").read_text())["top-2"]
    assert info["router_calls"] == 2 * 2  # evaluations 0 and 4 of 8, in each of 2 chunks of 150 rows
    refused = cli("sample", run, "--strategy", "top-2", "--router-every", "0")
    assert refused.returncode == 2 and "error: --router-every 0: give a whole number, at least 1" in refused.stderr, \
        refused.stderr
    drawn = {}
    for flag in ("--cuda-graphs", "--no-cuda-graphs", "--cuda-streams", "--no-cuda-streams"):
        assert cli("sample", run, "--strategy", "top-1", "--n", "300", flag).returncode == 0
        drawn[flag] = load_tensors(RunFolder(run).sample_set("top-1"))["x"]
    first = drawn.pop("--cuda-graphs")  # on the CPU graphs and streams are off: the same samples every time
    assert all(torch.equal(first, x) for x in drawn.values())


def test_cli_step_by_step(tmp_path, cli):
    run = tmp_path / "r"
    assert cli("partition", "--config", TINY, "--out", run).returncode == 0
    manifest = json.loads((run / "partition" / "manifest.json").read_text())
    for s in manifest["shards"]:
        r = cli("train-expert", run / "partition" / s["path"], "--config", TINY,
                "--out", run / "experts" / f"expert_{s['cluster']:02d}")
        assert r.returncode == 0, r.stderr
    assert cli("train-router", run).returncode == 0
    r = cli("sample", run, "--strategy", "top-2", "--strategy", "nearest")
    assert r.returncode == 0, r.stderr
    r = cli("evaluate", run)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"top-2", "nearest"} <= set(metrics["rows"])


def test_train_monolith_adds_the_monolith_to_a_run_made_without_one(tiny_run, tmp_path, cli):
    """monolith.enabled = false is for `ddmkit run`; the explicit command trains it (e.g. as the reference
    of `ddmkit analyze`), the same network as a run with the monolith, and never trains it twice."""
    with_monolith = tiny_run[0]
    run = tmp_path / "without"
    assert cli("run", TINY, "--out", run, "--stages", "train", "--set", "monolith.enabled=false").returncode == 0
    assert not (run / "monolith").exists()
    done = cli("train-monolith", run)
    assert done.returncode == 0, done.stderr
    weights = run / "monolith" / "model.safetensors"
    assert weights.read_bytes() == (with_monolith / "monolith" / "model.safetensors").read_bytes()
    again = cli("train-monolith", run)
    assert again.returncode == 0 and "trained already" in again.stdout + again.stderr


def test_bad_inputs_exit_2_with_a_clear_message(tmp_path, cli):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace("[partition]\nk = 4", "[partition]\nk = 4\nclusters = 3"))
    r = cli("run", bad, "--out", tmp_path / "o1")
    assert r.returncode == 2 and "partition.clusters" in r.stderr and "unknown field" in r.stderr
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").rglob("*.safetensors"))

    big_k = tmp_path / "k.toml"
    big_k.write_text(TINY.read_text().replace("n_train = 1600", "n_train = 3").replace("n_test = 1600", "n_test = 3"))
    r = cli("run", big_k, "--out", tmp_path / "o2")
    assert r.returncode == 2 and "larger than the number of samples (3)" in r.stderr
    assert "raise data.n_train (it is 3)" in r.stderr  # n_train is what caps the samples: raising it is the fix
    assert not (tmp_path / "o2" / "partition").exists()

    r = cli("run", TINY.parent / "nope.toml", "--out", tmp_path / "o3")
    assert r.returncode == 2 and "does not exist" in r.stderr

    strat = tmp_path / "s.toml"
    strat.write_text(TINY.read_text().replace('"switch"', '"top-zero"'))
    r = cli("run", strat, "--out", tmp_path / "o4")
    assert r.returncode == 2 and "top-K" in r.stderr


def test_k_above_a_small_files_rows_asks_for_fewer_clusters_not_a_larger_n_train(tmp_path, cli):
    import numpy as np
    np.save(tmp_path / "d.npy", np.random.default_rng(0).normal(size=(8, 2)).astype("float32"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.read_text().replace('name = "ring8"', f'name = "{tmp_path / "d.npy"}"')
                   .replace("[partition]\nk = 4", "[partition]\nk = 16"))
    r = cli("run", cfg, "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "larger than the number of samples (6)" in r.stderr  # 8 rows less the test split's 2
    assert "holds 6 training rows, fewer than data.n_train = 1600" in r.stderr
    assert "set partition.k = 6 or lower, or give the data set more rows" in r.stderr
    assert "raise data.n_train" not in r.stderr and "use more data" not in r.stderr


def test_nan_data_is_refused(tmp_path, cli):
    import numpy as np
    x = np.random.default_rng(0).normal(size=(400, 2)).astype("float32")
    x[7, 1] = np.inf
    np.save(tmp_path / "d.npy", x)
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.read_text().replace('name = "ring8"', f'name = "{tmp_path / "d.npy"}"'))
    r = cli("run", cfg, "--out", tmp_path / "o")
    assert r.returncode == 2 and "NaN or infinite" in r.stderr


def test_other_run_in_output_folder_is_refused(tiny_run, tmp_path, cli):
    out, _ = tiny_run
    other = tmp_path / "other.toml"
    other.write_text(TINY.read_text().replace("[partition]\nk = 4", "[partition]\nk = 3"))
    r = cli("run", other, "--out", out)
    assert r.returncode == 2 and "different run" in r.stderr and "--force" in r.stderr
    assert "differs in partition.k (4, asked 3)" in " ".join(r.stderr.split())  # the field, named



def test_a_run_continues_with_other_settings_of_how_its_jobs_run(tiny_run, tmp_path, cli):
    """`ddmkit run` refused another --device or checkpoint_every on its own folder ('already holds a different
    run ... pass --force', which deletes the trained networks), though launch allows them and reliability.md
    says they may change: nothing trained or drawn is changed."""
    out, _ = tiny_run
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    kept = {p: p.read_bytes() for p in run.rglob("*.safetensors")}
    r = cli("run", TINY, "--out", run, "--device", "cpu", "--set", "expert.train.checkpoint_every=7",
            "--set", "router.train.log_every=3", "--set", "expert.train.threads=2")
    assert r.returncode == 0, r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*.safetensors")} == kept
    r = cli("run", TINY, "--out", run, "--set", "expert.train.steps=7")  # what it trains: still refused
    assert r.returncode == 2 and "differs in expert.train.steps" in " ".join(r.stderr.split()), r.stderr


def test_the_report_links_a_plot_of_every_networks_training_loss(tiny_run):
    """plots/training.png, a PNG, linked in the report's Networks section; its curves are the logs' rows."""
    from PIL import Image

    from ddmkit.pipeline.models import PANELS, training_curves

    out, _ = tiny_run
    with Image.open(out / "plots" / "training.png") as image:
        assert image.format == "PNG"
        image.verify()
    report = (out / "report.md").read_text()
    networks = report[report.index("## Networks"):report.index("## Samples per strategy")]
    assert "![training loss](plots/training.png)" in networks and "Not drawn" not in networks
    panels, absent = training_curves(out)
    assert list(panels) == [PANELS["experts"], PANELS["router"]] and absent == []
    assert list(panels[PANELS["experts"]]) == ["expert 0", "expert 1", "expert 2", "expert 3", "monolith"]
    logged = [json.loads(line) for line in (out / "experts/expert_02/train_log.jsonl").read_text().splitlines()]
    assert panels[PANELS["experts"]]["expert 2"] == [(r["step"], r["loss"]) for r in logged]
    assert [step for step, _ in panels[PANELS["experts"]]["monolith"]] == list(range(20, 241, 20))  # 4 x 60 steps


def test_a_run_whose_expert_has_no_log_still_reports_and_says_so(tiny_run, tmp_path):
    """An expert brought from elsewhere without its train_log.jsonl: the evaluation writes the plot without it and
    the report names it; a router built from the islands' statistics is named as no network."""
    from ddmkit.pipeline.models import PANELS, training_curves
    from ddmkit.pipeline.vectors import stage_evaluate

    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "experts/expert_02/train_log.jsonl").unlink()
    (run / "plots" / "training.png").unlink()
    stage_evaluate(load_config(TINY), run, log=lambda m: None)
    assert (run / "plots" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "report.md").read_text()
    assert "![training loss](plots/training.png)" in report
    assert "Not drawn: expert 2 (no train_log.jsonl)." in report
    shutil.rmtree(run / "router")
    (run / "grow.json").write_text(json.dumps({"router": "statistics"}))
    panels, absent = training_curves(run)
    assert absent == ["expert 2 (no train_log.jsonl)", "router (statistics-only: no network)"]
    assert list(panels) == [PANELS["experts"]] and "expert 2" not in panels[PANELS["experts"]]


def test_a_new_sample_section_keeps_the_networks_and_redraws_the_samples(tiny_run, tmp_path):
    """Only [sample] changed: the trained files stay as they are (same bytes, not rewritten), the old
    samples and scores are removed and drawn again under the new settings."""
    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    model = run / "experts" / "expert_01" / "model.safetensors"
    stamp, weights = model.stat().st_mtime_ns, model.read_bytes()
    stale = run / "samples" / "nearest.safetensors"
    assert stale.exists()
    other = tmp_path / "other.toml"
    other.write_text(TINY.read_text().replace("steps = 8", "steps = 9").replace(', "oracle", "nearest"]', "]"))
    messages = []
    result = run_pipeline(load_config(other), run, log=messages.append)
    assert any("the sample settings changed" in m and "kept" in m for m in messages)
    assert model.stat().st_mtime_ns == stamp and model.read_bytes() == weights
    assert not stale.exists() and "nearest" not in result["rows"]
    info = json.loads((run / "samples" / "info.json").read_text())
    assert set(info) == {EXACT, "monolith", "full", "top-2", "switch"}
    assert info["top-2"]["velocity_evaluations"] == 9
    assert json.loads((run / "config.json").read_text())["config"]["sample"]["steps"] == 9


def test_a_new_evaluate_section_keeps_the_samples_and_scores_them_again(tiny_run, tmp_path):
    """Only [evaluate] changed: every set was drawn again (the sets depend on [sample] and the networks)."""
    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    drawn = {p.name: p.read_bytes() for p in (run / "samples").iterdir()}
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "samples").iterdir()}
    other = tmp_path / "other.toml"
    other.write_text(TINY.read_text().replace("chunk = 200", "chunk = 100"))
    (run / "analysis").mkdir()
    (run / "analysis" / "analysis.md").write_text("# a long `ddmkit analyze`")
    messages = []
    result = run_pipeline(load_config(other), run, log=messages.append)
    assert any("the evaluate settings changed; the trained networks and the samples are kept" in m for m in messages)
    # the analysis goes with the scores (made with the settings before): said, with the command that makes it again
    assert not (run / "analysis").exists()
    assert f"{run}: removed {run / 'analysis'} (of `ddmkit analyze`, made with the settings before); `ddmkit " \
           f"analyze {run}` makes it again" in messages
    assert {p.name: p.read_bytes() for p in (run / "samples").iterdir()} == drawn
    assert {p.name: p.stat().st_mtime_ns for p in (run / "samples").iterdir()} == stamps  # not drawn again
    assert result["chunk"] == 100


def test_router_expert_mismatch_and_corrupt_weights(tiny_run, tmp_path, cli):
    """The checks on the model folders themselves (a run without registry.json; with one, any change
    is refused before by the hashes: test_registry.py)."""
    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(DDMError, match="SHA-256"):
        (copy / "router" / "config.json").write_text((copy / "router" / "config.json").read_text() + " ")
        load_ddm(copy)
    (copy / "registry.json").unlink()
    cfg_path = copy / "router" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["data_shape"] = [3]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DDMError, match="shape"):
        load_ddm(copy)
    cfg["data_shape"] = [2]
    cfg["time_convention"] = "vp: t=1 data"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DDMError, match="time convention"):
        load_ddm(copy)
    cfg["time_convention"] = json.loads((out / "router" / "config.json").read_text())["time_convention"]
    cfg_path.write_text(json.dumps(cfg))
    (copy / "experts" / "expert_01" / "model.safetensors").write_bytes(b"\x00" * 10)
    r = cli("sample", copy, "--strategy", "top-1")
    assert r.returncode == 2 and "expert_01" in r.stderr and "corrupt" in r.stderr


def test_data_without_closed_form_truth(tmp_path):
    """Two moons: no exact experts, no NLL; distances against held-out data still work."""
    cfg = load_config(TINY)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"name": "moons"}),
                                 "sample": cfg.sample.model_copy(update={"strategies": ["top-1", "full"]})})
    result = run_pipeline(cfg, tmp_path / "m", log=lambda m: None)
    assert set(result["rows"]) == {"top-1", "full"}
    assert "nll" not in result["rows"]["full"] and result["rows"]["full"]["w2"] > 0
    assert (tmp_path / "m" / "plots" / "samples.png").exists()


def test_sampling_in_batches_bounds_memory_not_results():
    """batch_size: deterministic strategies give the same samples to rounding, the info adds up,
    random ones are reproducible; the oracle's per-row label prior follows its rows into the chunks."""
    from ddmkit.ddm import DDM
    from ddmkit.ddm.sampling import sample_ddm, sample_single

    k, d, n = 3, 2, 23
    experts = [lambda x, t, y=None, j=j: torch.full_like(x, float(j + 1)) for j in range(k)]  # expert j: v = j + 1

    def router(x, t):
        return torch.softmax(torch.stack([x[:, 0], -x[:, 0], x[:, 1]], 1), 1)

    ddm = DDM(experts=experts, router=router, prior=torch.full((k,), 1 / k), data_shape=(d,),
              label_prior=torch.eye(k))  # label y -> cluster y
    whole, info = sample_ddm(ddm, "top-2", n, steps=5, seed=1)
    parts, pinfo = sample_ddm(ddm, "top-2", n, steps=5, seed=1, batch_size=7)
    assert torch.allclose(whole, parts, atol=1e-6)
    assert pinfo["expert_calls_per_sample"] == info["expert_calls_per_sample"] == 10
    assert pinfo["router_calls"] == 4 * 5 and pinfo["velocity_evaluations"] == info["velocity_evaluations"] == 5
    again, _ = sample_ddm(ddm, "switch", n, steps=5, seed=1, batch_size=7)
    assert torch.equal(again, sample_ddm(ddm, "switch", n, steps=5, seed=1, batch_size=7)[0])
    y = torch.arange(n) % k
    x1 = torch.zeros(n, d)
    oracle, _ = sample_ddm(ddm, "oracle", n, steps=4, x1=x1, cond={"y": y}, batch_size=5)
    assert torch.allclose(oracle, -(y[:, None] + 1.0).expand(n, d))  # x0 = x1 - v: expert y's shift, every row
    mono, _ = sample_single(lambda x, t, y: x + y[:, None], (d,), n, steps=4, x1=x1, cond={"y": y.float()},
                            batch_size=6)
    assert torch.allclose(mono, sample_single(lambda x, t, y: x + y[:, None], (d,), n, steps=4, x1=x1,
                                              cond={"y": y.float()})[0], atol=1e-6)
    with pytest.raises(DDMError, match="callback"):
        sample_ddm(ddm, "top-2", n, steps=2, batch_size=7, callback=lambda step: None)
    with pytest.raises(DDMError, match="batch_size"):
        sample_ddm(ddm, "top-2", n, steps=2, batch_size=0)


def test_samples_are_written_over_the_noise_only_where_no_one_else_holds_it():
    """The samples of noise drawn inside take its place chunk by chunk (n rows on the device, not three
    times n); a caller's x1 and the states a callback kept are left as they were."""
    from ddmkit.ddm import DDM
    from ddmkit.ddm.sampling import sample_ddm, sample_single, start_noise

    k, d, n = 2, 3, 12
    ddm = DDM(experts=[lambda x, t, j=j: x * 0 + j + 1 for j in range(k)],
              router=lambda x, t: torch.full((len(x), k), 0.5), prior=torch.full((k,), 1 / k), data_shape=(d,))
    x1 = start_noise(n, (d,), 0, "cpu")
    given = x1.clone()
    whole, _ = sample_ddm(ddm, "top-1", n, steps=3, x1=x1, batch_size=5)
    assert torch.equal(x1, given)
    assert torch.equal(sample_ddm(ddm, "top-1", n, steps=3, batch_size=5)[0], whole)  # drawn inside: the same
    seen = []
    sample_ddm(ddm, "full", n, steps=3, callback=lambda step: seen.append(step["x"]))
    assert torch.equal(seen[0], given)  # the first state a callback saw is the noise still
    mono, _ = sample_single(lambda x, t: x, (d,), n, steps=2, x1=x1, batch_size=5)
    assert torch.equal(x1, given) and not torch.equal(mono, given)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_sampling_in_chunks_holds_n_rows_of_data_at_once():
    """batch_size bounds the memory a set needs: about n rows of data (the noise, then the samples in its
    place) and one chunk's work, not the noise, the chunks' samples and their concatenation."""
    from ddmkit.ddm.sampling import sample_single

    n, d, chunk = 4096, 16384, 256  # 256 MiB of float32 rows, 16 MiB a chunk
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    samples, _ = sample_single(lambda x, t: -x, (d,), n, steps=2, device="cuda", batch_size=chunk)
    peak = torch.cuda.max_memory_allocated() - base  # (an H100: the rows and 4 chunks; 3x the rows before)
    assert samples.is_cuda and peak < (n + 8 * chunk) * d * 4, peak / (n * d * 4)


def test_cli_messages_print_brackets_as_they_are(capsys, monkeypatch):
    """rich reads '[word]' as markup: log lines and errors must not lose '[sample]' or 'ddmkit[ray]'."""
    import ddmkit.cli as cli_module

    cli_module.log("the [sample] settings, sizes [3, 4]")
    assert "the [sample] settings, sizes [3, 4]" in capsys.readouterr().err

    def failing():
        raise DDMError("backend 'ray' needs Ray: pip install 'ddmkit[ray]'")
    monkeypatch.setattr(cli_module, "run_app", failing)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    assert exit_info.value.code == 2 and "pip install 'ddmkit[ray]'" in capsys.readouterr().err


def test_a_set_drawn_with_other_settings_or_networks_is_drawn_again(tiny_run, tmp_path, cli):
    """`ddmkit run` keeps a set drawn with the run's settings and networks, and draws again one drawn by
    `ddmkit sample` with other settings (the report would mix them) or before an expert was trained again."""
    from ddmkit.io import load_tensors, read_metadata, save_tensors

    out = tmp_path / "copy"
    shutil.copytree(tiny_run[0], out)
    info = lambda: json.loads((out / "samples" / "info.json").read_text())["top-2"]  # noqa: E731
    full = (out / "samples" / "full.safetensors").stat().st_mtime_ns
    assert cli("sample", out, "--strategy", "top-2", "--steps", "2", "--n", "50").returncode == 0
    assert info()["drawn_with"]["steps"] == 2 and len(load_tensors(out / "samples" / "top-2.safetensors")["x"]) == 50
    assert cli("run", TINY, "--out", out).returncode == 0
    assert info()["drawn_with"]["steps"] == 8 and len(load_tensors(out / "samples" / "top-2.safetensors")["x"]) == 400
    assert (out / "samples" / "full.safetensors").stat().st_mtime_ns == full  # drawn as the run draws: kept
    experts = out / "experts"  # an intended change of an expert, registered: every set is drawn again
    weights = experts / "expert_02" / "model.safetensors"
    save_tensors(weights, {name: t + 0.01 for name, t in load_tensors(weights).items()}, read_metadata(weights))
    assert cli("register", out).returncode == 0 and cli("run", TINY, "--out", out).returncode == 0
    assert (out / "samples" / "full.safetensors").stat().st_mtime_ns != full


def test_sample_draws_the_exact_set_its_help_offers(tiny_run, tmp_path, cli):
    """`ddmkit sample --strategy exact` (offered by its --help) was refused: the names went into
    sample.strategies, which holds routing strategies only."""
    out, _ = tiny_run
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    done = cli("sample", run, "--strategy", "exact", "--strategy", "top-1", "--strategy", "top-1 ", "--n", "40")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("sample top-1") == 1, done.stderr  # a name given twice is drawn once
    info = json.loads((run / "samples/info.json").read_text())
    assert info[EXACT]["drawn_with"]["n"] == 40 and info["top-1"]["drawn_with"]["n"] == 40


def test_sample_checks_the_solver_against_the_sets_it_draws(tiny_run, tmp_path, cli):
    """`ddmkit sample --solver adaptive --strategy exact` was refused because the run's sample.strategies hold
    switch, which this command does not draw; so was `--set sample.solver=adaptive` with any --strategy, and
    a config whose stats_router_strategies hold one. Adaptive with switch given as --strategy is still refused."""
    out, _ = tiny_run
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    stats = tmp_path / "stats.toml"  # the run's settings, with a statistics-only router set sample does not draw
    stats.write_text(TINY.read_text().replace("[sample]\n", '[sample]\nstats_router_strategies = ["sample-2"]\n'))
    for options, name in ((["--solver", "adaptive", "--strategy", "exact"], EXACT),
                          (["--set", "sample.solver=adaptive", "--strategy", "oracle"], "oracle"),
                          (["--config", stats, "--solver", "adaptive", "--strategy", "monolith"], "monolith")):
        done = cli("sample", run, *options, "--n", "8")
        assert done.returncode == 0, (options, done.stderr)
        drawn = json.loads((run / "samples/info.json").read_text())[name]["drawn_with"]
        assert (drawn["solver"], drawn["steps"], drawn["n"]) == ("adaptive", None, 8)
    before = (run / "samples/info.json").read_bytes()
    refused = cli("sample", run, "--set", "sample.solver=adaptive", "--strategy", "switch")
    assert refused.returncode == 2 and refused.stderr == (
        "error: sample: solver = 'adaptive' with switch: these strategies draw their experts anew at every "
        "evaluation, which the adaptive step-size control cannot settle (it hangs); use euler, heun, midpoint or "
        "rk4, or leave them out of --strategy\n"), refused.stderr
    assert (run / "samples/info.json").read_bytes() == before


def test_run_notes_once_a_strategy_that_calls_every_expert_as_sample_does(tiny_run, tmp_path, cli):
    """`ddmkit sample --strategy top-99` notes that top-K with K >= the experts is full routing; `ddmkit run` with
    top-99 in sample.strategies (and in stats_router_strategies) said nothing. It says it once, in the same words."""
    out, _ = tiny_run
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    note = "note: top-99 on a DDM of K = 4 experts calls every expert: the same routing as full"
    sampled = cli("sample", run, "--strategy", "top-99", "--n", "40")
    assert sampled.returncode == 0 and sampled.stderr.count(note) == 1, sampled.stderr
    done = cli("run", TINY, "--out", run, "--set", 'sample.strategies=["top-99", "full", "top-2"]', "--set",
               'sample.stats_router_strategies=["top-99"]', "--set", "sample.n=40", "--set", "evaluate.chunk=20",
               "--set", "evaluate.missing_experts=false", "--set", "evaluate.stats_router=false")
    assert done.returncode == 0 and done.stderr.count(note) == 1, done.stderr
    assert "note: top-2 " not in done.stderr and "note: full " not in done.stderr


@pytest.mark.parametrize("command, args, message", [
    ("run", ["--workers", "0", "--backend", "processes"], "--workers must be >= 1"),
    ("run", ["--address", "auto"], "--address is for the ray backend only"),
    ("run", ["--backend", "ray", "--address", "ray://head:10001"], "Ray Client (a ray:// address) cannot run"),
    ("run", ["--workers", "2"], "--workers is for the processes and ray backends"),  # was ignored
    ("run", ["--backend", "foo"], "error: --backend: unknown launch backend 'foo'; accepted: inline, processes, ray"),
    ("demo", ["--workers", "0", "--backend", "processes"], "--workers must be >= 1")])
def test_launch_options_are_refused_before_the_run_folder_is_made(tmp_path, command, args, message, cli):
    """--workers 0 and --address without ray were refused only after data and partition were written."""
    target = [TINY, "--out", tmp_path / "r"] if command == "run" else ["--out", tmp_path / "r"]
    done = cli(command, *target, *args)
    assert done.returncode == 2 and message in " ".join(done.stderr.split()), done.stderr
    assert not (tmp_path / "r").exists()


def test_sample_refuses_settings_of_another_run(tiny_run, tmp_path, cli):
    """`ddmkit sample RUN --set partition.k=5` was accepted and ignored; like evaluate, sample changes only
    how sets are drawn."""
    out, _ = tiny_run
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    before = (run / "samples/info.json").read_bytes()
    done = cli("sample", run, "--strategy", "top-1", "--set", "partition.k=5")
    assert done.returncode == 2 and "differs in partition.k" in " ".join(done.stderr.split()), done.stderr
    assert (run / "samples/info.json").read_bytes() == before


def test_the_study_caption_names_the_setting_that_set_its_count():
    """It said 'evaluate.study_n sets the count' where sample.n, smaller, did."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.vectors import study_sentence
    small = validate(RunConfig, {"sample": {"n": 100}})
    assert "Each row: 100 samples" in study_sentence(small) and "from the config's [sample] section (sample.n, as " \
        "it is below evaluate.study_n = 4000, sets the count)" in study_sentence(small)
    assert "evaluate.study_n sets the count" in study_sentence(validate(RunConfig, {"sample": {"n": 8000}}))
