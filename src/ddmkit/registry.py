"""The expert registry and the checks on untrusted run folders.

A run folder assembled from pieces trained elsewhere is untrusted input. This
module is where it is checked, before and after loading:

    write_registry(run)        RUN/registry.json: every model folder with the SHA-256
                               of its weights and config, the shard it was trained on,
                               ddmkit version and time convention
    verify_registry(run)       recompute and compare; a mismatch is a DDMError naming
                               the file and the field
    safe_join(run, rel)        a manifest path, refused if it leaves the run folder
    load_partition_checked     the partition manifest validated by schema (ddmkit.data.partition),
                               its tensors checked, shard paths safe
    load_data_file(run, path)  a split (or the exact truth) of RUN/data/, its SHA-256 checked
                               against the one data.json recorded when the data were written
    load_model(folder)         config.json validated by schema, the network built on the
                               meta device and compared with the safetensors header (names,
                               shapes, dtypes) before any real allocation, then loaded and
                               its weights checked to be finite

Weights are only ever read as safetensors and metadata only as JSON.
"""
from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from torch.overrides import TorchFunctionMode

from ddmkit.conventions import TIME_CONVENTION, __version__, check_time_convention
from ddmkit.config import validate
from ddmkit.data.partition import (SHARD_FIX, PartitionManifest, ShardEntry, check_given_shard, check_manifest,
                                   partition_tensors, shard_cluster)
from ddmkit.errors import DDMError, with_fix
from ddmkit.io import check_finite_tensors, load_tensors, read_json, read_metadata, sha256_file, write_json
from ddmkit.layout import RunFolder, check_run_exists, enclosing_run, is_run_folder, remake_partition
from ddmkit.nets import build_model, check_identity, from_pretrained
from ddmkit.nets.folders import on_meta
from ddmkit.nets.user import is_user_network
from ddmkit.routing.stats_router import PUBLISHED_STATISTICS

REGISTRY = "registry.json"
FORMAT = "ddmkit-registry-1"


# ----- paths -------------------------------------------------------------
def safe_join(root: str | Path, rel: Any, what: str = "path") -> Path:
    """root / rel, for a relative POSIX path that stays inside root (no '..',
    no absolute path, no symbolic link leading out, none that leads nowhere: a loop or a dangling link)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise DDMError(f"{what}: {rel!r} is not a relative path inside the run folder")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise DDMError(f"{what}: {rel!r} leaves the run folder; the paths a run folder records must be relative "
                       "and inside it")
    root = Path(root)
    full = root.joinpath(*p.parts)
    inside = [full, *full.parents][:len(p.parts)]  # full and its folders up to root, not above
    broken = next((q for q in reversed(inside) if q.is_symlink() and not q.exists()), None)
    if broken is not None:  # a loop (Path.resolve raises RuntimeError on one) or a link to nothing
        raise DDMError(f"{what}: {broken} is a symbolic link that leads nowhere (to itself, in a loop, or to a path "
                       f"that does not exist); remove it (rm {shlex.quote(str(broken))}) and put there the file or "
                       "folder it stood for")
    try:
        full.resolve().relative_to(root.resolve())
    except ValueError:
        link = next((q for q in inside if q.is_symlink()), None)
        how = f"{link} is a symbolic link to {link.resolve()}: copy that folder in instead" if link else \
            "a symbolic link?"
        raise DDMError(f"{what}: {rel!r} resolves outside the run folder ({how})") from None
    return full


# ----- schemas -------------------------------------------------------------
class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ModelKwargs(_Loose):
    """The network's arguments in a model folder's config.json; the one that loading reads itself is typed."""
    num_classes: StrictInt = Field(0, ge=0, le=1_000_000)  # class-conditional networks: how many classes


class ModelConfig(_Loose):
    """A model folder's config.json: the fields ddmkit reads are typed (strictly: "3" is no cluster), the others
    kept as written. data_shape is None for text models; velocity networks and routers need it (check_shape)."""
    arch: StrictStr
    kwargs: ModelKwargs
    data_shape: list[StrictInt] | None = None
    time_convention: str = TIME_CONVENTION
    ddmkit_version: str | None = None
    role: StrictStr | None = None
    cluster: StrictInt | None = Field(None, ge=0, le=100_000)  # an expert's
    k: StrictInt | None = Field(None, ge=0, le=100_000)  # the clusters of its partition (a router routes over k)
    shard_sha256: StrictStr | None = None  # an expert's shard
    shards_sha256: list[StrictStr] | None = None  # the router's and the monolith's shards, in cluster order
    prediction: StrictStr | None = None
    path: dict[str, Any] | None = None  # a network of another probability path (ddmkit.ddm.load.path_output)
    train: dict[str, Any] | None = None  # the [train] table it was trained with


class RegistryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: Literal["expert", "router", "monolith"]
    path: str
    cluster: StrictInt | None = Field(None, ge=0, le=100_000)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    shard_sha256: str | None = None
    statistics_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # an expert's published statistics


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["ddmkit-registry-1"]
    ddmkit_version: str
    time_convention: str | None  # None: a text run (byte models: no Gaussian path)
    k: int = Field(ge=1, le=100_000)
    data_hash: str | None = None
    partition_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    latents_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # latent runs: latents/latents.json
    models: list[RegistryEntry]

    @model_validator(mode="after")
    def _each_model_once(self):
        """Each model folder, and each expert's cluster, listed once."""
        places = [e.path for e in self.models]
        clusters = [e.cluster for e in self.models if e.role == "expert"]
        twice = next((p for p in places if places.count(p) > 1), None) or \
            next((f"the expert of cluster {c}" for c in clusters if clusters.count(c) > 1), None)
        if twice is not None:
            raise ValueError(f"models: {twice} is listed twice (or more); run `ddmkit register RUN` to record the "
                             "run's model folders again")
        return self


