"""The text pipelines end to end: corpus -> partition -> K isolated experts
-> centralized baseline (same total compute) -> routers -> evaluation,
samples and report.

    run_text("configs/text_ar.toml", "runs/text_ar")      # kind = "text_ar": autoregressive experts
    run_text("configs/text_dfm.toml", "runs/text_dfm")    # kind = "text_dfm": masked discrete flow matching

Every model is a ddmkit folder (config.json + model.safetensors +
train_log.jsonl). A stage whose folder exists with the same settings
(`run_digest` in its config.json) is reused; `force=True` starts afresh.
Each expert job reads only its own shard.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddmkit.discrete import transformer  # noqa: F401  (registers the architectures)
from ddmkit.discrete.ar import ar_inputs, ar_loss
from ddmkit.discrete.config import TextRunConfig, load_text_config
from ddmkit.discrete.corpus import load_corpus, split_documents
from ddmkit.discrete.dfm import dfm_loss, mask_path
from ddmkit.discrete.evaluate import evaluate_ar, evaluate_dfm, samples_ar, samples_dfm
from ddmkit.discrete.report import write_report
from ddmkit.discrete.shards import cluster_prior, load_streams, mixed_windows, partition_text, sample_windows
from ddmkit.discrete.tokens import NUM_BYTES
from ddmkit.io import read_json, staging_dir
from ddmkit.nets import build_model, from_pretrained, save_pretrained
from ddmkit.train.loop import fit

CPU = torch.device("cpu")


def router_loss_ar(model, windows: torch.Tensor, labels: torch.Tensor, generator) -> torch.Tensor:
    """Cross-entropy of P(k | x_<n) against the window's cluster, at every prefix length n."""
    logits = model(ar_inputs(windows))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels[:, None].expand(-1, windows.shape[1]).reshape(-1))


def router_loss_dfm(model, windows: torch.Tensor, labels: torch.Tensor, generator) -> torch.Tensor:
    """Cross-entropy of P(k | x_t) against the window's cluster, t ~ U(0, 1)."""
    xt = mask_path(windows, torch.rand(len(windows), generator=generator), generator)
    return torch.nn.functional.cross_entropy(model(xt), labels)


@dataclass(frozen=True)
class Task:
    """What differs between the autoregressive and the flow-matching pipeline."""

    expert_arch: str
    router_arch: str
    router_kwargs: dict
    expert_loss: Callable  # (model, windows, generator) -> loss
    router_loss: Callable  # (model, windows, labels, generator) -> loss
    evaluate: Callable
    samples: Callable
    role: str
    meta: dict  # written into every model's config.json


TASKS = {
    "text_ar": Task("causal_transformer", "causal_transformer", {}, lambda m, w, g: ar_loss(m, w), router_loss_ar,
                    evaluate_ar, samples_ar, "autoregressive",
                    {"tokens": "bytes, BOS=256", "input": "[BOS, x_0 .. x_{L-2}]; output n predicts x_n"}),
    "text_dfm": Task("bidirectional_transformer", "bidirectional_transformer", {"pool": True}, dfm_loss,
                     router_loss_dfm, evaluate_dfm, samples_dfm, "masked discrete flow matching",
                     {"tokens": "bytes, MASK=257", "discrete_time": "t = mask probability: t=0 data, t=1 fully masked"}),
}


def train_or_load(folder: Path, digest: str, arch: str, kwargs: dict, loss: Callable, train_cfg,
                  meta: dict, description: str) -> torch.nn.Module:
    """Load the model folder if it was written with the same settings, else train and write it."""
    if (folder / "config.json").exists() and read_json(folder / "config.json").get("run_digest") == digest:
        return from_pretrained(folder)[0]
    with staging_dir(folder) as tmp:
        torch.manual_seed(train_cfg.seed)  # the initial weights too: same seed, same bytes
        model = build_model(arch, **kwargs)
        ema, _ = fit(model, lambda m, step, g: (loss(m, g), {}), train_cfg, log_path=tmp / "train_log.jsonl",
                     description=description, device=CPU)
        save_pretrained(tmp, ema, {"arch": arch, "kwargs": kwargs, "run_digest": digest, **meta})
    return ema


def partition_stage(cfg: TextRunConfig, out: Path) -> dict:
    folder, digest = out / "partition", cfg.digest("corpus", "partition")
    if (folder / "manifest.json").exists() and read_json(folder / "manifest.json").get("run_digest") == digest:
        return read_json(folder / "manifest.json")
    train, test = split_documents(load_corpus(cfg.corpus), cfg.corpus.test_fraction, cfg.corpus.seed)
    return partition_text(train, test, cfg.partition, folder, extra={"run_digest": digest})


