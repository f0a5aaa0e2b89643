"""Every routing strategy, in one table: name forms, parsing, documentation.

    strategy = parse_strategy("top-2")       # a strategy object (ddmkit.routing.strategies / adaptive)
    strategy_forms()                         # "full, top-K, ..." for messages and --help
    strategies_markdown()                         # the table in docs/routing.md

Configs, the command line and the docs all read this table, so a strategy
added here is accepted, listed and documented everywhere.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Callable

from ddmkit.errors import DDMError
from ddmkit.routing.adaptive import AdaptiveEntropy, AdaptiveMass, GatedTopK
from ddmkit.routing.strategies import Full, Nearest, Nucleus, Oracle, SampleK, Strategy, Switch, Threshold, TopK


@dataclass(frozen=True)
class StrategyForm:
    """One name form: its regex (groups passed to `build`), how it is written, what it does and
    how many experts it calls per sample per velocity evaluation; for a form with parameters, the values
    each accepts and an example name, which messages give for a name of the form with a bad parameter."""

    form: str
    pattern: str
    build: Callable[..., Strategy]  # raises ValueError naming the bad value
    description: str
    expert_calls: str
    sampled: bool = True  # False: only the analysis sampler (`ddmkit analyze`) runs it
    params: str = ""  # the values accepted, e.g. "K an integer >= 1"
    example: str = ""  # a name of the form that parses, e.g. "top-2"


NUMBER = r"[0-9.]+(?:[eE][-+]?[0-9]+)?"  # a decimal number, optionally in scientific notation (1e-9)
# a parameter as the built-in forms match it: with a minus sign too, so that sample-2@-1 is refused by its
# form's build for the value (temperature T must be > 0), not as an unknown name
SIGNED = rf"-?{NUMBER}"
INTEGER = r"-?\d+"


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _top_k(k: str) -> TopK:
    if int(k) < 1:
        raise ValueError("K must be >= 1")
    return TopK(int(k))


def _probability(p: str) -> float:
    if not 0 < _float(p) <= 1:
        raise ValueError("P must be in (0, 1]")
    return _float(p)


def _temperature(t: str | None) -> float:
    if t is not None and _float(t) <= 0:
        raise ValueError("temperature T must be > 0")
    return _float(t or "1.0")


def _entropy(h: str) -> AdaptiveEntropy:
    if _float(h) < 0:
        raise ValueError("the entropy H must be >= 0 nats")
    return AdaptiveEntropy(_float(h))


def _sample_k(k: str, t: str | None = None) -> SampleK:
    if int(k) < 1:
        raise ValueError("K must be >= 1")
    return SampleK(int(k), _temperature(t))


def _gated(k: str, a: str) -> GatedTopK:
    if int(k) < 1:
        raise ValueError("K must be >= 1")
    if not 0 <= _float(a) <= 180:
        raise ValueError("the angle A must be in [0, 180] degrees")
    return GatedTopK(int(k), _float(a))


STRATEGIES: list[StrategyForm] = [
    StrategyForm("full", r"full", lambda: Full(),
                 "w = r: every expert, weighted by the router (exactly the global velocity with exact experts "
                 "and router)", "K"),
    StrategyForm("top-K", rf"top-({INTEGER})", _top_k,
                 "the K largest r_k, renormalised (K at or above the number of experts: full routing)", "K",
                 params="K an integer >= 1", example="top-2"),
    StrategyForm("threshold-P", rf"threshold-({SIGNED})", lambda p: Threshold(_probability(p)),
                 "every r_k >= P, renormalised (the largest r_k if none: every expert tied for it)", "varies",
                 params="P in (0, 1]", example="threshold-0.1"),
    StrategyForm("sample-K[@T]", rf"sample-({INTEGER})(?:@({SIGNED}))?", _sample_k,
                 "K distinct experts drawn from r^(1/T) (Gumbel top-K), weights r renormalised over them (K at or "
                 "above the number of experts: full routing)", "K",
                 params="K an integer >= 1, T a temperature > 0 (1 if left out)", example="sample-2@0.5"),
    StrategyForm("nucleus-P[@T]", rf"nucleus-({SIGNED})(?:@({SIGNED}))?",
                 lambda p, t=None: Nucleus(_probability(p), _temperature(t)),
                 "one expert drawn from the smallest set holding mass P of r^(1/T)", "1",
                 params="P in (0, 1], T a temperature > 0 (1 if left out)", example="nucleus-0.9@0.5"),
    StrategyForm("switch", r"switch", lambda: Switch(),
                 "one expert per sample drawn from r at every velocity evaluation (not once per step: twice a "
                 "step with heun), weight 1 (stochastic switching; the same law as sample-1)", "1"),
    StrategyForm("oracle", r"oracle", lambda: Oracle(),
                 "one cluster per sample drawn once from the cluster proportions (from p(cluster | label) for "
                 "labelled samples) and kept for the whole trajectory", "1"),
    StrategyForm("nearest", r"nearest", lambda: Nearest(),
                 "the cluster whose centroid is nearest to the features of x0_hat = x_t - t v (v from the "
                 "previous velocity evaluation; on the first one an expert drawn from the router, as sample-1)", "1"),
    StrategyForm("adaptive-P", rf"adaptive-({SIGNED})", lambda p: AdaptiveMass(_probability(p)),
                 "the fewest experts (by r) whose mass reaches P, renormalised", "varies",
                 params="P in (0, 1]", example="adaptive-0.9"),
    StrategyForm("adaptive-ent-H", rf"adaptive-ent-({SIGNED})", _entropy,
                 "top-1 while the router entropy H(r) <= H nats, else the top ceil(exp(H(r))) experts", "varies",
                 params="H an entropy >= 0 nats", example="adaptive-ent-0.5"),
    StrategyForm("gated-K@A", rf"gated-({INTEGER})@({SIGNED})", _gated,
                 "top-K, but top-1 where a routed expert's velocity is more than A degrees from the top "
                 "expert's (needs the analysis sampler: `ddmkit analyze`)", "K + probes", sampled=False,
                 params="K an integer >= 1, A an angle in [0, 180] degrees", example="gated-2@30"),
]


def strategy_forms(sampled: bool = False) -> str:
    """The accepted name forms, for messages: 'full, top-K, ...' (sampled: only those the sampler runs)."""
    return ", ".join(s.form for s in STRATEGIES if s.sampled or not sampled)


STRATEGY_FORMS = strategy_forms()  # as the table is shipped (for --help texts)
SAMPLED_STRATEGY_FORMS = strategy_forms(sampled=True)


def _matched(name: str) -> tuple[StrategyForm, re.Match] | None:
    """The table's entry whose pattern a strategy name has, with the match; None for an unknown name.
    A name that two entries' patterns match (an added form overlapping another) is refused."""
    matches = [(entry, m) for entry in STRATEGIES if (m := re.fullmatch(entry.pattern, name.strip()))]
    if len(matches) > 1:
        forms = " and ".join(repr(entry.form) for entry, _ in matches)
        raise DDMError(f"routing strategy {name.strip()!r} matches the patterns of the forms {forms} of "
                       "ddmkit.routing.STRATEGIES; give an added form a pattern no other form matches")
    return matches[0] if matches else None


