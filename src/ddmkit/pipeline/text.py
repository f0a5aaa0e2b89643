"""The stages of a text run (byte-level tokens): corpus -> partition -> K isolated experts ->
centralized baseline (same total compute) -> routers -> evaluation, samples and report; and the
sampling, evaluation and analysis stages on a finished run.

    run_text("configs/text_ar.toml", "runs/text_ar")      # kind = "text_ar": autoregressive experts
    run_text("configs/text_dfm.toml", "runs/text_dfm")    # kind = "text_dfm": masked discrete flow matching
    sample_text("runs/text_ar", ["top-1"])                # RUN/samples/text.json, text_bytes.json
    evaluate_text("runs/text_ar")                         # RUN/report.md, report.json
    analyze_text("runs/text_ar")                          # RUN/analysis/analysis.md, analysis.json

RUN/config.json holds the text config (its `kind` tells a text run from the others). Every
model is a ddmkit folder (config.json + model.safetensors + train_log.jsonl). A model whose
folder exists with the same settings (`run_digest` in its config.json) is reused; `force=True`
starts afresh. A run folder made with other settings of what it trains (TRAINED: corpus, partition,
model, expert, router, centralized) is refused without force, naming the fields that differ; the
sample and evaluate settings, seed and threads may change. Each expert job reads only its own shard.

As for vectors and images (ddmkit.pipeline.prepare): prepare_text_run checks a run completely
before its first write (the corpus loads, the partition is computed in a scratch folder outside
the run and every cluster holds a window of model.seq_len bytes, the networks build on the meta
device), so a bad config leaves the folder as it was; every stage that writes holds RUN/.lock
(one writer per run folder); temporary files left by a killed writer are removed.
"""
from __future__ import annotations

import base64
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddmkit.config import config_differences, validate
from ddmkit.config_messages import fix_as_option
from ddmkit.discrete.alignment import expert_cluster_bits, own_cluster_weight
from ddmkit.discrete.ar import ar_inputs, ar_loss
from ddmkit.discrete.config import TEXT_STRATEGY_FORMS, TextRunConfig, is_text_config, is_text_run, load_text_config
from ddmkit.discrete.corpus import all_documents, sample_documents, split_documents
from ddmkit.discrete.dfm import dfm_loss, mask_path
from ddmkit.discrete.evaluate import evaluate_ar, evaluate_dfm, sample_texts, samples_ar, samples_dfm
from ddmkit.discrete.report import write_report
from ddmkit.data.partition import check_given_shard, read_shard
from ddmkit.discrete.shards import cluster_prior, load_streams, mixed_windows, partition_text, sample_windows
from ddmkit.discrete.tokens import NUM_BYTES
from ddmkit.errors import DDMError, counted
from ddmkit.io import (entries, nan_as_null, read_json, remove, sha256_file, staging_dir,
                       write_bytes_atomic, write_json)
from ddmkit.layout import RunFolder
from ddmkit.nets import build_model, check_builds, from_pretrained, save_pretrained
from ddmkit.pipeline.checks import check_text_sample_memory
from ddmkit.pipeline.models import write_training_plot
from ddmkit.pipeline.prepare import check_replaceable, listed, remove_leftovers, remove_run_leftovers
from ddmkit.pipeline.samplesets import calls_every_expert, full_routing_note
from ddmkit.pipeline.stages import run_lock
from ddmkit.registry import (check_registered, check_shard_for_slot, checked_model_shards, load_partition_checked,
                             read_manifest, remake_partition, write_registry)
from ddmkit.tables import markdown_table
from ddmkit.train.loop import fit
from ddmkit.train.threads import job_threads

Log = Callable[[str], None]

CPU = torch.device("cpu")
TRAINED = ("corpus", "partition", "model", "expert", "router", "centralized")  # what the models' run_digest hashes


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


def trained_by(command: str, run: str | Path) -> str:
    """The fix for a model folder of a text run that is missing or stale: the command that trains it alone,
    or `ddmkit run` of the run's own config.json, which trains every one of them."""
    return f"`{command}` (or `{run_again(run)}`, which trains every part that is missing)"


def run_again(run: str | Path) -> str:
    """`ddmkit run RUN/config.json --out RUN`: the run's own settings (--set ones included), so the command is
    never refused as another run's, and it keeps every part already made."""
    return f"ddmkit run {Path(run) / 'config.json'} --out {run}"


def with_centralized(run: str | Path) -> str:
    """How to get a centralized model for a run made without one: a new run (centralized is a trained setting)."""
    return (f"for a centralized model make a new run: `ddmkit run {Path(run) / 'config.json'} --out NEW_RUN "
            "--set centralized.enabled=true`")