def run_text(config_path: str | Path, out_dir: str | Path | None = None, force: bool = False,
             seed: int | None = None) -> dict:
    """Run a text pipeline from its TOML config; returns the report dict
    (also written to out_dir/report.json and out_dir/report.md). `seed`
    overrides every seed of the config (TextRunConfig.with_seed)."""
    cfg = load_text_config(config_path).with_seed(seed)
    out = Path(out_dir) if out_dir else Path("runs") / Path(config_path).stem
    if force and out.exists():
        shutil.rmtree(out)
    return run_text_config(cfg, out)


def run_text_config(cfg: TextRunConfig, out: Path) -> dict:
    task = TASKS[cfg.kind]
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    manifest = partition_stage(cfg, out)
    _, streams = load_streams(out / "partition", "train")
    _, test_streams = load_streams(out / "partition", "test")
    k, m, tr = manifest["k"], cfg.model, cfg.expert.train
    prior = cluster_prior(streams)
    net = {"seq_len": m.seq_len, "out_dim": NUM_BYTES, "width": m.width, "depth": m.depth, "heads": m.heads}
    base = cfg.digest("corpus", "partition", "model", "expert")

    experts = []
    for c in range(k):
        loss = lambda model, g, s=streams[c]: task.expert_loss(model, sample_windows(s, m.seq_len, tr.batch_size, g), g)
        experts.append(train_or_load(out / "experts" / f"cluster_{c:02d}", f"{base}-{c}", task.expert_arch, net,
                                     loss, tr.model_copy(update={"seed": tr.seed + c}),
                                     {"role": f"{task.role} expert", "cluster": c, **task.meta},
                                     f"expert {c + 1}/{k}"))

    central = None
    if cfg.centralized.enabled:
        steps = cfg.centralized.steps or k * tr.steps
        loss = lambda model, g: task.expert_loss(model, mixed_windows(streams, m.seq_len, tr.batch_size, g)[0], g)
        central = train_or_load(out / "centralized", f"{base}-{cfg.digest('centralized')}", task.expert_arch, net,
                                loss, tr.model_copy(update={"steps": steps}),
                                {"role": f"{task.role} centralized", **task.meta}, "centralized")

    routers: dict[str, torch.nn.Module | None] = {}
    for kind in cfg.router.kinds:
        if kind == "bayes":
            routers["bayes"] = None
            continue
        r, rt = cfg.router, cfg.router.train
        kwargs = {"seq_len": m.seq_len, "out_dim": k, "width": r.width, "depth": r.depth, "heads": r.heads,
                  **task.router_kwargs}
        loss = lambda model, g: task.router_loss(model, *mixed_windows(streams, m.seq_len, rt.batch_size, g), g)
        routers["learned"] = train_or_load(out / "router", cfg.digest("corpus", "partition", "model", "router"),
                                           task.router_arch, kwargs, loss, rt,
                                           {"role": f"{task.role} router", "num_experts": k, **task.meta}, "router")
    train_seconds = time.perf_counter() - start

    results = task.evaluate(experts, central, routers, prior, test_streams, cfg)
    samples = task.samples(experts, central, routers, prior, cfg)
    tokens_per_step = tr.batch_size * m.seq_len
    report = {
        "kind": cfg.kind, "k": k, "prior": prior.tolist(), "manifest": {key: manifest[key] for key in
                                                                        ("counts", "n", "n_test", "features")},
        "clusters": [{"cluster": s["cluster"], "documents": s["count"], "train_bytes": s["bytes"],
                      "test_bytes": t["bytes"], "examples": s["examples"]}
                     for s, t in zip(manifest["shards"], manifest["test_shards"])],
        "compute": {"expert_steps_each": tr.steps, "decentralized_train_tokens": k * tr.steps * tokens_per_step,
                    "centralized_train_tokens": (cfg.centralized.steps or k * tr.steps) * tokens_per_step
                    if central is not None else None, "parameters_per_model": sum(p.numel() for p in experts[0].parameters())},
        **results, "samples": samples, "seconds": {"train": round(train_seconds, 1),
                                                   "total": round(time.perf_counter() - start, 1)},
        "config": cfg.model_dump(),
    }
    write_report(out, report)
    return report

