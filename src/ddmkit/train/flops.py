"""The training compute of a config's networks, in FLOPs:

    C = steps x batch x F,   F = forward + backward FLOPs of one training sample

F is counted by PyTorch's FlopCounterMode (matrix products, convolutions and attention; elementwise
operations and the optimiser are not counted) on a batch of 2 on the CPU. The experts (K of them, one
network each), the router and the FLOP-matched monolith; a DDM's training compute is experts + router.
The autoencoder of a latent run is trained once, for the DDM and the monolith alike, and is not counted.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddmkit.config import RunConfig
from ddmkit.latent.autoencoder import network_data_shape
from ddmkit.nets import build_model
from ddmkit.train.jobs import monolith_config

ROWS = 2  # the batch whose FLOPs are counted (per-sample FLOPs do not depend on it)


def sample_flops(arch: str, kwargs: dict, num_classes: int, by_keyword: bool) -> float:
    """Forward + backward FLOPs of one sample through a network built from (arch, kwargs), called as
    the training loop calls it: net(x_t, t), with class labels (y=... for a velocity network,
    positionally for a router) when num_classes > 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model(arch, **kwargs)
        x = torch.randn(ROWS, *kwargs["data_shape"])
        t = torch.rand(ROWS)
    y = torch.zeros(ROWS, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        if not num_classes:
            out = net(x, t)
        else:
            out = net(x, t, y=y) if by_keyword else net(x, t, y)
        out.float().square().mean().backward()
    return counter.get_total_flops() / ROWS


def training_flops(cfg: RunConfig, data_shape: tuple[int, ...]) -> dict[str, float]:
    """{"experts", "router", "monolith", "ddm" (= experts + router)}: the training FLOPs of each, for data
    of `data_shape` (one sample; the networks see its latents in a latent run)."""
    shape = list(network_data_shape(cfg.latent, tuple(data_shape)))
    k = cfg.partition.k
    expert, router = cfg.expert, cfg.router
    f_expert = sample_flops(expert.net.arch, {"data_shape": shape, **expert.net.kwargs},
                            expert.net.kwargs.get("num_classes", 0), by_keyword=True)
    f_router = sample_flops(router.net.arch, {"data_shape": shape, "num_experts": k, **router.net.kwargs},
                            router.net.kwargs.get("num_classes", 0), by_keyword=False)
    mono = monolith_config(expert, k, cfg.monolith.match).train
    experts = k * expert.train.steps * expert.train.batch_size * f_expert
    routing = router.train.steps * router.train.batch_size * f_router
    return {"experts": experts, "router": routing, "ddm": experts + routing,
            "monolith": mono.steps * mono.batch_size * f_expert}


__all__ = ["sample_flops", "training_flops"]