def train_or_load(folder: Path, digest: str, arch: str, kwargs: dict, loss: Callable, train_cfg,
                  meta: dict, description: str, train: bool = True,
                  fix: str = "`ddmkit run CONFIG --out RUN`") -> torch.nn.Module:
    """Load the model folder if it was written with the same settings and is the same network (arch: a
    masked model of a text_dfm config is no autoregressive one), else train and write it (train=False:
    refuse instead, naming `fix`, the command that trains it: see trained_by)."""
    recorded = read_json(folder / "config.json") if (folder / "config.json").exists() else None
    if recorded is not None and recorded.get("run_digest") == digest and recorded.get("arch") == arch:
        return from_pretrained(folder)[0]
    if not train:
        why = "is missing" if recorded is None else (
            f"is a {recorded.get('arch')}, but this run's are {arch}s (trained with a config of the other kind)"
            if recorded.get("run_digest") == digest else "was trained with other settings or on another shard "
            "than its cluster's (its config.json's run_digest is not this run's)")
        raise DDMError(f"{folder} {why}; train it with {fix}")
    with staging_dir(folder) as tmp:
        torch.manual_seed(train_cfg.seed)  # the initial weights too: same seed, same bytes
        model = build_model(arch, **kwargs)
        ema, _ = fit(model, lambda m, step, g: (loss(m, g), {}), train_cfg, log_path=tmp / "train_log.jsonl",
                     description=description, device=CPU)
        save_pretrained(tmp, ema, {"arch": arch, "kwargs": kwargs, "run_digest": digest, **meta})
        without_time_convention(tmp / "config.json")
    return ema


def without_time_convention(path: Path) -> None:
    """Drop the Gaussian path's time_convention that save_pretrained records: a text model has none
    (autoregressive) or its own `discrete_time` (masked flow matching)."""
    config = read_json(path)
    config.pop("time_convention", None)
    write_json(path, config)


def has_partition(cfg: TextRunConfig, out: Path) -> bool:
    """Whether RUN/partition was made with cfg's corpus and partition settings."""
    folder = RunFolder(out)
    return folder.manifest.exists() and read_manifest(folder.partition).get("run_digest") == cfg.digest("corpus",
                                                                                                       "partition")


def run_partition(cfg: TextRunConfig, out: Path) -> dict:
    """The manifest of the run's partition (made by prepare_text_run with cfg's settings)."""
    if not has_partition(cfg, out):
        raise DDMError(f"{out}: no partition for this config yet; run `ddmkit partition --config "
                       f"{Path(out) / 'config.json'} --out {out}` first (the run's own config.json makes it again)")
    return read_manifest(RunFolder(out).partition)


def plan_partition(cfg: TextRunConfig, scratch: Path, log: Log = print) -> dict:
    """The corpus split into train and held-out documents and clustered, written to `scratch` (a folder
    outside the run); returns the manifest. Every corpus and partition check happens here."""
    found = all_documents(cfg.corpus, log)
    docs = sample_documents(found, cfg.corpus)
    train, test = split_documents(docs, cfg.corpus.test_fraction, cfg.corpus.seed)
    if cfg.partition.k > len(train):
        held, fix = "", "lower partition.k"
        if cfg.partition.k < len(docs):  # one held-out document leaves enough
            held = f": corpus.test_fraction = {cfg.corpus.test_fraction} holds out {len(test)} of the {len(docs)}"
            fix = "lower partition.k or corpus.test_fraction,"
        raise DDMError(f"partition.k = {cfg.partition.k} is larger than the number of training documents "
                       f"({len(train)}{held}); {fix} or {more_text(cfg, len(found))}")
    return partition_text(train, test, cfg.partition, scratch,
                          extra={"run_digest": cfg.digest("corpus", "partition"), "documents_found": len(found)})


def more_text(cfg: TextRunConfig, found: int) -> str:
    """How to get more text into the run: raise corpus.max_docs where it caps the corpus, else add text."""
    if found > cfg.corpus.max_docs:
        return f"raise corpus.max_docs (it keeps {cfg.corpus.max_docs} of the {found} documents found)"
    return "use more text (or a smaller corpus.min_doc_bytes)"


def check_windows(cfg: TextRunConfig, manifest: dict) -> None:
    """Every cluster holds at least one training window of model.seq_len bytes, and some cluster a
    held-out one."""
    length, more = cfg.model.seq_len, more_text(cfg, manifest.get("documents_found", 0))
    short = [s["cluster"] for s in manifest["shards"] if s["bytes"] < length]
    if short:
        raise DDMError(f"partition: clusters {short} hold fewer bytes of training text than model.seq_len = "
                       f"{length}; lower model.seq_len or partition.k, or {more}")
    if all(t["bytes"] < length for t in manifest["test_shards"]):
        raise DDMError(f"corpus.test_fraction = {cfg.corpus.test_fraction}: no cluster holds a held-out window of "
                       f"model.seq_len = {length} bytes ({manifest['n_test']} held-out documents), so nothing could "
                       "be evaluated; raise corpus.test_fraction or lower model.seq_len")


