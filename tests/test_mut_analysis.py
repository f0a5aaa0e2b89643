"""Fast unit tests of ddmkit.analysis on hand-made inputs: the report's tables, Markdown page and plots
(exact text and plotted data), the misalignment conditions and measurements, and the routing states of the
trace; the end-to-end `ddmkit analyze` runs (test_analysis_run.py) are too slow to run for every mutant."""
import math

import numpy as np
import pytest
import torch

from ddmkit.analysis import misalignment as M
from ddmkit.analysis import report as A
from ddmkit.analysis import trace as T
from ddmkit.ddm.model import DDM
from ddmkit.errors import DDMError
from ddmkit.routing import parse_strategy
from ddmkit.truth import GaussianMixture


def ci(rho, lo, hi):
    return {"rho": rho, "lo": lo, "hi": hi}


def summary(calls, q, extra=()):
    base = {"calls": calls, "q": q, "w2": 0.5, "L_top": 2.0, "L_rand": 1.0, "L_fd": 1.5, "amp_median": 1.25,
            "delta_refine": 0.01, "hit": 0.9, "rank": 1.1, "pair": 12.5, "mean": 3.25, "err_routed": 0.02,
            "err_not_routed": 0.75}
    base.update(extra)
    return base


def result(exact=True):
    bands = ["t<0.3", "t>=0.3"]
    def strat(calls, q, scale):
        b = {"t": bands, "L_top": [2 * scale, 3 * scale], "hit": [0.5 * scale, 0.25], "rank": [1.5, 2.5 * scale],
             "pair": [10.0 * scale, 20.0]}
        extra = {}
        if exact:
            b.update(hit_exact=[0.75 * scale, 0.125], rank_exact=[1.25, 1.75 * scale])
            extra = {"hit_exact": 0.8 * scale, "rank_exact": 1.2, "same": 0.95}
        return {"summary": summary(calls, q, extra), "bands": b,
                "link": {"disagreement": ci(0.5, 0.25, 0.75), "rank": ci(-0.125, -0.5, 0.25 * scale)}}
    per = {"full": strat(4.0, 1.5, 1.0), "top-1": strat(1.0, 2.5, 2.0), "aligned": strat(1.6, 1.25, 3.0)}
    held = {"t": [0.1, 0.55], "routed": {"e0": [0.01, 0.02], "e1": [0.1234, 0.5]},
            "not_routed": {"e0": [1.0, 2.0], "e1": [float("nan"), 3.0]}}
    if exact:
        held.update(router_tv=[0.05, 0.25], expert_vs_exact=[[0.1, 0.3, 0.2], [0.6, 0.4, 0.5]],
                    by_cluster=[{"own": 0.011, "other": 0.5}, {"own": 0.02, "other": 0.75}],
                    by_cluster_vs_exact=[{"own": 0.001, "other": 0.25}, {"own": 0.002, "other": 0.125}],
                    cluster_rule="nearest mean")
    link = {"refine_vs_q": ci(0.9, 0.8, 1.0), "verdict": "stability tracks quality", "amp_vs_q": ci(0.1, -0.2, 0.3),
            "rank_vs_q": ci(0.6, 0.4, 0.8), "pair_vs_q": ci(-0.3, -0.6, 0.05), "ltop_vs_q": 0.25,
            "refine_vs_w2": -0.5}
    compare = {"aligned": {"calls": 1.6, "vs": {
        "top-1": {"mean": -0.25, "lo": -0.5, "hi": -0.125, "word": "better", "w2_minus_baseline": -0.0125},
        "full": {"mean": 0.25, "lo": 0.125, "hi": 0.5, "word": "worse", "w2_minus_baseline": 0.5}}}}
    return {"strategies": per, "heldout": held, "link": link, "quality_name": "NLL", "compare": compare,
            "x0_reference": {"kind": "exact", "name": "exact posterior mean"} if exact else None,
            "settings": {"n": 256, "seed": 7, "solver": "heun", "steps": 20, "jvp_rows": 16, "max_steps": 5,
                         "n_w2": 200},
            "run": "runs/demo", "wall_time": 12.345, "cpu_time": 30.06, "w2_floor": 0.012345}


