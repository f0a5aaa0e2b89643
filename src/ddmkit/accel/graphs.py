"""CUDA graphs for network calls whose batch size changes from call to call.

A sparse combiner calls each expert on a different number of rows at every
step, and on a GPU a small call costs its kernel launches (milliseconds of
host time for a UNet) more than its arithmetic. A CUDA graph replays all of a
call's kernels with one launch, but a graph is captured for fixed shapes.
`GraphedCall` therefore pads the rows up to a bucket size (ddmkit.accel.padding),

    bucket(n) = the smallest multiple of 2^(floor(log2(n - 1)) - log2(g)) that is >= n

(g buckets per octave: at most 1/g of the rows are padding, about 1/(2g) on
average), captures one graph per bucket the first time it is seen, and then
copies the rows into the graph's input buffers, replays it and returns a copy
of the first n output rows. Rows must not interact (true of every velocity
network and router here: no batch statistics in eval mode), so the padding
rows, which hold stale finite values, change nothing.

    expert = GraphedCall(ddm.experts[0])   # the same callable
    v = expert(x, t)                       # eager on the CPU or with autograd on

Calls of more than `max_rows` rows (256 by default) are not graphed (they run eagerly,
padded to their bucket on a GPU: below): they are bound by arithmetic, not launches, so a
graph does not pay, and the graphs' buffers stay small (docs/performance.md). A router is
small and always called on the whole batch: sample_ddm graphs it at any batch
(max_rows=None).

All graphs of a device share one memory pool, so intermediate activations are
held once, not once per graph. That is safe because the calls run one after
another on one stream and every call copies its output before returning: no
graph's output is read after another graph has run. (A GraphedCall with
a stream_key has a pool of its own: the same holds among its own calls.) Under autocast the
capture turns autocast's weight cache off (the cache would outlive the
capture); the cast kernels become part of the graph.

Padding without graphs (ddmkit.accel.padding): calls above `max_rows` on a GPU, and every
expert call there when sampling runs without graphs. Calls above 256
rows are bound by arithmetic, so finer buckets there (`large_per_octave` =
16: at most 1/16) save padding but need twice as many cuDNN plans, each
costly the first time: in the image pipeline's evaluate stage on an H100 they
made sampling no faster as a whole, so the default stays 8.

Experts of one architecture share one set of graphs (`shared_graphs`): a call copies its expert's
weights into a template network and replays the template's graph for the bucket, so a bucket costs
one capture, not one per expert.

With the experts of a step on concurrent CUDA streams (SpeedOptions.cuda_streams, the default),
each expert gets a set of graphs of its own instead, in a memory pool of its own (`graphs_per_expert`),
so that replays of different experts may overlap: K captures per bucket again. Which of the two is
faster depends on the strategy and the batch (docs/performance.md times both).

A network that cannot be captured (its forward reads a value on the host, for
instance) makes the first capture fail: a warning says why, and from then on
every call on that device runs eagerly (a failed capture leaves the device's
graph pool unusable for the process). A field known not to be capturable (the
statistics-only routers: they group rows by label on the host and solve with
cuSOLVER) is not handed to this module at all (ddmkit.accel.accelerate).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from ddmkit.accel.padding import bucket_size, padded
from ddmkit.accel.streams import side_stream
from ddmkit.nets.field import NetworkField

_POOLS: dict = {}  # device -> (the shared graph memory pool, a graph that keeps it alive)
_DISABLED: dict = {}  # device -> why a capture failed there (graphs are then off on that device)


def _new_pool(device: torch.device) -> tuple:
    """A graph memory pool, held by a one-kernel graph captured into it: (pool, anchor, scratch). A pool
    is released when no graph uses it any more (a later capture into it would fail), so whoever keeps
    this tuple keeps the pool."""
    with torch.cuda.device(device):  # captured on that GPU, whichever GPU is current
        pool, anchor, scratch = torch.cuda.graph_pool_handle(), torch.cuda.CUDAGraph(), torch.zeros(1, device=device)
        with torch.cuda.graph(anchor, pool=pool):
            scratch.add_(1)
    return pool, anchor, scratch


def _shared_pool(device: torch.device):
    """The device's shared graph memory pool (held for the process)."""
    if device not in _POOLS:
        _POOLS[device] = _new_pool(device)
    return _POOLS[device][0]


