"""Routing strategies and the sparse combiner."""
import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.routing import CallCounter, RoutingState, combine, combine_dense, parse_strategy

ALL = ["full", "top-1", "top-2", "top-3", "threshold-0.1", "sample-1", "sample-2@0.5", "nucleus-0.9",
       "nucleus-0.5@2", "switch", "oracle", "nearest"]


def probs(gen, b=256, k=6):
    return torch.softmax(torch.randn(b, k, generator=gen) * 2, 1)


def state(gen, k=6):
    return RoutingState(generator=gen, prior=torch.full((k,), 1 / k), nearest=lambda x: (x[:, 0].abs() * 10).long() % k,
                        x0_hat=torch.randn(256, 3, generator=gen))


@pytest.mark.parametrize("name", ALL)
def test_weights_are_a_distribution(name, gen):
    p = probs(gen)
    w = parse_strategy(name).weights(p, state(gen))
    assert w.shape == p.shape and (w >= 0).all()
    assert torch.allclose(w.sum(1), torch.ones(len(p)), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_no_strategy_reads_the_gpu_on_the_host(name):
    """The plan's group sizes are a step's one host sync: every strategy's weights and select run without
    one (torch.cuda.set_sync_debug_mode("error") raises on a sync it detects)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.softmax(torch.randn(512, 6, device="cuda", generator=gen) * 2, 1)
    st = RoutingState(generator=gen, prior=torch.full((6,), 1 / 6, device="cuda"),
                      nearest=lambda x: (x[:, 0].abs() * 10).long() % 6, x0_hat=torch.randn(512, 3, device="cuda"))
    strategy = parse_strategy(name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        strategy.weights(p, st)
        if strategy.selects:
            strategy.select(p, st)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_top_k_keeps_the_largest_and_renormalises(gen):
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(parse_strategy("top-2").weights(p, None), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(parse_strategy("top-1").weights(p, None), torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(parse_strategy("full").weights(p, None), p)


def test_threshold_and_nucleus_sets():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(parse_strategy("threshold-0.1").weights(p, None), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    assert torch.allclose(parse_strategy("threshold-0.9").weights(p, None), torch.tensor([[1.0, 0, 0, 0]]))
    # nucleus 0.75 keeps {0, 1} (0.5 + 0.3 >= 0.75): it never picks 2 or 3
    st = RoutingState(generator=torch.Generator().manual_seed(0))
    picks = torch.stack([parse_strategy("nucleus-0.75").weights(p, st).argmax(1) for _ in range(400)])
    assert set(picks.flatten().tolist()) == {0, 1}
    share0 = (picks == 0).float().mean()
    assert abs(float(share0) - 0.5 / 0.8) < 0.07


def test_switch_draws_experts_with_router_probabilities(gen):
    p = torch.tensor([[0.6, 0.3, 0.1]]).expand(20000, 3)
    w = parse_strategy("switch").weights(p, RoutingState(generator=gen))
    assert torch.allclose(w.mean(0), p[0], atol=0.015)
    assert ((w == 1).sum(1) == 1).all()


def test_sample_2_draws_two_distinct_experts(gen):
    p = probs(gen)
    w = parse_strategy("sample-2").weights(p, RoutingState(generator=gen))
    assert ((w > 0).sum(1) == 2).all()


def test_oracle_keeps_its_cluster_and_follows_the_prior(gen):
    st = RoutingState(generator=gen, prior=torch.tensor([0.7, 0.2, 0.1]))
    s = parse_strategy("oracle")
    p = torch.full((5000, 3), 1 / 3)
    w1 = s.weights(p, st)
    w2 = s.weights(torch.softmax(torch.randn(5000, 3, generator=gen), 1), st)
    assert torch.equal(w1, w2)
    assert torch.allclose(w1.mean(0), torch.tensor([0.7, 0.2, 0.1]), atol=0.02)


def test_nearest_uses_x0_hat(gen):
    st = RoutingState(nearest=lambda x: torch.zeros(len(x), dtype=torch.long) + 2, x0_hat=torch.zeros(4, 2))
    w = parse_strategy("nearest").weights(torch.full((4, 3), 1 / 3), st)
    assert (w.argmax(1) == 2).all()


@pytest.mark.parametrize("name", ALL)
def test_sparse_combiner_equals_dense_and_skips_zero_rows(name, gen):
    k, b = 6, 256
    mats = [torch.randn(3, 3, generator=gen) for _ in range(k)]
    calls = [0] * k

    def make(i):
        def f(x, t):
            calls[i] += len(x)
            return x @ mats[i] + t[:, None] * (i + 1)
        return f

    experts = [make(i) for i in range(k)]
    x, t = torch.randn(b, 3, generator=gen), torch.rand(b, generator=gen)
    w = parse_strategy(name).weights(probs(gen, b, k), state(gen, k))
    counter = CallCounter()
    sparse = combine(experts, w, x, t, counter=counter)
    dense = combine_dense(experts, w, x, t)
    assert torch.allclose(sparse, dense, atol=1e-6)
    assert counter.total_rows == int((w != 0).sum())


def test_unknown_strategies_name_the_accepted_forms():
    for bad in ("top-0", "best-2", "threshold-1.5", "nucleus-0.9@0"):
        with pytest.raises(DDMError, match="top-K|must"):
            parse_strategy(bad)


def test_a_set_name_with_spaces_around_is_the_set_itself():
    from ddmkit.pipeline.samplesets import named_set, statistics_set

    assert named_set(" top-2 ", 10).name == "top-2" and named_set("monolith ", 10).kind.value == "monolith"
    assert statistics_set("top-2 ", 10).name == "top-2 (statistics-only router)"


def test_top_n_or_sample_n_with_n_at_least_k_calls_every_expert():
    from ddmkit.pipeline.samplesets import calls_every_expert

    assert calls_every_expert("top-4", 4) and calls_every_expert("top-5", 4)
    assert calls_every_expert("sample-4", 4) and calls_every_expert("sample-6@0.5", 4)
    assert not calls_every_expert("top-3", 4) and not calls_every_expert("sample-3", 4)
    assert not calls_every_expert("nucleus-1", 4) and not calls_every_expert("threshold-0.01", 4)


def test_the_full_routing_note_counts_one_expert_in_the_singular():
    """It said "K = 1 experts"."""
    from ddmkit.pipeline.samplesets import full_routing_note

    assert full_routing_note("top-1", 1) == \
        "top-1 on a DDM of K = 1 expert calls every expert: the same routing as full"
    assert full_routing_note("top-3", 2).startswith("top-3 on a DDM of K = 2 experts calls every expert")


def test_sample_n_with_n_at_least_k_gives_the_velocity_of_full():
    """What makes sample-n (n >= K) full routing under another name: the same combined velocity."""
    from ddmkit.routing import RoutingState, parse_strategy, routed_velocity

    g = torch.Generator().manual_seed(0)
    experts = [lambda x, t, s=s: x * s + s for s in (1.0, -2.0, 0.5)]
    probs = torch.randn(6, 3, generator=g).softmax(1)
    router = lambda x, t: probs  # noqa: E731
    x, t = torch.randn(6, 2, generator=g), torch.full((6,), 0.4)
    full = routed_velocity(experts, router, parse_strategy("full"), RoutingState(generator=g))(x, t)
    for name in ("sample-3", "sample-5@0.5"):
        v = routed_velocity(experts, router, parse_strategy(name), RoutingState(generator=g))(x, t)
        torch.testing.assert_close(v, full)


def test_gated_routing_is_refused_as_a_sampled_strategy_when_the_config_loads():
    """gated-K@A in sample.strategies passed the config check; the run trained every network, then stopped
    at sampling (it needs the analysis sampler)."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.errors import DDMError

    for field in ("strategies", "stats_router_strategies"):
        with pytest.raises(DDMError, match=rf"sample.{field}: strategy 'gated-2@30' compares the experts' velocities.*"
                                           r"`ddmkit analyze RUN --strategy gated-2@30`"):
            validate(RunConfig, {"sample": {field: ["top-1", "gated-2@30"]}})
    with pytest.raises(DDMError, match="sample.sweep_strategy: strategy 'gated-1@10'"):
        validate(RunConfig, {"sample": {"sweep_strategy": "gated-1@10"}})


def test_a_gated_name_out_of_range_names_a_command_that_runs_and_the_parameter_that_is_wrong():
    """gated-0@30 given to the sampler was sent to `ddmkit analyze RUN --strategy gated-0@30`, which refuses it;
    gated-2@200 was told that K must be >= 1 'and' the angle in [0, 180], not which of the two was wrong."""
    with pytest.raises(DDMError, match=r"`ddmkit analyze RUN --strategy gated-2@30`"):
        parse_strategy("gated-0@30", sampled=True)
    with pytest.raises(DDMError, match=r"`ddmkit analyze RUN --strategy gated-3@45`"):
        parse_strategy("gated-3@45", sampled=True)
    parse_strategy("gated-2@30")  # the command named parses
    with pytest.raises(DDMError, match=r"^strategy 'gated-2@200': the angle A must be in \[0, 180\] degrees; "):
        parse_strategy("gated-2@200")
    with pytest.raises(DDMError, match=r"^strategy 'gated-0@30': K must be >= 1; gated-K@A takes "):
        parse_strategy("gated-0@30")


def test_the_forms_named_for_sampling_leave_out_the_analysis_only_ones():
    """An unknown sampled strategy was answered with a list of forms that included gated-K@A, which the
    sampler then refused; study misalignment --strategy gated-2@30 was refused as sample.strategies (a field
    the user never wrote) only when its first run was configured."""
    from ddmkit.config import SampleConfig, validate
    from ddmkit.pipeline.misalignment import strategy_names
    from ddmkit.routing.table import SAMPLED_STRATEGY_FORMS, STRATEGY_FORMS

    assert "gated-K@A" in STRATEGY_FORMS and "gated-K@A" not in SAMPLED_STRATEGY_FORMS
    with pytest.raises(DDMError) as refused:
        validate(SampleConfig, {"strategies": ["top-1", "bogus"]})
    assert "unknown routing strategy 'bogus'" in str(refused.value) and "gated" not in str(refused.value)
    with pytest.raises(DDMError, match="--strategy: strategy 'gated-2@30' compares the experts' velocities"):
        strategy_names(["full", "gated-2@30"])
    assert parse_strategy("gated-2@30").name  # the analysis sampler still parses it


def test_one_table_parses_documents_and_validates_every_strategy():
    """docs/routing.md holds the table's own rendering; a strategy added to the table is accepted by
    the parser and by config validation, and listed in messages."""
    from pathlib import Path

    from ddmkit.config import RunConfig, SampleConfig, validate
    from ddmkit.errors import DDMError
    from ddmkit.routing import STRATEGIES, Strategy, StrategyForm, parse_strategy
    from ddmkit.routing.table import strategies_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "routing.md").read_text()
    assert strategies_markdown() in docs
    for entry in STRATEGIES:  # every row's form parses once its placeholders are filled in
        example = entry.form.replace("K@A", "2@30").replace("[@T]", "").replace("K", "2").replace("P", "0.5")
        parse_strategy(example.replace("-H", "-0.5"))

    class Greedy(Strategy):
        name = "greedy"

        def weights(self, probs, state):
            return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)

    with pytest.raises(DDMError, match="sample.strategies: unknown routing strategy 'greedy'"):
        validate(RunConfig, {"sample": {"strategies": ["greedy"]}})
    STRATEGIES.append(StrategyForm("greedy", r"greedy", lambda: Greedy(), "the argmax, weight 1", "1"))
    try:
        assert isinstance(parse_strategy("greedy"), Greedy) and SampleConfig(strategies=["greedy"])
        with pytest.raises(DDMError, match="accepted forms: .*greedy"):
            parse_strategy("nope")
        assert "`greedy`" in strategies_markdown()
    finally:
        STRATEGIES.pop()
    # an added form whose pattern overlaps a built-in one would never be reached: named instead
    STRATEGIES.append(StrategyForm("top-K-greedy", r"top-(\d+)", lambda k: Greedy(), "overlaps top-K", "1"))
    try:
        with pytest.raises(DDMError, match="'top-2' matches the patterns of the forms 'top-K' and 'top-K-greedy'"):
            parse_strategy("top-2")
        assert parse_strategy("full") is not None  # other names are unaffected
    finally:
        STRATEGIES.pop()


