"""Train K experts at once on one GPU, each on its own shard only.

    train_experts_concurrently(shards, config, out_dirs)
    for job in concurrent_jobs(run_shards, run_expert_folders): ...   # a run's experts still to train

The K networks are stacked (ddmkit.train.stacked), or with expert.concurrent_networks
= "streams" kept side by side on K CUDA streams (ddmkit.train.streamed), and trained
by the one training loop, fit(), as a single module, under the config's train.bf16
(stacked experts then compute in bfloat16), train.compile and train.cuda_graph.
Each step draws a batch for every expert from that expert's shard alone (the
draw depends on the shard's size, never on its contents or on other shards), and
the loss is the sum of the per-expert flow-matching losses.

The job checkpoints as an expert's does (train.checkpoint_every), one checkpoint
for all K experts (stacked_checkpoint_path: beside the first output folder; its
fingerprint holds every shard's SHA-256, in order), and continues from one a
killed job left, to the bytes of a job that never stopped. Like train_expert it
replaces each output folder, which must be new, empty or an expert's, and writes
there config.json, model.safetensors, the published statistics, train_log.jsonl
and, with train.tensorboard, tensorboard/. What differs from train_expert's folder:
the log rows hold the job's step, lr and seconds and the expert's own loss and
grad_norm (means since the previous row; final_loss is the last loss; grad_norm
is the norm of the expert's own gradient before it is clipped, by its own norm);
config.json adds "trained_concurrently_with" (K) and "train_seconds_all" (the
job's wall time); and the weights are not those train_expert would train (all K
experts draw from one generator).

The job ends by writing the K folders, each in a staging folder, then moving them
into place one by one, then removing its checkpoint. A job stopped between two of
those moves leaves its checkpoint: the same job again continues from it and keeps
the folders already in place (each whole, with the weights the job ends with),
writing the others; a run's stage finds that job by its checkpoint
(concurrent_jobs), so it trains it whole again rather than the missing experts alone.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from ddmkit.config import ExpertConfig, field_device
from ddmkit.data.partition import read_shard
from ddmkit.errors import DDMError
from ddmkit.flow.convert import VPSchedule, path_entry
from ddmkit.flow.losses import training_pair
from ddmkit.io import load_tensors, read_json, sibling, staging_dir
from ddmkit.nets import build_seeded, save_pretrained
from ddmkit.train.checkpoint import check_checkpoint_file
from ddmkit.train.jobs import check_expert_folder, drop_labels, publish_statistics, shard_hashes, trained_settings
from ddmkit.train.loop import fit, summary_writer, tensorboard_writer, write_row
from ddmkit.train.stacked import StackedExperts


def stacked_sampler(parts: list[torch.Tensor], labels: list[torch.Tensor] | None, batch_size: int, device):
    """draw(gen) -> (x (K, B, ...), y (K, B) or None); rows for expert k come from parts[k] only, each row of
    a shard of n rows with probability 1/n: row = r mod n for r uniform on the integers [0, 2^62), one draw
    for all K experts (a bias of at most n / 2^62; a float32 u in [0, 1) has 24 bits, and floor(u n) would
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


def stacked_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator,
                 prediction: str, schedule: VPSchedule | None = None) -> torch.Tensor:
    """(K,) flow-matching loss (DDPM's with a VP schedule) of each expert on its own batch; `model` is stacked
    or streamed experts (ddmkit.train.streamed), x (K, B, ...) -> (K, B, ...)."""
    k, b = x.shape[:2]
    t = torch.rand(k, b, generator=gen, device=x.device)
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    state, time, target = training_pair(x.flatten(0, 1), t.flatten(), eps.flatten(0, 1), prediction, schedule)
    pred = model(state.reshape(x.shape), time.reshape(k, b), y)
    err = (pred.float() - target.reshape(x.shape).float()) ** 2
    return err.reshape(k, -1).mean(1)


