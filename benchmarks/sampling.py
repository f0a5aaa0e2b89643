"""How fast is routed sampling, per strategy, against the monolith, against full routing and
against a naive combiner (every expert on every row)?

    python benchmarks/sampling.py --quick                   # CPU, K = 8, MLP experts: under a minute
    python benchmarks/sampling.py                           # CPU, K = 4, 8, 16; batch 256 .. 8192
    python benchmarks/sampling.py --device cuda --experts unet --bf16 --ks 8 --batches 256 1024 4096 \\
        --speed streams graphs graphs+streams --warm-runs 8 # GPU, the speed options side by side

Every method samples through the public API, as a user would: the routed strategies with
`sample_ddm` on a `DDM` of K random-weight experts and a router, the monolith (one network of one
expert's size) with `sample_single`, and the naive combiner with `sample_single` on a field that
calls every expert on every row and weighs the outputs with top-2 weights (`combine_dense`).
Methods:

    top-1, top-2, full, ...   sample_ddm(strategy=...): the sparse combiner (full: its dense path)
    top-2 m=4                 sample_ddm("top-2", router_every=4): the routing reused for 4 steps
    monolith                  sample_single on one network of one expert's size
    naive top-2               every expert on every row, then the top-2 weighted sum

--speed names the SpeedOptions to time, each with every method (on a CPU they change nothing: one "eager" row):

    eager            SpeedOptions(cuda_graphs=False, cuda_streams=False)
    streams          SpeedOptions() (the default: a sparse step's experts on concurrent CUDA streams)
    graphs           SpeedOptions(cuda_graphs=True, cuda_streams=False) (one set of graphs for all experts)
    graphs+streams   SpeedOptions(cuda_graphs=True, cuda_streams=True) (a set of graphs per expert)

with autocast="bfloat16" under --bf16. On a GPU every expert call without graphs is padded to a
bucket size, as sample_ddm always does. The monolith's field is prepared once per speed
(ddmkit.accel.accelerate_field), as a DDM keeps its experts' graphs from one sample_ddm call to the
next (sample_single alone would capture its graphs anew at every call). The naive combiner runs
its calls as they are, without graphs.

How it times: every repeat starts all methods from the same new noise (so the experts' group sizes
change from repeat to repeat and from step to step, as in sampling); --warm-runs untimed repeats
come first (cuDNN plans, graph captures). Methods are interleaved inside each repeat, so a burst of
load from other jobs hits all of them alike. A cell is the median over --repeats of the wall time
that sample_ddm / sample_single report (the GPU synchronised), divided by --steps. On a CPU
--threads 1 is the default: spare OpenMP threads spin against other jobs on a shared machine.
The networks have random weights: speed depends on how rows spread over the experts, not on what
they learned (the image router gets a pixel term so that its rows spread, see SpreadRouter).

Prints, per K, a Markdown table: ms per Euler step of every method per batch (and speed), the
ratios top-2/full, top-1/monolith and naive/top-2 (those whose methods --strategies times; a note
names what the others need), then the expert evaluations per sample per step and the rows top-1
gave each expert. Measured numbers: docs/performance.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddmkit import DDM, DDMError, SpeedOptions, __version__, parse_strategy, sample_ddm, sample_single, start_noise
from ddmkit.accel import accelerate_field
from ddmkit.nets import NetworkField, RouterCNN, RouterMLP, RouterOutput, UNet, VelocityMLP, VelocityOutput
from ddmkit.routing import RoutingState, combine_dense

from arguments import check_device, fill, nonnegative, positive

SPEEDS = {
    "eager": SpeedOptions(cuda_graphs=False, cuda_streams=False),
    "streams": SpeedOptions(cuda_graphs=False, cuda_streams=True),
    "graphs": SpeedOptions(cuda_graphs=True, cuda_streams=False),
    "graphs+streams": SpeedOptions(cuda_graphs=True, cuda_streams=True),
}
STRATEGIES = ["top-1", "top-2", "full", "sample-2", "switch"]


# ---------------------------------------------------------------- networks

class SpreadRouter(nn.Module):
    """RouterCNN logits plus a linear map of the 4x4-pooled pixels.

    With random weights a RouterCNN gives every noise image nearly the same logits, so nearly every
    row would go to one expert and there would be no dispatch to measure. Its head is scaled down
    and the pixel term (weights N(0, 64/d): unit-variance logits from pure noise at 32x32) spreads
    the rows over the experts, as a trained router spreads them over balanced clusters."""

    def __init__(self, data_shape: list[int], num_experts: int, channels: list[int]):
        super().__init__()
        self.cnn = RouterCNN(data_shape, num_experts, channels=channels)
        with torch.no_grad():
            self.cnn.head[-1].weight.mul_(0.01)
            self.cnn.head[-1].bias.zero_()
        d = 16 * data_shape[0]
        self.pixels = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(d, num_experts))
        nn.init.normal_(self.pixels[2].weight, std=8 * d ** -0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.cnn(x, t) + self.pixels(x)


def expert_network(args) -> nn.Module:
    if args.experts == "mlp":
        return VelocityMLP([args.dim], width=args.width, depth=args.depth)
    w = args.width
    net = UNet([3, args.image, args.image], channels=[w, 2 * w, 2 * w], attention_res=[8])
    with torch.no_grad():  # the output layer starts at zero (v = 0): give it small values, so x moves
        net.conv_out.weight.normal_(0, 0.02)
    return net


def router_network(args, k: int) -> nn.Module:
    if args.experts == "mlp":
        return RouterMLP([args.dim], k, width=args.router_width, depth=1)
    c = args.router_width
    return SpreadRouter([3, args.image, args.image], k, channels=[c, 2 * c, 4 * c])


def data_shape(args) -> tuple[int, ...]:
    return (args.dim,) if args.experts == "mlp" else (3, args.image, args.image)


def forward_flops(net: nn.Module, shape, device) -> float:
    """Forward FLOPs per row (PyTorch's FlopCounterMode on a batch of 8)."""
    x, t = torch.randn(8, *shape, device=device), torch.rand(8, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, t)
    return fc.get_total_flops() / 8


# ---------------------------------------------------------------- methods
# A method: (x1, speed) -> (seconds, expert rows evaluated per sample, rows per expert or None).

def build(k: int, args, device):
    """The DDM of K random experts and a router, the monolith field, the router/expert FLOP ratio."""
    torch.manual_seed(0)
    shape = data_shape(args)
    experts = [expert_network(args).to(device).eval() for _ in range(k)]
    router = router_network(args, k).to(device).eval()
    ddm = DDM(experts=[NetworkField(e, VelocityOutput()) for e in experts], router=NetworkField(router, RouterOutput()),
              prior=torch.full((k,), 1 / k, device=device), data_shape=shape, device=torch.device(device))
    monolith = NetworkField(expert_network(args).to(device).eval(), VelocityOutput())
    ratio = forward_flops(router, shape, device) / forward_flops(experts[0], shape, device)
    return ddm, monolith, ratio


def methods_of(ddm: DDM, monolith, args, device) -> dict:
    steps, chunk = args.steps, args.batch_size

    def routed(strategy: str, router_every: int = 1):
        def run(x1, speed):
            _, info = sample_ddm(ddm, strategy, len(x1), steps, "euler", 0, device, x1=x1, router_every=router_every,
                                 batch_size=chunk, speed=speed)
            return info["wall_time"], info["expert_calls_per_sample"], info["expert_rows"]
        return run

    def single(field, expert_calls: int, graphs: bool = True):
        prepared = {}  # per speed: the field as it runs (graphed once, as DDM.networks keeps the experts)

        def run(x1, speed):
            speed = speed if graphs else dataclasses.replace(speed, cuda_graphs=False)
            if speed not in prepared:
                prepared[speed] = accelerate_field(field, speed)
            _, info = sample_single(prepared[speed], ddm.data_shape, len(x1), steps, "euler", 0, device, x1=x1,
                                    batch_size=chunk, speed=dataclasses.replace(speed, cuda_graphs=False))
            return info["wall_time"], info["velocity_evaluations"] * expert_calls, None
        return run

    top2 = parse_strategy("top-2")

    def naive(x, t):  # every expert on every row, weighted by top-2
        return combine_dense(ddm.experts, top2.weights(ddm.router(x, t), RoutingState()), x, t)

    methods = {s: routed(s) for s in args.strategies}
    methods["top-2 m=4"] = routed("top-2", router_every=4)
    methods["monolith"] = single(monolith, 1)
    methods["naive top-2"] = single(naive, ddm.k, graphs=False)
    return methods


def time_batch(methods: dict, speeds: dict, shape, b: int, args, device) -> dict:
    """{(speed, method): (median s per step, best s per step, evaluations per sample per step, rows)}."""
    runs = {(sn, m): run for sn in speeds for m, run in methods.items()}
    seconds = {key: [] for key in runs}
    evals, rows = {}, {}
    for r in range(-args.warm_runs, args.repeats):
        x1 = start_noise(b, shape, seed=10_000 + r, device=device)  # new noise every repeat, the same for all
        for (sn, m), run in runs.items():
            s, e, per_expert = run(x1.clone(), speeds[sn])
            if r >= 0:
                seconds[sn, m].append(s / args.steps)
                evals[sn, m], rows[sn, m] = e / args.steps, per_expert
    return {key: (statistics.median(v), min(v), evals[key], rows[key]) for key, v in seconds.items()}


# ---------------------------------------------------------------- tables

RATIOS = {"top-2/full": ("top-2", "full"), "top-1/monolith": ("top-1", "monolith"),
          "naive/top-2": ("naive top-2", "top-2")}  # column: (numerator, denominator) methods


def ratios(r: dict, sn: str, at: int, names: list[str]) -> list[str]:
    """The ratio columns `names` (keys of RATIOS) from the median (at=0) or best (at=1) times."""
    return [f"{r[sn, RATIOS[n][0]][at] / r[sn, RATIOS[n][1]][at]:.2f}" for n in names]


def print_table(k: int, results: dict, columns: list[str], speeds: list[str]) -> None:
    names = [n for n, methods in RATIOS.items() if set(methods) <= set(columns)]  # the ratios this run can give
    print(f"\n### K = {k}: ms per Euler step (median)\n")
    print("| batch | speed | " + " | ".join(columns + names) + " |")
    print("|---:|---|" + "---:|" * (len(columns) + len(names)))
    for b, r in results.items():
        for sn in speeds:
            ms = [f"{r[sn, c][0] * 1e3:.2f}" for c in columns]
            print(f"| {b} | {sn} | " + " | ".join(ms + ratios(r, sn, 0, names)) + " |")
    left_out = [n for n in RATIOS if n not in names]
    if left_out:
        needs = sorted({m for n in left_out for m in RATIOS[n] if m not in columns})
        print(f"\n(left out: the ratios {', '.join(left_out)}, which need {' and '.join(needs)} in --strategies)")
    first = next(iter(results.values()))
    evals = ", ".join(f"{c} {first[speeds[0], c][2]:.2f}" for c in columns)
    print(f"\nexpert evaluations per sample per step: {evals}")
    if names:
        best = "; ".join(f"batch {b} {sn}: " + ", ".join(ratios(r, sn, 1, names)) for b, r in results.items()
                         for sn in speeds)
        print(f"the same ratios from the best repeat (less sensitive to other jobs): {best}")
    if "top-1" in columns:
        spread = "; ".join(f"batch {b}: " + " ".join(map(str, r[speeds[0], "top-1"][3])) for b, r in results.items())
        print(f"rows top-1 gave each expert over a run: {spread}", flush=True)


# ---------------------------------------------------------------- main

QUICK = {"device": "cpu", "ks": [8], "batches": [256, 1024, 4096], "repeats": 3}  # --quick: where not given


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU, K = 8, batches 256 1024 4096, 3 repeats: a check in under a minute (options given "
                        "explicitly are kept)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    p.add_argument("--bf16", action="store_true", help="networks under bf16 autocast (SpeedOptions.autocast)")
    p.add_argument("--speed", nargs="+", choices=list(SPEEDS), default=["streams"],
                   help="SpeedOptions to time, side by side (default: streams, the library's default)")
    p.add_argument("--ks", type=positive, nargs="+", default=None, help="numbers of experts K (default 4 8 16)")
    p.add_argument("--batches", type=positive, nargs="+", default=None,
                   help="samples per sampling call (default 256 1024 4096 8192)")
    p.add_argument("--batch-size", type=positive, default=None,
                   help="sample_ddm's batch_size: integrate the rows this many at a time (default: all at once)")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES,
                   help=f"routing strategies to time (default {' '.join(STRATEGIES)}); the ratio columns need "
                        "top-1, top-2 and full")
    p.add_argument("--steps", type=positive, default=2, help="Euler steps per timed run")
    p.add_argument("--repeats", type=positive, default=None,
                   help="timed runs per method, the cell is their median (default 5)")
    p.add_argument("--warm-runs", type=nonnegative, default=1, help="untimed runs of every method first")
    p.add_argument("--experts", choices=["mlp", "unet"], default="mlp",
                   help="mlp: VelocityMLP experts, RouterMLP; unet: UNet experts (3 x IMAGE x IMAGE, channels "
                        "WIDTH/2W/2W, attention at 8x8), a RouterCNN router with a pixel term")
    p.add_argument("--width", type=positive, default=None,
                   help="expert width (MLP 128, UNet 32: the image config's experts)")
    p.add_argument("--depth", type=nonnegative, default=3, help="MLP residual blocks")
    p.add_argument("--dim", type=positive, default=64, help="MLP data dimension")
    p.add_argument("--router-width", type=positive, default=None,
                   help="MLP router width (one block, default 32); RouterCNN channels C/2C/4C (default 16)")
    p.add_argument("--image", type=positive, default=32, help="UNet image side, a multiple of 4")
    p.add_argument("--threads", type=positive, default=1, help="CPU threads")
    p.add_argument("--json", type=Path, help="also write the raw results to this file")
    args = p.parse_args(argv)
    if args.quick:
        fill(args, QUICK)
    mlp = args.experts == "mlp"
    fill(args, {"device": "cpu", "ks": [4, 8, 16], "batches": [256, 1024, 4096, 8192], "repeats": 5,
                "width": 128 if mlp else 32, "router_width": 32 if mlp else 16})
    check_device(p, args.device)
    for strategy in args.strategies:
        try:
            parse_strategy(strategy)
        except DDMError as e:
            p.error(f"--strategies: {e}")
    if args.experts == "unet" and args.image % 4:
        p.error(f"--image {args.image}: the UNet halves the image twice; give a multiple of 4, e.g. 32")
    if args.json is not None and not args.json.parent.is_dir():
        p.error(f"--json {args.json}: there is no folder {args.json.parent}; create it or give another path")
    if args.json is not None and args.json.is_dir():
        p.error(f"--json {args.json} is a folder; give the path of a file, e.g. {args.json / 'sampling.json'}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    autocast = "bfloat16" if args.bf16 else None
    speeds = {name: dataclasses.replace(SPEEDS[name], autocast=autocast) for name in args.speed}
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# sampling benchmark: {where}; torch {torch.__version__}; ddmkit {__version__}; experts {args.experts} "
          f"width {args.width}; bf16 {args.bf16}; {args.steps} Euler steps x {args.repeats} repeats "
          f"(+{args.warm_runs} warm-up)", flush=True)
    if device.type != "cuda":  # the speed options are CUDA's: a CPU row is eager whatever --speed names
        print(f"(on a CPU the speed options change nothing: one row per batch, eager, for --speed {' '.join(speeds)})")
        speeds = {"eager": dataclasses.replace(SPEEDS["eager"], autocast=autocast)}
    start = time.perf_counter()
    raw = []
    for k in args.ks:
        ddm, monolith, flop_ratio = build(k, args, device)
        print(f"\nK = {k}: router FLOPs / expert FLOPs = {flop_ratio:.3f}", flush=True)
        methods = methods_of(ddm, monolith, args, device)
        columns = list(methods)
        results = {}
        for b in args.batches:
            results[b] = time_batch(methods, speeds, ddm.data_shape, b, args, device)
            print(f"  batch {b} done ({time.perf_counter() - start:.0f} s)", flush=True)
        print_table(k, results, columns, list(speeds))
        raw += [{"K": k, "batch": b, "speed": sn, "method": m, "median_s_per_step": v[0], "best_s_per_step": v[1],
                 "evaluations_per_sample_per_step": v[2]} for b, r in results.items() for (sn, m), v in r.items()]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(raw, f, indent=1)
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
