"""`ddmkit sweep`: a tiny grid end to end from the command line (equal compute for every K, data and
partitions made once, resume), and the report's arithmetic on known answers."""
import json
import math
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from ddmkit.config import RunConfig, apply_overrides, load_config
from ddmkit.errors import DDMError
from ddmkit.layout import RunFolder
from ddmkit.pipeline.checks import check_clusters
from ddmkit.pipeline.images import FLOOR, RECONSTRUCTIONS
from ddmkit.pipeline.sweep import (SHARED, cell_config, cell_dir, cell_in_folder, cells, curves, interval, monolith_k,
                                   ratio_text, reach, render, scored_rows, short_trainings, summarize, sweep)

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.toml"
SWEEP = ROOT / "tests" / "configs" / "sweep_tiny.toml"  # tiny.toml's training, fewer samples scored, no studies


cli = run_cli  # `ddmkit ARGS` in this process (conftest); tiny_grid, session-scoped, calls it too


GRID = ("--k", "2", "--k", "4", "--budget", "0.5", "--budget", "1")  # the tiny grid the CLI tests share


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory, worker_id):
    """The folder of the tiny grid (GRID of sweep_tiny.toml, one seed) trained and scored once per test
    session, under a lock in the folder every xdist worker shares: the CLI tests below read it, and a rerun
    on it (resume) rewrites only its report, atomically and with the same bytes."""
    root = tmp_path_factory.getbasetemp()
    root = root if worker_id == "master" else root.parent  # the run's folder, above each worker's own
    out = root / "tiny_grid" / "sweep"
    with FileLock(str(root / "tiny_grid.lock")):
        if not (out / "sweep.json").exists():
            done = cli("sweep", SWEEP, "--out", out, *GRID)
            assert done.returncode == 0, done.stderr
    return out


def copy_metrics(grid, into, names):
    """Only the cells' metrics.json, as brought back from the machines that scored them."""
    for name in names:
        (into / name).mkdir(parents=True)
        (into / name / "metrics.json").write_bytes((grid / name / "metrics.json").read_bytes())


def test_every_k_and_the_monolith_see_the_same_samples_at_a_budget():
    cfg = load_config(TINY)  # k = 4, 60 steps x batch 64 per expert
    for k, budget in ((2, 1.0), (4, 1.0), (8, 0.5), (1, 2.0)):
        c = cell_config(cfg, k, budget, seed=3, scale="steps")
        assert c.partition.k == k and c.expert.train.steps * k == budget * 4 * 60
        assert c.expert.train.seed == 3 and c.router.train.seed == 4 and c.monolith.enabled


def test_by_default_every_k_takes_the_same_steps_and_samples():
    cfg = load_config(TINY)  # k = 4, 60 steps x batch 64 per expert
    for k, budget in ((2, 1.0), (4, 0.5), (8, 0.5), (1, 2.0)):
        c, by_steps = cell_config(cfg, k, budget, seed=3), cell_config(cfg, k, budget, seed=3, scale="steps")
        assert c.expert.train.steps == budget * 60 and c.expert.train.batch_size * k == 64 * 4
        samples = c.expert.train.steps * c.expert.train.batch_size * k
        assert samples == by_steps.expert.train.steps * by_steps.expert.train.batch_size * k == budget * 4 * 60 * 64
    assert cell_config(cfg, 4, 0.5, 0, scale="steps") == cell_config(cfg, 4, 0.5, 0)  # K_ref: the same cell
    names = [cell_dir(Path("out"), k, 0.5, 0, scale, 4).name for k in (2, 4) for scale in ("batch", "steps")]
    assert names == ["k2_b0.5_s0", "k2_b0.5_s0_steps", "k4_b0.5_s0", "k4_b0.5_s0"]  # K_ref's cell is shared


def test_top_k_is_sampled_once_where_it_is_full_routing():
    cfg = load_config(TINY)  # strategies: monolith, full, top-2, switch, oracle, nearest
    assert cell_config(cfg, 2, 1.0, 0, monolith=False).sample.strategies == ["full", "switch", "oracle", "nearest"]
    assert "top-2" in cell_config(cfg, 3, 1.0, 0).sample.strategies
    without_full = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"strategies": ["top-2", "top-1"]})})
    assert cell_config(without_full, 2, 1.0, 0, monolith=False).sample.strategies == ["top-2", "top-1"]


def test_a_cell_draws_and_scores_only_what_the_sweep_reads():
    """The guidance sweep, the statistics-only router's sets and the evaluate studies of the config were drawn
    and scored in every cell (8 extra sets of sample.sweep_n for configs/fashion_mnist.toml), though the
    sweep's report reads none of them."""
    raw = load_config(TINY).model_dump()
    raw["sample"].update(guidance_sweep=[2.0], stats_router_strategies=["top-2"])
    raw["evaluate"].update(missing_experts=True, stats_router=True)
    cfg = RunConfig.model_validate(raw)
    with pytest.raises(DDMError, match="hold fewer than 2 rows"):
        check_clusters(cfg, [1, 300], (2,))
    cell = cell_config(cfg, 2, 1.0, 0)
    assert cell.sample.guidance_sweep == [] and cell.sample.stats_router_strategies == []
    assert not cell.evaluate.missing_experts and not cell.evaluate.stats_router
    assert cell.sample.strategies == ["monolith", "full", "switch", "oracle", "nearest"]
    # so a cluster of one row, which the statistics-only router's covariance refused, is only a warning now
    assert check_clusters(cell, [1, 300], (2,))  # (the warning: fewer rows than the batch)


def test_the_monolith_is_trained_in_one_k_only():
    cfg = load_config(TINY)  # k = 4
    assert monolith_k(cfg, [2, 4, 8]) == 4 and monolith_k(cfg, [8, 2]) == 8
    without = cell_config(cfg, 2, 1.0, 0, monolith=False)
    assert not without.monolith.enabled and "monolith" not in without.sample.strategies
    assert cell_config(cfg, 4, 1.0, 0).sample.strategies[0] == "monolith"