def check_networks(cfg: TextRunConfig) -> None:
    """Build the run's expert network (also the centralized one) and its learned router on the meta
    device (no memory): sizes that do not fit are a DDMError naming the section."""
    task = TASKS[cfg.kind]
    nets = {"model": (task.expert_arch, _network(cfg))}
    if "learned" in cfg.router.kinds:
        nets["router"] = (task.router_arch, _router_network(cfg, cfg.partition.k))
    for where, (arch, kwargs) in nets.items():
        check_builds(arch, kwargs, where)


def sample_positions(cfg: TextRunConfig) -> int:
    """The positions a network reads at a text sample's last step: a whole window (text_dfm, or text_ar without
    sample.length), else the prompt's bytes and sample.length."""
    if cfg.kind == "text_dfm" or cfg.sample.length is None:
        return cfg.model.seq_len
    return len(cfg.sample.prompt.encode("utf-8")) + cfg.sample.length


def text_config(run) -> TextRunConfig:
    """The text config a run folder was made with."""
    folder = RunFolder(run)
    if not is_text_run(run):
        raise DDMError(f"{folder.root} is not a text run folder (its config.json has no kind text_ar or text_dfm)")
    return validate(TextRunConfig, read_json(folder.config)["config"], str(folder.config))


def refuse_text(path: str | Path, command: str) -> None:
    """A DDMError when `path` is a text config or a text run folder: `command` works on vector and
    image runs only (for the vector commands: sweep, study misalignment, add-expert, replace-expert)."""
    path = Path(path)
    what = "run" if path.is_dir() and is_text_run(path) else "config" if path.is_file() and is_text_config(path) else None
    if what is not None:
        raise DDMError(f"{path} is a text {what}; `ddmkit {command}` works on vector and image runs (text runs: "
                       "`ddmkit run`, sample, evaluate, analyze; docs/discrete.md)")


def read_text_config(path: str | Path) -> TextRunConfig:
    """A text config from a TOML file or from a text run's config.json."""
    path = Path(path)
    if path.suffix == ".json":
        if not is_text_run(path.parent) or path.name != "config.json":
            raise DDMError(f"{path} is not a text run's config.json")
        return text_config(path.parent)
    return load_text_config(path)


def trained_differences(made: TextRunConfig, asked: TextRunConfig) -> list[str]:
    """The fields of the sections a text run's partition and models are made from (TRAINED) in which
    `asked` differs from `made`, e.g. "expert.train.steps (30, asked 25)"."""
    old, new = made.model_dump(mode="json"), asked.model_dump(mode="json")
    return [d for name in TRAINED for d in config_differences({name: old[name]}, {name: new[name]})]


def _replace(folder: RunFolder, cfg: TextRunConfig, force: bool) -> bool:
    """Whether what the folder holds is to be replaced (force, and it holds something); a folder of
    another kind of run, a text run made with other settings of what it trains (TRAINED), or not a run,
    is refused without force. Other settings (sample, evaluate, seed, threads) may change."""
    if force:
        check_replaceable(folder)
        return bool(entries(folder.root, but=folder.lock))
    if folder.config.exists():
        if not is_text_run(folder.root):
            raise DDMError(f"{folder.root} holds a run of another kind; choose another --out or pass --force to "
                           "replace it")
        kind = read_json(folder.config)["config"]["kind"]
        if kind != cfg.kind:
            raise DDMError(f"{folder.root} holds a {kind} run and the config's kind is {cfg.kind}; choose another "
                           "--out or pass --force to replace it")
        try:
            made = text_config(folder.root)
        except DDMError as e:
            raise DDMError(f"{folder.root} holds a config.json that ddmkit cannot read ({str(e)[:300]}); choose "
                           "another --out folder or pass --force to replace the run") from None
        differs = trained_differences(made, cfg)
        if differs:
            raise DDMError(f"{folder.root} already holds a different run: its config.json differs in "
                           f"{listed(differs)}; choose another --out folder or pass --force to replace it")
    else:
        check_replaceable(folder)
    return False


