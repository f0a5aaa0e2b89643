"""Training throughput on one GPU: K small experts trained concurrently (one
stacked network, torch.func.vmap) vs one after another, and one expert alone.

    PYTHONPATH=src python benchmarks/training_concurrent.py [--k 8] [--steps 300] [--compile]

Every row runs ddmkit's one training loop, fit(), on random 1x32x32 images
(throughput does not depend on the pixels) with bf16 autocast and channels-last.
Rates are steady-state: measured between the first and the last log row, so
warm-up and compilation are left out (their seconds are printed apart).
Prints a table; with $OUT set, writes OUT/training_concurrent.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ddmkit.config import TrainConfig
from ddmkit.flow.losses import flow_matching_loss
from ddmkit.nets import build_seeded
from ddmkit.train.concurrent import stacked_loss, stacked_sampler
from ddmkit.train.loop import fit
from ddmkit.train.stacked import StackedExperts

SHAPE = (1, 32, 32)


def steady_rate(history: list[dict], images_per_step: int) -> tuple[float, float]:
    """(images/s between the first and last log rows, seconds before the first row)."""
    a, b = history[0], history[-1]
    return images_per_step * (b["step"] - a["step"]) / (b["seconds"] - a["seconds"]), a["seconds"]


def train_one(kwargs: dict, cfg: TrainConfig, data: torch.Tensor) -> tuple[float, float]:
    model = build_seeded("unet", 0, data_shape=list(SHAPE), **kwargs)
    x = data.to("cuda")

    def batch_loss(m, step, gen):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen, device=x.device)
        return flow_matching_loss(m, x[idx], gen), {}

    _, history = fit(model, batch_loss, cfg, description="single")
    torch.cuda.synchronize()
    return steady_rate(history, cfg.batch_size)


def train_stacked(kwargs: dict, cfg: TrainConfig, shards: list[torch.Tensor]) -> tuple[float, float]:
    model = StackedExperts([build_seeded("unet", 0, data_shape=list(SHAPE), **kwargs) for _ in shards])
    draw = stacked_sampler(shards, None, cfg.batch_size, "cuda")

    def batch_loss(m, step, gen):
        x, _ = draw(gen)
        return stacked_loss(m, x, None, gen, "velocity").sum(), {}

    _, history = fit(model, batch_loss, cfg.model_copy(update={"channels_last": False}), description="stacked")
    torch.cuda.synchronize()
    return steady_rate(history, cfg.batch_size * len(shards))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    p.add_argument("--single-only", action="store_true", help="only the single-expert rows")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    small = {"channels": [32, 64, 64], "attention_res": [8]}
    big = {"channels": [64, 128, 128], "attention_res": [8]}
    base = dict(steps=args.steps, lr=1e-4, warmup=10, log_every=max(args.steps // 6, 1), device="cuda",
                bf16=True, channels_last=False)
    gen = torch.Generator().manual_seed(0)
    shards = [torch.rand(4000, *SHAPE, generator=gen) * 2 - 1 for _ in range(args.k)]
    rows = []

    def add(name, rate, warm, per_step, note=""):
        rows.append({"setup": name, "images_per_s": round(rate), "steps_per_s": round(rate / per_step, 1),
                     "warmup_s": round(warm, 1), "note": note})
        print(f"{name:60s} {rate:10.0f} img/s {rate / per_step:7.1f} it/s  (warm-up {warm:.1f}s) {note}", flush=True)

    cfg = TrainConfig(batch_size=256, **base)
    r, w = train_one(big, cfg, shards[0])
    add("1 expert, UNet 64/128/128, batch 256, eager", r, w, 256, "reference loop: 23.5 it/s")
    r, w = train_one(big, cfg.model_copy(update={"channels_last": True}), shards[0])
    add("1 expert, UNet 64/128/128, batch 256, eager, channels-last", r, w, 256, "GroupNorm + channels-last")
    r, w = train_one(big, cfg.model_copy(update={"compile": True, "compile_mode": "reduce-overhead"}), shards[0])
    add("1 expert, UNet 64/128/128, batch 256, compile reduce-overhead", r, w, 256, "CUDA graphs")
    r, w = train_one(big, cfg.model_copy(update={"compile": True, "compile_mode": "reduce-overhead",
                                                 "channels_last": True}), shards[0])
    add("1 expert, UNet 64/128/128, batch 256, reduce-overhead, channels-last", r, w, 256, "CUDA graphs")
    if args.compile:
        r, w = train_one(big, cfg.model_copy(update={"compile": True}), shards[0])
        add("1 expert, UNet 64/128/128, batch 256, torch.compile", r, w, 256)

    if args.single_only:
        print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        return
    cfg = TrainConfig(batch_size=128, **base)
    start = time.perf_counter()
    seq = [train_one(small, cfg, s) for s in shards]
    total = time.perf_counter() - start
    seq_rate = len(shards) / sum(1 / r for r, _ in seq)
    add(f"{args.k} experts 32/64/64, batch 128 each, one after another", seq_rate, sum(w for _, w in seq), 128,
        f"wall {total:.1f}s incl. warm-up")
    r, w = train_stacked(small, cfg, shards)
    add(f"{args.k} experts 32/64/64, batch 128 each, concurrent (stacked)", r, w, 128 * args.k,
        f"{r / seq_rate:.2f}x sequential")
    if args.compile:
        try:
            r, w = train_stacked(small, cfg.model_copy(update={"compile": True}), shards)
            add(f"{args.k} experts concurrent (stacked), torch.compile", r, w, 128 * args.k, f"{r / seq_rate:.2f}x sequential")
        except Exception as e:  # report, don't hide: vmap under compile may be unsupported
            print(f"stacked + torch.compile failed: {type(e).__name__}: {str(e)[:300]}")
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "training_concurrent.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