class LatentShard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cluster: int = Field(ge=0, le=100_000)
    path: str = Field(min_length=1, max_length=1000)
    count: int = Field(ge=1, le=10**12)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class LatentInfo(BaseModel):
    """latents/latents.json of a latent run: the autoencoder's weights and the encoded shards."""
    model_config = ConfigDict(extra="forbid")
    latent_shape: list[int] = Field(min_length=3, max_length=3)
    data_shape: list[int] = Field(min_length=3, max_length=3)
    source: str
    autoencoder_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scaling_factor: float
    shift_factor: float
    shards: list[LatentShard]


def _validated(schema: type[BaseModel], data: Any, source: str):
    return validate(schema, data, str(source), "file")


# ----- partition -------------------------------------------------------------
class _StrictShard(ShardEntry):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class _StrictManifest(PartitionManifest):
    """The partition manifest's schema in pydantic's strict mode: the manifest is used as read, so a k of "8"
    must be refused, not taken for 8 by the schema and then compared as a string."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)
    shards: list[_StrictShard]


def read_manifest(folder: str | Path) -> dict:
    """RUN/partition/manifest.json (folder: RUN/partition) validated, strictly, and checked for consistency
    (ddmkit.data.partition.check_manifest), as read; its tensors are not read (load_partition_checked)."""
    source = Path(folder) / "manifest.json"
    try:
        raw = read_json(source)
        validate(_StrictManifest, raw, str(source), "partition manifest")
        return check_manifest(raw, source)
    except DDMError as e:
        run = Path(folder).parent
        if not is_run_folder(run):
            raise
        raise DDMError(f"{e}\n  in the run {run}: copy manifest.json back from another copy of the run, or "
                       f"{remake_partition(RunFolder(run))}") from None


def load_partition_checked(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a partition folder, the manifest read once and validated (read_manifest), its tensors
    checked (partition_tensors), and every shard path checked to stay inside the folder."""
    folder = Path(folder)
    source = folder / "manifest.json"
    if not source.exists():
        above = enclosing_run(folder.parent)  # RUN/partition given as the run: RUN/partition/partition looked for
        if above is not None:
            raise DDMError(f"{folder.parent} is a folder inside the run {above}; give the run folder itself: {above}")
        check_run_exists(folder.parent)
        run = RunFolder(folder.parent)
        if folder.is_dir() and any(folder.iterdir()) and run.config.is_file():  # a copy of the run cut short
            raise DDMError(f"{source} is missing, though {folder} holds other files of the partition (a copy cut "
                           f"short?); copy the run's partition/ folder back whole, or {remake_partition(run)}")
        raise DDMError(f"{folder.parent}: no partition yet (partition/manifest.json); run `ddmkit partition "
                       f"--config CONFIG --out {folder.parent}` first")
    manifest = read_manifest(folder)  # strictly, before the partition's tensors are checked against it
    tensors = partition_tensors(folder, manifest)
    for s in manifest["shards"]:
        safe_join(folder, s["path"], f"{source}: shards[{s['cluster']}].path")
    return manifest, tensors


def shard_files(run: str | Path) -> list[Path]:
    """The shard files of a run, in cluster order, paths checked."""
    folder = Path(run) / "partition"
    manifest, _ = load_partition_checked(folder)
    by_cluster = sorted(manifest["shards"], key=lambda s: s["cluster"])
    return [safe_join(folder, s["path"], "shard path") for s in by_cluster]


AUTOENCODER_WEIGHTS = "diffusion_pytorch_model.safetensors"


def check_autoencoder_files(folder: RunFolder) -> None:
    """RUN/autoencoder's weights and config.json are there, else a DDMError with the fix that works: only that
    autoencoder decodes the latents the run's networks learnt (no command makes it again in place)."""
    missing = [str(path) for path in (folder.autoencoder / AUTOENCODER_WEIGHTS, folder.autoencoder / "config.json")
               if not path.is_file()]
    if missing:
        raise DDMError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: the run's "
                       f"autoencoder, whose latents its networks learnt ({folder.latent_info} records its SHA-256); "
                       f"copy the run's autoencoder/ folder back whole from another copy of the run, or make the run "
                       "again in a new folder (`ddmkit run CONFIG --out NEW_RUN`)")


def latent_info(run: str | Path) -> dict:
    """latents/latents.json of a latent run, checked by schema, one shard per cluster of the partition,
    and against the autoencoder's weights (SHA-256) and its config's latent scale and shift."""
    folder = RunFolder(run)
    source = folder.latent_info
    info = _validated(LatentInfo, read_json(source), str(source)).model_dump()
    manifest, _ = load_partition_checked(folder.partition)
    if sorted(s["cluster"] for s in info["shards"]) != list(range(manifest["k"])):
        raise DDMError(f"{source}: lists {len(info['shards'])} latent shards for a partition of k = {manifest['k']}; "
                       f"remove {folder.latents} and encode the shards again with `ddmkit partition --config CONFIG "
                       f"--out {folder.root}`")
    weights = folder.autoencoder / AUTOENCODER_WEIGHTS
    check_autoencoder_files(folder)
    if sha256_file(weights) != info["autoencoder_sha256"]:
        raise DDMError(f"{weights}: SHA-256 differs from {source}; the autoencoder was changed after the shards were "
                       f"encoded, and the run's networks learnt the latents of the one recorded there. Put that "
                       f"autoencoder back into {folder.autoencoder}, or make the run again with this one in a new "
                       "folder (`ddmkit run CONFIG --out NEW_RUN`)")
    settings = read_json(folder.autoencoder / "config.json")
    settings = settings if isinstance(settings, dict) else {}
    for name, default in (("scaling_factor", info["scaling_factor"]), ("shift_factor", 0.0)):
        value = settings.get(name, default)
        value = default if value is None else value  # diffusers writes shift_factor null: no shift
        if value != info[name]:
            raise DDMError(f"{folder.autoencoder / 'config.json'}: {name} = {value!r}, but the shards were encoded "
                           f"with {info[name]!r} ({source}); decoded samples would be scaled wrongly. Set it back to "
                           f"{info[name]!r}, or make the run again in a new folder (`ddmkit run CONFIG --out NEW_RUN`)")
    return info


