"""CUDA graphs for network calls whose batch size changes from call to call.

A sparse combiner calls each expert on a different number of rows at every
step, and on a GPU a small call costs its kernel launches (milliseconds of
host time for a UNet) more than its arithmetic. A CUDA graph replays all of a
call's kernels with one launch, but a graph is captured for fixed shapes.
`GraphedCall` therefore pads the rows up to a bucket size,

    bucket(n) = the smallest multiple of 2^(floor(log2(n - 1)) - log2(g)) that is >= n

(g buckets per octave: at most 1/g of the rows are padding, about 1/(2g) on
average), captures one graph per bucket the first time it is seen, and then
copies the rows into the graph's input buffers, replays it and returns a copy
of the first n output rows. Rows must not interact (true of every velocity
network and router here: no batch statistics in eval mode), so the padding
rows, which hold stale finite values, change nothing.

    expert = graphed(ddm.experts[0])      # the same callable, cached per function
    v = expert(x, t)                       # eager on the CPU or with autograd on

Calls of more than `max_rows` rows (256 by default) are not graphed (they run
eagerly, padded to their bucket on a GPU: below): they are bound by
arithmetic, not launches, so a graph does not pay,
and the graphs' buffers stay small (on an H100 with the benchmark's UNet,
graphs made calls of about 128 rows 7% faster and calls of about 512 rows 3%
slower: docs/PERFORMANCE.md). A router is small and always called on the
whole batch: sample_ddm graphs it at any batch (max_rows=None).

All graphs of a device share one memory pool, so intermediate activations are
held once, not once per graph. That is safe because the calls run one after
another on one stream and every call copies its output before returning: no
graph's output is read after another graph has run. (A GraphedCall with
a stream_key has a pool of its own: the same holds among its own calls.) Under autocast the
capture turns autocast's weight cache off (the cache would outlive the
capture); the cast kernels become part of the graph.

Padding without graphs (`padded`): calls above `max_rows` on a GPU, and every
expert call there when `sample_ddm` runs without graphs. The reason is cuDNN, which
chooses a convolution plan for each new batch size: that costs an H100 about
55 ms for the image UNet (74 against 19 ms for a call of about 1024 rows), and
a sparse combiner's group sizes are new at almost every step. With the rows
padded to buckets the sizes repeat, and a call costs its arithmetic plus the
padding rows: at most 1/8 more with 8 buckets per octave. Calls above 256
rows are bound by arithmetic, so finer buckets there (`large_per_octave` =
16: at most 1/16) save padding, 2-3% of a long run's time (top-1 at batch
4096 on an H100, 1.16 -> 1.14x the monolith), but need twice as many plans,
about 55 ms each the first time: in one 10k-image sampling job that costs
more than it saves, so the default stays 8 (docs/PERFORMANCE.md, "Bucket
sizes").

Experts of one architecture share one set of graphs (`shared_graphs`, what
sample_ddm uses): a call copies its expert's weights into a template network
and replays the template's graph for the bucket, so a bucket costs one
capture, not one per expert (K = 8, batch 1024, new sizes at every step on an
H100: 24 captures instead of 91, top-1 1.20x the monolith instead of 1.30x).

With the experts of a step on concurrent CUDA streams (sample_ddm's cuda_streams, the default),
each expert gets a set of graphs of its own instead, in a memory pool of its own (`graphs_per_expert`),
so that replays of different experts may overlap: K captures per bucket again. On an H100 (K = 8 UNet
experts, new sizes at every step) that made graphed top-1 1.48-1.50x the monolith instead of
1.75-1.81x at batch 256 and 1.10-1.11x instead of 1.17x at 4096; at 1024 both give 1.18-1.21x
(docs/PERFORMANCE.md, "A set of graphs per expert, on streams").

A network that cannot be captured (its forward reads a value on the host, for
instance) makes the first capture fail: a warning says why, and from then on
every call on that device runs eagerly (a failed capture leaves the device's
graph pool unusable for the process). A function that knows it cannot be
captured says so with `eager_only(fn)`: it is then always called as it is,
and the other networks keep their graphs (the statistics-only routers do
this: they group rows by label on the host and solve with cuSOLVER).
"""
from __future__ import annotations

