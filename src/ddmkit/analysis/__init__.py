"""Stability and expert-data alignment diagnostics (`ddmkit analyze`).

    from ddmkit.analysis import analyze_run
    result = analyze_run("runs/demo")          # writes RUN/analysis/analysis.md, analysis.json, plots/

Modules: trace (recorded trajectories), stability, alignment, quality, strategies
(alignment-based routing), report, run (analyze_run). Importing this package only
registers the strategies; the rest loads on first use.
"""
from ddmkit.analysis import strategies  # noqa: F401

__all__ = ["analyze_run"]


def __getattr__(name):
    if name == "analyze_run":
        from ddmkit.analysis.run import analyze_run

        return analyze_run
    raise AttributeError(name)
