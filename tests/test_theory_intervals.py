"""Intervals over seeds and draws in the theory studies: t-intervals against scipy, per-seed distillation gains,
the --seeds option, common-noise W2 slopes over noise draws, the sample-count study and the exact-law floor."""
import math
import re
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from ddmkit.cli import theory_app
from ddmkit.errors import DDMError
from ddmkit.theory import convergence as C
from ddmkit.theory import distill as D
from ddmkit.theory import report as R
from ddmkit.theory.paths import get_path

F64 = torch.float64


def quiet(*_):
    pass


def fake_w2(x, y):
    """A stand-in for the exact OT: the RMS of x - y row by row (no re-pairing)."""
    return float(((x - y) ** 2).sum(1).mean().sqrt())


# ----- t-intervals --------------------------------------------------------------------------------------------
def test_t_interval_matches_scipy_and_a_hand_computed_case():
    values = [0.12, 0.31, 0.05, 0.22, 0.18]
    got = R.t_interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got == pytest.approx({"mean": np.mean(values), "ci_low": lo, "ci_high": hi, "n": 5}, rel=1e-12)
    # two values 1 and 3: mean 2, sd sqrt(2), sd / sqrt(2) = 1, t(0.975, 1) = 12.7062
    assert R.t_interval([1.0, 3.0]) == pytest.approx({"mean": 2.0, "ci_low": 2 - 12.7062047, "ci_high": 2 + 12.7062047,
                                                      "n": 2}, rel=1e-7)
    assert R.t_interval([1.0, 3.0], level=0.9)["ci_high"] == pytest.approx(2 + 6.3137515, rel=1e-7)
    assert R.t_interval([0.4]) == {"mean": 0.4, "ci_low": None, "ci_high": None, "n": 1}
    with pytest.raises(DDMError, match="non-empty"):
        R.t_interval([])


def test_excludes_zero():
    assert R.excludes_zero({"ci_low": 0.01, "ci_high": 0.2})
    assert R.excludes_zero({"ci_low": -0.3, "ci_high": -0.01})
    assert not R.excludes_zero({"ci_low": -0.01, "ci_high": 0.2})
    assert not R.excludes_zero({"ci_low": None, "ci_high": None})


# ----- distillation gains over seeds ------------------------------------------------------------------------
def three_seed_errors():
    """Seed r trains one student per grid: uniform errors 1, 2, 4 and Lambda errors 0.5, 1.5, 1 (gains 0.5, 0.25,
    0.75); the gain of the seed-averaged errors, 1 - 3/7, is not the mean of the per-seed gains."""
    uniform = {"end_to_end": 7 / 3, "end_to_end_runs": [1.0, 2.0, 4.0]}
    return {"uniform": {1: uniform, 2: uniform},
            "lambda": {1: uniform, 2: {"end_to_end": 1.0, "end_to_end_runs": [0.5, 1.5, 1.0]}}}


def test_seed_gains_pair_the_students_of_each_seed():
    errors = three_seed_errors()
    assert D.seed_gains(errors, 2) == pytest.approx([0.5, 0.25, 0.75])
    assert D.seed_gains(errors, 1) == [0.0, 0.0, 0.0]  # one segment: the same students on both grids
    got = D.gain_over_seeds(errors, 2)
    assert got.pop("runs") == pytest.approx([0.5, 0.25, 0.75])
    assert got == pytest.approx(R.t_interval([0.5, 0.25, 0.75]))
    assert got["mean"] == pytest.approx(0.5) and D.lambda_gain(errors, 2) == pytest.approx(1 - 3 / 7)
    half = stats.t.ppf(0.975, 2) * 0.25 / math.sqrt(3)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    one = {"uniform": {2: {"end_to_end": 2.0}}, "lambda": {2: {"end_to_end": 1.5}}}  # no per-seed runs: one seed
    assert D.gain_over_seeds(one, 2) == {"mean": 0.25, "ci_low": None, "ci_high": None, "n": 1, "runs": [0.25]}


def test_gain_text():
    assert D.gain_text({"mean": 0.4833, "ci_low": 0.3821, "ci_high": 0.5849}) == "48.3% [38.2%, 58.5%]"
    assert D.gain_text({"mean": -0.1, "ci_low": None, "ci_high": None}) == "-10.0%"