@dataclass
class _Entry:
    graph: "torch.cuda.CUDAGraph | None"  # None: padded eager calls (capture=False)
    x: torch.Tensor
    t: torch.Tensor
    cond: dict
    out: torch.Tensor


def _autocast_key(device_type: str) -> tuple:
    enabled = torch.is_autocast_enabled(device_type)
    return (enabled, torch.get_autocast_dtype(device_type) if enabled else None)


class GraphedCall:
    """fn(x, t, **cond) replayed from CUDA graphs, one per (bucket, dtypes, shapes, autocast state).

    Falls back to calling fn when x is not on a CUDA device or autograd is recording, and to
    fn padded to `large_per_octave` buckets per octave when the call has more than max_rows rows
    (None: no limit; on the CPU, fn).
    `captures` counts the graphs captured (each costs `warmup` eager calls and one capture).
    capture=False keeps the padding and buffers but calls fn eagerly on them, on any device: what
    the graphs compute, checkable on a CPU.
    stream_key=k captures into a memory pool of this call's own instead of the device's shared one,
    on the side stream of key k (ddmkit.accel.streams.side_stream: the stream the combiner runs
    expert k on), instead of PyTorch's one capture stream: its graphs may then replay at the same
    time as other calls' graphs, on other streams (graphs_per_expert); its calls must still run one
    at a time. The stream matters: a captured matrix product keeps the cuBLAS workspace of the
    stream it was captured on, so graphs of several experts captured on one stream share one
    workspace, and replayed at the same time they race on it (on an H100 the GPU hung)."""

    def __init__(self, fn: Callable, per_octave: int = 8, warmup: int = 2, capture: bool = True,
                 max_rows: int | None = 256, large_per_octave: int = 8, stream_key: int | None = None):
        self.fn, self.per_octave, self.warmup, self.capture = fn, per_octave, warmup, capture
        self.max_rows, self.large_per_octave, self.stream_key = max_rows, large_per_octave, stream_key
        self.entries: dict[tuple, _Entry] = {}
        self.captures = 0
        self._pool = None  # own_pool: _new_pool(), made at the first capture
        self.padded = padded(fn, large_per_octave, large_per_octave)  # the calls above max_rows on a GPU

    @property
    def own_pool(self) -> bool:
        """Whether the graphs go into a pool of this call's own (stream_key given), not the shared one."""
        return self.stream_key is not None

    def route(self, x: torch.Tensor) -> str:
        """How a call on x runs: "graphs" (through the buckets' buffers), "padded" (more than max_rows
        rows on a GPU: fn padded, eagerly) or "direct" (fn itself: off the GPU, under autograd, with
        graphs off on the device)."""
        if self.max_rows is not None and x.shape[0] > self.max_rows:
            return "padded" if x.device.type == "cuda" else "direct"
        if torch.is_grad_enabled() or (self.capture and (x.device.type != "cuda" or x.device in _DISABLED)):
            return "direct"
        return "graphs"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        route = self.route(x)
        if route != "graphs":
            return (self.padded if route == "padded" else self.fn)(x, t, **cond)
        n = x.shape[0]
        key = (bucket_size(n, self.per_octave), x.dtype, tuple(x.shape[1:]), t.dtype, _autocast_key("cuda"),
               tuple(sorted((name, c.dtype, tuple(c.shape[1:])) for name, c in cond.items())))
        entry = self.entries.get(key)
        if entry is None:
            try:
                entry = self.entries[key] = self._capture(key[0], x, t, cond)
            except RuntimeError as e:  # e.g. a forward that reads a value on the host (.item()) mid-capture
                # a failed capture leaves the device's graph pool unusable: every call there runs eagerly now
                _DISABLED[x.device] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                warnings.warn(f"cannot capture {getattr(self.fn, '__name__', self.fn)!r} as a CUDA graph "
                              f"({_DISABLED[x.device]}); CUDA graphs are off on {x.device} for this process, "
                              "every network there runs eagerly", RuntimeWarning, stacklevel=2)
                return self.fn(x, t, **cond)
        entry.x[:n].copy_(x)
        entry.t[:n].copy_(t)
        for name, c in cond.items():
            entry.cond[name][:n].copy_(c)
        if entry.graph is None:
            entry.out = self.fn(entry.x, entry.t, **entry.cond)
        else:
            with torch.cuda.device(entry.x.device):  # replayed on that GPU's stream, whichever GPU is current
                entry.graph.replay()
        return entry.out[:n].clone()

    def _capture(self, rows: int, x: torch.Tensor, t: torch.Tensor, cond: dict) -> _Entry:
        """Static input buffers of `rows` rows (the first n from this call), warm-up on a side
        stream, then the capture into the shared pool (or, with a stream_key, into this call's own
        pool, on that key's stream)."""
        def buffer(v):
            b = torch.zeros((rows, *v.shape[1:]), dtype=v.dtype, device=v.device)
            b[:len(v)].copy_(v)
            return b

        with torch.inference_mode(False):  # plain tensors: a later call outside inference_mode copies into them
            sx, st, sc = buffer(x), buffer(t), {name: buffer(c) for name, c in cond.items()}
        if not self.capture:
            return _Entry(None, sx, st, sc, x)
        with torch.cuda.device(x.device):  # streams and the capture on x's GPU, whichever GPU is current
            return self._captured(sx, st, sc)

    def _captured(self, sx: torch.Tensor, st: torch.Tensor, sc: dict) -> _Entry:
        """_capture's warm-up and capture on the current GPU (x's)."""
        enabled, dtype = _autocast_key("cuda")

        def no_cache():  # autocast as the caller has it, without the weight cache
            return torch.autocast("cuda", dtype=dtype, cache_enabled=False) if enabled else contextlib.nullcontext()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), no_cache():
            for _ in range(self.warmup):
                self.fn(sx, st, **sc)
        torch.cuda.current_stream().wait_stream(side)
        if self.own_pool and self._pool is None:
            self._pool = _new_pool(sx.device)
        graph = torch.cuda.CUDAGraph()
        pool = self._pool[0] if self.own_pool else _shared_pool(sx.device)
        stream = side_stream(sx.device, self.stream_key) if self.own_pool else None
        with torch.cuda.graph(graph, pool=pool, stream=stream), torch.no_grad(), no_cache():
            out = self.fn(sx, st, **sc)
        self.captures += 1
        return _Entry(graph, sx, st, sc, out)


