"""How fast does one expert train: samples/s, and achieved FLOP/s as a share of the machine's
matrix-multiply peak measured in the same run? And (--mode stacked) how long do K experts trained
stacked on one GPU take against the monolith trained on the same samples?

    python benchmarks/training.py --quick                                # CPU, MLP expert: a few seconds
    python benchmarks/training.py --device cuda --bf16 --compile         # GPU, UNet expert (1 x 32 x 32)
    python benchmarks/training.py --device cpu --experts mlp --batches 256 1024 --steps 20
    python benchmarks/training.py --mode stacked --quick                 # CPU, tiny networks: a check
    python benchmarks/training.py --mode stacked --device cuda --compile # GPU: K = 8 experts, a few minutes
    python benchmarks/training.py --mode stacked --device cuda --compile --cuda-graph --only \\
        "experts on streams, bf16, CUDA graph"          # the whole step one CUDA graph, experts on K streams
    python benchmarks/training.py --mode stacked --device cuda --nets unet --profile --steps 20
                                                     # where the experts' time goes, kernel by kernel

--mode single (the default): one training step is what an expert's training does per batch: the
flow-matching loss (ddmkit.flow.flow_matching_loss) of the expert network (ddmkit.nets.VelocityMLP,
or ddmkit.nets.UNet with channels WIDTH/2W/2W and attention at 8x8, as the image config's experts),
backward, AdamW (fused on a GPU, as fit()). Variants: eager, channels-last (UNet), and each under
torch.compile with --compile (in --compile-mode); "eager (fit)", the step as fit() trains it by default (that
step also draws the batch, clips and updates the EMA); with --cuda-graph (CUDA), fit()'s step with
train.cuda_graph, compiled inside the graph, also with channels-last (UNet).
FLOPs per step are counted by PyTorch's FlopCounterMode over forward and backward (the optimiser's
few FLOPs per parameter are left out). The peak is a large square matrix product (bf16 8192^3 on a
GPU, float32 2048^3 on a CPU), the median of 10 after warm-up: the ceiling the network's matrix
products and convolutions could reach. Random data stands in for images: the speed of a step does
not depend on it. --warmup untimed steps come first (and torch.compile's compilation with them).

Prints a Markdown table: variant, batch, samples/s, ms per step, GFLOP per sample (forward +
backward), TFLOP/s and its share of the matmul peak. Measured numbers: docs/performance.md.

--mode stacked: the experts of configs/fashion_mnist.toml (K = 8 UNets 32/64/64, attention at 8x8,
10 classes, on 1 x 32 x 32 images) and of configs/fashion_mnist_latent.toml (K = 8 DiTs, patch 1,
width 192, depth 6, 6 heads, 10 classes, on 4 x 8 x 8 latents), with their train settings, trained
as ddmkit's concurrent path trains them (ddmkit.train.StackedExperts, K x batch B, through fit(),
the one training loop: AdamW, per-expert clipping, EMA), against their monolith (one network,
batch K * B, ddmkit.train.monolith_config with match = "batch"): the same samples per step, so the
ratio of the times per step is the ratio of the training times. Variants: the monolith in bf16
(the configs' train.bf16); the stacked experts in float32 (train.bf16 off: how they trained before
the stacked forward ran in bf16) and in bf16 (CUDA only: fit() autocasts on CUDA only); the experts
one at a time (one expert's step at batch B times K: expert.concurrent = false); with --compile, the
monolith and the bf16 experts (stacked, one at a time) again under train.compile (--compile-mode;
reduce-overhead replays each step as a CUDA graph, which is what one small expert's step needs); with
--cuda-graph, the monolith and the experts (stacked, on K CUDA streams: ddmkit.train.StreamedExperts, one
at a time) with train.cuda_graph, fit()'s whole step one CUDA graph. Data:
class means plus noise, drawn on the device (the speed of a step does not depend on it; the loss
column shows that every variant learns the same). Prints a Markdown table: network, variant,
compile, batch, ms per step, samples/s, experts / monolith (against the monolith with the same compile
setting), mean loss per sample over the timed steps, peak GPU memory. Eager rows come first, so a
run cut short keeps them; progress on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddmkit import __version__, load_config
from ddmkit.flow import flow_matching_loss
from ddmkit.nets import UNet, VelocityMLP, build_seeded
from ddmkit.train import StackedExperts, StreamedExperts, fit, monolith_config

from arguments import check_device, fill, nonnegative, positive

IMAGE = (1, 32, 32)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STACKED = {  # --mode stacked: the config whose experts are timed, and their data shape
    "unet": ("fashion_mnist.toml", (1, 32, 32)),        # images padded to 32 x 32
    "dit": ("fashion_mnist_latent.toml", (4, 8, 8)),    # the autoencoder's latents
}
TINY = {"unet": {"channels": [4, 8], "attention_res": [16]}, "dit": {"width": 16, "depth": 1, "heads": 2}}  # --quick


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n: int | None = None) -> float:
    """FLOP/s of a large square matrix product in the dtype training uses."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = (8192 if device.type == "cuda" else 2048) if n is None else n
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


