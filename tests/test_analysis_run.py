"""`analyze_run` and `ddmkit analyze` on a tiny trained run (no sampling stage needed)."""
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ddmkit.pipeline.analyze import analyze_run
from ddmkit.config import load_config
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors, save_tensors
from ddmkit.pipeline.prepare import prepare_run_dir, trained_sha256
from ddmkit.pipeline.stages import stage_data, stage_experts, stage_partition, stage_router

TINY = Path(__file__).parent / "configs" / "tiny.toml"
SMALL = dict(n=80, max_steps=3, jvp_rows=16, n_boot=50, n_heldout=200)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = load_config(TINY)
    run = prepare_run_dir(tmp_path_factory.mktemp("runs") / "tiny", cfg)
    for stage in (stage_data, stage_partition, stage_experts, stage_router):
        stage(cfg, run, lambda m: None)
    return run


def test_analyze_run_writes_every_section(trained):
    res = analyze_run(trained, strategies=["full", "top-1", "nearest", "adaptive-0.9", "gated-2@30"],
                      log=lambda m: None, **SMALL)
    out = trained / "analysis"
    md = (out / "analysis.md").read_text()
    for section in ("## Strategies", "## Verdict", "## Stability", "## Alignment", "router TV",
                    "## Alignment-based routing vs fixed top-k"):
        assert section in md
    for plot in ("lipschitz", "expert_error", "disagreement", "quality_vs_disagreement"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 0
    saved = json.loads((out / "analysis.json").read_text(),
                       parse_constant=lambda name: pytest.fail(f"analysis.json holds {name}: not strict JSON"))
    assert set(saved["strategies"]) == {"full", "top-1", "nearest", "adaptive-0.9", "gated-2@30"}
    top1 = res["strategies"]["top-1"]["summary"]
    assert top1["calls"] == 8 and top1["L_top"] > 0 and top1["delta_refine"] >= 0
    assert res["compare"]["nearest"]["vs"]["top-1"]["word"] in ("better", "worse", "no clear difference")
    assert "rho" in res["link"]["refine_vs_q"] and res["link"]["verdict"]
    # a Gaussian-mixture run: alignment of the exact posterior mean beside the strategy's own x0_hat, and
    # every expert's error on its own cluster and on the others
    assert 0 <= top1["hit_exact"] <= 1 and 1 <= top1["rank_exact"] <= 4 and 0 <= top1["same"] <= 1
    assert "hit_exact" in res["strategies"]["full"]["bands"] and "hit* (exact x0)" in md
    by = saved["heldout"]["by_cluster"]
    assert len(by) == 10 and len(by[0]["own_by_expert"]) == 4 and "own cluster (vs v*_k)" in md
    assert saved["heldout"]["cluster_rule"].startswith("the cluster owning")
    # near the data an expert predicts its own cluster better than the others
    assert by[0]["own"] < by[0]["other"]
    # full leaves no expert unrouted: its 'not routed' error reads '-' per t, as in the strategy table
    errors = md.split("Per-expert error on held-out data (routed / not routed):\n\n")[1].split("\n\n")[0]
    assert "nan" not in errors and len(re.findall(r"\| [0-9.e+-]+ / - \|", errors)) == 10, errors


def test_bad_input_names_the_option(trained, tmp_path):
    with pytest.raises(DDMError, match="--strategy"):
        analyze_run(trained, strategies=["top-two"], out=tmp_path)
    with pytest.raises(DDMError, match="RUN_DIR"):
        analyze_run(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(DDMError, match="--out .*analysis: .*afile is a file, not a folder; move it away "
                       r"\(or give --out another folder\)"):  # before the measurements, not at the end
        analyze_run(trained, out=tmp_path / "afile" / "analysis")
    with pytest.raises(DDMError, match="afile is a file, not a run folder"):  # 'move it away (or write to another'
        analyze_run(tmp_path / "afile")
    with pytest.raises(DDMError, match="--n = 1000000000000: must be at most 1,000,000,000"):  # named start_noise
        analyze_run(trained, n=10**12, out=tmp_path / "a")
    with pytest.raises(DDMError, match="is inside the model folder .*expert_00; give another folder"):  # written into
        analyze_run(trained, out=trained / "experts" / "expert_00" / "analysis")


def test_cli_exits_2_with_a_message(trained, tmp_path, cli):
    r = cli("analyze", trained, "--strategy", "bogus", "--out", tmp_path)
    assert r.returncode == 2 and "accepted forms" in r.stderr


def test_an_n_too_large_for_the_memory_is_refused_before_any_work(trained, tmp_path, cli, monkeypatch):
    """--n 99999999 was accepted, and the process was killed for memory once it had started. Now a --n whose
    arrays alone (analysis_bytes, a lower bound) need more than the memory available is refused before the
    starting noise is drawn: exit 2 naming --n, the bound, the memory and a --n whose bound is at most half of
    it; nothing written. That --n is accepted."""
    import ddmkit.pipeline.analyze as analyze

    def no_noise(*args, **kwargs):
        raise AssertionError("the starting noise of a --n that cannot fit was drawn")

    one = analyze.analysis_bytes(1, 8, 2, 4, reference=True)  # tiny.toml: 8 steps, 2 numbers a row, K = 4; truth
    monkeypatch.setattr(analyze, "available_memory", lambda device: 2**30)  # the same on any machine
    monkeypatch.setattr(analyze, "start_noise", no_noise)
    r = cli("analyze", trained, "--n", 99999999, "--out", tmp_path / "a")
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in said, said
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the run's device, auto
    assert (f"--n = 99999999: the analysis would hold at least {99999999 * one / 2**30:.1f} GiB at once on {device}"
            in said and "more than the 1.0 GiB available there" in said), said
    fit = int(re.search(r"give --n (\d+) or less", said).group(1))
    assert fit * one <= 2**29 < (fit + 1) * one
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(analyze, "available_memory", lambda device: 160 * one)
    with pytest.raises(DDMError, match="give --n 80 or less"):
        analyze_run(trained, tmp_path / "b", ["top-1"], log=lambda m: None, **{**SMALL, "n": 10**6})
    assert not (tmp_path / "b").exists()
    monkeypatch.undo()  # the noise again
    monkeypatch.setattr(analyze, "available_memory", lambda device: 160 * one)
    analyze_run(trained, tmp_path / "b", ["top-1"], log=lambda m: None, **{**SMALL, "n": 80})
    assert (tmp_path / "b" / "analysis.md").is_file()
    monkeypatch.setattr(analyze, "available_memory", lambda device: 3 * one)  # --n 2 takes more than half
    with pytest.raises(DDMError, match=r"--n 2 would already take more than half of it: free memory, or analyze on "
                                       r"a device with more \(--device\)"):
        analyze_run(trained, tmp_path / "c", ["top-1"], log=lambda m: None, **{**SMALL, "n": 4})


def test_available_memory_is_a_positive_count_of_bytes():
    import torch

    from ddmkit.pipeline.checks import available_memory

    free = available_memory(torch.device("cpu"))
    assert isinstance(free, int) and free > 0


def test_each_strategy_is_kept_and_a_later_call_measures_only_the_new_ones(trained, tmp_path, monkeypatch):
    import torch

    import ddmkit.pipeline.analyze as analyze

    out, quiet = tmp_path / "analysis", (lambda m: None)
    first = analyze_run(trained, out=out, strategies=["top-1", "threshold-0.05"], log=quiet, **SMALL)
    assert sorted(p.name for p in (out / "strategies").iterdir()) == [
        "threshold-0.05.json", "threshold-0.05.safetensors", "top-1.json", "top-1.safetensors"]
    measured, measure = [], analyze.analyze_strategy
    monkeypatch.setattr(analyze, "analyze_strategy", lambda ddm, name, *a: measured.append(name) or measure(ddm, name, *a))
    again = analyze_run(trained, out=out, strategies=["top-1", "threshold-0.05", "top-2"], log=quiet, **SMALL)
    assert measured == ["top-2"]  # the others are read back, equal to what was measured
    for name in ("top-1", "threshold-0.05"):
        was, now = first["strategies"][name], again["strategies"][name]
        assert json.dumps(now["summary"], sort_keys=True) == json.dumps(was["summary"], sort_keys=True)
        assert json.dumps(now["link"], sort_keys=True) == json.dumps(was["link"], sort_keys=True) and now["lipschitz"] == was["lipschitz"]
        assert all(torch.equal(now["per_sample"][k], was["per_sample"][k]) for k in was["per_sample"])
    assert json.dumps(again["link"]["refine_vs_q"]) != "null"
    measured.clear()
    analyze_run(trained, out=out, strategies=["top-1"], log=quiet, **{**SMALL, "n": 60})  # other settings
    assert measured == ["top-1"]


def copy_run(trained, dest: Path) -> Path:
    """A copy of the trained run (without its analysis) that a test may change."""
    shutil.copytree(trained, dest, ignore=shutil.ignore_patterns("analysis", ".lock*"))
    return dest


def test_a_retrained_expert_is_measured_again_without_a_registry(trained, tmp_path, monkeypatch):
    import ddmkit.pipeline.analyze as analyze

    run, quiet = copy_run(trained, tmp_path / "run"), (lambda m: None)
    assert not (run / "registry.json").exists()
    first = analyze_run(run, strategies=["top-1"], log=quiet, **SMALL)
    amp = first["strategies"]["top-1"]["per_sample"]["amp"].numpy()
    assert len(amp) % 2 == 0 and first["strategies"]["top-1"]["summary"]["amp_median"] == np.median(amp)
    weights = run / "experts" / "expert_00" / "model.safetensors"
    save_tensors(weights, {k: 0.5 * v for k, v in load_tensors(weights).items()})  # as if trained again
    measured, measure = [], analyze.analyze_strategy
    monkeypatch.setattr(analyze, "analyze_strategy",
                        lambda ddm, name, *a: measured.append(name) or measure(ddm, name, *a))
    again = analyze_run(run, strategies=["top-1"], log=quiet, **SMALL)
    assert measured == ["top-1"] and again["strategies"]["top-1"]["summary"] != first["strategies"]["top-1"]["summary"]
    analyze_run(run, strategies=["top-1"], log=quiet, **SMALL)
    assert measured == ["top-1"]  # unchanged weights: kept
    analyze_run(run, strategies="top-1", log=quiet, **SMALL)  # one name: it was read as the strategies t, o, p, ...
    assert measured == ["top-1"]


def test_split_rows_are_disjoint_and_shrink_to_the_test_split():
    from ddmkit.pipeline.analyze import split_rows

    assert split_rows(16000, 1000, 2000) == {"w2": slice(0, 1000), "floor": slice(1000, 2000),
                                             "heldout": slice(14000, 16000)}
    assert split_rows(1600, 5000, 2000) == {"w2": slice(0, 533), "floor": slice(533, 1066),
                                            "heldout": slice(1066, 1600)}
    assert split_rows(30, 80, 200) == {"w2": slice(0, 10), "floor": slice(10, 20), "heldout": slice(20, 30)}
    with pytest.raises(DDMError, match="the run's test split has 29 rows; analyze needs at least 30.*: FIX"):
        split_rows(29, 80, 200, "FIX")


def test_the_fix_for_a_small_test_split_gives_rows_that_are_enough():
    """A 52-image folder split 0.3 has 16 test rows: the message named test_fraction=0.3 (and data.n_test, which
    only caps such a split), the settings the run was made with. The fraction named now gives 30 rows."""
    from ddmkit.data.arrays import split_indices
    from ddmkit.pipeline.analyze import more_test_rows

    fix = more_test_rows({"name": "image_folder", "n_train": 36, "n_test": 16}, 16000, {"test_fraction": 0.3})
    fraction = float(re.search(r"test_fraction=([0-9.]+) ", fix).group(1))
    assert "data.n_test" not in fix and len(split_indices(52, fraction, 0)[0]) >= 30
    assert "--set data.n_test=30" in more_test_rows({"name": "x.npz", "n_train": 90, "n_test": 10}, 10, {})
    assert "too few" in more_test_rows({"name": "image_folder", "n_train": 20, "n_test": 12}, 16000, {})
    assert "data.params.test_path" in more_test_rows({"name": "x.npz", "n_train": 90, "n_test": 10}, 16000,
                                                     {"test_path": "t.npz"})
    assert "--set data.n_test=4000" in more_test_rows({"name": "ring", "n_train": 90, "n_test": 10}, 10, {})


def write_split(split: Path, tensors: dict) -> None:
    """A run's data split replaced, its SHA-256 recorded in data.json as a run made with it records it."""
    from ddmkit.registry import data_sha256

    save_tensors(split, tensors)
    info = json.loads((split.parent / "data.json").read_text())
    (split.parent / "data.json").write_text(json.dumps({**info, "sha256": data_sha256(split.parent)}))


def test_a_small_test_split_gives_a_w2_floor_on_disjoint_rows(trained, tmp_path):
    from ddmkit.evaluation.distances import w2_exact

    run = copy_run(trained, tmp_path / "run")
    split = run / "data" / "test.safetensors"
    rows = {k: v[:90].contiguous() for k, v in load_tensors(split).items()}
    write_split(split, rows)
    res = analyze_run(run, strategies=["top-1"], log=lambda m: None, **SMALL)  # n = 80: W2 on 30 points
    assert res["settings"]["n_w2"] == 30 and res["w2_floor"] == w2_exact(rows["x"][:30], rows["x"][30:60]) > 0
    assert "exact W2 of 30 samples against 30 held-out points" in (run / "analysis" / "analysis.md").read_text()
    write_split(split, {k: v[:29].contiguous() for k, v in rows.items()})
    with pytest.raises(DDMError, match="data.n_test"):
        analyze_run(run, out=tmp_path / "small", strategies=["top-1"], log=lambda m: None, **SMALL)
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("seed", [-1, 2**63, 10**20, 1.5])
def test_a_seed_out_of_range_is_refused_before_any_work(trained, tmp_path, seed):
    with pytest.raises(DDMError, match=r"--seed = .*: must be a whole number from 0 to 2\*\*63 - 1"):
        analyze_run(trained, out=tmp_path / "a", strategies=["top-1"], seed=seed, **SMALL)
    assert not (tmp_path / "a").exists()


def test_cli_refuses_a_negative_seed_with_exit_2(trained, tmp_path, cli):
    r = cli("analyze", trained, "--seed", "-1", "--out", tmp_path / "a")
    assert r.returncode == 2 and "--seed = -1" in r.stderr and not (tmp_path / "a").exists()


def test_a_missing_expert_is_named_and_left_out(trained, tmp_path):
    """Expert 3 removed: notes instead of warnings, the top-n note of `ddmkit sample`, expert 3 in no per-expert
    number, full leaves no present expert unrouted; and the largest seed runs."""
    run = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run / "experts" / "expert_03")
    lines = []
    pytest.importorskip("ot")  # imported before the filter: POT compiled afresh warns of its own escapes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither load_ddm's warnings nor matplotlib's reach the user
        res = analyze_run(run, strategies=["full", "top-9"], seed=2**63 - 1, log=lines.append, **SMALL)
    assert ("note: experts [3] of 4 are missing: sampling with the other 3, router weights renormalised over "
            "them") in lines
    assert ("note: top-9 on a DDM of K = 4 experts calls every expert: the same routing as full; measured once, "
            "as full") in lines
    assert set(res["strategies"]) == {"full"}  # top-9 counted twice in the across-strategy correlations
    assert not any("note: full" in line for line in lines)
    held = res["heldout"]
    assert held["experts"] == [0, 1, 2] and all(len(e) == 3 for e in held["expert"])
    assert all(len(b["own_by_expert"]) == 3 for b in held["by_cluster"])
    assert all(len(e) == 3 for e in held["expert_vs_exact"])
    assert math.isnan(res["strategies"]["full"]["summary"]["err_not_routed"])
    md = (run / "analysis" / "analysis.md").read_text()
    assert "Experts [3] of 4 are missing (no model folder)" in md and "experts [0, 1, 2] only" in md
    assert "undefined (fewer than 3 strategies)" in md and "nan [" not in md


def test_spellings_of_one_strategy_are_one_strategy():
    """' top-2' and 'top-02' were measured apart from 'top-2' (two rows, two cache files)."""
    from ddmkit.pipeline.analyze import check_strategies

    assert list(check_strategies(["top-2", " top-2", "top-02", "nucleus-0.90", "full"])) == ["top-2", "nucleus-0.9",
                                                                                          "full"]


def test_max_steps_beyond_the_runs_steps_is_reported_as_the_runs(trained, tmp_path):
    """The header said 'at up to 1000 steps' on a run of fewer steps (--jvp-rows was capped to --n, this not)."""
    res = analyze_run(trained, strategies=["top-1"], out=tmp_path / "a", log=lambda m: None,
                      **{**SMALL, "max_steps": 1000})
    steps = res["settings"]["steps"]
    assert steps < 1000 and res["settings"]["max_steps"] == steps
    assert f"at up to {steps} steps" in (tmp_path / "a" / "analysis.md").read_text()


def test_a_run_sampled_with_the_adaptive_solver_is_traced_with_fixed_steps(trained, tmp_path):
    """The analysis sampler records steps; the adaptive solver reported none (a TypeError from its last call)."""
    run = copy_run(trained, tmp_path / "run")
    recorded = json.loads((run / "config.json").read_text())
    recorded["config"]["sample"].update(solver="adaptive", strategies=["top-1"])
    (run / "config.json").write_text(json.dumps(recorded))
    lines = []
    res = analyze_run(run, strategies=["top-1"], log=lines.append, **SMALL)
    assert res["settings"]["solver"] == "rk4"
    assert any("samples with the adaptive solver" in line and "trace rk4" in line for line in lines), lines


def test_a_run_whose_experts_never_trained_their_label_free_token_is_noted(trained, tmp_path):
    """The analysis sampler runs class-conditional experts without labels; with expert.label_dropout = 0 that
    is an untrained embedding (here the run's config says so; its networks are the unconditional ones)."""
    run = copy_run(trained, tmp_path / "run")
    recorded = json.loads((run / "config.json").read_text())
    recorded["config"]["expert"]["net"]["kwargs"]["num_classes"] = 8
    recorded["config"]["expert"]["label_dropout"] = 0.0
    recorded["trained_sha256"] = trained_sha256(recorded["config"])  # as a run made with it records them
    (run / "config.json").write_text(json.dumps(recorded))
    lines = []
    analyze_run(run, strategies=["top-1"], log=lines.append, **SMALL)
    assert any("expert.label_dropout = 0 never trained their 'no label' token" in line for line in lines), lines


def test_a_long_analysis_shows_progress_and_says_how_to_make_it_quicker(trained, tmp_path, monkeypatch):
    """The strategies' passes and the held-out errors advance one bar (minutes on images at the default --n),
    and a line before them says what the time grows with and how to make it quicker."""
    import ddmkit.progress as progress

    seen = []

    class Recording(progress.Progress):
        def stop(self):
            seen.extend((task.description, task.completed, task.total) for task in self.tasks)
            super().stop()

    monkeypatch.setattr(progress, "enabled", lambda: True)
    monkeypatch.setattr(progress, "Progress", Recording)
    lines = []
    analyze_run(trained, tmp_path / "a", ["full", "top-1"], log=lines.append, **{**SMALL, "n": 300})
    assert seen == [("analyze", 11, 11)]  # 5 parts per strategy, then the held-out errors
    hint = [line for line in lines if line.startswith("analyze: 2 strategies")]
    assert len(hint) == 1 and "300 trajectories" in hint[0] and "a smaller --n (e.g. --n 200)" in hint[0], lines
    seen.clear()
    lines.clear()
    analyze_run(trained, tmp_path / "a", ["full", "top-1"], log=lines.append, **{**SMALL, "n": 300})
    assert seen == [("analyze", 1, 1)] and not any(line.startswith("analyze: ") for line in lines)  # kept: no hint


def test_out_in_a_run_folder_other_than_the_runs_own_analysis_is_refused(trained, tmp_path, cli):
    """--out a run folder (another's, or the analyzed run's own root) or a folder inside another run would mix
    analysis.md and plots/ with that run's report: exit 2 naming --out and the default, nothing written; a
    folder inside the analyzed run (its default RUN/analysis, or another) is its own."""
    other = tmp_path / "other"
    shutil.copytree(trained, other, ignore=shutil.ignore_patterns("analysis*", ".*"))
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    for out, says in ((other, "another run's folder"), (other / "sub", f"inside the other run folder {other}"),
                      (trained, "the analyzed run's folder itself")):
        r = cli("analyze", trained, "--strategy", "full", "--n", 20, "--max-steps", 1, "--jvp-rows", 4, "--out", out)
        assert r.returncode == 2, r.stderr
        assert f"--out {out} is {says}" in r.stderr and f"(default {trained / 'analysis'})" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before
    assert not (trained / "analysis.md").exists() and not (trained / "plots").exists()
    r = cli("analyze", trained, "--strategy", "full", "--n", 20, "--max-steps", 1, "--jvp-rows", 4, "--out",
            trained / "analysis-2")
    assert r.returncode == 0, r.stderr
    assert (trained / "analysis-2" / "analysis.md").is_file()


def test_a_run_without_a_router_names_train_router_and_that_fix_works(trained, tmp_path, cli):
    """A run whose router/ is missing was told to run `ddmkit run CONFIG --out RUN_DIR` (which CONFIG?);
    now the message names `ddmkit train-router RUN`, and after it the same analyze works."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("analysis*", "router", ".*"))
    args = ("analyze", run, "--strategy", "full", "--n", 20, "--max-steps", 1, "--jvp-rows", 4)
    r = cli(*args)
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "no router (router/model.safetensors)" in said, said
    fix = re.search(r"`(ddmkit train-router [^`]+)`", said)
    assert fix is not None and not (run / "analysis").exists(), said
    assert cli(*fix.group(1).split()[1:]).returncode == 0
    r = cli(*args)
    assert r.returncode == 0 and (run / "analysis" / "analysis.md").is_file(), r.stderr


def test_a_run_stopped_before_its_experts_were_trained_names_the_command_that_trains_it(trained, tmp_path, cli):
    """A run stopped (Ctrl-C) while its first expert trained has config.json, data/ and partition/ only: analyze
    told it to `ddmkit run CONFIG --out RUN_DIR` (placeholders); now the run's own command, which trains it."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("analysis*", "experts", "router", ".*"))
    args = ("analyze", run, "--strategy", "full", "--n", 20, "--max-steps", 1, "--jvp-rows", 4)
    r = cli(*args)
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and f"{run} is not trained yet" in said and "RUN_DIR" not in said, said
    fix = re.search(r"`(ddmkit run [^`]+)`", said)
    assert fix is not None and not (run / "analysis").exists(), said
    done = cli(*fix.group(1).split()[1:])
    assert done.returncode == 0, done.stderr
    r = cli(*args)
    assert r.returncode == 0 and (run / "analysis" / "analysis.md").is_file(), r.stderr
