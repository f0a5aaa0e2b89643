"""K networks of one architecture trained as one: weights stacked on a leading
axis and evaluated together with torch.func.vmap, so a GPU runs all K in the
same kernels.

    stacked = StackedExperts([build_model(...) for _ in range(K)])
    v = stacked(x, t, y)            # x (K, B, ...), t (K, B), y (K, B) or None -> (K, B, ...)
    experts = stacked.unstack()     # K ordinary modules

Isolation: expert k's output depends only on its own weights, the loss is a
sum of per-expert losses, and `clip_grad_norms_` clips each expert by its own
gradient norm (returning the K norms); AdamW, weight decay and the EMA act
element by element. So expert k's gradients and updates depend only on the
batches drawn for it.

Precision: under autocast (train.bf16 on CUDA) the forward casts the weights and x to
the autocast dtype first and runs the K experts in it; t stays float32, so the
sinusoidal time features are computed as in a single network, and the float32
master weights get their gradients back through the cast. One dtype is needed
because under vmap autocast does not cast the arguments of the batched
convolution: float32 weights would meet bfloat16 activations there (an error).
The difference from a network under autocast: normalisation layers (GroupNorm,
LayerNorm) take and give bfloat16 (their statistics are still accumulated in
float32), and a residual stream that autocast would promote to float32 stays
bfloat16. Without autocast (train.bf16 off; the CPU, where fit() never autocasts) it
runs in float32.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def _key(name: str) -> str:
    return name.replace(".", "__")


def _input_like_weight(layer: nn.Module, args: tuple) -> tuple:
    """A convolution's input in its weight's dtype: autocast keeps normalisation layers in float32,
    and under vmap the batched convolution then meets a float32 input and bfloat16 weights."""
    return (args[0].to(layer.weight.dtype), *args[1:])


class StackedExperts(nn.Module):
    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.k = len(models)
        params, buffers = stack_module_state(models)
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.stacked = nn.ParameterDict({_key(n): nn.Parameter(p.detach().clone()) for n, p in params.items()})
        for n, b in buffers.items():
            self.register_buffer(_key(n), b.detach().clone())
        template = copy.deepcopy(models[0]).to("meta")
        for layer in template.modules():  # under vmap, autocast does not cast a convolution's input
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
                layer.register_forward_pre_hook(_input_like_weight)
        self._template = [template]  # in a list: not a sub-module, holds no weights (vmap calls it, unstack copies it)

    def _state(self) -> tuple[dict, dict]:
        return ({n: self.stacked[_key(n)] for n in self.param_names},
                {n: getattr(self, _key(n)) for n in self.buffer_names})

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        template = self._template[0]
        params, buffers = self._state()
        if torch.is_autocast_enabled(x.device.type):  # one dtype for vmap (module docstring)
            dtype = torch.get_autocast_dtype(x.device.type)
            params, x = {n: p.to(dtype) for n, p in params.items()}, x.to(dtype)
        args = (x, t) if y is None else (x, t, y)
        return vmap(lambda p, b, *a: functional_call(template, (p, b), a))(params, buffers, *args)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.stacked.values() if p.grad is not None]

    def grad_norms(self) -> torch.Tensor:
        """(K,) the gradient norm of each expert: |g_k| = sqrt(sum over its tensors of sum g_k^2),
        over one (K, N) concatenation: a few kernels, not a few per tensor."""
        return torch.linalg.vector_norm(torch.cat([g.float().reshape(self.k, -1) for g in self._grads()], 1), dim=1)

    @torch.no_grad()
    def clip_grad_norms_(self, max_norm: float) -> torch.Tensor:
        """Clip each expert's gradient by its own norm: g_k <- g_k min(1, max_norm / (|g_k| + 1e-6));
        returns the (K,) norms before clipping (what the training loop logs as each expert's grad_norm)."""
        norms = self.grad_norms()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        grads = self._grads()
        torch._foreach_mul_(grads, [coef.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype) for g in grads])
        return norms

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norms_, returning the largest of the norms before clipping."""
        return self.clip_grad_norms_(max_norm).max()

    @torch.no_grad()
    def unstack(self) -> list[nn.Module]:
        """K ordinary modules (on the CPU) with the stacked weights and every buffer, copied one by one (a
        state_dict would leave out the non-persistent ones, e.g. DiT's pos, uninitialised after to_empty)."""
        params, buffers = self._state()
        out = []
        for k in range(self.k):
            m = copy.deepcopy(self._template[0]).to_empty(device="cpu")
            for n, v in params.items():
                m.get_parameter(n).copy_(v[k])
            for n, v in buffers.items():
                m.get_buffer(n).copy_(v[k])
            out.append(m)
        return out