def strategy_form(name: str) -> str | None:
    """The form of the table a strategy name has, e.g. 'top-K' for 'top-2'; None for an unknown name."""
    matched = _matched(name)
    return matched[0].form if matched else None


def _spellings(name: str) -> list[str]:
    """The spellings a strategy name most likely meant, the likeliest first: the dash put back and capitals
    lowered (top2, Top-2 -> top-2), then a misspelt word replaced by the nearest words of the forms (topp-2 ->
    top-2, nucleous-0.9 -> nucleus-0.9)."""
    guess = re.sub(r"([a-z])(\d)", r"\1-\2", name.lower())
    word, rest = re.match(r"([a-z]*)(.*)", guess).groups()
    words = sorted({re.match(r"[a-z]*", entry.form).group() for entry in STRATEGIES} - {""})
    return [near + rest for near in [word, *difflib.get_close_matches(word, words, n=3)]]


def _name_meant(name: str) -> str | None:
    """The strategy name a mistyped one most likely meant (a spelling of it that a form matches), or None."""
    return next((s for s in _spellings(name) if s != name and strategy_form(s) is not None), None)


def _words(entry: StrategyForm) -> str:
    """The words a form's names begin with: 'top-' for top-K, 'adaptive-ent-' for adaptive-ent-H, 'full'."""
    return re.match(r"[a-z-]*", entry.form).group()


def _form_meant(name: str) -> tuple[StrategyForm, str] | None:
    """The form with parameters that a name no pattern matches most likely meant (top-2.5, sampel-2@x), with the
    spelling that gave it: the first spelling (the name, then _spellings) to begin with the words of a form with
    parameters, the longest such words (adaptive-ent- before adaptive-), or to be those words without the dash
    (top); None if none does."""
    for spelling in [name, *_spellings(name)]:
        forms = [e for e in STRATEGIES if _words(e).endswith("-") and e.form != _words(e)
                 and (spelling.startswith(_words(e)) or spelling == _words(e)[:-1])]
        if forms:
            return max(forms, key=lambda e: len(_words(e))), spelling
    return None


def _takes(entry: StrategyForm, lead: str) -> str:
    """What a form takes, for messages: lead + 'K an integer >= 1, e.g. top-2' ('' for a form that says
    neither)."""
    takes = ", ".join(filter(None, [entry.params, entry.example and f"e.g. {entry.example}"]))
    return lead + takes if takes else ""


