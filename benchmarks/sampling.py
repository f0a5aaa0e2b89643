"""Routed sampling speed: sparse strategies against the full ensemble, a monolith,
the naive combiner and the per-sample loop of the papers' pseudocode, in one run.

    PYTHONPATH=src python benchmarks/sampling.py --quick        # K = 8, CPU, MLP experts, under 2 minutes
    PYTHONPATH=src python benchmarks/sampling.py                # K = 4, 8, 16; batch 256 .. 8192; CPU
    PYTHONPATH=src python benchmarks/sampling.py --device cuda --experts unet --bf16 --compile
    PYTHONPATH=src python benchmarks/sampling.py --variants --ks 8 --batches 256 1024 4096   # CPU code variants
    PYTHONPATH=src python benchmarks/sampling.py --breakdown --ks 8 --batches 1024           # one step by part
    PYTHONPATH=src python benchmarks/sampling.py --device cuda --experts unet --bf16 --graphs --ks 8   # CUDA graphs
    PYTHONPATH=src python benchmarks/sampling.py --device cuda --experts unet --bf16 --graphs --fresh  # new sizes
    PYTHONPATH=src python benchmarks/sampling.py --device cuda --experts unet --bf16 --graphs --fresh \
        --warm-runs 8 --buckets 2:8 8:16                                  # bucket sizes side by side
    PYTHONPATH=src python benchmarks/sampling.py --profile --ks 8 --batches 1024 --steps 50          # operators

Every cell is milliseconds per Euler step (router + strategy + experts + update),
the median of --repeats timed runs of --steps steps. The methods are
interleaved inside each repeat, so load drift on a shared machine hits all of
them alike and the ratios stay fair. The networks have random weights: speed
does not depend on what they learned, only on how rows spread over experts.

Methods:
    top-1, top-2, full, sample-2, switch   ddmkit.routing.routed_velocity (the sparse combiner)
    top-2 m=4                              the same, routing reused for 4 steps (router_every=4)
    monolith                               one network of one expert's size on every row
    naive top-2                            every expert on every row, then weighted (top-2 weights)
    loop top-2                             per sample: route, then call each chosen expert on that one
                                           row (timed on --loop-rows rows, scaled to the batch)

--variants (MLP experts) instead times top-1, top-2, full and the monolith under four versions of the
code, interleaved in one run: "before" (the MLP forward as it was until 2026-11-22: one nn.Module call
per layer), "after" (the current forward), "grouped" (ddmkit.routing.grouped.GroupedMLP: one grouped
pass over the rows of all active experts) and "compiled" (every network under torch.compile).
--breakdown times one routed evaluation (top-1, top-2) part by part: router, strategy, plan, gather,
expert calls, scatter, x0_hat, the whole, and one monolith forward.
--graphs times the GPU dispatches side by side: eager, eager with the experts on concurrent CUDA
streams (as sample_ddm does when the calls average >= 256 rows), padded, and replayed from CUDA graphs
(measure_graphs says which). The main table calls the experts one after another, unpadded.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import time
import types

import torch
from torch.nn import functional as F

from ddmkit.nets.mlp import RouterMLP, VelocityMLP
from ddmkit.routing.combine import (CallCounter, combine, combine_dense, make_plan, plan_selection,
                                    router_probabilities, routed_velocity)
from ddmkit.routing import RoutingState, parse_strategy
from ddmkit.sample.solvers import sample_euler, time_grid

ROUTED = ["top-1", "top-2", "full", "sample-2", "switch"]


# ---------------------------------------------------------------- networks

def build_nets(kind: str, k: int, args, device) -> tuple[list, torch.nn.Module, tuple[int, ...]]:
    """K experts, one router, the data shape; random weights, eval mode, on device."""
    torch.manual_seed(0)
    if kind == "mlp":
        shape = (args.dim,)
        experts = [VelocityMLP(list(shape), width=args.width, depth=args.depth) for _ in range(k)]
        router = RouterMLP(list(shape), k, width=args.router_width, depth=1)
    elif kind == "unet":
        from convnets import ConvRouter, ConvUNet
        shape = (3, args.image, args.image)
        experts = [ConvUNet(3, width=args.width) for _ in range(k)]
        router = ConvRouter(3, k)
    else:  # the library's own image networks
        from ddmkit.nets.router_cnn import RouterCNN
        from ddmkit.nets.unet import UNet
        shape = (3, args.image, args.image)
        w = args.width
        experts = [randomise_zero_layers(UNet(list(shape), channels=[w, 2 * w, 2 * w])) for _ in range(k)]
        router = RouterCNN(list(shape), k)
    return [e.to(device).eval() for e in experts], router.to(device).eval(), shape


def randomise_zero_layers(net: torch.nn.Module) -> torch.nn.Module:
    """Give zero-initialised weights (an output layer that starts at v = 0) small random values,
    so that the sparse-against-dense check compares non-zero outputs."""
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return net


def as_field(net):
    """net as a field, marked so that experts of one architecture can share CUDA graphs (shared_graphs)."""
    from ddmkit.accel.graphs import with_network
    return with_network(lambda x, t: net(x, t), net, as_field, "net")


def as_router(net):
    return lambda x, t: router_probabilities(net(x, t))


def flops_per_row(net, shape, device) -> float:
    """Forward FLOPs for one row, counted by PyTorch's FlopCounterMode on a batch of 8."""
    from torch.utils.flop_counter import FlopCounterMode
    x, t = torch.randn(8, *shape, device=device), torch.rand(8, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, t)
    return fc.get_total_flops() / 8


