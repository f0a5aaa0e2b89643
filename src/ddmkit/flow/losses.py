"""Training losses: flow matching for experts, cross-entropy on noised data for routers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddmkit.flow.convert import VPSchedule, vp_training_pair
from ddmkit.flow.path import noise, target_for


def flow_matching_loss(model, x: torch.Tensor, generator: torch.Generator, prediction: str = "velocity",
                       rows: slice | None = None, schedule: VPSchedule | None = None) -> torch.Tensor:
    """E_t,eps |f(x_t, t) - target|^2 with t ~ U(0, 1), eps ~ N(0, I), x_t on the linear path; with a VP
    `schedule`, DDPM's loss on its path instead (ddmkit.flow.convert.vp_training_pair).

    rows: the loss on these rows of the batch only. t and eps are drawn for the whole batch all the
    same, so each process of a data-parallel job draws the same numbers and takes its own rows."""
    t = torch.rand(x.shape[0], generator=generator, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if rows is not None:
        x, t, eps = x[rows], t[rows], eps[rows]
    state, time, target = training_pair(x, t, eps, prediction, schedule)
    return F.mse_loss(model(state, time).float(), target.float())


def training_pair(x: torch.Tensor, u: torch.Tensor, eps: torch.Tensor, prediction: str,
                  schedule: VPSchedule | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(network input, its time input, regression target) at draws u ~ U(0, 1) (B,) and eps: on the
    linear path t = u, x_t = (1 - t) x + t eps and the target of `prediction`; with a VP schedule,
    DDPM's (z, timestep, eps or v)."""
    if schedule is not None:
        return vp_training_pair(schedule, prediction, x, u, eps)
    return noise(x, u, eps), u, target_for(prediction, x, eps)


def router_loss(router, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of router(x_t, t) against the cluster of x, t ~ U(0, 1).
    Its minimiser is the posterior w_k(x_t, t). Returns (loss, accuracy)."""
    t = torch.rand(x.shape[0], generator=generator, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    logits = router(noise(x, t, eps), t)
    return F.cross_entropy(logits.float(), labels), (logits.argmax(1) == labels).float().mean()
