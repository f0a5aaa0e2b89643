"""The two commands end to end in --quick mode."""
import json
import re
import shutil

import numpy as np
from typer.testing import CliRunner

from ddmkit.cli import theory_app as app


def test_convergence_quick(tmp_path):
    result = CliRunner().invoke(app, ["convergence", "--quick", "--out", str(tmp_path), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert {"report.md", "results.json", "convergence.png", "sweeps.png"} <= {p.name for p in tmp_path.iterdir()}
    results = json.loads((tmp_path / "results.json").read_text())
    samplers = results["grid"]["samplers"]
    assert -1.1 < samplers["euler:full"]["pathwise_fit"]["slope"] < -0.9  # Euler is first order
    assert samplers["heun:full"]["pathwise_fit"]["slope"] < -1.6  # Heun is second order
    fit = samplers["euler:switch"]["pathwise_fit"]
    assert fit["ci_low"] <= fit["slope"] <= fit["ci_high"] and -0.8 < fit["slope"] < -0.2
    eps_rows = {(r["value"], r["sampler"]): r["pathwise_rms"][-1] for r in results["eps_sweep"]}
    assert eps_rows[(0.3, "euler:full")] > eps_rows[(0.1, "euler:full")] > eps_rows[(0.0, "euler:full")]
    report = (tmp_path / "report.md").read_text()
    assert "pathwise slope" in report and "## W2 with common noise against the sample count" in report
    # the common-noise W2 over 3 independent noise draws: Euler with the full mixture stays first order
    full = results["common_noise"]["euler:full"]["fit"]
    assert full["n"] == 3 and full["ci_low"] < full["mean"] < full["ci_high"] and -1.1 < full["mean"] < -0.9
    sizes = [r["samples"] for r in results["sample_size"] if r["steps"] == 16]
    assert sizes == [100, 200, 400] and len(results["exact_law_floor"]) == 3


def test_distill_quick(tmp_path):
    result = CliRunner().invoke(app, ["distill", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert {"report.md", "results.json", "lipschitz.png", "segments.png"} <= {p.name for p in tmp_path.iterdir()}
    results = json.loads((tmp_path / "results.json").read_text())
    for run in results["runs"]:
        for kind in ("uniform", "lambda"):
            errors = [run["errors"][kind][str(n)]["end_to_end"] for n in (1, 2, 4)]
            assert all(0 < e < 1 for e in errors)
        assert run["Lambda_total"]["mean"] <= run["Lambda_total"]["max"] <= run["Lambda_total"]["bound"] * (1 + 1e-6)
        # the students of the Lambda grid are trained on a grid with equal steps of the measured mean Lambda
        # (the times are decreasing, Lambda_mean decreasing with them), not on the uniform grid
        times, lam = np.asarray(run["times"])[::-1], np.asarray(run["Lambda_mean"])[::-1]
        for n in ("2", "4"):
            grid = np.asarray(run["grids"]["lambda"][n])
            assert np.allclose(np.diff(np.interp(grid, times, lam)), -lam[-1] / int(n), rtol=1e-6)
            assert not np.allclose(grid, run["grids"]["uniform"][n], atol=1e-3)
            assert run["errors"]["lambda"][n]["end_to_end"] != run["errors"]["uniform"][n]["end_to_end"]
    exponents = results["scaling"]["ou"]["exponents"]["L_peak"]
    assert abs(exponents["sigma"] + 4) < 0.1 and abs(exponents["D"] - 2) < 0.1  # L(0) ~ D^2 / sigma^4


def test_a_bad_seed_or_out_is_refused_before_anything_is_written(tmp_path):
    from ddmkit.errors import DDMError

    for command in ("convergence", "distill"):
        for seed in ("-1", "99999999999999999999"):
            result = CliRunner().invoke(app, [command, "--quick", "--out", str(tmp_path / "x"), "--seed", seed])
            assert result.exit_code == 2 and "--seed" in result.output, result.output
        (tmp_path / "afile").write_text("")
        result = CliRunner().invoke(app, [command, "--quick", "--out", str(tmp_path / "afile" / "study")])
        assert isinstance(result.exception, DDMError), result.output
        assert f"--out {tmp_path / 'afile' / 'study'}: {tmp_path / 'afile'} is a file, not a folder; move it away " \
            "(or give --out another folder)" in str(result.exception)  # named no option
    assert not (tmp_path / "x").exists()


def test_an_out_holding_a_run_or_another_report_is_refused_before_the_study(tmp_path, monkeypatch):
    """theory distill --out RUN replaced the run's report.md, and the two studies replaced each other's."""
    import pytest

    from ddmkit.cli import _check_theory_out
    from ddmkit.errors import DDMError
    run = tmp_path / "run"
    (run / "partition").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "report.md").write_text("the run's report")
    for out in (run, run / "experts"):
        with pytest.raises(DDMError, match="a ddmkit run folder or a folder inside one"):
            _check_theory_out(out, "distill")
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "results.json").write_text(json.dumps({"grid": {}}))
    with pytest.raises(DDMError, match=r"holds a theory convergence study's results \(report.md, results.json\); "
                                       r"give the theory distill study a folder of its own, e.g. --out "):
        _check_theory_out(tmp_path / "conv", "distill")
    _check_theory_out(tmp_path / "conv", "convergence")  # its own: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes")
    with pytest.raises(DDMError, match="holds a report.md that no theory convergence study wrote"):
        _check_theory_out(tmp_path / "mine", "convergence")
    (tmp_path / "mine" / "report.md").unlink()
    (tmp_path / "mine" / "results.json").write_text("[1, 2]")
    with pytest.raises(DDMError, match="holds a results.json that no theory convergence study wrote"):
        _check_theory_out(tmp_path / "mine", "convergence")
    _check_theory_out(tmp_path / "new", "convergence")
    import ddmkit.theory.convergence as convergence

    def stopped(*args, **kwargs):
        (tmp_path / "new").mkdir(exist_ok=True)  # as the study makes its folder, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(convergence, "run_convergence", stopped)
    CliRunner().invoke(app, ["convergence", "--quick", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()  # an empty folder was left


def test_the_segments_plot_ticks_are_the_segment_counts(monkeypatch, tmp_path):
    """Its log-scale tick labels overlapped in the narrow panels."""
    import ddmkit.theory.distill as distill
    figures = []
    monkeypatch.setattr(distill, "save_figure", lambda fig, path: figures.append(fig) or path.name)
    errors = {k: {str(n): {"end_to_end": 1.0 / n} for n in (1, 2, 4, 8)} for k in ("uniform", "lambda")}
    distill.plot_segments([{"errors": errors, "path": "linear", "ratio": 8.0}], tmp_path)
    ax = figures[0].axes[0]
    assert list(ax.get_xticks()) == [1, 2, 4, 8] and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert len(ax.get_xticks(minor=True)) == 0


def test_the_convergence_plots_say_what_their_lines_and_points_are(monkeypatch, tmp_path):
    """The fit lines were not called fits; the disagreement points said neither radius nor N."""
    import ddmkit.theory.convergence as convergence
    figures = []
    monkeypatch.setattr(convergence, "save_figure", lambda fig, path: figures.append(fig) or path.name)
    fit = {"slope": -1.0, "intercept": 0.0}
    grid = {"samplers": {"euler:full": {"steps": [16, 32], "pathwise_rms": [0.1, 0.05], "pathwise_fit": fit,
                                        "w2": [0.5, 0.4]}}, "w2_floor": 0.3}
    convergence.plot_grid({"grid": grid, "settings": {"steps": [16, 32], "fit_min_steps": 16}}, tmp_path)
    sweep = [{"sampler": "euler:full", "value": 0.0, "steps": [16, 32], "pathwise_rms": [0.1, 0.05]}]
    rows = [{"radius": r, "steps": n, "predicted": r / n, "pathwise_rms": r / n} for r in (1.0, 2.0) for n in (16, 64)]
    convergence.plot_sweeps({"eps_sweep": sweep, "temperature_sweep": sweep, "disagreement": rows}, tmp_path)
    legend = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]
    assert "lines: log-log fits on N >= 16" in legend(figures[0].axes[0])
    assert legend(figures[1].axes[2])[:2] == ["radius 1 (N = 16, 64)", "radius 2 (N = 16, 64)"]


def test_an_out_holding_a_sweeps_or_a_misalignment_studys_results_is_refused(tmp_path):
    """A theory study wrote its report.md, results.json and plots beside a sweep's cells (a sweep writes no
    report.md), and into a misalignment study's folder refused only for its report.md, said as someone else's."""
    import pytest

    from ddmkit.cli import _check_theory_out
    from ddmkit.errors import DDMError
    for theirs, words in (({"sweep.json": '{"cells": []}', "sweep.md": "# ddmkit sweep"}, "a sweep's results"),
                          ({"k2_b1_s0/metrics.json": "{}"}, "a sweep's results"),
                          ({"study.json": '{"condition_names": ["exact"]}', "report.md": "# misalignment"},
                           "a misalignment study's results (study.json, runs/)")):
        out = tmp_path / "theirs"
        for name, text in theirs.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
        for study in ("convergence", "distill"):
            example = re.escape(str(tmp_path / f"theory-{study}"))
            with pytest.raises(DDMError, match=rf"^--out {re.escape(str(out))} holds {re.escape(words)}.*; give the "
                                               rf"theory {study} study a folder of its own, e.g. --out {example}$"):
                _check_theory_out(out, study)
        shutil.rmtree(out)


def test_a_student_seed_count_out_of_range_is_refused_naming_seeds(tmp_path, ddmkit):
    """--seeds 99999999999999999999 was refused as 'DistillSettings.seed: 0', the one setting the user had not
    given; a count that would train for years was taken."""
    for seeds in ("99999999999999999999", "1001"):
        code, _, said = ddmkit("theory", "distill", "--quick", "--out", tmp_path / "d", "--seeds", seeds)
        assert code == 2 and f"--seeds {seeds}: give a whole number, from 1 to 1000" in said, said
    assert not (tmp_path / "d").exists()