def model_shards(run: str | Path) -> list[Path]:
    """The shard files the networks train on, in cluster order: the partition's shards, or in a latent
    run their latents (latents/cluster_XX.safetensors)."""
    folder = RunFolder(run)
    if not folder.is_latent:
        return shard_files(run)
    shards = sorted(latent_info(run)["shards"], key=lambda s: s["cluster"])
    return [safe_join(folder.latents, s["path"], "latent shard path") for s in shards]


def check_shard_space(shard: str | Path, latent: bool) -> None:
    """A shard of the space the config trains in: a latent shard (its metadata names the pixel shard it
    encodes) for a config with [latent] enabled, a partition shard otherwise, naming its cluster; else a DDMError
    saying which (or, for a latent config, that a shard without metadata does not say which it holds)."""
    path = Path(shard)
    if not path.exists():
        raise DDMError(f"shard {path} does not exist; give a file of RUN/partition/shards/ (or RUN/latents/ for a "
                       "latent run), e.g. RUN/partition/shards/cluster_00.safetensors")
    check_given_shard(path)  # a folder, a config, a manifest, no .safetensors: shown the command's right form
    x = header_shapes(path, SHARD_FIX).get("x")
    if x is not None and len(x[0]) == 1 and x[1] == "U8":  # ddmkit.discrete's shards: one byte stream
        raise DDMError(f"{path} is a text shard (a stream of bytes), but the config trains continuous experts: give "
                       "the run's text config, --config RUN/config.json")
    meta = read_metadata(path) if path.is_file() else {}
    is_latent = "pixel_shard_sha256" in meta
    if latent and path.is_file() and not meta:  # re-saved without it: images or latents, it does not say
        raise DDMError(f"{path} has no ddmkit metadata, so it does not say whether it holds images or latents (a "
                       "latent shard's names the image shard it encodes, pixel_shard_sha256), and the config trains "
                       "in latent space: re-save it with the original file's metadata (its 'ddmkit' key), or write "
                       "the run's latent shards again (remove RUN/latents, then `ddmkit partition --config "
                       "RUN/config.json --out RUN`) and give RUN/latents/cluster_XX.safetensors")
    if latent and path.is_file() and not is_latent:
        raise DDMError(f"{path} is a shard of images, but the config trains in latent space ([latent] enabled): give "
                       "the run's latent shard, RUN/latents/cluster_XX.safetensors")
    if is_latent and not latent:
        raise DDMError(f"{path} holds latents, but the config has no [latent] enabled: give the run's config "
                       "(--config RUN/config.json)")
    if path.is_file():
        shard_cluster(path, meta)  # refused here too, before a job of several processes starts


def checked_model_shards(run: str | Path, clusters: list[int] | None = None) -> list[Path]:
    """model_shards, each file's SHA-256 checked against the one recorded when it was written (the
    partition's manifest, or a latent run's latents.json): a shard changed or swapped since is a DDMError
    naming it, before anything trains or routes on it. clusters: check (and need) only these shards."""
    folder = RunFolder(run)
    manifest, _ = load_partition_checked(folder.partition)
    recorded = partition_shard_hashes(folder.root, manifest)
    source = folder.latent_info if folder.is_latent else folder.manifest
    paths = model_shards(run)
    for cluster, path in enumerate(paths):
        if clusters is not None and cluster not in clusters:
            continue
        if not path.exists():
            raise DDMError(f"{path} is missing (the shard of cluster {cluster}); copy it back from another copy of "
                           f"the run, or {remake_partition(folder)}")
        if sha256_file(path) != recorded.get(cluster):
            again = "encode the shards again in a new run folder" if folder.is_latent else remake_partition(folder)
            raise DDMError(f"{path}: SHA-256 differs from the one {source} records for cluster {cluster}; the shard "
                           f"was changed or replaced after it was written. Copy the original back, or {again}")
    return paths


def model_data_shape(run: str | Path) -> tuple[int, ...]:
    """The shape of one sample as the networks see it: the data's, or in a latent run the latents'."""
    folder = RunFolder(run)
    if folder.is_latent:
        return tuple(latent_info(run)["latent_shape"])
    manifest, _ = load_partition_checked(folder.partition)
    return tuple(manifest["data_shape"])


def checked_heldout_text(folder: RunFolder, manifest: dict) -> None:
    """A text run's held-out shards (its manifest's test_shards, partition/test/), each checked against the
    SHA-256 the manifest records, as its evaluation checks them; other runs hold their test data in RUN/data/."""
    for s in manifest.get("test_shards") or []:
        path = safe_join(folder.partition, s["path"], f"{folder.manifest}: test_shards[{s['cluster']}].path")
        if not path.is_file():
            raise DDMError(f"{path} is missing (the held-out text of cluster {s['cluster']}); copy it back from "
                           f"another copy of the run, or {remake_partition(folder)}")
        if sha256_file(path) != s["sha256"]:
            raise DDMError(f"{path}: SHA-256 differs from the one {folder.manifest} records; the shard was changed "
                           f"or replaced after it was written. Copy the original back, or {remake_partition(folder)}")


