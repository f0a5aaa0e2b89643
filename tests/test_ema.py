"""The EMA of fit(): warm-up decay, so the random initial weights are forgotten."""
import torch
from torch import nn

from ddmkit.train.loop import EMA


def test_ema_warmup_forgets_initial_weights():
    model = nn.Linear(4, 4)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)  # the trained weights, far from the initial ones
    for _ in range(2000):
        ema.update_parameters(model)
    # a fixed 0.999 would keep 0.999**2000 = 13.5% of the initial weights; the warm-up keeps ~(10/2010)^1-ish
    left = max((p - 1).abs().max().item() for p in ema.module.parameters())
    assert left < 0.01
    assert ema.decay_at(0) == 0.1 and ema.decay_at(10**6) == 0.999


def test_ema_state_dict_round_trip_restores_counter():
    model = nn.Linear(3, 2)
    a = EMA(model, 0.99)
    for _ in range(7):
        a.update_parameters(model)
    b = EMA(model, 0.99)
    b.load_state_dict(a.state_dict())
    assert b._n == 7 and set(a.state_dict()) == {"module.weight", "module.bias", "n_averaged"}
