"""The training stages of a run, the same for every kind of continuous data (vectors, images):
data, partition, experts, monolith, router, registry. Each reads what the previous one wrote
and skips itself when its output is already there, so a run resumes after an interruption and
single stages can run on other machines.

The data and partition stages are also two steps each, so that pipeline.prepare checks a new
run completely before writing anything: load_data / plan_partition (in memory, every check)
and write_data / write_partition. Training jobs run on train.threads CPU threads (ddmkit.train.threads.job_threads).
"""
from __future__ import annotations

import contextlib
import inspect
import shlex
import time
from pathlib import Path
from typing import Callable

import torch

from ddmkit.config import RunConfig, field_device
from ddmkit.data import load_dataset
from ddmkit.data.arrays import ArrayData, is_array_file
from ddmkit.data.datasets import pad_fix
from ddmkit.data.features import is_user_function, use_features
from ddmkit.data.function import is_function_name
from ddmkit.data.partition import SHARD_FIX, PartitionPlan, compute_partition, read_shard, write_partition
from ddmkit.data.source import source_fingerprint
from ddmkit.ddm.load import load_truth
from ddmkit.errors import DDMError
from ddmkit.io import (folder_lock, read_json, save_tensors, sha256_file,
                       staging_dir, write_json)
from ddmkit.launch import ExpertJob, run_jobs
from ddmkit.latent.autoencoder import downsampling, load_autoencoder, load_codec, planned_config
from ddmkit.layout import RunFolder, enclosing_run
from ddmkit.nets import build_model, build_seeded, check_builds, use_network
from ddmkit.nets.folders import check_argument_names
from ddmkit.nets.dit import DiT
from ddmkit.nets.unet import UNet, check_size, fitting_sides, size_fix
from ddmkit.nets.user import check_output, is_user_network
from ddmkit.pipeline.checks import too_few_samples
from ddmkit.registry import (AUTOENCODER_WEIGHTS, checked_model_shards, data_fix, data_sha256, header_shapes,
                             load_data_file, model_shards, shard_files, write_registry)
from ddmkit.train.autoencoder import train_autoencoder
from ddmkit.train.concurrent import concurrent_jobs, train_experts_concurrently
from ddmkit.train.jobs import (NETWORK_FILES, checkpoint_path, expert_folder_lock, expert_resumes, foreign_files,
                              train_monolith, train_router)
from ddmkit.train.threads import job_threads

Log = Callable[[str], None]


@contextlib.contextmanager
def run_lock(run: str | Path):
    """Hold the run folder's lock (RUN/.lock, created with the folder) while the body writes to it: a
    second writer is refused, naming the holder. Re-entrant within one process; the folders this call
    created (the run folder and its missing parents) are removed again if they are left empty (a run
    that failed its checks leaves nothing)."""
    folder = RunFolder(run)
    with folder_lock(folder.lock, f"run folder {folder.root}"):  # (it removes the new empty folders)
        yield folder.root


def load_data(cfg: RunConfig) -> tuple[ArrayData, ArrayData]:
    """The run's train and test splits, in memory, checked (finite, non-empty, at least partition.k
    training samples)."""
    d = cfg.data
    train, test = load_dataset(d.name, d.n_train, d.n_test, d.seed, d.params)
    if len(train) < cfg.partition.k:
        raise DDMError(too_few_samples(cfg, len(train)))
    return train, test


def write_data(cfg: RunConfig, run, train: ArrayData, test: ArrayData, log: Log = print) -> None:
    """Write RUN/data/ (one staged folder: it appears whole or not at all); data.json records the SHA-256 of
    each file (ddmkit.registry.check_data_file)."""
    folder = RunFolder(run)
    with staging_dir(folder.data) as tmp:
        for split, data in (("train", train), ("test", test)):
            tensors = {"x": data.x}
            if data.labels is not None:
                tensors["labels"] = data.labels
            save_tensors(tmp / folder.split(split).name, tensors)
        if train.truth is not None:
            t = train.truth
            save_tensors(tmp / folder.truth.name, {"weights": t.weights, "means": t.means, "eigvals": t.eigvals,
                                                   "eigvecs": t.eigvecs})
        write_json(tmp / folder.data_info.name, {"name": cfg.data.name, "n_train": len(train), "n_test": len(test),
                                                 "data_shape": list(train.data_shape),
                                                 "exact_truth": train.truth is not None,
                                                 "classes": train.meta.get("classes"),  # label i's name
                                                 "source_fingerprint": source_fingerprint(cfg.data.name,
                                                                                          cfg.data.params),
                                                 "sha256": data_sha256(tmp)})  # each file's, checked on reading
    log(f"data: {cfg.data.name}, {len(train)} train / {len(test)} test samples of shape {train.data_shape}")