def test_networks_stopped_during_their_warm_up_are_named_before_any_work(tmp_path):
    raw = apply_overrides(load_config(TINY).model_dump(), ["expert.train.warmup=40", "monolith.match=steps"])
    cfg = RunConfig.model_validate(raw)  # k = 4, 60 steps per expert
    # each expert: 60 x budget x 4 / K steps (K=8 b0.5: 15; K=4 b0.5: 30; K=2 b0.5: 60); the monolith (K=4): 4 x 60 x b
    assert short_trainings(cfg, [2, 4, 8], [0.1, 0.5], mono_k=4, scale="steps") == [
        "K=2 budget 0.1: each expert trains 12 steps, fewer than its 40-step learning-rate warm-up",
        "K=4 budget 0.1: each expert trains 6 steps, fewer than its 40-step learning-rate warm-up",
        "K=4 budget 0.1: the monolith trains 24 steps, fewer than its 40-step learning-rate warm-up",
        "K=4 budget 0.5: each expert trains 30 steps, fewer than its 40-step learning-rate warm-up",
        "K=8 budget 0.1: each expert trains 3 steps, fewer than its 40-step learning-rate warm-up",
        "K=8 budget 0.5: each expert trains 15 steps, fewer than its 40-step learning-rate warm-up"]
    assert short_trainings(cfg, [2, 8], [1.0], mono_k=4) == []  # the default scale: 60 steps at every K
    assert short_trainings(cfg, [6], [1.0], mono_k=4, scale="steps") == []  # 40 steps: the warm-up ends with training
    assert short_trainings(cfg, [2, 8], [1.0], mono_k=4, scale="steps") == [  # K=8: 30 steps at the config's batch
        "K=8 budget 1: each expert trains 30 steps, fewer than its 40-step learning-rate warm-up"]
    logged = []
    with pytest.raises(DDMError, match="not trained"):  # the warning comes before the (failing) work
        sweep(cfg, tmp_path / "out", [8], [0.5], [0], stages="evaluate", log=logged.append, scale="steps")
    assert "warning: K=8 budget 0.5: each expert trains 15 steps" in logged[0] and "--scale batch" in logged[0]


def test_seeds_go_to_the_ends_of_the_budget_range():
    grid = cells([2], [0.25, 0.5, 1.0], [0, 1, 2])
    assert [(b, s) for _, b, s in grid] == [(0.25, 0), (0.25, 1), (0.25, 2), (0.5, 0), (1.0, 0), (1.0, 1), (1.0, 2)]
    assert len(cells([2, 4], [0.25, 0.5, 1.0], [0, 1, 2], all_seeds=True)) == 18


def test_intervals_and_the_compute_to_reach_a_target():
    p = interval([1.0, 2.0, 3.0])
    assert p["mean"] == 2.0 and p["hi"] - 2.0 == pytest.approx(4.302652729911275 / math.sqrt(3))  # t_0.975,2
    assert interval([5.0]) == {"mean": 5.0, "lo": 5.0, "hi": 5.0, "n": 1}
    series = [(0.5, 2.0), (0.25, 4.0), (1.0, 1.0)]  # (compute, mean), in any order
    assert reach(series, 4.0) == 0.25
    assert reach(series, 3.0) == pytest.approx(math.sqrt(0.25 * 0.5))  # half way in log compute
    assert reach(series, 0.5) is None
    assert ratio_text(0.25, 0.25) == "<= 0.25x (already at the smallest budget)"  # an upper bound only
    assert ratio_text(0.354, 0.25) == "0.354x" and ratio_text(None, 0.25) == "never"
    assert ratio_text(None, 0.25, [0.5, 1.0]) == "not yet (budgets 0.5, 1 not scored)"  # a partial report


def test_the_compute_ratio_counts_the_router():
    """The DDM's compute is experts + router: with a router of 5 FLOPs at every budget, the K = 2 points
    sit at 55 and 105 against the monolith's 100 at budget 1, and the monolith's final FID (10) is
    reached half way (in FID) between them, at sqrt(55 x 105) in log compute."""
    def cell(budget, fid, mono):
        return {"k": 2, "budget": budget, "seed": 0, "rows": {"monolith": {"fid": mono}, "top-1": {"fid": fid}}}
    results = [cell(0.5, 12.0, 14.0), cell(1.0, 8.0, 10.0)]
    compute = {"monolith": {0.5: 50.0, 1.0: 100.0}, "K=2": {0.5: 55.0, 1.0: 105.0}}
    report = summarize(results, [2], [0.5, 1.0], ["top-1"], compute)
    assert report["compute_ratio"][2] == pytest.approx(math.sqrt(55 * 105) / 100)
    assert report["compute_smallest"][2] == pytest.approx(0.55)
    text = render({**report, "monolith_k": 2, "router_flops": {"K=2": {"0.5": 5.0, "1": 5.0}}})
    assert "| K=2 (experts + router) | 55 (9.1%) | 105 (4.8%) |" in text and "0.76x" in text
    assert "| K=2 | K=2 top-1 | 0.857 | 0.8 |" in text  # the best strategy over the monolith: 12 / 14, 8 / 10
    assert curves(report) == {"monolith": [(50.0, 14.0, 14.0, 14.0), (100.0, 10.0, 10.0, 10.0)],
                              "K=2 top-1": [(55.0, 12.0, 12.0, 12.0), (105.0, 8.0, 8.0, 8.0)]}  # the plot's x: FLOPs


def test_the_plots_show_each_k_best_and_every_strategy_of_one_k():
    def cell(k, fids):
        return {"k": k, "budget": 1.0, "seed": 0, "rows": {name: {"fid": v} for name, v in fids.items()}}
    results = [cell(2, {"monolith": 10.0, "top-1": 8.0, "full": 9.0}), cell(4, {"top-1": 7.0, "full": 6.0})]
    report = summarize(results, [2, 4], [1.0], ["full", "top-1"], {"monolith": {1.0: 100.0}, "K=2": {1.0: 101.0},
                                                                  "K=4": {1.0: 102.0}})
    assert curves(report) == {"monolith": [(100.0, 10.0, 10.0, 10.0)], "K=2 top-1": [(101.0, 8.0, 8.0, 8.0)],
                              "K=4 full": [(102.0, 6.0, 6.0, 6.0)]}  # sweep.png: each K's best
    assert curves(report, 4) == {"monolith": [(100.0, 10.0, 10.0, 10.0)], "K=4 full": [(102.0, 6.0, 6.0, 6.0)],
                                 "K=4 top-1": [(102.0, 7.0, 7.0, 7.0)]}  # sweep_strategies.png's K = 4 panel


