"""Experts trained on DDPM's variance-preserving path ([expert.path] kind = "vp"): the training example
is DDPM's, the folder records the path, and the loader converts the network back to the linear-path
velocity (ddmkit.flow.convert), so a VP expert mixes with flow-matching experts."""
import json
import math
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig
from ddmkit.ddm.load import path_output, velocity_field
from ddmkit.errors import DDMError
from ddmkit.flow.convert import VPSchedule, path_entry
from ddmkit.flow.losses import training_pair
from ddmkit.io import read_json
from ddmkit.registry import load_model
from ddmkit.train.concurrent import stacked_loss
from ddmkit.train.jobs import train_velocity_model
from ddmkit.train.stacked import StackedExperts
from ddmkit.nets import build_seeded
from ddmkit.truth import GaussianMixture

TINY = Path(__file__).parent / "configs" / "tiny.toml"


def alpha_bar_by_products(schedule: VPSchedule, n: int) -> float:
    """prod_{i <= n} (1 - beta_i), with the betas written out as DDPM defines them."""
    if schedule.kind == "linear":
        betas = [schedule.beta_start + (schedule.beta_end - schedule.beta_start) * i / (schedule.steps - 1)
                 for i in range(schedule.steps)]
    else:
        f = lambda u: math.cos((u / schedule.steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f(i + 1) / f(i), 0.999) for i in range(schedule.steps)]
    return math.prod(1 - b for b in betas[: n + 1])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_the_training_example_is_ddpms(kind, prediction):
    schedule = VPSchedule(kind, steps=50, time_scale=1 / 50)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    u = torch.tensor([0.0, 0.019, 0.02, 0.5, 0.77, 0.999], dtype=torch.float64)
    z, time, target = training_pair(x, u, eps, prediction, schedule)
    n = [0, 0, 1, 25, 38, 49]  # floor(u * 50)
    assert time.tolist() == pytest.approx([i / 50 for i in n], abs=1e-15)
    for row, i in enumerate(n):
        a2 = alpha_bar_by_products(schedule, i)
        alpha, sigma = math.sqrt(a2), math.sqrt(1 - a2)
        assert torch.allclose(z[row], alpha * x[row] + sigma * eps[row], atol=1e-12)
        want = eps[row] if prediction == "epsilon" else alpha * eps[row] - sigma * x[row]
        assert torch.allclose(target[row], want, atol=1e-12)


def test_the_linear_path_example_is_unchanged():
    gen = torch.Generator().manual_seed(1)
    x, eps = torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    u = torch.rand(4, generator=gen)
    z, time, target = training_pair(x, u, eps, "velocity")
    assert torch.equal(time, u) and torch.equal(target, eps - x)
    assert torch.allclose(z, (1 - u[:, None]) * x + u[:, None] * eps)


class ExactVPFraction(torch.nn.Module):
    """The exact v prediction of a VP model of a Gaussian mixture, taking the timestep as ddmkit's VP
    experts do: the fraction n / steps."""

    def __init__(self, g: GaussianMixture, schedule: VPSchedule):
        super().__init__()
        self.g, self.schedule = g, schedule

    def forward(self, z, time):
        table = self.schedule.log_alpha_bar()
        out = []
        for zi, ti in zip(z, time):
            n = float(ti) * self.schedule.steps
            lo = min(int(math.floor(n)), len(table) - 1)
            hi = min(lo + 1, len(table) - 1)
            a2 = math.exp(float(table[lo] + (n - lo) * (table[hi] - table[lo])))
            alpha, sigma = math.sqrt(a2), math.sqrt(1 - a2)
            covs = alpha ** 2 * self.g.covariances + sigma ** 2 * torch.eye(self.g.dim, dtype=torch.float64)
            noised = GaussianMixture.from_covariances(self.g.weights, alpha * self.g.means, covs)
            eps = -sigma * noised.score(zi[None], 0.0)[0]
            x0 = (zi - sigma * eps) / alpha
            out.append(alpha * eps - sigma * x0)
        return torch.stack(out)


def test_the_written_path_entry_converts_a_fraction_timestep_network():
    """A network taking n / steps, described by the folder entry ddmkit writes, loads as the exact
    linear-path velocity; read as DDPM's timestep (time_scale 1) it is far off."""
    g = GaussianMixture.from_covariances(torch.tensor([0.6, 0.4]), torch.tensor([[1.5, 0.0], [-1.0, 1.0]]),
                                         torch.tensor([0.3, 0.5]))
    schedule = VPSchedule("cosine", time_scale=1 / 1000)
    config = {"kwargs": {}, "prediction": "v", **path_entry(schedule)}
    assert path_output(config) == ("vp", schedule)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = (1 - t[:, None]) * g.sample(4, gen).double() + t[:, None] * torch.randn(4, 2, generator=gen,
                                                                               dtype=torch.float64)
    net = ExactVPFraction(g, schedule)
    field = velocity_field(net, config)
    assert torch.allclose(field.output.velocity(net, x, t), g.velocity(x, t), atol=1e-9, rtol=0)
    as_ddpm = velocity_field(net, {**config, "path": {**config["path"], "time_scale": 1.0}})
    assert (as_ddpm.output.velocity(net, x, t) - g.velocity(x, t)).abs().max() > 0.1


