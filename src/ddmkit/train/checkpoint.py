"""Training checkpoints: everything `fit` needs to continue bit-for-bit.

One file, `checkpoint.safetensors`, written atomically (temporary name, then
rename), so a job killed at any instant leaves either the previous checkpoint
or the new one, never half of one. Tensors (model, EMA, optimizer moments,
RNG states as uint8) are safetensors; everything else (step, history, the
scheduler and optimizer hyper-parameters, the fingerprint of the run: the
settings of what is trained, network, job and training data) is one JSON
string in the file's metadata. No pickle, no torch.save. The log rows and the
running sums are stored as [key, value] pairs, so a resumed train_log.jsonl
keeps the key order of an uninterrupted one (the metadata JSON is written with
sorted keys).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ddmkit.errors import DDMError
from ddmkit.io import load_tensors, read_metadata, save_tensors
import ddmkit.train.distributed as distributed

FORMAT = "ddmkit-checkpoint-1"
DAMAGED = "a checkpoint cannot be made again: delete it to train this job from the start"  # a corrupt file's fix


EXECUTION = ("device", "threads", "checkpoint_every", "log_every", "tensorboard", "parallel")  # how a job runs


def fingerprint(settings: dict, model: torch.nn.Module, description: str, data: list[str] | None = None) -> dict:
    """What decides the trajectory, in parts a refused checkpoint can name: the job's settings (`settings`, a
    config section as a table, e.g. an expert's net, path, prediction, label_dropout and train; its
    train table less how the job runs, EXECUTION: device, threads, logging, checkpoint cadence and DDP or
    FSDP, as a checkpoint holds whole tensors either way), the parameter names and shapes, the job, and the
    data it trains on (`data`: e.g. the SHA-256 of each shard, in the order they are used)."""
    train = {k: v for k, v in settings.get("train", {}).items() if k not in EXECUTION}
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    return {"config": {**settings, "train": train}, "network": shapes, "job": description, "data": data}


def _by_field(table: dict, prefix: str = "") -> dict:
    """A nested table's values by dotted field name: {"net.kwargs.width": 16, "prediction": "x0", ...}."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and value:
            out.update(_by_field(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def settings_differences(made: dict, asked: dict, by: str = "asked") -> list[str]:
    """The fields in which the settings `made` differ from `asked` (nested tables, fields of either one), the
    asked value after `by`: ["net.kwargs.num_classes (10, asked absent)", "prediction ('velocity', asked 'x0')"]."""
    old, new = _by_field(made), _by_field(asked)

    def shown(values: dict, name: str) -> str:
        return repr(values[name]) if name in values else "absent"

    return [f"{name} ({shown(old, name)}, {by} {shown(new, name)})" for name in sorted(set(old) | set(new))
            if name not in old or name not in new or old[name] != new[name]]


CONCURRENT_NETWORKS = {"stacked": "stacked", "experts": "streams"}  # first part of a parameter name -> the kind


def _concurrent_networks(shapes: dict) -> str | None:
    """expert.concurrent_networks of a concurrent job's network from its parameter names (stacked experts' all
    begin with stacked., streamed ones' with experts.), or None for another network."""
    heads = {name.split(".", 1)[0] for name in shapes}
    return CONCURRENT_NETWORKS.get(heads.pop()) if len(heads) == 1 else None


def _shape_differences(old: dict, new: dict) -> str:
    """The parameters whose shapes differ (the first three), or those only one network has; for a concurrent
    job's experts stacked in one and streamed in the other (no name in common), that difference instead."""
    if not isinstance(old, dict):
        return "other parameters"
    kinds = _concurrent_networks(old), _concurrent_networks(new)
    if None not in kinds and kinds[0] != kinds[1]:
        return f"other expert.concurrent_networks ({kinds[0]!r}, asked {kinds[1]!r})"
    names = [n for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
    shown = "; ".join(f"{n} {old.get(n, 'absent')}, asked {new.get(n, 'absent')}" for n in names[:3])
    return f"parameter shapes differ ({shown}{' ...' if len(names) > 3 else ''}): other net kwargs"


def _hashes(data: list[str] | None) -> str:
    return ", ".join(h[:12] for h in data) if data else "none recorded"


def fingerprint_differences(old, new: dict) -> list[str]:
    """What differs between the run that wrote a checkpoint (its fingerprint `old`) and this one (`new`)."""
    if not isinstance(old, dict) or set(old) != set(new) or not isinstance(old["config"], dict):
        return ["it was written by another version of ddmkit"]  # e.g. one that recorded the train table alone
    out = []
    if old["data"] != new["data"]:
        out.append(f"other training data (the checkpoint's SHA-256: {_hashes(old['data'])}; this job's: "
                   f"{_hashes(new['data'])})")
    if old["config"] != new["config"]:
        changed = settings_differences(old["config"], new["config"])
        out.append(f"other settings: {', '.join(changed) or 'those of another version of ddmkit'}")
    if old["network"] != new["network"]:
        out.append(f"another network: {_shape_differences(old['network'], new['network'])}")
    if old["job"] != new["job"]:
        out.append(f"another job (it was written by the {old['job']!r} job, this is {new['job']!r})")
    return out


def _flat(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _unflat(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _training_gpu(generator: torch.Generator) -> torch.device:
    """The GPU a job trains on: its batch generator's (a CUDA generator)."""
    device = generator.device
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The RNG states the job uses: torch's CPU RNG, the batch generator and, for a job training on a GPU (its
    batch generator's device), that GPU's default RNG as "rng.cuda"; a CPU job saves none of CUDA's, and no
    job saves the other GPUs' (their number is the machine's, not the job's)."""
    out = {"rng.cpu": torch.get_rng_state(), "rng.batches": generator.get_state()}
    if generator.device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(_training_gpu(generator))
    return out


def check_batch_generator(path, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """A DDMError unless the checkpoint's batch generator state fits `generator`: the draws of a CPU
    generator cannot continue on a GPU's (their states differ in kind and size), so a job resumes on the
    kind of device it was checkpointed on."""
    saved, now = tensors.get("rng.batches"), generator.get_state()
    if saved is not None and saved.numel() != now.numel():
        was = "the CPU" if saved.numel() == torch.Generator().get_state().numel() else "a GPU"
        raise DDMError(f"{path} was written by a job training on {was}, and its batch draws cannot continue on "
                       f"{generator.device.type}: resume on the device it was written on (train.device, e.g. "
                       f"--set expert.train.device={'cpu' if was == 'the CPU' else 'cuda'}), or delete it to "
                       "train this job from the start")


def restore_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """rng_tensors' states back: a GPU job's "rng.cuda" into the GPU it trains on (a checkpoint of earlier
    ddmkit holds every visible GPU's state as rng.cuda.N: that GPU's index is taken); CUDA states a job does
    not use (a CPU job's, other GPUs') are ignored, so a job resumes with fewer or no GPUs visible."""
    torch.set_rng_state(tensors["rng.cpu"])
    generator.set_state(tensors["rng.batches"])
    if generator.device.type == "cuda":
        gpu = _training_gpu(generator)
        state = tensors.get("rng.cuda", tensors.get(f"rng.cuda.{gpu.index}"))
        if state is not None:
            torch.cuda.set_rng_state(state, gpu)


def as_numbers(value):
    """`value` with every one-number tensor in it a Python number, in lists and tables too (as JSON holds it):
    a CUDA-graphed job's learning rate is a tensor in its optimizer's param groups and scheduler state."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [as_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: as_numbers(v) for k, v in value.items()}
    return value


def optimizer_parts(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of an optimizer's state_dict: per-parameter tensors as
    `optim.<param index>.<name>`, the param groups (hyper-parameters) as JSON."""
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if not torch.is_tensor(value):
                raise DDMError(f"checkpoint: optimizer state {name!r} is not a tensor; unsupported optimizer")
            tensors[f"optim.{idx}.{name}"] = value
    return tensors, {"param_groups": as_numbers(sd["param_groups"])}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in _unflat("optim", tensors).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def training_state(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The state dicts of the model, its EMA and the optimizer, with whole tensors (save_checkpoint's model, ema
    and optimizer). Under FSDP gathering the shards is a collective: every process of the job calls it."""
    return {"model": distributed.full_state(model), "ema": distributed.full_state(ema),
            "optimizer": distributed.full_optimizer_state(opt)}


def save_checkpoint(path: str | Path, *, step: int, model: dict, ema: dict, optimizer: dict, sched,
                    generator: torch.Generator, history: list[dict], running: dict, fp: dict) -> None:
    """Write the state after `step` completed steps, atomically; model, ema and optimizer are state dicts
    (training_state)."""
    opt_tensors, opt_meta = optimizer_parts(optimizer)
    run_tensors = {f"running.{k}": (v.detach().reshape(()) if torch.is_tensor(v) else torch.tensor(float(v),
                   dtype=torch.float64)) for k, v in running.items()}
    sched_state = {k: as_numbers(v) for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    tensors = {**_flat("model", model), **_flat("ema", ema), **opt_tensors,
               **rng_tensors(generator), **run_tensors}
    rows = [[[k, v] for k, v in row.items()] for row in history]  # pairs keep each row's key order
    meta = {"format": FORMAT, "step": step, "fingerprint": fp, "history": rows, "optimizer": opt_meta,
            "scheduler": sched_state, "running_is_tensor": [[k, torch.is_tensor(v)] for k, v in running.items()]}
    save_tensors(path, {k: v.detach().cpu().clone() for k, v in tensors.items()}, meta)


def check_checkpoint_file(path: str | Path) -> dict:
    """A checkpoint file's metadata, the file checked to be a readable ddmkit checkpoint (a DDMError saying
    to delete it otherwise): what a launch checks of every job's checkpoint before any job starts."""
    meta = read_metadata(path, DAMAGED)
    if meta.get("format") != FORMAT:
        raise DDMError(f"{path}: not a ddmkit checkpoint (format {meta.get('format')!r}); delete it to start over")
    return meta


def check_resumable(path: str | Path, fp: dict) -> dict:
    """A checkpoint's metadata, the file checked to be a readable ddmkit checkpoint of the training run whose
    fingerprint is `fp` (a DDMError naming what differs otherwise): what resuming checks before it restores
    anything, so that a job says it continues from a checkpoint only once it is accepted."""
    meta = check_checkpoint_file(path)
    differences = fingerprint_differences(meta.get("fingerprint"), fp)
    if differences:
        raise DDMError(f"{path} belongs to a different training run: {'; '.join(differences)}. Delete it to "
                       "train this job from the start, or train into another folder to keep it")
    return meta


def load_checkpoint(path: str | Path, *, model, ema, opt, sched, generator: torch.Generator,
                    fp: dict, device: torch.device) -> tuple[int, list[dict], dict]:
    """Restore everything in place (a sharded model, EMA and optimizer take their part of each tensor);
    returns (step, history, running sums)."""
    meta = check_resumable(path, fp)
    tensors = load_tensors(path, fix=DAMAGED)
    check_batch_generator(path, tensors, generator)
    try:
        distributed.load_full_state(model, {k: v.to(device) for k, v in _unflat("model", tensors).items()})
        distributed.load_full_state(ema, {k: v.to(device) for k, v in _unflat("ema", tensors).items()})
        distributed.load_full_optimizer_state(opt, optimizer_state(tensors, meta["optimizer"]))
        sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(opt.param_groups)})
        restore_rng(tensors, generator)
        step, history = int(meta["step"]), [dict(row) for row in meta["history"]]
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise DDMError(f"{path} is incomplete or damaged ({str(e)[:200]}); delete it to start over") from e
    running = {}
    for k, is_tensor in dict(meta.get("running_is_tensor", {})).items():  # pairs: the sums' order kept
        v = tensors[f"running.{k}"]
        running[k] = v.to(device) if is_tensor else float(v)
    return step, history, running