def stacked_checkpoint_path(out_dirs: list[str | Path]) -> Path:
    """Where the concurrent job keeps its one checkpoint: beside the first expert folder, e.g.
    RUN/experts/expert_00.stacked.checkpoint.safetensors."""
    return sibling(Path(out_dirs[0]), "stacked.checkpoint.safetensors")


def expert_rows(history: list[dict], k: int) -> list[dict]:
    """Expert k's log rows from the job's: step, lr, seconds and its own loss and grad_norm (the job logs them
    as loss_k and grad_norm_k; rows of a checkpoint of earlier ddmkit have no grad_norm_k: none there)."""
    return [{"step": row["step"], "lr": row["lr"], "seconds": row["seconds"], "loss": row[f"loss_{k}"],
             **({"grad_norm": row[f"grad_norm_{k}"]} if f"grad_norm_{k}" in row else {})}
            for row in history]


def write_log(folder: Path, rows: list[dict], tensorboard: bool) -> None:
    """train_log.jsonl (and with tensorboard, tensorboard/) in a model folder, as fit writes them."""
    board = tensorboard_writer(folder / "tensorboard") if tensorboard else None
    try:
        with open(folder / "train_log.jsonl", "w") as log:
            for row in rows:
                write_row(log, board, row)
    finally:
        if board is not None:
            board.close()


def train_experts_concurrently(shards: list[str | Path], config: ExpertConfig, out_dirs: list[str | Path],
                               log=print, resume: bool = True) -> list[Path]:
    """Train one expert per shard into out_dirs, stacked (the module docstring); resume: continue from the
    checkpoint a killed job left (stacked_checkpoint_path), as a run's stages do, keeping the folders it had
    moved into place (in_place)."""
    if len(shards) != len(out_dirs) or not shards:
        raise DDMError("train_experts_concurrently: give one output folder per shard")
    for out in out_dirs:  # each replaced at the end: an expert's folder (finished or cut short) or a new one
        check_expert_folder(out)
    if config.train.tensorboard:
        summary_writer()  # the package is there, before any training
    device = field_device("expert.train.device", config.train.device)
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
    if config.concurrent_networks == "streams":
        from ddmkit.train.streamed import StreamedExperts as experts_class  # imports torch._dynamo: only when used
    else:
        experts_class = StackedExperts
    model = experts_class([build_seeded(config.net.arch, config.train.seed, **kwargs) for _ in shards])
    draw = stacked_sampler(xs, labels, config.train.batch_size, device)
    schedule = config.path.vp_schedule()  # None: the linear path

    def batch_loss(m, step, gen):
        x, y = draw(gen)
        if y is not None:
            y = drop_labels(y, config.label_dropout, num_classes, gen)
        per_expert = stacked_loss(m, x, y, gen, config.prediction, schedule)
        return per_expert.sum(), {f"loss_{k}": loss for k, loss in enumerate(per_expert)}

    stacked = config.concurrent_networks == "stacked"
    train_cfg = config.train.model_copy(update={"channels_last": False}) if stacked else config.train  # 5-D weights
    checkpoint = stacked_checkpoint_path(out_dirs)
    resumed = resume and checkpoint.exists()
    data = shard_hashes([Path(s) for s in shards])
    start = time.perf_counter()
    ema, history = fit(model, batch_loss, train_cfg, None, f"{len(shards)} experts", device, checkpoint, resume,
                       data=data, settings=trained_settings(config),
                       resumed=lambda: log(f"experts: continuing from {checkpoint}"))
    seconds = time.perf_counter() - start
    with contextlib.ExitStack() as folders:  # every folder written, then each moved into place
        for k, (net, meta, x, out) in enumerate(zip(ema.unstack(), metas, xs, out_dirs)):
            rows = expert_rows(history, k)
            entry = {"role": "expert", "arch": config.net.arch, "kwargs": kwargs, "data_shape": data_shape,
                     "prediction": config.prediction, **path_entry(schedule), "label_dropout": config.label_dropout,
                     "train": config.train.model_dump(), "final_loss": rows[-1]["loss"],
                     "cluster": int(meta.get("cluster", -1)), "k": int(meta.get("k", 0)),
                     "shard_sha256": data[k], "shard_count": len(x), "data_hash": meta.get("data_hash"),
                     "trained_concurrently_with": len(shards), "train_seconds_all": round(seconds, 2)}
            if resumed and in_place(Path(out), net, entry):
                log(f"{out}: moved into place before the job was stopped; kept")
                continue
            tmp = folders.enter_context(staging_dir(out))
            publish_statistics(tmp, x, labels[k] if labels else None, num_classes)
            write_log(tmp, rows, config.train.tensorboard)
            save_pretrained(tmp, net, entry)
    checkpoint.unlink(missing_ok=True)  # last: a job stopped before this line is continued from it
    return [Path(o) for o in out_dirs]


