"""How fast does one expert train: samples/s, and achieved FLOP/s as a share of the machine's
matrix-multiply peak measured in the same run?

    python benchmarks/training.py --quick                                # CPU, MLP expert: a few seconds
    python benchmarks/training.py --device cuda --bf16 --compile         # GPU, UNet expert (1 x 32 x 32)
    python benchmarks/training.py --device cpu --experts mlp --batches 256 1024 --steps 20

One training step is what an expert's training does per batch: the flow-matching loss
(ddmkit.flow.flow_matching_loss) of the expert network (ddmkit.nets.VelocityMLP, or ddmkit.nets.UNet
with channels WIDTH/2W/2W and attention at 8x8, as the image config's experts), backward, AdamW.
Variants: eager, channels-last (UNet), and each under torch.compile with --compile.
FLOPs per step are counted by PyTorch's FlopCounterMode over forward and backward (the optimiser's
few FLOPs per parameter are left out). The peak is a large square matrix product (bf16 8192^3 on a
GPU, float32 2048^3 on a CPU), the median of 10 after warm-up: the ceiling the network's matrix
products and convolutions could reach. Random data stands in for images: the speed of a step does
not depend on it. --warmup untimed steps come first (and torch.compile's compilation with them).

Prints a Markdown table: variant, batch, samples/s, ms per step, GFLOP per sample (forward +
backward), TFLOP/s and its share of the matmul peak. Measured numbers: docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddmkit import __version__
from ddmkit.flow import flow_matching_loss
from ddmkit.nets import UNet, VelocityMLP

IMAGE = (1, 32, 32)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n: int | None = None) -> float:
    """FLOP/s of a large square matrix product in the dtype training uses."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def build(args, device, channels_last: bool) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if args.experts == "mlp":
        return VelocityMLP([args.dim], width=args.width).to(device), (args.dim,)
    w = args.width
    net = UNet(list(IMAGE), channels=[w, 2 * w, 2 * w], attention_res=[8]).to(device)
    return (net.to(memory_format=torch.channels_last) if channels_last else net), IMAGE


def train_step(model, opt, x, gen, precision) -> None:
    with precision():
        loss = flow_matching_loss(model, x, gen)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_flops(model, x, gen, precision) -> float:
    """Forward + backward FLOPs of one step."""
    with FlopCounterMode(display=False) as fc, precision():
        flow_matching_loss(model, x, gen).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def measure(variant: str, batch: int, args, device, precision) -> dict:
    channels_last = "channels_last" in variant
    model, shape = build(args, device, channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    data = [torch.randn(batch, *shape, device=device) for _ in range(4)]
    data = [x.contiguous(memory_format=fmt) if x.dim() == 4 else x for x in data]
    flops = step_flops(model, data[0], gen, precision)
    step_model = torch.compile(model) if "compile" in variant else model
    start = time.perf_counter()
    for i in range(args.warmup):
        train_step(step_model, opt, data[i % 4], gen, precision)
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(args.steps):
        train_step(step_model, opt, data[i % 4], gen, precision)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    return {"variant": variant, "batch": batch, "samples_per_s": batch / seconds, "flop_per_s": flops / seconds,
            "gflop_per_sample": flops / batch / 1e9, "ms_per_step": seconds * 1e3, "warmup_s": warm}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU, MLP expert, batch 256, 5 steps: a check in a few seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--experts", choices=["mlp", "unet"], default="unet", help="the expert network")
    p.add_argument("--width", type=int, default=None, help="UNet channels WIDTH/2W/2W (default 64); MLP width (256)")
    p.add_argument("--dim", type=int, default=64, help="MLP data dimension")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as train.bf16)")
    p.add_argument("--compile", action="store_true", help="also time the variants under torch.compile")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.experts, args.batches, args.steps, args.warmup = "cpu", "mlp", [256], 5, 2
    args.width = args.width or (64 if args.experts == "unet" else 256)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak(device, 1024 if args.quick else None)
    print(f"# training benchmark: {name}; torch {torch.__version__}; ddmkit {__version__}; {args.experts} width "
          f"{args.width}; bf16 {args.bf16}; {args.steps} timed steps after {args.warmup}\n"
          f"measured matmul peak: {peak / 1e12:.2f} TFLOP/s", flush=True)
    variants = ["eager"] + (["eager channels_last"] if args.experts == "unet" else [])
    variants += [v.replace("eager", "compile") for v in variants] if args.compile else []
    print("\n| variant | batch | samples/s | ms/step | GFLOP/sample (fwd+bwd) | TFLOP/s | share of matmul peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in variants:
        for batch in args.batches:
            try:
                r = measure(variant, batch, args, device, precision)
            except Exception as e:  # one failing variant (say, compile) must not lose the others
                print(f"| {variant} | {batch} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |")
                continue
            print(f"| {variant} | {batch} | {r['samples_per_s']:.0f} | {r['ms_per_step']:.1f} | "
                  f"{r['gflop_per_sample']:.3f} | {r['flop_per_s'] / 1e12:.2f} | {r['flop_per_s'] / peak:.1%} |",
                  flush=True)


if __name__ == "__main__":
    main()