# ----- the run's data ------------------------------------------------------------
def data_fix(folder: RunFolder) -> str:
    """How a lost, damaged or changed file of RUN/data/ is made again: the fix its error names."""
    if folder.grow.exists():  # grown: the config alone makes the data the run had before add-expert
        return f"copy the run's data/ folder back whole ({folder.grow.name}: add-expert changed the data)"
    return (f"remove it, and `ddmkit partition --out {folder.root} --config {folder.config}` makes it again (the "
            "run's own config makes the same data), or copy the run's data/ folder back")


def data_sha256(folder: str | Path) -> dict[str, str]:
    """The SHA-256 of every tensor file of a data folder (the splits and, for a mixture, the exact truth), by file
    name: what RUN/data/data.json records when the data are written (check_data_file checks them)."""
    return {path.name: sha256_file(path) for path in sorted(Path(folder).glob("*.safetensors"))}


def recorded_data_sha256(folder: RunFolder):
    """What RUN/data/data.json records under "sha256" (by file name): None where it records none (an earlier
    ddmkit's) or there is no data.json (a data folder made by hand; the commands that need it name it)."""
    info = read_json(folder.data_info, data_fix(folder)) if folder.data_info.exists() else {}
    return info.get("sha256") if isinstance(info, dict) else None


def check_data_sha256(folder: RunFolder, path: Path, digest: str, recorded) -> None:
    """A file of RUN/data/ whose SHA-256 is `digest` has the one data.json records (`recorded`, not None), else a
    DDMError naming it and data_fix."""
    want = recorded.get(path.name) if isinstance(recorded, dict) else None
    if digest != want:
        none = " (which records none for it)" if want is None else ""
        raise DDMError(f"{path}: SHA-256 differs from the one {folder.data_info} records{none}; the file was changed "
                       "or replaced after the run's data were written (another split copied over it?), so what is "
                       f"measured on it would not be this run's data. {data_fix(folder).capitalize()}")


def check_data_file(run: str | Path, path: str | Path) -> None:
    """A file of RUN/data/ (a split, the exact truth) has the SHA-256 that data.json recorded when the data were
    written, else a DDMError naming it and data_fix: a test split swapped for another file of the same shape
    would be scored against silently. Where data.json records none (recorded_data_sha256) there is nothing to
    check."""
    folder, path = RunFolder(run), Path(path)
    recorded = recorded_data_sha256(folder)
    if recorded is not None:
        check_data_sha256(folder, path, sha256_file(path), recorded)