def in_place(out: Path, net: torch.nn.Module, entry: dict) -> bool:
    """Whether `out` holds the expert the job writes there already, whole (a job stopped while moving its folders
    into place moved it there): config.json and model.safetensors, of the same shard, job size and train table,
    and of these very weights."""
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        return False
    try:
        saved, weights = read_json(out / "config.json"), load_tensors(out / "model.safetensors")
    except DDMError:  # damaged: written again
        return False
    same = ("shard_sha256", "trained_concurrently_with", "train")
    if not isinstance(saved, dict) or any(saved.get(key) != entry[key] for key in same):
        return False
    state = net.state_dict()
    return weights.keys() == state.keys() and all(
        weights[name].dtype == value.dtype and torch.equal(weights[name], value) for name, value in state.items())


def stopped_job(shards: list[str | Path], out_dirs: list[str | Path]) -> tuple[Path, list[int]] | None:
    """The concurrent job that was stopped while moving its folders into place, among experts `out_dirs` of
    `shards` (a run's, in order): (its checkpoint, the indices of its experts), or None. Such a job left its
    checkpoint (stacked_checkpoint_path: named after its first expert; its fingerprint holds the job's shards'
    SHA-256, in order) and some of its experts in place (model.safetensors)."""
    if not any((Path(out) / "model.safetensors").exists() for out in out_dirs):
        return None  # a job stopped before its moves (its checkpoint continued as usual), or none
    hashes = None
    for first, out in enumerate(out_dirs):
        checkpoint = stacked_checkpoint_path([out])
        if not checkpoint.is_file():
            continue
        try:
            data = check_checkpoint_file(checkpoint)["fingerprint"]["data"]
        except (DDMError, KeyError, TypeError):  # damaged: the job that continues from it says so
            continue
        hashes = hashes or shard_hashes([Path(s) for s in shards])
        experts = [hashes.index(h) for h in data if h in hashes] if isinstance(data, list) else []
        if (experts and len(experts) == len(data) and experts[0] == first and experts == sorted(set(experts))
                and any((Path(out_dirs[k]) / "model.safetensors").exists() for k in experts)):
            return checkpoint, experts
    return None


def concurrent_jobs(shards: list[str | Path], out_dirs: list[str | Path], log=print) -> list[list[int]]:
    """The concurrent jobs that train the experts not in place yet (no model.safetensors in their folder), each
    as the indices of its experts: one job of them all; but a job stopped while moving its folders into place
    (stopped_job) first, whole (it continues from its checkpoint and writes only the folders not in place),
    then one of the other experts missing, if any. A stopped job whose experts are all in place was stopped
    before it removed its checkpoint: removed here."""
    missing = [k for k, out in enumerate(out_dirs) if not (Path(out) / "model.safetensors").exists()]
    stopped = stopped_job(shards, out_dirs)
    if stopped and not any(k in missing for k in stopped[1]):
        log(f"experts: removed {stopped[0]}: the job that wrote it had moved all its experts into place")
        stopped[0].unlink()
        stopped = None
    first = stopped[1] if stopped else []
    rest = [k for k in missing if k not in first]
    return [job for job in (first, rest) if job]
