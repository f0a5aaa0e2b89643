"""The misalignment study's summary and report: per condition and strategy the mean over seeds with a
95% t-interval across seeds (and over samples where a metric has bootstrap replicates), full routing
against the best other strategy paired per seed, the verdict, report.md and the quality-vs-stability
plot, for Gaussian-mixture studies (NLL, W2, field error) and image studies (FID, KID).
The study itself is ddmkit.pipeline.misalignment."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ddmkit.analysis.misalignment import Condition
from ddmkit.analysis.quality import spearman
from ddmkit.evaluation.plots import pyplot, save_figure
from ddmkit.pipeline.sweep import interval
from ddmkit.tables import fmt, markdown_table

METRICS = (("NLL", "nll"), ("W2", "w2"), ("L_top", "L_top"), ("amplification", "amp"),
           ("Delta_refine", "delta_refine"), ("field error", "field_error"))
IMAGE_METRICS = (("FID", "fid"), ("KID", "kid"), ("amplification", "amp"), ("Delta_refine", "delta_refine"))
MECHANISM = {False: ("router_tv_mean", "expert_error_mean"), True: ("expert_own_mean", "expert_other_mean")}
QUALITY = {False: ("nll", "w2"), True: ("fid", "kid")}


# ----- summary ------------------------------------------------------------------------------------------------------
def cell_summary(values: list[float], boots: list[list[float]] | None, normal: bool = False) -> dict:
    """Mean over seeds, 95% t-interval across seeds ("seeds") and 95% interval of the seed-mean over
    bootstrap resamples of the samples ("samples"; replicate i averaged over seeds): percentile, or with
    normal=True mean +- 1.96 sd of the replicates (for W2, which resampling with replacement biases
    upwards: duplicated points lie at distance 0 from each other)."""
    out = {"seeds": interval(values)}
    out["mean"] = out["seeds"]["mean"]
    if boots:
        rep = np.mean(np.asarray(boots, dtype=float), 0)
        if normal:
            half = 1.96 * float(rep.std(ddof=1))
            out["samples"] = {"lo": out["mean"] - half, "hi": out["mean"] + half}
        else:
            lo, hi = np.quantile(rep, [0.025, 0.975])
            out["samples"] = {"lo": float(lo), "hi": float(hi)}
    return out


def full_vs_best(measures: list[dict], strategies: list[str], metric: str, best: str) -> dict:
    """Paired difference full - best (the other strategy with the lowest mean) of a quality metric: per seed
    ("per_seed"), with the 95% t-interval across seeds and, where the metric has bootstrap replicates, the
    bootstrap interval over samples (paired resamples; FID and KID have none)."""
    diffs = [m["strategies"]["full"]["value"][metric] - m["strategies"][best]["value"][metric] for m in measures]
    boots = None
    if all(metric in m["strategies"]["full"]["boot"] for m in measures):
        boots = [np.subtract(m["strategies"]["full"]["boot"][metric], m["strategies"][best]["boot"][metric])
                 for m in measures]
    out = {"against": best, **cell_summary(diffs, boots, normal=metric == "w2")}
    return out if boots else {**out, "per_seed": diffs}


def decided(d: dict) -> str:
    """'worse' or 'better' where every interval (across seeds when there are several; over samples) lies
    above or below 0, else 'no clear difference'. Every seed samples from the same noise, so the
    across-seeds interval holds training variation only and the samples interval the rest."""
    cis = ([d["seeds"]] if d["seeds"]["n"] > 1 else []) + ([d["samples"]] if "samples" in d else [])
    if cis and all(ci["lo"] > 0 for ci in cis):
        return "worse"
    if cis and all(ci["hi"] < 0 for ci in cis):
        return "better"
    return "no clear difference"


def condition_verdict(table: dict, strategies: list[str], quality: dict) -> str:
    """The dissociation in words for one condition: is full the most stable (lowest Delta_refine) and does
    it generate worse than the best other strategy by W2? (Per-sample NLL is not a distance between
    distributions: samples piled on the modes score best, so it is reported beside W2, not decided on.)"""
    stable = {m: min(strategies, key=lambda s: table[s][m]["mean"]) for m in ("delta_refine", "amp")}
    words = {m: decided(d) for m, d in quality.items()}
    most_stable, w2 = stable["delta_refine"] == "full", words["w2"]
    where = (f"most stable by Delta_refine: {stable['delta_refine']}, by amplification: {stable['amp']}; "
             f"full vs the best other by W2: {w2}, by NLL: {words['nll']}")
    if most_stable and w2 == "worse":
        return f"reproduced ({where})"
    if most_stable and w2 == "better":
        return f"contradicted: full is the most stable and also generates better ({where})"
    if most_stable:
        return f"not reproduced: full is the most stable, its W2 no different ({where})"
    if w2 == "worse":
        return f"not reproduced: full generates worse but is not the most stable ({where})"
    return f"not reproduced ({where})"


def fid_word(d: dict) -> str:
    """full - best by FID on images: 'worse' ('better') where the 95% t-interval across seeds lies above
    (below) 0, 'no clear difference' where it holds 0, 'one seed: no interval' with one seed (FID is one
    number per sample set: there is no interval over samples)."""
    if d["seeds"]["n"] < 2:
        return "one seed: no interval"
    if d["seeds"]["lo"] > 0:
        return "worse"
    if d["seeds"]["hi"] < 0:
        return "better"
    return "no clear difference"


def image_verdict(table: dict, strategies: list[str], quality: dict) -> str:
    """The dissociation on images: "reproduced" when full has the lowest Delta_refine of the strategies and an
    FID worse than the best other strategy's, the across-seed interval of the paired difference excluding 0."""
    stable = {m: min(strategies, key=lambda s: table[s][m]["mean"]) for m in ("delta_refine", "amp")}
    word = fid_word(quality["fid"])
    where = (f"most stable by Delta_refine: {stable['delta_refine']}, by amplification: {stable['amp']}; "
             f"full vs the best other by FID: {word}")
    if stable["delta_refine"] != "full":
        if word == "worse":
            return f"not reproduced: full generates worse but is not the most stable ({where})"
        return f"not reproduced: full is not the most stable ({where})"
    if word == "worse":
        return f"reproduced ({where})"
    if word == "better":
        return f"contradicted: full is the most stable and also generates better ({where})"
    if word == "one seed: no interval":
        return f"one seed: no interval ({where})"
    return f"not reproduced: full is the most stable, its FID no different ({where})"


