"""Fast unit tests of ddmkit.routing on hand-made router outputs: name forms and their limits, the exact
boundaries of the adaptive and threshold strategies, the gated strategy's probes, Gumbel sampling against
an independent draw, and the statistics-only router's checks."""
import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.routing import ExpertProbe, RoutingState, parse_strategy, routed_velocity
from ddmkit.routing import adaptive as AD
from ddmkit.routing import stats_router as SR
from ddmkit.routing.strategies import Oracle, SampleK, Threshold, TopK
from ddmkit.routing.table import STRATEGIES, strategy_form, strategy_forms

F64 = torch.float64


def state(seed=0, **kw):
    return RoutingState(generator=torch.Generator().manual_seed(seed), **kw)


# ----- the table of name forms ------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("top-0", "K must be >= 1"), ("sample-0", "K must be >= 1"), ("sample-2@0", "temperature T must be > 0"),
    ("threshold-0", "P must be in (0, 1]"), ("threshold-1.5", "P must be in (0, 1]"),
    ("nucleus-0.5@0", "temperature T must be > 0"), ("adaptive-0", "P must be in (0, 1]"),
    ("gated-0@30", "K must be >= 1"),
    ("gated-2@180.5", "the angle A must be in [0, 180] degrees"),
    # negative values: the names of a known form, refused for the value (they were 'unknown routing strategy')
    ("sample-2@-1", "temperature T must be > 0"), ("adaptive-ent--1", "the entropy H must be >= 0 nats"),
    ("top--1", "K must be >= 1"), ("sample--2", "K must be >= 1"), ("threshold--0.1", "P must be in (0, 1]"),
    ("nucleus--0.9", "P must be in (0, 1]"), ("nucleus-0.9@-0.5", "temperature T must be > 0"),
    ("adaptive--0.5", "P must be in (0, 1]"), ("gated-2@-30", "the angle A must be in [0, 180] degrees"),
    ("sample-2@1.2.3", "1.2.3 is not a number")])
def test_bad_values_are_named(spec, message):
    """The value's range, then what the form takes, with an example name that parses as that form."""
    with pytest.raises(DDMError) as e:
        parse_strategy(spec)
    form = strategy_form(spec)
    assert str(e.value).startswith(f"strategy {spec!r}: {message}; {form} takes "), str(e.value)
    example = str(e.value).rsplit("e.g. ", 1)[1]
    assert strategy_form(example) == form and parse_strategy(example)


@pytest.mark.parametrize("spec, form", [("top-2.5", "top-K"), ("top-x", "top-K"), ("top", "top-K"),
                                        ("sample-2@x", "sample-K[@T]"), ("adaptive-ent-x", "adaptive-ent-H"),
                                        ("adaptive-x", "adaptive-P"), ("nucleus-0.9@", "nucleus-P[@T]")])
def test_a_name_of_a_forms_words_with_a_parameter_no_pattern_reads_says_what_the_form_takes(spec, form):
    with pytest.raises(DDMError) as e:
        parse_strategy(spec)
    entry = next(s for s in STRATEGIES if s.form == form)
    assert str(e.value) == (f"strategy {spec!r} is not a name of the form {form}; {form} takes {entry.params}, "
                            f"e.g. {entry.example}")


@pytest.mark.parametrize("spec, form", [("nucleous-1.5", "nucleus-P[@T]"), ("Top-0", "top-K"),
                                        ("topp-2.5", "top-K"), ("sampel", "sample-K[@T]")])
def test_a_misspelt_name_with_a_bad_parameter_is_pointed_to_its_form_not_to_another_bad_name(spec, form):
    """nucleous-1.5 was answered 'did you mean nucleus-1.5?', a name refused in turn."""
    with pytest.raises(DDMError) as e:
        parse_strategy(spec)
    entry = next(s for s in STRATEGIES if s.form == form)
    assert str(e.value).startswith(f"unknown routing strategy {spec!r}; did you mean a name of the form {form}? "
                                   f"It takes {entry.params}, e.g. {entry.example}. Accepted forms: ")