def test_a_partial_report_without_monolith_cells_says_not_yet():
    results = [{"k": 2, "budget": 0.5, "seed": 0, "rows": {"top-1": {"fid": 8.0}}}]  # the monolith's cells missing
    report = summarize(results, [2], [0.5, 1.0], ["top-1"], {"monolith": {0.5: 50.0, 1.0: 100.0},
                                                             "K=2": {0.5: 55.0, 1.0: 105.0}})
    extra = {"monolith_k": 2, "router_flops": {}, "missing": ["k2_b1_s0"]}
    assert "None yet: this partial report" in render({**report, **extra})
    assert "This grid has no monolith cells" in render({**report, **extra, "missing": []})  # a part of a grid


def test_a_tiny_sweep_from_the_command_line(tiny_grid):
    out = tiny_grid
    args = ("sweep", SWEEP, "--out", out, *GRID)
    # one seed: where seeds go is tested on cells() and cell_config() above, their intervals on summarize()
    report = json.loads((out / "sweep.json").read_text())
    assert report["metric"] == "W2 / noise floor" and report["ks"] == [2, 4]
    assert report["table"]["monolith"]["1"]["n"] == 1  # one monolith, trained in the K_ref = 4 cells
    assert (out / "k4_b1_s0" / "monolith").exists() and not (out / "k2_b1_s0" / "monolith").exists()
    recorded = json.loads((out / "k2_b1_s0" / "config.json").read_text())["config"]
    assert "monolith" not in recorded["sample"]["strategies"]
    assert report["table"]["K=4 top-2"]["0.5"]["n"] == 1 and set(report["best"]) == {"2", "4"}
    assert "K=2 top-2" not in report["table"] and "K=2 top-2: the same as full" in (out / "sweep.md").read_text()
    assert (out / "sweep.md").exists() and (out / "plots" / "sweep.png").exists()
    assert (out / "plots" / "sweep_strategies.png").exists()  # a panel per K
    compute, router = report["compute"], report["router_flops"]  # the same samples, plus the router
    assert compute["K=2"]["1"] == pytest.approx(compute["monolith"]["1"] + router["K=2"]["1"])
    assert "(experts + router)" in (out / "sweep.md").read_text()
    data = [out / f"k{k}_b{b}_s0" / "data" / "train.safetensors" for k in (2, 4) for b in ("0.5", "1")]
    assert len({p.stat().st_ino for p in data}) == 1  # the data made once, linked into every cell
    shards = [out / f"k2_b{b}_s0" / "partition" / "manifest.json" for b in ("0.5", "1")]
    assert len({p.stat().st_ino for p in shards}) == 1  # one partition per K
    train = json.loads((out / "k2_b0.5_s0" / "experts" / "expert_00" / "config.json").read_text())["train"]
    assert (train["steps"], train["batch_size"]) == (30, 128)  # 0.5 x 60 steps at 64 x 4 / 2: the global batch split
    weights, metrics = (out / "k4_b1_s0" / name for name in ("experts/expert_01/model.safetensors", "metrics.json"))
    before, report_bytes = (weights.stat().st_mtime_ns, metrics.stat().st_mtime_ns), (out / "sweep.json").read_bytes()
    again = cli(*args)
    assert again.returncode == 0 and "scored before" in again.stderr
    assert (weights.stat().st_mtime_ns, metrics.stat().st_mtime_ns) == before  # resumed: nothing retrained or rescored
    assert (out / "sweep.json").read_bytes() == report_bytes
    refused = cli("sweep", SWEEP, "--out", out, "--k", "0", "--budget", "1")
    assert refused.returncode == 2 and "--k" in refused.stderr


@pytest.mark.slow  # about 45 s on 2 cores: five sweeps of latent cells
def test_a_latent_sweep_trains_one_autoencoder_for_the_grid(tmp_path):
    """In latent space the autoencoder is trained once per grid folder and linked into every cell (it is
    not part of the compared compute), also when the grid is run in parts by several commands; each K's
    latents are encoded once, and every cell verifies against its registry. A cell's config.json and
    autoencoder brought alone into a new folder (a grid continued on another machine) give that grid
    the same autoencoder: the same scores, also when that config.json was written by an earlier ddmkit
    (without a setting added since)."""
    from test_latent import latent_config

    config, out = latent_config(tmp_path), tmp_path / "sweep"
    first = cli("sweep", config, "--out", out, "--k", "2", "--budget", "0.5", "--seed", "0")
    second = cli("sweep", config, "--out", out, "--k", "2", "--budget", "1", "--seed", "0")  # the grid's other part
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (first.stderr + second.stderr).count("autoencoder: trained") == 1
    assert (first.stderr + second.stderr).count("latents: ") == 1
    names = [f"k2_b{b}_s0" for b in ("0.5", "1")]
    weights = [out / n / "autoencoder" / "diffusion_pytorch_model.safetensors" for n in names]
    assert len({p.stat().st_ino for p in weights}) == 1
    latents = [out / n / "latents" / "cluster_01.safetensors" for n in names]
    assert len({p.stat().st_ino for p in latents}) == 1
    assert all(cli("verify", out / n).returncode == 0 for n in names)
    report = cli("sweep", config, "--out", out, "--k", "2", "--budget", "0.5", "--budget", "1", "--stages", "report")
    assert report.returncode == 0, report.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["metric"] == "FID"
    # the command's summary says when the smallest budget already reaches the monolith
    line = next(x for x in report.stderr.splitlines() if x.startswith("K=2: compute at which"))
    assert (summary["compute_ratio"]["2"] == summary["compute_smallest"]["2"]) == ("FID: <= " in line)

    elsewhere = tmp_path / "elsewhere" / names[0]
    elsewhere.mkdir(parents=True)
    recorded = json.loads((out / names[0] / "config.json").read_text())
    for section in recorded["config"].values():  # as an earlier ddmkit wrote it: no train.parallel
        if isinstance(section, dict) and isinstance(section.get("train"), dict):
            section["train"].pop("parallel", None)
    (elsewhere / "config.json").write_text(json.dumps(recorded))
    shutil.copytree(out / names[0] / "autoencoder", elsewhere / "autoencoder")
    third = cli("sweep", config, "--out", elsewhere.parent, "--k", "2", "--budget", "1", "--seed", "0")
    assert third.returncode == 0 and "autoencoder: trained" not in third.stderr, third.stderr
    fid = {name: row["fid"] for name, row in json.loads((out / names[1] / "metrics.json").read_text())["rows"].items()}
    again = json.loads((elsewhere.parent / names[1] / "metrics.json").read_text())["rows"]
    assert {name: row["fid"] for name, row in again.items()} == fid

    # a kept cell that holds only its metrics.json (scored on another machine) comes first in the grid: the
    # next cell still takes the autoencoder brought in another cell's folder (it took the empty kept cell)
    third_out = tmp_path / "third"
    (third_out / names[0]).mkdir(parents=True)
    shutil.copy(out / names[0] / "metrics.json", third_out / names[0])
    brought = third_out / "k2_b0.25_s0"  # a cell of the grid's other part, its own config.json (as seed_cell writes)
    brought.mkdir()
    from ddmkit.io import write_json
    from ddmkit.pipeline.prepare import config_record, run_config

    part = cell_config(load_config(config), 2, 0.25, 0, run_config(out / names[0]).monolith.enabled)
    write_json(brought / "config.json", config_record(part))
    shutil.copytree(out / names[0] / "autoencoder", brought / "autoencoder")
    fourth = cli("sweep", config, "--out", third_out, "--k", "2", "--budget", "0.5", "--budget", "1", "--seed", "0")
    assert fourth.returncode == 0 and "scored before" in fourth.stderr, fourth.stderr
    assert "autoencoder: trained" not in fourth.stderr, fourth.stderr


