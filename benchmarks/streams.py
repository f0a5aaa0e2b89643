"""Do K small expert calls on concurrent CUDA streams cost what one call on all the rows costs?

The experiment behind issue 8's last target (top-1 at most 1.15x the monolith at batch 1024 on a GPU).
With every expert call replayed from a CUDA graph and the batch sizes repeated, top-1 still costs
1.14-1.16x the monolith (docs/PERFORMANCE.md): K calls on about B/K rows each leave the GPU emptier
than one call on B rows. Here the K calls of one top-1 step run

    sequential   one after another on one stream (what the sampler does)
    streams      each on its own CUDA stream, so that their kernels may overlap on the GPU

eagerly and from CUDA graphs (one graph per expert, each with its own memory pool: graphs replayed
at the same time must not share intermediate buffers), beside the monolith on all B rows. The rows
are split as the benchmark's random router splits them (fixed sizes, so this is the floor: no new
shapes, no router, no dispatch). Prints ms per step (median) and the ratio to the monolith.

    PYTHONPATH=src:benchmarks python3 benchmarks/streams.py --batches 1024 4096
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from convnets import ConvUNet


def split_sizes(batch: int, k: int, seed: int = 0) -> list[int]:
    """Uneven group sizes summing to batch, like a random router's top-1 groups (Dirichlet(4) shares)."""
    shares = np.random.default_rng(seed).dirichlet(np.full(k, 4.0))
    sizes = np.floor(shares * batch).astype(int)
    sizes[0] += batch - sizes.sum()
    return sizes.tolist()


def timed(fn, repeats: int, inner: int) -> float:
    """Median ms of one fn() call over `repeats` timings of `inner` calls each."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def capture(fn, *inputs, stream=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn(*inputs) as a CUDA graph with its own memory pool (warm-up on a side stream first), captured
    on `stream` (None: PyTorch's capture stream). Graphs replayed at the same time must be captured on
    different streams: a captured matrix product keeps its capture stream's cuBLAS workspace
    (ddmkit.sample.graphs.GraphedCall). The caller keeps `inputs` alive for as long as the graph is
    replayed (it reads them in place)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn(*inputs)
    return graph, out


def on_streams(calls, streams):
    """Run calls[i] on streams[i], all after the current stream's work; the current stream waits for all."""
    main = torch.cuda.current_stream()
    for s in streams:
        s.wait_stream(main)
    for call, s in zip(calls, streams):
        with torch.cuda.stream(s):
            call()
    for s in streams:
        main.wait_stream(s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    experts = [ConvUNet(3, width=args.width).to(device).eval() for _ in range(args.k)]
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}; K = {args.k}, ConvUNet width "
          f"{args.width}, 3x32x32, bf16 autocast; ms per step, median of {args.repeats} x {args.inner}\n")
    print("| batch | rows per expert | monolith | sequential | streams | sequential, graphs | streams, graphs "
          "| monolith, graph | best / monolith (graph) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    streams = [torch.cuda.Stream() for _ in range(args.k)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for batch in args.batches:
            sizes = split_sizes(batch, args.k)
            x, t = torch.randn(batch, 3, 32, 32, device=device), torch.rand(batch, device=device)
            parts = list(zip(x.split(sizes), t.split(sizes)))
            mono = lambda: experts[0](x, t)  # noqa: E731
            calls = [lambda e=e, xs=xs, ts=ts: e(xs, ts) for e, (xs, ts) in zip(experts, parts)]
            sequential = lambda: [c() for c in calls]  # noqa: E731
            concurrent = lambda: on_streams(calls, streams)  # noqa: E731
            graphs = [capture(e, xs, ts, stream=s)[0]  # parts stay alive; each graph captured on its stream
                      for e, (xs, ts), s in zip(experts, parts, streams)]
            mono_graph = capture(experts[0], x, t)[0]
            seq_graphs = lambda: [g.replay() for g in graphs]  # noqa: E731
            par_graphs = lambda: on_streams([g.replay for g in graphs], streams)  # noqa: E731
            row = {name: timed(fn, args.repeats, args.inner) for name, fn in
                   [("mono", mono), ("seq", sequential), ("par", concurrent), ("seq_g", seq_graphs),
                    ("par_g", par_graphs), ("mono_g", mono_graph.replay)]}
            best = min(row["seq_g"], row["par_g"])
            print(f"| {batch} | {' '.join(map(str, sizes))} | {row['mono']:.2f} | {row['seq']:.2f} | {row['par']:.2f} "
                  f"| {row['seq_g']:.2f} | {row['par_g']:.2f} | {row['mono_g']:.2f} | {best / row['mono_g']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