def test_every_form_with_parameters_gives_an_example_that_parses_as_itself():
    for entry in STRATEGIES:
        if "-" in entry.form:
            assert entry.params and strategy_form(entry.example) == entry.form and parse_strategy(entry.example)


def test_limits_are_accepted_and_values_passed():
    assert parse_strategy("threshold-1").p == 1.0 and parse_strategy("adaptive-1").p == 1.0
    assert parse_strategy("gated-1@0") == AD.GatedTopK(1, 0.0)
    assert parse_strategy("gated-3@180") == AD.GatedTopK(3, 180.0)
    assert parse_strategy("gated-2@0.5").angle == 0.5
    assert parse_strategy("sample-2@0.5") == SampleK(2, 0.5) and parse_strategy("sample-3") == SampleK(3, 1.0)
    assert parse_strategy(" top-2 ") == TopK(2)
    with pytest.raises(DDMError) as e:
        parse_strategy("bogus")
    assert str(e.value) == f"unknown routing strategy 'bogus'; accepted forms: {strategy_forms()}"
    assert strategy_forms() == ", ".join(s.form for s in STRATEGIES) and strategy_forms().startswith("full, top-K, ")


# ----- adaptive strategies at their exact boundaries --------------------------------------------------
def test_adaptive_mass_stops_once_the_preceding_mass_reaches_p():
    probs = torch.tensor([[0.25, 0.5, 0.25], [0.125, 0.125, 0.75]], dtype=F64)
    w = AD.AdaptiveMass(0.5).weights(probs, state())
    assert w.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    w = AD.AdaptiveMass(0.75).weights(probs, state())
    assert w.tolist() == [[1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0]]


def test_adaptive_entropy_is_top_1_at_the_threshold_itself():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25]], dtype=F64)
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(1)
    w = AD.AdaptiveEntropy(float(ent[0])).weights(probs, state())
    assert w[0].tolist() in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    assert w[1].tolist() == [0.25, 0.5, 0.25]  # perplexity 2.83 -> 3 experts


class Experts:
    """Expert k's velocity at (x, t): a fixed direction times (1 + t), counted per call."""

    def __init__(self, dirs):
        self.dirs = torch.tensor(dirs, dtype=F64)
        self.calls = []

    def fns(self):
        return [self.make(k) for k in range(len(self.dirs))]

    def make(self, k):
        def f(x, t):
            self.calls.append((k, len(x)))
            return self.dirs[k].expand(len(x), -1) * (1 + t)[:, None] + 0 * x
        return f


class Counter:
    def __init__(self):
        self.added = []

    def add(self, e, n):
        self.added.append((e, n))


def gated_state(x, t, experts, counter=None):
    return RoutingState(probe=ExpertProbe(experts=experts, counter=counter, x=x, t=t))


