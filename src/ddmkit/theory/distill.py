"""`ddmkit theory distill`: how flow-map distillation errors grow with stiffness.

Setting: two modes N(+-D/2 e_1, sigma^2 I) in d = 2, on ddmkit's linear path
and on the OU path (theory/paths.py). For each (path, sigma):

1. teacher trajectories (adaptive dopri5, tol 1e-8) from exact noise-end samples;
2. L(t): the analytic bound sup_x ||dv/dx|| and the measured spectral norm of
   the closed-form Jacobian along the trajectories (mean and max); Lambda(t);
3. grids with S segments, uniform in t and uniform in Lambda (measured mean L);
4. one residual-MLP student per segment (theory/students.py), trained on
   teacher pairs; end-to-end relative MSE of the composed students against
   the teacher's final states on held-out noise;
5. with `seeds` > 1, seed r trains one student per grid on the same teacher
   data, so each seed gives one gain 1 - err(Lambda) / err(uniform); the report
   gives their mean and a 95% t-interval over the seeds.

A second, training-free table gives the analytic scaling of the peak of L and
of Lambda(T) in D and sigma, with fitted log-log exponents.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from ddmkit.config import TrainConfig
from ddmkit.theory.paths import PATHS, FlowPath, get_path
from ddmkit.theory.report import (check_settings, excludes_zero, is_number, loglog_slope, markdown_table, new_figure,
                                  save_figure, setting_error, t_interval, value_error, write_outputs)
from ddmkit.theory.stability import (cumulative_lambda, lambda_uniform_grid, measured_lipschitz, report_times,
                                     teacher_solve, uniform_grid)
from ddmkit.theory.students import compose, relative_mse, train_segment
from ddmkit.truth import GaussianMixture
from ddmkit.train.threads import job_threads

GRID_KINDS = ("uniform", "lambda")


@dataclass(frozen=True)
class DistillSettings:
    paths: tuple[str, ...] = ("linear", "ou")
    ou_end_time: float = 4.0
    separation: float = 2.0  # D
    widths: tuple[float, ...] = (0.5, 0.25, 0.125)  # sigma; D / sigma = 4, 8, 16
    segments: tuple[int, ...] = (1, 2, 4, 8)
    lipschitz_trajectories: int = 256
    lipschitz_times: int = 121
    n_train: int = 8192
    n_test: int = 2048
    train_steps: int = 500
    batch_size: int = 256
    lr: float = 3e-3
    width: int = 64
    depth: int = 2
    seeds: int = 1  # students trained per grid (seeds seed, seed + 1, ...): errors averaged, gains get t-intervals
    scaling_separations: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    scaling_widths: tuple[float, ...] = (0.4, 0.2, 0.1, 0.05)
    seed: int = 0

    @staticmethod
    def quick(seed: int = 0) -> "DistillSettings":
        return DistillSettings(widths=(0.25,), segments=(1, 2, 4), lipschitz_trajectories=64, lipschitz_times=61,
                               n_train=2048, n_test=512, train_steps=150, seeds=1, seed=seed)


def two_modes(separation: float, width: float, dim: int = 2) -> GaussianMixture:
    """N(+-D/2 e_1, sigma^2 I) with equal weights."""
    for name, value in (("separation", separation), ("width", width)):
        if not is_number(value, "positive"):
            raise value_error(f"two_modes: {name}", value, "a positive finite number")
    means = np.zeros((2, dim))
    means[:, 0] = [-separation / 2, separation / 2]
    return GaussianMixture.from_covariances([1.0, 1.0], means, [width**2, width**2])


# ----- stability profile -----------------------------------------------------
def stability_profile(path: FlowPath, gmm: GaussianMixture, s: DistillSettings, generator) -> dict:
    """L(t) (bound, measured mean and max) and Lambda(t) on a grid dense near the data end."""
    times = report_times(path, s.lipschitz_times)
    x = path.sample_noise_end(gmm, s.lipschitz_trajectories, generator)
    measured = measured_lipschitz(path, gmm, teacher_solve(path, gmm, x, times), times)
    bound = path.lipschitz_bound(gmm, times)
    return {"times": times, "bound": bound, "mean": measured["mean"], "max": measured["max"],
            "lambda_bound": lambda_of_bound(path, gmm, s.lipschitz_times),
            "lambda_mean": cumulative_lambda(times, measured["mean"]),
            "lambda_max": cumulative_lambda(times, measured["max"])}


def lambda_of_bound(path: FlowPath, gmm: GaussianMixture, points: int, refine: int = 40) -> torch.Tensor:
    """Lambda of the bound L on report_times(path, points), integrated on a grid `refine` times finer that
    holds those times: the bound is cheap, and on the OU path so steep near the data end (L(0) = 4033 at
    D / sigma = 16) that the trapezoid on the report's grid overstates Lambda(T) (30.5 at 121 points
    against 30.1)."""
    fine = report_times(path, (points - 1) * refine + 1)
    return cumulative_lambda(fine, path.lipschitz_bound(gmm, fine))[::refine]


def make_grids(path: FlowPath, profile: dict, segments: tuple[int, ...]) -> dict:
    """{kind: {S: decreasing grid}} for the uniform and the Lambda-uniform grids."""
    return {"uniform": {n: uniform_grid(path, n) for n in segments},
            "lambda": {n: lambda_uniform_grid(profile["times"], profile["lambda_mean"], n) for n in segments}}


# ----- teacher data and students ----------------------------------------------
def union_times(grids: dict) -> torch.Tensor:
    """All grid times, decreasing, with near-duplicates (1e-12) merged."""
    every = torch.cat([g for by_n in grids.values() for g in by_n.values()]).sort(descending=True).values
    keep = torch.cat([torch.tensor([True]), (every[:-1] - every[1:]) > 1e-12])
    return every[keep]


def states_at(grid: torch.Tensor, times: torch.Tensor, states: torch.Tensor) -> list[torch.Tensor]:
    """The teacher states (B, d) at each grid time, looked up in (times, states)."""
    return [states[int((times - t).abs().argmin())] for t in grid]


def student_train(s: DistillSettings, seed: int) -> TrainConfig:
    """The training settings of the students of one seed (TrainConfig holds their limits)."""
    return TrainConfig(steps=s.train_steps, batch_size=s.batch_size, lr=s.lr, warmup=min(50, s.train_steps // 5),
                       ema_decay=0.95, seed=seed, device="cpu", log_every=10**9)


STUDENT_FIELDS = {"steps": "train_steps", "batch_size": "batch_size", "lr": "lr", "seed": "seed"}  # TrainConfig's


def check_student_train(s: DistillSettings) -> None:
    """student_train of the last student seed (seed + seeds - 1), before the study starts: a value TrainConfig
    refuses is a DDMError naming the DistillSettings field and TrainConfig's limit."""
    try:
        student_train(s, s.seed + s.seeds - 1)
    except ValidationError as e:
        error = e.errors()[0]
        name = error["loc"][0]
        seeds = " for every student seed, seed .. seed + seeds - 1" if name == "seed" else ""
        raise setting_error(s, STUDENT_FIELDS[name], f"a value TrainConfig.{name} accepts{seeds} "
                                                     f"({error['msg'].lower()})") from None


