"""The training jobs: expert (one shard, in isolation), monolith (all shards,
FLOP-matched), router (noised samples labelled by cluster).

`train_expert(shard, config, out_dir)` is the pure function every launch
backend calls: it reads the one shard file it is given and nothing else,
and writes an expert folder (config.json, model.safetensors, train_log.jsonl).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ddmkit.config import ExpertConfig, RouterConfig, TrainConfig
from ddmkit.errors import DDMError
from ddmkit.flow.losses import flow_matching_loss, router_loss
from ddmkit.io import sha256_file, staging_dir
from ddmkit.nets import build_seeded, save_pretrained
from ddmkit.train.loop import fit, resolve_device


def _batches(x: torch.Tensor, batch_size: int, device: torch.device):
    """A sampler of random batches (with replacement) from x kept on device."""
    x = x.to(device)

    def draw(generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator, device=device)
        return x[idx]

    return draw


def train_velocity_model(x: torch.Tensor, config: ExpertConfig, out_dir: str | Path, role: str,
                         extra: dict | None = None, description: str = "expert") -> Path:
    """Train a velocity network on x with flow matching; write a model folder."""
    device = resolve_device(config.train.device)
    data_shape = list(x.shape[1:])
    kwargs = {"data_shape": data_shape, **config.net.kwargs}
    model = build_seeded(config.net.arch, config.train.seed, **kwargs)
    draw = _batches(x.float(), config.train.batch_size, device)

    def batch_loss(m, step, gen):
        return flow_matching_loss(m, draw(gen), gen, config.prediction), {}

    with staging_dir(out_dir) as tmp:
        ema, history = fit(model, batch_loss, config.train, tmp / "train_log.jsonl", description, device)
        save_pretrained(tmp, ema, {"role": role, "arch": config.net.arch, "kwargs": kwargs,
                                   "data_shape": data_shape, "prediction": config.prediction,
                                   "train": config.train.model_dump(), "final_loss": history[-1]["loss"],
                                   **(extra or {})})
    return Path(out_dir)


def train_expert(shard: str | Path, config: ExpertConfig, out_dir: str | Path) -> Path:
    """Train one expert on one shard file, in isolation."""
    from ddmkit.data.partition import read_shard

    shard = Path(shard)
    x, _, meta = read_shard(shard)
    if len(x) == 0:
        raise DDMError(f"{shard}: the shard is empty; re-partition with a smaller k")
    cluster = int(meta.get("cluster", -1))
    extra = {"cluster": cluster, "k": int(meta.get("k", 0)), "shard_sha256": sha256_file(shard),
             "shard_count": len(x), "data_hash": meta.get("data_hash")}
    return train_velocity_model(x, config, out_dir, "expert", extra, f"expert {cluster}")


def monolith_config(expert: ExpertConfig, k: int) -> ExpertConfig:
    """Same network and batch as one expert, k times the steps: the monolith's
    compute (steps x batch) equals that of all k experts together."""
    train = expert.train.model_copy(update={"steps": expert.train.steps * k})
    return expert.model_copy(update={"train": train})


def train_monolith(shards: list[Path], config: ExpertConfig, out_dir: str | Path) -> Path:
    from ddmkit.data.partition import read_shard

    x = torch.cat([read_shard(s)[0] for s in shards])
    cfg = monolith_config(config, len(shards))
    return train_velocity_model(x, cfg, out_dir, "monolith", {"k_matched": len(shards)}, "monolith")


def train_router(shards: list[Path], config: RouterConfig, out_dir: str | Path) -> Path:
    """Train the router p(cluster | x_t, t) with cross-entropy on noised shard data."""
    from ddmkit.data.partition import read_shard

    device = resolve_device(config.train.device)
    parts = [read_shard(s)[0] for s in shards]
    x = torch.cat(parts).float().to(device)
    y = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(parts)]).to(device)
    data_shape = list(x.shape[1:])
    kwargs = {"data_shape": data_shape, "num_experts": len(shards), **config.net.kwargs}
    model = build_seeded(config.net.arch, config.train.seed, **kwargs)

    def batch_loss(m, step, gen):
        idx = torch.randint(0, len(x), (config.train.batch_size,), generator=gen, device=device)
        loss, acc = router_loss(m, x[idx], y[idx], gen)
        return loss, {"accuracy": acc}

    with staging_dir(out_dir) as tmp:
        ema, history = fit(model, batch_loss, config.train, tmp / "train_log.jsonl", "router", device)
        save_pretrained(tmp, ema, {"role": "router", "arch": config.net.arch, "kwargs": kwargs,
                                   "data_shape": data_shape, "k": len(shards),
                                   "train": config.train.model_dump(), "final_loss": history[-1]["loss"]})
    return Path(out_dir)


__all__ = ["TrainConfig", "monolith_config", "train_expert", "train_monolith", "train_router",
           "train_velocity_model"]