EXPECTED_PAGE = """# ddmkit analysis: stability vs expert-data alignment

Run `runs/demo`; 256 trajectories per strategy from the same noise (seed 7), heun,
N = 20 steps; Jacobians on 16 rows at up to 5 steps. Quality q per sample:
NLL (lower is better). Definitions: docs/analysis.md (ddmkit's own; the paper's are not public).
Numbers are measured on this run. Time: 12.3s wall, 30.1s CPU.

## Strategies

| strategy | expert calls/sample | quality q | W2 | L_top | L_rand | L_fd | amplification (median) | Delta_refine | nearest hit | mean rank | D_pair (deg) | D_mean (deg) | err routed | err not routed | hit* (exact x0) | rank* (exact x0) | same nearest |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| full | 4 | 1.5 | 0.5 | 2 | 1 | 1.5 | 1.25 | 0.01 | 0.9 | 1.1 | 12.5 | 3.25 | 0.02 | 0.75 | 0.8 | 1.2 | 0.95 |
| top-1 | 1 | 2.5 | 0.5 | 2 | 1 | 1.5 | 1.25 | 0.01 | 0.9 | 1.1 | 12.5 | 3.25 | 0.02 | 0.75 | 1.6 | 1.2 | 0.95 |
| aligned | 1.6 | 1.25 | 0.5 | 2 | 1 | 1.5 | 1.25 | 0.01 | 0.9 | 1.1 | 12.5 | 3.25 | 0.02 | 0.75 | 2.4 | 1.2 | 0.95 |

q: mean per-sample NLL; W2: exact W2 of 200 samples against 200 held-out points
(floor, against 200 other held-out points: 0.01235). L_*: means over steps; err:
per-expert MSE on held-out data averaged over the t grid.
x0 reference of hit*, rank* and same nearest: exact posterior mean (x0* = E[x0 | x_t] of the truth) in place of the strategy's own x0_hat; independent of the strategy's experts.

## Verdict: stability vs quality across strategies

Spearman rho across strategies of each quantity's mean over the samples (amplification too: the table
above shows its median), bootstrap over samples (95% CI):

- Delta_refine vs q: +0.90 [+0.80, +1.00]; **stability tracks quality**
- amplification vs q: +0.10 [-0.20, +0.30]
- mean rank (alignment) vs q: +0.60 [+0.40, +0.80]
- D_pair (disagreement) vs q: -0.30 [-0.60, +0.05]
- L_top vs q (point estimate over strategies, no CI): +0.25
- Delta_refine vs W2 (point estimate, no CI; W2 is a set distance, not per sample): -0.50

![quality vs disagreement](plots/quality_vs_disagreement.png)

## Stability

![L_eff](plots/lipschitz.png)

L_top per t band:

| strategy | t<0.3 | t>=0.3 |
|---|---|---|
| full | 2 | 3 |
| top-1 | 4 | 6 |
| aligned | 6 | 9 |

## Alignment

Share of steps whose main routed expert is the nearest cluster to x0_hat, per t band:

| strategy | t<0.3 | t>=0.3 |
|---|---|---|
| full | 0.5 | 0.25 |
| top-1 | 1 | 0.25 |
| aligned | 1.5 | 0.25 |

Mean rank of the routed experts (1 = nearest), per t band:

| strategy | t<0.3 | t>=0.3 |
|---|---|---|
| full | 1.5 | 2.5 |
| top-1 | 1.5 | 5 |
| aligned | 1.5 | 7.5 |

With the exact posterior mean x0* = E[x0 | x_t] of the truth in place of the strategy's own x0_hat (independent of the strategy's experts): share of steps whose main routed expert is x0*'s nearest cluster (hit*), per t band:

| strategy | t<0.3 | t>=0.3 |
|---|---|---|
| full | 0.75 | 0.125 |
| top-1 | 1.5 | 0.125 |
| aligned | 2.25 | 0.125 |

Mean rank of the routed experts among x0*'s nearest clusters (rank*), per t band:

| strategy | t<0.3 | t>=0.3 |
|---|---|---|
| full | 1.25 | 1.75 |
| top-1 | 1.25 | 3.5 |
| aligned | 1.25 | 5.25 |


Per-expert error on held-out data (routed / not routed):

| t | e0 | e1 |
|---|---|---|
| 0.10 | 0.01 / 1 | 0.123 / - |
| 0.55 | 0.02 / 2 | 0.5 / 3 |

Every expert's error on held-out points of its own cluster and of the other clusters (cluster of a point: nearest mean; no strategy involved):

| t | own cluster (vs eps - x) | other clusters (vs eps - x) | own cluster (vs v*_k) | other clusters (vs v*_k) |
|---|---|---|---|---|
| 0.10 | 0.011 | 0.5 | 0.001 | 0.25 |
| 0.55 | 0.02 | 0.75 | 0.002 | 0.125 |

Against the exact mixture (cluster k's exact velocity v*_k, error weighted by the exact posterior r*_k; router TV against r*):

| t | router TV | min_k e*_k | max_k e*_k |
|---|---|---|---|
| 0.10 | 0.05 | 0.1 | 0.3 |
| 0.55 | 0.25 | 0.4 | 0.6 |

![expert error](plots/expert_error.png)

Disagreement D_pair per t band:

| strategy | t<0.3 | t>=0.3 |
|---|---|---|
| full | 10 | 20 |
| top-1 | 20 | 20 |
| aligned | 30 | 20 |

![disagreement](plots/disagreement.png)

Within each strategy, Spearman rho (95% CI) of per-sample q with per-sample disagreement D_pair and with
mean rank:

| strategy | q vs D_pair | q vs rank |
|---|---|---|
| full | +0.50 [+0.25, +0.75] | -0.12 [-0.50, +0.25] |
| top-1 | +0.50 [+0.25, +0.75] | -0.12 [-0.50, +0.50] |
| aligned | +0.50 [+0.25, +0.75] | -0.12 [-0.50, +0.75] |

## Alignment-based routing vs fixed top-k

Against each fixed top-k (expert calls/sample: full 4, top-1 1):
paired difference of mean q (same noise, bootstrap 95% CI; negative = better) and the difference of W2
(negative = closer to the data). Per-sample NLL rewards samples that sit on modes even when the modes
are unevenly covered; W2 sees the whole distribution, so read both.

| strategy | calls/sample | vs full | vs top-1 |
|---|---|---|---|
| aligned | 1.6 | +0.25 [+0.125, +0.5] worse; W2 +0.5 | -0.25 [-0.5, -0.125] better; W2 -0.0125 |
"""


