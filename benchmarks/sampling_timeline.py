"""Where a routed sampling step's time goes on a GPU: the GPU's kernels, or the GPU waiting.

The GPU rows of docs/PERFORMANCE.md leave top-1 at about 1.2x the monolith at batch 1024 with every
expert call replayed from a CUDA graph, where replaying the same calls with fixed sizes and no router
costs 1.04-1.08x (benchmarks/streams.py). This profiles fresh sampling runs (new noise every run, so
new group sizes at every step, after --warm-runs untimed ones) with torch.profiler and splits each
method's wall time per step into

    wall       ms per step unprofiled (median of 3 interleaved rounds of --runs runs)
    busy       the union of the intervals in which some kernel, copy or memset runs on the GPU
    idle       profiled wall - busy: the GPU waiting for the host (launches, the plan's host sync)
    kernels    the sum of kernel durations (above busy where streams overlap)

and the host's time blocked in the plan's synchronisation. Methods: the monolith (one network on
every row), and top-1 with the experts padded and eager, with one set of graphs shared by the
experts (shared_graphs), and with a set per expert on concurrent streams (graphs_per_expert).

    PYTHONPATH=src:benchmarks python3 benchmarks/sampling_timeline.py --batch 1024
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sampling import as_field, as_router, build_nets, fresh_noise, monolith_method, routed_method
from ddmkit.accel.graphs import GraphedCall, graphs_per_expert, padded, shared_graphs
from ddmkit.sample.solvers import time_grid

GPU_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (start, end)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def trace_events(prof) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def wall_per_step(run, x1, ts, runs: int) -> float:
    """ms per step of `runs` runs, unprofiled."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        run(x1, ts)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / (runs * (len(ts) - 1))


def profiled(run, x1, ts, runs: int) -> dict:
    """Per step (ms), profiled: wall, busy, kernel sum, host blocked in synchronisation; kernels per step."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(runs):
            run(x1, ts)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = trace_events(prof)
    gpu = [e for e in events if e.get("cat") in GPU_WORK and "dur" in e]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    syncs = [e for e in events if e.get("cat") == "cuda_runtime"
             and e.get("name") in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")
             and "dur" in e]
    steps = runs * (len(ts) - 1)
    busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in gpu]) / 1e3
    gaps: dict = {}  # the GPU's idle time (us) by the work that ended the wait
    reach = None
    for e in sorted(gpu, key=lambda e: e["ts"]):
        if reach is not None and e["ts"] > reach:
            name = e["name"][:60]
            gaps[name] = gaps.get(name, 0.0) + e["ts"] - reach
        reach = max(reach or e["ts"], e["ts"] + e["dur"])
    return {"profiled": wall * 1e3 / steps, "busy": busy / steps,
            "kernels": sum(e["dur"] for e in kernels) / 1e3 / steps, "count": len(kernels) / steps,
            "blocked": sum(e["dur"] for e in syncs) / 1e3 / steps,
            "gaps": {name: us / 1e3 / steps for name, us in sorted(gaps.items(), key=lambda kv: -kv[1])[:6]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--runs", type=int, default=5, help="profiled fresh runs per method")
    p.add_argument("--warm-runs", type=int, default=30)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--channels-last", action="store_true",
                   help="every network's weights and the state in channels-last memory format (NHWC)")
    args = p.parse_args()
    args.experts, args.dim, args.depth, args.router_width = "unet", 0, 0, 0
    device = torch.device("cuda")
    nets, router_net, shape = build_nets("unet", args.k, args, device)
    mono_net = build_nets("unet", 1, args, device)[0][0]
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    for net in [*nets, router_net, mono_net]:
        net.to(memory_format=memory)
    experts, router = [as_field(e) for e in nets], as_router(router_net)
    mono = as_field(mono_net)
    graphed_router = GraphedCall(router, max_rows=None)
    methods = {
        "monolith": monolith_method(mono),
        "top-1 padded": routed_method([padded(f) for f in experts], router, "top-1"),
        "top-1 shared graphs": routed_method(shared_graphs(experts), graphed_router, "top-1"),
        "top-1 graphs on streams": routed_method(graphs_per_expert(experts, per_octave=4), graphed_router, "top-1",
                                                 concurrent=True),
    }
    methods = {name: fresh_noise(run, seed) for seed, (name, run) in enumerate(methods.items())}
    x1 = torch.randn(args.batch, *shape, device=device).contiguous(memory_format=memory)
    ts = time_grid(args.steps).to(device)
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}; K = {args.k}, batch {args.batch}, "
          f"ConvUNet width {args.width}, bf16{', channels last' if args.channels_last else ''}; {args.steps} steps, {args.runs} profiled fresh runs after "
          f"{args.warm_runs} warm ones; ms per step; {time.strftime('%Y-%m-%d %H:%M')}\n")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(args.warm_runs):
            for run in methods.values():
                run(x1, ts)
        walls = {name: [] for name in methods}
        for _ in range(3):  # interleaved
            for name, run in methods.items():
                walls[name].append(wall_per_step(run, x1, ts, args.runs))
        rows = {name: {"wall": sorted(w)[1], **profiled(run, x1, ts, args.runs)} for (name, w), run
                in zip(walls.items(), methods.values())}
    mono = rows["monolith"]
    print("| method | wall | wall / monolith | profiled wall | GPU busy | GPU idle | kernel time | kernel time / "
          "monolith's | kernels | host blocked in syncs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall']:.2f} | {r['wall'] / mono['wall']:.2f} | {r['profiled']:.2f} | {r['busy']:.2f} "
              f"| {r['profiled'] - r['busy']:.2f} | {r['kernels']:.2f} | {r['kernels'] / mono['kernels']:.2f} "
              f"| {r['count']:.0f} | {r['blocked']:.2f} |", flush=True)
    print("\nGPU idle per step (ms, profiled) by the work that ended the wait, largest first:")
    for name, r in rows.items():
        print(f"- {name}: " + "; ".join(f"{gap:.3f} before {kernel}" for kernel, gap in r["gaps"].items()))


if __name__ == "__main__":
    main()