def test_a_sweep_trained_now_and_scored_later(tmp_path):
    out = tmp_path / "sweep"
    grid = ("sweep", SWEEP, "--out", out, "--k", "2", "--budget", "0.5", "--scale", "steps")
    early = cli(*grid, "--stages", "evaluate")
    assert early.returncode == 2 and "not trained" in early.stderr and not out.exists()  # refused, nothing written
    trained = cli(*grid, "--stages", "train")
    assert trained.returncode == 0, trained.stderr
    cell = out / "k2_b0.5_s0_steps"  # K_ref = 4 keeps its name; every other K's steps cell is apart
    train = json.loads((cell / "config.json").read_text())["config"]["expert"]["train"]
    assert (train["steps"], train["batch_size"]) == (60, 64)  # --scale steps: 0.5 x 60 x 4 / 2 at the config's batch
    weights = cell / "experts" / "expert_01" / "model.safetensors"
    assert weights.exists() and (cell / "monolith" / "model.safetensors").exists()
    assert not (out / "sweep.md").exists() and not (cell / "report.md").exists()  # trained, not scored
    before = weights.stat().st_mtime_ns
    scored = cli(*grid, "--stages", "evaluate")
    assert scored.returncode == 0, scored.stderr
    assert (out / "sweep.md").exists() and weights.stat().st_mtime_ns == before  # scored, nothing retrained
    assert json.loads((out / "sweep.json").read_text())["table"]["monolith"]["0.5"]["n"] == 1
    bad = cli(*grid, "--stages", "sample")
    assert bad.returncode == 2 and "--stages" in bad.stderr
    misplaced = cli(*grid, "--partial")
    assert misplaced.returncode == 2 and "--partial: only with --stages report" in misplaced.stderr
    unknown = cli(*grid[:-1], "batches")
    assert unknown.returncode == 2 and "--scale: unknown value 'batches'" in unknown.stderr


def test_evaluate_is_refused_before_any_cell_is_scored_when_some_are_not_trained(tiny_grid, tmp_path):
    """--stages evaluate on a grid whose K=2 cells are trained and K=4 cells are not: refused before any cell is
    scored, naming every untrained cell and the sweep's own fix. Each cell's run_pipeline refuses an untrained
    cell too, but only when its turn comes (the trained cells before it scored first, the grid left half done),
    naming that cell alone and offering `ddmkit run` for it."""
    out = tmp_path / "sweep"
    trained = ["k2_b0.5_s0", "k2_b1_s0"]
    for name in trained:  # trained, not scored: the cell's folder without its metrics.json
        shutil.copytree(tiny_grid / name, out / name, ignore=shutil.ignore_patterns("metrics.json"))
    refused = cli("sweep", SWEEP, "--out", out, *GRID, "--stages", "evaluate")
    assert refused.returncode == 2, refused.stderr
    assert (f"--stages evaluate: cells k4_b0.5_s0, k4_b1_s0 in {out} are not trained; train them first with the "
            "same command and --stages train") in " ".join(refused.stderr.split()), refused.stderr
    assert not any((out / name / "metrics.json").exists() for name in trained)
    assert sorted(p.name for p in out.iterdir()) == trained


def test_the_report_from_cells_scored_elsewhere(tiny_grid, tmp_path):
    """--stages report: only the cells' metrics.json, brought back from the machines that scored them."""
    out, elsewhere = tiny_grid, tmp_path / "brought_back"
    names = ["k2_b0.5_s0", "k2_b1_s0", "k4_b0.5_s0", "k4_b1_s0"]
    early = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--stages", "report")
    assert early.returncode == 2 and ", ".join(names) in early.stderr and not elsewhere.exists()
    # three of four cells brought back: --partial reports them, naming the other
    copy_metrics(out, elsewhere, names[:3])
    half = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--stages", "report", "--partial")
    assert half.returncode == 0, half.stderr
    partial = json.loads((elsewhere / "sweep.json").read_text())
    assert partial["missing"] == ["k4_b1_s0"] and list(partial["table"]["monolith"]) == ["0.5"]
    assert "left out (k4_b1_s0)" in (elsewhere / "sweep.md").read_text()
    copy_metrics(out, elsewhere, names[3:])
    done = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--stages", "report")
    assert done.returncode == 0, done.stderr
    want, got = (json.loads((d / "sweep.json").read_text()) for d in (out, elsewhere))
    assert got["table"] == want["table"] and got["compute_ratio"] == want["compute_ratio"]
    assert (elsewhere / "sweep.md").read_text() == (out / "sweep.md").read_text()
    assert sorted(p.name for p in (elsewhere / "k4_b1_s0").iterdir()) == ["metrics.json"]  # nothing trained
    for stage in ("evaluate", "train"):  # scored cells need no weights and no training
        kept = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--stages", stage)
        assert kept.returncode == 0 and kept.stderr.count("scored before") == 4, (stage, kept.stderr)
        assert sorted(p.name for p in (elsewhere / "k4_b1_s0").iterdir()) == ["metrics.json"]
    other = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--stages", "report", "--set", "sample.steps=7")
    assert other.returncode == 2 and "another config" in other.stderr and "k2_b0.5_s0" in other.stderr
    assert "differs in sample.steps (8, asked 7)" in " ".join(other.stderr.split())  # the field, named
    parts = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--stages", "report", "--monolith-k", "2")
    assert parts.returncode == 2 and "monolith.enabled differs: give --monolith-k" in " ".join(parts.stderr.split())
    scale = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--stages", "report", "--scale", "steps")
    assert scale.returncode == 2 and "Cells of the other --scale are there" in " ".join(scale.stderr.split())


