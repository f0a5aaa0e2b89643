"""The training jobs: expert (one shard, in isolation), monolith (all shards,
FLOP-matched), router (noised samples labelled by cluster).

`train_expert(shard, config, out_dir)` is the pure function every launch
backend calls: it reads the one shard file it is given and nothing else,
and writes an expert folder (config.json, model.safetensors, train_log.jsonl).
It runs on config.train.threads CPU threads wherever it is called, so its
bytes do not depend on the caller's thread count.
`train_expert_ddp(shard, config, out_dir, nproc)` is the same job on nproc
processes (or those torchrun started), data parallel; its folder is that of one
process plus "processes": N in config.json.
"""
from __future__ import annotations

import contextlib
import os

from pathlib import Path
from typing import Callable

import torch

from ddmkit.config import ExpertConfig, PathConfig, RouterConfig, TrainConfig, field_device
from ddmkit.data.partition import read_shard, shard_cluster
from ddmkit.errors import DDMError
from ddmkit.flow.convert import path_entry
from ddmkit.flow.losses import flow_matching_loss, router_loss
from ddmkit.io import check_named, folder_lock, read_json, read_metadata, sha256_file, sibling, staging_dir
from ddmkit.nets import build_seeded, check_builds, save_pretrained, use_networks, user_networks
from ddmkit.nets.user import check_workers_import
from ddmkit.registry import header_shapes
from ddmkit.routing.stats_router import PUBLISHED_STATISTICS, island_publication, save_statistics
from ddmkit.train.checkpoint import EXECUTION, check_resumable, settings_differences
import ddmkit.train.distributed as distributed
from ddmkit.train.distributed import LOCAL, Distributed
from ddmkit.train.loop import fit, job_fingerprint
from ddmkit.train.threads import job_threads


def _batches(x: torch.Tensor, batch_size: int, device: torch.device):
    """A sampler of random batches (with replacement) from x kept on device."""
    x = x.to(device)

    def draw(generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator, device=device)
        return x[idx]

    return draw


def _labelled_batches(x: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device):
    """A sampler of random (x, label) batches (with replacement) kept on device."""
    x, labels = x.to(device), labels.to(device)

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator, device=device)
        return x[idx], labels[idx]

    return draw


