"""Training losses: flow matching for experts, cross-entropy on noised data for routers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddmkit.flow.path import noise, target_for


def flow_matching_loss(model, x: torch.Tensor, generator: torch.Generator, prediction: str = "velocity",
                       rows: slice | None = None) -> torch.Tensor:
    """E_t,eps |f(x_t, t) - target|^2 with t ~ U(0, 1), eps ~ N(0, I), x_t on the linear path.

    rows: the loss on these rows of the batch only. t and eps are drawn for the whole batch all the
    same, so each process of a data-parallel job draws the same numbers and takes its own rows."""
    t = torch.rand(x.shape[0], generator=generator, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if rows is not None:
        x, t, eps = x[rows], t[rows], eps[rows]
    pred = model(noise(x, t, eps), t)
    return F.mse_loss(pred.float(), target_for(prediction, x, eps).float())


def router_loss(router, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of router(x_t, t) against the cluster of x, t ~ U(0, 1).
    Its minimiser is the posterior w_k(x_t, t). Returns (loss, accuracy)."""
    t = torch.rand(x.shape[0], generator=generator, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    logits = router(noise(x, t, eps), t)
    return F.cross_entropy(logits.float(), labels), (logits.argmax(1) == labels).float().mean()