def test_probe_evaluates_each_expert_once_on_its_rows():
    ex = Experts([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    x = torch.zeros(3, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0, 0.5], dtype=F64)
    counter = Counter()
    idx = torch.tensor([[0, 2], [1, 0], [2, 1]])
    out = AD.probe(gated_state(x, t, ex.fns(), counter), idx)
    want = torch.stack([torch.stack([ex.dirs[i] * (1 + t[b]) for i in row]) for b, row in enumerate(idx.tolist())])
    assert out.dtype == F64 and torch.equal(out, want)
    assert sorted(counter.added) == [(0, 2), (1, 2), (2, 2)] and sorted(ex.calls) == [(0, 2), (1, 2), (2, 2)]
    one = AD.probe(gated_state(x[:1], t[:1], ex.fns()), torch.tensor([[1]]))
    assert one.tolist() == [[[0.0, 2.0]]]


def test_gated_top_k_splits_where_an_expert_turns_away():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]], dtype=F64)
    # expert 0 along x, expert 1 at 45 degrees, expert 2 along -x
    ex = Experts([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    x = torch.zeros(3, 2, dtype=F64)
    t = torch.zeros(3, dtype=F64)
    w = AD.GatedTopK(2, 50.0).weights(probs, gated_state(x, t, ex.fns()))
    # rows 0 and 1: 45 degrees apart, averaged; row 2: experts 1 and 2 are 135 degrees apart, top-1
    assert torch.allclose(w, torch.tensor([[0.625, 0.375, 0.0], [0.625, 0.375, 0.0], [0.0, 1.0, 0.0]], dtype=F64))
    w = AD.GatedTopK(2, 40.0).weights(probs, gated_state(x, t, ex.fns()))
    assert w.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    w = AD.GatedTopK(3, 50.0).weights(probs, gated_state(x, t, ex.fns()))
    assert w.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # expert 2 opposes: top-1
    w = AD.GatedTopK(1, 0.0).weights(probs[:1], gated_state(x[:1], t[:1], ex.fns()))
    assert w.tolist() == [[1.0, 0.0, 0.0]]


def test_gated_top_k_calls_no_expert_of_probability_zero():
    """gated-3 on r = [0.6, 0.4, 0] probed expert 2 too (weight 0 whatever it says) and counted its calls."""
    ex, counter = Experts([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]), Counter()
    probs = torch.tensor([[0.6, 0.4, 0.0], [0.5, 0.0, 0.5]], dtype=F64)
    w = AD.GatedTopK(3, 50.0).weights(probs, gated_state(torch.zeros(2, 2, dtype=F64), torch.zeros(2, dtype=F64),
                                                         ex.fns(), counter))
    assert sorted(counter.added) == [(0, 2), (1, 1), (2, 1)] and sorted(ex.calls) == [(0, 2), (1, 1), (2, 1)]
    assert w.tolist() == [[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]]  # row 1: experts 0 and 2 oppose, top-1


def test_gated_top_k_angle_zero_and_parallel_experts():
    probs = torch.tensor([[0.5, 0.5]], dtype=F64)
    ex = Experts([[1.0, 0.0], [2.0, 0.0]])  # parallel: cos exactly 1, not below cos(0)
    w = AD.GatedTopK(2, 0.0).weights(probs, gated_state(torch.zeros(1, 2, dtype=F64), torch.zeros(1, dtype=F64),
                                                          ex.fns()))
    assert w.tolist() == [[0.5, 0.5]]


def test_gated_top_k_needs_the_analysis_sampler():
    want = ("strategy 'gated-2@30' compares expert velocities and needs the analysis sampler; use `ddmkit analyze "
            "--strategy` (or ddmkit.analysis.trace.trace_strategy)")
    for probe in (None, ExpertProbe(experts=[])):  # no probe, or one the analysis sampler has not set yet
        with pytest.raises(DDMError) as e:
            AD.GatedTopK(2, 30.0).weights(torch.ones(1, 2) / 2, RoutingState(probe=probe))
        assert str(e.value) == want


# ----- fixed strategies -------------------------------------------------------------------------------
def test_top_1_gives_weight_zero_to_a_zero_row_and_keeps_the_dtype():
    idx, w = TopK(1).select(torch.tensor([[0.0, 0.0], [0.25, 0.75]], dtype=F64), state())
    assert idx.tolist() == [[0], [1]] and w.tolist() == [[0.0], [1.0]] and w.dtype == F64
    for spec in ("switch", "nucleus-0.5", "nearest"):
        w = parse_strategy(spec).weights(torch.tensor([[0.25, 0.75]], dtype=F64), state())
        assert w.dtype == F64 and float(w.sum()) == 1.0


def test_threshold_keeps_entries_equal_to_p_and_each_rows_own_max():
    probs = torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], dtype=F64)
    w = Threshold(0.25).weights(probs, state())
    assert torch.allclose(w, torch.tensor([[0.25, 0.25, 0.5], [0.0, 0.0, 1.0], [0.3, 0.3, 0.4]], dtype=F64))
    w = Threshold(0.9).weights(probs, state())
    assert w.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]