import contextlib
import copy
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from ddmkit.routing.streams import side_stream

_GRAPHED: "weakref.WeakKeyDictionary[Callable, GraphedCall]" = weakref.WeakKeyDictionary()  # not functions
_POOLS: dict = {}  # device -> (the shared graph memory pool, a graph that keeps it alive)
_DISABLED: dict = {}  # device -> why a capture failed there (graphs are then off on that device)


def _new_pool(device: torch.device) -> tuple:
    """A graph memory pool, held by a one-kernel graph captured into it: (pool, anchor, scratch). A pool
    is released when no graph uses it any more (a later capture into it would fail), so whoever keeps
    this tuple keeps the pool."""
    pool, anchor, scratch = torch.cuda.graph_pool_handle(), torch.cuda.CUDAGraph(), torch.zeros(1, device=device)
    with torch.cuda.graph(anchor, pool=pool):
        scratch.add_(1)
    return pool, anchor, scratch


def _shared_pool(device: torch.device):
    """The device's shared graph memory pool (held for the process)."""
    if device not in _POOLS:
        _POOLS[device] = _new_pool(device)
    return _POOLS[device][0]


def bucket_size(n: int, per_octave: int = 8) -> int:
    """The padded batch size for n rows: n rounded up to a multiple of 2^(floor(log2(n - 1)) - log2(per_octave))
    (n itself while that step is 1); per_octave must be a power of two."""
    if n < 1:
        raise ValueError(f"bucket_size: n must be >= 1, got {n}")
    if per_octave < 1 or per_octave & (per_octave - 1):
        raise ValueError(f"bucket_size: per_octave must be a power of two, got {per_octave}")
    step = max(1, (1 << ((n - 1).bit_length() - 1)) // per_octave) if n > 1 else 1
    return -(-n // step) * step


def _pad_rows(v: torch.Tensor, rows: int) -> torch.Tensor:
    """v (n, ...) with copies of its first row appended up to `rows` rows; a stride-0 time
    (the solvers' t.expand(n)) stays a stride-0 view."""
    if v.dim() == 1 and v.stride(0) == 0:
        return v[:1].expand(rows)
    return torch.cat([v, v[:1].expand(rows - len(v), *v.shape[1:])])


def padded(fn: Callable, per_octave: int = 8, large_per_octave: int = 8, small_rows: int = 256) -> Callable:
    """fn(x, t, **cond) with its rows padded up to a bucket size (copies of the first row, whose
    outputs are dropped): the batch sizes fn sees repeat, so per-size work (cuDNN's plan for each
    new batch size) is done once per bucket. Calls of at most `small_rows` rows get `per_octave`
    buckets per octave, larger calls `large_per_octave` (bound by arithmetic: 16 pads them by at most
    1/16 instead of 1/8, for twice as many plans; it pays in long runs). Rows must not interact, as
    for the graphs."""
    def call(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows = bucket_size(n, per_octave if n <= small_rows else large_per_octave)
        if rows == n:
            return fn(x, t, **cond)
        return fn(_pad_rows(x, rows), _pad_rows(t, rows), **{k: _pad_rows(c, rows) for k, c in cond.items()})[:n]

    return call


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
    on the side stream of key k (ddmkit.routing.streams.side_stream: the stream the combiner runs
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
        if self.own_pool:  # replays may overlap other experts' at any size (ddmkit.routing.combine._overlaps)
            self.concurrent_min_rows = 1
        self.padded = padded(fn, large_per_octave, large_per_octave)  # the calls above max_rows on a GPU

    @property
    def own_pool(self) -> bool:
        """Whether the graphs go into a pool of this call's own (stream_key given), not the shared one."""
        return self.stream_key is not None

    def route(self, x: torch.Tensor) -> str:
        """How a call on x runs: "graphs" (through the buckets' buffers), "padded" (more than max_rows
        rows on a GPU: fn padded, eagerly) or "direct" (fn itself: off the GPU, under autograd, with
        graphs off on the device, or fn marked eager_only)."""
        if is_eager_only(self.fn):
            return "direct"
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

        sx, st, sc = buffer(x), buffer(t), {name: buffer(c) for name, c in cond.items()}
        if not self.capture:
            return _Entry(None, sx, st, sc, x)
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
            self._pool = _new_pool(x.device)
        graph = torch.cuda.CUDAGraph()
        pool = self._pool[0] if self.own_pool else _shared_pool(x.device)
        stream = side_stream(x.device, self.stream_key) if self.own_pool else None
        with torch.cuda.graph(graph, pool=pool, stream=stream), torch.no_grad(), no_cache():
            out = self.fn(sx, st, **sc)
        self.captures += 1
        return _Entry(graph, sx, st, sc, out)


def graphed(fn: Callable, per_octave: int = 8, max_rows: int | None = 256, large_per_octave: int = 8,
            stream_key: int | None = None) -> GraphedCall:
    """The GraphedCall of fn, created once per function and settings (its graphs are kept while fn lives).

    A plain function keeps its GraphedCall as an attribute, so both are freed together (the call refers
    to fn: in a weak-keyed table that reference would keep fn, and its graphs, alive for good); other
    callables (modules, objects) are kept in such a table."""
    if isinstance(fn, GraphedCall):
        return fn
    function = isinstance(fn, types.FunctionType)
    call = vars(fn).get("_graphed_call") if function else _GRAPHED.get(fn)
    settings = (per_octave, max_rows, large_per_octave, stream_key)
    if call is None or (call.per_octave, call.max_rows, call.large_per_octave, call.stream_key) != settings:
        call = GraphedCall(fn, per_octave, max_rows=max_rows, large_per_octave=large_per_octave,
                           stream_key=stream_key)
        if function:
            fn._graphed_call = call
        else:
            _GRAPHED[fn] = call
    return call


def eager_only(fn: Callable) -> Callable:
    """Mark fn as one that cannot be captured as a CUDA graph (its forward reads values on the host or
    has shapes that depend on the data): GraphedCall and shared_graphs then always call it as it is,
    and a failed capture does not turn graphs off for the other networks on the device."""
    fn.cuda_graphs = False
    return fn


def is_eager_only(fn: Callable) -> bool:
    return getattr(fn, "cuda_graphs", True) is False


# ---------------------------------------------------------------- one set of graphs for experts of one architecture

def with_network(field: Callable, network: torch.nn.Module, rebuild: Callable, key) -> Callable:
    """Mark `field` as a forward of `network`: rebuild(other) gives the same field on another network of
    that architecture, and `key` (hashable) names all that the field does besides the network's weights.
    Fields so marked, with equal keys and weight shapes, can share one set of CUDA graphs (shared_graphs)."""
    field.network, field.rebuild, field.network_key = network, rebuild, key
    return field


def _tensors(network: torch.nn.Module) -> list[torch.Tensor]:
    return [*network.parameters(), *network.buffers()]


def _architecture(field: Callable):
    """What must match for two fields to share graphs (None: the field is not marked)."""
    network = getattr(field, "network", None)
    if network is None or not hasattr(field, "rebuild") or is_eager_only(field):
        return None
    return (field.network_key, type(network),
            tuple((tuple(v.shape), v.dtype, v.device) for v in _tensors(network)))


_TEMPLATES: "weakref.WeakKeyDictionary[Callable, tuple]" = weakref.WeakKeyDictionary()


def _template(field: Callable, settings: dict) -> tuple[list[torch.Tensor], GraphedCall]:
    """A copy of field's network, the tensors its weights are copied into, and the GraphedCall of the
    field rebuilt on it (GraphedCall `settings`); kept per field (its graphs serve later sampling calls)."""
    key = (_architecture(field), tuple(sorted(settings.items())))  # the network may have moved since
    cached = _TEMPLATES.get(field)
    if cached is None or cached[0] != key:
        network = copy.deepcopy(field.network)
        call = GraphedCall(field.rebuild(network), **settings)
        cached = _TEMPLATES[field] = (key, _tensors(network), call)
    return cached[1], cached[2]


def _copy_weights(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    with torch.no_grad():
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(targets, sources)  # a few multi-tensor kernel launches, not one per tensor
        else:
            for target, source in zip(targets, sources):
                target.copy_(source)


def shared_graphs(fields: list[Callable], max_rows: int | None = 256, capture: bool = True, per_octave: int = 8,
                  large_per_octave: int = 8) -> list[Callable]:
    """The fields replayed from CUDA graphs, one set of graphs for all fields of one architecture.

    A GraphedCall per expert captures a graph per (expert, bucket): at K = 8 that is 8 captures for
    every new bucket, and sampling meets new buckets for a long time. Experts of one architecture
    differ only in their weights, so fields marked with `with_network` (equal keys, equal weight
    shapes) share one template network: a call of expert k copies k's weights into the template
    (torch._foreach_copy_, a few kernels: 4.4 MB for the image config's 1.1M-parameter UNet), then
    replays the template's graph for the bucket, captured once for all K. Unmarked fields, and an
    architecture met only once, get their own GraphedCall (graphed). Results are those of each
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
                out[i] = _bound(call, targets, fields[i])
        else:  # a set of graphs of its own
            for i in members:
                out[i] = graphed(fields[i], per_octave, max_rows, large_per_octave) if capture else \
                    GraphedCall(fields[i], **settings)
    return out


def _bound(call: GraphedCall, targets: list[torch.Tensor], field: Callable) -> Callable:
    """One expert's calls through the shared template: its weights first, then the template's graphs.
    Calls that the template would not replay (GraphedCall.route) run the expert's own field, padded
    or not as the template would, with no copy."""
    sources, large = _tensors(field.network), padded(field, call.large_per_octave, call.large_per_octave)

    def expert(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        route = call.route(x)
        if route != "graphs":
            return (large if route == "padded" else field)(x, t, **cond)
        _copy_weights(targets, sources)
        return call(x, t, **cond)
    expert.graphs = call  # the shared GraphedCall (its captures, its entries)
    return expert


# ---------------------------------------------------------------- a set of graphs per expert, for concurrent streams

def graphs_per_expert(fields: list[Callable], max_rows: int | None = 256, per_octave: int = 8,
                      large_per_octave: int = 8) -> list[Callable]:
    """The fields replayed from CUDA graphs, a set of graphs per field, each set in a memory pool of its
    own and captured on field k's stream, so that the sparse combiner may replay them at the same time
    on concurrent streams (ddmkit.routing.streams: expert k always on stream k, so a set's calls still
    run one at a time; GraphedCall's stream_key says why the capture stream matters).

    Against shared_graphs: K captures per bucket instead of one (a long sampling job amortises them),
    and K pools, each holding its expert's largest graphed call (at most max_rows rows), instead of
    one; in return the experts' kernels overlap. The GraphedCalls carry `concurrent_min_rows` = 1:
    a graph replay is one launch, so overlapping pays at any call size, where eager calls of fewer
    than combine.CONCURRENT_MIN_ROWS rows are bound by their launches. Kept per field (graphed)."""
    return [field if is_eager_only(field) else graphed(field, per_octave, max_rows, large_per_octave, stream_key=k)
            for k, field in enumerate(fields)]