@pytest.mark.parametrize("typo, meant", [("top2", "top-2"), ("Top-2", "top-2"), ("TOP1", "top-1"),
                                         ("sample2", "sample-2"), ("threshold0.1", "threshold-0.1"),
                                         ("topp-2", "top-2"), ("nucleous-0.9", "nucleus-0.9"), ("swich", "switch"),
                                         ("Sampel2@0.5", "sample-2@0.5"), ("ful", "full")])
def test_a_strategy_name_without_its_dash_or_in_capitals_is_answered_with_the_name_meant(typo, meant):
    with pytest.raises(DDMError, match=rf"unknown routing strategy '{typo}'; did you mean '{meant}'\? Accepted forms"):
        parse_strategy(typo)
    with pytest.raises(DDMError) as info:
        parse_strategy("nope")
    assert "did you mean" not in str(info.value)


def test_strategy_names_are_strings_and_numbers_may_use_scientific_notation():
    from ddmkit.routing.strategies import Nucleus, Threshold, TopK

    for bad, kind in ((5, "int"), (None, "NoneType")):
        with pytest.raises(DDMError, match=f"a routing strategy is a name \\(a string\\).*got {kind}"):
            parse_strategy(bad)
    assert parse_strategy("threshold-1e-9") == Threshold(1e-9)
    assert parse_strategy("nucleus-5E-1@2e0") == Nucleus(0.5, 2.0)
    assert parse_strategy("threshold-0.25") == Threshold(0.25)  # the decimal form is unchanged
    with pytest.raises(DDMError, match=r"^strategy 'adaptive-ent-1e999': 1e999 is not a finite number; adaptive-ent-H "
                                       r"takes H an entropy >= 0 nats, e.g. adaptive-ent-0.5$"):
        parse_strategy("adaptive-ent-1e999")
    assert parse_strategy(" top-2") == TopK(2)
    with pytest.raises(DDMError, match=r"^strategy 'top-0': K must be >= 1; top-K takes"):  # the name as stripped
        parse_strategy(" top-0 ")