def student_errors(grid: torch.Tensor, times, train_states, test_states, s: DistillSettings, seed: int) -> dict:
    """Train one map per segment of grid; end-to-end and per-segment errors on held-out noise."""
    train, test = states_at(grid, times, train_states), states_at(grid, times, test_states)
    cfg = student_train(s, seed)
    maps = [train_segment(train[i], train[i + 1], cfg, s.width, s.depth) for i in range(len(grid) - 1)]
    local = [relative_mse(compose([f], test[i]), test[i + 1]) for i, f in enumerate(maps)]
    return {"end_to_end": relative_mse(compose(maps, test[0]), test[-1]), "local": local}


def distill_setting(path: FlowPath, width: float, s: DistillSettings) -> dict:
    """Everything measured for one path and one mode width."""
    gmm = two_modes(s.separation, width)
    generator = torch.Generator().manual_seed(s.seed)
    profile = stability_profile(path, gmm, s, generator)
    grids = make_grids(path, profile, s.segments)
    times = union_times(grids)
    train_states = teacher_solve(path, gmm, path.sample_noise_end(gmm, s.n_train, generator), times)
    test_states = teacher_solve(path, gmm, path.sample_noise_end(gmm, s.n_test, generator), times)
    errors: dict = {kind: {} for kind in GRID_KINDS}
    for n in s.segments:
        for kind in GRID_KINDS:
            if kind != "uniform" and n == 1:  # one segment: both grids are [T, 0]
                errors[kind][n] = errors["uniform"][n]
                continue
            runs = [student_errors(grids[kind][n], times, train_states, test_states, s, s.seed + r)
                    for r in range(s.seeds)]
            errors[kind][n] = {"end_to_end": float(np.mean([r["end_to_end"] for r in runs])),
                               "end_to_end_runs": [r["end_to_end"] for r in runs],
                               "local": np.mean([r["local"] for r in runs], 0).tolist()}
    peak = int(profile["bound"].argmax())
    return {"path": path.name, "separation": s.separation, "width": width, "ratio": s.separation / width,
            "times": profile["times"].tolist(),
            "L_bound": profile["bound"].tolist(), "L_mean": profile["mean"].tolist(), "L_max": profile["max"].tolist(),
            "Lambda_bound": profile["lambda_bound"].tolist(), "Lambda_mean": profile["lambda_mean"].tolist(),
            "Lambda_max": profile["lambda_max"].tolist(),
            "L_bound_peak": float(profile["bound"][peak]), "L_bound_peak_time": float(profile["times"][peak]),
            "L_mean_peak": float(profile["mean"].max()), "L_max_peak": float(profile["max"].max()),
            "Lambda_total": {k: float(profile[f"lambda_{k}"][0]) for k in ("bound", "mean", "max")},
            "grids": {kind: {n: g.tolist() for n, g in by_n.items()} for kind, by_n in grids.items()},
            "errors": errors,
            "lambda_gain": {n: lambda_gain(errors, n) for n in s.segments},
            "gain_over_seeds": {n: gain_over_seeds(errors, n) for n in s.segments}}