def test_distill_setting_reports_the_per_seed_gains(monkeypatch):
    errors = {2: [4.0, 2.0, 1.0], 4: [1.0, 1.0, 1.0]}  # Lambda-grid error per seed; uniform is 4 at every seed

    def fake_errors(grid, times, train_states, test_states, s_, seed):
        uniform = torch.allclose(grid, torch.linspace(1.0, 0.0, len(grid), dtype=F64))
        n = len(grid) - 1
        return {"end_to_end": 4.0 if uniform or n == 1 else errors[n][seed - 2], "local": [0.0] * n}

    monkeypatch.setattr(D, "student_errors", fake_errors)
    s = D.DistillSettings(widths=(0.5,), segments=(1, 2, 4), lipschitz_trajectories=4, lipschitz_times=9, n_train=16,
                          n_test=8, seeds=3, seed=2)
    out = D.distill_setting(get_path("linear"), 0.5, s)
    two = dict(out["gain_over_seeds"][2])
    assert two.pop("runs") == pytest.approx([0.0, 0.5, 0.75])
    assert two == pytest.approx(R.t_interval([0.0, 0.5, 0.75]))
    assert out["gain_over_seeds"][4]["runs"] == pytest.approx([0.75] * 3)
    assert out["gain_over_seeds"][1]["runs"] == [0.0] * 3


def distill_results(seeds=3):
    def run(path, ratio, lam_runs):
        uniform = {"end_to_end": 1.0, "end_to_end_runs": [1.0] * seeds}
        lam = {"end_to_end": float(np.mean(lam_runs)), "end_to_end_runs": lam_runs}
        return {"path": path, "ratio": ratio, "L_bound_peak": 4.0, "L_bound_peak_time": 0.25, "L_mean_peak": 2.0,
                "L_max_peak": 3.0, "Lambda_total": {"bound": 3.0, "mean": 1.5, "max": 2.25},
                "errors": {"uniform": {1: uniform, 2: uniform}, "lambda": {1: uniform, 2: lam}},
                "lambda_gain": {1: 0.0, 2: 1 - lam["end_to_end"]}}

    runs = [run("linear", 4.0, [0.9, 1.1, 1.3][:seeds]), run("linear", 8.0, [0.5, 0.6, 0.4][:seeds]),
            run("ou", 4.0, [1.2, 1.3, 1.25][:seeds])]
    s = asdict(D.DistillSettings(segments=(1, 2), seeds=seeds))
    exponents = {"L_peak": {"D": 2.0, "sigma": -3.0}, "Lambda_total": {"D": 2.0, "sigma": -2.0}}
    scaling = {"linear": {"exponents": exponents}}
    return {"settings": s, "runs": runs, "scaling": scaling, "plots": ["lipschitz.png", "segments.png"]}


def test_distill_findings_say_which_gains_are_distinguishable_from_zero():
    notes = D.findings(distill_results())
    wide = D.gain_text(R.t_interval([0.1, -0.1, -0.3]))
    narrow = D.gain_text(R.t_interval([0.5, 0.4, 0.6]))
    assert notes[1] == (f"linear: Lambda-grid gain at S=2, mean [95% t-interval] over 3 seeds: {wide} at D/sigma=4, "
                        f"{narrow} at D/sigma=8.")
    assert notes[2] == "linear: interval above 0 at D/sigma=8 S=2; interval containing 0 at D/sigma=4 S=2."
    assert notes[5] == "ou: interval below 0 at D/sigma=4 S=2."
    assert notes[6] == (f"largest measured gain: {narrow} (linear, D/sigma=8, S=2); the paper reports up to 51.9% "
                        "at S=8.")
    text = D.render_report({**distill_results(), "scaling": {}})
    assert "## Students: end-to-end relative MSE, mean over 3 seed(s)" in text
    assert f"| linear | 8 | {narrow} |" in text and "Mean over n = 3 seeds [95% t-interval: mean +- t(0.975, 2)" in text
    one = D.findings(distill_results(seeds=1))
    assert one[1] == "linear: Lambda-grid gain at S=2: 10.0% at D/sigma=4, 50.0% at D/sigma=8."
    assert not any("interval" in n for n in one)


