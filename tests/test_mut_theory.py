"""Fast unit tests of the theory studies' inner functions (convergence, distill, students, report) on tiny
settings, against closed forms, hand-computed cases and independent loops: the end-to-end study runs
(test_theory_cli.py) are too slow to run for every mutant."""
import json
import math
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from ddmkit.data.synthetic import ring_mixture
from ddmkit.errors import DDMError
from ddmkit.theory import convergence as C
from ddmkit.theory import distill as D
from ddmkit.theory import report as R
from ddmkit.theory import students as S
from ddmkit.theory.experts import cluster_posterior, make_experts, make_router
from ddmkit.theory.paths import get_path
from ddmkit.theory.stability import (cumulative_lambda, lambda_uniform_grid, measured_lipschitz, report_times,
                                     teacher_solve, uniform_grid)
from ddmkit.truth import GaussianMixture

F64 = torch.float64


def quiet(*_):
    pass


class Figures:
    """Stands in for save_figure: keeps the figure and its path, returns the file name."""

    def __init__(self):
        self.saved = []

    def __call__(self, fig, path):
        self.saved.append((fig, path))
        return path.name


def lines(ax):
    return [(list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata())), ln.get_label(),
             ln.get_linestyle(), ln.get_marker()) for ln in ax.get_lines()]


def legend_texts(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()], leg.get_texts()[0].get_fontsize()


def euler(field, x, ts):
    for t, tn in zip(ts[:-1], ts[1:]):
        x = x + (tn - t) * field(x, t.expand(len(x)))
    return x


def heun(field, x, ts):
    for t, tn in zip(ts[:-1], ts[1:]):
        v = field(x, t.expand(len(x)))
        xe = x + (tn - t) * v
        x = x + (tn - t) * 0.5 * (v + field(xe, tn.expand(len(x))))
    return x


def tiny_convergence(**kw):
    base = dict(components=4, radius=1.5, width=0.3, clusters=2, steps=(2, 4, 8), fit_min_steps=2,
                samplers=("euler:full", "euler:switch"), samples=10, sweep_samples=6, sweep_steps=(2, 4),
                eps_values=(0.0, 0.2), temperatures=(1.0, 2.0), sweep_samplers=("euler:full", "euler:switch"),
                radii=(1.0, 2.0), disagreement_steps=(2, 4), bootstrap=5, seed=3)
    base.update(kw)
    return C.ConvergenceSettings(**base)


# ----- convergence: settings, samplers, problems --------------------------------------------------
def test_quick_convergence_settings():
    q = C.ConvergenceSettings.quick(seed=7)
    assert (q.steps, q.samplers, q.samples, q.sweep_steps, q.eps_values, q.temperatures, q.radii,
            q.disagreement_steps, q.bootstrap, q.seed) == (
        (4, 8, 16, 32, 64, 128), ("euler:full", "euler:switch", "heun:full"), 200, (16, 64), (0.0, 0.1, 0.3),
        (1.0, 2.0), (1.0, 2.0), (16, 64), 200, 7)
    assert C.ConvergenceSettings.quick().seed == 0
    assert (q.components, q.clusters, q.sweep_samples) == (8, 4, 1000)


def test_parse_sampler():
    assert C.parse_sampler("euler:switch") == ("euler", "switch")
    assert C.parse_sampler("heun:top-2") == ("heun", "top-2")
    with pytest.raises(DDMError, match=r"^sampler: 'rk4:full'; give SOLVER:STRATEGY with SOLVER one of euler, heun, "
                                       r"e\.g\. 'euler:switch' \(not 'rk4:full'\)$"):
        C.parse_sampler("rk4:full")
    for bad in ("euler:", "euler", ":full"):
        with pytest.raises(DDMError, match="; give SOLVER:STRATEGY with SOLVER one of"):
            C.parse_sampler(bad)
    with pytest.raises(DDMError, match=r"; give SOLVER:STRATEGY with a STRATEGY .*\('euler:bogus': unknown routing"):
        C.parse_sampler("euler:bogus")
    assert C.sampler_fix("euler:switch") is None


def test_make_problem_builds_the_ring_clusters_and_errors():
    s = tiny_convergence(components=6, radius=1.5, width=0.3, clusters=3, seed=4)
    p = C.make_problem(s)
    ring = ring_mixture(6, 1.5, 0.3)
    assert torch.equal(p.gmm.means, ring.means) and torch.equal(p.gmm.eigvals, ring.eigvals)
    assert p.groups == [[0, 1], [2, 3], [4, 5]]
    assert (p.eps, p.temperature, p.seed) == (0.0, 1.0, 4)
    q = C.make_problem(s, radius=0.5, eps=0.2, temperature=3.0)
    assert torch.allclose(q.gmm.means, ring_mixture(6, 0.5, 0.3).means)
    assert (q.eps, q.temperature) == (0.2, 3.0)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.full((5,), 0.4, dtype=F64)
    want = make_experts(q.gmm, q.groups, 0.2, 4)
    assert len(q.experts) == 3
    for e, w in zip(q.experts, want):
        assert torch.equal(e(x, t), w(x, t))
    assert torch.equal(q.router(x, t), make_router(q.gmm, q.groups, 3.0)(x, t))
    assert not torch.allclose(q.router(x, t), cluster_posterior(q.gmm, q.groups, x, t))


def test_exact_solution_of_one_gaussian_is_the_linear_map():
    # one component N(mu, s^2 I): the flow from x_1 = z to t = 0 is x_0 = mu + s z
    gmm = GaussianMixture.from_covariances([1.0], [[0.5, -1.0]], [0.09])
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x0 = C.exact_solution(gmm, z)
    assert x0.shape == (6, 2)
    assert torch.allclose(x0, torch.tensor([0.5, -1.0], dtype=F64) + 0.3 * z, atol=1e-8, rtol=0)