# ----- the Markdown page ------------------------------------------------------------------------------
def test_render_the_whole_page_exactly():
    assert A.render(result()) == EXPECTED_PAGE


def test_render_without_the_exact_mixture_sections():
    text = A.render(result(exact=False))
    want = EXPECTED_PAGE
    want = want.replace(" | hit* (exact x0) | rank* (exact x0) | same nearest |", " |").replace(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in (" | 0.8 | 1.2 | 0.95 |", " | 1.6 | 1.2 | 0.95 |", " | 2.4 | 1.2 | 0.95 |"):
        want = want.replace(row, " |")
    want = want.replace(
        "x0 reference of hit*, rank* and same nearest: exact posterior mean (x0* = E[x0 | x_t] of the truth) in place "
        "of the strategy's own x0_hat; independent of the strategy's experts.",
        "x0 reference: none (no Gaussian-mixture truth, no trained monolith), so no hit* or rank*: nearest hit and "
        "mean rank use the strategy's own x0_hat, which one-expert strategies hit by construction (`ddmkit "
        "train-monolith RUN` adds the monolith's estimate).")
    start = want.index("With the exact posterior mean")
    want = want[:start] + want[want.index("\n\nPer-expert error on held-out data"):]
    start = want.index("Every expert's error on held-out points")
    want = want[:start] + want[want.index("![expert error]"):]
    want = want.replace("| 0.55 | 0.02 / 2 | 0.5 / 3 |\n\n", "| 0.55 | 0.02 / 2 | 0.5 / 3 |\n\n\n\n")
    assert text == want


def test_strategy_table_adds_the_exact_columns_only_when_every_strategy_has_them():
    per = {"a": {"summary": {"calls": 2.0, "q": 0.5, "hit_exact": 0.25, "rank_exact": 1.5, "same": 1.0}},
           "b": {"summary": {"calls": 1.0, "q": None, "hit_exact": 0.75, "same": 0.5}}}
    lines = A.strategy_table(per).split("\n")
    heads = [h.strip() for h in lines[0].strip("|").split("|")]
    assert heads == ["strategy"] + [c for c, _ in A.TABLE] + ["hit* (exact x0)", "same nearest"]
    assert lines[1] == "|" + "---|" * len(heads)
    assert lines[2] == "| a | 2 | 0.5 | " + "- | " * 12 + "0.25 | 1 |"
    assert lines[3] == "| b | 1 | - | " + "- | " * 12 + "0.75 | 0.5 |"
    assert len(lines) == 4


def test_exact_alignment_section():
    per = {"a": {"bands": {"t": ["lo", "hi"], "hit_exact": [0.5, 0.25], "rank_exact": [1.0, 2.0]}}}
    assert A.exact_alignment_section(per) == (
        "With the exact posterior mean x0* = E[x0 | x_t] of the truth in place of the strategy's own x0_hat "
        "(independent of the strategy's experts): share of steps whose main routed expert is x0*'s nearest cluster "
        "(hit*), per t band:\n\n| strategy | lo | hi |\n|---|---|---|\n| a | 0.5 | 0.25 |\n\n"
        "Mean rank of the routed experts among x0*'s nearest clusters (rank*), per t band:\n\n"
        "| strategy | lo | hi |\n|---|---|---|\n| a | 1 | 2 |\n")
    per["b"] = {"bands": {"t": ["lo", "hi"], "rank_exact": [1.0, 2.0]}}
    assert A.exact_alignment_section(per) == ""


def test_own_cluster_section():
    held = {"t": [0.125, 0.5], "by_cluster": [{"own": 0.1, "other": 0.9}, {"own": 0.2, "other": 0.8}]}
    assert A.own_cluster_section(held) == (
        "Every expert's error on held-out points of its own cluster and of the other clusters (cluster of a point: "
        "given; no strategy involved):\n\n| t | own cluster (vs eps - x) | other clusters (vs eps - x) |\n"
        "|---|---|---|\n| 0.12 | 0.1 | 0.9 |\n| 0.50 | 0.2 | 0.8 |\n")
    held.update(cluster_rule="k-means label", by_cluster_vs_exact=[{"own": 1.0, "other": 2.0},
                                                                   {"own": 3.0, "other": 4.0}])
    assert A.own_cluster_section(held).split("\n")[0].endswith("(cluster of a point: k-means label; no strategy "
                                                               "involved):")
    assert A.own_cluster_section(held).split("\n")[2:6] == [
        "| t | own cluster (vs eps - x) | other clusters (vs eps - x) | own cluster (vs v*_k) | "
        "other clusters (vs v*_k) |", "|---|---|---|---|---|", "| 0.12 | 0.1 | 0.9 | 1 | 2 |",
        "| 0.50 | 0.2 | 0.8 | 3 | 4 |"]
    assert A.own_cluster_section({"t": [0.5]}) == ""


def test_band_table_and_interval_text():
    per = {"x": {"bands": {"t": ["a", "b", "c"], "pair": [1.0, 2.5, None]}},
           "y": {"bands": {"t": ["ignored"], "pair": [0.123456, 3, 4]}}}
    assert A.band_table(per, "pair") == ("| strategy | a | b | c |\n|---|---|---|---|\n| x | 1 | 2.5 | - |\n"
                                         "| y | 0.1235 | 3 | 4 |")
    assert A._ci({"rho": 0.5, "lo": -0.123, "hi": 1.0}) == "+0.50 [-0.12, +1.00]"


# ----- plots ------------------------------------------------------------------------------------------
class Figures:
    def __init__(self):
        self.saved = []

    def __call__(self, fig, path):
        self.saved.append((fig, path))


def plotted(ax):
    return [(list(map(float, ln.get_xdata())), [float(v) for v in ln.get_ydata()], ln.get_label(),
             ln.get_linestyle()) for ln in ax.get_lines()]


def check_axes(ax, ylabel, log):
    assert ax.get_xlabel() == "t (0 = data, 1 = noise)" and ax.get_ylabel() == ylabel
    assert ax.get_yscale() == ("log" if log else "linear")
    assert tuple(ax.figure.get_size_inches()) == pytest.approx((6, 4))
    assert ax.xaxis.get_gridlines()[0].get_visible() and ax.xaxis.get_gridlines()[0].get_alpha() == 0.3
    assert ax.yaxis.get_gridlines()[0].get_visible()
    leg = ax.get_legend()
    assert leg.get_texts()[0].get_fontsize() == 7 and leg._ncols == 2


def test_plot_lipschitz(monkeypatch, tmp_path):
    figs = Figures()
    monkeypatch.setattr(A, "save_figure", figs)
    per = {"full": {"lipschitz": {"t": [0.9, 0.1], "top": [1.0, 2.0], "fd": [0.5, 1.5]}},
           "top-1": {"lipschitz": {"t": [0.9, 0.1], "top": [3.0, 4.0], "fd": [2.5, 3.5]}}}
    A.plot_lipschitz(per, tmp_path / "l.png")
    (fig, path), = figs.saved
    assert path == tmp_path / "l.png" and len(fig.axes) == 1
    ax = fig.axes[0]
    got = plotted(ax)
    assert [g[:2] for g in got] == [([0.9, 0.1], [1.0, 2.0]), ([0.9, 0.1], [0.5, 1.5]), ([0.9, 0.1], [3.0, 4.0]),
                                    ([0.9, 0.1], [2.5, 3.5])]
    assert [g[2] for g in got][::2] == ["full", "top-1"] and [g[3] for g in got] == ["-", ":", "-", ":"]
    c = [ln.get_color() for ln in ax.get_lines()]
    assert c[0] == c[1] != c[2] == c[3]
    check_axes(ax, "L_eff (solid: sigma_max by JVP; dotted: finite differences)", True)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full", "top-1"]


def test_plot_expert_error_draws_no_dashed_line_for_experts_never_unrouted(monkeypatch, tmp_path):
    figs = Figures()
    monkeypatch.setattr(A, "save_figure", figs)
    nan = float("nan")
    held = {"t": [0.2, 0.8], "routed": {"e0": [0.1, 0.2], "e1": [0.3, 0.4], "e2": [0.5, 0.6]},
            "not_routed": {"e0": [1.0, 2.0], "e1": [nan, nan], "e2": [nan, 3.0]}}
    A.plot_expert_error(held, tmp_path / "e.png")
    (fig, path), = figs.saved
    assert path == tmp_path / "e.png"
    ax = fig.axes[0]
    got = plotted(ax)
    assert [(g[0], g[2], g[3]) for g in got] == [([0.2, 0.8], "e0", "-"), ([0.2, 0.8], "_child1", "--"),
                                                 ([0.2, 0.8], "e1", "-"), ([0.2, 0.8], "e2", "-"),
                                                 ([0.2, 0.8], "_child4", "--")]
    assert got[0][1] == [0.1, 0.2] and got[1][1] == [1.0, 2.0] and got[2][1] == [0.3, 0.4]
    assert got[3][1] == [0.5, 0.6] and math.isnan(got[4][1][0]) and got[4][1][1] == 3.0
    c = [ln.get_color() for ln in ax.get_lines()]
    assert c[0] == c[1] != c[2] != c[3] == c[4] != c[0]
    check_axes(ax, "expert MSE vs eps - x (solid routed, dashed not)", True)


def test_plot_disagreement(monkeypatch, tmp_path):
    figs = Figures()
    monkeypatch.setattr(A, "save_figure", figs)
    per = {"a": {"by_step": {"t": [1.0, 0.5, 0.0], "pair": [10.0, 20.0, 5.0]}},
           "b": {"by_step": {"t": [1.0, 0.0], "pair": [1.0, 2.0]}}}
    A.plot_disagreement(per, tmp_path / "d.png")
    (fig, path), = figs.saved
    assert path == tmp_path / "d.png"
    ax = fig.axes[0]
    assert plotted(ax) == [([1.0, 0.5, 0.0], [10.0, 20.0, 5.0], "a", "-"), ([1.0, 0.0], [1.0, 2.0], "b", "-")]
    check_axes(ax, "D_pair: router-weighted angle between experts (deg)", False)


@pytest.mark.parametrize("count, shape", [(1, (1, 1)), (5, (2, 4)), (8, (2, 4)), (3, (1, 3))])
def test_plot_quality_scatter_panels(monkeypatch, tmp_path, count, shape):
    figs = Figures()
    monkeypatch.setattr(A, "save_figure", figs)
    points = {f"s{i}": ([1.0, 2.0, float(i)], [3.0, 4.0, 5.0]) for i in range(count)}
    A.plot_quality_scatter(points, "NLL", tmp_path / "q.png")
    (fig, path), = figs.saved
    assert path == tmp_path / "q.png"
    rows, cols = shape
    assert len(fig.axes) == rows * cols
    assert tuple(fig.get_size_inches()) == pytest.approx((3.2 * cols, 2.8 * rows))
    for i, ax in enumerate(fig.axes):
        if i >= count:
            assert not ax.axison
            continue
        assert ax.axison
        (coll,) = ax.collections
        assert coll.get_offsets().tolist() == [[1.0, 3.0], [2.0, 4.0], [float(i), 5.0]]
        assert list(coll.get_sizes()) == [2] and coll.get_alpha() == 0.4
        assert (ax.get_title(), ax.title.get_fontsize()) == (f"s{i}", 9)
        assert (ax.get_xlabel(), ax.xaxis.label.get_fontsize()) == ("D_pair (deg)", 8)
        assert (ax.get_ylabel(), ax.yaxis.label.get_fontsize()) == ("NLL", 8)


# ----- misalignment: conditions -------------------------------------------------------------------------


def test_parse_condition_bases_and_their_limits():
    assert M.parse_condition("disjoint") == M.Condition("disjoint")
    assert M.parse_condition(" random ").partition == "random" and M.parse_condition(" random ").name == " random "
    assert M.parse_condition("disjoint").partition == "kmeans"
    assert M.parse_condition("overlap-1") == M.Condition("overlap-1", partition="overlap", share=1.0)
    assert M.parse_condition("undertrained-1").steps_factor == 1.0
    assert M.parse_condition("exact+uniform-0+permuted-1+tempered-2.5") == M.Condition(
        "exact+uniform-0+permuted-1+tempered-2.5", exact=True,
        router=(("uniform", 0.0), ("permuted", 1.0), ("tempered", 2.5)))
    for name, value, rule in (("overlap-0", "0", "0 < S <= 1"), ("overlap-1.5", "1.5", "0 < S <= 1"),
                              ("undertrained-0", "0", "0 < F <= 1"), ("undertrained-2", "2", "0 < F <= 1"),
                              ("undertrained-1.5", "1.5", "0 < F <= 1"),
                              ("disjoint+tempered-0", "0", "T > 0"), ("uniform-1.5", "1.5", "0 <= A <= 1"),
                              ("random+permuted-x", "x", "0 <= A <= 1")):
        with pytest.raises(DDMError) as e:
            M.parse_condition(name)
        assert str(e.value) == (f"--conditions {name!r}: {value!r} is not a number with {rule}; "
                                f"accepted: {M.CONDITION_FORMS}")


def test_misalignment_router_modifiers_pass_the_conditioning_on():
    seen = []

    def router(x, t, **cond):
        seen.append((x, t, cond))
        return torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)

    x, t = torch.zeros(1, 2), torch.full((1,), 0.5)
    for wrapped, want in ((M.mixed_uniform(router, 0.5), [[5 / 12, 7 / 24, 7 / 24]]),
                          (M.permuted(router, 0.5), [[0.375, 0.375, 0.25]]),
                          (M.tempered(router, 1.0), [[0.5, 0.25, 0.25]])):
        seen.clear()
        got = wrapped(x, t, y=3)
        assert seen == [(x, t, {"y": 3})]
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


