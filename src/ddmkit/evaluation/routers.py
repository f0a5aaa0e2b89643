"""Router quality per noise level: accuracy and expected calibration error (ECE)
in t bands, on held-out data labelled by its nearest partition centroid."""
from __future__ import annotations

import torch

from ddmkit.flow.path import noise


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """sum_b |B_b|/n |acc(B_b) - conf(B_b)| over confidence bins of the top class."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros((), device=probs.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return float(ece)


@torch.no_grad()
def router_report(routers: dict, x: torch.Tensor, labels: torch.Tensor, bands: int = 10, seed: int = 0) -> dict:
    """For each named router (x, t) -> probs: accuracy and ECE per t band.

    Returns {"t": [band centres], name: {"accuracy": [...], "ece": [...]}}.
    """
    gen = torch.Generator().manual_seed(seed)
    edges = torch.linspace(0, 1, bands + 1)
    out = {"t": [float((a + b) / 2) for a, b in zip(edges[:-1], edges[1:])]}
    for name in routers:
        out[name] = {"accuracy": [], "ece": []}
    labels = labels.to(x.device)
    for a, b in zip(edges[:-1], edges[1:]):  # t and the noise drawn on the CPU (the same on every device)
        t = (a + (b - a) * torch.rand(len(x), generator=gen)).to(x.device)
        xt = noise(x, t, torch.randn(x.shape, generator=gen).to(x.device))
        for name, router in routers.items():
            p = router(xt, t).float()
            out[name]["accuracy"].append(float((p.argmax(1) == labels).float().mean()))
            out[name]["ece"].append(expected_calibration_error(p, labels))
    return out
