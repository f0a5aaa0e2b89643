"""`analyze_run` and `ddmkit analyze` on a tiny trained run (no sampling stage needed)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddmkit.pipeline.analyze import analyze_run
from ddmkit.config import load_config
from ddmkit.errors import DDMError
from ddmkit.pipeline.prepare import prepare_run_dir
from ddmkit.pipeline.stages import stage_data, stage_experts, stage_partition, stage_router

TINY = Path(__file__).parent / "configs" / "tiny.toml"
SRC = str(Path(__file__).parents[1] / "src")
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
    saved = json.loads((out / "analysis.json").read_text())
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


def test_bad_input_names_the_option(trained, tmp_path):
    with pytest.raises(DDMError, match="--strategy"):
        analyze_run(trained, strategies=["top-two"], out=tmp_path)
    with pytest.raises(DDMError, match="RUN_DIR"):
        analyze_run(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(DDMError, match="afile is a file, not a folder"):  # before the measurements, not at the end
        analyze_run(trained, out=tmp_path / "afile" / "analysis")


def test_cli_exits_2_with_a_message(trained, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "DDMKIT_QUIET": "1"}
    r = subprocess.run([sys.executable, "-c", "from ddmkit.cli import main; main()", "analyze", str(trained),
                        "--strategy", "bogus", "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "accepted forms" in r.stderr


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
