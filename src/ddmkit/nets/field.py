"""A field computed by one network, as an explicit object.

    expert = NetworkField(network, VelocityOutput("epsilon"))   # (x, t, **cond) -> velocity
    router = NetworkField(network, RouterOutput())               # (x, t, **cond) -> probabilities (B, K)
    v = expert(x, t, y=labels)          # output(network, x, t, y=labels)
    copy = expert.on(other_network)     # the same field on another network of the architecture

`output` is a frozen dataclass: two fields with equal outputs and equal weight
shapes compute the same function of their weights, which is what lets the
speed code (ddmkit.accel) replay one set of CUDA graphs for all experts of one
architecture. Calls record no autograd graph unless grad is enabled by the
caller (the solvers run under torch.no_grad; the stability diagnostics
differentiate through the fields).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from ddmkit.flow.path import to_velocity


@dataclass(frozen=True, eq=False)
class NetworkField:
    """(x (B, *shape), t (B,), **cond) -> output(network, x, t, **cond)."""

    network: nn.Module
    output: Callable[..., torch.Tensor]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return self.output(self.network, x, t, **cond)

    def on(self, network: nn.Module) -> "NetworkField":
        return replace(self, network=network)


@dataclass(frozen=True)
class VelocityOutput:
    """A velocity network's output as the linear-path velocity (epsilon and x0 networks converted,
    ddmkit.flow.path.to_velocity), in float32. With class labels y and guidance g != 1, a
    class-conditional network evaluates the labelled and the 'no label' branch in one batch and
    returns classifier-free guidance v = v(x, t, none) + g (v(x, t, y) - v(x, t, none))."""

    prediction: str = "velocity"
    num_classes: int = 0  # 0: the network takes no label; else the 'no label' class index
    guidance: float = 1.0

    def __call__(self, network: nn.Module, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.num_classes or y is None:
            return to_velocity(network(x, t), self.prediction, x, t).float()
        if self.guidance == 1.0:
            return to_velocity(network(x, t, y), self.prediction, x, t).float()
        null = torch.full_like(y, self.num_classes)
        out = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        v_cond, v_none = to_velocity(out.float(), self.prediction, torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_none + self.guidance * (v_cond - v_none)


def router_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the K clusters of router logits (B, K), in float32.

    PyTorch's CPU softmax over a last dimension narrower than 16 is 5-9x
    slower than over the first, so for small K on the CPU it is taken over
    the transpose; the values are the same."""
    z = logits.float()
    if z.device.type == "cpu" and z.dim() == 2 and z.shape[1] < 16:
        return torch.softmax(z.T, dim=0).T.contiguous()
    return torch.softmax(z, dim=1)


@dataclass(frozen=True)
class RouterOutput:
    """A router network's logits as probabilities (B, K); a label-conditional router takes y."""

    conditional: bool = False

    def __call__(self, network: nn.Module, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        return router_probabilities(network(x, t, y) if self.conditional else network(x, t))
