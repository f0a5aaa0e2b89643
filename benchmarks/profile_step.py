"""Where the time of one expert training step goes, on one GPU.

    PYTHONPATH=src python benchmarks/profile_step.py [--batch 256] [--steps 60]

Times the same UNet (64/128/128, 1x32x32, class-conditional, bf16 autocast)
in steps of growing completeness, each with a host sync only at the end of the
timed window, so the rows add up to what fit() pays:

    fwd+bwd            loss.backward() only
    + AdamW (fused)    and the optimizer step
    + clip + EMA       and grad clipping and the EMA update
    + LR schedule      and LambdaLR's step
    + running sums     and fit()'s running loss/grad-norm sums (what fit() adds per step)
    fit()              ddmkit's training loop as the image stage runs it

then each variant again under torch.compile, and a torch.profiler table of
the heaviest CUDA kernels and CPU ops of fit()'s step. Prints Markdown.
"""
from __future__ import annotations

import argparse
import time

import torch

from ddmkit.config import TrainConfig
from ddmkit.flow.losses import flow_matching_loss
from ddmkit.nets import build_seeded
from ddmkit.train.loop import EMA, fit

SHAPE = [1, 32, 32]
UNET = dict(channels=[64, 128, 128], blocks=1, attention_res=[8], num_classes=10)


def timed(step, n: int) -> float:
    """Steps per second of step() over n calls, after 5 warm-up calls."""
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def make_step(level: str, model, batch: int, compile_mode: str | None):
    x = torch.randn(4096, *SHAPE, device="cuda")
    y = torch.randint(0, 10, (4096,), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    ema = EMA(model, 0.999)
    running = {}

    def step():
        idx = torch.randint(0, len(x), (batch,), generator=gen, device="cuda")
        yb = y[idx]
        with torch.autocast("cuda", torch.bfloat16):
            loss = flow_matching_loss(lambda xt, t: net(xt, t, y=yb), x[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if level == "bwd":
            return
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) if level != "opt" else None
        opt.step()
        if level == "opt":
            return
        ema.update_parameters(model)
        if level in ("sched", "sums"):
            sched.step()
        if level == "sums":
            for name, value in {"loss": loss.detach(), "grad_norm": norm}.items():
                running[name] = running.get(name, 0.0) + value.detach().float()

    return step


def fit_rate(batch: int, steps: int, compile_mode: str | None, profile: bool = False) -> float:
    model = build_seeded("unet", 0, data_shape=SHAPE, **UNET)
    x = torch.randn(4096, *SHAPE, device="cuda")
    y = torch.randint(0, 10, (4096,), device="cuda")

    def batch_loss(m, step, gen):
        idx = torch.randint(0, len(x), (batch,), generator=gen, device="cuda")
        yb = y[idx]
        return flow_matching_loss(lambda xt, t: m(xt, t, y=yb), x[idx], gen), {}

    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-4, warmup=10, log_every=max(steps // 3, 1),
                      device="cuda", bf16=True, compile=compile_mode is not None,
                      compile_mode=compile_mode or "default")
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            fit(model, batch_loss, cfg.model_copy(update={"steps": 20, "log_every": 10}), description="profile")
        print("\n### heaviest ops by CUDA time (20 steps of fit())\n")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=48))
        print("\n### heaviest ops by CPU time\n")
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=48))
        return 0.0
    _, history = fit(model, batch_loss, cfg, description="fit")
    a, b = history[0], history[-1]
    return (b["step"] - a["step"]) / (b["seconds"] - a["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler tables of fit()")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = []
    plan = [(None, "bwd"), (None, "opt"), (None, "all"), (None, "sched"), (None, "sums")]
    if not args.no_compile:
        plan += [("default", "bwd"), ("default", "all"), ("reduce-overhead", "all")]
    labels = {"bwd": "fwd+bwd", "opt": "+ AdamW (fused)", "all": "+ clip + EMA", "sched": "+ LR schedule",
              "sums": "+ running sums"}
    for mode, level in plan:
        label = labels[level]
        if True:
            model = build_seeded("unet", 0, data_shape=SHAPE, **UNET).cuda()
            try:
                rate = timed(make_step(level, model, args.batch, mode), args.steps)
            except Exception as e:  # report, don't hide
                print(f"{label} compile={mode}: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append((f"{label}", mode or "eager", rate))
            print(f"{label:18s} {mode or 'eager':28s} {rate:7.1f} it/s  {1000 / rate:6.2f} ms", flush=True)
    for mode in ([None] if args.no_compile else [None, "default", "reduce-overhead"]):
        rate = fit_rate(args.batch, max(args.steps * 3, 60), mode)
        rows.append(("fit()", mode or "eager", rate))
        print(f"{'fit()':18s} {mode or 'eager':28s} {rate:7.1f} it/s  {1000 / rate:6.2f} ms", flush=True)
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, UNet {UNET}\n")
    print("| step | mode | it/s | ms/step |\n| --- | --- | ---: | ---: |")
    for label, mode, rate in rows:
        print(f"| {label} | {mode} | {rate:.1f} | {1000 / rate:.2f} |")
    if args.profile:
        fit_rate(args.batch, 20, None, profile=True)


if __name__ == "__main__":
    main()
