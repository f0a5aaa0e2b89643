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


def per_sample_flops(cfg: RunConfig, data_shape: tuple[int, ...]) -> dict[str, float]:
    """{"expert", "router"}: F of one expert (and of the monolith: the same network) and of the router, for
    data of `data_shape` (one sample; the networks see its latents in a latent run). It depends on the config's
    networks and partition.k only, not on steps or batch."""
    shape = list(network_data_shape(cfg.latent, tuple(data_shape), cfg.data.name, cfg.data.params))
    expert, router = cfg.expert.net, cfg.router.net
    return {"expert": sample_flops(expert.arch, {"data_shape": shape, **expert.kwargs},
                                   expert.kwargs.get("num_classes", 0), by_keyword=True),
            "router": sample_flops(router.arch, {"data_shape": shape, "num_experts": cfg.partition.k, **router.kwargs},
                                   router.kwargs.get("num_classes", 0), by_keyword=False)}


def training_flops(cfg: RunConfig, per_sample: dict[str, float]) -> dict[str, float]:
    """{"experts", "router", "monolith", "ddm" (= experts + router)}: the training FLOPs of each, from the
    config's steps and batches and per_sample_flops(cfg, ...)."""
    expert, router = cfg.expert.train, cfg.router.train
    mono = monolith_config(cfg.expert, cfg.partition.k, cfg.monolith.match).train
    experts = cfg.partition.k * expert.steps * expert.batch_size * per_sample["expert"]
    routing = router.steps * router.batch_size * per_sample["router"]
    return {"experts": experts, "router": routing, "ddm": experts + routing,
            "monolith": mono.steps * mono.batch_size * per_sample["expert"]}


__all__ = ["per_sample_flops", "sample_flops", "training_flops"]
