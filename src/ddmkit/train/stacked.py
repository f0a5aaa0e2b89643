"""K networks of one architecture trained as one: weights stacked on a leading
axis and evaluated together with torch.func.vmap, so a GPU runs all K in the
same kernels.

    stacked = StackedExperts([build_model(...) for _ in range(K)])
    v = stacked(x, t, y)            # x (K, B, ...), t (K, B), y (K, B) or None -> (K, B, ...)
    experts = stacked.unstack()     # K ordinary modules

Isolation: expert k's output depends only on its own weights, the loss is a
sum of per-expert losses, and `clip_grad_norm_` clips each expert by its own
gradient norm; AdamW, weight decay and the EMA act element by element. So
expert k's gradients and updates depend only on the batches drawn for it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def _key(name: str) -> str:
    return name.replace(".", "__")


class StackedExperts(nn.Module):
    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.k = len(models)
        params, buffers = stack_module_state(models)
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.stacked = nn.ParameterDict({_key(n): nn.Parameter(p.detach().clone()) for n, p in params.items()})
        for n, b in buffers.items():
            self.register_buffer(_key(n), b.detach().clone())
        self._template = [copy.deepcopy(models[0]).to("meta")]  # in a list: not a sub-module, holds no weights

    def _state(self) -> tuple[dict, dict]:
        return ({n: self.stacked[_key(n)] for n in self.param_names},
                {n: getattr(self, _key(n)) for n in self.buffer_names})

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        template = self._template[0]
        params, buffers = self._state()
        if torch.is_autocast_enabled(x.device.type):  # vmap's batched conv mixes dtypes under autocast: run in fp32/TF32
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float(), t.float(), y)
        if y is None:
            return vmap(lambda p, b, xx, tt: functional_call(template, (p, b), (xx, tt)))(params, buffers, x, t)
        return vmap(lambda p, b, xx, tt, yy: functional_call(template, (p, b), (xx, tt, yy)))(params, buffers, x, t, y)

    def grad_norms(self) -> torch.Tensor:
        """(K,) the gradient norm of each expert."""
        sq = [p.grad.float().pow(2).reshape(self.k, -1).sum(1) for p in self.stacked.values() if p.grad is not None]
        return torch.stack(sq).sum(0).sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each expert's gradient by its own norm; returns the largest norm."""
        norms = self.grad_norms()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.stacked.values():
            if p.grad is not None:
                p.grad.mul_(coef.reshape(-1, *([1] * (p.dim() - 1))).to(p.grad.dtype))
        return norms.max()

    def unstack(self) -> list[nn.Module]:
        """K ordinary modules (on the CPU) with the stacked weights."""
        params, buffers = self._state()
        out = []
        for k in range(self.k):
            m = copy.deepcopy(self._template[0]).to_empty(device="cpu")
            m.load_state_dict({n: v[k].detach().cpu() for n, v in {**params, **buffers}.items()}, strict=False)
            out.append(m)
        return out