# ---------------------------------------------------------------- methods
# Each method runs `steps` Euler steps from x1 and returns the expert rows it evaluated.

def euler_method(make_velocity):
    """A method from a factory (counter, state) -> velocity field: fresh counter and routing state per run."""
    def run(x1, ts):
        counter = CallCounter()
        state = RoutingState(generator=torch.Generator(device=x1.device).manual_seed(1))
        sample_euler(make_velocity(counter, state), x1, ts)
        return counter.total_rows
    return run


def routed_method(experts, router, strategy: str, router_every: int = 1, concurrent: bool = False):
    strat = parse_strategy(strategy)
    return euler_method(lambda counter, state: routed_velocity(experts, router, strat, state, counter,
                                                                router_every=router_every, concurrent=concurrent))


def naive_method(experts, router, strategy: str):
    strat = parse_strategy(strategy)
    return euler_method(lambda counter, state: lambda x, t: combine_dense(
        experts, strat.weights(router(x, t), state), x, t, counter=counter))


def monolith_method(net):
    def run(x1, ts):
        sample_euler(net, x1, ts)
        return len(x1) * (len(ts) - 1)
    return run


def loop_velocity(experts, router, strat, state, x, t, counter):
    """The papers' pseudocode: for each sample, route it, then add each chosen expert's velocity."""
    out = torch.zeros_like(x)
    for i in range(len(x)):
        xi, ti = x[i:i + 1], t[i:i + 1]
        w = strat.weights(router(xi, ti), state)[0]
        for k, expert in enumerate(experts):
            if w[k] > 0:
                out[i] += (w[k] * expert(xi, ti)[0]).to(out.dtype)
                counter.add(k, 1)
    return out


def loop_method(experts, router, strategy: str):
    strat = parse_strategy(strategy)
    return euler_method(lambda counter, state: lambda x, t: loop_velocity(experts, router, strat, state, x, t, counter))


# ---------------------------------------------------------------- timing

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run, x1, ts, device, precision) -> tuple[float, int]:
    """(seconds per step, expert rows per step) of one run."""
    sync(device)
    start = time.perf_counter()
    with precision():
        rows = run(x1, ts)
    sync(device)
    steps = len(ts) - 1
    return (time.perf_counter() - start) / steps, rows / steps


def time_methods(methods: dict, x1, ts, repeats: int, device, precision) -> dict[str, tuple[float, float]]:
    """Median seconds per step and expert evaluations per sample per step, methods interleaved."""
    for run in methods.values():
        timed(run, x1, ts, device, precision)  # warm-up
    seconds = {name: [] for name in methods}
    rows = {}
    for _ in range(repeats):
        for name, run in methods.items():
            s, rows[name] = timed(run, x1, ts, device, precision)
            seconds[name].append(s)
    return {name: (statistics.median(seconds[name]), rows[name] / len(x1), min(seconds[name])) for name in methods}


def time_loop(experts, router, x1, ts, args, device, precision) -> tuple[float, float]:
    """Per-sample loop on the first --loop-rows rows, one step, scaled to the whole batch."""
    n = min(len(x1), args.loop_rows)
    run = loop_method(experts, router, "top-2")
    one_step = ts[:2]
    timed(run, x1[:2], one_step, device, precision)  # warm-up
    s, rows = min(timed(run, x1[:n], one_step, device, precision) for _ in range(2))
    return s * len(x1) / n, rows / n, s * len(x1) / n


# ---------------------------------------------------------------- one configuration