def stage_data(cfg: RunConfig, run, log: Log = print) -> None:
    with run_lock(run):
        if RunFolder(run).split("train").exists():
            return
        write_data(cfg, run, *load_data(cfg), log)


def read_data_info(folder: RunFolder) -> dict:
    """RUN/data/data.json as written (a damaged one, or one of other JSON than an object, is a DDMError naming
    data_fix)."""
    info = read_json(folder.data_info, data_fix(folder))
    if not isinstance(info, dict) or not isinstance(info.get("data_shape"), list):
        raise DDMError(f"{folder.data_info} holds no data_shape (not what ddmkit writes there); {data_fix(folder)}")
    return info


def load_split(run, split: str) -> ArrayData:
    """A run's train or test split (with the exact truth when the data have one), checked against the SHA-256
    data.json records (ddmkit.registry.load_data_file)."""
    folder = RunFolder(run)
    if not folder.split(split).exists():
        raise DDMError(f"{folder.root}: no data (data/{split}.safetensors); run `ddmkit partition --out "
                       f"{folder.root} --config CONFIG` or `ddmkit run CONFIG --out {folder.root}` first")
    t = load_data_file(folder.root, folder.split(split))
    return ArrayData(read_data_info(folder)["name"], t["x"], t.get("labels"), load_truth(run))


def plan_partition(cfg: RunConfig, train: ArrayData) -> PartitionPlan:
    """The run's partition computed in memory (every check of the partition settings)."""
    p = cfg.partition
    encoder = {"folder": p.encoder, "pool": p.encoder_pool, "size": p.encoder_size, "normalize": p.encoder_normalize}
    return compute_partition(train, p.k, p.features, p.pca_dim, p.balanced, p.seed, fine_k=p.fine_k,
                             encoder=encoder if p.features == "encoder" else None, encoder_batch=p.encoder_batch)


def register_user_features(cfg: RunConfig) -> None:
    """Import and register the feature function the user's config names (partition.features =
    "module:function"), for nearest-centroid routing; nothing for identity and pca. Call it only
    with the config the user runs, never with one read from a run folder."""
    if is_user_function(cfg.partition.features):
        use_features(cfg.partition.features)


def register_user_networks(cfg: RunConfig) -> None:
    """Import and register the network classes the user's config names (expert.net.arch or
    router.net.arch = "package.module:Class"); nothing for built-in architectures. Call it only
    with the config the user runs, never with one read from a run folder."""
    for name, net in (("expert", cfg.expert.net), ("router", cfg.router.net)):
        if is_user_network(net.arch):
            use_network(net.arch, field=f"{name}.net.arch")


def check_network_arguments(cfg: RunConfig) -> None:
    """The names in expert.net.kwargs and router.net.kwargs against the arguments their classes take (the
    user's own classes registered here, from cfg), from the config alone: a misspelt name is a DDMError
    naming the field and the nearest accepted name, before any data are read (check_networks builds the
    networks once the data's shape is known)."""
    register_user_networks(cfg)
    check_argument_names(cfg.expert.net.arch, cfg.expert.net.kwargs, "expert.net")
    check_argument_names(cfg.router.net.arch, cfg.router.net.kwargs, "router.net", ("data_shape", "num_experts"))


def builds_on_the_cpu(arch: str, kwargs: dict) -> bool:
    """Whether arch(**kwargs) builds on the CPU (a class that fails only on the meta device computes
    with tensors in its __init__)."""
    try:
        build_model(arch, **kwargs)
    except Exception:
        return False
    return True


def image_size_fix(cfg: RunConfig) -> Callable[[int, int, int], str]:
    """How the run's data set makes its images square of a side a multiple divides, for check_size: the image
    loaders' data.params (size_fix); a data set function or an array file, which take no pad_to, resize or crop:
    pad_fix's advice for that data set (a function: its own images, padded or resized in it)."""
    name, params = cfg.data.name, cfg.data.params
    if not (is_function_name(name) or is_array_file(name)):
        return size_fix

    def fix(height: int, width: int, multiple: int) -> str:
        pad, cut = fitting_sides(height, width, multiple)
        resized = f", or of {cut}x{cut} (resized or cropped in it)" if is_function_name(name) and cut else ""
        return pad_fix(name, pad, params, (height, width)) + resized
    return fix