def test_spellings_of_one_strategy_name_one_sample_set():
    """top-2 and top-02, threshold-0.5 and threshold-.5, sample-2 and sample-2@1 were stored and reported as
    separate (identical) sets."""
    from ddmkit.config import SampleConfig
    from ddmkit.pipeline.samplesets import named_set
    from ddmkit.routing.table import canonical_name

    for given, name in (("top-02", "top-2"), ("threshold-.5", "threshold-0.5"), ("sample-2@1", "sample-2"),
                        ("nucleus-0.90@1.0", "nucleus-0.9"), (" full ", "full"), ("threshold-1e-3", "threshold-0.001")):
        assert canonical_name(given) == name and parse_strategy(name) == parse_strategy(given)
    config = SampleConfig(strategies=["monolith", "top-02", "top-2", "sample-2@1"], sweep_strategy="top-02")
    assert config.strategies == ["monolith", "top-2", "sample-2"] and config.sweep_strategy == "top-2"
    assert named_set("top-02", 10).name == "top-2"


def test_spellings_of_one_strategy_are_one_name_in_text_configs_distill_and_the_study():
    """Text configs' evaluate.strategies, distill --teacher and study misalignment --strategy kept the
    spelling given (top-02 and top-2 were two rows of the study, two teachers of distill)."""
    from ddmkit.discrete.config import TextEvalConfig
    from ddmkit.pipeline.distill import check_teacher
    from ddmkit.pipeline.misalignment import strategy_names

    assert TextEvalConfig(strategies=["top-02", "top-2", " full"]).strategies == ["top-2", "full"]
    assert check_teacher("sample-2@1") == "sample-2"
    assert strategy_names(["top-02,full", "top-2", "threshold-.5"]) == ["top-2", "full", "threshold-0.5"]
    with pytest.raises(DDMError, match="--strategy: unknown routing strategy 'top2'"):
        strategy_names(["top2"])