@pytest.mark.parametrize("sampler, step", [("euler:full", euler), ("heun:full", heun)])
def test_routed_sample_under_full_routing_is_the_plain_solver_on_the_true_field(sampler, step):
    p = C.make_problem(tiny_convergence())
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = C.routed_sample(p, sampler, z, 5, seed=0)
    want = step(p.gmm.velocity, z, torch.linspace(1.0, 0.0, 6, dtype=F64))
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_routed_sample_switch_draws_by_the_seed_and_one_cluster_is_exact():
    s = tiny_convergence()
    p = C.make_problem(s)
    z = torch.randn(40, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    a, b = C.routed_sample(p, "euler:switch", z, 4, 11), C.routed_sample(p, "euler:switch", z, 4, 11)
    assert torch.equal(a, b)
    assert not torch.allclose(a, C.routed_sample(p, "euler:switch", z, 4, 12))
    one = C.make_problem(tiny_convergence(clusters=1))
    want = euler(one.gmm.velocity, z, torch.linspace(1.0, 0.0, 5, dtype=F64))
    assert torch.allclose(C.routed_sample(one, "euler:switch", z, 4, 0), want, atol=1e-12, rtol=0)


def test_squared_errors_match_a_loop_over_the_steps():
    p = C.make_problem(tiny_convergence())
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = torch.zeros(7, 2, dtype=F64) + 0.25
    sq, samples = C.squared_errors(p, "euler:switch", z, exact, (2, 3, 5), seed=5)
    assert sq.shape == (3, 7) and len(samples) == 3
    for i, n in enumerate((2, 3, 5)):
        x = C.routed_sample(p, "euler:switch", z, n, 5 + 7919 * i)
        assert torch.equal(samples[i], x)
        np.testing.assert_allclose(sq[i], ((x - exact) ** 2).sum(1).numpy(), rtol=1e-14, atol=0)


def test_fit_range():
    assert C.fit_range((4, 8, 16, 32, 64), 16).tolist() == [False, False, True, True, True]
    assert C.fit_range([4, 8, 16, 32], 16).tolist() == [True] * 4  # two points only: use every N
    assert C.fit_range((4, 8, 16), 4).tolist() == [True] * 3
    assert C.fit_range((4, 8, 16), 5).dtype == bool


def fake_w2(x, y):
    """A stand-in for the exact OT: the RMS of x - y row by row (no re-pairing)."""
    return float(((x - y) ** 2).sum(1).mean().sqrt())


def test_convergence_grid_against_its_parts(monkeypatch):
    monkeypatch.setattr(C, "w2_exact", fake_w2)
    s = tiny_convergence(steps=(1, 2, 4, 64), fit_min_steps=2, samplers=("euler:full", "euler:switch"))
    logged = []
    out = C.convergence_grid(s, log=logged.append)
    assert logged == ["convergence: euler:full", "convergence: euler:switch"]
    p = C.make_problem(s)
    g = torch.Generator().manual_seed(s.seed)
    noise = torch.randn(s.samples, 2, generator=g, dtype=F64)
    exact = C.exact_solution(p.gmm, noise)
    reference = p.gmm.sample(s.samples, generator=g)
    floor = fake_w2(exact, reference)
    assert out["w2_floor"] == floor
    assert list(out["samplers"]) == list(s.samplers)
    for j, name in enumerate(s.samplers):
        r = out["samplers"][name]
        sq, xs = C.squared_errors(p, name, noise, exact, s.steps, s.seed + 1000 * j)
        assert r["steps"] == [1, 2, 4, 64]
        np.testing.assert_allclose(r["pathwise_rms"], np.sqrt(sq.mean(1)), rtol=1e-12)
        w2 = [fake_w2(x, reference) for x in xs]
        common = [fake_w2(x, exact) for x in xs]
        assert r["w2"] == pytest.approx(w2, rel=1e-12) and r["w2_common_noise"] == pytest.approx(common, rel=1e-12)
        n = np.array([2, 4, 64])
        slope, intercept = R.loglog_slope(n, np.maximum(common[1:], 1e-12))
        assert r["w2_common_fit"] == pytest.approx({"slope": slope, "intercept": intercept}, rel=1e-9)
        assert r["pathwise_fit"] == pytest.approx(R.bootstrap_slope(n, sq[1:], s.bootstrap, s.seed), rel=1e-9)
        above = np.asarray(w2) > 2 * floor
        if above.sum() >= 3:
            slope, intercept = R.loglog_slope(np.asarray(s.steps)[above], np.asarray(w2)[above])
            assert r["w2_fit"] == pytest.approx({"slope": slope, "intercept": intercept, "points": int(above.sum())})
        else:
            assert r["w2_fit"] == {"points": int(above.sum())}
    # euler:full converges to the exact solution: the common-noise W2 (here the RMS) falls with N
    full = out["samplers"]["euler:full"]
    assert full["w2_common_noise"][-1] < full["w2_common_noise"][0] / 10
    assert full["w2_common_fit"]["slope"] < -0.5


def test_convergence_grid_fits_w2_only_on_points_above_twice_the_floor(monkeypatch):
    calls = []

    def w2(x, y):
        calls.append(1)
        # the floor (first call) 1.0, then the W2 to the reference at each N, then the common-noise W2
        seq = {1: 1.0, 2: 8.0, 3: 4.0, 4: 2.5, 5: 2.0, 6: 0.1, 7: 0.1, 8: 0.1, 9: 0.1}
        return seq[len(calls)]

    monkeypatch.setattr(C, "w2_exact", w2)
    monkeypatch.setattr(C, "squared_errors", lambda *a, **k: (np.ones((4, 3)), [None] * 4))
    s = tiny_convergence(steps=(1, 2, 4, 8), samplers=("euler:full",))
    r = C.convergence_grid(s, log=quiet)["samplers"]["euler:full"]
    assert r["w2"] == [8.0, 4.0, 2.5, 2.0] and r["w2_common_noise"] == [0.1] * 4
    slope, intercept = R.loglog_slope([1, 2, 4], [8.0, 4.0, 2.5])  # 2.0 is not above 2 x floor
    assert r["w2_fit"] == pytest.approx({"slope": slope, "intercept": intercept, "points": 3})
    calls.clear()
    seq_low = lambda x, y: (calls.append(1), 1.0 if len(calls) == 1 else 2.0)[1]  # noqa: E731
    monkeypatch.setattr(C, "w2_exact", seq_low)
    r = C.convergence_grid(s, log=quiet)["samplers"]["euler:full"]
    assert r["w2_fit"] == {"points": 0}
    assert r["w2_common_fit"]["slope"] == pytest.approx(0.0, abs=1e-12)
    assert r["pathwise_rms"] == [1.0, 1.0, 1.0, 1.0]


def test_w2_common_fit_clamps_zero_errors(monkeypatch):
    seq = iter([1.0] + [3.0] * 4 + [0.0] * 4)
    monkeypatch.setattr(C, "w2_exact", lambda x, y: next(seq))
    monkeypatch.setattr(C, "squared_errors", lambda *a, **k: (np.ones((4, 3)), [None] * 4))
    r = C.convergence_grid(tiny_convergence(steps=(1, 2, 4, 8), samplers=("euler:full",)), log=quiet)
    fit = r["samplers"]["euler:full"]["w2_common_fit"]
    assert fit["slope"] == pytest.approx(0.0, abs=1e-9) and fit["intercept"] == pytest.approx(math.log(1e-12))


# ----- convergence: router error, disagreement, sweeps ----------------------------------------------
def test_mean_router_error_is_zero_for_the_exact_router_and_a_tv_average_otherwise():
    s = tiny_convergence()
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert C.mean_router_error(C.make_problem(s), noise) == 0.0
    p = C.make_problem(s, temperature=2.0)
    for times in (21, 5):
        got = C.mean_router_error(p, noise, times) if times != 21 else C.mean_router_error(p, noise)
        ts = torch.linspace(1.0, 0.0, times, dtype=F64)
        states = teacher_solve(get_path("linear"), p.gmm, noise, ts, tol=1e-8)
        tv = []
        for x, t in zip(states, ts):
            r = cluster_posterior(p.gmm, p.groups, x, t)
            tempered = r ** 0.5 / (r ** 0.5).sum(1, keepdim=True)
            tv.append(float(0.5 * (tempered - r).abs().sum(1).mean()))
        assert got == pytest.approx(float(np.mean(tv)), rel=1e-6)
        assert got > 0.01


def test_integrated_disagreement_is_a_trapezoid_of_the_switching_variance():
    s = tiny_convergence()
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert C.integrated_disagreement(C.make_problem(tiny_convergence(clusters=1)), noise) == pytest.approx(0, abs=1e-20)
    p = C.make_problem(s)
    for times in (41, 6):
        got = C.integrated_disagreement(p, noise, times) if times != 41 else C.integrated_disagreement(p, noise)
        ts = torch.linspace(1.0, 0.0, times, dtype=F64)
        states = teacher_solve(get_path("linear"), p.gmm, noise, ts, tol=1e-8)
        values = []
        for x, t in zip(states, ts):
            tb = t.expand(len(x))
            r = cluster_posterior(p.gmm, p.groups, x, tb)
            v = torch.stack([p.gmm.subset(g).velocity(x, tb) for g in p.groups], 1)
            mean = (r[:, :, None] * v).sum(1)
            values.append(float((r * ((v - mean[:, None]) ** 2).sum(-1)).sum(1).mean()))
        tt = ts.numpy()[::-1]
        want = float(np.sum(0.5 * (np.array(values[::-1])[1:] + np.array(values[::-1])[:-1]) * np.diff(tt)))
        assert got == pytest.approx(want, rel=1e-6) and got > 0


def test_error_sweep_shares_one_noise_and_one_exact_solve_per_mixture(monkeypatch):
    s = tiny_convergence(samples=10, sweep_samples=6)
    p0, p1 = C.make_problem(s), C.make_problem(s, eps=0.2)
    p2 = C.Problem(p0.gmm, p0.groups, 0.0, 2.0, s.seed)  # the same mixture object as p0
    solves = []
    real = C.exact_solution
    monkeypatch.setattr(C, "exact_solution", lambda gmm, noise: (solves.append(gmm), real(gmm, noise))[1])
    logged = []
    rows = C.error_sweep(s, [(0.0, p0), (0.2, p1), (2.0, p2)], ["euler:full", "euler:switch"], (2, 4), logged.append,
                         "eps")
    assert len(solves) == 2  # p0 and p2 share their mixture
    assert logged == ["convergence sweep: eps = 0, euler:full", "convergence sweep: eps = 0, euler:switch",
                      "convergence sweep: eps = 0.2, euler:full", "convergence sweep: eps = 0.2, euler:switch",
                      "convergence sweep: eps = 2, euler:full", "convergence sweep: eps = 2, euler:switch"]
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(s.seed + 1), dtype=F64)
    assert [(r["value"], r["sampler"], r["steps"]) for r in rows] == [
        (v, n, [2, 4]) for v in (0.0, 0.2, 2.0) for n in ("euler:full", "euler:switch")]
    for row, (p, j) in zip(rows, [(p0, 0), (p0, 1), (p1, 0), (p1, 1), (p2, 0), (p2, 1)]):
        sq, _ = C.squared_errors(p, row["sampler"], noise, real(p.gmm, noise), (2, 4), s.seed + 1000 * j)
        np.testing.assert_allclose(row["pathwise_rms"], np.sqrt(sq.mean(1)), rtol=1e-9)
    small = C.error_sweep(tiny_convergence(samples=3, sweep_samples=6), [(0.0, p0)], ["euler:full"], (2,), quiet)
    noise3 = torch.randn(3, 2, generator=torch.Generator().manual_seed(s.seed + 1), dtype=F64)
    sq, _ = C.squared_errors(p0, "euler:full", noise3, real(p0.gmm, noise3), (2,), s.seed)
    assert small[0]["pathwise_rms"] == pytest.approx(np.sqrt(sq.mean(1)).tolist(), rel=1e-9)


def test_disagreement_study_rows(monkeypatch):
    s = tiny_convergence(radii=(1.0, 2.0), disagreement_steps=(2, 8), samples=700)
    seen = []

    def fake_q(problem, noise):
        seen.append((float(problem.gmm.means.norm(dim=1).max()), noise.shape))
        assert torch.equal(noise, torch.randn(500, 2, generator=torch.Generator().manual_seed(s.seed + 2),
                                              dtype=F64))
        return 4.0 * len(seen)

    def fake_sweep(s_, problems, samplers, steps, log, name):
        (value, problem), = problems
        assert samplers == ["euler:switch"] and steps == s_.disagreement_steps and name == "radius"
        return [{"pathwise_rms": [value, 2 * value]}]

    monkeypatch.setattr(C, "integrated_disagreement", fake_q)
    monkeypatch.setattr(C, "error_sweep", fake_sweep)
    rows = C.disagreement_study(s, log=quiet)
    assert [r[0] for r in seen] == pytest.approx([1.0, 2.0])
    assert rows == [
        {"radius": 1.0, "Q": 4.0, "steps": 2, "pathwise_rms": 1.0, "predicted": math.sqrt(2.0)},
        {"radius": 1.0, "Q": 4.0, "steps": 8, "pathwise_rms": 2.0, "predicted": math.sqrt(0.5)},
        {"radius": 2.0, "Q": 8.0, "steps": 2, "pathwise_rms": 2.0, "predicted": 2.0},
        {"radius": 2.0, "Q": 8.0, "steps": 8, "pathwise_rms": 4.0, "predicted": 1.0}]
    seen.clear()
    monkeypatch.setattr(C, "integrated_disagreement", lambda problem, noise: (seen.append(noise.shape), 1.0)[1])
    C.disagreement_study(tiny_convergence(radii=(1.0,), samples=30), log=quiet)
    assert seen == [(30, 2)]


def test_disagreement_study_real_on_one_radius():
    s = tiny_convergence(radii=(1.5,), disagreement_steps=(2, 4), samples=6)
    rows = C.disagreement_study(s, log=quiet)
    p = C.make_problem(s, radius=1.5)
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(s.seed + 2), dtype=F64)
    q = C.integrated_disagreement(p, noise)
    sweep = C.error_sweep(s, [(1.5, p)], ["euler:switch"], (2, 4), quiet)[0]["pathwise_rms"]
    assert [(r["radius"], r["steps"]) for r in rows] == [(1.5, 2), (1.5, 4)]
    assert [r["Q"] for r in rows] == pytest.approx([q, q])
    assert [r["pathwise_rms"] for r in rows] == pytest.approx(sweep)
    assert [r["predicted"] for r in rows] == pytest.approx([math.sqrt(q / 2), math.sqrt(q / 4)])