def summarize(measures: dict[str, list[dict]], parsed: dict[str, Condition], strategies: list[str],
              seeds: list[int], images: bool = False) -> dict:
    """Per condition and strategy every metric's mean and intervals (images: also the per-seed values);
    per condition the mechanism, the paired full-vs-best quality differences and the verdict; across all
    cells the rank correlations of quality (NLL, W2; images: FID, KID) with the stability measures (and
    the field error)."""
    metrics = IMAGE_METRICS if images else METRICS
    out: dict = {"conditions": {}, "condition_names": list(measures), "strategies": strategies, "seeds": seeds}
    cells = []
    for name, ms in measures.items():
        table = {}
        for strat in strategies:
            table[strat] = {}
            for _, key in metrics:
                values = [m["strategies"][strat]["value"][key] for m in ms]
                boots = [m["strategies"][strat]["boot"][key] for m in ms] if key in ms[0]["strategies"][strat]["boot"] \
                    else None
                table[strat][key] = cell_summary(values, boots, normal=key == "w2")
                if images:
                    table[strat][key]["per_seed"] = values
            cells.append({k: table[strat][k]["mean"] for _, k in metrics})
        mech = {k: interval([m["mechanism"][k] for m in ms]) for k in MECHANISM[images]}
        quality = {}
        if "full" in strategies and len(strategies) > 1:
            for metric in QUALITY[images]:
                best = min((s for s in strategies if s != "full"), key=lambda s: table[s][metric]["mean"])
                quality[metric] = full_vs_best(ms, strategies, metric, best)
        judge = image_verdict if images else condition_verdict
        out["conditions"][name] = {"trained": parsed[name].trained, "seeds": [m["seed"] for m in ms],
                                   "table": table, "mechanism": mech, "full_vs_best": quality,
                                   "verdict": judge(table, strategies, quality) if quality else
                                   "needs full and another strategy"}
    against = ("delta_refine", "amp") if images else ("field_error", "delta_refine", "amp", "L_top")
    out["links"] = {f"{q}_vs_{x}": spearman([c[x] for c in cells], [c[q] for c in cells])
                    for q in QUALITY[images] for x in against}
    return out