def ddm_of(router, meta, conditional=True, capturable=False):
    return DDM([lambda x, t: x], router, torch.ones(1), (2,), meta=meta, router_conditional=conditional,
               router_capturable=capturable)


def test_apply_router_names_the_router_and_keeps_its_flags():
    base = lambda x, t, **c: torch.full((len(x), 2), 0.5)  # noqa: E731
    ddm = ddm_of(base, {"kind": "x"})
    out = M.apply_router(ddm, M.parse_condition("tempered-2+uniform-0.5"))
    assert out.meta["router"] == "learned+tempered-2+uniform-0.5"
    assert out.router_conditional is True and out.router_capturable is False
    out = M.apply_router(ddm_of(base, {"router": "exact"}, False, True), M.parse_condition("permuted-1"))
    assert out.meta["router"] == "exact+permuted-1"
    assert out.router_conditional is False and out.router_capturable is True
    assert M.apply_router(ddm, M.parse_condition("overlap-0.5")) is ddm


def two_blobs():
    return GaussianMixture.from_covariances([1.0, 3.0], [[-2.0, 0.0], [2.0, 0.0]], [0.25, 0.25])


def test_exact_shard_ddm_meta_prior_and_empty_shards():
    truth = two_blobs()
    shares = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float32)
    with pytest.raises(DDMError, match=r"^shards \[2\] hold no mixture component, so they have no exact expert$"):
        M.exact_shard_ddm(truth, shares, (2,))
    shares = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    ddm = M.exact_shard_ddm(truth, shares, [2], nearest="near")
    assert ddm.meta == {"kind": "exact", "router": "exact"}
    assert ddm.data_shape == (2,) and ddm.nearest == "near"
    # mass pi_c M[c, k]: shard 0 holds 0.25 + 0.375, shard 1 holds 0.375
    assert ddm.prior.dtype == torch.float32 and torch.allclose(ddm.prior, torch.tensor([0.625, 0.375]))
    x = torch.tensor([[-2.0, 0.0], [2.0, 0.5]])
    t = torch.tensor([0.3, 0.3])
    r = ddm.router(x, t)
    w = truth.posterior(x.double(), t.double())
    want = (w @ shares.double()) / (w @ shares.double()).sum(1, keepdim=True)
    assert r.dtype == torch.float32 and torch.allclose(r, want.float())
    v1 = ddm.experts[1](x, t)
    assert v1.dtype == torch.float32
    assert torch.allclose(v1, truth.subset([1]).velocity(x.double(), t.double()).float(), atol=1e-6)
    v0 = ddm.experts[0](x, t)
    sub = GaussianMixture(torch.tensor([0.25, 0.375], dtype=torch.float64) / 0.625, truth.means, truth.eigvals,
                          truth.eigvecs)
    assert torch.allclose(v0, sub.velocity(x.double(), t.double()).float(), atol=1e-6)