# ---------------------------------------------------------------- one set of graphs for experts of one architecture

def _tensors(network: torch.nn.Module) -> list[torch.Tensor]:
    return [*network.parameters(), *network.buffers()]


def _settings(network: torch.nn.Module) -> tuple:
    """Every submodule's class and the plain settings it holds (numbers, strings, flags: a DiT's attention
    heads, say), which change what a network computes without changing any weight's shape."""
    plain = (bool, int, float, str, type(None))
    return tuple((name, type(m).__name__, tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                                                       if not k.startswith("_") and k != "training"
                                                       and isinstance(v, plain))))
                 for name, m in network.named_modules())


def _architecture(field: Callable):
    """What must match for two fields to share graphs: the output, the network's class, its submodules'
    settings and its weight shapes (None: not a NetworkField, which gets graphs of its own)."""
    if not isinstance(field, NetworkField):
        return None
    return (field.output, type(field.network), _settings(field.network),
            tuple((tuple(v.shape), v.dtype, v.device) for v in _tensors(field.network)))


_TEMPLATES: "weakref.WeakKeyDictionary[NetworkField, tuple]" = weakref.WeakKeyDictionary()


def _template(field: NetworkField, settings: dict) -> tuple[list[torch.Tensor], GraphedCall]:
    """A copy of field's network, the tensors its weights are copied into, and the GraphedCall of the
    field on that copy (GraphedCall `settings`); kept per field (its graphs serve later sampling calls)."""
    key = (_architecture(field), tuple(sorted(settings.items())))  # the network may have moved since
    cached = _TEMPLATES.get(field)
    if cached is None or cached[0] != key:
        network = copy.deepcopy(field.network)
        call = GraphedCall(field.on(network), **settings)
        cached = _TEMPLATES[field] = (key, _tensors(network), call)
    return cached[1], cached[2]