# ----- report -------------------------------------------------------------------------------------------------------
def cell_text(c: dict) -> str:
    """'mean [seeds lo, hi] (samples lo, hi)'; either interval left out where there is none."""
    text = fmt(c["mean"])
    if c["seeds"]["n"] > 1:
        text += f" [{fmt(c['seeds']['lo'], 3)}, {fmt(c['seeds']['hi'], 3)}]"
    if "samples" in c:
        text += f" ({fmt(c['samples']['lo'], 3)}, {fmt(c['samples']['hi'], 3)})"
    return text


def not_measured(report: dict) -> str:
    """A line naming the condition and seed pairs the report leaves out (a report of the measurements kept,
    --stages report), or nothing."""
    missing = report.get("not_measured") or []
    return f"**Not measured, left out of this report:** {', '.join(missing)}.\n" if missing else ""


def render(report: dict) -> str:
    st = report["settings"]
    rows = []
    for name, c in report["conditions"].items():
        for strat in report["strategies"]:
            rows.append([name, strat, len(c["seeds"])] + [cell_text(c["table"][strat][k]) for _, k in METRICS])
    mech = [[name, len(c["seeds"]), cell_text({"mean": c["mechanism"]["router_tv_mean"]["mean"],
                                               "seeds": c["mechanism"]["router_tv_mean"]}),
             cell_text({"mean": c["mechanism"]["expert_error_mean"]["mean"],
                        "seeds": c["mechanism"]["expert_error_mean"]})]
            for name, c in report["conditions"].items()]
    diffs = [[name] + [f"{cell_text(d)} vs {d['against']}: {decided(d)}" for d in c["full_vs_best"].values()]
             + [c["verdict"].split(" (")[0]] for name, c in report["conditions"].items() if c["full_vs_best"]]
    links = report["links"]
    return f"""# ddmkit misalignment study

Data `{report['config']['data']['name']}` ({report['config']['data']['n_train']} training rows), \
K = {report['config']['partition']['k']} experts; training seeds {report['seeds']}; ddmkit {report['version']}.
{not_measured(report)}Every strategy samples the same {st['n']} trajectories ({st['solver']}, {st['steps']} steps, noise seed \
{st['sample_seed']}). Conditions are defined in `ddmkit.analysis.misalignment`.

A cell is the mean over training seeds, then in brackets the 95% t-interval across seeds and in parentheses
the 95% bootstrap interval over samples ({st['n_boot']} resamples; W2 {st['w2_boot']}), replicate by
replicate averaged over seeds. Conditions with exact experts do not depend on the training seed and are
measured once. NLL: mean -log p_0 under the exact mixture; W2: exact W2 of the samples to {st['n']}
held-out points (noise floor {report['w2_floor']:.4g}); L_top: local Lipschitz constant of the frozen-routing
field (mean over {st['max_steps']} steps and {st['jvp_rows']} trajectories, no sample interval);
amplification: median end-to-end |Phi(x_1 + d) - Phi(x_1)| / |d|; Delta_refine: |x_0(N) - x_0(2N)| /
data scale; field error: |v - v*|^2 / D along the strategy's own trajectory (v* the exact velocity).
Lower is better for quality; lower is more stable for L_top, amplification and Delta_refine.

{markdown_table(["condition", "strategy", "seeds"] + [m for m, _ in METRICS], rows)}

![quality vs stability](plots/quality_vs_stability.png)

## Mechanism per condition

The router's total-variation distance to the exact posterior of the shards, and the experts' error against
their shards' exact velocities (mean squared error per dimension, weighted by the exact posterior of the
shard), on held-out data at t = 0.05, 0.15, ..., 0.95.

{markdown_table(["condition", "seeds", "router TV", "expert error"], mech)}

## Full routing against the best other strategy

Paired difference full - (the other strategy with the lowest mean), per seed; "worse" ("better") where both
the interval across seeds and the interval over samples lie above (below) 0: every seed samples from the same
noise, so the first holds the training variation and the second the sampling variation. The dissociation is "reproduced" in a condition when
full has the lowest Delta_refine of the strategies and a W2 worse than the best other strategy's (per-sample
NLL is not a distance between distributions: samples piled on the modes score best; it is shown, not decided
on).

{markdown_table(["condition", "NLL: full - best", "W2: full - best", "dissociation"], diffs)}

Across all (condition, strategy) cells, Spearman rho of the means: NLL with the field error
{links['nll_vs_field_error']:+.2f}, with Delta_refine {links['nll_vs_delta_refine']:+.2f}, with amplification
{links['nll_vs_amp']:+.2f}, with L_top {links['nll_vs_L_top']:+.2f}; W2 with the field error
{links['w2_vs_field_error']:+.2f}, with Delta_refine {links['w2_vs_delta_refine']:+.2f}, with amplification
{links['w2_vs_amp']:+.2f}, with L_top {links['w2_vs_L_top']:+.2f}.

Verdicts:

""" + "\n".join(f"- {name}: {c['verdict']}" for name, c in report["conditions"].items()) + "\n"