def prepare_text_run(cfg: TextRunConfig, out: Path, force: bool = False, log: Log = print) -> Path:
    """Create RUN/ for a text config (RUN/config.json and RUN/partition), or reuse it; every check
    before the first write. force=True replaces what the folder holds, once the checks passed."""
    folder = RunFolder(out)
    with run_lock(folder.root), tempfile.TemporaryDirectory(prefix="ddmkit-text-") as scratch:
        remove_run_leftovers(folder, log)
        replace = _replace(folder, cfg, force)
        check_networks(cfg)
        check_text_sample_memory(cfg.sample.n, sample_positions(cfg))  # the report's samples, drawn after training
        keep = not replace and folder.manifest.exists()
        if keep:  # damaged since it was written: named with the fix, never kept as it is
            check_kept_partition(folder)
        new = None if keep and has_partition(cfg, out) else Path(scratch) / "partition"
        if new is not None and keep:  # its models belong to the old partition
            raise DDMError(f"{folder.root} holds a text run partitioned with other corpus or partition settings; "
                           "choose another --out, or pass --force to replace it")
        manifest = read_json(folder.manifest) if new is None else plan_partition(cfg, new, log)
        check_windows(cfg, manifest)
        # every check passed: now write
        for path in entries(folder.root, but=folder.lock) if replace else []:
            remove(path)
        write_json(folder.config, {"digest": cfg.digest(), "config": cfg.model_dump()})
        if new is not None:
            with staging_dir(folder.partition) as tmp:
                shutil.copytree(new, tmp, dirs_exist_ok=True)
    return out


def run_text(config_path: str | Path, out_dir: str | Path | None = None, force: bool = False,
             seed: int | None = None, log: Log = print, overrides: list[str] = ()) -> dict:
    """Run a text pipeline from its TOML config (with the --set `overrides`); returns the report dict
    (also written to out_dir/report.json and out_dir/report.md). `seed`
    overrides every seed of the config (TextRunConfig.with_seed)."""
    cfg = load_text_config(config_path, overrides).with_seed(seed)
    out = Path(out_dir) if out_dir else Path("runs") / Path(config_path).stem
    with run_lock(out):
        prepare_text_run(cfg, out, force, log)
        return run_text_config(cfg, out, log)


def partition_text_run(config_path: str | Path, out: str | Path, force: bool = False, seed: int | None = None,
                       log: Log = print, overrides: list[str] = ()) -> dict:
    """The partition stage alone: RUN/partition with one shard per cluster (`ddmkit partition`)."""
    cfg = load_text_config(config_path, overrides).with_seed(seed)
    manifest = run_partition(cfg, prepare_text_run(cfg, Path(out), force, log))
    log(f"partition: k={manifest['k']}, cluster sizes {manifest['counts']} documents")
    return manifest


def _train_streams(run) -> list:
    folder = RunFolder(run)
    if not folder.manifest.exists():
        raise DDMError(f"{folder.root}: no partition yet; run `ddmkit partition --config {folder.config} --out "
                       f"{folder.root}` first (the run's own config.json makes it again)")
    return run_streams(folder, "train")


def run_streams(folder: RunFolder, split: str) -> list[torch.Tensor]:
    """The run's byte stream of each cluster (split "train" or "test"), each shard checked against its
    SHA-256 (a changed one is a DDMError naming the fix that makes the partition again)."""
    return load_streams(folder.partition, split, remake_partition(folder))[1]


def check_kept_partition(folder: RunFolder) -> None:
    """The partition a run keeps is whole: its manifest, partition.safetensors and every training and
    held-out shard as written; else a DDMError naming the damaged file and the fix that makes it again."""
    load_partition_checked(folder.partition)
    checked_model_shards(folder.root)
    run_streams(folder, "test")


def train_text_router(run, log: Log = print) -> None:
    """The learned router of a text run (`ddmkit train-router RUN`)."""
    with run_lock(run):
        cfg = text_config(run)
        if "learned" not in cfg.router.kinds:
            log(f"router: router.kinds = {cfg.router.kinds} in this run's config: the Bayes router is exact and "
                "needs no training; nothing written")
            return
        text_routers(cfg, Path(run), _train_streams(run))
    log(f"router: {RunFolder(run).router}")


def train_text_monolith(run, log: Log = print) -> None:
    """The centralized model of a text run (`ddmkit train-monolith RUN`)."""
    with run_lock(run):
        cfg = text_config(run)
        if text_monolith(cfg, Path(run), _train_streams(run)) is None:
            raise DDMError(f"{run}: centralized.enabled is false in this run's config; nothing to train ("
                           f"{with_centralized(run)})")
    log(f"monolith: {RunFolder(run).monolith}")


def train_text_experts(run, log: Log = print) -> None:
    """Every expert of a text run not yet trained, one after another, each on its shard alone."""
    with run_lock(run):
        cfg, folder = text_config(run), RunFolder(run)
        _train_streams(run)
        for s in sorted(read_json(folder.manifest)["shards"], key=lambda s: s["cluster"]):
            train_text_expert(folder.partition / s["path"], cfg, folder.expert(s["cluster"]))
            log(f"expert {s['cluster']}: {folder.expert(s['cluster'])}")