def test_misalignment_bootstraps_against_a_loop(monkeypatch):
    values = [1.0, 2.0, 4.0, 8.0, 16.0]
    got = M.bootstrap(values, np.median, n_boot=7, seed=3)
    rng = np.random.default_rng(3)
    want = [np.median(np.array(values)[rng.integers(0, 5, 5)]) for _ in range(7)]
    assert got.tolist() == want
    assert len(M.bootstrap(values)) == 200
    assert M.bootstrap(values, n_boot=3).tolist() == M.bootstrap(values, n_boot=3, seed=0).tolist()
    assert M.bootstrap([1, 2], n_boot=50).dtype == np.float64 and M.bootstrap([1, 2], n_boot=500).min() == 1.0
    monkeypatch.setattr(M, "w2_exact", lambda a, b: float(a.sum()))
    x0 = torch.arange(5.0)[:, None]
    rng = np.random.default_rng(4)
    assert M.w2_bootstrap(x0, None, n_boot=4, seed=4).tolist() == [float(rng.integers(0, 5, 5).sum())
                                                                     for _ in range(4)]
    assert len(M.w2_bootstrap(x0, None)) == 50
    assert M.w2_bootstrap(x0, None, 3).tolist() == M.w2_bootstrap(x0, None, 3, 0).tolist()
    assert min(M.w2_bootstrap(torch.tensor([[1.0], [100.0]]), None, 60)) == 2.0  # row 0 is drawn too


