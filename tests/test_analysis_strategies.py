"""Alignment-based routing strategies: adaptive-P, adaptive-ent-H, gated-K@A."""
import pytest
import torch

from ddmkit.analysis.trace import new_state, trace_strategy
from ddmkit.errors import DDMError
from ddmkit.ddm import DDM
from ddmkit.ddm.sampling import start_noise
from ddmkit.routing import ExpertProbe, RoutingState, parse_strategy

P = torch.tensor([[0.6, 0.35, 0.05, 0.0], [0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]])
Q = torch.tensor([[0.6, 0.35, 0.05, 0.0], [0.5, 0.4, 0.05, 0.05], [0.4, 0.3, 0.2, 0.1]])  # experts 0, 1 on top


def test_adaptive_mass_adds_experts_until_the_mass_is_reached():
    w = parse_strategy("adaptive-0.9").weights(P, RoutingState())
    assert (w > 0).sum(1).tolist() == [2, 1, 4]
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert torch.allclose(w[0, :2], torch.tensor([0.6, 0.35]) / 0.95)


def test_adaptive_entropy_uses_the_perplexity_above_the_threshold():
    w = parse_strategy("adaptive-ent-0.5").weights(P, RoutingState())
    assert (w > 0).sum(1).tolist() == [3, 1, 4]  # H = 0.83 nats -> ceil(e^0.83) = 3; H = 0.17 -> top-1


def test_gated_top_k_falls_back_to_top1_when_experts_disagree():
    x = torch.randn(3, 2)
    agree = [lambda x, t: x + 1.0, lambda x, t: 1.01 * (x + 1.0), lambda x, t: -x, lambda x, t: x]
    state = RoutingState(probe=ExpertProbe(experts=agree, x=x, t=torch.zeros(3)))
    w = parse_strategy("gated-2@30").weights(Q, state)
    assert (w > 0).sum(1).tolist() == [2, 2, 2]
    state.probe.experts = [lambda x, t: x + 1.0, lambda x, t: -(x + 1.0), lambda x, t: x, lambda x, t: x]
    w = parse_strategy("gated-2@30").weights(Q, state)
    assert (w > 0).sum(1).tolist() == [1, 1, 1]
    with pytest.raises(DDMError, match="analysis sampler"):
        parse_strategy("gated-2@30").weights(P, RoutingState())


def test_gated_top_k_compares_only_experts_of_nonzero_probability():
    """gated-3@30 on probabilities [0.5, 0.5, 0] compared the third expert too (probability 0, weight 0 in
    top-3): one that disagreed collapsed the row to top-1, unlike gated-2@30."""
    x = torch.randn(1, 2)
    experts = [lambda x, t: x + 1.0, lambda x, t: x + 1.0, lambda x, t: -(x + 1.0)]
    state = RoutingState(probe=ExpertProbe(experts=experts, x=x, t=torch.zeros(1)))
    probs = torch.tensor([[0.5, 0.5, 0.0]])
    for name in ("gated-2@30", "gated-3@30"):
        torch.testing.assert_close(parse_strategy(name).weights(probs, state), probs)


def test_gated_top_1_keeps_the_probabilities_device(monkeypatch):
    """gated-1@A never compares two experts: its weights are top-1's, on the device of the probabilities
    (on a GPU: cuda; here the meta device stands in for it, with the expert probe faked)."""
    import ddmkit.routing.adaptive as adaptive

    monkeypatch.setattr(adaptive, "probe", lambda state, idx, used: torch.zeros(*idx.shape, 2, device=idx.device))
    probs = Q.to("meta")
    state = RoutingState(probe=ExpertProbe(experts=[], x=torch.zeros(3, 2, device="meta"), t=torch.zeros(3, device="meta")))
    assert parse_strategy("gated-1@30").weights(probs, state).device == probs.device


def test_bad_parameters_name_the_strategy():
    for bad in ("adaptive-1.5", "gated-0@30", "gated-2@200"):
        with pytest.raises(DDMError, match=bad):
            parse_strategy(bad)


def test_gated_runs_in_the_analysis_sampler_and_counts_its_probes():
    ddm = DDM([lambda x, t: x, lambda x, t: -x, lambda x, t: 0.9 * x], lambda x, t: torch.full((len(x), 3), 1 / 3),
              torch.full((3,), 1 / 3), (2,))
    tr = trace_strategy(ddm, "gated-2@30", start_noise(20, (2,), 0), steps=3)
    assert tr.expert_calls_per_sample == 3 * (2 + 1)  # probe 2 experts, they disagree: combine 1
    assert ((tr.w > 0).sum(-1) == 1).all()
    assert new_state(ddm, 0).generator.initial_seed() == 1