def test_cells_brought_back_as_metrics_alone_are_named_with_what_works(tiny_grid, tmp_path):
    """A cell that holds only its metrics.json (scored elsewhere) and is to be run again, by --force or with another
    config, said "not a ddmkit run folder ... choose another --out", which no --out mends: it is named, before any
    cell writes, with what works (keep its scores, or remove its folder to train and score it here)."""
    out, elsewhere = tiny_grid, tmp_path / "brought_back"
    names = ["k2_b0.5_s0", "k2_b1_s0", "k4_b0.5_s0", "k4_b1_s0"]
    copy_metrics(out, elsewhere, names)
    forced = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--force")
    said = " ".join(forced.stderr.split())
    assert forced.returncode == 2 and f"--force: cells {', '.join(names)} in {elsewhere} hold only their " \
        "metrics.json" in said and "leave --force out to keep their scores, or remove those cell folders" in said, said
    other = cli("sweep", SWEEP, "--out", elsewhere, *GRID, "--set", "sample.steps=7")
    said = " ".join(other.stderr.split())
    assert other.returncode == 2 and "hold only a metrics.json made with another config" in said \
        and "differs in sample.steps (8, asked 7)" in said and "choose another --out" not in said, said
    for name in names:
        assert sorted(p.name for p in (elsewhere / name).iterdir()) == ["metrics.json"]  # nothing written
    kept = cli("sweep", SWEEP, "--out", elsewhere, *GRID)  # without --force their scores are kept
    assert kept.returncode == 0 and kept.stderr.count("scored before") == 4, kept.stderr


def test_cells_made_with_other_devices_or_threads_are_the_same_cells(tiny_grid, tmp_path):
    """How the jobs ran (devices, threads, logging) makes no other cell: a grid scored with --device cuda is
    reported on a CPU machine (by the same command line), and a cell scored before is kept with other threads;
    a setting of what is trained or sampled still counts, and only it is named."""
    out, names = tmp_path / "from_gpu", ["k2_b0.5_s0", "k2_b1_s0", "k4_b0.5_s0", "k4_b1_s0"]
    copy_metrics(tiny_grid, out, names)
    for name in names:
        path = out / name / "metrics.json"
        metrics = json.loads(path.read_text())
        for section in ("expert", "router", "latent"):
            metrics["config"][section]["train"].update(device="cuda", threads=8, log_every=7)
        path.write_text(json.dumps(metrics))
    report = cli("sweep", SWEEP, "--out", out, *GRID, "--stages", "report")
    assert report.returncode == 0, report.stderr
    assert (out / "sweep.md").read_text() == (tiny_grid / "sweep.md").read_text()
    # the same command line as on the GPU: the report uses no device (--device cuda:99 was refused here)
    (out / "sweep.md").unlink()
    same = cli("sweep", SWEEP, "--out", out, *GRID, "--stages", "report", "--device", "cuda:99")
    assert same.returncode == 0, same.stderr
    assert (out / "sweep.md").read_text() == (tiny_grid / "sweep.md").read_text()
    scoring = cli("sweep", SWEEP, "--out", out, *GRID, "--stages", "evaluate", "--device", "cuda:99", "--force")
    said = " ".join(scoring.stderr.split())
    assert scoring.returncode == 2 and "--device: 'cuda:99', but this machine has" in said, said
    kept = cli("sweep", SWEEP, "--out", out, *GRID, "--stages", "evaluate", "--set", "expert.train.threads=2")
    assert kept.returncode == 0 and kept.stderr.count("scored before") == 4, kept.stderr
    other = cli("sweep", SWEEP, "--out", out, *GRID, "--stages", "report", "--set", "sample.steps=7")
    assert other.returncode == 2 and "differs in sample.steps (8, asked 7); give" in " ".join(other.stderr.split())
    raw = apply_overrides(load_config(SWEEP).model_dump(), ["latent.train.threads=4", "latent.train.device=cpu"])
    cell = cell_config(RunConfig.model_validate(raw), 2, 1.0, 0, monolith=False)
    assert cell_in_folder(tiny_grid, cell, SHARED, "data") is not None  # its data shared with a grid part


def test_a_config_error_found_in_the_first_cell_leaves_no_out_folder(tmp_path):
    """Nor the folders above --out it made (--out runs/a/sweep): they were left behind, empty."""
    for out in (tmp_path / "sweep", tmp_path / "runs" / "a" / "sweep"):
        for setting, field in (("router.train.device=cuda:99", "router.train.device"),
                               ("expert.net.kwargs.width=0", "expert.net"), ("data.n_test=400", "data.n_test")):
            done = cli("sweep", TINY, "--out", out, "--k", "2", "--budget", "1", "--set", setting)
            assert done.returncode == 2 and field in done.stderr and "Traceback" not in done.stderr, done.stderr
            assert sorted(tmp_path.iterdir()) == [], setting


def test_a_cell_of_another_training_is_refused_before_any_cell_trains(tmp_path):
    """A grid run again with a changed training setting on the same --out: the cell that holds a run trained
    otherwise, last in the grid, was found only when its turn came, after the cells before it had trained."""
    from ddmkit.pipeline.prepare import config_record
    from ddmkit.io import write_json

    out = tmp_path / "sweep"
    made = apply_overrides(load_config(SWEEP).model_dump(), ["expert.train.lr=0.001"])
    old = out / "k4_b1_s0"
    old.mkdir(parents=True)
    write_json(old / "config.json", config_record(cell_config(RunConfig.model_validate(made), 4, 1.0, 0)))
    done = cli("sweep", SWEEP, "--out", out, "--k", "2", "--k", "4", "--budget", "1")
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and f"{old} already holds a different run" in said, said
    assert "expert.train.lr (0.001, asked 0.002)" in said and "--force" in said, said
    assert sorted(p.name for p in out.iterdir()) == ["k4_b1_s0"]  # the K = 2 cell was not made