def the_study_started(*_args, **_kw):
    raise AssertionError("the study started")


SIZES_DIFFER = ("at least 2 factors f whose sample counts round(samples * f) all differ (the slope in n is fitted "
                "over them)")
FLOOR_STEPS = ("a non-empty tuple of values among steps (4, 8, 16, 32, 64, 128), or None (every other N of the "
               "fitted range)")
ROUTED_ALONE = ("SOLVER:STRATEGY with a STRATEGY that routes by the router's probabilities alone: full, top-K, "
                "threshold-P, sample-K[@T], nucleus-P[@T], switch, adaptive-P or adaptive-ent-H, e.g. 'euler:switch' ")


@pytest.mark.parametrize("field, value, what", [
    ("steps", (), "a non-empty tuple"), ("radii", (), "a non-empty tuple"), ("bootstrap", 0, "an integer >= 2"),
    ("seed", -1, "an integer >= 0"), ("steps", (4, 8.5), "integers >= 1"), ("eps_values", (-0.1,),
    "non-negative finite numbers"), ("temperatures", (0.0,), "positive finite numbers"), ("width", 0.0,
    "a positive finite number"), ("components", 0, "an integer >= 1"), ("samples", 1, "an integer >= 2"),
    ("radii", (2.0, 0.0), "positive finite numbers"), ("radius", 0.0, "a positive finite number"),
    ("bootstrap", 1, "an integer >= 2"), ("steps", (16,), "at least 2 different values, none repeated"),
    ("steps", (4, 64, 64, 64), "at least 2 different values, none repeated"),
    ("disagreement_steps", (16,), "at least 2 different values, none repeated"),
    ("eps_values", (0.0, 0.1, 0.1), "different values, none repeated"), ("sweep_samplers", (), "a non-empty tuple"),
    ("size_factors", (1.0,), SIZES_DIFFER), ("size_factors", (1.0, 1.001), SIZES_DIFFER),
    ("size_factors", (0.5, 1.0, 1.0), SIZES_DIFFER), ("size_factors", (), SIZES_DIFFER),
    ("size_factors", (0.001, 1.0), "factors f with round(samples * f) >= 1 (samples = 200)"),
    ("size_factors", (0.5, 0.75), "factors f whose sample counts round(samples * f) divide the largest (they give "
                                  "[100, 150])"),
    ("size_factors", (1.0, 4.0), "factors f <= common_noise_draws = 3 (the largest sample count is a subset of the "
                                 "600 pooled outputs of the noise draws)"),
    ("common_noise_draws", 0, "an integer >= 1 (the sample-count study of floor_samplers pools the draws' outputs), "
                              "or floor_samplers=() for none"),
    ("floor_steps", (16, 1000), FLOOR_STEPS), ("floor_steps", (), FLOOR_STEPS), ("floor_steps", (0,), FLOOR_STEPS),
    ("floor_angles", (0.2,), "at least 2 different angles (the floor is interpolated between them), or () for none"),
    ("floor_angles", (0.0, 0.3), "positive finite numbers"), ("floor_angles", (-0.1, 0.3), "positive finite numbers"),
    ("temperatures", (1.0, 2.0, 1.0), "different values, none repeated"),
    ("clusters", 9, "an integer between 1 and components (8)"),
    ("samplers", ("euler:full", "rk4:full"), "SOLVER:STRATEGY with SOLVER one of euler, heun, e.g. 'euler:switch' "
                                             "(not 'rk4:full')"),
    ("sweep_samplers", ("euler:bogus",), ROUTED_ALONE + "('euler:bogus': unknown routing strategy 'bogus'; "
                                         "accepted forms: full, top-K, threshold-P, sample-K[@T], nucleus-P[@T], "
                                         "switch, oracle, nearest, adaptive-P, adaptive-ent-H, gated-K@A)"),
    ("floor_samplers", ("euler:oracle",), ROUTED_ALONE + "('euler:oracle': oracle and nearest need a run's partition, "
                                          "gated-K@A the analysis sampler)"),
    ("floor_samplers", None, "a tuple"),
    *[(field, value, "different values, none repeated") for field, value in [
        ("radii", (1.0, 2.0, 1.0)), ("sweep_steps", (16, 16)), ("samplers", ("euler:full", "heun:full", "euler:full")),
        ("sweep_samplers", ("euler:switch", "euler:switch")), ("floor_samplers", ("euler:switch", "euler:switch")),
        ("floor_angles", (0.05, 0.2, 0.2))]],
    ("samplers", ("euler:top-2", "euler:full", "euler:top-02"),
     "different samplers, none repeated ('euler:top-02' is 'euler:top-2')"),
    ("sweep_samplers", ("euler:sample-2", "euler:sample-2@1"),
     "different samplers, none repeated ('euler:sample-2@1' is 'euler:sample-2')"),
    ("floor_samplers", ("heun:switch", "heun: switch"), "different samplers, none repeated ('heun: switch' is "
                                                        "'heun:switch')")])