def lambda_gain(errors: dict, segments: int) -> float:
    """1 - error(Lambda grid) / error(uniform grid) of the seed-averaged errors: the share of error the
    Lambda grid removes."""
    return 1.0 - errors["lambda"][segments]["end_to_end"] / errors["uniform"][segments]["end_to_end"]


def seed_gains(errors: dict, segments: int) -> list[float]:
    """One gain per student seed, 1 - err_r(Lambda grid) / err_r(uniform grid): seed r trains one student per
    grid on the same teacher data. Errors without per-seed runs count as one seed."""
    def runs(kind: str) -> list[float]:
        entry = errors[kind][segments]
        return entry.get("end_to_end_runs", [entry["end_to_end"]])

    return [1.0 - lam / uni for lam, uni in zip(runs("lambda"), runs("uniform"), strict=True)]


def gain_over_seeds(errors: dict, segments: int) -> dict:
    """Mean of the per-seed gains with a 95% t-interval (none for one seed), and the gains themselves."""
    gains = seed_gains(errors, segments)
    return {**t_interval(gains), "runs": gains}


def gain_text(interval: dict) -> str:
    """'48.5% [30.1%, 66.9%]', or '48.5%' without an interval."""
    text = f"{100 * interval['mean']:.1f}%"
    if interval["ci_low"] is None:
        return text
    return f"{text} [{100 * interval['ci_low']:.1f}%, {100 * interval['ci_high']:.1f}%]"