def check_unet(cfg: RunConfig, data_shape: list[int]) -> None:
    """UNet experts take images (a latent run: latents) of sides their levels halve evenly (nets.unet.check_size):
    a DDMError that gives the fix in the images' sizes (the autoencoder's latents are f times smaller per side), in
    the settings of the run's data set (image_size_fix)."""
    net = cfg.expert.net
    channels = net.kwargs.get("channels", inspect.signature(UNet).parameters["channels"].default)
    if net.arch != "unet" or len(data_shape) != 3 or not isinstance(channels, (list, tuple)):
        return  # (a channels of another type: check_builds names it)
    scale = downsampling(planned_config(cfg.latent, tuple(data_shape))) if cfg.latent.enabled else 1
    try:
        check_size(*data_shape[1:], channels, scale, image_size_fix(cfg))
    except DDMError as e:
        raise DDMError(f"expert.net: {e}") from None


def check_dit(cfg: RunConfig, data_shape: list[int]) -> None:
    """DiT experts take images (a latent run: latents) of sides their patch divides: a DDMError that names the
    largest patch that fits and the image sizes that fit this patch (in a latent run, multiples of patch x the
    autoencoder's downsampling: padding the images to a multiple of patch alone would not fit the autoencoder),
    in the settings of the run's data set (image_size_fix)."""
    net = cfg.expert.net
    patch = net.kwargs.get("patch", inspect.signature(DiT).parameters["patch"].default)
    if net.arch != "dit" or len(data_shape) != 3 or type(patch) is not int or patch < 1:
        return  # (a patch of another type: check_builds names it)
    height, width = data_shape[1:]
    if not (height % patch or width % patch):
        return
    scale = downsampling(planned_config(cfg.latent, tuple(data_shape))) if cfg.latent.enabled else 1
    fits = next(p for p in range(patch - 1, 0, -1) if not height % p and not width % p)
    what = f"image size {height}x{width}" if scale == 1 else \
        f"latent size {height}x{width} (of {height * scale}x{width * scale} images, {scale}x smaller per side)"
    raise DDMError(f"expert.net: DiT: {what} does not split into patches of {patch}x{patch}; set "
                   f"expert.net.kwargs.patch = {fits} (the largest that divides both sides), or "
                   f"{image_size_fix(cfg)(height * scale, width * scale, patch * scale)}")


def check_expert_fits(cfg: RunConfig, shard: Path) -> None:
    """`ddmkit train-expert`: the config's UNet or DiT expert against the samples of `shard` (check_unet, check_dit),
    before any training: a latent shard's fix is in the images' sizes, as a run gives it (the network's own check
    named the latents' side as an image size to pad to). Where the config's autoencoder is not on this machine
    (an island with its shard only), its downsampling is unknown: the network's own check is left to say it."""
    shape = (header_shapes(shard, SHARD_FIX).get("x") or [[]])[0][1:]
    if len(shape) != 3:
        return
    try:
        if cfg.latent.enabled:
            planned_config(cfg.latent, tuple(shape))
    except DDMError:
        return
    check_unet(cfg, list(shape))
    check_dit(cfg, list(shape))


def check_given(where: str, kwargs: dict, given: dict) -> None:
    """net.kwargs may not set what ddmkit passes a network (`given`: data_shape, a router's num_experts) to another
    value: it overrode ddmkit's, and the network, built for another shape or number of experts, failed in training
    with torch's error. The same value is taken (it changes nothing)."""
    source = {"data_shape": "the shape of the data", "num_experts": "partition.k"}
    for key, value in given.items():
        if key in kwargs and kwargs[key] != value:
            raise DDMError(f"{where}.kwargs.{key} = {kwargs[key]!r}: ddmkit passes {key} = {value!r} ({source[key]}) "
                           f"itself; remove it from {where}.kwargs")