def test_run_convergence_names_a_bad_setting_before_it_starts(field, value, what, tmp_path, monkeypatch):
    """steps=(), radii=(), bootstrap=0 and seed=-1 were answered by tracebacks (min() of an empty sequence,
    an IndexError, numpy's 'expected non-negative integer'), radii=() after 20 s of work; eps_values, temperatures,
    width and components failed only once the study had made its folder; a ring of radius 0 (its components at
    one point, Q = 0) by a ZeroDivisionError in the report after the whole study; sweep_samplers=() by an IndexError
    in the report after the whole study. Settings with too little to fit ran to the end with a RankWarning at most:
    one N (or one repeated), one disagreement N, a repeated eps (slopes fitted to one point), one bootstrap resample
    (an interval of width 0), one sample count (the slope in n), one floor angle (the same floor at every
    pathwise RMS). A floor angle 0 gave a floor of nan below the smallest other angle's pathwise RMS (log 0 in
    floor_at); a repeated temperature repeated its sweep rows and shared one router_error entry. Repeated radii,
    sweep steps, sweep samplers or floor angles repeated report rows or columns; a repeated sampler or floor
    sampler was run once (its entries keyed by name), and one written two ways ('euler:top-2', 'euler:top-02')
    was run twice, as two rows of one sampler. Clusters, samplers, floor_steps, common_noise_draws
    without draws for the floor samplers, and size_factors were refused in other words ('clusters must be
    between ...', 'sampler must be SOLVER:STRATEGY ...', 'floor_steps must be among steps ...', 'size_factors
    must give sample counts ...'); floor_samplers=None by a TypeError."""
    monkeypatch.setattr(C, "convergence_grid", the_study_started)
    with pytest.raises(DDMError, match=rf"^ConvergenceSettings\.{field}: .*; give {re.escape(what)}$"):
        C.run_convergence(replace(C.ConvergenceSettings.quick(), **{field: value}), tmp_path / "x", log=quiet)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("field, value, what", [
    ("n_train", 0, "an integer >= 1"), ("train_steps", 0, "an integer >= 1"),
    ("widths", (0.0,), "positive finite numbers"), ("separation", math.inf, "a positive finite number"),
    ("paths", (), "a non-empty tuple"), ("ou_end_time", 0.0, "a positive finite number"),
    ("seed", -1, "an integer >= 0"), ("lipschitz_times", 1, "an integer >= 3"),
    ("lipschitz_times", 2, "an integer >= 3"), ("widths", (0.25, 0.25), "different values, none repeated"),
    ("scaling_widths", (0.4,), "at least 2 different values, none repeated"),
    ("scaling_separations", (2.0, 2.0), "at least 2 different values, none repeated"),
    ("segments", (1,), "at least one S >= 2, e.g. (1, 2, 4) (with S = 1 both grids are [T, 0], so there is no "
                       "gain to measure)"),
    ("segments", (), "a non-empty tuple"), ("segments", (0, 2), "integers >= 1"), ("segments", (-1,), "integers >= 1"),
    ("segments", (1, 2, 2), "different values, none repeated"), ("seeds", 0, "an integer >= 1"),
    ("seeds", -2, "an integer >= 1"), ("seeds", 1.5, "an integer >= 1"),
    ("paths", ("vp",), "path names among 'linear', 'ou'"), ("paths", ("linear", "ou", "linear"),
                                                             "different values, none repeated"),
    ("lr", 100.0, "a value TrainConfig.lr accepts (input should be less than or equal to 10)"),
    ("batch_size", 10**9, "a value TrainConfig.batch_size accepts (input should be less than or equal to 100000000)"),
    ("train_steps", 10**10, "a value TrainConfig.steps accepts (input should be less than or equal to 1000000000)"),
    ("seed", 2**63, "a value TrainConfig.seed accepts for every student seed, seed .. seed + seeds - 1 (input should "
                    "be less than or equal to 9223372036854775807)")])
