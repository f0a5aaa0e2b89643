"""Train K experts at once on one GPU, each on its own shard only.

    train_experts_concurrently(shards, config, out_dirs)

The K networks are stacked (ddmkit.train.stacked) and trained by the one
training loop, fit(), as a single module, under the config's train.bf16 (the
stacked experts then compute in bfloat16) and train.compile. Each step draws a
batch for every expert from that expert's shard alone (the draw depends on the
shard's size, never on its contents or on other shards), and the loss is the
sum of the per-expert flow-matching losses. Each expert folder is the same as
train_expert would write, plus "trained_concurrently_with"; like train_expert it
replaces each output folder, which must be new, empty or an expert's.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ddmkit.config import ExpertConfig, resolve_device
from ddmkit.data.partition import read_shard
from ddmkit.errors import DDMError
from ddmkit.flow.convert import VPSchedule, path_entry
from ddmkit.flow.losses import training_pair
from ddmkit.io import sha256_file, staging_dir
from ddmkit.nets import build_seeded, save_pretrained
from ddmkit.train.jobs import check_expert_folder, drop_labels, publish_statistics
from ddmkit.train.loop import fit
from ddmkit.train.stacked import StackedExperts


def stacked_sampler(parts: list[torch.Tensor], labels: list[torch.Tensor] | None, batch_size: int, device):
    """draw(gen) -> (x (K, B, ...), y (K, B) or None); rows for expert k come from parts[k] only, each row of
    a shard of n rows with probability 1/n: row = r mod n for r uniform on the integers [0, 2^62), one draw
    for all K experts (a bias of at most n / 2^62; a float u in [0, 1) has 24 bits, and floor(u n) would
    favour some rows and never reach others once n > 2^24)."""
    sizes = torch.tensor([len(p) for p in parts], device=device)
    offsets = torch.cumsum(sizes, 0) - sizes
    x_all = torch.cat(parts).float().to(device)
    y_all = torch.cat(labels).long().to(device) if labels is not None else None

    def draw(gen: torch.Generator):
        r = torch.randint(0, 2**62, (len(parts), batch_size), generator=gen, device=device)
        idx = offsets[:, None] + r % sizes[:, None]
        return x_all[idx], (y_all[idx] if y_all is not None else None)

    return draw


def stacked_loss(model: StackedExperts, x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator,
                 prediction: str, schedule: VPSchedule | None = None) -> torch.Tensor:
    """(K,) flow-matching loss (DDPM's with a VP schedule) of each expert on its own batch."""
    k, b = x.shape[:2]
    t = torch.rand(k, b, generator=gen, device=x.device)
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    state, time, target = training_pair(x.flatten(0, 1), t.flatten(), eps.flatten(0, 1), prediction, schedule)
    pred = model(state.reshape(x.shape), time.reshape(k, b), y)
    err = (pred.float() - target.reshape(x.shape).float()) ** 2
    return err.reshape(k, -1).mean(1)


def train_experts_concurrently(shards: list[str | Path], config: ExpertConfig, out_dirs: list[str | Path],
                               log=print) -> list[Path]:
    if len(shards) != len(out_dirs) or not shards:
        raise DDMError("train_experts_concurrently: give one output folder per shard")
    for out in out_dirs:  # each replaced at the end: an expert's folder (finished or cut short) or a new one
        check_expert_folder(out)
    device = resolve_device(config.train.device)
    read = [read_shard(s) for s in shards]
    xs, metas = [r[0] for r in read], [r[2] for r in read]
    if any(len(x) == 0 for x in xs):
        raise DDMError("a shard is empty; re-partition with a smaller k")
    data_shape = list(xs[0].shape[1:])
    if any(list(x.shape[1:]) != data_shape for x in xs):
        raise DDMError(f"shards hold different data shapes {sorted({tuple(x.shape[1:]) for x in xs})}")
    num_classes = config.net.kwargs.get("num_classes", 0)
    labels = [r[1] for r in read] if num_classes else None
    if num_classes and any(y is None for y in labels):
        raise DDMError(f"experts are class-conditional (num_classes = {num_classes}) but a shard has no labels")
    kwargs = {"data_shape": data_shape, **config.net.kwargs}
    model = StackedExperts([build_seeded(config.net.arch, config.train.seed, **kwargs) for _ in shards])
    draw = stacked_sampler(xs, labels, config.train.batch_size, device)
    schedule = config.path.vp_schedule()  # None: the linear path

    def batch_loss(m, step, gen):
        x, y = draw(gen)
        if y is not None:
            y = drop_labels(y, config.label_dropout, num_classes, gen)
        per_expert = stacked_loss(m, x, y, gen, config.prediction, schedule)
        return per_expert.sum(), {"mean_expert_loss": per_expert.mean()}

    train_cfg = config.train.model_copy(update={"channels_last": False})  # 5-D stacked weights
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "train_log.jsonl"
        ema, history = fit(model, batch_loss, train_cfg, log_path, f"{len(shards)} experts", device)
        log_text = log_path.read_text()
    seconds = time.perf_counter() - start
    for k, (net, shard, meta, x, out) in enumerate(zip(ema.unstack(), shards, metas, xs, out_dirs)):
        with staging_dir(out) as tmp:
            publish_statistics(tmp, x, labels[k] if labels else None, num_classes)
            (tmp / "train_log.jsonl").write_text(log_text)
            save_pretrained(tmp, net, {
                "role": "expert", "arch": config.net.arch, "kwargs": kwargs, "data_shape": data_shape,
                "prediction": config.prediction, **path_entry(schedule), "label_dropout": config.label_dropout,
                "train": config.train.model_dump(),
                "final_loss": history[-1]["mean_expert_loss"], "cluster": int(meta.get("cluster", -1)),
                "k": int(meta.get("k", 0)), "shard_sha256": sha256_file(shard), "shard_count": len(x),
                "data_hash": meta.get("data_hash"), "trained_concurrently_with": len(shards),
                "train_seconds_all": round(seconds, 2)})
    return [Path(o) for o in out_dirs]