def test_sample_k_is_gumbel_top_k_of_tempered_log_probabilities():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]], dtype=F64)
    for k, temp in ((1, 1.0), (2, 2.0)):
        idx, w = SampleK(k, temp).select(probs, state(7))
        g = torch.Generator().manual_seed(7)
        u = torch.rand(probs.shape, generator=g, dtype=F64)
        want = (probs.log() / temp - (-u.log()).log()).topk(k, dim=1).indices
        assert torch.equal(idx, want)
        p = probs.gather(1, want)
        assert torch.allclose(w, p / p.sum(1, keepdim=True)) and w.dtype == F64


def test_sample_k_frequencies_follow_r_to_the_power_one_over_t():
    probs = torch.tensor([[0.9, 0.1]], dtype=F64).expand(4000, 2)
    idx, _ = SampleK(1, 2.0).select(probs, state(1))
    share = float((idx == 0).double().mean())
    assert share == pytest.approx(0.75, abs=0.025)  # 0.9^0.5 / (0.9^0.5 + 0.1^0.5)
    idx, _ = SampleK(1, 1.0).select(probs, state(1))
    assert float((idx == 0).double().mean()) == pytest.approx(0.9, abs=0.02)


def test_nucleus_stops_once_the_preceding_mass_reaches_p():
    probs = torch.tensor([[0.5, 0.25, 0.25]], dtype=F64).expand(400, 3)
    idx, w = parse_strategy("nucleus-0.5").select(probs, state(2))
    assert (idx == 0).all() and (w == 1).all()


def test_oracle_needs_the_cluster_proportions_and_draws_in_the_probs_dtype():
    with pytest.raises(DDMError) as e:
        Oracle().select(torch.ones(2, 2, dtype=F64) / 2, state())
    assert str(e.value) == "strategy 'oracle' needs the cluster proportions (a partition manifest)"
    st = state(3, prior=torch.tensor([0.0, 1.0]))
    idx, w = Oracle().select(torch.ones(5, 2, dtype=F64) / 2, st)
    assert idx.flatten().tolist() == [1] * 5 and w.dtype == F64 and torch.equal(st.oracle, torch.ones(5).long())


# ----- the routed velocity ---------------------------------------------------------------------------
def test_routed_velocity_passes_conditioning_and_counts_calls():
    seen = []

    def expert(c):
        def f(x, t, y=None):
            seen.append(("expert", c, None if y is None else y.tolist()))
            return torch.full_like(x, float(c))
        return f

    def router(x, t, y=None):
        seen.append(("router", None if y is None else y.tolist()))
        return torch.tensor([[0.25, 0.75]]).expand(len(x), 2)

    x, t = torch.zeros(2, 2), torch.full((2,), 0.5)
    for spec, want in (("full", 0.75), ("top-1", 1.0), ("top-2", 0.75)):
        seen.clear()
        st = state()
        v = routed_velocity([expert(0), expert(1)], router, parse_strategy(spec), st,
                            cond={"y": torch.tensor([3, 4])}, router_cond={"y": torch.tensor([5, 6])})
        out = v(x, t)
        assert torch.allclose(out, torch.full((2, 2), want))
        assert ("router", [5, 6]) in seen and all(s[2] == [3, 4] or s[2] == [3] or s[2] == [4]
                                                  for s in seen if s[0] == "expert")
        assert torch.allclose(st.x0_hat, x - 0.5 * out)
    st = state()
    v = routed_velocity([expert(0), expert(1)], router, parse_strategy("top-1"), st, router_every=2)
    for _ in range(3):
        v(x, t)
    assert [s for s in seen if s[0] == "router"].count(("router", None)) == 2