@dataclass
class TextModels:
    """A text run's trained models and data."""

    experts: list
    central: torch.nn.Module | None
    routers: dict  # name -> model, or None for the exact Bayes posterior
    prior: torch.Tensor
    manifest: dict
    test_streams: list
    seconds: float


def _network(cfg: TextRunConfig) -> dict:
    m = cfg.model
    return {"seq_len": m.seq_len, "out_dim": NUM_BYTES, "width": m.width, "depth": m.depth, "heads": m.heads}


def _router_network(cfg: TextRunConfig, k: int) -> dict:
    r = cfg.router
    return {"seq_len": cfg.model.seq_len, "out_dim": k, "width": r.width, "depth": r.depth, "heads": r.heads,
            **TASKS[cfg.kind].router_kwargs}


def train_text_expert(shard: str | Path, cfg: TextRunConfig, out_dir: str | Path, train: bool = True,
                      given: bool = False) -> torch.nn.Module:
    """One expert on one shard file, in isolation: it reads that file and nothing else (the island's
    job; `ddmkit train-expert SHARD --config TEXT.toml --out FOLDER`). Every text job runs on
    cfg.threads CPU threads, so its bytes do not depend on where it runs. given: the shard is the user's
    (train-expert), so where out_dir is an expert slot of a run it must be that run's shard of the slot's
    cluster (check_shard_for_slot), refused before training."""
    with job_threads(cfg.threads):
        task, tr, m = TASKS[cfg.kind], cfg.expert.train, cfg.model
        check_given_shard(shard)  # a folder, a config, a manifest, no .safetensors: shown the command's right form
        stream, _, meta = read_shard(shard)
        if stream.dim() != 1 or stream.dtype != torch.uint8:  # a vector, image or latent run's (N, ...) rows
            raise DDMError(f"{shard} is not a text shard (its x is {tuple(stream.shape)} {str(stream.dtype)[6:]}, "
                           "rows of a vector or image run, not a stream of bytes), but the config trains text "
                           "experts: give the shard's own run's config, --config RUN/config.json")
        c = int(meta.get("cluster", -1))
        if c < 0:
            raise DDMError(f"{shard}: not a text shard (no cluster in its metadata); run `ddmkit partition` first")
        if meta.get("split", Path(shard).parent.name) == "test":
            raise DDMError(f"{shard} is held-out text (a test shard): an expert trained on it would be scored on "
                           f"its own training text; give the training shard, partition/shards/{Path(shard).name}")
        slot = re.fullmatch(r"expert_(\d+)", Path(out_dir).name)
        if slot and Path(out_dir).parent.name == "experts" and int(slot.group(1)) != c:
            raise DDMError(f"{out_dir} is the folder of expert {int(slot.group(1))}, but {shard} is cluster {c}'s "
                           f"shard; give --out {Path(out_dir).parent / f'expert_{c:02d}'}, or the shard "
                           f"cluster_{int(slot.group(1)):02d}.safetensors")
        if given:  # another run's shard, or this run's changed since its partition was made
            check_shard_for_slot(shard, out_dir)
        base = cfg.digest("corpus", "partition", "model", "expert")
        loss = lambda model, g: task.expert_loss(model, sample_windows(stream, m.seq_len, tr.batch_size, g), g)
        meta = {"role": f"{task.role} expert", "cluster": c, "k": int(meta.get("k", 0)),
                "shard_sha256": sha256_file(shard), "data_hash": meta.get("data_hash"), **task.meta}
        run = Path(out_dir).parent.parent  # train=False: the expert of a run, RUN/experts/expert_XX
        fix = trained_by(f"ddmkit train-expert {shard} --config {run / 'config.json'} --out {out_dir}", run)
        return train_or_load(Path(out_dir), f"{base}-{c}", task.expert_arch, _network(cfg), loss,
                             tr.model_copy(update={"seed": tr.seed + c}), meta, f"expert {c + 1}/{meta['k']}", train,
                             fix)


def text_monolith(cfg: TextRunConfig, out: Path, streams: list, train: bool = True) -> torch.nn.Module | None:
    """The centralized model on all clusters with the experts' total compute (None when disabled)."""
    if not cfg.centralized.enabled:
        return None
    with job_threads(cfg.threads):
        task, tr, m = TASKS[cfg.kind], cfg.expert.train, cfg.model
        steps = cfg.centralized.steps or len(streams) * tr.steps
        base = cfg.digest("corpus", "partition", "model", "expert")
        loss = lambda model, g: task.expert_loss(model, mixed_windows(streams, m.seq_len, tr.batch_size, g)[0], g)
        return train_or_load(RunFolder(out).monolith, f"{base}-{cfg.digest('centralized')}", task.expert_arch,
                             _network(cfg), loss, tr.model_copy(update={"steps": steps}),
                             {"role": f"{task.role} centralized", **task.meta}, "centralized", train,
                             trained_by(f"ddmkit train-monolith {out}", out))