def test_tempered_strategies_never_draw_an_expert_of_probability_zero():
    """log(0) was clamped to log(1e-30), which a temperature T raises to about 1e-30^(1/T) (1e-3 at T = 10):
    sample-1@10 and nucleus-1@10 routed rows, with weight 1, to experts of probability 0 (missing ones
    among them), and sample-K called such experts with weight 1e-30."""
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(20000, 4)
    for name in ("sample-1@10", "nucleus-1@10", "sample-3@10", "sample-4"):
        w = parse_strategy(name).weights(probs, RoutingState(generator=torch.Generator().manual_seed(0)))
        assert (w[:, 2:] == 0).all(), name
        torch.testing.assert_close(w.sum(1), torch.ones(20000))
    w = parse_strategy("sample-3").weights(torch.tensor([[0.7, 0.3, 0.0]]), RoutingState())
    torch.testing.assert_close(w, torch.tensor([[0.7, 0.3, 0.0]]))  # full routing over the experts it may use
    zero = parse_strategy("sample-2@5").weights(torch.zeros(3, 4), RoutingState(generator=torch.Generator()))
    torch.testing.assert_close(zero.sum(1), torch.ones(3))  # a row of zeros: two experts alike, as before
    nan = parse_strategy("sample-2").weights(torch.full((1, 4), float("nan")),
                                             RoutingState(generator=torch.Generator()))
    assert nan.isnan().any()  # a broken router's NaN row stays NaN (not routed as if uniform)
