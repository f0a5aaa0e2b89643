"""The plots and text of `ddmkit analyze` on hand-made results: every strategy drawn, in its own colour,
panels that do not overlap, and undefined correlations in words."""
import math
import warnings

import pytest
from matplotlib.colors import to_rgba

from ddmkit.analysis import report as A

NAMES = ["full", "top-1", "top-2", "sample-2", "threshold-0.05", "switch", "oracle", "nearest", "adaptive-0.9",
         "adaptive-ent-0.5", "gated-2@30"]  # the 11 default strategies


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, kept open instead of written."""
    saved = []
    monkeypatch.setattr(A, "save_figure", lambda fig, path: saved.append(fig))
    return saved


def solid_lines(fig):
    return [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "-"]


def test_expert_error_draws_a_strategy_that_routes_every_expert(figures):
    """full has no "not routed" error (all NaN): its routed line is drawn, its dashed one is not, and a plot of
    full alone has a legend (no matplotlib warning)."""
    nan = math.nan
    held = {"t": [0.2, 0.8], "routed": {"full": [0.5, 0.25]}, "not_routed": {"full": [nan, nan]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.plot_expert_error(held, None)
    (line,) = figures[0].axes[0].get_lines()
    assert (line.get_label(), list(line.get_ydata()), line.get_linestyle()) == ("full", [0.5, 0.25], "-")
    assert [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()] == ["full"]


def test_the_default_strategies_get_distinct_colours(figures):
    per = {name: {"lipschitz": {"t": [0.1, 0.9], "top": [1.0, 2.0], "fd": [1.0, 2.0]},
                  "by_step": {"t": [0.1, 0.9], "pair": [1.0, 2.0]}} for name in NAMES}
    held = {"t": [0.1, 0.9], "routed": {n: [1.0, 2.0] for n in NAMES}, "not_routed": {n: [3.0, 4.0] for n in NAMES}}
    A.plot_lipschitz(per, None)
    A.plot_disagreement(per, None)
    A.plot_expert_error(held, None)
    for fig in figures:
        colours = [to_rgba(ln.get_color()) for ln in solid_lines(fig)]
        assert len(colours) == 11 and len(set(colours)) == 11


def test_scatter_panel_titles_clear_the_row_above(figures):
    A.plot_quality_scatter({n: ([1.0, 2.0], [3.0, 4.0]) for n in NAMES}, "NLL", None)
    fig = figures[0]
    fig.canvas.draw()
    axes = fig.axes
    for upper, lower in zip(axes[:8], axes[4:]):
        if lower.axison:
            assert lower.title.get_window_extent().y1 < upper.xaxis.label.get_window_extent().y0


def test_undefined_correlations_are_words():
    nan = math.nan
    assert A._ci({"rho": nan, "lo": nan, "hi": nan, "why": "constant rank"}) == "undefined (constant rank)"
    assert A._ci({"rho": 0.5, "lo": nan, "hi": nan}) == "+0.50 (no interval: every bootstrap draw was constant)"
    assert A._point(nan, 1) == "undefined (fewer than 3 strategies)" and A._point(-0.25, 3) == "-0.25"


def test_an_undefined_cell_reads_a_dash_not_nan():
    """A t band without a measured step printed 'nan' in every row."""
    from ddmkit.analysis.report import band_table
    per = {"full": {"bands": {"t": ["[0, 0.25)", "[0.25, 0.5)"], "L_top": [1.5, float("nan")]}}}
    assert band_table(per, "L_top").splitlines()[-1] == "| full | 1.5 | - |"


def test_the_heldout_error_table_writes_an_undefined_error_as_the_summary_does():
    """full routes every expert, so it has no 'not routed' error: the per-t table printed 'nan' where the
    strategy table prints '-'."""
    nan = math.nan
    held = {"t": [0.05], "routed": {"full": [0.5], "top-1": [0.25]}, "not_routed": {"full": [nan], "top-1": [0.125]}}
    assert A.heldout_table(held).splitlines()[-1] == "| 0.05 | 0.5 / - | 0.25 / 0.125 |"
    assert A.table(["err not routed"], [[nan]]).splitlines()[-1] == "| - |"