def scaled(c: dict, factor: float) -> dict:
    """A cell with its mean, interval ends and per-seed values multiplied by factor (KID x 1e3)."""
    def one(key, v):
        if isinstance(v, dict):
            return {k: (x * factor if k in ("mean", "lo", "hi") else x) for k, x in v.items()}
        if isinstance(v, list):
            return [x * factor for x in v]
        return v * factor if key == "mean" else v

    return {k: one(k, v) for k, v in c.items()}


def seed_values(c: dict, factor: float = 1.0) -> str:
    """The per-seed values of a cell, comma-separated."""
    return ", ".join(fmt(v * factor) for v in c["per_seed"])


def render_images(report: dict) -> str:
    """report.md of a study on images: FID / KID per seed and across seeds, stability on a subset of the
    trajectories, the experts' own- and other-cluster errors, full against the best other strategy."""
    st, cfg, floor = report["settings"], report["config"], report["floor"]
    rows, per_seed = [], []
    for name, c in report["conditions"].items():
        for strat in report["strategies"]:
            cell = c["table"][strat]
            rows.append([name, strat, len(c["seeds"]), cell_text(cell["fid"]), cell_text(scaled(cell["kid"], 1e3)),
                         cell_text(cell["amp"]), cell_text(cell["delta_refine"])])
            per_seed.append([name, strat, ", ".join(map(str, c["seeds"])), seed_values(cell["fid"]),
                             seed_values(cell["kid"], 1e3)])
    mech = [[name, len(c["seeds"])] + [cell_text({"mean": c["mechanism"][k]["mean"], "seeds": c["mechanism"][k]})
                                       for k in MECHANISM[True]]
            + [fmt(c["mechanism"]["expert_other_mean"]["mean"] / c["mechanism"]["expert_own_mean"]["mean"])]
            for name, c in report["conditions"].items()]
    diffs = []
    for name, c in report["conditions"].items():
        q = c["full_vs_best"]
        if q:
            diffs.append([name, f"{cell_text(q['fid'])} vs {q['fid']['against']}: {fid_word(q['fid'])}; "
                                f"per seed {seed_values(q['fid'])}",
                          f"{cell_text(scaled(q['kid'], 1e3))} vs {q['kid']['against']}: {fid_word(q['kid'])}",
                          c["verdict"].split(" (")[0]])
    links = report["links"]
    draw = "the same noise"
    if cfg["expert"]["net"]["kwargs"].get("num_classes"):
        draw += (f" and class labels (uniform over the classes, fixed by the noise seed; guidance "
                 f"{st['guidance']:g})")
    return f"""# ddmkit misalignment study

Data `{cfg['data']['name']}` ({cfg['data']['n_train']} training images), K = {cfg['partition']['k']} experts;
training seeds {report['seeds']}; ddmkit {report['version']}; measured on {report['device']}.
{not_measured(report)}Every strategy, condition and seed samples the same {st['n']} images from {draw},
as `ddmkit run` draws a sample set ({st['solver']}, {st['steps']} steps, noise seed {st['sample_seed']}), in
float32 (no autocast). Conditions are defined in `ddmkit.analysis.misalignment`.

A cell is the mean over training seeds, then in brackets the 95% t-interval across seeds and, for the
stability measures, in parentheses the 95% bootstrap interval over trajectories ({st['n_boot']} resamples).
FID and KID (x 1e3) of the {st['n']} samples against the {floor['n_test']} test images, with features
`{st['fid_features']}` (the run's evaluate.fid_features; KID subsets of {st['kid_subset']}); the floor,
{floor['n']} training images against the same test images: FID {fmt(floor['fid'])}, KID x 1e3 \
{fmt(floor['kid'] * 1e3)}.
FID and KID have no interval over samples: FID is a distance between two Gaussians fitted to whole sets, and
resampling with replacement biases it, so their intervals are across training seeds only (per-seed values
below). Amplification (median |Phi(x_1 + d) - Phi(x_1)| / |d|, |d| = 1e-3) and Delta_refine
(|x_0(N) - x_0(2N)| / data scale) are measured on the first {st['stability_rows']} trajectories only (the same
for every strategy). Lower is better for quality; lower is more stable.

Absent on images, which have no exact truth: NLL and W2 against the exact mixture, the field error
|v - v*|^2 / D (it needs the exact velocity v*), the router's TV distance to the exact posterior of the shards,
and the `exact` conditions. L_top (Jacobians through every expert along the trajectories) is not measured.

{markdown_table(["condition", "strategy", "seeds", "FID", "KID x 1e3", "amplification", "Delta_refine"], rows)}

Per training seed (in the order of the seeds column):

{markdown_table(["condition", "strategy", "seeds", "FID per seed", "KID x 1e3 per seed"], per_seed)}

![quality vs stability](plots/quality_vs_stability.png)

## Mechanism per condition

Every expert's error |v_k(x_t) - (eps - x)|^2 / D on the last {min(st['n'], floor['n_test'])} test images (their
class labels given to class-conditional experts, guidance 1) at t = 0.05, 0.15, ..., 0.95, pooled over
the (image, expert) pairs where the image lies in the expert's own cluster and where it lies in another
(an image's cluster: the nearest partition centroid in feature space).

{markdown_table(["condition", "seeds", "expert error, own cluster", "expert error, other clusters",
                 "other / own"], mech)}

## Full routing against the best other strategy

Paired difference full - (the other strategy with the lowest mean), per seed, with the 95% t-interval across
seeds: "worse" ("better") where it lies above (below) 0. The dissociation is "reproduced" in a condition when
full has the lowest Delta_refine of the strategies and an FID worse than the best other strategy's; with one
seed there is no interval ("one seed: no interval").

{markdown_table(["condition", "FID: full - best", "KID x 1e3: full - best", "dissociation"], diffs)}

Across all (condition, strategy) cells, Spearman rho of the means: FID with Delta_refine \
{links['fid_vs_delta_refine']:+.2f}, with amplification {links['fid_vs_amp']:+.2f}; KID with Delta_refine \
{links['kid_vs_delta_refine']:+.2f}, with amplification {links['kid_vs_amp']:+.2f}.

Verdicts:

""" + "\n".join(f"- {name}: {c['verdict']}" for name, c in report["conditions"].items()) + "\n"