def drop_labels(y: torch.Tensor, p: float, null: int, generator: torch.Generator) -> torch.Tensor:
    """Replace a share p of the labels by `null` (the 'no label' class), for classifier-free guidance."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null), y)


def checkpoint_path(out_dir: str | Path) -> Path:
    """Where a job writes its checkpoints: beside its output folder (which only
    appears, whole, at the end), e.g. experts/expert_03.checkpoint.safetensors; for an
    output folder that is itself a staging folder (a job inside a larger write, e.g.
    ddmkit add-expert), a staging name of the same writer, removed with it once it is gone."""
    return sibling(Path(out_dir), "checkpoint.safetensors")


def trained_settings(config: ExpertConfig | RouterConfig) -> dict:
    """What decides what a job of this config section trains, as its table (the fields a refused checkpoint
    or expert folder names): the network, an expert's path and prediction, label_dropout (for a
    class-conditional network; there are no labels to drop otherwise) and the train table less how the
    job runs (EXECUTION: device, threads, logging, checkpoint cadence, DDP or FSDP). concurrent and
    concurrent_networks are how experts run too (a concurrent job's checkpoint also holds its network's
    tensor names: stacked and streamed experts' differ)."""
    return _what_trains(config.model_dump(exclude={"concurrent", "concurrent_networks"}))


def _what_trains(settings: dict) -> dict:
    """trained_settings of a config section's table (a dict as model_dump writes it)."""
    conditional = bool(settings["net"]["kwargs"].get("num_classes", 0))
    settings = {k: v for k, v in settings.items() if conditional or k != "label_dropout"}
    return {**settings, "train": {k: v for k, v in settings["train"].items() if k not in EXECUTION}}


def shard_hashes(shards: list[Path]) -> list[str]:
    """The SHA-256 of each shard file, in order: the identity of a job's training data in its checkpoints."""
    return [sha256_file(s) for s in shards]


def train_velocity_model(x: torch.Tensor, config: ExpertConfig, out_dir: str | Path, role: str,
                         extra: dict | None = None, description: str = "expert", resume: bool = False,
                         labels: torch.Tensor | None = None, dist: Distributed = LOCAL,
                         data: list[str] | None = None, resumed: Callable[[], None] | None = None) -> Path:
    """Train a velocity network on x with flow matching; write a model folder (resumed: see fit).
    Checkpoints (config.train.checkpoint_every) go to checkpoint_path(out_dir);
    resume=True continues from one (refused when it was written with other settings,
    trained_settings, or other data: `data` identifies x, see shard_hashes); it is removed once the
    folder is written.
    With `dist` of several processes each computes the loss on its rows of the
    global batch and rank 0 alone writes (folder and checkpoints)."""
    device = dist.device or field_device("expert.train.device", config.train.device)
    data_shape = list(x.shape[1:])
    kwargs = {"data_shape": data_shape, **config.net.kwargs}
    model = build_seeded(config.net.arch, config.train.seed, **kwargs)
    num_classes = config.net.kwargs.get("num_classes", 0)
    if num_classes and labels is None:
        raise DDMError(f"{description}: the network is class-conditional (num_classes = {num_classes}) "
                       "but the data have no labels")
    if num_classes:  # one sampler, so the shard is on the device once
        draw_labelled = _labelled_batches(x.float(), labels.long(), config.train.batch_size, device)
    else:
        draw = _batches(x.float(), config.train.batch_size, device)
    rows = dist.rows(config.train.batch_size)  # None: the whole batch
    schedule = config.path.vp_schedule()  # None: the linear path

    def batch_loss(m, step, gen):
        if not num_classes:
            return flow_matching_loss(m, draw(gen), gen, config.prediction, rows, schedule), {}
        xb, yb = draw_labelled(gen)
        yb = drop_labels(yb, config.label_dropout, num_classes, gen)
        yb = yb if rows is None else yb[rows]
        return flow_matching_loss(lambda xt, t: m(xt, t, y=yb), xb, gen, config.prediction, rows, schedule), {}

    if not dist.is_main:  # trains alongside rank 0, which writes
        fit(model, batch_loss, config.train, None, description, device, checkpoint_path(out_dir), resume, dist, data,
            trained_settings(config))
        return Path(out_dir)
    with staging_dir(out_dir) as tmp:
        ema, history = fit(model, batch_loss, config.train, tmp / "train_log.jsonl", description, device,
                           checkpoint_path(out_dir), resume, dist, data, trained_settings(config), resumed)
        save_pretrained(tmp, ema, {"role": role, "arch": config.net.arch, "kwargs": kwargs,
                                   "data_shape": data_shape, "prediction": config.prediction,
                                   **path_entry(schedule), "label_dropout": config.label_dropout,
                                   "train": config.train.model_dump(), "final_loss": history[-1]["loss"],
                                   **(extra or {}), **dist.note()})
        if role == "expert":
            publish_statistics(tmp, x, labels, num_classes)
    checkpoint_path(out_dir).unlink(missing_ok=True)
    return Path(out_dir)


def publish_statistics(folder: Path, x: torch.Tensor, labels: torch.Tensor | None, classes: int) -> None:
    """Write what the expert's island publishes for the statistics-only router into its folder
    (ddmkit.routing.stats_router.island_publication): the router is then built from the expert folders
    alone, without reading a shard. A shard of one row has no covariance: nothing is published (the
    statistics-only router then refuses that island, naming it)."""
    if len(x) >= 2:
        save_statistics(folder / PUBLISHED_STATISTICS, island_publication(x.cpu(), labels, classes))


def train_expert(shard: str | Path, config: ExpertConfig, out_dir: str | Path, resume: bool = False,
                 dist: Distributed = LOCAL) -> Path:
    """Train one expert on one shard file, in isolation, on config.train.threads CPU threads (resume:
    continue from its checkpoint; dist: this process's place in a job of several, see train_expert_ddp)."""
    shard = Path(shard)
    check_expert_folder(out_dir)
    x, labels, meta = read_shard(shard)
    cluster = shard_cluster(shard, meta)
    if len(x) == 0:
        raise DDMError(f"{shard}: the shard is empty; re-partition with a smaller k")
    data = shard_hashes([shard])
    extra = {"cluster": cluster, "k": int(meta.get("k", 0)), "shard_sha256": data[0],
             "shard_count": len(x), "data_hash": meta.get("data_hash")}
    with job_threads(config.train.threads):
        return train_velocity_model(x, config, out_dir, "expert", extra, f"expert {cluster}", resume, labels, dist,
                                    data)


def expert_resumes(shard: str | Path, config: ExpertConfig, out_dir: str | Path) -> bool:
    """Whether train_expert(shard, config, out_dir, resume=True) continues from a checkpoint: one is there and
    it is this job's. One it would refuse (other settings, another shard or job, a damaged file) is its
    DDMError, raised here: a job says it continues only from a checkpoint that is accepted. A shard that
    names no cluster is left to train_expert, which refuses it."""
    checkpoint, shard = checkpoint_path(out_dir), Path(shard)
    cluster = read_metadata(shard).get("cluster") if checkpoint.exists() else None
    if cluster is None:
        return False
    shape = header_shapes(shard)["x"][0]
    model = check_builds(config.net.arch, {"data_shape": shape[1:], **config.net.kwargs}, "expert.net")
    check_resumable(checkpoint, job_fingerprint(model, config.train, f"expert {int(cluster)}", shard_hashes([shard]),
                                                trained_settings(config)))
    return True


NETWORK_FILES = ("config.json", "model.safetensors", "train_log.jsonl", "tensorboard")  # a model folder's own
EXPERT_FILES = (*NETWORK_FILES, PUBLISHED_STATISTICS)  # an expert folder's own


def check_expert_folder(out_dir: str | Path, option: str | None = None) -> None:
    """An expert is written into a folder of its own, which it replaces: out_dir must be new, empty or an
    expert's, finished (config.json and model.safetensors) or not (an expert's config.json beside its other
    files, EXPERT_FILES, but no weights: a copy cut short, trained again), never a folder holding anything
    else (a run folder, RUN/experts, a user's files), which would be deleted: a DDMError naming what it
    holds, and the folder by `option`, the command-line option that gave it (e.g. "--out"; None: a job's
    own folder, e.g. one of ddmkit launch)."""
    out_dir = Path(out_dir)
    named = f"{option} {out_dir}" if option else str(out_dir)
    try:
        check_named(out_dir)  # its lock and staging folder are named after it
    except DDMError as e:
        raise DDMError(f"{option} {e}" if option else str(e)) from None
    if out_dir.exists() and not out_dir.is_dir():
        fix = "give a new folder, e.g. RUN/experts/expert_03" if option else "move that file elsewhere"
        raise DDMError(f"{named} is a file; an expert is written into a folder of its own: {fix}")
    if not out_dir.is_dir() or ((out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()):
        return
    foreign = foreign_files(out_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        run = next((f for f in (out_dir, out_dir.parent) if (f / "partition").is_dir()), None)  # a run or in one
        example = run / "experts" / "expert_XX" if run is not None else out_dir / "expert_00"
        fix = (f"give a new or empty folder, e.g. {example}" + (" (XX: the shard's cluster, where the run's other "
               "commands find it)" if example.name == "expert_XX" else " or RUN/experts/expert_03") if option
               else "move them elsewhere")
        raise DDMError(f"{named} holds files that are not an expert ({shown}); an expert is written into a folder "
                       f"of its own, which it replaces: {fix}")


def foreign_files(folder: Path, role: str = "expert", own: tuple[str, ...] = EXPERT_FILES) -> list[str]:
    """What `folder` holds that is not a `role` model folder's own: nothing but `own` (or a copy of one cut
    short, rsync's .model.safetensors.Ab12Cd) beside a config.json that training of that role wrote; all it
    holds otherwise."""
    held = sorted(p.name for p in folder.iterdir())
    try:
        saved = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    except DDMError:  # not JSON: not that network's
        saved = None
    if not isinstance(saved, dict) or saved.get("role") != role:
        return held
    return [name for name in held if name not in own and not any(name.startswith(f".{mine}.") for mine in own)]


def trained_expert_differences(out_dir: str | Path, shard: str | Path, config: ExpertConfig) -> list[str] | None:
    """None when out_dir holds no finished expert; else the fields in which the expert there differs from
    one trained with `config` on `shard` (trained_settings, and "the shard"; an empty list: the same
    training, where and how it ran aside)."""
    out_dir = Path(out_dir)
    if not (out_dir / "model.safetensors").exists() or not (out_dir / "config.json").exists():
        return None
    if not weights_readable(out_dir / "model.safetensors"):
        return None  # weights cut short (a copy interrupted mid-file): an unfinished expert, trained again
    saved = read_json(out_dir / "config.json")
    saved = saved if isinstance(saved, dict) else {}
    differences = [d.split(" ", 1)[0] for d in expert_differences(saved, config)]
    return differences + (["the shard"] if saved.get("shard_sha256") != sha256_file(shard) else [])


def expert_differences(saved: dict, config: ExpertConfig, by: str = "asked") -> list[str]:
    """The fields in which the expert whose config.json is `saved` differs from one trained with `config`
    (trained_settings: what is trained, not how the job ran), each with both values, the config's after `by`:
    ["train.steps (500, asked 2000)"]."""
    return settings_differences(_what_trains(_expert_table(saved)), trained_settings(config), by)


def weights_readable(path: Path) -> bool:
    """Whether a safetensors file's header reads and covers the file (a copy cut short mid-file does not)."""
    try:
        read_metadata(path)
    except DDMError:
        return False
    return True


def _expert_table(saved: dict) -> dict:
    """The [expert] table (as ExpertConfig.model_dump writes it) of the expert whose config.json is `saved`, as
    far as it records one: its path is the linear one unless a "path" entry (path_entry) says otherwise."""
    path = saved.get("path")
    path = {k: path.get(k) for k in PathConfig.model_fields} if isinstance(path, dict) else PathConfig().model_dump()
    kwargs = saved.get("kwargs") if isinstance(saved.get("kwargs"), dict) else {}
    return {"net": {"arch": saved.get("arch"), "kwargs": {k: v for k, v in kwargs.items() if k != "data_shape"}},
            "train": saved.get("train") if isinstance(saved.get("train"), dict) else {},
            "path": path, "prediction": saved.get("prediction"), "label_dropout": saved.get("label_dropout")}


def expert_folder_lock(out_dir: str | Path):
    """One job per expert folder: the lock .NAME.lock beside it, held while a job trains into it (a second
    train-expert, or a run or launch training that expert, is refused meanwhile; ddmkit.io.folder_lock)."""
    return folder_lock(Path(out_dir).with_name(f".{Path(out_dir).name}.lock"), f"expert folder {out_dir}")


def train_expert_once(shard: str | Path, config: ExpertConfig, out_dir: str | Path, nproc: int = 1,
                      resume: bool = False, force: bool = False, log=print) -> bool:
    """train_expert_ddp, unless out_dir holds this expert already (the same settings and shard: nothing
    to do, False) or one trained otherwise (a DDMError naming what differs; force replaces it). Under a
    launcher of several processes (torchrun) only rank 0 logs, and only rank 0 returns True."""
    main = int(os.environ.get("RANK", "0")) == 0
    check_expert_folder(out_dir, "--out")  # before anything: --force replaces an expert, never other files
    check_graph_processes(config, nproc)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # processes spawned here (not torchrun's, which run the script)
        check_workers_import(f"--nproc {nproc}", "the job's processes", spawned=True,
                             fallback="train on one process (leave --nproc out)")
    # rank 0 holds the lock for the job's processes: torchrun starts every rank with this command
    with expert_folder_lock(out_dir) if main else contextlib.nullcontext():
        return _train_expert_once(shard, config, out_dir, nproc, resume, force, log, main)


def job_world(nproc: int) -> tuple[int, bool]:
    """(processes of the job, whether a launcher such as torchrun started them): its WORLD_SIZE where RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT are all set (as distributed.from_env joins its job), else --nproc."""
    torchrun = all(k in os.environ for k in distributed.ENV)
    return (int(os.environ["WORLD_SIZE"]) if torchrun else nproc), torchrun


def check_graph_processes(config: ExpertConfig, nproc: int) -> None:
    """A DDMError, before any process starts, for expert.train.cuda_graph = true on CUDA in a job of several
    processes (--nproc N, or torchrun's WORLD_SIZE): their gradients are exchanged inside the step, which one
    graph cannot hold (fit refuses it in every process, later; on the CPU cuda_graph is ignored)."""
    world, torchrun = job_world(nproc)
    if world < 2 or not config.train.cuda_graph:
        return
    if field_device("expert.train.device", config.train.device).type != "cuda":
        return
    given, fix = (f"torchrun's {world} processes", "run it without torchrun") if torchrun else \
        (f"--nproc {nproc}", "leave --nproc out")
    raise DDMError(f"{given}: expert.train.cuda_graph = true captures one process's whole training step, and the "
                   "processes of one job exchange their gradients inside it; train with one process "
                   f"({fix}), or add --set expert.train.cuda_graph=false")


def check_job_batch(config: ExpertConfig, nproc: int, out_dir: str | Path, resume: bool) -> None:
    """distributed.check_batch for the job's processes (--nproc N, or a launcher's WORLD_SIZE), naming the fixes
    that work: as many processes as divide the batch, or (where no checkpoint to continue holds this batch) another
    batch. Under torchrun a process found it only after joining the job, naming a --set field that does not exist."""
    world, torchrun = job_world(nproc)
    if world < 2:  # one process takes any batch: no fix to word, no checkpoint to look for
        return
    batch, field = config.train.batch_size, "expert.train.batch_size"
    fits = max((n for n in range(1, min(world, batch + 1)) if batch % n == 0), default=1)  # used where it divides
    given, fix = (f"torchrun's {world} processes", f"a job of {fits} processes") if torchrun else \
        (f"--nproc {world}", f"--nproc {fits}")
    kept, whole = checkpoint_path(out_dir), "the batch is the global one, over all processes"
    how = (f"{fix} ({fits} divides {batch}; {whole}, and {kept}, which --resume continues, was written with it)"
           if resume and kept.is_file() else
           f"{fix} ({fits} divides {batch}), or a multiple of {world}, e.g. --set "
           f"{field}={world * max(1, batch // world)} ({whole})")
    distributed.check_batch(batch, world, field, fix=how, given=given)


def _refuse_other_cluster(out_dir: str | Path, shard: str | Path) -> None:
    """A DDMError when out_dir holds the expert of another cluster than the shard's: the shard was given to the
    wrong folder, and --force would replace a good expert with a copy of another cluster's."""
    saved = read_json(Path(out_dir) / "config.json")
    made = saved.get("cluster") if isinstance(saved, dict) else None
    meta = read_metadata(shard)
    given = int(meta["cluster"]) if isinstance(meta, dict) and str(meta.get("cluster", "")).isdigit() else None
    if isinstance(made, int) and given is not None and made != given:
        like = Path(out_dir).with_name(f"expert_{given:02d}")  # a run folder's name for it
        where = f" ({like} in a run folder)" if Path(out_dir).name.startswith("expert_") else ""
        raise DDMError(f"{out_dir} holds the expert of cluster {made}, and {shard} is the shard of cluster {given}: "
                       f"train it into cluster {given}'s expert folder{where}; --force would replace cluster {made}'s "
                       f"expert with cluster {given}'s")


def _train_expert_once(shard, config: ExpertConfig, out_dir, nproc: int, resume: bool, force: bool, log,
                       main: bool) -> bool:
    differences = None if force or not Path(shard).is_file() else trained_expert_differences(out_dir, shard, config)
    if differences == []:
        if main:
            log(f"{out_dir}: this expert is trained already (the same settings and shard); nothing to do (--force "
                "trains it again)")
        return False
    if differences:
        _refuse_other_cluster(out_dir, shard)
        raise DDMError(f"{out_dir} holds an expert trained with other settings ({', '.join(differences)}); choose "
                       "another --out, or pass --force to replace it")
    check_job_batch(config, nproc, out_dir, resume)  # before any note or warning
    weights = Path(out_dir) / "model.safetensors"
    if differences is None and weights.is_file() and not weights_readable(weights) and main:
        log(f"note: {weights} does not read (a copy cut short?): this job trains the expert again and replaces it")
    if not resume and checkpoint_path(out_dir).exists() and main:
        log(f"note: {checkpoint_path(out_dir)} is not continued (no --resume): this job trains from the start and "
            "replaces it")
    if resume and main and expert_resumes(shard, config, out_dir):
        log(f"{out_dir}: continuing from {checkpoint_path(out_dir)}")  # as run and launch say it
    crowded = distributed.crowded_cpu(nproc, config.train.threads, config.train.device)
    if crowded and main:
        log(f"warning: {crowded}")
    train_expert_ddp(shard, config, out_dir, nproc, resume=resume)
    return main


def train_expert_ddp(shard: str | Path, config: ExpertConfig, out_dir: str | Path, nproc: int = 1,
                     resume: bool = False) -> Path:
    """train_expert as one job of nproc processes spawned on this machine (one per GPU with CUDA),
    or of the processes torchrun started, data parallel: config.train.batch_size is the global
    batch, split into equal slices, and every process trains on config.train.threads CPU threads.
    The same loss curve as one process, up to float rounding; nproc = 1 outside torchrun is
    train_expert itself."""
    distributed.check_nproc(nproc)
    distributed.check_batch(config.train.batch_size, nproc, "expert.train.batch_size")
    if nproc > 1 and Path(shard).is_file():  # refused once here, not by every process after it started
        shard_cluster(shard, read_metadata(shard))
    distributed.run(_train_expert_with, nproc, config.train.device, user_networks(), shard, config, out_dir, resume)
    return Path(out_dir)


def _train_expert_with(networks: tuple, shard, config: ExpertConfig, out_dir, resume: bool, dist: Distributed = LOCAL):
    """train_expert after registering the user's network classes that the calling process had registered
    (a spawned process starts with none)."""
    use_networks(networks)
    return train_expert(shard, config, out_dir, resume, dist)


def monolith_config(expert: ExpertConfig, k: int, match: str = "steps") -> ExpertConfig:
    """Same network as one expert with k times its compute (steps x batch), that
    of all k experts together: k times the steps (match="steps") or k times the
    batch for the same steps (match="batch", one GPU-friendly large batch)."""
    key = "steps" if match == "steps" else "batch_size"
    train = expert.train.model_copy(update={key: getattr(expert.train, key) * k})
    return expert.model_copy(update={"train": train})


def train_monolith(shards: list[Path], config: ExpertConfig, out_dir: str | Path, match: str = "steps",
                   resume: bool = True, resumed: Callable[[], None] | None = None) -> Path:
    """Train the FLOP-matched monolith (monolith_config) on all shards together; like an expert it
    checkpoints to checkpoint_path(out_dir) and continues from a checkpoint there (resume=False: starts over;
    resumed: see fit)."""
    parts = [read_shard(s) for s in shards]
    x = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts]) if all(p[1] is not None for p in parts) else None
    cfg = monolith_config(config, len(shards), match)
    hashes = shard_hashes(shards)  # recorded: a monolith copied from another run is told apart (registry)
    return train_velocity_model(x, cfg, out_dir, "monolith", {"k_matched": len(shards), "flop_match": match,
                                                              "shards_sha256": hashes},
                                "monolith", resume, labels, data=hashes, resumed=resumed)


def train_router(shards: list[Path], config: RouterConfig, out_dir: str | Path, resume: bool = True,
                 resumed: Callable[[], None] | None = None) -> Path:
    """Train the router p(cluster | x_t, t) with cross-entropy on noised shard data. Like an expert it
    checkpoints to checkpoint_path(out_dir) and continues from a checkpoint there (resume=False: starts over).

    A label-conditional router (net kwargs num_classes > 0) learns p(cluster | x_t, t, y)
    from the shards' class labels, with a share config.label_dropout of them replaced
    by 'no label' so that p(cluster | x_t, t) is learned as well."""
    device = field_device("router.train.device", config.train.device)
    shard_data = [read_shard(s) for s in shards]
    x = torch.cat([d[0] for d in shard_data]).float().to(device)
    y = torch.cat([torch.full((len(d[0]),), k, dtype=torch.long) for k, d in enumerate(shard_data)]).to(device)
    num_classes = config.net.kwargs.get("num_classes", 0)
    if num_classes and any(d[1] is None for d in shard_data):
        raise DDMError(f"router: the network is label-conditional (num_classes = {num_classes}) but the shards "
                       "have no class labels; remove router.net.kwargs.num_classes")
    classes = torch.cat([d[1] for d in shard_data]).long().to(device) if num_classes else None
    data_shape = list(x.shape[1:])
    kwargs = {"data_shape": data_shape, "num_experts": len(shards), **config.net.kwargs}
    model = build_seeded(config.net.arch, config.train.seed, **kwargs)

    def batch_loss(m, step, gen):
        idx = torch.randint(0, len(x), (config.train.batch_size,), generator=gen, device=device)
        if classes is None:
            loss, acc = router_loss(m, x[idx], y[idx], gen)
        else:
            yb = drop_labels(classes[idx], config.label_dropout, num_classes, gen)
            loss, acc = router_loss(lambda xt, t: m(xt, t, yb), x[idx], y[idx], gen)
        return loss, {"accuracy": acc}

    hashes = shard_hashes(shards)  # recorded: a router copied from another run is told apart (registry)
    with staging_dir(out_dir) as tmp:
        ema, history = fit(model, batch_loss, config.train, tmp / "train_log.jsonl", "router", device,
                           checkpoint_path(out_dir), resume, data=hashes, settings=trained_settings(config),
                           resumed=resumed)
        save_pretrained(tmp, ema, {"role": "router", "arch": config.net.arch, "kwargs": kwargs,
                                   "data_shape": data_shape, "k": len(shards), "shards_sha256": hashes,
                                   "train": config.train.model_dump(), "final_loss": history[-1]["loss"]})
    checkpoint_path(out_dir).unlink(missing_ok=True)
    return Path(out_dir)


__all__ = ["TrainConfig", "checkpoint_path", "expert_folder_lock", "monolith_config", "shard_hashes", "train_expert",
           "train_expert_ddp", "train_monolith", "train_router", "train_velocity_model"]