def text_routers(cfg: TextRunConfig, out: Path, streams: list, train: bool = True) -> dict:
    """name -> router: "bayes" (None: the exact posterior from the experts' likelihoods) and the
    learned one, trained on windows labelled by their cluster."""
    with job_threads(cfg.threads):
        task, m = TASKS[cfg.kind], cfg.model
        routers: dict[str, torch.nn.Module | None] = {}
        for kind in cfg.router.kinds:
            if kind == "bayes":
                routers["bayes"] = None
                continue
            rt = cfg.router.train
            kwargs = _router_network(cfg, len(streams))
            loss = lambda model, g: task.router_loss(model, *mixed_windows(streams, m.seq_len, rt.batch_size, g), g)
            meta = {"role": f"{task.role} router", "num_experts": len(streams), "k": len(streams), **task.meta}
            routers["learned"] = train_or_load(RunFolder(out).router,
                                               cfg.digest("corpus", "partition", "model", "router"),
                                               task.router_arch, kwargs, loss, rt, meta, "router", train,
                                               trained_by(f"ddmkit train-router {out}", out))
        return routers


def text_models(cfg: TextRunConfig, out: Path, train: bool = True, central: bool = True) -> TextModels:
    """Partition, experts, centralized model and routers: loaded where written with the same settings,
    trained otherwise (train=False: a missing one is an error). central=False: the centralized model is
    neither loaded nor needed (TextModels.central None)."""
    with job_threads(cfg.threads):
        start = time.perf_counter()
        folder = RunFolder(out)
        manifest = run_partition(cfg, out)
        streams, test_streams = run_streams(folder, "train"), run_streams(folder, "test")
        shards = sorted(manifest["shards"], key=lambda s: s["cluster"])
        experts = [train_text_expert(folder.partition / s["path"], cfg, folder.expert(s["cluster"]), train)
                   for s in shards]
        for s in shards:
            check_trained_on(folder, s)
        monolith = text_monolith(cfg, out, streams, train) if central else None
        routers = text_routers(cfg, out, streams, train)
        return TextModels(experts, monolith, routers, cluster_prior(streams), manifest, test_streams,
                          time.perf_counter() - start)


def check_trained_on(folder: RunFolder, shard: dict) -> None:
    """The expert of a cluster records the SHA-256 of that cluster's training shard (shard: a manifest
    entry), else a DDMError: it was trained on other text (a held-out shard, another partition)."""
    expert, c = folder.expert(shard["cluster"]), shard["cluster"]
    trained_on = read_json(expert / "config.json").get("shard_sha256")
    if trained_on != shard["sha256"]:
        raise DDMError(f"{expert} was trained on shard {str(trained_on)[:12]}..., not on cluster {c}'s training "
                       f"shard {folder.partition / shard['path']} ({shard['sha256'][:12]}...); remove that folder "
                       f"and train it again: `ddmkit train-expert {folder.partition / shard['path']} --config "
                       f"{folder.config} --out {expert}`")


def note_full_routing(cfg: TextRunConfig, strategies: list[str], log: Log) -> None:
    """A note for each top-n or sample-n strategy with n >= K: the same routing as full."""
    k = cfg.partition.k
    for name in strategies:
        if calls_every_expert(name, k):
            log(f"note: {full_routing_note(name, k)}")


def run_text_config(cfg: TextRunConfig, out: Path, log: Log = print) -> dict:
    check_registered(out)  # a registered file changed since is refused, not registered again
    note_full_routing(cfg, cfg.evaluate.strategies, log)
    models = text_models(cfg, out)
    write_registry(out)
    made = [counted(len(models.experts), "expert"), *(["the centralized model"] if models.central is not None else []),
            f"{'router' if len(models.routers) == 1 else 'routers'} {', '.join(models.routers)}"]
    log(f"text models: {', '.join(made)} ready in {models.seconds:.1f}s")
    return write_text_report(cfg, out, models, models.seconds, log)


def write_text_report(cfg: TextRunConfig, out: Path, models: TextModels, train_seconds: float,
                      log: Log = print) -> dict:
    """Held-out bits per byte, router accuracy and samples: RUN/report.md and report.json."""
    task = TASKS[cfg.kind]
    start = time.perf_counter()
    experts, central, routers, prior = models.experts, models.central, models.routers, models.prior
    k, m, tr, manifest = len(experts), cfg.model, cfg.expert.train, models.manifest
    results = task.evaluate(experts, central, routers, prior, models.test_streams, cfg)
    samples = sample_texts(task.samples(experts, central, routers, prior, cfg))
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
                                                   "total": round(train_seconds + time.perf_counter() - start, 1)},
        "config": cfg.model_dump(),
    }
    write_report(out, report, write_training_plot(out))
    log(f"report: {out / 'report.md'}")
    return report


