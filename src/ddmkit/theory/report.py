"""Shared pieces of the theory reports: log-log fits with bootstrap intervals,
t-intervals over seeds, Markdown tables, and writing report.md / results.json / PNG plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ddmkit.errors import DDMError
import ddmkit.evaluation.plots as plots
from ddmkit.evaluation.plots import pyplot
from ddmkit.tables import markdown_table as _markdown_table
from ddmkit.io import write_bytes_atomic, write_json


def value_error(name: str, value, what: str) -> DDMError:
    """The one way a study or a theory function refuses a value: its name, the value and what to give instead,
    'DistillSettings.seeds: 0; give an integer >= 1' or "get_path: name: 'vp'; give one of 'linear', 'ou'"."""
    return DDMError(f"{name}: {value!r}; give {what}")


def is_count(value, least: int) -> bool:
    """Whether `value` is an integer (not a bool) >= least."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= least


NUMBER_TESTS = {"positive": lambda v: v > 0, "non-negative": lambda v: v >= 0, "finite": lambda v: True}


def is_number(value, kind: str) -> bool:
    """Whether `value` is a finite number (not a bool, not an integer past the floats) that is `kind`, a key of
    NUMBER_TESTS."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(value) and NUMBER_TESTS[kind](value)
    except OverflowError:  # 10**400
        return False


def setting_error(s, field: str, what: str) -> DDMError:
    """A study's refusal of its setting `field` (value_error): 'DistillSettings.seeds: 0; give an integer >= 1'."""
    return value_error(f"{type(s).__name__}.{field}", getattr(s, field), what)


def check_settings(s, counts: dict[str, int], numbers: dict[str, str], lists: tuple[str, ...],
                   may_be_empty: tuple[str, ...] = (), distinct: dict[str, int] | None = None) -> None:
    """A study's settings `s` (a dataclass) checked before it starts, a DDMError naming the first bad field:
    counts {field: least value} are integers (a list: each of its items); numbers {field: 'positive',
    'non-negative' or 'finite'} likewise for finite numbers; a field in `lists` is a non-empty tuple or list,
    one in `may_be_empty` a tuple or list; distinct {field: least length}: a list of at least that many values,
    none repeated (what a fit over the list needs)."""
    for field in lists + may_be_empty:
        value = getattr(s, field)
        if not isinstance(value, (tuple, list)) or (field in lists and not value):
            raise setting_error(s, field, "a non-empty tuple" if field in lists else "a tuple")
    lists += may_be_empty
    for field, least in counts.items():
        value = getattr(s, field)
        for v in value if field in lists else [value]:
            if not is_count(v, least):
                raise setting_error(s, field, f"{'integers' if field in lists else 'an integer'} >= {least}")
    for field, kind in numbers.items():
        value = getattr(s, field)
        for v in value if field in lists else [value]:
            if not is_number(v, kind):
                what = f"{'' if kind == 'finite' else kind + ' '}finite number"
                raise setting_error(s, field, what + "s" if field in lists else "a " + what)
    for field, least in (distinct or {}).items():
        value = getattr(s, field)
        if len(set(value)) < max(least, len(value)):
            raise setting_error(s, field, f"{f'at least {least} ' if least > 1 else ''}different values, none repeated")


def loglog_slope(x, y) -> tuple[float, float]:
    """Least-squares fit log y = slope log x + intercept; returns (slope, intercept)."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    slope, intercept = np.polyfit(lx, ly, 1)
    return float(slope), float(intercept)


def bootstrap_slope(x, per_sample_sq: np.ndarray, resamples: int = 500, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Slope of log RMS error against log x, with a percentile bootstrap interval.

    per_sample_sq is (len(x), n): the squared error of sample j at setting i.
    The bootstrap redraws the n samples (the same draw for every x, as they
    share their noise) and refits the slope of log sqrt(mean) on log x."""
    per_sample_sq = np.asarray(per_sample_sq, dtype=float)
    rms = np.sqrt(per_sample_sq.mean(1))
    slope, intercept = loglog_slope(x, rms)
    rng = np.random.default_rng(seed)
    n = per_sample_sq.shape[1]
    lx = np.log(np.asarray(x, dtype=float))
    slopes = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, n, n)
        slopes[r] = np.polyfit(lx, 0.5 * np.log(per_sample_sq[:, idx].mean(1)), 1)[0]
    lo, hi = np.quantile(slopes, [(1 - level) / 2, (1 + level) / 2])
    return {"slope": slope, "intercept": intercept, "ci_low": float(lo), "ci_high": float(hi)}


def t_interval(values, level: float = 0.95) -> dict:
    """Mean of independent values with a Student-t interval, mean +- t_{(1+level)/2, n-1} sd / sqrt(n)
    (sd with n - 1 in the denominator); with one value there is no interval (ci_low = ci_high = None)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) == 0:
        raise DDMError(f"t_interval needs a non-empty list of numbers; got shape {v.shape}")
    mean = float(v.mean())
    if len(v) == 1:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": 1}
    from scipy import stats  # scipy.stats takes a second to import: on first use, not at start-up

    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(v)}


def excludes_zero(interval: dict) -> bool:
    """True when a t_interval lies wholly above or wholly below 0 (False without an interval)."""
    return interval["ci_low"] is not None and (interval["ci_low"] > 0 or interval["ci_high"] < 0)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """The project's Markdown table with 3 significant digits."""
    return _markdown_table(headers, rows, digits=3)


def slope_text(fit: dict) -> str:
    """'-0.98 [-1.01, -0.95]'."""
    return f"{fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"


def new_figure(columns: int = 1, rows: int = 1, size: float = 4.0):
    """A matplotlib figure on the Agg backend (no display needed)."""
    fig, axes = pyplot().subplots(rows, columns, figsize=(size * columns + 0.5, size * rows), squeeze=False)
    return fig, axes


def save_figure(fig, path: Path) -> str:
    """Write fig as PNG atomically (evaluation.plots.save_figure); return the file name."""
    fig.tight_layout()
    plots.save_figure(fig, path, crop=False)
    return path.name


def write_outputs(out: Path, report: str, results: dict) -> None:
    """report.md and results.json into out."""
    write_bytes_atomic(out / "report.md", report.encode())
    write_json(out / "results.json", results)