def test_scored_cells_outside_the_grid_are_named(tiny_grid, tmp_path):
    """A middle budget's other seeds count only with --all-seeds: a report that leaves such a scored
    cell out says so."""
    out = tmp_path / "brought_back"
    copy_metrics(tiny_grid, out, ["k2_b0.5_s0", "k2_b1_s0"])
    (out / "k2_b0.75_s1").mkdir()
    (out / "k2_b0.75_s1" / "metrics.json").write_text("{}")
    grid = ("--k", "2", "--budget", "0.5", "--budget", "0.75", "--budget", "1", "--seed", "0", "--seed", "1",
            "--monolith-k", "4")
    done = cli("sweep", SWEEP, "--out", out, *grid, "--stages", "report", "--partial")
    assert done.returncode == 0, done.stderr
    assert "cell k2_b0.75_s1 is scored but left out" in " ".join(done.stderr.split()) and "--all-seeds" in done.stderr


def test_a_grid_without_the_monolith_k_says_so_naming_its_k(tiny_grid, tmp_path):
    """--monolith-k 4 over a grid of K = 2 alone wrote a report without monolith lines, the log saying nothing
    of why (a part of a larger grid, or a --monolith-k mistyped)."""
    out = tmp_path / "part"
    copy_metrics(tiny_grid, out, ["k2_b0.5_s0", "k2_b1_s0"])
    done = cli("sweep", SWEEP, "--out", out, "--k", "2", "--budget", "0.5", "--budget", "1", "--monolith-k", "4",
               "--stages", "report")
    err = " ".join(done.stderr.split())
    assert done.returncode == 0 and "sweep: note: --monolith-k 4: no cell of this grid has K = 4 (its K: 2), so " \
        "none trains the FLOP-matched monolith and the report has no monolith lines" in err, err
    assert "leave --monolith-k out, give one of 2, or add --k 4" in err, err
    report = json.loads((out / "sweep.json").read_text())
    assert "monolith" not in report["table"] and not report["compute_ratio"], report
    assert "K = 4 (--monolith-k), and this grid's K are 2." in " ".join((out / "sweep.md").read_text().split())