def check_sparse_equals_dense(experts, router, shape, device) -> float:
    """Max |sparse - dense| / max |dense| on the real networks, top-2, float32."""
    x, t = torch.randn(256, *shape, device=device), torch.rand(256, device=device)
    with torch.no_grad():
        w = parse_strategy("top-2").weights(router(x, t), RoutingState())
        sparse, dense = combine(experts, w, x, t), combine_dense(experts, w, x, t)
    return float((sparse - dense).abs().max() / dense.abs().max())


def measure(k: int, batches: list[int], args, device, precision) -> list[dict]:
    nets, router_net, shape = build_nets(args.experts, k, args, device)
    experts, router = [as_field(e) for e in nets], as_router(router_net)
    monolith = as_field(build_nets(args.experts, 1, args, device)[0][0])
    err = check_sparse_equals_dense(experts, router, shape, device)
    ratio = flops_per_row(router_net, shape, device) / flops_per_row(nets[0], shape, device)
    print(f"\nK = {k}: sparse vs dense max rel. error {err:.1e}; router FLOPs / expert FLOPs = {ratio:.3f}", flush=True)
    methods = {name: routed_method(experts, router, name) for name in ROUTED}
    methods["top-2 m=4"] = routed_method(experts, router, "top-2", router_every=4)
    methods["monolith"] = monolith_method(monolith)
    methods["naive top-2"] = naive_method(experts, router, "top-2")
    ts = time_grid(args.steps).to(device)
    results = []
    for b in batches:
        x1 = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b)).to(device)
        with torch.no_grad():  # the routing the timings see: rows per expert at the first step
            top1 = torch.bincount(router(x1, ts[0].expand(b)).argmax(1), minlength=k).tolist()
        print(f"  batch {b}: rows per expert, top-1 at t = 1: {' '.join(map(str, top1))}", flush=True)
        row = {"K": k, "batch": b, **{n: v for n, v in time_methods(methods, x1, ts, args.repeats, device, precision).items()}}
        row["loop top-2"] = time_loop(experts, router, x1, ts, args, device, precision)
        results.append(row)
        print(f"  batch {b}: top-2 {row['top-2'][0] * 1e3:.1f} ms, full {row['full'][0] * 1e3:.1f} ms", flush=True)
    return results


# ---------------------------------------------------------------- tables

COLUMNS = ROUTED + ["top-2 m=4", "monolith", "naive top-2", "loop top-2"]


def ratios(r: dict, at: int) -> list[float]:
    """top-2/full, top-1/monolith, naive/top-2, loop/top-2 from median (at=0) or best (at=2) times."""
    sec = {c: r[c][at] for c in COLUMNS}
    return [sec["top-2"] / sec["full"], sec["top-1"] / sec["monolith"], sec["naive top-2"] / sec["top-2"],
            sec["loop top-2"] / sec["top-2"]]


def print_table(rows: list[dict]) -> None:
    """One K: ms per step of every method, the ratios, evaluations per sample."""
    if rows:
        k = rows[0]["K"]
        print(f"\n### K = {k}: ms per Euler step (median)\n")
        print("| batch | " + " | ".join(COLUMNS) + " | top-2/full | top-1/monolith | naive/top-2 | loop/top-2 |")
        print("|" + "---:|" * (len(COLUMNS) + 5))
        for r in rows:
            ms = [f"{r[c][0] * 1e3:.2f}" for c in COLUMNS]
            print(f"| {r['batch']} | " + " | ".join(ms) + " | " + " | ".join(f"{v:.2f}" for v in ratios(r, 0)) + " |")
        evals = {c: statistics.mean(r[c][1] for r in rows) for c in COLUMNS}
        print("\nexpert evaluations per sample per step: " + ", ".join(f"{c} {v:.2f}" for c, v in evals.items()))
        best = "; ".join(f"batch {r['batch']}: " + ", ".join(f"{v:.2f}" for v in ratios(r, 2)) for r in rows)
        print(f"same ratios from the best of the repeats (less sensitive to other jobs on the machine): {best}",
              flush=True)


# ---------------------------------------------------------------- torch.compile (GPU)

