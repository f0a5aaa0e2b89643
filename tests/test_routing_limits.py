"""Routing strategies at the limits of their inputs: probabilities below float32's 1e-30, half-precision routers
(a user's router may return float16 or bfloat16), rows of zeros, tiny temperatures, and names of parameters that
need more than six digits. Each case had a known answer that the strategy missed."""
import pytest
import torch

from ddmkit.pipeline.analyze import check_strategies
from ddmkit.routing import RoutingState, parse_strategy, routed_velocity


def seeded(seed=0):
    return RoutingState(generator=torch.Generator().manual_seed(seed))


def ones_experts(k):
    return [lambda x, t: torch.ones_like(x) for _ in range(k)]


def test_sample_k_weights_sum_to_one_when_every_drawn_expert_is_below_1e_30():
    """sample-2@50 draws far experts often; their weights were divided by max(sum, 1e-30), so a row of two
    experts of r ~ 1e-36 got weights ~1e-6 and a velocity ~1e-6 instead of 1."""
    p = torch.tensor([[1.0, 1e-36, 1e-38, 1e-40]]).expand(1000, 4).contiguous()
    v = routed_velocity(ones_experts(4), lambda x, t: p, parse_strategy("sample-2@50"), seeded())(
        torch.zeros(1000, 1), torch.full((1000,), 0.5))
    torch.testing.assert_close(v, torch.ones(1000, 1))
    w = parse_strategy("sample-2@50").weights(p, seeded(29))
    torch.testing.assert_close(w.sum(1), torch.ones(1000))


def test_half_precision_sample_k_never_draws_an_expert_of_probability_zero():
    """float16 uniforms round 1e-30 to 0: a draw of u = 0 gave -inf noise, tying an expert of r > 0 with those of
    r = 0, and such a row went to an expert of probability 0 with weight 1."""
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float16).expand(100_000, 4)
    idx, w = parse_strategy("sample-1").select(p, seeded())
    assert (idx[:, 0] == 0).all()
    idx, w = parse_strategy("sample-2").select(torch.tensor([[0.5, 0.5, 0, 0]], dtype=torch.float16)
                                               .expand(100_000, 4), seeded())
    assert (w > 0).all()  # both experts of r = 0.5 drawn and weighted in every row


def test_bfloat16_sample_one_draws_with_the_routers_law():
    """bfloat16's few uniforms cut the Gumbel tails: an expert of r = 9e-4 was drawn at 1.8e-4."""
    p = torch.tensor([[0.999, 9e-4, 1e-4, 0.0]], dtype=torch.bfloat16).expand(200_000, 4)
    idx, _ = parse_strategy("sample-1").select(p, seeded())
    share = float((idx[:, 0] == 1).double().mean())
    r = float(p[0, 1])
    assert abs(share - r) < 5 * (r / 200_000) ** 0.5, share


@pytest.mark.parametrize("name", ["top-2", "threshold-0.5", "adaptive-0.9", "adaptive-ent-0.5"])
def test_a_float16_row_of_zeros_gives_zero_weights_and_velocity(name):
    z = torch.zeros(1, 3, dtype=torch.float16)
    assert torch.equal(parse_strategy(name).weights(z, None), torch.zeros(1, 3, dtype=torch.float16))
    v = routed_velocity(ones_experts(3), lambda x, t: z, parse_strategy(name), RoutingState())(
        torch.zeros(1, 2), torch.tensor([0.5]))
    assert torch.equal(v, torch.zeros(1, 2))


def test_float16_entropy_of_a_row_with_a_zero():
    """0 * log 0 was NaN in float16 (the 1e-30 clamp rounds to 0), so adaptive-ent always kept one expert."""
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float16)
    w = parse_strategy("adaptive-ent-0.1").weights(p, None)  # H = ln 2 > 0.1: the top ceil(e^H) = 2 experts
    assert w.tolist() == [[0.5, 0.5, 0.0]]


def test_switch_routes_a_row_of_zeros_uniformly_as_sample_one_does():
    z = torch.zeros(30_000, 3)
    drawn = parse_strategy("switch").select(z, seeded())[0][:, 0]
    assert torch.bincount(drawn, minlength=3).min() > 9_000  # every expert, about a third each
    assert (parse_strategy("sample-1").weights(z, seeded()).sum(1) == 1).all()


@pytest.mark.parametrize("name", ["sample-1@1e-39", "nucleus-0.9@1e-39", "sample-2@1e-39"])
def test_a_tiny_temperature_routes_to_the_largest(name):
    """log(p) / 1e-39 overflowed to -inf for every p < 1: all tied, sample-1 drew at random and nucleus raised."""
    p = torch.tensor([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    w = parse_strategy(name).weights(p, seeded())
    assert w.argmax(1).tolist() == [0, 1] and (w[:, 2] == 0).all()


@pytest.mark.parametrize("name", ["sample-2@1.0000001", "threshold-0.1234567", "nucleus-0.9921875@0.3333333",
                                  "adaptive-0.99999999", "adaptive-ent-1.2345678", "gated-2@29.9999999"])
def test_a_name_reads_back_as_its_strategy(name):
    """Names kept six digits: sample-2@1.0000001 was named sample-2@1, which reads back as sample-2."""
    strategy = parse_strategy(name)
    assert parse_strategy(strategy.name) == strategy


def test_analyze_keeps_strategies_that_differ_past_six_digits():
    kept = check_strategies(["threshold-0.1234567", "threshold-0.1234568", "threshold-0.5"])
    assert list(kept) == ["threshold-0.1234567", "threshold-0.1234568", "threshold-0.5"]


def test_guidance_scales_that_differ_past_six_digits_draw_sets_of_their_own():
    """Set names kept six digits (1.5 and 1.5000001 both 'top-2 @ cfg 1.5'): two scales wrote one file."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.samplesets import planned_sets, sample_options

    cfg = validate(RunConfig, {"sample": {"guidance_sweep": [1.5, 1.5000001], "sweep_strategy": "top-2"}})
    swept = [s.name for s in planned_sets(cfg, has_truth=False) if " @ cfg " in s.name]
    assert len(set(swept)) == len(swept) == 4 and "top-2 @ cfg 1.5000001" in swept
    assert sample_options("top-2 @ cfg 1.5000001") == "--strategy top-2 --guidance 1.5000001"