def test_a_grid_run_in_parts_is_the_whole_grid(tiny_grid, tmp_path):
    """--monolith-k: a part without the monolith's K trains the whole grid's cells (no monolith of its
    own), and the report over every part's cells is the whole grid's (its budget-1 cells, reported apart)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    copy_metrics(tiny_grid, whole, ["k2_b1_s0", "k4_b1_s0"])
    reported = cli("sweep", SWEEP, "--out", whole, "--k", "2", "--k", "4", "--budget", "1", "--stages", "report")
    assert reported.returncode == 0, reported.stderr
    alone = cli("sweep", SWEEP, "--out", parts, "--k", "2", "--budget", "1", "--monolith-k", "4")
    assert alone.returncode == 0, alone.stderr
    assert not (parts / "k2_b1_s0" / "monolith").exists()  # the K = 4 cells train it
    assert "no monolith cells" in (parts / "sweep.md").read_text()
    again = cli("sweep", SWEEP, "--out", parts, "--k", "2", "--budget", "1")  # the part again, --monolith-k forgotten
    assert again.returncode == 2 and "give --monolith-k the K whose cells train" in " ".join(again.stderr.split())
    assert cli("sweep", SWEEP, "--out", parts, "--k", "4", "--budget", "1").returncode == 0
    done = cli("sweep", SWEEP, "--out", parts, "--k", "2", "--k", "4", "--budget", "1", "--stages", "report")
    assert done.returncode == 0, done.stderr
    want, got = (json.loads((d / "sweep.json").read_text()) for d in (whole, parts))
    assert got["table"] == want["table"] and got["compute_ratio"] == want["compute_ratio"]
    bad = cli("sweep", SWEEP, "--out", tmp_path / "bad", "--k", "2", "--budget", "1", "--monolith-k", "0")
    assert bad.returncode == 2 and "--monolith-k" in bad.stderr and not (tmp_path / "bad").exists()


def test_image_cells_report_kid_beside_fid():
    """Image cells: a KID x 1e3 table of the same cells (mean over seeds); vector cells have none."""
    def cell(seed, budget, fid, kid):
        return {"k": 2, "budget": budget, "seed": seed, "rows": {
            "monolith": {"fid": fid + 5, "kid": kid + 0.004}, "top-1": {"fid": fid, "kid": kid}}}
    results = [cell(0, 1.0, 10.0, 0.002), cell(1, 1.0, 12.0, 0.004), cell(0, 0.5, 20.0, 0.010)]
    compute = {"monolith": {0.5: 1.0, 1.0: 2.0}, "K=2": {0.5: 1.0, 1.0: 2.0}}
    report = summarize(results, [2], [0.5, 1.0], ["top-1"], compute)
    assert report["kid_table"]["K=2 top-1"]["1"]["mean"] == pytest.approx(3.0)  # (2 + 4) / 2, x 1e3
    assert report["kid_table"]["monolith"]["0.5"]["mean"] == pytest.approx(14.0)
    assert report["table"]["K=2 top-1"]["1"]["mean"] == 11.0 and report["metric"] == "FID"
    assert "KID x 1e3" in render({**report, "monolith_k": 2, "router_flops": {}})
    vectors = [{"k": 2, "budget": 1.0, "seed": 0, "rows": {"top-1": {"w2_over_floor": 1.5}}}]
    assert summarize(vectors, [2], [1.0], ["top-1"], compute)["kid_table"] == {}


def test_image_cells_report_their_floors_apart_from_the_series():
    """The floor rows of image cells (the training images' FID, the autoencoder reconstructions' in latent
    space) are no series of the table; the report gives each once, as the range over cells."""
    def cell(seed, recon):
        return {"k": 2, "budget": 1.0, "seed": seed, "rows": {
            FLOOR: {"fid": 2.5, "kid": 0.0}, RECONSTRUCTIONS: {"fid": recon, "kid": 0.001},
            "monolith": {"fid": 20.0, "kid": 0.01}, "top-1": {"fid": 15.0, "kid": 0.008}}}
    compute = {"monolith": {1.0: 2.0}, "K=2": {1.0: 2.0}}
    report = summarize([cell(0, 11.0), cell(1, 11.5)], [2], [1.0], ["top-1"], compute)
    assert set(report["table"]) == {"monolith", "K=2 top-1"} and set(report["kid_table"]) == {"monolith", "K=2 top-1"}
    assert report["floors"] == {FLOOR: {"lo": 2.5, "hi": 2.5}, RECONSTRUCTIONS: {"lo": 11.0, "hi": 11.5}}
    text = render({**report, "monolith_k": 2, "router_flops": {}})
    assert f"{FLOOR} 2.5; {RECONSTRUCTIONS} 11 to 11.5" in text
    close = summarize([cell(0, 11.3271), cell(1, 11.3274)], [2], [1.0], ["top-1"], compute)
    assert f"{RECONSTRUCTIONS} 11.33." in render({**close, "monolith_k": 2, "router_flops": {}})  # not 11.33 to 11.33
    assert "Floors" not in render({**summarize([cell(0, 11.0)], [2], [1.0], ["top-1"], compute), "floors": {},
                                   "monolith_k": 2, "router_flops": {}})


def test_a_grid_whose_points_are_not_what_they_are_called_is_refused():
    """tiny.toml: 60 steps, batch 64, K_ref 4. A budget below one step, two budgets of the same steps, a
    repeated K, a K that leaves no row of the split batch: each refused, naming the option."""
    from ddmkit.pipeline.sweep import check_grid

    cfg = load_config(TINY)
    check_grid(cfg, [2, 4], [0.0167, 1.0], [0])  # one step at the smallest budget: fine
    for ks, budgets, scale, message in (
            ([2], [0.008], "batch", r"--budget 0.008: each expert of K=2 would train 0.008 x 60 steps, which rounds "
                                    r"to 0; give budgets of at least 0.0167"),
            ([8], [0.008], "steps", r"--budget 0.008: each expert of K=8 would train 0.008 x 30 steps"),
            ([2], [0.5, 0.505], "batch", r"--budget 0.5 and 0.505: each expert of K=2 trains 30 steps at each"),
            ([2, 2], [1.0], "batch", r"--k: \[2\] given twice"),
            ([0], [1.0], "batch", r"^--k 0: give a whole number of clusters, at least 1 \(e.g. --k 2\)$"),
            ([2], [1.0, 0.0], "batch", r"^--budget 0: give a positive number, the share of the config's training "
                                       r"compute \(e.g. --budget 1\)$"),  # was 'sweep: every --k ... (got k [2], ...)'
            ([2], [-1.0], "batch", r"^--budget -1: give a positive number"),
            ([2], [math.nan], "batch", r"^--budget nan: give a positive number"),
            ([2], [math.inf], "batch", r"^--budget inf: give a positive number"),
            ([512], [1.0], "batch", r"--k 512: the batch split .* leaves no row"),
            ([2], [1e308], "steps", r"--budget 1e\+308: each expert of K=2 would train 1e\+308 x 120 steps, more "
                                    r"than expert.train.steps takes")):  # an OverflowError's traceback
        with pytest.raises(DDMError, match=message):
            check_grid(cfg, ks, budgets, [0], scale)
    from ddmkit.pipeline.sweep import check_sweep_config  # both were taken silently: a monolith was trained anyway,

    check_sweep_config(cfg)  # and a grid of the monolith alone reported "no monolith cells"
    for update, message in (({"monolith": cfg.monolith.model_copy(update={"enabled": False})},
                             r"monolith.enabled = false: a sweep trains the FLOP-matched monolith"),
                            ({"sample": cfg.sample.model_copy(update={"strategies": ["monolith"]})},
                             r"sample.strategies = \['monolith'\]: a sweep measures the DDM with at least one")):
        with pytest.raises(DDMError, match=message):
            check_sweep_config(cfg.model_copy(update=update))


def test_cells_scored_before_a_setting_was_added_still_count_and_damaged_ones_are_named(tiny_grid, tmp_path):
    """A metrics.json written before ddmkit had a setting (here train.parallel) counts as made with its default,
    as a resumed run folder does; a file of another shape is a clear error, not a traceback."""
    out, older = tiny_grid, tmp_path / "older"
    names = ["k2_b0.5_s0", "k2_b1_s0", "k4_b0.5_s0", "k4_b1_s0"]
    copy_metrics(out, older, names)
    for name in names:
        path = older / name / "metrics.json"
        metrics = json.loads(path.read_text())
        for section in ("expert", "router", "latent"):
            metrics["config"][section]["train"].pop("parallel")
        path.write_text(json.dumps(metrics))
    done = cli("sweep", SWEEP, "--out", older, *GRID, "--stages", "report")
    assert done.returncode == 0, done.stderr
    assert (older / "sweep.md").read_text() == (out / "sweep.md").read_text()
    cut = (older / "k4_b1_s0" / "metrics.json").read_text()[:50]
    (older / "k4_b1_s0" / "metrics.json").write_text(cut)
    refused = cli("sweep", SWEEP, "--out", older, *GRID, "--stages", "report")
    assert refused.returncode == 2 and "is not valid JSON (cut short?); delete it" in " ".join(refused.stderr.split())
    for bad in ("[]", '{"config": 1, "rows": {}}', '{"config": {}, "rows": {"full": {"n": 1}}}'):
        (older / "k4_b1_s0" / "metrics.json").write_text(bad)
        refused = cli("sweep", SWEEP, "--out", older, *GRID, "--stages", "report")
        assert refused.returncode == 2 and "k4_b1_s0/metrics.json is not the metrics.json of a scored ddmkit run" \
            in " ".join(refused.stderr.split()) and "Traceback" not in refused.stderr, refused.stderr


def test_a_k_above_the_mixtures_components_and_bad_workers_are_refused_before_any_cell(tmp_path):
    """ring8 has 8 components: K = 16 was refused by its own run, after the K = 2 cells had trained (and
    --monolith-k 9 was not refused at all)."""
    for extra, words in ((("--k", "16"), "--k 16: ring8 is a mixture of 8 Gaussians"),
                         (("--monolith-k", "9"), "--monolith-k 9: ring8 is a mixture of 8 Gaussians"),
                         (("--monolith-k", "1601"), "--monolith-k 1601 is larger than data.n_train (1600)"),
                         (("--workers", "0"), "--workers must be >= 1")):
        done = cli("sweep", TINY, "--out", tmp_path / "out", "--k", "2", *extra, "--budget", "1")
        assert done.returncode == 2 and words in " ".join(done.stderr.split()), done.stderr
        assert not (tmp_path / "out").exists()
    (tmp_path / "cells" / "k4_b1_s0").parent.mkdir()
    (tmp_path / "cells" / "k4_b1_s0").write_text("x")  # a cell's folder a file: 'File exists' once reached
    done = cli("sweep", TINY, "--out", tmp_path / "cells", *GRID)
    assert done.returncode == 2 and "k4_b1_s0 is a file, but the sweep writes that cell's run folder there" \
        in " ".join(done.stderr.split()), done.stderr
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["k4_b1_s0"]
    (tmp_path / "cells" / "k4_b1_s0").unlink()  # a later cell's folder of the user's files: trained into (the
    (tmp_path / "cells" / "k4_b1_s0").mkdir()  # data and partition seeded from the first cell), then --force removed
    (tmp_path / "cells" / "k4_b1_s0" / "thesis.tex").write_text("mine")  # them
    done = cli("sweep", TINY, "--out", tmp_path / "cells", *GRID, "--force")
    assert done.returncode == 2 and "k4_b1_s0 is not a ddmkit run folder and is not empty (it holds thesis.tex)" \
        in " ".join(done.stderr.split()), done.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "cells").rglob("*")) == \
        ["cells/k4_b1_s0", "cells/k4_b1_s0/thesis.tex"]
    (tmp_path / "file").write_text("x")  # --out naming a file
    done = cli("sweep", TINY, "--out", tmp_path / "file", "--k", "2", "--budget", "1")
    assert done.returncode == 2 and "file is a file, not a folder" in done.stderr, done.stderr


def test_an_out_in_a_run_folder_and_a_negative_seed_are_refused_naming_the_option(tiny_grid, tmp_path):
    """--out a run folder (a cell of another grid) or a folder inside one: the first cell was refused by the
    run's own check, with a fix that named the run itself (the folder given); a negative --seed was refused
    by a cell's config, naming expert.train.seed but not --seed. Now each exits 2 before any cell, naming the
    option, and writes nothing."""
    run = tmp_path / "run"
    shutil.copytree(tiny_grid / "k2_b1_s0", run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out, words in ((run, f"--out {run} is a ddmkit run folder"),
                       (run / "sub", f"--out {run / 'sub'} is inside the run folder {run}")):
        done = cli("sweep", SWEEP, "--out", out, "--k", "2", "--budget", "1")
        said = " ".join(done.stderr.split())
        assert done.returncode == 2 and words in said and "give a folder of its own outside any run" in said, said
        assert "sweep cell" not in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    done = cli("sweep", SWEEP, "--out", tmp_path / "out", "--k", "2", "--budget", "1", "--seed", "-3")
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "--seed -3: a seed is a whole number from 0 to 2**63 - 1" in said, said
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("theirs, words", [
    ({"study.json": '{"condition_names": ["disjoint"]}', "report.md": "# misalignment"},
     "holds a misalignment study's results (study.json, runs/)"),
    ({"runs/disjoint_s0/config.json": "{}", "runs/disjoint_s0/partition/manifest.json": "{}"},  # one still training
     "holds a misalignment study's results (study.json, runs/)"),
    ({"report.md": "# theory convergence", "results.json": '{"grid": []}'},
     "holds a theory convergence study's results (report.md, results.json)"),
    ({"report.md": "# my notes"}, "holds a report.md that no sweep wrote (another study's or your own)")])
def test_an_out_holding_another_studys_results_is_refused_before_any_cell(tmp_path, theirs, words):
    """--out a misalignment study's folder (finished or still training its runs) or a theory study's: the sweep
    put its cells and sweep.md beside that study's results."""
    out = tmp_path / "theirs"
    for name, text in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    done = cli("sweep", SWEEP, "--out", out, "--k", "2", "--budget", "1")
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and f"--out {out} {words}; give the sweep a folder of its own, e.g. --out " \
        f"{tmp_path / 'sweep'}" in said, said
    assert "sweep cell" not in said and sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_an_out_holding_another_sweeps_cells_is_refused_and_its_own_resumes(tiny_grid, tmp_path):
    """A sweep of another training into the folder of a finished one, with other K (no cell of the same name to
    refuse), mixed its cells with the other sweep's and replaced that sweep's report. The same sweep's other parts
    (other K, budgets, seeds) are its own: reported over, as before."""
    out = tmp_path / "sweep"
    names = ["k2_b0.5_s0", "k2_b1_s0", "k4_b0.5_s0", "k4_b1_s0"]
    copy_metrics(tiny_grid, out, names)
    for name in names:
        shutil.copy(tiny_grid / name / "config.json", out / name / "config.json")
    shutil.copy(tiny_grid / "sweep.json", out / "sweep.json")
    report = (out / "sweep.json").read_bytes()
    for force in ((), ("--force",)):  # --force replaces this grid's cells only
        other = cli("sweep", SWEEP, "--out", out, "--k", "8", "--budget", "1", "--monolith-k", "4",
                    "--set", "expert.train.lr=0.001", *force)
        said = " ".join(other.stderr.split())
        assert other.returncode == 2 and f"--out {out} holds the cells of another sweep: k2_b0.5_s0 was made with " \
            "other settings than this config makes it with (expert.train.lr (0.002, asked 0.001))" in said, said
        assert "give this one another --out" in said and "sweep cell" not in said, said
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "sweep.json"])
    assert (out / "sweep.json").read_bytes() == report
    own = cli("sweep", SWEEP, "--out", out, "--k", "2", "--budget", "0.5", "--budget", "1", "--monolith-k", "4",
              "--stages", "report", "--set", "expert.train.threads=2")  # how jobs run may differ
    assert own.returncode == 0, own.stderr
    assert json.loads((out / "sweep.json").read_text())["ks"] == [2]  # its part of the grid, reported