def measure_compiled(k: int, batches: list[int], args, device, precision) -> None:
    """top-2, full and monolith with each network under torch.compile (dynamic shapes)."""
    nets, router_net, shape = build_nets(args.experts, k, args, device)
    mono = build_nets(args.experts, 1, args, device)[0][0]
    start = time.perf_counter()
    compiled = [torch.compile(n, dynamic=True) for n in nets]
    router = as_router(torch.compile(router_net, dynamic=True))
    experts = [as_field(c) for c in compiled]
    methods = {"top-2": routed_method(experts, router, "top-2"), "full": routed_method(experts, router, "full"),
               "monolith": monolith_method(as_field(torch.compile(mono, dynamic=True)))}
    ts = time_grid(args.steps).to(device)
    print(f"\n### K = {k}, networks under torch.compile(dynamic=True): ms per Euler step\n")
    print("| batch | top-2 | full | monolith | top-2/full |")
    print("|---:|---:|---:|---:|---:|")
    for b in batches:
        x1 = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b)).to(device)
        r = time_methods(methods, x1, ts, args.repeats, device, precision)
        print(f"| {b} | {r['top-2'][0] * 1e3:.2f} | {r['full'][0] * 1e3:.2f} | {r['monolith'][0] * 1e3:.2f} | "
              f"{r['top-2'][0] / r['full'][0]:.2f} |", flush=True)
    print(f"(compile and all timings: {time.perf_counter() - start:.0f} s)")


# ---------------------------------------------------------------- CUDA graphs (GPU)

def fresh_noise(run, seed: int):
    """The method started from new noise at every call, so the experts' group sizes are new at every
    step, as in sampling (a method of the other tables repeats its noise, and so its sizes)."""
    gens = {}

    def call(x1, ts):
        gen = gens.setdefault(x1.device, torch.Generator(device=x1.device).manual_seed(seed))
        noise = torch.randn(x1.shape, generator=gen, device=x1.device, dtype=x1.dtype)
        return run(noise if x1.is_contiguous() else noise.contiguous(memory_format=torch.channels_last), ts)
    return call


def bucketed_calls(fn, small: int, large: int, max_rows: int, graphs: bool):
    """fn with its calls of at most max_rows rows padded to `small` buckets per octave (graphed, or
    eager) and its larger calls padded eagerly to `large` per octave. Fewer small buckets: fewer
    cuDNN plans and graph captures, for more padding rows on the small (launch-bound) calls; more
    large buckets: less padding on the compute-bound calls, for more plans."""
    from ddmkit.accel.graphs import GraphedCall, padded
    if graphs:
        return GraphedCall(fn, per_octave=small, max_rows=max_rows, large_per_octave=large)
    return padded(fn, small, large, small_rows=max_rows)