# ----- convergence: the study, plots and the report -------------------------------------------------
def test_run_convergence_rejects_bad_settings(tmp_path):
    for bad in (dict(samplers=("rk4:full",)), dict(sweep_samplers=("euler:nope",)), dict(steps=(0, 4)),
                dict(samples=1)):
        with pytest.raises(DDMError):
            C.run_convergence(tiny_convergence(**bad), tmp_path / "x", log=quiet)
        assert not (tmp_path / "x").exists()
    with pytest.raises(DDMError, match=r"^ConvergenceSettings.samples: 1; give an integer >= 2$"):
        C.run_convergence(tiny_convergence(samples=1), tmp_path, log=quiet)


def test_run_convergence_assembles_its_parts(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(C, "convergence_grid", lambda s, log: {"grid": s.seed})
    monkeypatch.setattr(C, "error_sweep", lambda s, problems, samplers, steps, log, name: [
        {"value": v, "eps": p.eps, "T": p.temperature, "samplers": samplers, "steps": steps} for v, p in problems])
    monkeypatch.setattr(C, "mean_router_error",
                        lambda p, noise: (calls.setdefault("noise", noise), p.temperature * 10)[1])
    monkeypatch.setattr(C, "disagreement_study", lambda s, log: ["study"])
    monkeypatch.setattr(C, "plot_grid", lambda results, out: "convergence.png")
    monkeypatch.setattr(C, "plot_sweeps", lambda results, out: "sweeps.png")
    monkeypatch.setattr(C, "render_report", lambda results: "REPORT " + ",".join(results))
    temperatures = (1.0, 1.5, 1.0000001)  # the last two differ only beyond 6 significant digits (f"{tau:g}")
    s = tiny_convergence(steps=(1, 2), samples=2, eps_values=(0.0, 0.5), temperatures=temperatures, seed=9)
    threads = torch.get_num_threads()
    res = C.run_convergence(s, tmp_path / "out", log=quiet)
    assert torch.get_num_threads() == threads
    assert res["settings"] == asdict(s) and res["grid"] == {"grid": 9}
    assert res["eps_sweep"] == [{"value": e, "eps": e, "T": 1.0, "samplers": s.sweep_samplers, "steps": (2, 4)}
                                for e in (0.0, 0.5)]
    assert res["temperature_sweep"] == [{"value": t, "eps": 0.0, "T": t, "samplers": s.sweep_samplers,
                                         "steps": (2, 4)} for t in temperatures]
    router_error = {"1": 10.0, "1.5": 15.0, "1.0000001": 1.0000001 * 10}  # one entry per temperature
    assert res["router_error"] == router_error
    assert torch.equal(calls["noise"], torch.randn(2, 2, generator=torch.Generator().manual_seed(12), dtype=F64))
    assert res["disagreement"] == ["study"] and res["plots"] == ["convergence.png", "sweeps.png"]
    assert (tmp_path / "out" / "report.md").read_text() == (
        "REPORT settings,grid,eps_sweep,router_error,temperature_sweep,disagreement,common_noise,sample_size,"
        "exact_law_floor,plots")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["router_error"] == router_error
    big = tiny_convergence(samples=600)
    C.run_convergence(big, tmp_path / "big", log=quiet)
    assert calls["noise"].shape == (2, 2)  # setdefault keeps the first; check the cap on a fresh record
    calls.clear()
    C.run_convergence(big, tmp_path / "big2", log=quiet)
    assert calls["noise"].shape == (500, 2)


def test_run_convergence_seeds_torch(monkeypatch, tmp_path):
    drawn = []
    monkeypatch.setattr(C, "convergence_grid", lambda s, log: drawn.append(torch.rand(1).item()) or {})
    for name in ("error_sweep", "disagreement_study"):
        monkeypatch.setattr(C, name, lambda *a, **k: [])
    monkeypatch.setattr(C, "mean_router_error", lambda p, noise: 0.0)
    monkeypatch.setattr(C, "plot_grid", lambda results, out: "a.png")
    monkeypatch.setattr(C, "plot_sweeps", lambda results, out: "b.png")
    monkeypatch.setattr(C, "render_report", lambda results: "")
    C.run_convergence(tiny_convergence(seed=21), tmp_path, log=quiet)
    torch.manual_seed(21)
    assert drawn == [torch.rand(1).item()]


def grid_results():
    fit = {"slope": -1.0, "intercept": math.log(2.0), "ci_low": -1.1, "ci_high": -0.9}
    fit2 = {"slope": -0.5, "intercept": math.log(3.0), "ci_low": -0.6, "ci_high": -0.4}
    return {"grid": {"w2_floor": 0.05, "samplers": {
        "euler:full": {"steps": [2, 4], "pathwise_rms": [1.0, 0.5], "pathwise_fit": fit, "w2": [0.4, 0.2]},
        "euler:switch": {"steps": [2, 4], "pathwise_rms": [2.0, 1.5], "pathwise_fit": fit2, "w2": [0.3, 0.1]}}},
        "eps_sweep": [{"value": 0.0, "sampler": "euler:full", "steps": [2, 4], "pathwise_rms": [1.0, 0.5]},
                      {"value": 0.1, "sampler": "euler:switch", "steps": [2, 4], "pathwise_rms": [2.0, 1.0]}],
        "temperature_sweep": [{"value": 2.0, "sampler": "euler:full", "steps": [2, 4], "pathwise_rms": [3.0, 1.0]}],
        "disagreement": [{"radius": 1.0, "steps": 16, "predicted": 0.5, "pathwise_rms": 0.6},
                         {"radius": 1.0, "steps": 4, "predicted": 2.0, "pathwise_rms": 1.0}],
        "settings": {"steps": [2, 4], "fit_min_steps": 2}}


def test_plot_grid(monkeypatch, tmp_path):
    figs = Figures()
    monkeypatch.setattr(C, "save_figure", figs)
    assert C.plot_grid(grid_results(), tmp_path) == "convergence.png"
    (fig, path), = figs.saved
    assert path == tmp_path / "convergence.png"
    assert len(fig.axes) == 2 and tuple(fig.get_size_inches()) == pytest.approx((8.5, 4.0))
    left, right = fig.axes
    got = lines(left)[:4]  # the fifth, empty, names the lines in the legend
    assert [g[:3] for g in got] == [
        ([2.0, 4.0], [1.0, 0.5], "euler:full (fitted slope -1.00)", ),
        ([2.0, 4.0], [1.0, 0.5], "_child1"),
        ([2.0, 4.0], [2.0, 1.5], "euler:switch (fitted slope -0.50)"),
        ([2.0, 4.0], pytest.approx([3.0 * 2 ** -0.5, 1.5]), "_child3")]
    assert [(g[3], g[4]) for g in got] == [("None", "o"), ("-", "None"), ("None", "o"), ("-", "None")]
    lw = [ln.get_linewidth() for ln in left.get_lines()]
    assert lw[1] == lw[3] == 0.8
    c = [ln.get_color() for ln in left.get_lines()]
    assert c[0] == c[1] and c[2] == c[3] and c[0] != c[2]
    got = lines(right)
    assert [g[:3] for g in got] == [([2.0, 4.0], [0.4, 0.2], "euler:full"), ([2.0, 4.0], [0.3, 0.1], "euler:switch"),
                                    ([0.0, 1.0], [0.05, 0.05], "W2 noise floor")]
    assert [(g[3], g[4]) for g in got] == [("-", "o"), ("-", "o"), (":", "None")]
    assert [ln.get_color() for ln in right.get_lines()][:2] == [c[0], c[2]]
    assert right.get_lines()[2].get_color() == "k"
    assert (left.get_title(), left.get_xlabel(), left.get_ylabel()) == (
        "pathwise error vs exact ODE", "steps N", "RMS |X_N - X(0)|")
    assert (right.get_title(), right.get_xlabel(), right.get_ylabel()) == ("W2 to the mixture", "steps N", "W2")
    assert left.get_xscale() == left.get_yscale() == right.get_xscale() == right.get_yscale() == "log"
    assert legend_texts(left) == (["euler:full (fitted slope -1.00)", "euler:switch (fitted slope -0.50)",
                                   "lines: log-log fits on N >= 2"], 6)
    assert legend_texts(right) == (["euler:full", "euler:switch", "W2 noise floor"], 6)


def test_plot_sweeps(monkeypatch, tmp_path):
    figs = Figures()
    monkeypatch.setattr(C, "save_figure", figs)
    assert C.plot_sweeps(grid_results(), tmp_path) == "sweeps.png"
    (fig, path), = figs.saved
    assert path == tmp_path / "sweeps.png"
    assert len(fig.axes) == 3 and tuple(fig.get_size_inches()) == pytest.approx((12.5, 4.0))
    a, b, c = fig.axes
    assert lines(a) == [([2.0, 4.0], [1.0, 0.5], "euler:full eps=0", "-", "o"),
                        ([2.0, 4.0], [2.0, 1.0], "euler:switch eps=0.1", "--", "o")]
    assert [ln.get_markersize() for ln in a.get_lines()] == [3, 3]
    assert lines(b) == [([2.0, 4.0], [3.0, 1.0], "euler:full T=2", "-", "o")]
    assert (a.get_title(), a.get_xlabel(), a.get_ylabel()) == ("pathwise error, sweep in eps", "steps N", "RMS error")
    assert b.get_title() == "pathwise error, sweep in T"
    assert legend_texts(a) == (["euler:full eps=0", "euler:switch eps=0.1"], 5)
    assert legend_texts(b)[1] == 5
    assert lines(c) == [([0.5, 2.0], [0.6, 1.0], "radius 1 (N = 16, 4)", "-", "o"),
                        ([0.5, 2.0], [0.5, 2.0], "error = sqrt(Q / N)", ":", "None")]
    assert c.get_lines()[1].get_color() == "k"
    assert (c.get_title(), c.get_xlabel(), c.get_ylabel()) == (
        "switching error vs disagreement", "sqrt(Q / N)", "RMS error (euler:switch)")
    assert legend_texts(c) == (["radius 1 (N = 16, 4)", "error = sqrt(Q / N)"], 6)
    for ax in (a, b, c):
        assert ax.get_xscale() == ax.get_yscale() == "log"


def test_sweep_table():
    rows = [{"value": 0.1, "sampler": "euler:full", "steps": [2, 4], "pathwise_rms": [0.123456, 1.5]},
            {"value": 1, "sampler": "heun:switch", "steps": [2, 4], "pathwise_rms": [2.0, 0.000123456]}]
    assert C.sweep_table(rows, "eps") == (
        "| eps | sampler | N=2 | N=4 |\n|---|---|---|---|\n"
        "| 0.1 | euler:full | 0.123 | 1.5 |\n| 1 | heun:switch | 2 | 0.000123 |")


def report_results():
    settings = asdict(tiny_convergence(components=8, radius=2.0, width=0.2, clusters=4, steps=(4, 8),
                                       fit_min_steps=4, samples=100, bootstrap=50))
    fit_full = {"slope": -1.0, "intercept": 0.0, "ci_low": -1.05, "ci_high": -0.95}
    fit_top = {"slope": -0.3, "intercept": 0.0, "ci_low": -0.4, "ci_high": -0.2}
    fit_switch = {"slope": -0.55, "intercept": 0.0, "ci_low": -0.7, "ci_high": -0.6}
    fit_heun = {"slope": -1.2, "intercept": 0.0, "ci_low": -1.3, "ci_high": -1.25}
    samplers = {
        "euler:full": {"steps": [4, 8], "pathwise_rms": [0.2, 0.1], "w2": [0.5, 0.3],
                       "w2_common_noise": [0.15, 0.07], "w2_common_fit": {"slope": -1.1, "intercept": 0.0},
                       "pathwise_fit": fit_full, "w2_fit": {"slope": -0.74, "intercept": 0.0, "points": 3}},
        "euler:top-2": {"steps": [4, 8], "pathwise_rms": [0.3, 0.25], "w2": [0.01, 0.01],
                        "w2_common_noise": [0.2, 0.2], "w2_common_fit": {"slope": 0.0, "intercept": 0.0},
                        "pathwise_fit": fit_top, "w2_fit": {"points": 1}},
        "euler:switch": {"steps": [4, 8], "pathwise_rms": [0.4, 0.3], "w2": [0.02, 0.03],
                         "w2_common_noise": [0.1, 0.05], "w2_common_fit": {"slope": -0.5, "intercept": 0.0},
                         "pathwise_fit": fit_switch, "w2_fit": {"points": 0}},
        "heun:full": {"steps": [4, 8], "pathwise_rms": [0.05, 0.02], "w2": [0.04, 0.04],
                      "w2_common_noise": [0.01, 0.003], "w2_common_fit": {"slope": -1.9, "intercept": 0.0},
                      "pathwise_fit": fit_heun, "w2_fit": {"points": 0}}}
    return {"settings": settings, "grid": {"w2_floor": 0.025, "samplers": samplers},
            "eps_sweep": [{"value": 0.0, "sampler": "euler:full", "steps": [4, 8], "pathwise_rms": [0.2, 0.1]},
                          {"value": 0.1, "sampler": "euler:full", "steps": [4, 8], "pathwise_rms": [0.3, 0.2]},
                          {"value": 0.4, "sampler": "euler:full", "steps": [4, 8], "pathwise_rms": [0.9, 0.8]},
                          {"value": 0.1, "sampler": "euler:switch", "steps": [4, 8], "pathwise_rms": [0.5, 0.4]}],
            "router_error": {"1": 0.0, "2": 0.123456},
            "temperature_sweep": [{"value": 2.0, "sampler": "euler:full", "steps": [4, 8],
                                   "pathwise_rms": [0.25, 0.125]}],
            "disagreement": [{"radius": 1.0, "Q": 0.5, "steps": 4, "pathwise_rms": 0.4, "predicted": 0.25},
                             {"radius": 1.0, "Q": 0.5, "steps": 16, "pathwise_rms": 0.2, "predicted": 0.125},
                             {"radius": 2.0, "Q": 2.0, "steps": 4, "pathwise_rms": 0.5, "predicted": 0.5},
                             {"radius": 2.0, "Q": 2.0, "steps": 16, "pathwise_rms": 0.25, "predicted": 0.25}],
            "plots": ["convergence.png", "sweeps.png"]}


def test_convergence_findings_on_known_numbers():
    notes = C.findings(report_results())
    assert notes[0] == "euler:full: pathwise slope -1.00 [-1.05, -0.95], theory -1: agrees (the interval contains it)."
    assert notes[1] == ("euler:top-2: pathwise slope -0.30 [-0.40, -0.20]; a truncated router is biased, so the error "
                        "levels off at 0.25 instead of vanishing.")
    assert notes[2] == ("euler:switch: pathwise slope -0.55 [-0.70, -0.60], theory -0.5: agrees within 0.1, though "
                        "the interval excludes it (curvature beyond a pure power).")
    assert notes[3] == "heun:full: pathwise slope -1.20 [-1.30, -1.25], theory -2: DISAGREES over this range of N."
    assert notes[4] == ("euler:full: error at N=8 against eps has log-log slope 1.00 (an additive floor proportional "
                        "to eps gives 1 once it dominates).")
    assert notes[5] == ("switching error / sqrt(Q/N) ranges 1.00 to 1.60 over radii [1.0, 2.0]: the error grows "
                        "with expert disagreement Q.")
    assert notes[6] == "euler:switch at radius 1 (Q = 0.50): error ~ N^-0.50."
    assert notes[7] == "euler:switch at radius 2 (Q = 2.00): error ~ N^-0.50."
    assert notes[8:] == [
        "euler:top-2: W2 stays within twice the noise floor (0.025) at every N (max 0.010) while the pathwise error "
        "reaches 0.3: the law is far more accurate than the coupling, and no W2 rate can be fitted here.",
        "euler:switch: W2 stays within twice the noise floor (0.025) at every N (max 0.030) while the pathwise error "
        "reaches 0.4: the law is far more accurate than the coupling, and no W2 rate can be fitted here."]
    assert len(notes) == 10


def test_convergence_findings_edges():
    res = report_results()
    # an interval that contains the theory exactly at its ends; a slope exactly 0.1 away
    res["grid"]["samplers"] = {
        "euler:full": dict(res["grid"]["samplers"]["euler:full"],
                           pathwise_fit={"slope": -0.9, "intercept": 0, "ci_low": -1.0, "ci_high": -0.95}),
        "heun:full": dict(res["grid"]["samplers"]["heun:full"],
                          pathwise_fit={"slope": -1.95, "intercept": 0, "ci_low": -1.8, "ci_high": -1.7}),
        "euler:switch": dict(res["grid"]["samplers"]["euler:switch"], w2=[0.05, 0.01], pathwise_rms=[0.05, 0.01],
                             pathwise_fit={"slope": -0.5, "intercept": 0, "ci_low": -0.7, "ci_high": -0.5})}
    res["eps_sweep"] = [r for r in res["eps_sweep"] if r["sampler"] == "euler:switch"]  # one eps > 0: no slope
    notes = C.findings(res)
    assert notes[0].endswith("theory -1: agrees (the interval contains it).")
    assert notes[1].endswith("theory -2: agrees within 0.1, though the interval excludes it (curvature beyond a "
                             "pure power).")
    assert notes[2].endswith("theory -0.5: agrees (the interval contains it).")
    assert not any("against eps" in n for n in notes)
    assert not any("W2 stays within" in n for n in notes)  # w2 reaches 2 x floor / rms never above it


def test_render_convergence_report_exactly():
    text = C.render_report(report_results())
    head = text.split("## Error against the number of steps")[0]
    assert head == (
        "# W2 convergence with stochastic expert switching\n\n"
        "Ring of 8 Gaussians (radius 2.0, std 0.2) in 2-D, 4 clusters; experts = exact cluster velocities, "
        "router = exact cluster posterior. 100 trajectories from shared noise; exact reference by dopri5 at tol "
        "1e-10. Slopes: least squares on log-log over N >= 4, 95% bootstrap interval over trajectories "
        "(50 resamples).\n\n")
    assert text == EXPECTED_CONVERGENCE_REPORT


EXPECTED_CONVERGENCE_REPORT = "\n".join([
    "# W2 convergence with stochastic expert switching", "",
    "Ring of 8 Gaussians (radius 2.0, std 0.2) in 2-D, 4 clusters; experts = exact cluster velocities, router = "
    "exact cluster posterior. 100 trajectories from shared noise; exact reference by dopri5 at tol 1e-10. Slopes: "
    "least squares on log-log over N >= 4, 95% bootstrap interval over trajectories (50 resamples).", "",
    "## Error against the number of steps", "",
    "| sampler | pathwise slope [95% CI] | N=4 | N=8 |",
    "|---|---|---|---|",
    "| euler:full | -1.00 [-1.05, -0.95] | 0.2 | 0.1 |",
    "| euler:top-2 | -0.30 [-0.40, -0.20] | 0.3 | 0.25 |",
    "| euler:switch | -0.55 [-0.70, -0.60] | 0.4 | 0.3 |",
    "| heun:full | -1.20 [-1.30, -1.25] | 0.05 | 0.02 |", "",
    "W2 to the mixture (exact OT, 100 vs 100 samples); noise floor W2(exact-ODE samples, same reference) = 0.0250. "
    "Slope fitted on points above twice the floor:", "",
    "| sampler | W2 slope (points) | N=4 | N=8 |",
    "|---|---|---|---|",
    "| euler:full | -0.74 (3) | 0.5 | 0.3 |",
    "| euler:top-2 | no fit (1 points above 2x floor, 3 needed) | 0.01 | 0.01 |",
    "| euler:switch | no fit (0 points above 2x floor, 3 needed) | 0.02 | 0.03 |",
    "| heun:full | no fit (0 points above 2x floor, 3 needed) | 0.04 | 0.04 |", "",
    "W2 with common noise: the same exact OT between the N-step samples and the exact-ODE samples from the same "
    "noise (a perfect sampler scores 0, so there is no independent-sample floor; it is at most the pathwise RMS, "
    "and lower where the law is closer than the paths). Slope on N >= 4:", "",
    "| sampler | slope | N=4 | N=8 |",
    "|---|---|---|---|",
    "| euler:full | -1.10 | 0.15 | 0.07 |",
    "| euler:top-2 | 0.00 | 0.2 | 0.2 |",
    "| euler:switch | -0.50 | 0.1 | 0.05 |",
    "| heun:full | -1.90 | 0.01 | 0.003 |", "",
    "## Expert error eps (pathwise RMS)", "",
    "| eps | sampler | N=4 | N=8 |",
    "|---|---|---|---|",
    "| 0 | euler:full | 0.2 | 0.1 |",
    "| 0.1 | euler:full | 0.3 | 0.2 |",
    "| 0.4 | euler:full | 0.9 | 0.8 |",
    "| 0.1 | euler:switch | 0.5 | 0.4 |", "",
    "## Router temperature T (pathwise RMS)", "",
    "Router error = time-averaged E TV(tempered router, exact posterior) along exact trajectories: T=1: 0.000, "
    "T=2: 0.123.", "",
    "| T | sampler | N=4 | N=8 |",
    "|---|---|---|---|",
    "| 2 | euler:full | 0.25 | 0.125 |", "",
    "## Switching error and expert disagreement", "",
    "Q = integral over t of E sum_k r_k |v_k - v|^2 along exact trajectories; a switching step adds variance h^2 "
    "sum_k r_k |v_k - v|^2, so without amplification the error is sqrt(Q / N).", "",
    "| radius | Q | N | RMS error (euler:switch) | sqrt(Q/N) | ratio |",
    "|---|---|---|---|---|---|",
    "| 1 | 0.5 | 4 | 0.4 | 0.25 | 1.6 |",
    "| 1 | 0.5 | 16 | 0.2 | 0.125 | 1.6 |",
    "| 2 | 2 | 4 | 0.5 | 0.5 | 1 |",
    "| 2 | 2 | 16 | 0.25 | 0.25 | 1 |", "",
    "## Reading", ""] + [f"- {n}" for n in C.findings(report_results())] + [
    "", "Plots: ![convergence.png](convergence.png), ![sweeps.png](sweeps.png)", ""])


# ----- distill: settings, modes, profiles, grids ----------------------------------------------------
def tiny_distill(**kw):
    base = dict(widths=(0.5,), segments=(1, 2), lipschitz_trajectories=4, lipschitz_times=9, n_train=16, n_test=8,
                train_steps=4, batch_size=8, width=8, depth=1, seeds=1, scaling_separations=(1.0, 2.0),
                scaling_widths=(0.4, 0.2), seed=2)
    base.update(kw)
    return D.DistillSettings(**base)


def test_quick_distill_settings():
    q = D.DistillSettings.quick(seed=3)
    assert (q.widths, q.segments, q.lipschitz_trajectories, q.lipschitz_times, q.n_train, q.n_test, q.train_steps,
            q.seeds, q.seed) == ((0.25,), (1, 2, 4), 64, 61, 2048, 512, 150, 1, 3)
    assert D.DistillSettings.quick().seed == 0
    assert (q.paths, q.separation, q.width, q.depth) == (("linear", "ou"), 2.0, 64, 2)


def test_two_modes():
    gmm = D.two_modes(3.0, 0.5)
    assert gmm.means.tolist() == [[-1.5, 0.0], [1.5, 0.0]]
    assert gmm.weights.tolist() == [0.5, 0.5] and gmm.eigvals.tolist() == [[0.25, 0.25], [0.25, 0.25]]
    assert D.two_modes(2.0, 0.1, dim=3).means.tolist() == [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    for bad in (0.0, float("inf")):  # an infinite one was accepted (the studies need finite numbers)
        with pytest.raises(DDMError, match=rf"^two_modes: separation: {bad!r}; give a positive finite number$"):
            D.two_modes(bad, 0.5)
        with pytest.raises(DDMError, match=rf"^two_modes: width: {bad!r}; give a positive finite number$"):
            D.two_modes(1.0, bad)
    with pytest.raises(DDMError):
        D.two_modes(float("nan"), 0.5)
    with pytest.raises(DDMError):
        D.two_modes(1.0, -0.5)


@pytest.mark.parametrize("name", ["linear", "ou"])
def test_stability_profile_against_its_parts(name):
    path = get_path(name, 2.0)
    gmm = D.two_modes(2.0, 0.5)
    s = tiny_distill()
    prof = D.stability_profile(path, gmm, s, torch.Generator().manual_seed(5))
    times = report_times(path, 9)
    x = path.sample_noise_end(gmm, 4, torch.Generator().manual_seed(5))
    measured = measured_lipschitz(path, gmm, teacher_solve(path, gmm, x, times), times)
    bound = path.lipschitz_bound(gmm, times)
    assert torch.equal(prof["times"], times) and torch.equal(prof["bound"], bound)
    assert torch.allclose(prof["mean"], measured["mean"]) and torch.allclose(prof["max"], measured["max"])
    for key, values in (("mean", measured["mean"]), ("max", measured["max"])):
        assert torch.allclose(prof[f"lambda_{key}"], cumulative_lambda(times, values))
    assert torch.equal(prof["lambda_bound"], D.lambda_of_bound(path, gmm, 9))  # on a finer grid holding the times
    assert (prof["max"] >= prof["mean"]).all() and not torch.equal(prof["max"], prof["mean"])


def test_make_grids():
    path = get_path("ou", 3.0)
    times = torch.linspace(3.0, 0.0, 31, dtype=F64)
    profile = {"times": times, "lambda_mean": times ** 2}
    grids = D.make_grids(path, profile, (1, 3))
    assert set(grids) == {"uniform", "lambda"} and set(grids["uniform"]) == set(grids["lambda"]) == {1, 3}
    assert torch.equal(grids["uniform"][3], uniform_grid(path, 3))
    assert torch.allclose(grids["lambda"][3], lambda_uniform_grid(times, times ** 2, 3))
    assert grids["lambda"][3][1].item() == pytest.approx(3.0 * math.sqrt(2 / 3), abs=0.02)
    assert grids["uniform"][1].tolist() == [3.0, 0.0]


def test_union_times_and_states_at():
    grids = {"uniform": {1: torch.tensor([1.0, 0.0], dtype=F64), 2: torch.tensor([1.0, 0.5, 0.0], dtype=F64)},
             "lambda": {2: torch.tensor([1.0, 0.5 + 1e-13, 0.0], dtype=F64),
                        3: torch.tensor([1.0, 0.5 + 1e-11, 0.2, 0.0], dtype=F64)}}
    times = D.union_times(grids)
    assert times.tolist() == [1.0, 0.5 + 1e-11, 0.5 + 1e-13, 0.2, 0.0]
    assert D.union_times({"a": {1: torch.tensor([0.25], dtype=F64)}}).tolist() == [0.25]
    states = torch.arange(5.0)[:, None, None].expand(5, 2, 3)
    picked = D.states_at(torch.tensor([0.2, 1.0, 0.49], dtype=F64), times, states)
    assert [int(p[0, 0]) for p in picked] == [3, 0, 2]


class Scale(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


def test_student_errors_trains_one_map_per_segment_and_composes_them(monkeypatch):
    made = []

    def fake_train(inputs, targets, cfg, width, depth):
        made.append((inputs, targets, cfg, width, depth))
        return Scale(2.0 ** len(made))

    monkeypatch.setattr(D, "train_segment", fake_train)
    times = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=F64)
    train = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    test = torch.randn(4, 5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    s = tiny_distill(train_steps=121, batch_size=32, lr=0.01, width=16, depth=3)
    out = D.student_errors(torch.tensor([1.0, 0.25, 0.0], dtype=F64), times, train, test, s, seed=9)
    assert len(made) == 2
    assert torch.equal(made[0][0], train[0]) and torch.equal(made[0][1], train[2])
    assert torch.equal(made[1][0], train[2]) and torch.equal(made[1][1], train[3])
    cfg = made[0][2]
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup, cfg.ema_decay, cfg.seed, cfg.device, cfg.log_every) == (
        121, 32, 0.01, 24, 0.95, 9, "cpu", 10**9)
    assert made[0][3:] == (16, 3)

    def rel(p, t):
        return float(((p - t) ** 2).sum(1).mean() / (t ** 2).sum(1).mean())

    assert out["end_to_end"] == pytest.approx(rel(8.0 * test[0], test[3]), rel=1e-6)
    assert out["local"] == pytest.approx([rel(2.0 * test[0], test[2]), rel(4.0 * test[2], test[3])], rel=1e-6)
    made.clear()
    D.student_errors(torch.tensor([1.0, 0.0], dtype=F64), times, train, test, tiny_distill(train_steps=1000), 0)
    assert made[0][2].warmup == 50


def test_lambda_gain():
    errors = {"lambda": {2: {"end_to_end": 0.25}}, "uniform": {2: {"end_to_end": 1.0}}}
    assert D.lambda_gain(errors, 2) == 0.75
    errors["lambda"][2]["end_to_end"] = 1.5
    assert D.lambda_gain(errors, 2) == -0.5


def test_distill_setting_against_its_parts(monkeypatch):
    seen = []

    def fake_errors(grid, times, train_states, test_states, s_, seed):
        assert s_ is s
        seen.append((grid, times, train_states, test_states, seed))
        n = len(grid) - 1
        return {"end_to_end": float(n * 10 + seed + (0.5 if grid[1] != 1.0 - 1.0 / n else 0.0)),
                "local": [float(seed)] * n}

    monkeypatch.setattr(D, "student_errors", fake_errors)
    path = get_path("linear")
    s = tiny_distill(segments=(1, 2), seeds=2, separation=2.0, seed=4)
    out = D.distill_setting(path, 0.5, s)
    gmm = D.two_modes(2.0, 0.5)
    g = torch.Generator().manual_seed(4)
    profile = D.stability_profile(path, gmm, s, g)
    grids = D.make_grids(path, profile, (1, 2))
    times = D.union_times(grids)
    train = teacher_solve(path, gmm, path.sample_noise_end(gmm, 16, g), times)
    test = teacher_solve(path, gmm, path.sample_noise_end(gmm, 8, g), times)
    # S = 1 once (the Lambda grid of one segment is the uniform one), then S = 2 on both grids; seeds 4 and 5
    assert [(len(a[0]) - 1, a[4]) for a in seen] == [(1, 4), (1, 5), (2, 4), (2, 5), (2, 4), (2, 5)]
    for args in seen:
        assert torch.equal(args[1], times) and torch.allclose(args[2], train) and torch.allclose(args[3], test)
    assert torch.equal(seen[2][0], grids["uniform"][2]) and torch.allclose(seen[4][0], grids["lambda"][2])
    e = out["errors"]
    assert e["uniform"][1] == {"end_to_end": 14.5, "end_to_end_runs": [14.0, 15.0], "local": [4.5]}
    assert e["lambda"][1] is e["uniform"][1]
    assert e["uniform"][2] == {"end_to_end": 24.5, "end_to_end_runs": [24.0, 25.0], "local": [4.5, 4.5]}
    assert e["lambda"][2] == {"end_to_end": 25.0, "end_to_end_runs": [24.5, 25.5], "local": [4.5, 4.5]}
    assert out["lambda_gain"] == {1: 0.0, 2: pytest.approx(1 - 25.0 / 24.5)}
    assert (out["path"], out["separation"], out["width"], out["ratio"]) == ("linear", 2.0, 0.5, 4.0)
    assert out["times"] == profile["times"].tolist()
    for key, name in (("L_bound", "bound"), ("L_mean", "mean"), ("L_max", "max"), ("Lambda_bound", "lambda_bound"),
                      ("Lambda_mean", "lambda_mean"), ("Lambda_max", "lambda_max")):
        assert out[key] == pytest.approx(profile[name].tolist(), rel=1e-9)
    peak = int(profile["bound"].argmax())
    assert out["L_bound_peak"] == float(profile["bound"][peak]) == max(out["L_bound"])
    assert out["L_bound_peak_time"] == float(profile["times"][peak]) and 0 < peak < 8
    assert out["L_mean_peak"] == pytest.approx(float(profile["mean"].max()))
    assert out["L_max_peak"] == pytest.approx(float(profile["max"].max()))
    assert out["Lambda_total"] == pytest.approx({k: float(profile[f"lambda_{k}"][0]) for k in ("bound", "mean", "max")})
    assert out["Lambda_total"]["bound"] > out["Lambda_total"]["max"] > out["Lambda_total"]["mean"] > 0
    assert out["grids"]["uniform"] == {1: [1.0, 0.0], 2: [1.0, 0.5, 0.0]}
    assert out["grids"]["lambda"][2] == pytest.approx(grids["lambda"][2].tolist())


def test_analytic_scaling_against_the_bound():
    path = get_path("linear")
    s = tiny_distill(scaling_separations=(1.0, 2.0, 4.0), scaling_widths=(0.4, 0.1))
    out = D.analytic_scaling(path, s)
    times = report_times(path, 4001)
    assert [(r["D"], r["sigma"]) for r in out["rows"]] == [(1.0, 0.4), (1.0, 0.1), (2.0, 0.4), (2.0, 0.1),
                                                           (4.0, 0.4), (4.0, 0.1)]
    for r in out["rows"]:
        bound = path.lipschitz_bound(D.two_modes(r["D"], r["sigma"]), times)
        assert r["L_peak"] == float(bound.max())
        assert r["Lambda_total"] == pytest.approx(float(cumulative_lambda(times, bound)[0]), rel=1e-12)
    rows = {(r["D"], r["sigma"]): r for r in out["rows"]}
    for key in ("L_peak", "Lambda_total"):
        d_slope = R.loglog_slope([1, 2, 4], [rows[(d, 0.1)][key] for d in (1.0, 2.0, 4.0)])[0]
        w_slope = R.loglog_slope([0.4, 0.1], [rows[(4.0, w)][key] for w in (0.4, 0.1)])[0]
        assert out["exponents"][key] == pytest.approx({"D": d_slope, "sigma": w_slope})
    # the separation term: L_peak ~ D^2 sigma^-3 at large D / sigma
    assert out["exponents"]["L_peak"]["D"] == pytest.approx(2.0, abs=0.15)
    assert out["exponents"]["L_peak"]["sigma"] == pytest.approx(-3.0, abs=0.3)


def test_run_distill_assembles_its_parts(monkeypatch, tmp_path):
    drawn = []
    monkeypatch.setattr(D, "distill_setting", lambda path, width, s: (drawn.append(torch.rand(1).item()),
                                                                     {"path": path.name, "t": path.t_noise,
                                                                      "width": width})[1])
    monkeypatch.setattr(D, "analytic_scaling", lambda path, s: {"t": path.t_noise})
    monkeypatch.setattr(D, "plot_lipschitz", lambda runs, out: "lipschitz.png")
    monkeypatch.setattr(D, "plot_segments", lambda runs, out: "segments.png")
    monkeypatch.setattr(D, "render_report", lambda results: "R:" + ",".join(results))
    s = tiny_distill(paths=("linear", "ou"), ou_end_time=2.5, widths=(0.5, 0.25), separation=3.0, seed=8)
    logged = []
    threads = torch.get_num_threads()
    res = D.run_distill(s, tmp_path / "out", log=logged.append)
    assert torch.get_num_threads() == threads
    assert logged == ["distill: path=linear D=3.0 sigma=0.5", "distill: path=linear D=3.0 sigma=0.25",
                      "distill: path=ou D=3.0 sigma=0.5", "distill: path=ou D=3.0 sigma=0.25"]
    assert res["runs"] == [{"path": "linear", "t": 1.0, "width": 0.5}, {"path": "linear", "t": 1.0, "width": 0.25},
                           {"path": "ou", "t": 2.5, "width": 0.5}, {"path": "ou", "t": 2.5, "width": 0.25}]
    assert res["scaling"] == {"linear": {"t": 1.0}, "ou": {"t": 2.5}}
    assert res["settings"] == asdict(s) and res["plots"] == ["lipschitz.png", "segments.png"]
    assert (tmp_path / "out" / "report.md").read_text() == "R:settings,runs,scaling,plots"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["scaling"]["ou"] == {"t": 2.5}
    torch.manual_seed(8)
    assert drawn[0] == torch.rand(1).item()


def distill_runs():
    def run(path, ratio, one, gains):
        return {"path": path, "ratio": ratio, "times": [1.0, 0.25, 0.0], "L_bound": [1.0, 4.0, 2.0],
                "L_mean": [0.5, 2.0, 1.0], "Lambda_bound": [3.0, 1.0, 0.0], "Lambda_mean": [1.5, 0.5, 0.0],
                "L_bound_peak": 4.0, "L_bound_peak_time": 0.25, "L_mean_peak": 2.0, "L_max_peak": 3.0,
                "Lambda_total": {"bound": 3.0, "mean": 1.5, "max": 2.25},
                "errors": {"uniform": {1: {"end_to_end": one}, 2: {"end_to_end": one * 2}},
                           "lambda": {1: {"end_to_end": one}, 2: {"end_to_end": one * 2 * (1 - gains)}}},
                "lambda_gain": {1: 0.0, 2: gains}}
    return [run("linear", 4.0, 0.01, 0.25), run("linear", 8.0, 0.04, -0.1), run("ou", 4.0, 0.02, 0.5)]


def distill_results():
    s = asdict(tiny_distill(segments=(1, 2), separation=2.0, ou_end_time=4.0, width=64, depth=2, train_steps=500,
                            batch_size=256, seeds=1, n_test=2048))
    scaling = {"linear": {"exponents": {"L_peak": {"D": 2.0, "sigma": -3.0},
                                        "Lambda_total": {"D": 1.0, "sigma": -1.5}}},
               "ou": {"exponents": {"L_peak": {"D": 2.1, "sigma": -2.9}, "Lambda_total": {"D": 0.9, "sigma": -1.25}}}}
    return {"settings": s, "runs": distill_runs(), "scaling": scaling, "plots": ["lipschitz.png", "segments.png"]}


def test_distill_findings():
    assert D.findings(distill_results()) == [
        "linear: peak L bound ~ D^2.00 sigma^-3.00, Lambda(T) bound ~ D^1.00 sigma^-1.50.",
        "ou: peak L bound ~ D^2.10 sigma^-2.90, Lambda(T) bound ~ D^0.90 sigma^-1.25.",
        "linear: Lambda-grid gain at S=2: 25.0% at D/sigma=4, -10.0% at D/sigma=8.",
        "linear: one-segment error grows as (D/sigma)^2.00 (0.01 -> 0.04).",
        "ou: Lambda-grid gain at S=2: 50.0% at D/sigma=4.",
        "largest measured gain: 50.0% (ou, D/sigma=4, S=2); the paper reports up to 51.9% at S=8."]
    res = distill_results()
    res["runs"] = res["runs"][1::-1]  # the order of the runs does not matter
    assert D.findings(res)[2] == "linear: Lambda-grid gain at S=2: 25.0% at D/sigma=4, -10.0% at D/sigma=8."


def test_distill_findings_without_one_segment():
    """segments without S = 1 and two widths or more: the one-segment error's slope looked up S = 1 and raised a
    KeyError after the whole study; it is left out, as it is with one width."""
    res = distill_results()
    res["settings"]["segments"] = [2]
    for r in res["runs"]:
        for by_segments in r["errors"].values():
            del by_segments[1]
    assert D.findings(res) == [
        "linear: peak L bound ~ D^2.00 sigma^-3.00, Lambda(T) bound ~ D^1.00 sigma^-1.50.",
        "ou: peak L bound ~ D^2.10 sigma^-2.90, Lambda(T) bound ~ D^0.90 sigma^-1.25.",
        "linear: Lambda-grid gain at S=2: 25.0% at D/sigma=4, -10.0% at D/sigma=8.",
        "ou: Lambda-grid gain at S=2: 50.0% at D/sigma=4.",
        "largest measured gain: 50.0% (ou, D/sigma=4, S=2); the paper reports up to 51.9% at S=8."]
    assert "| linear | 8 | 0.08 | 0.088 |" in D.render_report(res)


def test_render_distill_report_exactly():
    text = D.render_report(distill_results())
    assert text == "\n".join([
        "# Flow-map distillation: error propagation and Lambda grids", "",
        "Two modes N(+-D/2 e1, sigma^2 I) in d = 2, D = 2.0; linear path t in [0, 1], OU path tau in [0, 4.0]. "
        "Teacher: dopri5 at tol 1e-8. Students: one residual MLP (width 64, depth 2) per segment, 500 steps of "
        "batch 256, 1 seed(s) averaged; error = E|student - teacher|^2 / E|teacher|^2 on 2048 held-out noise draws.",
        "",
        "## L(t) and Lambda", "",
        "| path | D/sigma | peak L bound | at t (tau on OU) | peak L measured (mean) | peak L measured (max) | "
        "Lambda(T) bound | Lambda(T) mean | Lambda(T) max |",
        "|---|---|---|---|---|---|---|---|---|",
        "| linear | 4 | 4 | 0.25 | 2 | 3 | 3 | 1.5 | 2.25 |",
        "| linear | 8 | 4 | 0.25 | 2 | 3 | 3 | 1.5 | 2.25 |",
        "| ou | 4 | 4 | 0.25 | 2 | 3 | 3 | 1.5 | 2.25 |", "",
        "Analytic scaling (bound, fitted log-log exponents at the largest D/sigma):", "",
        "| path | quantity | exponent in D | exponent in sigma |",
        "|---|---|---|---|",
        "| linear | L_peak | 2 | -3 |",
        "| linear | Lambda_total | 1 | -1.5 |",
        "| ou | L_peak | 2.1 | -2.9 |",
        "| ou | Lambda_total | 0.9 | -1.25 |", "",
        "## Students: end-to-end relative MSE, mean over 1 seed(s)", "",
        "| path | D/sigma | uniform S=1 | uniform S=2 | Lambda S=1 | Lambda S=2 |",
        "|---|---|---|---|---|---|",
        "| linear | 4 | 0.01 | 0.02 | 0.01 | 0.015 |",
        "| linear | 8 | 0.04 | 0.08 | 0.04 | 0.088 |",
        "| ou | 4 | 0.02 | 0.04 | 0.02 | 0.02 |", "",
        "## Lambda-grid gain over seeds", "",
        "gain = 1 - error(Lambda grid) / error(uniform grid), one per seed (seed r trains one student per grid on "
        "the same teacher data); negative means the Lambda grid is worse. S = 1 is left out: both grids are "
        "[T, 0]. One seed (n = 1): no interval; run with --seeds 2 or more for one.", "",
        "| path | D/sigma | gain S=2 |",
        "|---|---|---|",
        "| linear | 4 | 25.0% |",
        "| linear | 8 | -10.0% |",
        "| ou | 4 | 50.0% |", "",
        "## Reading", ""] + [f"- {n}" for n in D.findings(distill_results())] + [
        "", "Plots: ![lipschitz.png](lipschitz.png), ![segments.png](segments.png)", ""])


def test_plot_distill_lipschitz(monkeypatch, tmp_path):
    figs = Figures()
    monkeypatch.setattr(D, "save_figure", figs)
    runs = distill_runs()
    assert D.plot_lipschitz(runs, tmp_path) == "lipschitz.png"
    (fig, path), = figs.saved
    assert path == tmp_path / "lipschitz.png"
    assert len(fig.axes) == 4 and tuple(fig.get_size_inches()) == pytest.approx((8.5, 8.0))
    (a, b), (c, d) = fig.axes[:2], fig.axes[2:]
    assert lines(a) == [([1.0, 0.25], [1.0, 4.0], "bound D/sigma=4", "-", "None"),
                        ([1.0, 0.25], [0.5, 2.0], "measured mean D/sigma=4", "--", "None"),
                        ([1.0, 0.25], [1.0, 4.0], "bound D/sigma=8", "-", "None"),
                        ([1.0, 0.25], [0.5, 2.0], "measured mean D/sigma=8", "--", "None")]
    assert lines(b) == [([1.0, 0.25], [3.0, 1.0], "bound D/sigma=4", "-", "None"),
                        ([1.0, 0.25], [1.5, 0.5], "measured mean D/sigma=4", "--", "None"),
                        ([1.0, 0.25], [3.0, 1.0], "bound D/sigma=8", "-", "None"),
                        ([1.0, 0.25], [1.5, 0.5], "measured mean D/sigma=8", "--", "None")]
    colours = [[ln.get_color() for ln in ax.get_lines()] for ax in (a, b)]
    assert colours[0] == colours[1] and colours[0][0] == colours[0][1] != colours[0][2] == colours[0][3]
    assert [g[2] for g in lines(c)] == ["bound D/sigma=4", "measured mean D/sigma=4"]
    assert (a.get_title(), a.get_xlabel(), a.get_ylabel()) == ("linear path: L(t)", "t (0 = data)", "||dv/dx||")
    assert (b.get_title(), b.get_xlabel(), b.get_ylabel()) == ("linear path: Lambda(t)", "t (0 = data)",
                                                               "integral of L")
    assert (c.get_title(), d.get_title()) == ("ou path: L(tau)", "ou path: Lambda(tau)")
    assert c.get_xlabel() == d.get_xlabel() == "tau (0 = data)"  # the OU path's time (was labelled t)
    assert (a.get_xscale(), a.get_yscale(), b.get_xscale(), b.get_yscale()) == ("log", "log", "log", "linear")
    assert legend_texts(a)[1] == legend_texts(b)[1] == legend_texts(d)[1] == 6
    assert legend_texts(d)[0] == ["bound D/sigma=4", "measured mean D/sigma=4"]


def test_plot_distill_segments(monkeypatch, tmp_path):
    figs = Figures()
    monkeypatch.setattr(D, "save_figure", figs)
    runs = distill_runs()
    runs[0]["errors"]["uniform"] = {2: {"end_to_end": 0.02}, 1: {"end_to_end": 0.01}}
    assert D.plot_segments(runs, tmp_path) == "segments.png"
    (fig, path), = figs.saved
    assert path == tmp_path / "segments.png"
    assert len(fig.axes) == 3 and tuple(fig.get_size_inches()) == pytest.approx((3 * 3.2 + 0.5, 3.2))
    a = fig.axes[0]
    assert lines(a) == [([1.0, 2.0], [0.01, 0.02], "uniform", "-", "o"),
                        ([1.0, 2.0], [0.01, 0.015], "lambda", "--", "s")]
    assert (a.get_title(), a.get_xlabel(), a.get_ylabel()) == ("linear, D/sigma=4", "segments S", "end-to-end rel. MSE")
    assert fig.axes[2].get_title() == "ou, D/sigma=4"
    assert a.get_xscale() == a.get_yscale() == "log"
    assert legend_texts(a) == (["uniform", "lambda"], 7)


# ----- students ---------------------------------------------------------------------------------------
def test_residual_mlp_starts_as_the_identity_and_computes_its_formula():
    torch.manual_seed(0)
    net = S.ResidualMLP(3, width=5, depth=2)
    assert (net.inp.in_features, net.inp.out_features, net.out.in_features, net.out.out_features) == (3, 5, 5, 3)
    assert len(net.blocks) == 2
    for block in net.blocks:
        ln, l1, act, l2 = block
        assert isinstance(ln, torch.nn.LayerNorm) and ln.normalized_shape == (5,)
        assert (l1.in_features, l1.out_features, l2.in_features, l2.out_features) == (5, 5, 5, 5)
        assert isinstance(act, torch.nn.SiLU)
    assert len(S.ResidualMLP(2, 4, 3).blocks) == 3 and S.ResidualMLP(2).inp.out_features == 64
    assert len(S.ResidualMLP(2).blocks) == 2
    x = torch.randn(4, 3)
    assert torch.equal(net(x), x)
    assert (net.out.weight == 0).all() and (net.out.bias == 0).all()
    with torch.no_grad():
        net.out.weight.normal_()
        net.out.bias.normal_()
    h = net.inp(x)
    for block in net.blocks:
        ln, l1, _, l2 = block
        h = h + l2(torch.nn.functional.silu(l1(ln(h))))
    assert torch.allclose(net(x), x + net.out(torch.nn.functional.silu(h)), atol=1e-6)


def test_train_segment_fits_by_mse_on_random_batches(monkeypatch):
    captured = {}

    def fake_fit(model, batch_loss, cfg, description, device):
        captured.update(model=model, batch_loss=batch_loss, cfg=cfg, description=description, device=device)
        return "ema-model", []

    monkeypatch.setattr(S, "fit", fake_fit)
    from ddmkit.config import TrainConfig
    cfg = TrainConfig(steps=3, batch_size=4, seed=0, device="cpu")
    x = torch.randn(10, 2, dtype=F64)
    y = 2 * x + 1
    assert S.train_segment(x, y, cfg, 6, 3) == "ema-model"
    model = captured["model"]
    assert isinstance(model, S.ResidualMLP) and model.inp.out_features == 6 and len(model.blocks) == 3
    assert model.inp.in_features == 2
    assert captured["description"] == "student segment" and captured["device"] == torch.device("cpu")
    loss, metrics = captured["batch_loss"](model, 0, torch.Generator().manual_seed(5))
    idx = torch.randint(10, (4,), generator=torch.Generator().manual_seed(5))
    want = ((model(x[idx].float()) - y[idx].float()) ** 2).mean()
    assert metrics == {} and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.item() != pytest.approx(((x.float() - y.float()) ** 2).mean().item(), rel=1e-3)


def test_train_segment_learns_a_shift():
    from ddmkit.config import TrainConfig
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g, dtype=F64)
    y = x + torch.tensor([0.5, -0.25], dtype=F64)
    cfg = TrainConfig(steps=150, batch_size=64, lr=1e-2, warmup=10, ema_decay=0.9, seed=0, device="cpu",
                      log_every=10**9)
    f = S.train_segment(x, y, cfg, 16, 1)
    assert S.relative_mse(S.compose([f], x), y) < 0.01 * S.relative_mse(x, y)


def test_compose_and_relative_mse():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    y = S.compose([Scale(2.0), Scale(3.0)], x)
    assert y.dtype == F64 and torch.equal(y, 6 * x)
    assert torch.equal(S.compose([], x), x)

    class Affine(torch.nn.Module):
        def forward(self, z):
            assert z.dtype == torch.float32
            return z + 1

    assert torch.equal(S.compose([Affine(), Scale(2.0)], x), 2 * (x + 1))
    assert not S.compose([Scale(torch.nn.Parameter(torch.tensor(2.0)))], x).requires_grad
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert S.relative_mse(pred, target) == pytest.approx((1 + 4) / 2 / ((1 + 4) / 2))
    assert S.relative_mse(target * 1.5, target) == pytest.approx(0.25)
    assert isinstance(S.relative_mse(target, target), float)


# ----- report helpers ---------------------------------------------------------------------------------
def test_new_figure_and_slope_text():
    fig, axes = R.new_figure()
    assert axes.shape == (1, 1) and tuple(fig.get_size_inches()) == pytest.approx((4.5, 4.0))
    fig, axes = R.new_figure(3, 2, size=2.0)
    assert axes.shape == (2, 3) and tuple(fig.get_size_inches()) == pytest.approx((6.5, 4.0))
    import matplotlib
    assert matplotlib.get_backend().lower() == "agg"
    assert R.slope_text({"slope": -0.98765, "ci_low": -1.014, "ci_high": -0.951}) == "-0.99 [-1.01, -0.95]"


def test_save_figure_and_write_outputs(tmp_path):
    import matplotlib.pyplot as plt
    fig, axes = R.new_figure(1, 1, size=1.0)
    axes[0][0].plot([0, 1], [0, 1])
    assert R.save_figure(fig, tmp_path / "a.png") == "a.png"
    data = (tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (165, 110)  # 1.5 x 1 inches at 110 dpi
    assert not plt.fignum_exists(fig.number)
    (tmp_path / "o").mkdir()
    R.write_outputs(tmp_path / "o", "# report\n", {"a": [1, 2.5], "b": "x"})
    assert (tmp_path / "o" / "report.md").read_text() == "# report\n"
    assert json.loads((tmp_path / "o" / "results.json").read_text()) == {"a": [1, 2.5], "b": "x"}


# ----- paths, experts and fits: exact draws and limits ------------------------------------------------
def test_sample_noise_end_draws_the_exact_marginal_from_the_generator():
    gmm = D.two_modes(2.0, 0.5)
    x = get_path("linear").sample_noise_end(gmm, 5, torch.Generator().manual_seed(1))
    assert torch.equal(x, torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64))
    path = get_path("ou", 0.7)
    x = path.sample_noise_end(gmm, 5, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    x0 = gmm.sample(5, generator=g)
    alpha, sigma = math.exp(-0.7), math.sqrt(1 - math.exp(-1.4))
    assert torch.allclose(x, alpha * x0 + sigma * torch.randn(5, 2, generator=g, dtype=F64), atol=1e-12)
    assert x.shape == (5, 2) and x.dtype == F64


def test_get_path_limits():
    assert get_path("ou", 0.5).t_noise == 0.5 and get_path("ou").t_noise == 4.0
    assert get_path("linear", 3.0).t_noise == 1.0
    for bad in (0.0, -1.0, float("inf"), float("nan"), 10**400, "x", True):  # "x" was a TypeError
        with pytest.raises(DDMError, match=rf"^get_path: t_noise: {bad!r}; give a positive finite number \(the OU "
                           r"path's end time\), or None for 4$"):
            get_path("ou", bad)
        with pytest.raises(DDMError, match=r"^get_path: t_noise: "):  # the linear path took any value unchecked
            get_path("linear", bad)
    for bad in ("vp", ["ou"]):  # a list was a TypeError (unhashable)
        with pytest.raises(DDMError, match=rf"^get_path: name: {re.escape(repr(bad))}; give one of 'linear', 'ou'$"):
            get_path(bad)


def test_the_lipschitz_bound_needs_one_shared_isotropic_variance_to_1e9():
    path = get_path("linear")
    times = torch.tensor([0.5], dtype=F64)
    ok = GaussianMixture.from_covariances([1.0, 1.0], [[0.0, 0.0], [1.0, 0.0]], [0.25, 0.25 * (1 + 1e-11)])
    assert path.lipschitz_bound(ok, times).shape == (1,)
    for covs in ([0.25, 0.25 * (1 + 1e-7)], [1e-9, 2e-9], [[0.25, 0.5], [0.25, 0.5]]):
        gmm = GaussianMixture.from_covariances([1.0, 1.0], [[0.0, 0.0], [1.0, 0.0]], covs)
        with pytest.raises(DDMError, match="one shared isotropic covariance sigma\\^2 I"):
            path.lipschitz_bound(gmm, times)


def test_bootstrap_slope_against_an_independent_loop():
    rng = np.random.default_rng(0)
    x = np.array([4.0, 8.0, 16.0, 32.0])
    sq = (x[:, None] ** -0.5 * rng.standard_normal((4, 30))) ** 2
    sq[:, 0] *= 50  # a heavy first sample: leaving index 0 out of the draws shows
    fit = R.bootstrap_slope(x, sq, resamples=40, seed=3, level=0.8)
    draw = np.random.default_rng(3)
    slopes = []
    for _ in range(40):
        idx = draw.integers(0, 30, 30)
        slopes.append(np.polyfit(np.log(x), 0.5 * np.log(sq[:, idx].mean(1)), 1)[0])
    lo, hi = np.quantile(slopes, [0.1, 0.9])
    slope, intercept = np.polyfit(np.log(x), np.log(np.sqrt(sq.mean(1))), 1)
    assert fit == pytest.approx({"slope": slope, "intercept": intercept, "ci_low": lo, "ci_high": hi}, rel=1e-9)


def test_waves_and_perturbed_experts_follow_their_formulas():
    from ddmkit.theory.experts import Wave, cluster_groups, random_waves
    w = Wave(torch.tensor([0.6, 0.8], dtype=F64), torch.tensor([1.0, 0.0], dtype=F64), 0.5)
    x = torch.tensor([[0.25, 3.0], [1.0, -1.0]], dtype=F64)
    assert torch.allclose(w(x), torch.tensor([[0.6, 0.8]], dtype=F64) * torch.sin(x[:, :1] + 0.5))
    waves = random_waves(3, 2, seed=4)
    g = torch.Generator().manual_seed(4)
    for wave in waves:
        u, f = torch.randn(2, 2, generator=g, dtype=F64)
        assert torch.allclose(wave.direction, u / u.norm()) and torch.allclose(wave.frequency, f / f.norm())
        assert wave.phase == pytest.approx(float(torch.rand((), generator=g)) * 2 * math.pi)
    gmm = ring_mixture(4, 1.5, 0.3)
    experts = make_experts(gmm, [[0, 1], [2, 3]], 0.25, seed=4)
    t = torch.full((2,), 0.3, dtype=F64)
    for e, g_, wave in zip(experts, ([0, 1], [2, 3]), random_waves(2, 2, 4)):
        assert torch.allclose(e(x, t), gmm.subset(g_).velocity(x, t) + 0.25 * wave(x))
    assert cluster_groups(3, 3) == [[0], [1], [2]] and cluster_groups(3, 1) == [[0, 1, 2]]
    for bad in (0, 4):
        with pytest.raises(DDMError, match=rf"^cluster_groups: clusters: {bad}; give an integer between 1 and "
                                           r"components \(3\)$"):
            cluster_groups(3, bad)
    for bad in (0, -1, 2.5):  # 0 was told to give clusters "between 1 and components (0)"
        with pytest.raises(DDMError, match=rf"^cluster_groups: components: {bad}; give an integer >= 1$"):
            cluster_groups(bad, 1)


def test_cumulative_lambda_starts_at_zero_at_the_data_end():
    for times in (torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=F64), torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)):
        lam = cumulative_lambda(times, torch.full_like(times, 2.0))
        assert torch.allclose(lam, 2.0 * times)
    lam = cumulative_lambda(torch.tensor([0.75, 0.25], dtype=F64), torch.tensor([1.0, 3.0], dtype=F64))
    assert lam.tolist() == [1.75, 0.75]  # from 0, with L held at its smallest time's value (3) on [0, 0.25]