def graph_compile_mode(args) -> str:
    """The compile mode of the --cuda-graph rows: --compile-mode, but default for reduce-overhead (whose graphs
    cannot be captured inside fit's; max-autotune runs there without its own, ddmkit.train.loop.compile_mode)."""
    return "default" if args.compile_mode == "reduce-overhead" else args.compile_mode


def measure_fit(variant: str, batch: int, args, device, precision) -> dict:
    """The step trained by fit(): batch draw, loss, backward, clipping, AdamW and the EMA, so more work per step
    than measure()'s (no clipping or EMA there); "eager (fit)" as fit() trains by default, the "CUDA graph" rows
    with train.cuda_graph (the step replayed as one CUDA graph, the network compiled inside it in the default
    mode). Timed from fit()'s log rows."""
    graphed = "CUDA graph" in variant
    channels_last = "channels_last" in variant
    model, shape = build(args, device, channels_last)
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randn(4 * batch, *shape, device=device)
    flops = step_flops(model, data[:batch], gen, precision)
    cfg = load_config(CONFIGS / "fashion_mnist.toml").expert.train.model_copy(update={  # a config's train table
        "steps": args.warmup + args.steps, "log_every": args.warmup or args.steps, "batch_size": batch, "lr": 1e-4,
        "warmup": 0, "bf16": args.bf16, "compile": graphed, "compile_mode": graph_compile_mode(args),
        "cuda_graph": graphed, "channels_last": channels_last, "checkpoint_every": 0, "tensorboard": False,
        "device": str(device)})

    def batch_loss(m, step, gen):
        idx = torch.randint(0, len(data), (batch,), generator=gen, device=device)
        return flow_matching_loss(m, data[idx], gen), {}

    start = time.perf_counter()
    _, rows = fit(model, batch_loss, cfg, device=device)
    seconds, _ = timed_rows(rows, args)
    return {"variant": variant, "batch": batch, "samples_per_s": batch / seconds, "flop_per_s": flops / seconds,
            "gflop_per_sample": flops / batch / 1e9, "ms_per_step": seconds * 1e3,
            "warmup_s": time.perf_counter() - start - seconds * args.steps}