def measure_graphs(k: int, batches: list[int], args, device, precision) -> None:
    """top-1, top-2, full and the monolith, eager and with every network (experts, router, monolith)
    replayed from CUDA graphs (ddmkit.sample.graphs: rows padded to 8 buckets per octave, calls of more
    than --graph-max-rows rows padded and eager), interleaved: "graphs" with one set of graphs per
    expert, "shared" with one set for all experts (shared_graphs: sample_ddm(cuda_graphs=True,
    cuda_streams=False)), "streams" eager with the experts of a step on concurrent CUDA streams,
    "graphs on streams" a set of graphs per expert, each in its own pool, on concurrent streams
    (graphs_per_expert: what sample_ddm(cuda_graphs=True) does with cuda_streams, the default).
    --fresh: every run from new noise; the variants "padded" (every expert call padded to its bucket
    size, eagerly: what sample_ddm did on a GPU without graphs), "streams" (the same on concurrent
    streams: what sample_ddm does now), "streams, router graph" (and the router replayed from its
    graphs) and, for each --buckets S:L,
    "padded S:L", "graphs S:L", "shared S:L" and "graphs on streams S:L" (calls of at most --graph-max-rows rows padded to S
    buckets per octave, larger ones to L; graphs, shared: the small calls graphed); full runs only
    eagerly (it has no sparse calls), and --warm-runs fresh runs of every method come before the
    timed ones (the one-time cost of new sizes: cuDNN plans and graph captures)."""
    from ddmkit.accel.graphs import GraphedCall, graphs_per_expert, padded, shared_graphs
    nets, router_net, shape = build_nets(args.experts, k, args, device)
    eager = ([as_field(e) for e in nets], as_router(router_net), as_field(build_nets(args.experts, 1, args, device)[0][0]))
    graphs = ([GraphedCall(f, max_rows=args.graph_max_rows) for f in eager[0]], GraphedCall(eager[1], max_rows=None),
              GraphedCall(eager[2], max_rows=args.graph_max_rows))  # the router at any batch, as sample_ddm does
    shared = (shared_graphs(eager[0], max_rows=args.graph_max_rows), graphs[1], graphs[2])
    on_streams = (graphs_per_expert(eager[0], max_rows=args.graph_max_rows), graphs[1], graphs[2])
    variants = {"eager": eager, "streams": eager, "graphs": graphs, "shared": shared, "graphs on streams": on_streams}
    if args.fresh:
        pad = [padded(f) for f in eager[0]]
        variants = {"eager": eager, "padded": (pad, eager[1], eager[2]), "streams": (pad, eager[1], eager[2]),
                    "streams, router graph": (pad, graphs[1], eager[2])}
        specs = [tuple(map(int, spec.split(":"))) for spec in args.buckets]
        for small, large in specs:
            variants[f"padded {small}:{large}"] = (
                [bucketed_calls(f, small, large, args.graph_max_rows, False) for f in eager[0]], eager[1], eager[2])
        variants["graphs"] = graphs
        variants["shared"] = shared
        variants["graphs on streams"] = on_streams
        for small, large in specs:
            variants[f"graphs {small}:{large}"] = (
                [bucketed_calls(f, small, large, args.graph_max_rows, True) for f in eager[0]], graphs[1], graphs[2])
            variants[f"shared {small}:{large}"] = (shared_graphs(eager[0], max_rows=args.graph_max_rows, per_octave=small,
                                                                 large_per_octave=large), graphs[1], graphs[2])
            variants[f"graphs on streams {small}:{large}"] = (
                graphs_per_expert(eager[0], max_rows=args.graph_max_rows, per_octave=small, large_per_octave=large),
                graphs[1], graphs[2])
    names = ["top-1", "top-2", "full", "monolith"]
    methods = {}
    for tag, (experts, router, mono) in variants.items():
        methods.update({f"{tag} {n}": routed_method(experts, router, n, concurrent="streams" in tag)
                        for n in names[:3]
                        if not (args.fresh and n == "full" and tag != "eager")})
        methods[f"{tag} monolith"] = monolith_method(mono)
    if args.fresh:
        methods = {name: fresh_noise(run, seed) for seed, (name, run) in enumerate(methods.items())}
    x, t = torch.randn(256, *shape, device=device), torch.rand(256, device=device)
    with torch.no_grad(), precision():
        w = parse_strategy("top-2").weights(eager[1](x, t), RoutingState())
        ref = combine(eager[0], w, x, t)
        err = float((combine(graphs[0], w, x, t) - ref).abs().max() / ref.abs().max())
    ts = time_grid(args.steps).to(device)
    print(f"\n### K = {k}, eager against CUDA graphs (expert and monolith calls of <= {args.graph_max_rows} rows, the "
          f"router at any batch){', new noise at every run' if args.fresh else ''}: ms per Euler step (median); "
          f"graphs against eager, top-2: max rel. error {err:.1e}\n")
    print("| batch | variant | " + " | ".join(names) + " | top-2/full | top-1/monolith | graphs captured (s) |"
          + (" captured while timed |" if args.fresh else ""))
    print("|---:|---|" + "---:|" * (len(names) + 3 + bool(args.fresh)))
    def graph_sets(tag, v):  # the GraphedCalls of a variant (shared experts: their one template); graphs
        calls = v[0] + ([v[1], v[2]] if tag == "graphs" else [])  # counts the router's and monolith's too
        found = {id(g): g for g in (getattr(c, "graphs", c) for c in calls) if isinstance(g, GraphedCall)}
        return list(found.values())
    graphed_calls = {tag: graph_sets(tag, v) for tag, v in variants.items() if tag.startswith(("graphs", "shared"))}
    captures = lambda tag: sum(c.captures for c in graphed_calls[tag])
    spread = []
    for b in batches:
        x1 = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b)).to(device)
        with torch.no_grad(), precision():
            top1 = torch.bincount(eager[1](x1, ts[0].expand(b)).argmax(1), minlength=k).tolist()
        spread.append(f"batch {b}: {' '.join(map(str, top1))}")
        before = {tag: captures(tag) for tag in graphed_calls}
        warm = {tag: 0.0 for tag in variants}
        for _ in range(args.warm_runs if args.fresh else 1):  # the graphs of this batch's buckets are captured here
            for name, run in methods.items():
                start = time.perf_counter()
                timed(run, x1, ts, device, precision)
                warm[name.rsplit(" ", 1)[0]] += time.perf_counter() - start
        warmed = {tag: captures(tag) for tag in graphed_calls}
        r = time_methods(methods, x1, ts, args.repeats, device, precision)
        for tag in variants:
            ms = {n: r[f"{tag} {n}"][0] * 1e3 for n in names if f"{tag} {n}" in r}
            ms["full"] = ms.get("full", r["eager full"][0] * 1e3)
            cells = [f"{ms[n]:.2f}" if f"{tag} {n}" in r else f"={ms[n]:.2f}" for n in names]
            graph_cells = (f"{warmed[tag] - before[tag]} ({warm[tag]:.1f}) |" if tag in graphed_calls else "|")
            if args.fresh:
                graph_cells += f" {captures(tag) - warmed[tag]} |" if tag in graphed_calls else " |"
            print(f"| {b} | {tag} | " + " | ".join(cells)
                  + f" | {ms['top-2'] / ms['full']:.2f} | {ms['top-1'] / ms['monolith']:.2f} | " + graph_cells, flush=True)
    print("\nrows per expert, top-1 at t = 1: " + "; ".join(spread))