def shape_words(cfg: RunConfig, shape: list[int]) -> str:
    """What a run's networks take, for an error: "data of shape S", or in a latent run "latents of shape S: the
    autoencoder's, of HxW images" (the images' size sets the latents')."""
    if not cfg.latent.enabled:
        return f"data of shape {tuple(shape)}"
    words = f"latents of shape {tuple(shape)}: the autoencoder's"
    if len(shape) != 3:
        return words
    try:
        scale = downsampling(planned_config(cfg.latent, tuple(shape)))
    except DDMError:  # a pretrained folder that cannot be read: its own check names it
        return words
    return f"{words}, of {shape[1] * scale}x{shape[2] * scale} images"


def check_networks(cfg: RunConfig, data_shape: tuple) -> None:
    """Build the run's expert, monolith and router networks on the meta device (no memory): an
    unknown arch or bad net kwargs is a DDMError before anything is written. The user's own
    classes (registered here, from cfg) are built on the CPU and called once on two rows, as
    ddmkit calls them: an error or an output of the wrong shape is a DDMError too."""
    register_user_networks(cfg)
    shape = list(data_shape)
    check_unet(cfg, shape)
    check_dit(cfg, shape)
    nets = {"expert.net": (cfg.expert.net, {"data_shape": shape}),
            "router.net": (cfg.router.net, {"data_shape": shape, "num_experts": cfg.partition.k})}
    for where, (net, given) in nets.items():
        check_given(where, net.kwargs, given)
        kwargs = {**given, **net.kwargs}
        try:  # on the meta device, as a model folder is checked before loading (ddmkit.registry)
            model = check_builds(net.arch, kwargs, where)
        except DDMError as e:
            hint = ("; ddmkit builds networks on the meta device to check model folders without allocating, so "
                    "compute sizes in __init__ with Python (math.prod), not tensors"
                    if is_user_network(net.arch) and builds_on_the_cpu(net.arch, kwargs) else "")
            raise DDMError(f"{e} ({shape_words(cfg, shape)}){hint}") from None
        empty = [name for name, p in model.named_parameters() if p.numel() == 0]
        if empty or next(model.parameters(), None) is None:
            what = f"layers with no weights ({', '.join(empty[:3])})" if empty else "no trainable parameters"
            fix = ("a network needs weights to train: check its __init__ and net.kwargs (see "
                   "docs/own-data.md#your-network)" if is_user_network(net.arch)
                   else "give it widths and depths of at least 1 (see docs/config.md)")
            raise DDMError(f"{where}: {net.arch!r} with kwargs {net.kwargs} builds a network with {what}; {fix}")
        if is_user_network(net.arch):
            check_output(build_seeded(net.arch, 0, **kwargs), f"{where}.arch = {net.arch!r}", shape,
                         given.get("num_experts"), int(net.kwargs.get("num_classes", 0)))


def stage_partition(cfg: RunConfig, run, log: Log = print) -> None:
    with run_lock(run):
        folder = RunFolder(run)
        if folder.manifest.exists():
            return
        train = load_split(run, "train")
        m = write_partition(plan_partition(cfg, train), train, folder.partition)
        log(f"partition: k={m['k']}, cluster sizes {m['counts']}")


def stage_experts(cfg: RunConfig, run, log: Log = print, backend: str = "inline", workers: int | None = None,
                  address: str | None = None) -> None:
    """Train the experts not yet written, with a launch backend (ddmkit.launch), or all at once in
    one stacked network when expert.concurrent is set; a job that left a checkpoint continues from it (a
    concurrent job stopped while moving its folders into place: whole, keeping the folders it moved).
    Holds every expert folder's lock too (a train-expert job into one of them is refused meanwhile)."""
    with run_lock(run), contextlib.ExitStack() as held:
        folder = RunFolder(run)
        shards = model_shards(run)
        for k in range(len(shards)):  # all of them: a killed run's locks are taken over and removed
            held.enter_context(expert_folder_lock(folder.expert(k)))
        jobs = [ExpertJob(k, shard, folder.expert(k)) for k, shard in enumerate(shards)
                if not (folder.expert(k) / "model.safetensors").exists()]
        if jobs:
            checked_model_shards(run)  # no expert trains on a shard changed since it was written
        start = time.perf_counter()
        if cfg.expert.concurrent:  # all in one stacked network on this device, each on its own shard
            outs = [folder.expert(k) for k in range(len(shards))]
            with job_threads(cfg.expert.train.threads):
                for job in concurrent_jobs(shards, outs, log):  # a job stopped while moving folders: whole again
                    train_experts_concurrently([shards[k] for k in job], cfg.expert, [outs[k] for k in job], log)
            how = f"in one job, expert.concurrent_networks = {cfg.expert.concurrent_networks!r}"
        else:
            for job in jobs:  # a checkpoint a job would refuse is named here, before any job starts
                if expert_resumes(job.shard, cfg.expert, job.out_dir):
                    log(f"expert {job.cluster}: continuing from {checkpoint_path(job.out_dir)}")
            run_jobs(jobs, cfg.expert, backend, workers, address, resume=True, log=log)
            how = f"{backend} backend"
        if jobs:
            log(f"experts: {len(jobs)} trained in {time.perf_counter() - start:.1f}s ({how})")