def _copy_weights(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    with torch.no_grad():
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(targets, sources)  # a few multi-tensor kernel launches, not one per tensor
        else:
            for target, source in zip(targets, sources):
                target.copy_(source)


@dataclass(frozen=True, eq=False)
class SharedGraphCall:
    """One expert's calls through the template of its architecture: its weights first, then the
    template's graphs. Calls that the template would not replay (GraphedCall.route) run the expert's
    own field, padded or not as the template would, with no copy."""

    graphs: GraphedCall  # the shared template's graphs (their captures, their entries)
    targets: list  # the template's tensors
    field: NetworkField  # this expert

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        route = self.graphs.route(x)
        if route == "padded":
            return padded(self.field, self.graphs.large_per_octave, self.graphs.large_per_octave)(x, t, **cond)
        if route == "direct":
            return self.field(x, t, **cond)
        _copy_weights(self.targets, _tensors(self.field.network))
        return self.graphs(x, t, **cond)


def shared_graphs(fields: list[Callable], max_rows: int | None = 256, capture: bool = True, per_octave: int = 8,
                  large_per_octave: int = 8) -> list[Callable]:
    """The fields replayed from CUDA graphs, one set of graphs for all fields of one architecture.

    A GraphedCall per expert captures a graph per (expert, bucket): at K = 8 that is 8 captures for
    every new bucket, and sampling meets new buckets for a long time. Experts of one architecture
    differ only in their weights, so NetworkFields with equal outputs and weight shapes share one
    template network: a call of expert k copies k's weights into the template
    (torch._foreach_copy_, a few kernels: 4.4 MB for the image config's 1.1M-parameter UNet), then
    replays the template's graph for the bucket, captured once for all K. Other fields, and an
    architecture met only once, get a GraphedCall of their own. Results are those of each
    field's own network.
    max_rows, capture, per_octave and large_per_octave are GraphedCall's."""
    groups: dict = {}
    for i, f in enumerate(fields):
        groups.setdefault(_architecture(f), []).append(i)
    settings = dict(max_rows=max_rows, capture=capture, per_octave=per_octave, large_per_octave=large_per_octave)
    out = list(fields)
    for arch, members in groups.items():
        if arch is not None and len(members) > 1:
            targets, call = _template(fields[members[0]], settings)
            for i in members:
                out[i] = SharedGraphCall(call, targets, fields[i])
        else:  # a set of graphs of its own
            for i in members:
                out[i] = GraphedCall(fields[i], **settings)
    return out


# ---------------------------------------------------------------- a set of graphs per expert, for concurrent streams

def graphs_per_expert(fields: list[Callable], max_rows: int | None = 256, per_octave: int = 8,
                      large_per_octave: int = 8) -> list[GraphedCall]:
    """The fields replayed from CUDA graphs, a set of graphs per field, each set in a memory pool of its
    own and captured on field k's stream, so that the sparse combiner may replay them at the same time
    on concurrent streams (ddmkit.accel.streams: expert k always on stream k, so a set's calls still
    run one at a time; GraphedCall's stream_key says why the capture stream matters).

    Against shared_graphs: K captures per bucket instead of one (a long sampling job amortises them),
    and K pools, each holding its expert's largest graphed call (at most max_rows rows), instead of
    one; in return the experts' kernels overlap. A graph replay is one launch, so overlapping pays at
    any call size, where eager calls of fewer than streams.CONCURRENT_MIN_ROWS rows are bound by their
    launches (ddmkit.accel.accelerate sets the streams' lower bound to 1 row with these)."""
    return [GraphedCall(field, per_octave, max_rows=max_rows, large_per_octave=large_per_octave, stream_key=k)
            for k, field in enumerate(fields)]