# ----- analytic scaling ------------------------------------------------------
def analytic_scaling(path: FlowPath, s: DistillSettings) -> dict:
    """Peak of the bound L(t) and Lambda_bound(T) over the grid of (D, sigma), with
    fitted exponents: L_peak ~ D^p sigma^q, Lambda(T) ~ D^p sigma^q (fitted on the
    largest D / sigma, where the separation term dominates)."""
    times = report_times(path, 4001)
    rows = []
    for d in s.scaling_separations:
        for w in s.scaling_widths:
            bound = path.lipschitz_bound(two_modes(d, w), times)
            rows.append({"D": d, "sigma": w, "L_peak": float(bound.max()),
                         "Lambda_total": float(cumulative_lambda(times, bound)[0])})
    dmax, wmin = max(s.scaling_separations), min(s.scaling_widths)
    along_d = [r for r in rows if r["sigma"] == wmin]
    along_w = [r for r in rows if r["D"] == dmax]
    exponents = {}
    for key in ("L_peak", "Lambda_total"):
        exponents[key] = {"D": loglog_slope([r["D"] for r in along_d], [r[key] for r in along_d])[0],
                          "sigma": loglog_slope([r["sigma"] for r in along_w], [r[key] for r in along_w])[0]}
    return {"rows": rows, "exponents": exponents}