# ----- the statistics-only router ---------------------------------------------------------------------
def test_island_statistics_checks_and_forms():
    with pytest.raises(DDMError, match=r"^island statistics need at least 2 samples, got 1$"):
        SR.island_statistics(torch.zeros(1, 3))
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    two = SR.island_statistics(x)
    assert two["count"].item() == 2.0 and two["mean"].tolist() == [1.0, 2.0]
    assert two["cov"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * torch.tensor([3.0, 1.0, 0.5])
    at_limit = SR.island_statistics(x, max_full_dim=3)
    assert "cov" in at_limit and torch.allclose(at_limit["cov"], torch.cov(x.T))
    low = SR.island_statistics(x, max_full_dim=2)
    assert low["factors"].shape == (3, 3)  # rank min(32, d, n - 1)
    cov = torch.cov(x.T)
    approx = low["factors"] @ torch.diag(low["eigvals"]) @ low["factors"].T + torch.diag(low["diag"])
    assert torch.allclose(approx, cov, atol=1e-5)
    r1 = SR.island_statistics(x, rank=1)
    evals, evecs = torch.linalg.eigh(cov)
    assert r1["eigvals"].item() == pytest.approx(evals[-1].item())
    assert torch.allclose(r1["diag"], (torch.diag(cov) - r1["factors"][:, 0] ** 2 * evals[-1]).clamp_min(1e-6))
    assert SR.island_statistics(x[:3], rank=5)["factors"].shape == (3, 2)  # n - 1 = 2
    assert SR.island_statistics(torch.randn(4, 9, dtype=F64), rank=8)["factors"].shape == (9, 3)


def test_island_class_statistics_need_two_samples_of_a_class():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    per = SR.island_class_statistics(x, labels, 4, rank=1)
    assert per[1] is None and per[3] is None
    assert per[0]["count"].item() == 2.0 and per[0]["factors"].shape == (3, 1)
    assert torch.allclose(per[2]["mean"], x[3:].mean(0)) and per[2]["factors"].shape == (3, 1)
    assert "cov" in SR.island_class_statistics(x, labels, 3)[0]


def test_stats_router_checks_and_statistics_files(tmp_path):
    with pytest.raises(DDMError, match="^the statistics-only router needs the statistics of at least one island$"):
        SR.stats_router([])
    full = {"count": torch.tensor(2.0), "mean": torch.zeros(2, dtype=F64), "cov": torch.eye(2, dtype=F64)}
    low = {"count": torch.tensor(2.0), "mean": torch.zeros(2, dtype=F64), "factors": torch.zeros(2, 0, dtype=F64),
           "eigvals": torch.zeros(0, dtype=F64), "diag": torch.ones(2, dtype=F64)}
    with pytest.raises(DDMError, match="^island statistics mix full covariances and low-rank ones; publish all in "
                                       "one form$"):
        SR.stats_router([full, low])
    SR.save_statistics(tmp_path / "s.safetensors", full)
    from ddmkit.io import read_metadata
    assert read_metadata(tmp_path / "s.safetensors") == {"role": "island_statistics"}
    loaded = SR.load_statistics(tmp_path / "s.safetensors")
    assert set(loaded) == {"count", "mean", "cov"} and loaded["count"].dtype == F64
    for drop in ("count", "mean", "cov"):
        SR.save_statistics(tmp_path / "b.safetensors", {k: v for k, v in full.items() if k != drop})
        with pytest.raises(DDMError, match="not island statistics"):
            SR.load_statistics(tmp_path / "b.safetensors")


def test_low_rank_router_matches_the_full_one_and_uses_the_counts():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(30, 2, generator=gen, dtype=F64) * 0.5 + c for c in (torch.tensor([2.0, 0.0]),
                                                                          torch.tensor([-2.0, 1.0]))]
    xs[1] = xs[1][:10]
    full = [SR.island_statistics(x) for x in xs]
    low = [SR.island_statistics(x, rank=2) for x in xs]
    q = torch.randn(5, 2, generator=gen, dtype=F64)
    t = torch.full((5,), 0.4, dtype=F64)
    a, b = SR.stats_router(full)(q, t), SR.stats_router(low)(q, 0.4)
    assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-4)
    gmm = SR.full_mixture(full)
    assert gmm.weights.tolist() == pytest.approx([0.75, 0.25])
    assert torch.allclose(a, gmm.posterior(q, t).float(), atol=1e-6)
    low[1] = SR.island_statistics(xs[1], rank=1)  # ranks differ: padded with zero eigenvalues
    c = SR.stats_router(low)(q, t)
    assert torch.allclose(c.sum(1), torch.ones(5)) and not torch.allclose(c, b, atol=1e-6)