def plot_study(report: dict, path: Path) -> None:
    """Quality against stability: NLL vs Delta_refine and W2 vs amplification (images: FID vs both), one colour
    per condition, one marker per strategy, error bars the 95% interval across seeds."""
    images = report.get("kind") == "images"
    pairs = (("delta_refine", "fid"), ("amp", "fid")) if images else (("delta_refine", "nll"), ("amp", "w2"))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = "os^Dv<>pP*X"
    colours = plt.get_cmap("tab10")
    for ci, (name, c) in enumerate(report["conditions"].items()):
        for si, strat in enumerate(report["strategies"]):
            row = c["table"][strat]
            for ax, (x, y) in zip(axes, pairs):
                err = [[[row[k]["mean"] - row[k]["seeds"]["lo"]], [row[k]["seeds"]["hi"] - row[k]["mean"]]]
                       for k in (x, y)]
                ax.errorbar(row[x]["mean"], row[y]["mean"], xerr=err[0], yerr=err[1], color=colours(ci % 10),
                            marker=markers[si % len(markers)], linestyle="none", capsize=2,
                            label=f"{name} {strat}")
    quality = ("FID to the test images", "FID to the test images") if images else \
        ("NLL (lower: better)", "W2 to held-out data")
    for ax, xl, yl in zip(axes, ("Delta_refine (lower: more stable)", "amplification, median (lower: more stable)"),
                          quality):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    if images:
        for ax, label in zip(axes, (None, "FID floor (training images)")):
            ax.axhline(report["floor"]["fid"], color="grey", linestyle=":", label=label)
    else:
        axes[1].axhline(report["w2_floor"], color="grey", linestyle=":", label="W2 noise floor")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=2)
    save_figure(fig, path)