def load_data_file(run: str | Path, path: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file of RUN/data/ (only `keys`, when given), read, then checked by check_data_file (a
    damaged file is named as corrupt, a swapped one as changed; both with data_fix)."""
    tensors = load_tensors(path, keys, fix=data_fix(RunFolder(run)))
    check_data_file(run, path)
    return tensors


def checked_data_files(run: str | Path) -> None:
    """Every file of RUN/data/ that is there checked as check_data_file checks it, data.json read once (a text run
    has none)."""
    folder = RunFolder(run)
    paths = sorted(folder.data.glob("*.safetensors"))
    recorded = recorded_data_sha256(folder) if paths else None
    if recorded is None:
        return
    for path in paths:
        check_data_sha256(folder, path, sha256_file(path), recorded)


# ----- model folders -----------------------------------------------------------
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def header_shapes(path: Path, fix: str = "re-train or re-copy it",
                  missing: str = "train or copy it again") -> dict[str, tuple[list[int], str]]:
    """Tensor names, shapes and dtypes ("F32", ...) from a safetensors header (no tensor is read); a corrupt
    file is a DDMError that ends with `fix`, a missing one with `missing`."""
    from safetensors import safe_open

    if not path.is_file():
        raise DDMError(with_fix(f"{path} is missing (or not a file)", missing))
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:
        raise DDMError(with_fix(f"{path} is corrupt or not a safetensors file ({str(e)[:200]})", fix)) from e


class _Budget(TorchFunctionMode):
    """Stops building a network that makes far more tensors than the weights file holds (a config.json
    asking for a depth of a billion would otherwise build for ever, even on the meta device)."""

    def __init__(self, limit: int, folder: Path, fix: str | None = None):
        super().__init__()
        self.left, self.folder, self.fix = limit, folder, fix or "re-copy the folder"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.left -= 1
        if self.left < 0:
            raise DDMError(with_fix(f"{self.folder / 'config.json'}: its network is far larger than model.safetensors "
                                    "(the config asks for more layers or tensors than the weights hold)", self.fix))
        return func(*args, **(kwargs or {}))


# a damaged model folder's fix (re-training into the folder as it is keeps its weights)
REMAKE_FOLDER = "copy the whole model folder again, or remove the folder and train it again"


def model_config(folder: str | Path, fix: str | None = None) -> dict:
    """A model folder's config.json as every reader takes it: checked by ModelConfig (a DDMError naming the file
    and the field, and `fix` where given), returned as written. Read it through here, never with read_json alone."""
    path = Path(folder) / "config.json"
    config = read_json(path, fix or REMAKE_FOLDER)
    try:
        _validated(ModelConfig, config, str(path))
    except DDMError as e:
        if fix is None:
            raise
        raise DDMError(with_fix(str(e), fix)) from None
    return config


def check_model_folder(folder: str | Path, fix: str | None = None) -> dict:
    """Validate config.json and check the network it describes has exactly
    the tensors of model.safetensors, of the same shapes and dtypes (built on
    the meta device: no memory). Each DDMError ends with `fix` where given (a student's --force, in distill),
    else with the folder's own fix (copy or train it again)."""
    folder = Path(folder)

    def fixed(wrong: str, own: str | None = None) -> DDMError:
        """`wrong` with `fix`, or else its own fix (none: `wrong` alone)."""
        return DDMError(with_fix(wrong, fix or own) if fix or own else wrong)

    if not folder.is_dir():
        raise fixed(f"{folder} is not a model folder (config.json + model.safetensors)", "train or copy it again")
    config = model_config(folder, fix)
    check_time_convention(config.get("time_convention", TIME_CONVENTION), folder, fix)
    header = header_shapes(folder / "model.safetensors", fix or REMAKE_FOLDER, fix or "train or copy it again")
    check_identity(folder, config, fix)
    arch, kwargs = config["arch"], config["kwargs"]
    if config.get("data_shape") is not None and "data_shape" in kwargs and kwargs["data_shape"] != config["data_shape"]:
        # e.g. an MLP's [1, 2] where the folder says [2]: the same weights, but another network's inputs
        raise fixed(f"{folder / 'config.json'}: kwargs.data_shape {kwargs['data_shape']!r} differs from its "
                    f"data_shape {config['data_shape']!r}", "copy the whole model folder again, or train it again")
    budget = _Budget(20 * len(header) + 200, folder, fix)
    try:
        with on_meta(), budget:
            model = build_model(arch, **kwargs)
    except DDMError as e:  # bad arguments, an unregistered class of the user's: named with the file
        if budget.left < 0:  # the budget's own message, with its fix
            raise
        raise fixed(str(e) if str(folder) in str(e) else f"{folder / 'config.json'}: {e}") from None
    except Exception as e:  # a constructor rejecting odd values
        raise fixed(f"{folder / 'config.json'}: kwargs {kwargs} do not build a {arch!r} ({e})") from None
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    shapes = {k: v[0] for k, v in header.items()}
    if expected != shapes:
        diff = sorted((set(expected) ^ set(shapes)) | {k for k in expected if shapes.get(k) != expected[k]})
        both = [k for k in diff if k in expected and k in shapes]
        first = f"; {both[0]}: {shapes[both[0]]} in the weights, {expected[both[0]]} as config.json builds it" \
            if both else ""
        changed = f", or the class {arch!r} has changed since they were trained" if is_user_network(arch) else ""
        raise fixed(f"{folder / 'model.safetensors'} does not match its config.json (tensors {diff[:5]} differ"
                    f"{first}): config.json was edited (e.g. its kwargs) or the weights are another network's"
                    f"{changed}", REMAKE_FOLDER)
    dtypes = {k: DTYPES.get(v.dtype, str(v.dtype)) for k, v in model.state_dict().items()}
    other = sorted(k for k in dtypes if header[k][1] != dtypes[k])
    if other:
        k = other[0]
        wrong = (f"{folder / 'model.safetensors'}: tensor {k!r} is {header[k][1]} but the network's is "
                 f"{dtypes[k]} ({len(other)} tensors differ); ddmkit loads weights of the network's own dtype only")
        raise fixed(wrong) if fix else DDMError(f"{wrong}: re-train or re-export them")
    return config


def load_model(folder: str | Path, device: str | torch.device = "cpu"):
    """(model, config) of a model folder, checked by check_model_folder first."""
    check_model_folder(folder)
    return from_pretrained(folder, device)


# ----- the registry --------------------------------------------------------------
def model_places(run: Path, k: int) -> list[tuple[str, str, int | None]]:
    """(path in the run, role, cluster) of every place a model folder of a run of k clusters can be:
    experts/expert_XX, router, monolith. Each is checked by safe_join, so a symbolic link that leads nowhere
    (or out of the run) in the place of one is a DDMError naming it, not taken for a folder that is absent."""
    places = [(f"experts/expert_{c:02d}", "expert", c) for c in range(k)]
    places += [(name, name, None) for name in ("router", "monolith")]
    for rel, _, _ in places:
        safe_join(run, rel)
    return places


def _model_folders(run: Path, k: int) -> list[tuple[str, str, int | None]]:
    """(name, role, cluster) of every model folder present in a run."""
    return [place for place in model_places(run, k) if (run / place[0] / "model.safetensors").exists()]


def registry_entry(run: Path, rel: str, role: str, cluster: int | None) -> dict:
    folder = safe_join(run, rel)
    config = check_model_folder(folder)
    weights = folder / "model.safetensors"
    check_finite_tensors(load_tensors(weights), weights)  # loading refuses NaN weights: so does registering
    statistics = folder / PUBLISHED_STATISTICS  # an expert's island statistics (ddmkit.routing.stats_router)
    return {"name": rel.rsplit("/", 1)[-1], "role": role, "path": rel, "cluster": cluster,
            "weights_sha256": sha256_file(weights),
            "config_sha256": sha256_file(folder / "config.json"), "shard_sha256": config.get("shard_sha256"),
            "statistics_sha256": sha256_file(statistics) if statistics.is_file() else None}


def partition_shard_hashes(run: Path, manifest: dict) -> dict[int, str]:
    """cluster -> the SHA-256 of the shard its expert trains on: the partition's shard, or in a latent run
    its encoded latents."""
    shards = latent_info(run)["shards"] if RunFolder(run).is_latent else manifest["shards"]
    return {s["cluster"]: s["sha256"] for s in shards}


def check_shard(path: str, cluster, trained_on, shard_hash: dict) -> None:
    """An expert trained on the shard its cluster has in this partition (shard_hash: cluster -> SHA-256),
    else a DDMError: it is another cluster's expert, or belongs to another partition."""
    if cluster is not None and trained_on == shard_hash.get(cluster):
        return
    if cluster not in shard_hash:
        raise DDMError(f"{path}: cluster {cluster!r} is not a cluster of this partition (0 .. {len(shard_hash) - 1})")
    owner = [c for c, sha in shard_hash.items() if sha == trained_on]
    if owner and Path(path).name == f"expert_{owner[0]:02d}":  # in its own slot: the record of it is wrong
        raise DDMError(f"{path}: recorded as the expert of cluster {cluster}, but it sits in the slot of cluster "
                       f"{owner[0]}, whose shard it was trained on: the record is wrong (an edited registry.json?); "
                       "copy registry.json back from another copy of the run, or delete it and run `ddmkit register "
                       "RUN`")
    if owner:
        raise DDMError(f"{path}: trained on the shard of cluster {owner[0]} of this partition, not of cluster "
                       f"{cluster}: it is the expert of cluster {owner[0]} (experts/expert_{owner[0]:02d}); move it "
                       f"there, and give cluster {cluster} its own expert")
    raise DDMError(f"{path}: trained on shard {str(trained_on)[:12]}... but cluster {cluster} of this "
                   f"partition is shard {str(shard_hash.get(cluster))[:12]}...; it belongs to another partition: "
                   "copy the expert trained on this partition's shard, or remove the folder and `ddmkit launch RUN` "
                   "trains it again")


def check_shard_for_slot(shard: str | Path, out: str | Path) -> None:
    """Where `out` is an expert slot of a run (RUN/experts/expert_XX), `shard` must be that run's shard of
    cluster XX (its SHA-256 the one partition_shard_hashes records, its metadata's cluster XX), else a DDMError
    naming both and the shard to give: register, launch and sample refuse such an expert only after its training.
    Any other `out` is not checked."""
    run, slot = enclosing_run(out), re.fullmatch(r"expert_(\d+)", Path(out).name)
    if run is None or slot is None or Path(out).resolve().parent != run / "experts":
        return
    cluster, shard_hash = int(slot.group(1)), partition_shard_hashes(run, read_manifest(run / "partition"))
    if cluster not in shard_hash:
        raise DDMError(f"--out {out} is the slot of cluster {cluster}, but the run {run} has clusters 0 .. "
                       f"{len(shard_hash) - 1}; give the folder of one of them, or another --out outside the run")
    digest, given = sha256_file(shard), read_metadata(shard).get("cluster")
    if digest == shard_hash[cluster] and str(given) == str(cluster):
        return
    expected = model_shards(run)[cluster]
    if Path(shard).resolve() == expected.resolve():  # the run's own shard, changed since the partition was made
        raise DDMError(f"{shard}: SHA-256 differs from the one the run {run} records for cluster {cluster} (changed "
                       "since the partition was made?); copy the shard back from another copy of the run, or make "
                       "the partition again")
    owner = [c for c, sha in shard_hash.items() if sha == digest]
    what = (f"the shard of cluster {owner[0]} of this run (its expert goes to experts/expert_{owner[0]:02d})"
            if owner else f"cluster {given}'s shard of another partition (SHA-256 {digest[:12]}..., not "
            f"{shard_hash[cluster][:12]}...)")
    raise DDMError(f"--out {out} is the expert of cluster {cluster} of the run {run}, but {shard} is {what}: the "
                   f"run would refuse the expert trained on it; give {expected}, or another --out")


def check_trained_on_partition(run: Path, path: str, role: str, shard_hash: dict) -> None:
    """A router or monolith trained on this partition's shards (its config.json's shards_sha256, in cluster
    order), else a DDMError: it is another run's, and a router of another run routes to the wrong experts.
    Folders of earlier ddmkit record none (not checked), nor is a monolith of a run grown since (add-expert
    keeps it as the reference trained before the growth)."""
    trained_on = model_config(safe_join(run, path)).get("shards_sha256")
    if trained_on is None or (role == "monolith" and RunFolder(run).grow.is_file()):
        return
    if trained_on != [shard_hash.get(c) for c in range(len(shard_hash))]:
        command = f"ddmkit train-{role} {shlex.quote(str(run))}"
        raise DDMError(f"{run / path}: trained on the shards of another partition (its config.json's shards_sha256 "
                       f"are not this run's partition/shards): it is another run's {role}. Train this run's: "
                       f"`rm -r {shlex.quote(str(run / path))} && {command}`, or copy back the {role} trained on "
                       "this run")


def check_slot(path, cluster, slot: int) -> None:
    """An expert folder whose config.json names `cluster` must sit in the slot of that cluster
    (experts/expert_{slot}), else a DDMError saying where it goes."""
    if cluster is None:
        raise DDMError(f"{path}/config.json: cluster is null, but an expert's config.json records the cluster of the "
                       f"shard it was trained on; the folder is the slot of cluster {slot}: write \"cluster\": {slot} "
                       "if it holds that cluster's expert, or copy the expert's folder again")
    if cluster != slot:
        raise DDMError(f"{path}/config.json: cluster {cluster!r}, but the folder is the slot of cluster {slot}: move "
                       f"the folder to experts/expert_{cluster!s:0>2}, or copy the right expert here")


def check_replaced_expert(folder: Path, path: str, cluster: int, shard_hash: dict, changed: str) -> None:
    """An expert folder whose files differ from the registry's: a DDMError (`changed`, then what it holds and
    the fix) where `ddmkit register` would refuse it too, so that registering is suggested only where it works:
    weights and config.json of two folders, the expert of another cluster, or one of another partition."""
    try:
        config = model_config(folder)
        check_identity(folder, config)
        check_slot(folder, config.get("cluster", cluster), cluster)
        check_shard(path, cluster, config.get("shard_sha256"), shard_hash)
    except DDMError as e:
        raise DDMError(f"{changed}; its folder was changed, and `ddmkit register` refuses what it holds now: {e}") \
            from None


def write_registry(run: str | Path) -> dict:
    """Write RUN/registry.json for the model folders present; returns it. Refused (DDMError): no expert at
    all, weights holding NaN, an expert trained on another partition's shard (nothing could load it)."""
    reg = checked_registry(run)
    write_json(RunFolder(run).root / REGISTRY, reg)
    return reg


def checked_registry(run: str | Path) -> dict:
    """The registry write_registry would write, every model folder checked as it checks them; nothing written
    (e.g. a run without a registry checked before a command changes it)."""
    run = RunFolder(run).root  # an empty or blank text refused there
    manifest, _ = load_partition_checked(run / "partition")
    folder = RunFolder(run)
    models = _model_folders(run, manifest["k"])
    check_no_extra_experts(run, manifest["k"])
    if not any(role == "expert" for _, role, _ in models):  # before any file is hashed
        raise DDMError(f"{run} holds no trained expert (no experts/expert_XX/model.safetensors), so there is no DDM to "
                       f"register; train the experts first (e.g. `ddmkit launch {run}`, or `ddmkit train-expert` per "
                       "shard into experts/expert_XX), then register")
    text = manifest.get("data_name") == "text"  # byte-level models follow no Gaussian path
    reg = {"format": FORMAT, "ddmkit_version": __version__, "time_convention": None if text else TIME_CONVENTION,
           "k": manifest["k"], "data_hash": manifest.get("data_hash"),
           "partition_sha256": sha256_file(folder.manifest),
           "latents_sha256": sha256_file(folder.latent_info) if folder.is_latent else None,
           "models": [registry_entry(run, rel, role, c) for rel, role, c in models]}
    shard_hash = partition_shard_hashes(run, manifest)
    for m in reg["models"]:
        if m["role"] == "expert":
            check_shard(m["path"], m["cluster"], m["shard_sha256"], shard_hash)
        else:
            check_trained_on_partition(run, m["path"], m["role"], shard_hash)
    _validated(Registry, reg, "registry")
    return reg


def read_registry(run: str | Path) -> dict | None:
    """RUN/registry.json checked by its schema (Registry), as read; None before the run is registered."""
    source = Path(run) / REGISTRY
    if not source.exists():
        return None
    reg = read_json(source)
    _validated(Registry, reg, str(source))
    return reg


def check_no_extra_experts(run: Path, k: int) -> None:
    """RUN/experts holds no expert folder beyond the partition's k clusters (experts/expert_08 in a run of
    k = 8): no command would load or register it, so it is refused (a DDMError naming it), not left out."""
    experts = Path(run) / "experts"
    extra = sorted(p for p in experts.glob("expert_*") if re.fullmatch(r"expert_\d+", p.name)
                   and int(p.name.removeprefix("expert_")) >= k and p.is_dir()) if experts.is_dir() else []
    if extra:
        raise DDMError(f"{extra[0]} is the folder of an expert of cluster {extra[0].name.removeprefix('expert_')}, but "
                       f"the partition has {k} clusters (0 .. {k - 1}), so no command of this run would use it; move "
                       f"it out of {experts} (a new island's data gets an expert of its own with `ddmkit add-expert "
                       f"{run} --data FILE`)")


def _same_release(a: str, b: str) -> bool:
    """Same major.minor version (patch releases keep the file formats)."""
    return a.split(".")[:2] == b.split(".")[:2]


def no_registry(run: Path) -> DDMError:
    """The error for a folder without registry.json: register it if it is a run, else give the run folder (a
    folder inside a run, RUN/partition, names the run)."""
    if (run / "config.json").is_file():
        return DDMError(f"{run}: no registry yet ({REGISTRY}); run `ddmkit register {run}` first")
    above = enclosing_run(run)
    if above is not None:
        return DDMError(f"{run} is a folder inside the run {above}; give the run folder itself: {above}")
    return DDMError(f"{run} is not a ddmkit run folder (no config.json); give the folder `ddmkit run` wrote")


def verify_registry(run: str | Path, allow_missing: bool = True, retraining: bool = False,
                    shards: bool = False, router_needed: bool = True) -> dict:
    """Check every model folder listed in RUN/registry.json against it.

    Refused (DDMError): another time convention or ddmkit release, another
    partition, a weights or config file whose SHA-256 differs, an expert whose
    config names a different shard than the partition, an expert, router or monolith
    folder present but not listed (added after the registry was written: `ddmkit register`
    checks and records it), and with shards=True a shard file whose SHA-256 is not the
    partition's (checked_model_shards; it reads all the data) or a file of RUN/data/ whose
    SHA-256 is not the one data.json records (checked_data_files). A listed expert whose
    folder is gone is reported in "missing" (or refused if not allow_missing); with retraining, any
    listed folder may be gone (it is about to be trained again) and unlisted ones are left to the
    registry written after training. router_needed=False (routing by the statistics-only router) lets a
    listed router be gone.
    """
    run = RunFolder(run).root  # an empty or blank text refused there
    source = run / REGISTRY
    check_run_exists(run)
    if not source.exists():
        raise no_registry(run)
    reg = _validated(Registry, read_json(source), str(source))
    manifest, _ = load_partition_checked(run / "partition")
    if reg.time_convention is not None or manifest.get("data_name") != "text":
        check_time_convention(reg.time_convention, source)
    if not _same_release(reg.ddmkit_version, __version__):
        raise DDMError(f"{source}: written by ddmkit {reg.ddmkit_version}, this is ddmkit {__version__}; "
                       f"install ddmkit=={reg.ddmkit_version} or re-train and re-register")
    if sha256_file(run / "partition" / "manifest.json") != reg.partition_sha256:
        raise DDMError(f"{source}: the partition manifest changed since the registry was written; "
                       "these experts were trained on another partition")
    if reg.k != manifest["k"]:
        raise DDMError(f"{source}: k = {reg.k}, but the partition it records has {manifest['k']} clusters; the "
                       f"registry was edited: run `ddmkit register {run}` to record the run's model folders again")
    check_no_extra_experts(run, manifest["k"])
    if reg.latents_sha256 is not None or RunFolder(run).is_latent:
        layout = RunFolder(run)
        info = layout.latent_info
        if not info.exists():
            raise DDMError(f"{source}: the run is a latent run, but {info} is missing; copy that one file back "
                           "(loading and sampling need only it; training and `ddmkit verify` also read the latent "
                           f"shards beside it, {layout.latents.name}/cluster_XX.safetensors), or encode the shards "
                           f"again with the run's autoencoder: `ddmkit partition --config {layout.config} --out "
                           f"{run}` (then `ddmkit verify {run}` checks them against the registry)")
        if sha256_file(info) != reg.latents_sha256:
            raise DDMError(f"{source}: the latent shards ({info}) changed since the registry was written; these "
                           "networks were trained on other latents")
    shard_hash = partition_shard_hashes(run, manifest)
    missing, verified = [], []
    for e in reg.models:
        folder = safe_join(run, e.path, f"{source}: {e.name}.path")
        if not (folder / "model.safetensors").exists():
            if retraining:
                continue
            if e.role == "expert" and allow_missing:
                missing.append(e.cluster)
                continue
            if e.role == "router" and not router_needed:
                continue
            raise DDMError(f"{source}: {e.path} is listed but missing; copy it back or re-run `ddmkit register`")
        for fname, want in (("model.safetensors", e.weights_sha256), ("config.json", e.config_sha256)):
            if sha256_file(folder / fname) != want:
                if e.role == "expert":
                    check_replaced_expert(folder, e.path, e.cluster, shard_hash,
                                          f"{folder / fname}: SHA-256 differs from {source}")
                raise DDMError(f"{folder / fname}: SHA-256 differs from {source}; the file was changed or "
                               "replaced. Re-copy it, or run `ddmkit register` if the change is intended")
        statistics = folder / PUBLISHED_STATISTICS
        if e.statistics_sha256 is not None and not statistics.is_file():
            raise DDMError(f"{statistics} is missing ({source} records it): copy it back, or run `ddmkit register "
                           f"{run}` if it was removed on purpose (the statistics-only router then reads the shard)")
        if statistics.is_file() and sha256_file(statistics) != e.statistics_sha256:
            raise DDMError(f"{statistics}: SHA-256 differs from {source}" + (" (which records none)"
                           if e.statistics_sha256 is None else "") + "; the file was changed or added after "
                           f"registering. Re-copy the expert folder, or run `ddmkit register {run}`")
        if e.role == "expert":
            check_shard(e.path, e.cluster, e.shard_sha256, shard_hash)
            check_slot(folder, model_config(folder).get("cluster", e.cluster), e.cluster)
        verified.append(e.path)
    listed = {e.cluster for e in reg.models if e.role == "expert"}
    unlisted = sorted(set(range(manifest["k"])) - listed)
    present = [c for c in unlisted if (RunFolder(run).expert(c) / "model.safetensors").exists()]
    if present and not retraining:
        raise DDMError(f"{source} does not list experts {present}, but their folders are there (added after it was "
                       f"written): run `ddmkit register {run}` to check them and record them, or remove them")
    roles = {e.role for e in reg.models}
    for name in ("router", "monolith"):
        if name not in roles and (run / name / "model.safetensors").exists() and not retraining:
            raise DDMError(f"{source} does not list the {name}, but {run / name} is there (added after it was "
                           f"written): run `ddmkit register {run}` to check it and record it, or remove it")
    missing += unlisted
    if shards:
        checked_model_shards(run)
        checked_heldout_text(RunFolder(run), manifest)
        checked_data_files(run)
    if missing and not allow_missing:
        raise DDMError(f"{source}: experts {sorted(missing)} are missing")
    return {"missing": sorted(missing), "verified": verified}


def check_registered(run: str | Path) -> None:
    """Before a command that trains what a run lacks and registers it again (`ddmkit run`, `launch`): the
    model folders RUN/registry.json lists and that are still there have its hashes, so the new registry
    never vouches for a file changed since (a DDMError names it; `ddmkit register` accepts a change on
    purpose). Listed folders that are gone are trained again; a run without a registry has nothing to check."""
    if (Path(run) / REGISTRY).exists():
        verify_registry(run, allow_missing=True, retraining=True)


def warn_missing(missing: list[int], k: int, misnamed: str = "") -> None:
    """Warn of the experts `missing`; `misnamed` (RunFolder.missing_expert_hints) names folders that look like theirs
    and those unfinished."""
    if missing:
        warnings.warn(f"experts {missing} of {k} are missing: sampling with the other {k - len(missing)}, "
                      f"router weights renormalised over them{misnamed}", stacklevel=3)