# ---------------------------------------------------------------- code variants (CPU, MLP experts)

def legacy_forward(self, x, t):
    """TimeMLP.forward before 2026-11-22: one nn.Module call per layer, the embedding frequencies
    recomputed at every call (the same operations as now; tests/test_grouped.py checks it bitwise)."""
    half = self.time_dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = self.time_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    h = self.inp(x.reshape(x.shape[0], -1))
    for b in self.blocks:
        h = h + b.fc2(F.silu(b.fc1(b.norm(h)) + b.emb(emb)))
    out = self.out(h)
    return out.reshape(x.shape) if isinstance(self, VelocityMLP) else out


def with_legacy_forward(net):
    net = copy.deepcopy(net)
    net.forward = types.MethodType(legacy_forward, net)
    return net


VARIANTS = ["before", "after", "grouped", "grouped_mm", "compiled"]
SHARED = {"grouped": "after", "grouped_mm": "after"}  # variants that change only the routed experts


def grouped_method(grouped, router, strategy: str):
    from grouped_experts import grouped_velocity
    strat = parse_strategy(strategy)
    return euler_method(lambda counter, state: grouped_velocity(grouped, router, strat, state, counter))


def check_grouped(nets, groupeds: dict, router, dim: int, device) -> str:
    """Max |grouped - per-expert| / max |per-expert| on top-2 weights, one evaluation."""
    x, t = torch.randn(1000, dim, device=device), torch.rand(1000, device=device)
    w = parse_strategy("top-2").weights(router(x, t), RoutingState())
    plan = make_plan(w)
    want = combine([as_field(n) for n in nets], w, x, t)
    errs = []
    for name, g in groupeds.items():
        got = torch.zeros_like(x).index_add_(0, plan.rows, g.run_groups(plan.experts, plan.counts, x[plan.rows],
                                                                          t[plan.rows]) * plan.weights[:, None])
        errs.append(f"{name} {float((got - want).abs().max() / want.abs().max()):.1e}")
    return ", ".join(errs)


def variant_methods(k: int, args, device) -> tuple[dict, float, str]:
    """{(variant, method): run} for top-1, top-2, full and the monolith; the compile time; the
    grouped variants' difference from the per-expert calls."""
    from grouped_experts import GroupedMLP
    nets, router_net, _ = build_nets("mlp", k, args, device)
    mono = build_nets("mlp", 1, args, device)[0][0]
    start = time.perf_counter()
    compiled = [torch.compile(n, dynamic=True) for n in nets + [router_net, mono]]
    x, t = torch.randn(64, args.dim, device=device), torch.rand(64, device=device)
    for c in compiled:  # compile now (dynamic shapes: one graph serves every group size)
        c(x, t)
    compile_s = time.perf_counter() - start
    groupeds = {"grouped": GroupedMLP(nets), "grouped_mm": GroupedMLP(nets, mode="grouped_mm")}
    router = as_router(router_net)
    versions = {
        "before": ([as_field(with_legacy_forward(n)) for n in nets], as_router(with_legacy_forward(router_net)),
                   with_legacy_forward(mono)),
        "after": ([as_field(n) for n in nets], router, mono),
        "compiled": ([as_field(c) for c in compiled[:k]], as_router(compiled[k]), compiled[k + 1]),
    }
    methods = {}
    for variant, (experts, vrouter, monolith) in versions.items():
        for name in ["top-1", "top-2", "full"]:
            methods[variant, name] = routed_method(experts, vrouter, name)
        methods[variant, "monolith"] = monolith_method(as_field(monolith))
    for variant, g in groupeds.items():
        for name in ["top-1", "top-2"]:
            methods[variant, name] = grouped_method(g, router, name)
    return methods, compile_s, check_grouped(nets, groupeds, router, args.dim, device)