def test_convergence_findings_list_the_eps_samplers_in_one_order():
    """The eps-sweep statements came in the order of a set of strings, which changes between processes
    (hash seed): two runs with one seed wrote reports that differed."""
    res = report_results()
    rows = [r for r in res["eps_sweep"] if r["value"] > 0 and r["sampler"] == "euler:full"]
    res["eps_sweep"] = res["eps_sweep"] + [dict(r, sampler=name) for name in ("heun:top-2", "euler:switch", "a:b")
                                           for r in rows]
    said = [n.split(":")[0] + ":" + n.split(":")[1].split(" ")[0] for n in C.findings(res) if "against eps" in n]
    assert said == sorted(said) and len(said) == 4


def test_the_report_names_the_n_the_slopes_are_fitted_on_where_fit_range_fits_every_n():
    """steps (4, 8) with fit_min_steps 8: one N reaches it, so the slopes are fitted on every N (fit_range); the
    report said "N >= 8" in its header and under the common-noise table."""
    results = report_results()
    results["settings"]["fit_min_steps"] = 8
    text = C.render_report(results)
    assert "least squares on log-log over N >= 4," in text and "N >= 8" not in text
    assert C.fit_start({"steps": [4, 8, 16, 32, 64], "fit_min_steps": 10}) == 16
