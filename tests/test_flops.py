"""Training FLOPs (ddmkit.train.flops) on networks whose count is known by hand: one linear map
D -> D (forward 2 D^2 per sample; backward 2 D^2 for the weight's gradient, none for the input)."""
import pytest
import torch
from torch import nn

from ddmkit.config import RunConfig, load_config, validate
from ddmkit.nets import use_network
import ddmkit.nets.user as user
from ddmkit.train.flops import per_sample_flops, sample_flops, training_flops
from test_sweep import TINY


class LinearVelocity(nn.Module):
    def __init__(self, data_shape):
        super().__init__()
        self.map = nn.Linear(data_shape[0], data_shape[0], bias=False)

    def forward(self, x, t, y=None):
        return self.map(x)


class LinearRouter(nn.Module):
    def __init__(self, data_shape, num_experts):
        super().__init__()
        self.map = nn.Linear(data_shape[0], num_experts, bias=False)

    def forward(self, x, t, y=None):
        return self.map(x)


@pytest.fixture(autouse=True)
def no_registered_networks(monkeypatch):
    monkeypatch.setattr(user, "_USER", {})


def registered(cls) -> str:
    use_network(cls)
    return user.class_name(cls)


def test_one_linear_map_counts_forward_and_backward():
    name = registered(LinearVelocity)
    assert sample_flops(name, {"data_shape": [6]}, 0, by_keyword=True) == 4 * 6 * 6


@pytest.mark.parametrize("match", ["steps", "batch"])
def test_experts_router_and_monolith_of_a_config(match):
    raw = load_config(TINY).model_dump()  # k = 4; experts 60 steps x 64; router 60 x 64
    raw["expert"]["net"] = {"arch": registered(LinearVelocity), "kwargs": {}}
    raw["router"]["net"] = {"arch": registered(LinearRouter), "kwargs": {}}
    raw["router"]["train"]["steps"] = 30
    raw["monolith"]["match"] = match
    cfg = validate(RunConfig, raw)
    flops = training_flops(cfg, per_sample_flops(cfg, (2,)))
    assert flops["experts"] == 4 * 60 * 64 * (4 * 2 * 2)
    assert flops["router"] == 30 * 64 * (4 * 2 * 4)  # D = 2 -> K = 4 logits
    assert flops["ddm"] == flops["experts"] + flops["router"]
    assert flops["monolith"] == flops["experts"]  # the same samples through the same network


def test_a_class_conditional_network_is_called_with_its_labels():
    seen = []

    class Labelled(LinearVelocity):
        def forward(self, x, t, y=None):
            seen.append(None if y is None else y.dtype)
            return self.map(x)

    sample_flops(registered(Labelled), {"data_shape": [3]}, 10, by_keyword=True)
    sample_flops(registered(Labelled), {"data_shape": [3]}, 10, by_keyword=False)
    sample_flops(registered(Labelled), {"data_shape": [3]}, 0, by_keyword=True)
    assert seen == [torch.long, torch.long, None]