def measure(variant: str, batch: int, args, device, precision) -> dict:
    if "(fit)" in variant:
        return measure_fit(variant, batch, args, device, precision)
    channels_last = "channels_last" in variant
    model, shape = build(args, device, channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")  # as fit()
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    data = [torch.randn(batch, *shape, device=device) for _ in range(4)]
    data = [x.contiguous(memory_format=fmt) if x.dim() == 4 else x for x in data]
    flops = step_flops(model, data[0], gen, precision)
    step_model = torch.compile(model, mode=args.compile_mode) if "compile" in variant else model
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


# ---------------------------------------------------------------- --mode stacked: K experts against the monolith

def class_data(shape, n: int, classes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of `classes` Gaussian classes (a random mean each, noise 0.5) and their labels."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, max(classes, 1), (n,), generator=gen)
    means = torch.randn(max(classes, 1), *shape, generator=gen)
    return (means[labels] + 0.5 * torch.randn(n, *shape, generator=gen)).to(device), labels.to(device)


def timed_rows(rows: list[dict], args) -> tuple[float, float]:
    """(seconds per step, mean loss) over the `args.steps` steps after the warm-up, from fit()'s log rows
    (logged every args.warmup steps: their seconds are taken once the GPU has done the row's steps)."""
    warm = [row for row in rows if row["step"] <= args.warmup]
    (first, start), timed = (warm[-1]["step"], warm[-1]["seconds"]) if warm else (0, 0.0), rows[len(warm):]
    spans = [row["step"] - last for row, last in zip(timed, [first] + [r["step"] for r in timed])]
    loss = sum(row["loss"] * span for row, span in zip(timed, spans)) / args.steps
    return (timed[-1]["seconds"] - start) / args.steps, loss


def timed_fit(model, cfg, k: int, stacked: bool, shape, args, device, profiler=None) -> dict:
    """fit() `model` (stacked: k experts of batch cfg.train.batch_size each; else one network) for
    warmup + steps steps; the time of the last `steps` and the mean loss per sample over them, both from
    fit()'s log rows (one at the end of the warm-up, its seconds taken once the GPU has done those steps:
    a step captured as a CUDA graph runs no Python of this script), and the peak GPU memory. A
    torch.profiler `profiler` is entered with the first timed step."""
    x_all, y_all = class_data(shape, 4096, cfg.net.kwargs.get("num_classes", 0), device)
    num_classes, b = cfg.net.kwargs.get("num_classes", 0), cfg.train.batch_size

    def draw(gen, size):
        idx = torch.randint(0, len(x_all), size, generator=gen, device=device)
        y = y_all[idx]
        drop = torch.rand(y.shape, generator=gen, device=device) < cfg.label_dropout  # classifier-free guidance
        return x_all[idx], (torch.where(drop, torch.full_like(y, num_classes), y) if num_classes else None)

    def batch_loss(m, step, gen):
        if profiler is not None and step == args.warmup:
            sync(device)
            profiler.__enter__()
        if stacked:  # sum over experts of each expert's mean loss, as ddmkit's concurrent path
            x, y = draw(gen, (k, b))
            per_row = lambda xt, t: m(xt.unflatten(0, (k, b)), t.unflatten(0, (k, b)), y).flatten(0, 1)
            loss = k * flow_matching_loss(per_row, x.flatten(0, 1), gen, cfg.prediction)
        else:
            x, y = draw(gen, (b,))
            loss = flow_matching_loss(lambda xt, t: m(xt, t, y), x, gen, cfg.prediction)
        return loss, {}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, rows = fit(model, batch_loss, cfg.train, device=device)
    sync(device)
    if profiler is not None:
        profiler.__exit__(None, None, None)
    seconds, loss = timed_rows(rows, args)
    return {"ms_per_step": 1e3 * seconds, "samples_per_s": (k if stacked else 1) * b / seconds,
            "loss": loss / (k if stacked else 1),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}


def stacked_variants(args, device) -> list[tuple[str, str, bool, bool, bool]]:
    """(label, kind, bf16, compile, cuda_graph), kind one of "monolith", "stacked" (the K experts through one
    vmapped step), "streams" (the K experts side by side, each on its own CUDA stream) and "one at a time"
    (one expert's step at batch B, timed and multiplied by K: the experts trained one after another, as with
    expert.concurrent = false); eager first; bf16, compile and CUDA graphs only where fit() applies them
    (CUDA)."""
    cuda = device.type == "cuda"
    eager = [("monolith", "monolith", True, False, False),
             ("experts, float32 (before)", "stacked", False, False, False)]
    eager += [("experts, bf16", "stacked", True, False, False)] if cuda else []
    eager += [("experts one at a time" + (", bf16" if cuda else ""), "one at a time", True, False, False)]
    compiled = [("monolith", "monolith", True, True, False), ("experts, bf16", "stacked", True, True, False)]
    compiled += [("experts one at a time, bf16", "one at a time", True, True, False)]
    compiled = compiled if cuda and args.compile else []
    graphed = [("monolith, CUDA graph", "monolith", True, args.compile, True),
               ("experts on streams, bf16, CUDA graph", "streams", True, args.compile, True),
               ("experts, bf16, CUDA graph", "stacked", True, args.compile, True),
               ("experts one at a time, bf16, CUDA graph", "one at a time", True, args.compile, True)]
    graphed = graphed if cuda and args.cuda_graph else []
    variants = eager + compiled + graphed
    unknown = sorted(set(args.only or []) - {v[0] for v in variants})
    if unknown:
        sys.exit(f"--only: no variant {unknown[0]!r} here; the variants: {', '.join(v[0] for v in variants)}")
    keep = lambda v: args.only is None or v[1] == "monolith" or v[0] in args.only
    return [v for v in variants if keep(v)]


def stacked_job(net: str, kind: str, bf16: bool, compiled: bool, args, device, graphed: bool = False):
    """(model, ExpertConfig, K, data shape) of one variant: the config's experts stacked or on streams (batch B
    each), one expert (batch B), or their monolith (batch K * B), trained steps = warmup + steps with log rows
    every `warmup` steps (timed_fit times the steps after the first)."""
    run = load_config(CONFIGS / STACKED[net][0])
    expert = run.expert
    k = run.partition.k if args.k is None else args.k
    kwargs = {**expert.net.kwargs, **(TINY[net] if args.quick else {})}
    train = expert.train.model_copy(update={
        "steps": args.warmup + args.steps, "log_every": args.warmup or args.steps, "device": str(device),
        "bf16": bf16, "compile": compiled, "compile_mode": graph_compile_mode(args) if graphed else args.compile_mode,
        "cuda_graph": graphed, "checkpoint_every": 0, "tensorboard": False,
        "batch_size": expert.train.batch_size if args.expert_batch is None else args.expert_batch})
    expert = expert.model_copy(update={"net": expert.net.model_copy(update={"kwargs": kwargs}), "train": train})
    shape = STACKED[net][1]
    build = lambda: build_seeded(expert.net.arch, train.seed, data_shape=list(shape), **kwargs)
    if kind == "monolith":
        return build(), monolith_config(expert, k, "batch"), k, shape
    if kind == "one at a time":
        return build(), expert, k, shape
    if kind == "streams":
        return StreamedExperts([build() for _ in range(k)]), expert, k, shape
    train = train.model_copy(update={"channels_last": False})  # as ddmkit's concurrent path
    return (StackedExperts([build() for _ in range(k)]), expert.model_copy(update={"train": train}),
            k, shape)


def run_stacked(args, device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# stacked experts against the monolith: {name}; torch {torch.__version__}; ddmkit {__version__}; "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    if device.type != "cuda":
        print("(CPU: fit() neither autocasts nor compiles here; the bf16 and compile rows need CUDA)", flush=True)
    print("\n| network | variant | compile | batch | ms/step | samples/s | experts/monolith | mean loss | peak GiB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|", flush=True)
    start, monolith_ms = time.perf_counter(), {}
    for label, kind, bf16, compiled, graphed in stacked_variants(args, device):
        for net in args.nets:
            model, cfg, k, shape = stacked_job(net, kind, bf16, compiled, args, device, graphed)
            batch = str(cfg.train.batch_size) if kind == "monolith" else f"{k} x {cfg.train.batch_size}"
            mode = cfg.train.compile_mode if compiled else "no"
            print(f"[{time.perf_counter() - start:.0f} s] {net}: {label}, compile {mode}, batch {batch} ...",
                  file=sys.stderr, flush=True)
            try:
                r = timed_fit(model, cfg, k, kind in ("stacked", "streams"), shape, args, device)
                if kind == "one at a time":  # K such experts, one after another: K times one's time per step
                    r["ms_per_step"] *= k  # (samples/s: K B samples in K times the time, as one expert)
            except Exception as e:  # one failing variant (say, compile) must not lose the others
                why = " ".join(str(e).split())[:120].replace("|", "/")
                print(f"| {net} | {label} | {mode} | {batch} | failed: {type(e).__name__}: {why} | | | | |", flush=True)
                continue
            finally:
                del model
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if kind == "monolith":
                monolith_ms[net, compiled, graphed] = r["ms_per_step"]
            base = monolith_ms.get((net, compiled, graphed)) if kind != "monolith" else None
            ratio = "-" if base is None else f"{r['ms_per_step'] / base:.2f}"
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            print(f"| {net} | {label} | {mode} | {batch} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.0f} | "
                  f"{ratio} | {r['loss']:.4f} | {peak} |", flush=True)
    print(f"[{time.perf_counter() - start:.0f} s] done", file=sys.stderr, flush=True)


def op_times(profiler, device, steps: int) -> dict[str, float]:
    """Time per step (ms) in a finished profile: on CUDA of each kernel (and memory copy or set), the
    device's own events, so that they add up to the GPU's busy time (an operator's self device time
    would count its kernels a second time); on a CPU the self CPU time of each operator."""
    if device.type != "cuda":
        return {e.key: e.self_cpu_time_total / 1e3 / steps for e in profiler.key_averages()}
    return {e.key: e.self_device_time_total / 1e3 / steps for e in profiler.key_averages()
            if e.device_type != torch.autograd.DeviceType.CPU}


def is_cudnn_kernel(name: str) -> bool:
    """A kernel of cuDNN's convolutions (its own, CUTLASS's and the xmma implicit GEMMs it runs, and its
    layout transforms), by name."""
    return any(word in name for word in ("cudnn", "xmma", "cutlass", "convolve", "conv2d"))


def run_profile(args, device) -> None:
    """Where the stacked experts' time goes against the monolith's: the same fit() as the table, under
    torch.profiler for the timed steps, compared kernel by kernel on CUDA (operator by operator on a CPU),
    per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    compiled = args.compile and device.type == "cuda"
    mode = args.compile_mode if compiled else "no"
    for net in args.nets:
        times, steps_ms = {}, {}
        for kind in ("monolith", "stacked"):
            model, cfg, k, shape = stacked_job(net, kind, device.type == "cuda", compiled, args, device)
            profiler = torch.profiler.profile(activities=activities)
            r = timed_fit(model, cfg, k, kind == "stacked", shape, args, device, profiler)
            times[kind] = op_times(profiler, device, args.steps)
            steps_ms[kind] = r["ms_per_step"]
            del model
            torch._dynamo.reset()
        what = "kernel (device time)" if device.type == "cuda" else "operator (self CPU time)"
        print(f"\n## {net}: time per step by {what} (compile {mode}, {args.steps} profiled steps)\n\n"
              f"ms per step under the profiler: monolith {steps_ms['monolith']:.1f}, experts {steps_ms['stacked']:.1f}\n")
        print(f"| {what.split()[0]} | monolith ms | experts ms | experts - monolith ms | share of the difference |")
        print("|---|---:|---:|---:|---:|")
        time_of = lambda kind, op: times[kind].get(op, 0.0)
        ops = sorted(set().union(*times.values()), key=lambda op: -abs(time_of("stacked", op) - time_of("monolith", op)))
        total = f"all {what.split()[0]}s"
        sums = [total] + (["cuDNN kernels (convolutions)", "other kernels"] if device.type == "cuda" else [])
        for t in times.values():
            cudnn = sum(v for op, v in t.items() if is_cudnn_kernel(op))
            t.update(zip(sums, [sum(t.values()), cudnn, sum(t.values()) - cudnn]))
        gap = time_of("stacked", total) - time_of("monolith", total)
        for op in ops[:args.profile_rows] + sums:
            m, e = time_of("monolith", op), time_of("stacked", op)
            share = f"{(e - m) / gap:.0%}" if gap else "-"
            print(f"| {op[:70]} | {m:.2f} | {e:.2f} | {e - m:+.2f} | {share} |", flush=True)


QUICK = {  # --quick: a check in a few seconds; it sets only the options the user left out. One thread: on a
    # CPU shared with other jobs spare OpenMP threads spin against them (the tiny stacked UNets took 20-40 s on
    # two threads of a busy 2-core machine, 5 s on one)
    "single": {"device": "cpu", "experts": "mlp", "batches": [256], "steps": 5, "warmup": 2, "threads": 1},
    "stacked": {"device": "cpu", "steps": 3, "warmup": 1, "k": 2, "expert_batch": 4, "threads": 1},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["single", "stacked"], default="single",
                   help="single: one expert's samples/s and share of the matmul peak; stacked: K experts "
                        "trained stacked against the monolith on the same samples")
    p.add_argument("--quick", action="store_true",
                   help="CPU, one thread, MLP expert, batch 256, 5 steps after 2: a check in a few seconds (--mode "
                        "stacked: tiny networks, K = 2, batch 4, 3 steps after 1); options given explicitly are "
                        "kept")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there is one)")
    p.add_argument("--experts", choices=["mlp", "unet"], default=None,
                   help="--mode single: the expert network (default unet)")
    p.add_argument("--width", type=positive, default=None,
                   help="--mode single: UNet channels WIDTH/2W/2W (default 64); MLP width (256)")
    p.add_argument("--dim", type=positive, default=64, help="--mode single: MLP data dimension")
    p.add_argument("--batches", type=positive, nargs="+", default=None,
                   help="--mode single: batch sizes (default 256 1024; --mode stacked: see --expert-batch)")
    p.add_argument("--steps", type=positive, default=None, help="timed steps (default 20; --mode stacked: 200)")
    p.add_argument("--warmup", type=nonnegative, default=None,
                   help="untimed steps first, torch.compile's compilation among them (default 5; --mode stacked: 20)")
    p.add_argument("--bf16", action="store_true",
                   help="--mode single: bf16 autocast (as train.bf16; --mode stacked sets it per variant)")
    p.add_argument("--compile", action="store_true", help="also time the variants under torch.compile")
    p.add_argument("--threads", type=positive, default=None, help="CPU threads (default: PyTorch's; --quick: 1)")
    p.add_argument("--nets", nargs="+", choices=list(STACKED), default=list(STACKED),
                   help="--mode stacked: the experts of fashion_mnist.toml (unet), fashion_mnist_latent.toml (dit)")
    p.add_argument("--k", type=positive, default=None,
                   help="--mode stacked: number of experts (default: the config's)")
    p.add_argument("--expert-batch", type=positive, default=None,
                   help="--mode stacked: batch of each expert (default: the config's); the monolith's is K times it")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile mode of the compile rows (train.compile_mode); reduce-overhead replays "
                        "each step as a CUDA graph")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: also time training through fit() with train.cuda_graph, the whole step one CUDA "
                        "graph: --mode single, the expert compiled inside it (in --compile-mode, default for "
                        "reduce-overhead); --mode stacked, the "
                        "monolith and the experts (stacked, on streams, one at a time), compiled inside it with "
                        "--compile, each against the monolith graphed the same way")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                   help='time only these variants (--mode stacked: and the monolith), e.g. "experts, bf16" or '
                        '"compile reduce-overhead"')
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="torch._inductor.config.coordinate_descent_tuning = True (compiled rows: tunes the "
                        "generated kernels' block sizes at compile time)")
    p.add_argument("--profile", action="store_true",
                   help="--mode stacked: instead of the table, profile the monolith and the stacked experts "
                        "(bf16 on CUDA; compiled with --compile, in the default --compile-mode: CUDA graphs hide "
                        "their kernels from the profiler) and compare their time kernel by kernel (CUDA; the "
                        "cuDNN kernels summed) or operator by operator (CPU)")
    p.add_argument("--profile-rows", type=positive, default=25,
                   help="--profile: operators shown (largest differences)")
    args = p.parse_args(argv)
    if args.quick:
        fill(args, QUICK[args.mode])
    stacked = args.mode == "stacked"
    fill(args, {"device": "cuda" if torch.cuda.is_available() else "cpu", "experts": "unet", "batches": [256, 1024],
                "steps": 200 if stacked else 20, "warmup": 20 if stacked else 5})
    fill(args, {"width": 64 if args.experts == "unet" else 256})
    check_device(p, args.device)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.coordinate_descent:
        import torch._inductor.config as inductor
        inductor.coordinate_descent_tuning = True
    os.environ.setdefault("DDMKIT_QUIET", "1")  # fit()'s progress bars; this script reports its own
    if args.mode == "stacked":
        return run_profile(args, device) if args.profile else run_stacked(args, device)
    precision = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak(device, 1024 if args.quick else None)
    print(f"# training benchmark: {name}; torch {torch.__version__}; ddmkit {__version__}; {args.experts} width "
          f"{args.width}; bf16 {args.bf16}; {args.steps} timed steps after {args.warmup}\n"
          f"measured matmul peak: {peak / 1e12:.2f} TFLOP/s", flush=True)
    variants = ["eager"] + (["eager channels_last"] if args.experts == "unet" else [])
    compiled = "compile" if args.compile_mode == "default" else f"compile {args.compile_mode}"
    variants += [v.replace("eager", compiled) for v in variants] if args.compile else []
    variants += ["eager (fit)"]
    graphed = ["compile, CUDA graph (fit)"]
    graphed += ["compile channels_last, CUDA graph (fit)"] if args.experts == "unet" else []
    variants += graphed if args.cuda_graph and device.type == "cuda" else []
    unknown = sorted(set(args.only or []) - set(variants))
    if unknown:
        raise SystemExit(f"--only {', '.join(unknown)}: not a variant of this run ({', '.join(variants)})")
    variants = [v for v in variants if args.only is None or v in args.only]
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