def test_run_distill_names_a_bad_setting_before_it_starts(field, value, what, tmp_path, monkeypatch):
    """n_train=0 and train_steps=0 were answered by tracebacks (dopri5's 'underflow in dt', a pydantic
    ValidationError of TrainConfig); widths, separation and the paths failed only once the study had made its folder.
    Settings that leave nothing to compare ran to the end with a RankWarning at most: one or two report times
    (the Lambda grid [T, T, ..., T], or the uniform grid itself), a repeated width (the slope in D/sigma fitted
    to one ratio), one scaling width or separation (an exponent fitted to one point), segments=(1,) (no gain), a
    repeated S (the report's columns repeated), a repeated path (its rows repeated). Bad segments and seeds were
    refused in other words before these checks ('segments must be positive integers; got ...'), an unknown path
    still later ('path must be one of ...'). lr, batch_size, train_steps and seed beyond the students' TrainConfig
    limits were a pydantic ValidationError once the first stability profile and teacher solves were done."""
    monkeypatch.setattr(D, "distill_setting", the_study_started)
    with pytest.raises(DDMError, match=rf"^DistillSettings\.{field}: .*; give {re.escape(what)}$"):
        D.run_distill(replace(D.DistillSettings.quick(), **{field: value}), tmp_path / "x", log=quiet)
    assert not (tmp_path / "x").exists()


def test_run_distill_checks_the_last_student_seed_before_it_starts(tmp_path, monkeypatch):
    """Seed r trains with seed + r: a seed valid alone, with seeds = 2, gives a last student seed TrainConfig
    refuses."""
    monkeypatch.setattr(D, "distill_setting", the_study_started)
    with pytest.raises(DDMError, match=r"^DistillSettings\.seed: 9223372036854775807; give a value TrainConfig\.seed "
                                       r"accepts for every student seed"):
        D.run_distill(replace(D.DistillSettings.quick(), seed=2**63 - 1, seeds=2), tmp_path / "x", log=quiet)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("settings", [D.DistillSettings(), D.DistillSettings.quick(), C.ConvergenceSettings(),
                                      C.ConvergenceSettings.quick()],
                         ids=["distill", "distill-quick", "convergence", "convergence-quick"])
def test_the_default_and_quick_settings_pass_the_checks(settings, tmp_path, monkeypatch):
    """--quick runs one width on purpose (the slope in D/sigma is left out), so one width must stay valid."""
    monkeypatch.setattr(D, "distill_setting", the_study_started)
    monkeypatch.setattr(C, "convergence_grid", the_study_started)
    run = D.run_distill if isinstance(settings, D.DistillSettings) else C.run_convergence
    with pytest.raises(AssertionError, match="^the study started$"):
        run(settings, tmp_path / "x", log=quiet)