def test_stacked_vp_loss_is_each_experts_own_loss():
    schedule = VPSchedule("linear", steps=100, time_scale=0.01)
    nets = [build_seeded("mlp", s, data_shape=[2], width=16, depth=1) for s in (0, 1)]
    model = StackedExperts(nets)
    x = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(3))
    got = stacked_loss(model, x, None, torch.Generator().manual_seed(4), "v", schedule)
    gen = torch.Generator().manual_seed(4)
    u, eps = torch.rand(2, 8, generator=gen), torch.randn(x.shape, generator=gen)
    for k, net in enumerate(nets):
        z, time, target = training_pair(x[k], u[k], eps[k], "v", schedule)
        assert torch.allclose(got[k], ((net(z, time) - target) ** 2).mean(), atol=1e-6)


def test_a_trained_vp_expert_learns_the_linear_velocity(tmp_path):
    """DDPM training (cosine schedule, v prediction) of a small MLP on one Gaussian, loaded and
    converted: its linear-path velocity is close to the exact one, as a linear-path expert's is."""
    g = GaussianMixture.from_covariances(torch.tensor([1.0]), torch.tensor([[1.0, -0.5]]), torch.tensor([0.25]))
    x = g.sample(4096, torch.Generator().manual_seed(0)).float()
    common = {"net": {"arch": "mlp", "kwargs": {"width": 64, "depth": 2}},
              "train": {"steps": 800, "batch_size": 256, "lr": 3e-3, "warmup": 50, "ema_decay": 0.99,
                        "log_every": 400}}
    errors = {}
    for name, extra in {"vp": {"path": {"kind": "vp", "schedule": "cosine"}, "prediction": "v"},
                        "linear": {}}.items():
        folder = train_velocity_model(x, ExpertConfig.model_validate({**common, **extra}), tmp_path / name, "expert")
        model, config = load_model(folder)
        field = velocity_field(model, config)
        t = torch.linspace(0.1, 0.9, 9).repeat_interleave(200)
        xt = (1 - t[:, None]) * g.sample(len(t), torch.Generator().manual_seed(1)).float() + t[:, None] * torch.randn(
            len(t), 2, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            v = field(xt, t)
        exact = g.velocity(xt.double(), t.double()).float()
        errors[name] = float(((v - exact) ** 2).sum(1).mean() / (exact ** 2).sum(1).mean())
    assert read_json(tmp_path / "vp" / "config.json")["path"]["time_scale"] == pytest.approx(1e-3)
    assert "path" not in read_json(tmp_path / "linear" / "config.json")
    assert errors["vp"] < 0.02 and errors["linear"] < 0.02, errors


def test_a_vp_run_from_the_command_line(tmp_path, cli):
    """`ddmkit run` with [expert.path] kind = "vp": experts and monolith train on the VP path, the report's
    networks table names it, the DDM samples."""
    run = tmp_path / "run"
    done = cli("run", TINY, "--out", run, "--set", "expert.path.kind=vp", "--set", "expert.prediction=v",
               "--set", "expert.path.schedule=cosine")
    assert done.returncode == 0, done.stderr[-2000:]
    for folder in (run / "experts" / "expert_00", run / "monolith"):
        assert read_json(folder / "config.json")["path"]["kind"] == "vp"
    assert "v (vp cosine, 1000 steps, time x 0.001)" in (run / "report.md").read_text()
    from ddmkit.pipeline.models import describe_models
    from ddmkit.pipeline.prepare import run_config

    assert describe_models(run, run_config(run))[1] == []  # every folder as the [expert] section trains it
    config = read_json(run / "experts" / "expert_01" / "config.json")  # another schedule: flagged
    config["path"] = {**config["path"], "steps": 200, "time_scale": 1.0}
    (run / "experts" / "expert_01" / "config.json").write_text(json.dumps(config))
    notes = describe_models(run, run_config(run))[1]
    assert len(notes) == 1 and "expert 1" in notes[0] and "path.steps (200, config 1000)" in notes[0], notes
    bad = cli("run", TINY, "--out", tmp_path / "bad", "--set", "expert.path.kind=vp")
    assert bad.returncode == 2 and "prediction" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("field, value", [("schedule", "cosine"), ("steps", 200), ("beta_end", 0.05)])
def test_a_vp_setting_on_the_linear_path_is_refused(field, value):
    """`--set expert.path.schedule=cosine` without kind = 'vp' trained a plain flow-matching expert."""
    from ddmkit.config import RunConfig, load_config, validate

    raw = load_config("demo").model_dump()
    raw["expert"]["path"][field] = value
    with pytest.raises(DDMError, match=f"expert.path {field}: settings of the vp path, but kind = 'linear'"):
        validate(RunConfig, raw, "config")
    raw["expert"]["path"]["kind"], raw["expert"]["prediction"] = "vp", "v"
    assert validate(RunConfig, raw, "config").expert.path.kind == "vp"
