"""When the routing strategies draw, as docs/routing.md says: sample-K, nucleus and switch at every velocity
evaluation (not once per step), every m-th with router_every = m; oracle and nearest once per trajectory."""
import pytest
import torch

from ddmkit.ddm.sampling import sample_field
from ddmkit.routing import RoutingState, parse_strategy, routed_velocity
from ddmkit.sample.solvers import evaluations_per_step

K, B, STEPS = 3, 8, 5


def experts():
    return [lambda x, t, k=k: torch.full_like(x, float(k)) for k in range(K)]


def router(x, t):
    return torch.full((len(x), K), 1.0 / K)


def draws(monkeypatch, name, solver, router_every=1):
    """How many times the strategy drew from the routing generator over one trajectory of STEPS steps."""
    gen = torch.Generator().manual_seed(0)
    count = [0]
    for fn in ("multinomial", "rand"):
        real = getattr(torch, fn)

        def counted(*args, real=real, **kw):
            count[0] += kw.get("generator") is gen
            return real(*args, **kw)

        monkeypatch.setattr(torch, fn, counted)
    state = RoutingState(generator=gen, prior=torch.full((K,), 1.0 / K), nearest=lambda x: x[:, 0].long() % K)
    field = routed_velocity(experts(), router, parse_strategy(name), state, router_every=router_every)
    sample_field(field, torch.zeros(B, 2), STEPS, solver)
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("name", ["switch", "sample-1", "sample-2@0.5", "nucleus-0.9"])
@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "rk4"])
def test_drawing_strategies_draw_at_every_velocity_evaluation(monkeypatch, name, solver):
    per_step = evaluations_per_step(solver)
    assert draws(monkeypatch, name, solver) == STEPS * per_step
    # router_every = 2: evaluations 0, 2, 4, ... of the trajectory
    assert draws(monkeypatch, name, solver, router_every=2) == (STEPS * per_step + 1) // 2


@pytest.mark.parametrize("name", ["oracle", "nearest"])
@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
def test_oracle_and_nearest_draw_once_per_trajectory(monkeypatch, name, solver):
    assert draws(monkeypatch, name, solver) == 1
