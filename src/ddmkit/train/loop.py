"""The one training loop, used for experts, the monolith and routers.

    ema_model, history = fit(model, batch_loss, cfg)

`batch_loss(model, step, generator) -> (loss, {name: float})` draws its own
batch with the generator, so a run is fully determined by cfg.seed. The loop
does AdamW, linear warm-up then cosine (or constant) learning rate, gradient
clipping by global norm, and an exponential moving average of the weights
(torch's AveragedModel); it logs JSON lines every cfg.log_every steps.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ddmkit.config import TrainConfig
from ddmkit.progress import progress_bar

BatchLoss = Callable[[nn.Module, int, torch.Generator], tuple[torch.Tensor, dict]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        span = max(cfg.steps - cfg.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup, span) / span))
    return f


def fit(model: nn.Module, batch_loss: BatchLoss, cfg: TrainConfig, log_path: str | Path | None = None,
        description: str = "training", device: torch.device | None = None) -> tuple[nn.Module, list[dict]]:
    """Train `model` in place; return its EMA copy (eval mode) and the log rows."""
    device = device or resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    history: list[dict] = []
    log = open(log_path, "w") if log_path else None
    start = time.perf_counter()
    running: dict[str, float] = {}
    try:
        with progress_bar(description, cfg.steps) as advance:
            for step in range(cfg.steps):
                loss, metrics = batch_loss(model, step, generator)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                ema.update_parameters(model)
                for name, value in {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}.items():
                    value = value.detach().float() if torch.is_tensor(value) else value  # no host sync per step
                    running[name] = running.get(name, 0.0) + value
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    n = step + 1 - (history[-1]["step"] if history else 0)
                    row = {"step": step + 1, "lr": sched.get_last_lr()[0],
                           "seconds": round(time.perf_counter() - start, 3),
                           **{k: float(v) / n for k, v in running.items()}}
                    running = {}
                    history.append(row)
                    if log:
                        log.write(json.dumps(row) + "\n")
                    advance(0, loss=row["loss"])
                advance(1)
    finally:
        if log:
            log.close()
    ema_model = ema.module
    ema_model.eval()
    return ema_model, history