def measure_variants(k: int, batches: list[int], args, device, precision) -> None:
    methods, compile_s, errors = variant_methods(k, args, device)
    ts = time_grid(args.steps).to(device)
    print(f"\n### K = {k}, MLP width {args.width}: ms per Euler step (median of {args.repeats}) by code variant\n")
    print(f"grouped against the per-expert calls, top-2, max rel. difference: {errors}; torch.compile of the "
          f"{k} experts, the router and the monolith (first calls): {compile_s:.1f} s\n")
    print("| batch | variant | top-1 | top-2 | full | monolith | top-2/full | top-1/monolith |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        x1 = torch.randn(b, args.dim, generator=torch.Generator().manual_seed(b)).to(device)
        start = time.perf_counter()
        r = time_methods(methods, x1, ts, args.repeats, device, precision)
        for v in VARIANTS:
            ms = {m: r[v, m][0] * 1e3 for m in ["top-1", "top-2"]}
            ms.update({m: r[SHARED.get(v, v), m][0] * 1e3 for m in ["full", "monolith"]})
            shared = "=" if v in SHARED else ""
            print(f"| {b} | {v} | {ms['top-1']:.2f} | {ms['top-2']:.2f} | {shared}{ms['full']:.2f} | "
                  f"{shared}{ms['monolith']:.2f} | {ms['top-2'] / ms['full']:.2f} | {ms['top-1'] / ms['monolith']:.2f} |",
                  flush=True)
        print(f"(batch {b}: {time.perf_counter() - start:.0f} s with the warm-up)", flush=True)
    print("(=: the after row's full and monolith: grouping changes only the sparse expert calls)")


# ---------------------------------------------------------------- one evaluation, part by part

def measure_breakdown(k: int, batches: list[int], args, device, precision) -> None:
    """One routed velocity evaluation (top-1, top-2) cut into its parts, each timed alone on the same
    inputs, interleaved; against the whole evaluation and one monolith forward. ms, median."""
    nets, router_net, shape = build_nets(args.experts, k, args, device)
    experts, router = [as_field(e) for e in nets], as_router(router_net)
    mono = as_field(build_nets(args.experts, 1, args, device)[0][0])
    cols = ["router", "strategy", "plan", "gather", "experts", "cat+weigh+scatter", "x0_hat", "whole", "monolith"]
    print(f"\n### K = {k}: one velocity evaluation by part, ms (median of {args.repeats * 4})\n")
    print("| batch | strategy | " + " | ".join(cols) + " | rows per expert |\n|---:|---|" + "---:|" * len(cols) + "---|")
    for b in batches:
        x, t = torch.randn(b, *shape, device=device), torch.tensor(0.5, device=device).expand(b)  # as a solver passes t
        for name in ["top-1", "top-2"]:
            strat = parse_strategy(name)
            probs = router(x, t)
            idx, sw = strat.select(probs, RoutingState())  # the combiner's sparse path (routed_velocity)
            plan = plan_selection(idx, sw, k, strat.one_expert)
            xs, tg = x.index_select(0, plan.rows).split(plan.counts), [t[:n] for n in plan.counts]
            outs = [experts[j](xj, tj) for j, xj, tj in zip(plan.experts, xs, tg)]
            v = torch.cat(outs)

            def scatter():
                v = torch.cat(outs)
                v = v if plan.unit else v * plan.weights.reshape((-1,) + (1,) * len(shape))
                return torch.zeros_like(x).index_add_(0, plan.rows, v)

            field = routed_velocity(experts, router, strat, RoutingState())
            parts = {
                "router": lambda: router(x, t), "strategy": lambda: strat.select(probs, RoutingState()),
                "plan": lambda: plan_selection(idx, sw, k, strat.one_expert),
                "gather": lambda: x.index_select(0, plan.rows).split(plan.counts),
                "experts": lambda: [experts[j](xj, tj) for j, xj, tj in zip(plan.experts, xs, tg)],
                "cat+weigh+scatter": scatter,
                "x0_hat": lambda: x - t.reshape((-1,) + (1,) * len(shape)) * v[:b],
                "whole": lambda: field(x, t), "monolith": lambda: mono(x, t)}
            runs = {n: (lambda x1, ts, f=f: [f(), 0][1]) for n, f in parts.items()}
            r = time_methods(runs, x, torch.zeros(2), args.repeats * 4, device, precision)
            print(f"| {b} | {name} | " + " | ".join(f"{r[c][0] * 1e3:.2f}" for c in cols) + " | "
                  + " ".join(str(plan.counts[plan.experts.index(j)] if j in plan.experts else 0) for j in range(k))
                  + " |", flush=True)


# ---------------------------------------------------------------- operator profile

def profile_ops(k: int, batch: int, args, device, precision) -> None:
    """top-1 and the monolith, --steps Euler steps each after a warm-up run, under torch.profiler:
    the operators by self time (CPU) or CUDA time (GPU), and ms per step."""
    from torch.profiler import ProfilerActivity, profile
    nets, router_net, shape = build_nets(args.experts, k, args, device)
    methods = {"top-1": routed_method([as_field(e) for e in nets], as_router(router_net), "top-1"),
               "monolith": monolith_method(as_field(build_nets(args.experts, 1, args, device)[0][0]))}
    x1, ts = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch)).to(device), time_grid(args.steps).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, run in methods.items():
        timed(run, x1, ts, device, precision)
        seconds, _ = timed(run, x1, ts, device, precision)
        with profile(activities=activities) as prof:
            timed(run, x1, ts, device, precision)
        print(f"\n### {name}, K = {k}, batch {batch}: {seconds * 1e3:.2f} ms per step unprofiled, "
              f"{args.steps} steps profiled\n")
        print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)


