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

from ddmkit.flow.convert import VPSchedule, edm_velocity, vp_velocity
from ddmkit.flow.path import conversion_time, to_velocity


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
    """A velocity network's output as the linear-path velocity, in float32.

    path "linear" (ddmkit's own): prediction "velocity", "epsilon" or "x0", converted by
    ddmkit.flow.path.to_velocity; path "vp" (DDPM, `schedule` a ddmkit.flow.convert.VPSchedule):
    prediction "epsilon" or "v"; path "edm": an x0 denoiser of (x_sigma, sigma)
    (ddmkit.flow.convert). With class labels y and guidance g != 1, a class-conditional network
    evaluates the labelled and the 'no label' branch in one batch and returns classifier-free
    guidance v = v(x, t, none) + g (v(x, t, y) - v(x, t, none))."""

    prediction: str = "velocity"
    num_classes: int = 0  # 0: the network takes no label; else the 'no label' class index
    guidance: float = 1.0
    path: str = "linear"
    schedule: VPSchedule | None = None

    def __call__(self, network: nn.Module, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.num_classes or y is None:
            return self.velocity(network, x, t).float()
        if self.guidance == 1.0:
            return self.velocity(network, x, t, y=y).float()
        null = torch.full_like(y, self.num_classes)
        v_cond, v_none = self.velocity(network, torch.cat([x, x]), torch.cat([t, t]), upcast=True,
                                       y=torch.cat([y, null])).chunk(2)
        return v_none + self.guidance * (v_cond - v_none)

    def velocity(self, network: nn.Module, x: torch.Tensor, t: torch.Tensor, upcast: bool = False,
                 **cond: torch.Tensor) -> torch.Tensor:
        """The network's velocity on its path (upcast: its output to float32 first)."""
        call = (lambda *a: network(*a, **cond).float()) if upcast else (lambda *a: network(*a, **cond))
        if self.path == "linear":
            t = conversion_time(self.prediction, t)  # an eps or x0 network away from its singular end
            return to_velocity(call(x, t), self.prediction, x, t)
        if self.path == "vp":
            return vp_velocity(call, x, t, self.schedule, self.prediction)
        if self.path == "edm":
            return edm_velocity(call, x, t)
        raise ValueError(f"path must be 'linear', 'vp' or 'edm'; got {self.path!r}")


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