def test_the_kept_fashion_mnist_cells_are_scored_cells_of_the_grid_sweep_md_reports(tmp_path):
    """sweep.md reports docs/results/sweep_fashion_mnist/ with --stages report; those cells were scored with the
    missing-expert and statistics-only router studies, which cells now leave out, and every cell was refused as
    made with another config (evaluate.missing_experts (True, asked False)). A change that counts still does."""
    sets = ['sample.strategies=["full","top-1","top-2"]', "sample.guidance_sweep=[]",
            "sample.stats_router_strategies=[]"]
    cfg = RunConfig(**apply_overrides(load_config(ROOT / "configs" / "fashion_mnist.toml").model_dump(), sets))
    cell = RunFolder(tmp_path / "k8_b1_s0")
    cell.root.mkdir()
    kept = json.loads((ROOT / "docs" / "results" / "sweep_fashion_mnist" / "k8_b1_s0.json").read_text())
    assert kept["config"]["evaluate"]["missing_experts"] is True  # as scored by the earlier sweep
    cell.metrics.write_text(json.dumps(kept))
    assert scored_rows(cell, cell_config(cfg, 8, 1.0, 0)) == kept["rows"]
    assert scored_rows(cell, cell_config(cfg, 8, 1.0, 1)) is None  # another seed: not this cell's scores
