"""Plots and the Markdown page of `ddmkit analyze`."""
from __future__ import annotations

import math
from pathlib import Path

from ddmkit.evaluation.plots import pyplot, save_figure
from ddmkit.tables import fmt, markdown_table as _markdown_table

# One colour per strategy, distinct for up to 18 strategies (the default list has 11): matplotlib's ten
# "tab" colours, then eight others unlike them.
PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan", "black", "gold", "navy", "lime", "magenta", "teal", "maroon", "rosybrown"]


def colour(i: int) -> str:
    """The colour of the i-th strategy of a plot."""
    return PALETTE[i % len(PALETTE)]


def _axes(xlabel="t (0 = data, 1 = noise)", ylabel="", log=False):
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return fig, ax


def plot_lipschitz(per: dict, path: Path) -> None:
    """L_top (solid) and L_fd (dotted) vs t, one colour per strategy."""
    fig, ax = _axes(ylabel="L_eff (solid: sigma_max by JVP; dotted: finite differences)", log=True)
    for i, (name, r) in enumerate(per.items()):
        ax.plot(r["lipschitz"]["t"], r["lipschitz"]["top"], label=name, color=colour(i))
        ax.plot(r["lipschitz"]["t"], r["lipschitz"]["fd"], ":", color=colour(i))
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_expert_error(held: dict, path: Path) -> None:
    """Per-expert error on held-out data, routed (solid) vs not routed (dashed), vs t; no dashed line for a
    strategy that routes every expert (full)."""
    fig, ax = _axes(ylabel="expert MSE vs eps - x (solid routed, dashed not)", log=True)
    for i, name in enumerate(held["routed"]):
        ax.plot(held["t"], held["routed"][name], label=name, color=colour(i))
        if not all(math.isnan(v) for v in held["not_routed"][name]):
            ax.plot(held["t"], held["not_routed"][name], "--", color=colour(i))
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_disagreement(per: dict, path: Path) -> None:
    fig, ax = _axes(ylabel="D_pair: router-weighted angle between experts (deg)")
    for i, (name, r) in enumerate(per.items()):
        ax.plot(r["by_step"]["t"], r["by_step"]["pair"], label=name, color=colour(i))
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_quality_scatter(points: dict, qname: str, path: Path) -> None:
    """Per-sample quality vs per-sample disagreement, one panel per strategy."""
    names = list(points)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        d, q = points[name]
        ax.scatter(d, q, s=2, alpha=0.4, color=colour(i))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("D_pair (deg)", fontsize=8)
        ax.set_ylabel(qname, fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    save_figure(fig, path)



def defined(c):
    """c, or None where it is an undefined number (NaN: no measured step in a t band, no row of that kind), which
    the tables' fmt writes '-'."""
    return None if isinstance(c, float) and math.isnan(c) else c


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table whose undefined cells read '-'."""
    return _markdown_table(headers, [[defined(c) for c in row] for row in rows])

TABLE = [("expert calls/sample", "calls"), ("quality q", "q"), ("W2", "w2"), ("L_top", "L_top"),
         ("L_rand", "L_rand"), ("L_fd", "L_fd"), ("amplification (median)", "amp_median"),
         ("Delta_refine", "delta_refine"), ("nearest hit", "hit"), ("mean rank", "rank"),
         ("D_pair (deg)", "pair"), ("D_mean (deg)", "mean"), ("err routed", "err_routed"),
         ("err not routed", "err_not_routed")]


# The reference x0* of hit*, rank* and same (result["x0_reference"]["kind"]): its column label, what it is,
# its formula, and why it does not depend on the strategy.
REFERENCES = {
    "exact": ("exact x0", "the exact posterior mean", "x0* = E[x0 | x_t] of the truth",
              "independent of the strategy's experts"),
    "monolith": ("monolith x0", "the monolith's estimate", "x0* = x_t - t v_monolith(x_t)",
                 "independent of the strategy: it uses neither the router nor the experts"),
}


def reference_columns(reference: str | None = "exact") -> list[tuple[str, str]]:
    """(column, summary key) of the alignment of the reference x0* (none without a reference)."""
    if reference is None:
        return []
    label = REFERENCES[reference][0]
    return [(f"hit* ({label})", "hit_exact"), (f"rank* ({label})", "rank_exact"), ("same nearest", "same")]


def reference_note(info: dict | None) -> str:
    """The sentence under the strategy table that names the reference x0* (or says there is none)."""
    if info is None:
        return ("x0 reference: none (no Gaussian-mixture truth, no trained monolith), so no hit* or rank*: nearest "
                "hit and mean rank use the strategy's own x0_hat, which one-expert strategies hit by construction "
                "(`ddmkit train-monolith RUN` adds the monolith's estimate).")
    _, _, formula, why = REFERENCES[info["kind"]]
    return (f"x0 reference of hit*, rank* and same nearest: {info['name']} ({formula}) in place of the strategy's "
            f"own x0_hat; {why}.")


def strategy_table(per: dict, reference: str | None = "exact") -> str:
    cols = TABLE + [c for c in reference_columns(reference) if all(c[1] in r["summary"] for r in per.values())]
    return table(["strategy"] + [c for c, _ in cols],
                          [[name] + [r["summary"].get(k) for _, k in cols] for name, r in per.items()])


def exact_alignment_section(per: dict, reference: str = "exact") -> str:
    """hit* and rank* per t band, from the reference x0* (the exact posterior mean on Gaussian-mixture runs,
    the monolith's estimate on others)."""
    if not all("hit_exact" in r["bands"] for r in per.values()):
        return ""
    _, what, formula, why = REFERENCES[reference]
    return (f"With {what} {formula} in place of the strategy's own x0_hat ({why}): share of steps whose main "
            "routed expert is x0*'s nearest cluster (hit*), per t band:\n\n" + band_table(per, "hit_exact")
            + "\n\nMean rank of the routed experts among x0*'s nearest clusters (rank*), per t band:\n\n"
            + band_table(per, "rank_exact") + "\n")


def own_cluster_section(held: dict) -> str:
    """Every expert's held-out error on its own cluster vs on the others, per t (no strategy involved)."""
    if "by_cluster" not in held:
        return ""
    exact = "by_cluster_vs_exact" in held
    rows = []
    for i, t in enumerate(held["t"]):
        row = [f"{t:.2f}", held["by_cluster"][i]["own"], held["by_cluster"][i]["other"]]
        if exact:
            row += [held["by_cluster_vs_exact"][i]["own"], held["by_cluster_vs_exact"][i]["other"]]
        rows.append(row)
    heads = ["t", "own cluster (vs eps - x)", "other clusters (vs eps - x)"]
    if exact:
        heads += ["own cluster (vs v*_k)", "other clusters (vs v*_k)"]
    return (f"Every expert's error on held-out points of its own cluster and of the other clusters (cluster of a "
            f"point: {held.get('cluster_rule', 'given')}; no strategy involved):\n\n" + table(heads, rows)
            + "\n")


def heldout_table(held: dict) -> str:
    """Per t, every strategy's per-expert held-out error on routed / not routed experts ('-' where a strategy
    leaves no expert unrouted, as full does, or routes none)."""
    rows = [[f"{t:.2f}"] + [f"{fmt(defined(held['routed'][n][i]), 3)} / {fmt(defined(held['not_routed'][n][i]), 3)}"
                            for n in held["routed"]] for i, t in enumerate(held["t"])]
    return table(["t"] + list(held["routed"]), rows)


def band_table(per: dict, key: str) -> str:
    bands = next(iter(per.values()))["bands"]["t"]
    return table(["strategy"] + bands, [[n] + r["bands"][key] for n, r in per.items()])


def _ci(c: dict) -> str:
    """rho [lo, hi], or why rho is undefined (c["why"]: e.g. "constant rank")."""
    if math.isnan(c["rho"]):
        return f"undefined ({c.get('why', 'a constant column or fewer than 3 points')})"
    if math.isnan(c["lo"]):
        return f"{c['rho']:+.2f} (no interval: every bootstrap draw was constant)"
    return f"{c['rho']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"


def _point(rho: float, strategies: int) -> str:
    """A rho across strategies without an interval, or why it is undefined."""
    if not math.isnan(rho):
        return f"{rho:+.2f}"
    return "undefined (fewer than 3 strategies)" if strategies < 3 else "undefined (a constant column)"


def missing_note(res: dict) -> str:
    """The note on the experts missing from the run (empty when none is)."""
    missing = res.get("missing_experts", [])
    if not missing:
        return ""
    present = res["heldout"]["experts"]
    return (f"\nExperts {missing} of {len(missing) + len(present)} are missing (no model folder): the DDM samples "
            f"with the other {len(present)}, router weights renormalised over them; the per-expert and held-out "
            f"numbers cover experts {present} only.")


def render(res: dict) -> str:
    per, held, link = res["strategies"], res["heldout"], res["link"]
    qname = res["quality_name"]
    ltop, refine_w2 = (_point(link[k], len(per)) for k in ("ltop_vs_q", "refine_vs_w2"))
    corr_rows = [[n, _ci(r["link"]["disagreement"]), _ci(r["link"]["rank"])] for n, r in per.items()]
    exact = ""
    if "router_tv" in held:
        ex_rows = [[f"{t:.2f}", held["router_tv"][i], min(held["expert_vs_exact"][i]), max(held["expert_vs_exact"][i])]
                   for i, t in enumerate(held["t"])]
        exact = ("Against the exact mixture (cluster k's exact velocity v*_k, error weighted by the exact posterior "
                 "r*_k; router TV against r*):\n\n"
                 + table(["t", "router TV", "min_k e*_k", "max_k e*_k"], ex_rows) + "\n")
    bases = sorted({b for c in res["compare"].values() for b in c["vs"]})
    cmp_rows = [[n, c["calls"]] + [f"{c['vs'][b]['mean']:+.3g} [{c['vs'][b]['lo']:+.3g}, {c['vs'][b]['hi']:+.3g}] "
                                   f"{c['vs'][b]['word']}; W2 {c['vs'][b]['w2_minus_baseline']:+.3g}" for b in bases]
                for n, c in res["compare"].items()]
    s = res["settings"]
    reference = res["x0_reference"]["kind"] if res["x0_reference"] else None
    return f"""# ddmkit analysis: stability vs expert-data alignment

Run `{res['run']}`; {s['n']} trajectories per strategy from the same noise (seed {s['seed']}), {s['solver']},
N = {s['steps']} steps; Jacobians on {s['jvp_rows']} rows at up to {s['max_steps']} steps. Quality q per sample:
{qname} (lower is better). Definitions: docs/analysis.md (ddmkit's own; the paper's are not public).
Numbers are measured on this run. Time: {res['wall_time']:.1f}s wall, {res['cpu_time']:.1f}s CPU.

## Strategies

{strategy_table(per, reference)}

q: mean per-sample {qname}; W2: exact W2 of {s['n_w2']} samples against {s['n_w2']} held-out points
(floor, against {s['n_w2']} other held-out points: {res['w2_floor']:.4g}). L_*: means over steps; err:
per-expert MSE on held-out data averaged over the t grid.
{reference_note(res['x0_reference'])}{missing_note(res)}

## Verdict: stability vs quality across strategies

Spearman rho across strategies of each quantity's mean over the samples (amplification too: the table
above shows its median), bootstrap over samples (95% CI):

- Delta_refine vs q: {_ci(link['refine_vs_q'])}; **{link['verdict']}**
- amplification vs q: {_ci(link['amp_vs_q'])}
- mean rank (alignment) vs q: {_ci(link['rank_vs_q'])}
- D_pair (disagreement) vs q: {_ci(link['pair_vs_q'])}
- L_top vs q (point estimate over strategies, no CI): {ltop}
- Delta_refine vs W2 (point estimate, no CI; W2 is a set distance, not per sample): {refine_w2}

![quality vs disagreement](plots/quality_vs_disagreement.png)

## Stability

![L_eff](plots/lipschitz.png)

L_top per t band:

{band_table(per, 'L_top')}

## Alignment

Share of steps whose main routed expert is the nearest cluster to x0_hat, per t band:

{band_table(per, 'hit')}

Mean rank of the routed experts (1 = nearest), per t band:

{band_table(per, 'rank')}

{exact_alignment_section(per, reference) if reference else ""}

Per-expert error on held-out data (routed / not routed):

{heldout_table(held)}

{own_cluster_section(held)}
{exact}
![expert error](plots/expert_error.png)

Disagreement D_pair per t band:

{band_table(per, 'pair')}

![disagreement](plots/disagreement.png)

Within each strategy, Spearman rho (95% CI) of per-sample q with per-sample disagreement D_pair and with
mean rank:

{table(['strategy', 'q vs D_pair', 'q vs rank'], corr_rows)}

## Alignment-based routing vs fixed top-k

Against each fixed top-k (expert calls/sample: {', '.join(f"{b} {per[b]['summary']['calls']:.0f}" for b in bases)}):
paired difference of mean q (same noise, bootstrap 95% CI; negative = better) and the difference of W2
(negative = closer to the data). Per-sample NLL rewards samples that sit on modes even when the modes
are unevenly covered; W2 sees the whole distribution, so read both.

{table(['strategy', 'calls/sample'] + [f'vs {b}' for b in bases], cmp_rows)}
"""