# ----- the study -------------------------------------------------------------
@job_threads(1)  # many small tensors: one thread is faster and leaves the other cores alone
def run_distill(s: DistillSettings, out: Path, log=print) -> dict:
    """Run the study and write report.md, results.json and the plots into out."""
    # lipschitz_times >= 3: on two report times Lambda is linear in t, so the Lambda grid is the uniform grid;
    # the scaling exponents are log-log slopes over the scaling lists; one width leaves out the slope in D/sigma;
    # a repeated S would repeat the report's columns, a repeated path its rows
    check_settings(s, counts={"segments": 1, "lipschitz_trajectories": 1, "lipschitz_times": 3, "n_train": 1,
                              "n_test": 1, "train_steps": 1, "batch_size": 1, "width": 1, "depth": 0, "seeds": 1,
                              "seed": 0},
                   numbers={"ou_end_time": "positive", "separation": "positive", "widths": "positive",
                            "lr": "positive", "scaling_separations": "positive", "scaling_widths": "positive"},
                   lists=("paths", "widths", "segments", "scaling_separations", "scaling_widths"),
                   distinct={"paths": 1, "widths": 1, "segments": 1, "scaling_separations": 2, "scaling_widths": 2})
    if max(s.segments) < 2:
        raise setting_error(s, "segments", "at least one S >= 2, e.g. (1, 2, 4) (with S = 1 both grids are [T, 0], "
                                           "so there is no gain to measure)")
    if not set(s.paths) <= set(PATHS):
        raise setting_error(s, "paths", f"path names among {', '.join(map(repr, PATHS))}")
    check_student_train(s)  # lr, batch_size, train_steps and seed within TrainConfig's limits
    torch.manual_seed(s.seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = [get_path(name, s.ou_end_time) for name in s.paths]
    settings = []
    for path in paths:
        for width in s.widths:
            log(f"distill: path={path.name} D={s.separation} sigma={width}")
            settings.append(distill_setting(path, width, s))
    scaling = {path.name: analytic_scaling(path, s) for path in paths}
    results = {"settings": asdict(s), "runs": settings, "scaling": scaling}
    results["plots"] = [plot_lipschitz(settings, out), plot_segments(settings, out)]
    write_outputs(out, render_report(results), results)
    return results


def plot_lipschitz(runs: list[dict], out: Path) -> str:
    fig, axes = new_figure(2, len({r["path"] for r in runs}))
    for row, name in enumerate(sorted({r["path"] for r in runs})):
        for r in (r for r in runs if r["path"] == name):
            t = np.asarray(r["times"])
            label = f"D/sigma={r['ratio']:g}"
            line = axes[row][0].loglog(t[t > 0], np.asarray(r["L_bound"])[t > 0], label=f"bound {label}")[0]
            axes[row][0].loglog(t[t > 0], np.asarray(r["L_mean"])[t > 0], "--", color=line.get_color(),
                                label=f"measured mean {label}")
            axes[row][1].semilogx(t[t > 0], np.asarray(r["Lambda_bound"])[t > 0], color=line.get_color(),
                                  label=f"bound {label}")
            axes[row][1].semilogx(t[t > 0], np.asarray(r["Lambda_mean"])[t > 0], "--", color=line.get_color(),
                                  label=f"measured mean {label}")
        time = "tau" if name == "ou" else "t"  # the OU path runs over tau in [0, T]
        axes[row][0].set(title=f"{name} path: L({time})", xlabel=f"{time} (0 = data)", ylabel="||dv/dx||")
        axes[row][1].set(title=f"{name} path: Lambda({time})", xlabel=f"{time} (0 = data)", ylabel="integral of L")
        axes[row][0].legend(fontsize=6)
        axes[row][1].legend(fontsize=6)
    return save_figure(fig, out / "lipschitz.png")


def plot_segments(runs: list[dict], out: Path) -> str:
    fig, axes = new_figure(len(runs), 1, size=3.2)
    for ax, r in zip(axes[0], runs):
        for kind, style in (("uniform", "o-"), ("lambda", "s--")):
            n = sorted(r["errors"][kind], key=int)
            ax.loglog([int(k) for k in n], [r["errors"][kind][k]["end_to_end"] for k in n], style, label=kind)
        segments = sorted({int(k) for k in r["errors"]["uniform"]})
        ax.set_xticks(segments, [str(k) for k in segments])  # S itself, not log ticks that overlap in a narrow panel
        ax.set_xticks([], minor=True)
        ax.set(title=f"{r['path']}, D/sigma={r['ratio']:g}", xlabel="segments S", ylabel="end-to-end rel. MSE")
        ax.legend(fontsize=7)
    return save_figure(fig, out / "segments.png")


def render_report(results: dict) -> str:
    s, runs = results["settings"], results["runs"]
    segments = s["segments"]
    lines = ["# Flow-map distillation: error propagation and Lambda grids", "",
             f"Two modes N(+-D/2 e1, sigma^2 I) in d = 2, D = {s['separation']}; linear path t in [0, 1], "
             f"OU path tau in [0, {s['ou_end_time']}]. Teacher: dopri5 at tol 1e-8. Students: one residual MLP "
             f"(width {s['width']}, depth {s['depth']}) per segment, {s['train_steps']} steps of batch "
             f"{s['batch_size']}, {s['seeds']} seed(s) averaged; error = E|student - teacher|^2 / E|teacher|^2 "
             f"on {s['n_test']} held-out noise draws.", "",
             "## L(t) and Lambda", "",
             markdown_table(["path", "D/sigma", "peak L bound", "at t (tau on OU)", "peak L measured (mean)",
                             "peak L measured (max)", "Lambda(T) bound", "Lambda(T) mean", "Lambda(T) max"],
                            [[r["path"], r["ratio"], r["L_bound_peak"], r["L_bound_peak_time"], r["L_mean_peak"],
                              r["L_max_peak"], r["Lambda_total"]["bound"], r["Lambda_total"]["mean"],
                              r["Lambda_total"]["max"]] for r in runs]), "",
             "Analytic scaling (bound, fitted log-log exponents at the largest D/sigma):", "",
             markdown_table(["path", "quantity", "exponent in D", "exponent in sigma"],
                            [[name, key, e["D"], e["sigma"]] for name, sc in results["scaling"].items()
                             for key, e in sc["exponents"].items()]), "",
             f"## Students: end-to-end relative MSE, mean over {s['seeds']} seed(s)", "",
             markdown_table(["path", "D/sigma"] + [f"uniform S={n}" for n in segments]
                            + [f"Lambda S={n}" for n in segments],
                            [[r["path"], r["ratio"]] + [r["errors"]["uniform"][n]["end_to_end"] for n in segments]
                             + [r["errors"]["lambda"][n]["end_to_end"] for n in segments] for r in runs]), "",
             "## Lambda-grid gain over seeds", "", gain_caption(s["seeds"]), "",
             markdown_table(["path", "D/sigma"] + [f"gain S={n}" for n in segments if n > 1],
                            [[r["path"], r["ratio"]] + [gain_text(gain_over_seeds(r["errors"], n))
                                                        for n in segments if n > 1] for r in runs]), "",
             "## Reading", ""] + [f"- {line}" for line in findings(results)] + ["",
             "Plots: " + ", ".join(f"![{p}]({p})" for p in results["plots"]), ""]
    return "\n".join(lines)


def gain_caption(seeds: int) -> str:
    """What the gain table holds, for `seeds` students per grid."""
    head = ("gain = 1 - error(Lambda grid) / error(uniform grid), one per seed (seed r trains one student per grid "
            "on the same teacher data); negative means the Lambda grid is worse. S = 1 is left out: both grids "
            "are [T, 0].")
    if seeds < 2:
        return f"{head} One seed (n = 1): no interval; run with --seeds 2 or more for one."
    return (f"{head} Mean over n = {seeds} seeds [95% t-interval: mean +- t(0.975, {seeds - 1}) sd / sqrt({seeds})]; "
            "an interval that excludes 0 marks a gain distinguishable from zero.")


def zero_verdicts(runs: list[dict], segments) -> str:
    """Which gains (S > 1) of these runs have a 95% interval above 0, below 0, or containing 0."""
    groups: dict[str, list[str]] = {"above 0": [], "below 0": [], "containing 0": []}
    for r in sorted(runs, key=lambda r: r["ratio"]):
        for n in (n for n in segments if n > 1):
            interval = gain_over_seeds(r["errors"], n)
            key = ("containing 0" if not excludes_zero(interval) else
                   "above 0" if interval["ci_low"] > 0 else "below 0")
            groups[key].append(f"D/sigma={r['ratio']:g} S={n}")
    return "; ".join(f"interval {key} at {', '.join(where)}" for key, where in groups.items() if where)


def findings(results: dict) -> list[str]:
    """Plain statements of what the numbers show, computed from them."""
    runs, segments = results["runs"], results["settings"]["segments"]
    notes = []
    for name, sc in results["scaling"].items():
        e = sc["exponents"]
        notes.append(f"{name}: peak L bound ~ D^{e['L_peak']['D']:.2f} sigma^{e['L_peak']['sigma']:.2f}, "
                     f"Lambda(T) bound ~ D^{e['Lambda_total']['D']:.2f} sigma^{e['Lambda_total']['sigma']:.2f}.")
    last, seeds = max(segments), results["settings"]["seeds"]
    over = f", mean [95% t-interval] over {seeds} seeds" if seeds > 1 else ""
    for name in sorted({r["path"] for r in runs}):
        mine = sorted((r for r in runs if r["path"] == name), key=lambda r: r["ratio"])
        gains = ", ".join(f"{gain_text(gain_over_seeds(r['errors'], last))} at D/sigma={r['ratio']:g}" for r in mine)
        notes.append(f"{name}: Lambda-grid gain at S={last}{over}: {gains}.")
        if seeds > 1:
            notes.append(f"{name}: {zero_verdicts(mine, segments)}.")
        if len(mine) > 1 and 1 in segments:  # the one-segment error's slope in D/sigma
            one = [r["errors"]["uniform"][1]["end_to_end"] for r in mine]
            slope = loglog_slope([r["ratio"] for r in mine], one)[0]
            notes.append(f"{name}: one-segment error grows as (D/sigma)^{slope:.2f} "
                         f"({one[0]:.3g} -> {one[-1]:.3g}).")
    best = max(((gain_over_seeds(r["errors"], n), r, n) for r in runs for n in segments), key=lambda g: g[0]["mean"])
    notes.append(f"largest measured gain: {gain_text(best[0])} ({best[1]['path']}, D/sigma={best[1]['ratio']:g}, "
                 f"S={best[2]}); the paper reports up to 51.9% at S=8.")
    return notes