def with_options(cfg: TextRunConfig, options: dict[str, tuple[str, object]]) -> TextRunConfig:
    """cfg with each field of `options` ("seed" or "section.field" -> (its command-line option, value)) set
    where the value is not None, validated; an error names the options given, each beside its field."""
    d, given = cfg.model_dump(), []
    for key, (option, value) in options.items():
        *section, name = key.split(".")
        if value is not None:
            (d[section[0]] if section else d)[name] = value
            given.append((option, key))
    try:
        return validate(TextRunConfig, d, f"{', '.join(option for option, _ in given)} (a text run)")
    except DDMError as e:
        text = str(e)
        for option, key in given:
            text = fix_as_option(text.replace(f"\n  {key}:", f"\n  {option} ({key}):"), key, option)
        lines = text.splitlines()
        raise DDMError(lines[1].strip() if len(lines) == 2 else text) from None  # one bad value: one line


def base64_rows(samples: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """Sampled bytes as JSON holds them losslessly: each row base64 (base64.b64decode gives the bytes back)."""
    return {name: [base64.b64encode(row).decode("ascii") for row in rows] for name, rows in samples.items()}


def sample_text(run, strategies: list[str], n: int | None = None, seed: int | None = None,
                log: Log = print, steps: int | None = None) -> dict[str, list[str]]:
    """Generated text of a finished run for each routing strategy (with every router of the run) and,
    where "monolith" is among the strategies, the centralized model ("monolith" alone: it alone), in
    RUN/samples/text.json (and their bytes, base64, in text_bytes.json: bytes that are not valid UTF-8 show
    as U+FFFD in the texts). n, seed and steps (unmasking steps, text_dfm only) replace the run's
    sample.n, sample.seed and sample.steps where given."""
    central = [name for name in strategies if name.strip() == "monolith"]
    strategies = [name for name in strategies if name.strip() != "monolith"]
    with run_lock(run):
        cfg = text_config(run)
        remove_leftovers(run, log)  # what killed writers left
        if central and not cfg.centralized.enabled:
            raise DDMError("--strategy monolith: this text run has no centralized model (centralized.enabled = "
                           f"false in its config); leave --strategy monolith out, or {with_centralized(run)}")
        if steps is not None and cfg.kind == "text_ar":
            raise DDMError("--steps: autoregressive sampling draws one byte per step (sample.length bytes); "
                           "--steps sets the unmasking steps of kind = 'text_dfm' runs; leave it out")
        cfg = with_options(cfg, {"evaluate.strategies": ("--strategy", strategies or None), "sample.n": ("--n", n),
                                 "sample.seed": ("--seed", seed), "sample.steps": ("--steps", steps)})
        if not strategies:  # the centralized model alone: no routed set (a config's list is never empty)
            cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"strategies": []})})
        check_text_sample_memory(cfg.sample.n, sample_positions(cfg), "sample.n" if n is None else "--n",
                                 "give --n {n} or less")
        models = text_models(cfg, Path(run), train=False, central=bool(central))  # drawn only when asked
        note_full_routing(cfg, strategies, log)  # once the models are there (a missing one is refused first)
        raw = TASKS[cfg.kind].samples(models.experts, models.central, models.routers, models.prior, cfg)
        texts = sample_texts(raw)
        folder = RunFolder(run).samples
        path, bytes_path, info_path = folder / "text.json", folder / "text_bytes.json", folder / "info.json"
        saved = read_json(path) if path.exists() else {}
        saved_bytes = read_json(bytes_path) if bytes_path.exists() else {}
        drawn_with = {key: value for key, value in cfg.sample.model_dump().items()
                      if cfg.kind == "text_dfm" or key != "steps"}  # n, seed, length, ...: what made these texts
        info = read_json(info_path) if info_path.exists() else {}
        write_json(path, {**saved, **texts})
        write_json(bytes_path, {**saved_bytes, **base64_rows(raw)})
        write_json(info_path, {**info, **{name: {"drawn_with": drawn_with} for name in texts}})
    for name, rows in texts.items():
        log(f"{name}: {rows[0][:60]!r}")
    return texts


def evaluate_text(run, log: Log = print) -> dict:
    """The report of a finished text run (held-out bits per byte, router accuracy, samples)."""
    with run_lock(run):
        cfg = text_config(run)
        check_text_sample_memory(cfg.sample.n, sample_positions(cfg), "sample.n", _smaller_sample_fix(run))
        remove_leftovers(run, log)  # what killed writers left
        models = text_models(cfg, Path(run), train=False)
        return write_text_report(cfg, Path(run), models, 0.0, log)