# ---------------------------------------------------------------- main

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="K = 8, batch 256..4096, CPU: a check in under 2 minutes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts", choices=["mlp", "unet", "ddmkit-unet"], default="mlp",
                   help="unet: benchmarks/convnets.py (the recorded GPU runs); ddmkit-unet: ddmkit.nets.unet")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    p.add_argument("--steps", type=int, default=2, help="Euler steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop-rows", type=int, default=48, help="rows the per-sample loop is timed on")
    p.add_argument("--dim", type=int, default=64, help="MLP data dimension")
    p.add_argument("--width", type=int, default=None, help="expert width (MLP 128, UNet 64)")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--router-width", type=int, default=32, help="MLP router width (one block)")
    p.add_argument("--image", type=int, default=32, help="UNet image side")
    p.add_argument("--bf16", action="store_true", help="networks under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also time K = 8 with torch.compile'd networks")
    p.add_argument("--graphs", action="store_true",
                   help="GPU: only the table of eager against CUDA-graphed networks (top-1, top-2, full, monolith)")
    p.add_argument("--fresh", action="store_true",
                   help="--graphs: every run from new noise (new group sizes at every step, as in sampling), "
                        "and the padded eager variant")
    p.add_argument("--buckets", nargs="*", default=[], metavar="S:L",
                   help="--graphs --fresh: also the variants 'padded S:L', 'graphs S:L' and 'shared S:L': calls of at most "
                        "--graph-max-rows rows padded to S buckets per octave, larger ones to L (powers of two)")
    p.add_argument("--warm-runs", type=int, default=1,
                   help="--graphs --fresh: untimed fresh runs of every method before the timed ones")
    p.add_argument("--graph-max-rows", type=int, default=256,
                   help="--graphs: calls of more rows are not graphed (on a GPU padded and eager; GraphedCall max_rows)")
    p.add_argument("--breakdown", action="store_true",
                   help="only the table of one routed evaluation's parts (router, strategy, plan, ...)")
    p.add_argument("--variants", action="store_true",
                   help="MLP experts: only the table of code variants (before, after, grouped, compiled)")
    p.add_argument("--profile", action="store_true",
                   help="only torch.profiler's operator tables of top-1 and the monolith (first K, first batch)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: on a loaded machine more threads spin against other jobs)")
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args()
    if args.quick:
        args.device, args.ks, args.batches = "cpu", [8], [256, 1024, 4096]
    args.width = args.width or (128 if args.experts == "mlp" else 64)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    precision = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# sampling benchmark: {name}; torch {torch.__version__}; experts {args.experts} width {args.width}; "
          f"bf16 {args.bf16}; {args.steps} steps x {args.repeats} repeats; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    start = time.perf_counter()
    results = []
    with torch.no_grad():
        for k in args.ks if args.variants else []:
            measure_variants(k, args.batches, args, device, precision)
        for k in args.ks if args.breakdown else []:
            measure_breakdown(k, args.batches, args, device, precision)
        for k in args.ks if args.graphs else []:
            measure_graphs(k, args.batches, args, device, precision)
        if args.profile:
            profile_ops(args.ks[0], args.batches[0], args, device, precision)
        for k in [] if args.variants or args.breakdown or args.graphs or args.profile else args.ks:
            rows = measure(k, args.batches, args, device, precision)
            print_table(rows)
            results += rows
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        if args.compile:
            try:
                measure_compiled(8, [b for b in args.batches if b >= 1024], args, device, precision)
            except Exception as e:  # a compile failure must not lose the tables above
                print(f"torch.compile failed: {type(e).__name__}: {str(e)[:300]}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