def test_nearest_clusters_share_matrix_and_overlap_neighbours():
    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert M.nearest_clusters(centroids, 5) == [[1, 2], [0, 2], [1, 0]]
    assert M.nearest_clusters(centroids) == [[1, 2], [0, 2], [1, 0]]
    assert M.nearest_clusters(centroids, 1) == [[1], [0], [1]]
    share = M.share_matrix([torch.tensor([0, 0, 1])], torch.tensor([0, 0, 1, 1]), 3)
    assert share.tolist() == [[1.0], [0.5], [0.0]]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    cent = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.5, 0.0], [6.0, 0.0]])
    members = M.overlap_members(labels, cent, 1.0)
    assert [sorted(m.tolist()) for m in members] == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5],
                                                     [2, 3, 4, 5, 6, 7]]


def test_measure_strategy_wires_its_parts(monkeypatch):
    calls = []

    class Trace:
        def __init__(self, steps, record):
            self.x0 = torch.full((4, 2), float(steps))
            self.expert_calls_per_sample = 3.5
            self.record = record

    def trace(ddm, strategy, x1, steps, solver, seed, record=True):
        calls.append(("trace", strategy, steps, solver, seed, record))
        return Trace(steps, record)

    def lipschitz(ddm, tr, rows, max_steps, seed):
        calls.append(("lip", rows.tolist(), max_steps, seed))
        return {"top": [1.0, 3.0], "rand": [0.5, 0.5], "fd": [2.0, 4.0]}

    monkeypatch.setattr(M, "trace_strategy", trace)
    monkeypatch.setattr(M, "local_lipschitz", lipschitz)
    monkeypatch.setattr(M, "amplification", lambda ddm, tr, steps, solver, seed: (
        calls.append(("amp", steps, solver, seed)), torch.tensor([1.0, 2.0, 10.0, 3.0]))[1])
    monkeypatch.setattr(M, "refinement_gap", lambda a, b, scale: (
        calls.append(("ref", float(a[0, 0]), float(b[0, 0]), scale)), torch.tensor([0.1, 0.2, 0.3, 0.4]))[1])
    monkeypatch.setattr(M, "per_sample_quality", lambda x0, truth, reference, extra: (
        calls.append(("q", truth, reference, extra)), (torch.tensor([1.0, 1.0, 2.0, 4.0]),))[1])
    monkeypatch.setattr(M, "field_error", lambda tr, truth: torch.tensor([0.0, 0.0, 0.0, 0.5]))
    monkeypatch.setattr(M, "w2_exact", lambda a, b: float(a.mean()))
    monkeypatch.setattr(M, "bootstrap", lambda v, stat, n, seed: (calls.append(("boot", n, seed)),
                                                                  np.array([stat(v)]))[1])
    monkeypatch.setattr(M, "w2_bootstrap", lambda x0, ref, n, seed: (calls.append(("w2boot", n, seed)),
                                                                     np.array([7.0]))[1])
    out = M.measure_strategy("ddm", "top-2", torch.zeros(5, 2), "truth", "ref", 2.0)
    assert calls[:5] == [("trace", "top-2", 50, "euler", 0, True), ("lip", [0, 1, 2, 3, 4], 10, 0),
                         ("amp", 50, "euler", 0), ("trace", "top-2", 100, "euler", 0, False),
                         ("ref", 50.0, 100.0, 2.0)]
    assert calls[5] == ("q", "truth", "ref", None)
    assert calls[6:] == [("boot", 200, 0)] * 4 + [("w2boot", 50, 0)]
    assert out["value"] == {"nll": 2.0, "amp": 2.5, "delta_refine": pytest.approx(0.25), "field_error": 0.125,
                            "w2": 50.0, "L_top": 2.0, "L_rand": 0.5, "L_fd": 3.0, "calls": 3.5}
    assert out["boot"] == {"nll": [2.0], "amp": [2.5], "delta_refine": [pytest.approx(0.25)], "field_error": [0.125],
                           "w2": [7.0]}
    calls.clear()
    M.measure_strategy("ddm", "full", torch.zeros(9, 2), "truth", "ref", 1.0, steps=4, solver="heun", seed=3,
                       jvp_rows=2, max_steps=5, n_boot=9, w2_boot=8)
    assert calls[:4] == [("trace", "full", 4, "heun", 3, True), ("lip", [0, 1], 5, 3), ("amp", 4, "heun", 3),
                         ("trace", "full", 8, "heun", 3, False)]
    assert calls[6:] == [("boot", 9, 3)] * 4 + [("w2boot", 8, 3)]