def test_distill_cli_passes_seeds_and_rejects_bad_values(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(D, "run_distill", lambda settings, out, log: seen.append((settings, out)))
    runner = CliRunner()
    result = runner.invoke(theory_app, ["distill", "--quick", "--seeds", "3", "--seed", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen == [(replace(D.DistillSettings.quick(5), seeds=3), tmp_path)]
    result = runner.invoke(theory_app, ["distill", "--out", str(tmp_path)])
    assert result.exit_code == 0 and seen[-1][0] == D.DistillSettings()  # one seed by default
    for bad in ("0", "-1", "two"):
        result = runner.invoke(theory_app, ["distill", "--quick", "--seeds", bad, "--out", str(tmp_path)])
        assert result.exit_code == 2 and "--seeds" in result.output, result.output
    assert len(seen) == 2
    assert "--seeds" in runner.invoke(theory_app, ["distill", "--help"]).output


# ----- common-noise W2 over draws ----------------------------------------------------------------------------
def test_draw_slopes_recover_known_rates_on_the_fitted_range():
    steps = (4, 8, 16, 32, 64, 128)
    rates = [0.4, 0.5, 0.6]
    # below N = 16 the values are off the power law (a floor), which the fit must leave out
    draws = [[1.0, 1.0] + [2.0 * n ** -a for n in steps[2:]] for a in rates]
    got = C.draw_slopes(steps, draws, 16)
    assert got.pop("slopes") == pytest.approx([-0.4, -0.5, -0.6], abs=1e-12)
    assert got == pytest.approx(R.t_interval([-0.4, -0.5, -0.6]), abs=1e-12)
    assert got["ci_low"] < -0.5 < got["ci_high"]
    assert C.draw_slopes(steps, [[0.0] * 6], 16)["slopes"] == [pytest.approx(0.0)]  # zeros clamp to 1e-12


def tiny(**kw):
    base = dict(components=4, radius=1.5, width=0.3, clusters=2, steps=(2, 4, 8), fit_min_steps=2,
                samplers=("euler:full", "euler:switch"), samples=6, common_noise_draws=2,
                floor_samplers=("euler:switch",), size_factors=(0.5, 1.0, 2.0), floor_angles=(0.1, 0.3, 1.0), seed=3)
    base.update(kw)
    return C.ConvergenceSettings(**base)


def test_floor_steps_and_sample_sizes():
    full = C.ConvergenceSettings()
    assert C.floor_steps(full) == [16, 64, 256, 1024]
    assert C.sample_sizes(full) == [1000, 2000, 4000, 8000]
    assert C.floor_steps(tiny()) == [2, 8] and C.floor_steps(tiny(floor_steps=(4,))) == [4]
    assert C.sample_sizes(tiny()) == [3, 6, 12]
    for bad in (dict(size_factors=(0.5, 0.75)), dict(size_factors=(1.0, 3.0)), dict(size_factors=()),
                dict(size_factors=(0.01, 1.0))):
        with pytest.raises(DDMError, match=r"^ConvergenceSettings\.size_factors: .*; give "):
            C.sample_sizes(tiny(**bad))
    with pytest.raises(DDMError, match=r"^ConvergenceSettings\.floor_steps: \(16,\); give a non-empty tuple of values "
                                       r"among steps \(2, 4, 8\), or None"):
        C.run_convergence(tiny(floor_steps=(16,)), None, log=quiet)


def test_subset_w2_pairs_rows_in_disjoint_blocks(monkeypatch):
    monkeypatch.setattr(C, "w2_exact", fake_w2)
    exact = torch.zeros(7, 2, dtype=F64)
    x = torch.tensor([[1.0, 0], [1, 0], [2, 0], [2, 0], [3, 0], [3, 0], [9, 0]], dtype=F64)
    assert C.subset_w2(x, exact, 2) == [1.0, 2.0, 3.0]  # the seventh row is left out
    assert C.subset_w2(x[:6], exact[:6], 3) == pytest.approx([math.sqrt(2), math.sqrt(22 / 3)])
    assert C.subset_w2(x, exact, 7) == [fake_w2(x, exact)]


def test_common_noise_draws_keep_each_draw_paired_and_pool_the_floor_samplers(monkeypatch):
    monkeypatch.setattr(C, "w2_exact", fake_w2)  # the row-wise RMS: equal to the pathwise RMS of the same pairs
    s = tiny()
    out, pooled = C.common_noise_draws(s, log=quiet)
    assert list(out) == ["euler:full", "euler:switch"]
    for r in out.values():
        assert len(r["w2"]) == 2 and np.allclose(r["w2"], r["pathwise_rms"], rtol=1e-12)
        assert r["w2_mean"] == pytest.approx(np.mean(r["w2"], 0).tolist())
        assert r["fit"] == C.draw_slopes(s.steps, r["w2"], s.fit_min_steps)
    switch, full = out["euler:switch"]["w2"], out["euler:full"]["w2"]
    assert full[0] != pytest.approx(full[1]) and switch[0] != pytest.approx(switch[1])  # fresh noise in each draw
    assert set(pooled) == {("euler:switch", 2), ("euler:switch", 8)}
    for (name, n), (x, exact) in pooled.items():
        i = s.steps.index(n)
        assert x.shape == exact.shape == (12, 2)
        blocks = [C.pathwise_rms(x[k:k + 6], exact[k:k + 6]) for k in (0, 6)]
        assert blocks == pytest.approx([switch[0][i], switch[1][i]], rel=1e-12)
    assert C.common_noise_draws(tiny(common_noise_draws=0), log=quiet) == ({}, {})


def test_sample_size_study_on_a_known_pool(monkeypatch):
    monkeypatch.setattr(C, "w2_exact", fake_w2)
    s = tiny(samples=4, size_factors=(0.5, 1.0, 2.0))  # n = 2, 4, 8 from a pool of 10 rows (the last 2 unused)
    exact = torch.zeros(10, 2, dtype=F64)
    x = torch.tensor([[v, 0.0] for v in (1, 1, 3, 3, 1, 1, 3, 3, 50, 50)], dtype=F64)
    rows = C.sample_size_study(s, {("euler:switch", 8): (x, exact)}, log=quiet)
    assert [(r["sampler"], r["steps"], r["samples"]) for r in rows] == [("euler:switch", 8, n) for n in (2, 4, 8)]
    assert rows[0]["w2_subsets"] == [1.0, 3.0, 1.0, 3.0] and rows[0]["w2"] == R.t_interval([1.0, 3.0, 1.0, 3.0])
    assert rows[1]["w2_subsets"] == pytest.approx([math.sqrt(5)] * 2)
    assert rows[2]["w2"] == {"mean": pytest.approx(math.sqrt(5)), "ci_low": None, "ci_high": None, "n": 1}
    assert all(r["pathwise_rms"] == pytest.approx(math.sqrt(5)) for r in rows)
    assert C.size_slope(rows) == pytest.approx(R.loglog_slope([2, 4, 8], [2.0, math.sqrt(5), math.sqrt(5)])[0])


def test_exact_law_floor_starts_at_zero_and_grows_with_the_angle():
    rows = C.exact_law_floor(tiny(samples=40, floor_angles=(0.0, 0.3, 1.0)), log=quiet)  # 0: refused by the study
    assert [r["angle"] for r in rows] == [0.0, 0.3, 1.0]
    assert rows[0]["pathwise_rms"] == 0.0 and rows[0]["w2"] < 1e-6  # angle 0: the same noise, the same samples
    assert 0 < rows[1]["pathwise_rms"] < rows[2]["pathwise_rms"]
    assert all(r["w2"] <= r["pathwise_rms"] + 1e-6 for r in rows)  # OT can only re-pair for the better
    assert C.exact_law_floor(tiny(floor_samplers=()), log=quiet) == []


def test_floor_at_interpolates_a_power_law_exactly():
    floor = [{"pathwise_rms": r, "w2": 0.1 * r ** 0.5} for r in (1.6, 0.1, 0.4)]
    assert C.floor_at(floor, 0.2) == pytest.approx(0.1 * 0.2 ** 0.5, rel=1e-12)
    assert C.floor_at(floor, 1.0) == pytest.approx(0.1, rel=1e-12)
    assert C.floor_at(floor, 0.01) == pytest.approx(0.1 * 0.1 ** 0.5)  # held at the ends
    assert C.floor_at(floor, 9.0) == pytest.approx(0.1 * 1.6 ** 0.5)


def convergence_results():
    s = asdict(tiny(steps=(4, 16, 64, 256), fit_min_steps=16, samples=2000, common_noise_draws=3))
    fit = {"slope": -0.4, "intercept": 0.0, "ci_low": -0.5, "ci_high": -0.3}
    floor = [{"angle": 0.1, "pathwise_rms": 0.2, "w2": 0.05}, {"angle": 0.5, "pathwise_rms": 0.8, "w2": 0.1}]
    draws = {"euler:switch": {"steps": [4, 16, 64, 256], "w2_mean": [0.2, 0.1, 0.06, 0.05],
                              "pathwise_rms_mean": [1.6, 0.8, 0.2, 0.1],
                              "fit": {**R.t_interval([-0.3, -0.4, -0.5]), "slopes": [-0.3, -0.4, -0.5]}}}
    sizes = [{"sampler": "euler:switch", "steps": 16, "samples": n, "pathwise_rms": 0.8, "w2": R.t_interval(v)}
             for n, v in ((1000, [0.2, 0.22, 0.18, 0.2]), (2000, [0.15, 0.13]), (4000, [0.1]))]
    return {"settings": s, "grid": {"samplers": {"euler:switch": {"pathwise_fit": fit}}}, "common_noise": draws,
            "exact_law_floor": floor, "sample_size": sizes}


def test_common_noise_report_lines_and_findings():
    res = convergence_results()
    lines = "\n".join(C.common_noise_lines(res))
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert f"| euler:switch | -0.40 [{-0.4 - half:.2f}, {-0.4 + half:.2f}] | 0.2 | 0.1 | 0.06 | 0.05 |" in lines
    assert "| euler:switch: exact-law floor | - | 0.1 | 0.1 | 0.05 | 0.05 |" in lines  # held at the end rows
    assert lines.startswith("The same over 3 independent noise draws of 2000 samples")
    size = "\n".join(C.sample_size_lines(res))
    assert "| sampler | N | pathwise RMS | n=1000 | n=2000 | n=4000 | slope in n |" in size
    ci = R.t_interval([0.15, 0.13])
    assert (f"| euler:switch | 16 | 0.8 | 0.2 [0.174, 0.226] | 0.14 [{ci['ci_low']:.3g}, {ci['ci_high']:.3g}] | 0.1 | "
            f"{C.size_slope(res['sample_size']):.2f} |") in size
    notes = C.common_noise_findings(res)
    assert notes[0] == (f"euler:switch: common-noise W2 slope -0.40 [{-0.4 - half:.2f}, {-0.4 + half:.2f}] over 3 "
                        "noise draws (pathwise slope -0.40).")
    assert notes[1].startswith("euler:switch: common-noise W2 / exact-law floor at the same pathwise RMS = 1.00 to "
                               "1.20 over N >= 16: the W2 is what exact mixture samples score")
    assert notes[2] == ("euler:switch at N=16: common-noise W2 0.2 at n=1000 -> 0.1 at n=4000 (~ n^"
                        f"{C.size_slope(res['sample_size']):.2f}); the law error is at most about 0.1.")
    res["common_noise"]["euler:switch"]["w2_mean"] = [0.2, 0.2, 0.1, 0.05]  # twice the floor at N = 16 and 64
    assert C.common_noise_findings(res)[1].endswith("above the floor, so part of the W2 is law error.")
    for key in ("common_noise", "sample_size"):
        res[key] = {} if key == "common_noise" else []
    assert C.common_noise_lines(res) == [] and C.sample_size_lines(res) == [] and C.common_noise_findings(res) == []


def test_one_noise_draw_is_reported_without_an_interval():
    """common_noise_draws=1 was captioned '95% t-interval over the 1 draws, t with 0 degrees of freedom'."""
    res = convergence_results()
    res["settings"]["common_noise_draws"] = 1
    res["common_noise"]["euler:switch"]["fit"] = {**R.t_interval([-0.3]), "slopes": [-0.3]}
    lines = C.common_noise_lines(res)
    assert lines[0] == ("The same over 1 independent noise draw of 2000 samples (fresh noise and routing draws): W2 at "
                        "each N; slope fitted on N >= 16. One draw: no interval; give common_noise_draws 2 or more "
                        "for one.")
    text = "\n".join(lines)
    assert "| sampler | slope | N=4 | N=16 | N=64 | N=256 |" in text and "t-CI" not in text
    assert "| euler:switch | -0.30 | 0.2 | 0.1 | 0.06 | 0.05 |" in text  # the numbers stay
    assert C.common_noise_findings(res)[0] == ("euler:switch: common-noise W2 slope -0.30 over 1 noise draw "
                                               "(pathwise slope -0.40).")
