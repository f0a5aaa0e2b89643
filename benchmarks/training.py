"""Expert training throughput: samples/s and achieved FLOP/s, as a share of the
card's matrix-multiply peak measured in the same run.

    PYTHONPATH=src python benchmarks/training.py --device cuda --bf16 --compile    # UNet experts, 32x32x3
    PYTHONPATH=src python benchmarks/training.py --device cpu --experts mlp --batches 256 --steps 5

One training step = flow-matching loss (ddmkit.flow.losses), backward, AdamW.
FLOPs per step are counted by PyTorch's FlopCounterMode over forward and
backward (the optimiser's few FLOPs per parameter are left out). The peak is
a large square matrix product (bf16 8192^3 on a GPU, float32 2048^3 on a CPU),
the median of 10 after warm-up: the ceiling the convolutions could reach.
Random images stand in for data: the speed of a step does not depend on it.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddmkit.flow.losses import flow_matching_loss
from ddmkit.nets.mlp import VelocityMLP


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device) -> float:
    """FLOP/s of a large square matrix product in the dtype training uses."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
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


def build(kind: str, width: int, device, channels_last: bool):
    if kind == "mlp":
        return VelocityMLP([64], width=width).to(device), (64,)
    from convnets import ConvUNet
    net = ConvUNet(3, width=width).to(device)
    return (net.to(memory_format=torch.channels_last) if channels_last else net), (3, 32, 32)


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
    model, shape = build(args.experts, args.width, device, channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    data = [torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt) if len(shape) == 3
            else torch.randn(batch, *shape, device=device) for _ in range(4)]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--experts", choices=["mlp", "unet"], default="unet")
    p.add_argument("--width", type=int, default=None, help="UNet 64, MLP 256")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = p.parse_args()
    args.width = args.width or (64 if args.experts == "unet" else 256)
    device = torch.device(args.device)
    precision = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak(device)
    print(f"# training benchmark: {name}; torch {torch.__version__}; {args.experts} width {args.width}; bf16 {args.bf16}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}\nmeasured matmul peak: {peak / 1e12:.1f} TFLOP/s", flush=True)
    variants = ["eager"] + (["eager channels_last"] if args.experts == "unet" else [])
    variants += [v.replace("eager", "compile") for v in variants] if args.compile else []
    print("\n| variant | batch | samples/s | ms/step | GFLOP/sample (fwd+bwd) | TFLOP/s | share of matmul peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in variants:
        for batch in args.batches:
            try:
                r = measure(variant, batch, args, device, precision)
            except Exception as e:  # one failing variant (say, compile) must not lose the others
                print(f"| {variant} | {batch} | failed: {type(e).__name__}: {str(e)[:120]} |||||")
                continue
            print(f"| {variant} | {batch} | {r['samples_per_s']:.0f} | {r['ms_per_step']:.1f} | "
                  f"{r['gflop_per_sample']:.2f} | {r['flop_per_s'] / 1e12:.1f} | {r['flop_per_s'] / peak:.1%} |", flush=True)


if __name__ == "__main__":
    main()