def _say_resumed(job: str, out_dir: Path, log: Log):
    """fit's resumed(): say that a job continues from the checkpoint a stopped run left, once it is accepted."""
    return lambda: log(f"{job}: continuing from {checkpoint_path(out_dir)}")


def stage_registry(cfg: RunConfig, run, log: Log = print) -> None:
    """Write RUN/registry.json for the model folders present."""
    with run_lock(run):
        reg = write_registry(run)
        log(f"registry: {len(reg['models'])} model folders hashed into {RunFolder(run).registry}")


def check_network_folder(folder: Path, role: str) -> None:
    """RUN/router or RUN/monolith before its job trains it (the job writes the folder whole, replacing what is
    there): it must be absent, empty, or a folder of that network cut short (its config.json, of this role,
    beside its other own files, NETWORK_FILES, but no weights). Anything else, a user's files, a file or a
    symbolic link where the folder goes, is a DDMError naming it, and is left as it is."""
    if folder.is_symlink():
        raise DDMError(f"{folder} is a symbolic link; ddmkit writes the {role} into a folder of its own there: remove "
                       f"the link (rm {shlex.quote(str(folder))}), or copy the folder it points to in its place")
    if folder.exists() and not folder.is_dir():
        raise DDMError(f"{folder} is a file; ddmkit writes the {role} into a folder there: move that file elsewhere")
    if not folder.is_dir():
        return
    foreign = foreign_files(folder, role, NETWORK_FILES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DDMError(f"{folder} holds files that are not the {role}'s ({shown}); ddmkit trains the {role} into "
                       "that folder, which it replaces: move them elsewhere, then run the command again")


def stage_monolith(cfg: RunConfig, run, log: Log = print) -> None:
    """Train the monolith unless it is written; a job that left a checkpoint continues from it. A monolith
    folder holding other files is refused (check_network_folder)."""
    with run_lock(run):
        folder = RunFolder(run)
        if not cfg.monolith.enabled or (folder.monolith / "model.safetensors").exists():
            return
        check_network_folder(folder.monolith, "monolith")
        start = time.perf_counter()
        shards = checked_model_shards(run)
        with job_threads(cfg.expert.train.threads):
            train_monolith(shards, cfg.expert, folder.monolith, cfg.monolith.match, resume=True,
                           resumed=_say_resumed("monolith", folder.monolith, log))
        t = cfg.expert.train
        log(f"monolith: trained in {time.perf_counter() - start:.1f}s (the compute of {len(shards)} experts of "
            f"{t.steps} steps x batch {t.batch_size}, expert.train)")


def stage_router(cfg: RunConfig, run, log: Log = print) -> None:
    """Train the router unless it is written; a job that left a checkpoint continues from it. A router folder
    holding other files is refused (check_network_folder)."""
    with run_lock(run):
        folder = RunFolder(run)
        if (folder.router / "model.safetensors").exists():
            return
        check_network_folder(folder.router, "router")
        start = time.perf_counter()
        with job_threads(cfg.router.train.threads):
            train_router(checked_model_shards(run), cfg.router, folder.router,
                         resumed=_say_resumed("router", folder.router, log))
        log(f"router: trained in {time.perf_counter() - start:.1f}s")


def stage_autoencoder(cfg: RunConfig, run, log: Log = print) -> None:
    """Latent runs: write RUN/autoencoder (the pretrained one, or one trained on the training images),
    then encode every shard into RUN/latents/ (each island's data through the same autoencoder).
    Nothing for other runs."""
    if not cfg.latent.enabled:
        return
    with run_lock(run):
        folder = RunFolder(run)
        if folder.is_latent:
            note_changed_pretrained(cfg, folder, log)
            return
        copied = (folder.autoencoder / AUTOENCODER_WEIGHTS).exists()
        # a copy that no latents were encoded with yet (a run stopped before) follows its source's changes
        stale = copied and cfg.latent.pretrained and changed_pretrained(cfg, folder)
        if not copied or stale:
            start = time.perf_counter()
            if cfg.latent.pretrained:
                with staging_dir(folder.autoencoder) as tmp:
                    model = load_autoencoder(cfg.latent.pretrained, run_copy=False)
                    model.save_pretrained(str(tmp), safe_serialization=True)
                    write_json(tmp / PRETRAINED_SOURCE, pretrained_files(cfg.latent.pretrained))
                again = f" again ({' and '.join(stale)} changed since an earlier command copied it, " \
                    "before any latents were encoded)" if stale else ""
                log(f"autoencoder: {cfg.latent.pretrained} copied into {folder.autoencoder}{again}")
            else:
                with job_threads(cfg.latent.train.threads):
                    train_autoencoder(load_split(run, "train").x, cfg.latent, folder.autoencoder,
                                      resumed=_say_resumed("autoencoder", folder.autoencoder, log))
                log(f"autoencoder: trained in {time.perf_counter() - start:.1f}s")
        encode_shards(cfg, run, log)


PRETRAINED_SOURCE = "pretrained_source.json"  # in RUN/autoencoder: the SHA-256 of the files it was copied from


def pretrained_files(pretrained: str | Path) -> dict:
    """The SHA-256 of a pretrained autoencoder folder's weights and config.json (its latent scale and shift)."""
    files = {name: Path(pretrained) / name for name in (AUTOENCODER_WEIGHTS, "config.json")}
    return {name: sha256_file(path) for name, path in files.items() if path.is_file()}


def changed_pretrained(cfg: RunConfig, folder: RunFolder) -> list[str]:
    """The files of latent.pretrained (weights, config.json) that are no longer those the run's copy
    (RUN/autoencoder) was made from. The copy is saved anew (other bytes than a half-precision or metadata-less
    source), so the source's own hashes are compared."""
    if not cfg.latent.pretrained:
        return []
    record = folder.autoencoder / PRETRAINED_SOURCE
    if record.is_file():
        made, now = read_json(record), pretrained_files(cfg.latent.pretrained)
        changed = [name for name in now if made.get(name) not in (None, now[name])]
    else:  # a run of an earlier ddmkit: its copy's weights
        source, copy = Path(cfg.latent.pretrained) / AUTOENCODER_WEIGHTS, folder.autoencoder / AUTOENCODER_WEIGHTS
        changed = [AUTOENCODER_WEIGHTS] if source.is_file() and copy.is_file() and \
            sha256_file(source) != sha256_file(copy) else []
    return changed


def note_changed_pretrained(cfg: RunConfig, folder: RunFolder, log: Log) -> None:
    """A note when latent.pretrained's weights or config.json are no longer those the run's copy was made from
    (RUN/autoencoder, whose latents its networks learnt): the run keeps its copy."""
    changed = changed_pretrained(cfg, folder)
    if changed:
        names = " and ".join(str(Path(cfg.latent.pretrained) / name) for name in changed)
        log(f"note: {names} changed since the run copied the autoencoder into {folder.autoencoder}, which encoded "
            f"its latents; the run keeps its copy. To use the new autoencoder, make the run again in a new folder "
            f"(`--out NEW_RUN`)")


def encode_shards(cfg: RunConfig, run, log: Log = print) -> None:
    """Encode each shard with the run's autoencoder into RUN/latents/ (one staged folder), with
    latents.json: the latent shape, the autoencoder's SHA-256, each latent shard's SHA-256."""
    folder = RunFolder(run)
    shards = shard_files(run)
    channels = read_data_info(folder)["data_shape"][0]
    device = field_device("latent.train.device", cfg.latent.train.device)
    codec = load_codec(folder.autoencoder, channels, cfg.latent.encode_batch, device, run_copy=True)
    start = time.perf_counter()
    moments = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares of every latent number
    with staging_dir(folder.latents) as tmp:
        entries = []
        for c, path in enumerate(shards):
            x, labels, meta = read_shard(path)
            tensors = {"x": codec.encode(x)}
            moments += latent_moments(tensors["x"])
            if labels is not None:
                tensors["labels"] = labels
            name = folder.latent_shard(c).name
            save_tensors(tmp / name, tensors, metadata={**meta, "pixel_shard_sha256": sha256_file(path)})
            entries.append({"cluster": c, "path": name, "count": len(x), "sha256": sha256_file(tmp / name)})
        write_json(tmp / folder.latent_info.name, {
            "latent_shape": list(tensors["x"].shape[1:]), "data_shape": list(x.shape[1:]),
            "source": cfg.latent.pretrained or "trained", "shards": entries,
            "autoencoder_sha256": sha256_file(folder.autoencoder / AUTOENCODER_WEIGHTS),
            "scaling_factor": codec.scale, "shift_factor": codec.shift})
    mean, std = mean_std(moments)
    log(f"latents: {len(shards)} shards encoded to shape {tuple(tensors['x'].shape[1:])} in "
        f"{time.perf_counter() - start:.1f}s; their mean {mean:.3g}, std {std:.3g}")
    for note in latent_scale_notes(cfg, codec, mean, std):
        log(f"note: {note}")


def latent_moments(z: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of every number of the latents z, in float64: summed over shards,
    mean_std gives their mean and std."""
    z = z.double()
    return torch.stack([torch.tensor(z.numel(), dtype=torch.float64), z.sum(), z.square().sum()])


def mean_std(moments: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the numbers whose latent_moments were summed."""
    mean = float(moments[1] / moments[0])
    return mean, float((moments[2] / moments[0] - mean ** 2).clamp(min=0).sqrt())


def scale_fix(pretrained: str | None) -> str:
    """How to set the scaling_factor latent_scale_notes gives: in the folder, or, for the autoencoder of another
    run (RUN/autoencoder), in a copy of it, since that run refuses its autoencoder rescaled after its latents."""
    run = enclosing_run(Path(pretrained).expanduser()) if pretrained else None
    if run is None:
        return "set it and make the run again in a new folder"
    return (f"set it in a copy of {pretrained} (not in place: the run {run} encoded its latents at the scale it has "
            "now, and refuses it rescaled), give the copy as latent.pretrained and make the run again in a new folder")


def latent_scale_notes(cfg: RunConfig, codec, mean: float, std: float) -> list[str]:
    """What to say about the latents' scale: the networks learn best on data of unit variance (the flow's
    noise has it), which a pretrained autoencoder's scaling_factor is meant to give; and the normalisation
    fields of a config.json that ddmkit does not apply (it applies shift_factor and scaling_factor). Constant
    latents (std 0, or rounding's few digits of |mean|) get no scaling_factor, which would be infinite: they
    say that every image was encoded to the same numbers."""
    notes = []
    if std <= 1e-6 * max(1.0, abs(mean)):
        fix = (f"check the autoencoder {cfg.latent.pretrained} (damaged or untrained weights?), or leave "
               "latent.pretrained out to let ddmkit train one" if cfg.latent.pretrained else
               "the autoencoder ddmkit trained collapsed: try other [latent.train] settings (more steps, a lower lr)")
        notes.append(f"the latents are constant (mean {mean:.4g}, std {std:.3g}): every image was encoded to the same "
                     "numbers, so the experts can learn nothing of the images, and no scaling_factor gives them std "
                     f"1; {fix}, then make the run again in a new folder")
    elif not 1 / 3 <= std <= 3:
        where = f" in {Path(cfg.latent.pretrained) / 'config.json'}" if cfg.latent.pretrained else ""
        notes.append(f"the latents' std is {std:.3g}, far from 1 (the noise's): the networks learn best on latents "
                     f"of unit variance. A scaling_factor of {codec.scale / std:.4g}{where} (now {codec.scale:.4g}) "
                     f"would give them std 1; {scale_fix(cfg.latent.pretrained)}")
    unused = [name for name in ("latents_mean", "latents_std") if codec.model.config.get(name) is not None]
    if unused:
        notes.append(f"the autoencoder's config.json sets {' and '.join(unused)}, which ddmkit does not apply: it "
                     "normalises latents by shift_factor and scaling_factor alone")
    return notes


TRAINING_STAGES = (stage_data, stage_partition, stage_autoencoder, stage_experts, stage_monolith, stage_router,
                   stage_registry)