def _smaller_sample_fix(run) -> str:
    """The fix ({n} in it) for a report whose sample.n outgrows the memory: `ddmkit evaluate` takes no --set, and
    `ddmkit run` of the run's own config.json with a smaller sample.n keeps its trained networks."""
    folder = RunFolder(run)
    command = f"ddmkit run {shlex.quote(str(folder.config))} --out {shlex.quote(str(folder.root))}"
    command = command.replace("{", "{{").replace("}", "}}")  # the fix is formatted with n
    return f"rerun `{command} --set sample.n={{n}}`, which keeps the trained networks"


def analyze_text(run, out=None, log: Log = print, strategies: list[str] | None = None, n: int | None = None,
                 seed: int | None = None) -> dict:
    """Expert-data alignment of a text run (ddmkit.discrete.alignment): every expert's bits per byte on
    every cluster's held-out text, and the routing weight on each text's own-cluster expert. strategies,
    n (held-out windows per cluster) and seed replace the run's evaluate.strategies,
    evaluate.windows_per_cluster and seed where given."""
    if strategies is not None and any(name.strip() == "monolith" for name in strategies):
        raise DDMError("--strategy monolith: analyze scores routing strategies only (the centralized model is "
                       f"scored by `ddmkit evaluate`); give one or more of: {TEXT_STRATEGY_FORMS}")
    with run_lock(run):
        cfg = with_options(text_config(run), {"evaluate.strategies": ("--strategy", strategies),
                                              "evaluate.windows_per_cluster": ("--n", n), "seed": ("--seed", seed)})
        return _analyze_text(cfg, run, out, log)


def _analyze_text(cfg: TextRunConfig, run, out, log: Log) -> dict:
    folder = RunFolder(run)
    out = Path(out) if out is not None else folder.analysis
    models = text_models(cfg, folder.root, train=False, central=False)  # the experts and routers alone
    note_full_routing(cfg, cfg.evaluate.strategies, log)  # once they are there (a missing one is refused first)
    length, per = cfg.model.seq_len, cfg.evaluate.windows_per_cluster
    bits = expert_cluster_bits(models.experts, models.test_streams, length, per, cfg.kind, cfg.evaluate.t_points,
                               cfg.seed)
    weight = own_cluster_weight(models.experts, models.routers, models.prior, models.test_streams, length, per,
                                cfg.kind, cfg.evaluate.strategies, cfg.seed)
    k = len(models.experts)
    own = [bits[c][c] for c in range(k)]
    other = other_experts_mean(bits)
    result = {"kind": cfg.kind, "bits_per_byte": bits, "own_expert": own, "other_experts_mean": other,
              "own_cluster_weight": weight}
    write_json(out / "analysis.json", nan_as_null(result))
    write_bytes_atomic(out / "analysis.md", render_text_analysis(result).encode())
    log(f"analysis: {out / 'analysis.md'}")
    return result


def other_experts_mean(bits: list[list[float | None]]) -> list[float | None]:
    """For each cluster c, the mean bits per byte of the other experts on its held-out text, bits[j][c] over
    j != c (None where a cluster has no held-out text, or there is no other expert)."""
    k = len(bits)
    others = [[bits[j][c] for j in range(k) if j != c and bits[j][c] is not None] for c in range(k)]
    return [sum(values) / len(values) if values else None for values in others]


def render_text_analysis(result: dict) -> str:
    k = len(result["bits_per_byte"])
    bound = " (ELBO, an upper bound)" if result["kind"] == "text_dfm" else ""
    matrix = markdown_table(["expert \\ cluster"] + [str(c) for c in range(k)],
                            [[str(j)] + row for j, row in enumerate(result["bits_per_byte"])])
    summary = markdown_table(["cluster", "own expert", "other experts (mean)"],
                             [[c, result["own_expert"][c], result["other_experts_mean"][c]] for c in range(k)])
    axis = "prefix length (bytes)" if result["kind"] == "text_ar" else "masking time t"
    weights = result["own_cluster_weight"]
    first = next(iter(weights.values()), {"axis": []})
    table = markdown_table(["router / strategy"] + [str(a) for a in first["axis"]],
                           [[name] + row["weight"] for name, row in weights.items()])
    return f"""# Expert-data alignment of a text run

## Bits per byte of each expert on each cluster's held-out text{bound}

Row j, column c: expert j on cluster c. An expert aligned with its data has the smallest value of
its column on the diagonal.

{matrix}

{summary}

## Routing weight on the text's own-cluster expert, against {axis}

The mean weight each routing strategy gives the expert of the cluster the held-out text comes from.

{table}
"""