# ----- trace: routing states off the trajectory ---------------------------------------------------------


def small_ddm():
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    experts = [lambda x, t, d=d: d.expand(len(x), 2) * (1 + t)[:, None] for d in dirs]
    router = lambda x, t: torch.softmax(x @ dirs.T, 1)  # noqa: E731
    return DDM(experts, router, torch.tensor([0.2, 0.3, 0.5]), (2,), nearest=lambda x0: (x0[:, 0] > 0).long())


def test_strategy_weights_sees_the_state_the_strategy_needs():
    ddm = small_ddm()
    probs = torch.tensor([[0.5, 0.4, 0.1], [0.45, 0.1, 0.45]])
    x, t = torch.zeros(2, 2), torch.full((2,), 0.5)
    # gated-2@60: row 0's top two experts are 90 degrees apart (top-1), row 1's are opposite (top-1)
    assert T.strategy_weights(ddm, parse_strategy("gated-2@60"), probs, x, t, None).tolist() == [
        [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert torch.allclose(T.strategy_weights(ddm, parse_strategy("gated-2@100"), probs[:1], x[:1], t[:1], None),
                          torch.tensor([[5 / 9, 4 / 9, 0.0]]))
    # nearest routes by x0_hat when it is given, by a draw from the router otherwise (certain rows: its choice)
    x0_hat = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert T.strategy_weights(ddm, parse_strategy("nearest"), probs, x, t, x0_hat).tolist() == [
        [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    certain = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert T.strategy_weights(ddm, parse_strategy("nearest"), certain, x, t, None).tolist() == [
        [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    # the oracle draws from the DDM's prior with the generator seeded by seed + 1
    w = T.strategy_weights(ddm, parse_strategy("oracle"), torch.full((6, 3), 1 / 3), torch.zeros(6, 2),
                           torch.full((6,), 0.5), None, seed=4)
    want = torch.multinomial(ddm.prior.expand(6, 3), 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    assert w.argmax(1).tolist() == want.tolist()
    w0 = T.strategy_weights(ddm, parse_strategy("oracle"), torch.full((6, 3), 1 / 3), torch.zeros(6, 2),
                            torch.full((6,), 0.5), None)
    want0 = torch.multinomial(ddm.prior.expand(6, 3), 1, generator=torch.Generator().manual_seed(1)).squeeze(1)
    assert w0.argmax(1).tolist() == want0.tolist()


def test_replay_state_restores_the_memory_of_a_step():
    ddm = small_ddm()
    x1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    tr = T.trace_strategy(ddm, "oracle", x1, 3)
    assert tr.x0_prev[0] is None and tr.x0_prev[1] is not None and tr.oracle is not None
    rows = torch.tensor([2, 0])
    st = T.replay_state(ddm, tr, 1, rows, seed=7)
    assert torch.equal(st.x0_hat, tr.x0_prev[1][rows]) and torch.equal(st.oracle, tr.oracle[rows])
    assert st.nearest is ddm.nearest and torch.equal(st.prior, ddm.prior)
    assert torch.equal(torch.rand(3, generator=st.generator), torch.rand(3, generator=torch.Generator().manual_seed(
        7 + 1000 + 1 + 1)))
    st0 = T.replay_state(ddm, tr, 0, rows, seed=7)
    assert st0.x0_hat is None
    tr2 = T.trace_strategy(ddm, "top-1", x1, 2)
    assert tr2.oracle is None and T.replay_state(ddm, tr2, 1, rows, 0).oracle is None
    lite = T.trace_strategy(ddm, "oracle", x1, 3, record=False)
    assert torch.equal(lite.x0, tr.x0) and torch.equal(lite.oracle, tr.oracle)
    assert lite.t.numel() == lite.x.numel() == lite.v.numel() == lite.probs.numel() == lite.w.numel() == 0
    assert lite.x0_prev == [] and lite.expert_calls_per_sample == tr.expert_calls_per_sample == 3.0