def _meant_form(name: str, entry: StrategyForm, forms: str) -> str:
    """The message for a mistyped name whose form is clear but not its parameters (nucleous-1.5, topp-x)."""
    return (f"unknown routing strategy {name!r}; did you mean a name of the form {entry.form}?"
            + _takes(entry, " It takes ") + f"{'.' if _takes(entry, '') else ''} Accepted forms: {forms}")


def _analysis_only(measured: str, forms: str) -> str:
    """Why the sampler refuses a form only the analysis sampler runs (gated-K@A), and the command that measures
    `measured`, for messages that open with the strategy's name or form."""
    return (f"compares the experts' velocities, which only the analysis sampler gives: measure it with `ddmkit "
            f"analyze RUN --strategy {measured}`; the sampler runs {forms}")


def depends_on_the_state_alone(strategy: Strategy) -> bool:
    """Whether a strategy's weights are a function of (x_t, t) and the router's probabilities alone, i.e. define a
    field: not oracle and nearest (they remember the trajectory, and need a run's partition) nor gated-K@A (the
    analysis sampler's)."""
    return not isinstance(strategy, (Oracle, Nearest, GatedTopK))


def parse_strategy(spec: str, sampled: bool = False) -> Strategy:
    """A strategy object from its name, e.g. 'top-2', 'nucleus-0.9@0.5', 'threshold-1e-3'
    (spaces around the name are dropped). sampled: refuse the forms only the analysis sampler runs
    (gated-K@A), naming `ddmkit analyze`."""
    forms = strategy_forms(sampled)
    if not isinstance(spec, str):
        raise DDMError(f"a routing strategy is a name (a string) such as 'top-2'; got {type(spec).__name__} "
                       f"{spec!r}; accepted forms: {forms}")
    name = spec.strip()
    matched = _matched(name)
    if matched is None:
        guess = _name_meant(name)
        if guess is not None:
            try:
                parse_strategy(guess, sampled)
            except DDMError:  # the name meant has a bad parameter too (nucleous-1.5): say what its form takes
                raise DDMError(_meant_form(name, _matched(guess)[0], forms)) from None
            raise DDMError(f"unknown routing strategy {name!r}; did you mean {guess!r}? Accepted forms: {forms}")
        meant = _form_meant(name)
        if meant is not None and (meant[0].sampled or not sampled):  # top-2.5, sample-2@x: a form's words
            entry, spelling = meant
            if spelling != name:
                raise DDMError(_meant_form(name, entry, forms))
            raise DDMError(f"strategy {name!r} is not a name of the form {entry.form}"
                           + _takes(entry, f"; {entry.form} takes "))
        if meant is not None and meant[1] == name:  # gated-2@nan to the sampler: its form, and where it runs
            entry = meant[0]
            raise DDMError(f"strategy {name!r} is not a name of the form {entry.form}"
                           + _takes(entry, f"; {entry.form} takes ") + f"; {entry.form} "
                           + _analysis_only(entry.example or entry.form, forms))
        raise DDMError(f"unknown routing strategy {name!r}; accepted forms: {forms}")
    entry, m = matched
    try:
        strategy = entry.build(*[g for g in m.groups() if g is not None])
    except ValueError as e:  # a parameter out of its range, e.g. sample-2@-1: what the form takes, an example
        if entry.sampled or not sampled:
            raise DDMError(f"strategy {name!r}: {e}" + _takes(entry, f"; {entry.form} takes ")) from None
        strategy = None  # the analysis sampler's (gated-0@30 to the sampler): refused below, naming one that parses
    if sampled and not entry.sampled:
        measured = name if strategy is not None else entry.example or entry.form
        raise DDMError(f"strategy {name!r} " + _analysis_only(measured, forms))
    if not isinstance(strategy, Strategy):
        raise DDMError(f"strategy {name!r}: the build of its form {entry.form!r} returned {type(strategy).__name__}, "
                       "not a ddmkit.routing.Strategy (subclass Strategy, or Selecting for a strategy with select)")
    return strategy


def canonical_name(spec: str) -> str:
    """The one name a strategy is written by, e.g. 'top-2' for 'top-02', 'sample-2' for 'sample-2@1',
    'threshold-0.5' for 'threshold-.5': its object's name where that name parses back to an equal strategy
    (else the name given, stripped), so that spellings of one strategy name one sample set."""
    strategy = parse_strategy(spec)
    name = getattr(strategy, "name", None)
    try:
        return name if isinstance(name, str) and parse_strategy(name) == strategy else spec.strip()
    except DDMError:
        return spec.strip()


def strategies_markdown() -> str:
    """The strategy table of docs/routing.md."""
    rows = ["| name | weights | expert calls per evaluation |", "|---|---|---|"]
    rows += [f"| `{s.form}` | {s.description} | {s.expert_calls} |" for s in STRATEGIES]
    return "\n".join(rows)
