"""K networks trained side by side, expert k's kernels on CUDA stream k (expert.concurrent_networks =
"streams"): the other way, beside ddmkit.train.stacked, to train K experts in one job.

    streamed = StreamedExperts([build_model(...) for _ in range(K)])
    v = streamed(x, t, y)            # x (K, B, ...), t (K, B), y (K, B) or None -> (K, B, ...)
    experts = streamed.unstack()     # K ordinary modules

Each expert stays an ordinary network: its own weights, its own kernels, the precision a single network
has under autocast. On a GPU expert k's forward runs on the side stream of key k
(ddmkit.accel.streams), forked from and joined to the step's stream, also while the step is captured as a
CUDA graph (the K streams become parallel branches of the graph), so the K experts' kernels overlap;
autograd runs each backward kernel on the stream of its forward, so the backward overlaps too. One small
expert leaves most of the GPU idle, so K of them side by side cost about what one does, as long as the host
keeps up with launching their kernels: with train.cuda_graph the whole step, all K streams in it, is one
graph (docs/performance.md measures it). On the CPU the experts run one after another.

Isolation as for stacked experts: expert k's output depends only on its own weights and rows, the loss is
a sum of per-expert losses, `clip_grad_norms_` clips each expert by its own gradient norm, and AdamW, weight
decay and the EMA act element by element.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ddmkit.accel.streams import side_stream

__all__ = ["StreamedExperts"]

# Under torch.compile (train.compile) each expert's forward is compiled and the fork between streams is not:
# inductor cannot take record_stream, and tracing side_stream's growing table would recompile for every new
# stream. (torch.compiler.disable imports torch._dynamo, a second's work: ddmkit imports this module only when a
# job trains its experts on streams.)
_stream_of_key = torch.compiler.disable(side_stream)


class StreamedExperts(nn.Module):
    """K networks of one job, called on (K, B, ...) as StackedExperts is; expert k on CUDA stream k."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.k = len(models)
        self.experts = nn.ModuleList(models)

    @torch.compiler.disable(recursive=False)  # the experts' calls below are compiled, the fork is not
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        args = [(x[k], t[k]) if y is None else (x[k], t[k], y[k]) for k in range(self.k)]
        if x.device.type != "cuda":
            return torch.stack([net(*a) for net, a in zip(self.experts, args)])
        # accel.streams.call_concurrently's fork and join, without its fallback while capturing: here the K streams
        # are to become branches of the step's graph
        main = torch.cuda.current_stream(x.device)
        streams = [_stream_of_key(x.device, k) for k in range(self.k)]
        outs = []
        for net, a, stream in zip(self.experts, args, streams):
            stream.wait_stream(main)  # expert k's kernels on stream k, after what the step did before
            with torch.cuda.stream(stream):
                outs.append(net(*a))
        for out, stream in zip(outs, streams):
            main.wait_stream(stream)
            out.record_stream(main)  # read by the step's stream: not handed back to stream k before that
        return torch.stack(outs)

    def grad_norms(self) -> torch.Tensor:
        """(K,) the gradient norm of each expert, |g_k| = sqrt(sum over its tensors of |g|^2) (as
        torch.nn.utils.clip_grad_norm_ computes one network's)."""
        norms = []
        for net in self.experts:
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
                         if grads else torch.zeros((), device=next(net.parameters()).device))
        return torch.stack(norms)

    @torch.no_grad()
    def clip_grad_norms_(self, max_norm: float) -> torch.Tensor:
        """Clip each expert's gradient by its own norm: g_k <- g_k min(1, max_norm / (|g_k| + 1e-6));
        returns the (K,) norms before clipping (what the training loop logs as each expert's grad_norm)."""
        norms = self.grad_norms()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for k, net in enumerate(self.experts):
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef[k])
        return norms

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norms_, returning the largest of the norms before clipping."""
        return self.clip_grad_norms_(max_norm).max()

    @torch.no_grad()
    def unstack(self) -> list[nn.Module]:
        """The K networks, copied to the CPU."""
        return [copy.deepcopy(net).cpu() for net in self.experts]
