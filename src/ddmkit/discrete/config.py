"""Configuration of the text pipelines: TOML validated by pydantic, in the
style of ddmkit.config (unknown fields are errors naming the field).

A text config has a top-level `kind = "text_ar"` (autoregressive experts,
configs/text_ar.toml) or `kind = "text_dfm"` (masked discrete flow matching,
configs/text_dfm.toml); that key is how `ddmkit run` tells it from a vector run.
"""
from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ddmkit.config import (MAX_SEED, ROWS, Section, Seed, TrainConfig, apply_overrides, cuda_graph_unsupported,
                           json_digest, read_toml, toml_text, tomllib, validate)
from ddmkit.errors import DDMError
from ddmkit.io import read_json
from ddmkit.layout import RunFolder
from ddmkit.routing.table import STRATEGIES, canonical_name, parse_strategy, strategy_form

KINDS = ("text_ar", "text_dfm")
SIZE = 2**16  # the most bytes of a window, n-gram or sample, and the widest transformer or the most heads
DEPTH = 1024  # the deepest transformer (each layer is built, on the meta device, when a config is checked)

# The strategy forms that need what only the vector and image sampler keeps; the text sampler routes on the
# router's probabilities alone (and a random generator).
NOT_FOR_TEXT = {
    "oracle": "the cluster the vector sampler draws once per trajectory",
    "nearest": "the cluster centroids and the vector sampler's x0_hat",
    "gated-K@A": "it compares the experts' velocities",
}
TEXT_STRATEGY_FORMS = ", ".join(s.form for s in STRATEGIES if s.form not in NOT_FOR_TEXT)


class CorpusConfig(Section):
    source: str = Field("stdlib", description="'stdlib' (Python's own source files) or a folder / file of text; "
                        "a relative path is read from the current folder")
    pattern: str = Field("**/*.py", description="glob below the source folder, e.g. '**/*.txt'")
    unit: Literal["file", "block"] = "file"
    min_doc_bytes: int = Field(256, ge=1)
    max_doc_bytes: int = Field(8192, ge=16)
    max_docs: int = Field(600, ge=2)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = Seed()

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty; give 'stdlib' or the path of a folder (or a file) of text")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if not v.strip() or v.startswith(("/", "~")) or PureWindowsPath(v).is_absolute():
            raise ValueError(f"{v!r} is not a glob below corpus.source; give a relative glob such as '**/*.txt' "
                             "and put the folder in corpus.source")
        return v

    @model_validator(mode="after")
    def _doc_bytes(self):
        if self.min_doc_bytes > self.max_doc_bytes:
            raise ValueError(f"min_doc_bytes ({self.min_doc_bytes}) is above max_doc_bytes ({self.max_doc_bytes}); "
                             "lower min_doc_bytes or raise max_doc_bytes")
        return self


class TextPartitionConfig(Section):
    k: int = Field(3, ge=1, le=100_000)
    ngram_min: int = Field(2, ge=1, le=SIZE)
    ngram_max: int = Field(4, ge=1, le=SIZE)
    max_features: int = Field(20000, ge=2, le=ROWS, description="TF-IDF vocabulary (character n-grams)")
    svd_dim: int = Field(64, ge=2, le=100_000, description="at least 2: unit vectors of 1 dimension are only +-1")
    balanced: bool = False
    seed: int = Seed(description="scikit-learn's SVD and k-means take it modulo 2**32")

    @model_validator(mode="after")
    def _ngrams(self):
        if self.ngram_max < self.ngram_min:
            raise ValueError(f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})")
        return self


def check_heads(width: int, heads: int, section: str) -> None:
    """A transformer's width splits evenly over its heads: a ValueError naming `section`.width and .heads and a
    width that works (the next multiple of heads)."""
    if width % heads:
        up = -(-width // heads) * heads  # the next multiple of heads, else the one below (widths stop at SIZE)
        fit = up if up <= SIZE else up - heads
        raise ValueError(f"width ({width}) must be divisible by heads ({heads}); give {section}.width = {fit} "
                         f"(--set {section}.width={fit}) or a number of heads that divides {width}")


class ModelConfig(Section):
    seq_len: int = Field(128, ge=2, le=SIZE, description="window length in bytes")
    width: int = Field(128, ge=8, le=SIZE)
    depth: int = Field(2, ge=1, le=DEPTH)
    heads: int = Field(4, ge=1, le=SIZE)

    @model_validator(mode="after")
    def _heads(self):
        check_heads(self.width, self.heads, "model")
        return self


class TextTrainConfig(TrainConfig):
    """The training settings of a text model: text models train on the CPU."""

    device: str = Field("auto", description="cpu or auto (the CPU too): text runs train on the CPU")

    @field_validator("device", mode="before")
    @classmethod
    def _cpu(cls, v):
        if v not in ("cpu", "auto"):
            raise ValueError(f"{v!r}: text runs train on the CPU; set it to \"cpu\" (or \"auto\", which is the CPU "
                             "too), or leave it out")
        return v

    @field_validator("checkpoint_every")
    @classmethod
    def _no_checkpoints(cls, v):
        if v:
            raise ValueError(f"{v}: text models train without checkpoints (a stopped job trains again from the "
                             "start: they train in minutes on the CPU); leave it out")
        return v

    @field_validator("cuda_graph")
    @classmethod
    def _no_cuda_graph(cls, v):
        if v:  # it was accepted and did nothing
            raise ValueError("true: " + cuda_graph_unsupported(
                "a text model", "text models train on the CPU, where no step is captured; and a masked model's "
                "loss takes its masked positions by value, a host sync"))
        return v


def _train(steps: int, batch_size: int = 32) -> TextTrainConfig:
    return TextTrainConfig(steps=steps, batch_size=batch_size, lr=2e-3, warmup=30, ema_decay=0.99, log_every=25,
                           device="cpu", weight_decay=0.01)


class TextExpertConfig(Section):
    train: TextTrainConfig = Field(default_factory=lambda: _train(300))


class TextRouterConfig(Section):
    kinds: list[Literal["bayes", "learned"]] = Field(default_factory=lambda: ["bayes", "learned"],
                                                     description="bayes: exact posterior from the experts' "
                                                     "likelihoods (autoregressive only); learned: a small model "
                                                     "(default: both for text_ar, learned for text_dfm)")
    width: int = Field(64, ge=8, le=SIZE)
    depth: int = Field(1, ge=1, le=DEPTH)
    heads: int = Field(4, ge=1, le=SIZE)
    train: TextTrainConfig = Field(default_factory=lambda: _train(200))

    @model_validator(mode="after")
    def _heads(self):
        check_heads(self.width, self.heads, "router")
        return self

    @field_validator("kinds")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("empty: the decentralized model needs a router; give ['learned'] (text_ar: also "
                             "'bayes', e.g. ['bayes', 'learned'])")
        twice = [kind for kind in dict.fromkeys(v) if v.count(kind) > 1]
        if twice:  # it trained one router and said nothing
            once = json.dumps(list(dict.fromkeys(v)))
            raise ValueError(f"{json.dumps(v)} names {' and '.join(map(repr, twice))} more than once: each kind is "
                             f"one router; give each once, e.g. kinds = {once} under [router] (on the command line: "
                             f"--set 'router.kinds={once}')" + ("; kind = 'text_dfm' takes [\"learned\"] alone" if
                                                                 "bayes" in v else ""))
        return v


class CentralizedConfig(Section):
    enabled: bool = True
    steps: int | None = Field(None, ge=1, le=ROWS, description="default: K x expert steps (same total compute)")


class TextSampleConfig(Section):
    n: int = Field(3, ge=1, le=ROWS)
    length: int | None = Field(None, ge=1, le=SIZE, description="default: model.seq_len")
    steps: int = Field(32, ge=1, le=10**6, description="discrete flow matching: unmasking steps")
    temperature: float = Field(1.0, gt=0)
    prompt: str = Field("", description="autoregressive only: the bytes every sample starts with")
    seed: int = Seed()


class TextEvalConfig(Section):
    windows_per_cluster: int = Field(48, ge=1, le=ROWS)
    t_points: int = Field(8, ge=1, le=10**6, description="discrete flow matching: time points of the ELBO")
    strategies: list[str] = Field(default_factory=lambda: ["full", "top-1", "top-2", "switch"])

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if not v:  # the report had no routed rows, without a word
            works = json.dumps(["full", "top-1"])
            raise ValueError(f"empty: the report scores the decentralized model with each of these routing "
                             f"strategies; give at least one, e.g. strategies = {works} under [evaluate] (on the "
                             f"command line: --set 'evaluate.strategies={works}')")
        for s in v:
            form = strategy_form(s)
            if form is None:
                raise ValueError(f"unknown routing strategy {s.strip()!r}; accepted for text runs: "
                                 f"{TEXT_STRATEGY_FORMS}")
            if form in NOT_FOR_TEXT:
                raise ValueError(f"strategy {s.strip()!r} needs continuous-data state ({NOT_FOR_TEXT[form]}), which "
                                 f"a text run does not have; accepted for text runs: {TEXT_STRATEGY_FORMS}")
            try:
                parse_strategy(s)
            except DDMError as e:  # a bad value, e.g. top-0: named with the field
                raise ValueError(str(e)) from None
        return list(dict.fromkeys(canonical_name(s) for s in v))  # top-02 is top-2, given once


class TextRunConfig(Section):
    kind: Literal["text_ar", "text_dfm"]
    seed: int = Seed()
    threads: int = Field(2, ge=1, le=1024, description="torch CPU threads")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    partition: TextPartitionConfig = Field(default_factory=TextPartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    expert: TextExpertConfig = Field(default_factory=TextExpertConfig)
    router: TextRouterConfig = Field(default_factory=TextRouterConfig)
    centralized: CentralizedConfig = Field(default_factory=CentralizedConfig)
    sample: TextSampleConfig = Field(default_factory=TextSampleConfig)
    evaluate: TextEvalConfig = Field(default_factory=TextEvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _dfm_routers_by_default(cls, raw):
        """A text_dfm run without router.kinds routes with the learned router alone (bayes needs sequence
        likelihoods): the default of both is text_ar's."""
        if isinstance(raw, dict) and raw.get("kind") == "text_dfm":
            router = raw.get("router")
            router = router.model_dump() if isinstance(router, TextRouterConfig) else dict(router or {})
            if "kinds" not in router:
                raw = {**raw, "router": {**router, "kinds": ["learned"]}}
        return raw

    @field_validator("router")
    @classmethod
    def _bayes_is_ar_only(cls, v: TextRouterConfig, info: ValidationInfo) -> TextRouterConfig:
        if info.data.get("kind") == "text_dfm" and "bayes" in v.kinds:
            raise ValueError("kinds: 'bayes' needs exact sequence likelihoods, which masked experts do not give; "
                             "use ['learned'] for kind = 'text_dfm'")
        return v

    @field_validator("sample")
    @classmethod
    def _sample_fits(cls, v: TextSampleConfig, info: ValidationInfo) -> TextSampleConfig:
        kind, model = info.data.get("kind"), info.data.get("model")
        if model is not None and kind in KINDS:
            (check_ar_sample if kind == "text_ar" else check_dfm_sample)(v, model.seq_len)
        return v

    def with_seed(self, seed: int | None) -> "TextRunConfig":
        """Every seed derived from one (corpus sample and split, partition,
        experts, evaluation, sampling; the router seed + 1). None: unchanged."""
        if seed is None:
            return self
        if not 0 <= seed <= MAX_SEED:
            raise DDMError(f"--seed {seed}: seeds are 0 .. 2**63 - 1; give one in that range, e.g. --seed 0")
        d = self.model_dump()
        d["seed"] = d["corpus"]["seed"] = d["partition"]["seed"] = d["sample"]["seed"] = seed
        d["expert"]["train"]["seed"], d["router"]["train"]["seed"] = seed, (seed + 1) % (MAX_SEED + 1)
        return validate(TextRunConfig, d, "--seed")

    def digest(self, *sections: str) -> str:
        """Hash of the named sections (all when none): decides whether a stage can be reused."""
        dump = self.model_dump()
        part = {s: dump[s] for s in sections} if sections else dump
        return json_digest(part)


def check_ar_sample(s: TextSampleConfig, seq_len: int) -> None:
    """The prompt and sample.length fit in one window of model.seq_len bytes."""
    n = len(s.prompt.encode())
    if n >= seq_len:
        raise ValueError(f"prompt is {n} bytes, which leaves no room in model.seq_len = {seq_len}; shorten "
                         f"sample.prompt below {seq_len} bytes or raise model.seq_len")
    if s.length is not None and n + s.length > seq_len:
        raise ValueError(f"length ({s.length}) + prompt ({n} bytes) exceeds model.seq_len = {seq_len}; set "
                         f"sample.length at most {seq_len - n}, or leave it out (the rest of the window)")


def check_dfm_sample(s: TextSampleConfig, seq_len: int) -> None:
    """A masked model samples whole windows, without a prompt."""
    if s.length is not None and s.length != seq_len:
        raise ValueError(f"length ({s.length}) must equal model.seq_len ({seq_len}) for kind = 'text_dfm' "
                         "(fixed-length windows); leave sample.length out")
    if s.prompt:
        raise ValueError("prompt: kind = 'text_dfm' samples whole windows and takes no prompt; leave "
                         "sample.prompt out (or use kind = 'text_ar')")


def load_text_config(path: str | Path, overrides: list[str] = ()) -> TextRunConfig:
    """Read and validate a text TOML config (kind = 'text_ar' or 'text_dfm'), or a text run's config.json, with
    each --set "section.field=value" of `overrides` applied."""
    path = Path(path)
    if not path.exists() and not path.suffix and path.name == str(path):  # a name, as `ddmkit run demo` takes
        raise DDMError(f"config {path}: no such file; a text config is a TOML file (kind = 'text_ar' or 'text_dfm'), "
                       "e.g. configs/text_ar.toml (the built-in demo is a vector run: `ddmkit run demo`)")
    raw = _saved_config(path) if path.suffix == ".json" else None  # a text run's config.json, as for vectors
    raw = read_toml(path) if raw is None else raw
    if "kind" not in raw:
        raise DDMError(f"{path}: kind: missing; a text config starts with kind = \"text_ar\" (autoregressive) or "
                       "kind = \"text_dfm\" (discrete flow matching)")
    if raw.get("kind") not in KINDS:
        raise DDMError(f"{path}: kind: {raw.get('kind')!r} unknown; accepted: {', '.join(KINDS)}")
    if overrides:
        return validate(TextRunConfig, apply_overrides(raw, list(overrides)), f"{path} with --set")
    return validate(TextRunConfig, raw, str(path))


def is_text_run(run) -> bool:
    """Whether a run folder holds a text run: its config.json has kind text_ar or text_dfm. A folder whose
    partition is of text (text_partition) but whose config.json is missing, not JSON or not a text config is a
    DDMError naming the file and text_config_fix: it is never taken for a vector run's (whose fixes, --config
    CONFIG, a text run does not take)."""
    folder = RunFolder(run)
    text = text_partition(folder)
    if not text and not folder.config.exists():
        return False
    saved = read_json(folder.config, *([text_config_fix(folder)] if text else []))
    config = saved.get("config") if isinstance(saved, dict) else None
    if isinstance(config, dict) and (config.get("kind") in KINDS or (text and "kind" in config)):
        return True  # (a kind misspelt in a text run's config is named when the config is validated)
    if text:
        raise DDMError(f"{folder.config} is not a text run's config.json (no \"config\" table with a kind), but "
                       f"{folder.root} is a text run (its partition is of text); {text_config_fix(folder)}")
    return False


def text_partition(folder: RunFolder) -> bool:
    """Whether a run folder's partition is of text (its manifest.json's data_name): how a text run is told when
    its config.json cannot tell."""
    try:
        manifest = read_json(folder.manifest) if folder.manifest.is_file() else None
    except DDMError:
        return False
    return isinstance(manifest, dict) and manifest.get("data_name") == "text"


def text_config_fix(folder: RunFolder) -> str:
    """How a text run gets back a config.json that is lost or damaged (it reads its settings from that file alone)."""
    here = f" (or `--out {folder.root} --force`, to replace this run)" if folder.config.exists() else ""
    return ("copy it back from another copy of the run (a text run reads its settings from that file alone), or make "
            f"the run again from the text config (TOML) it was made with: `ddmkit run TEXT_CONFIG --out NEW_RUN`{here}")


def _saved_config(path: Path) -> dict | None:
    """The "config" table of a run's config.json (what a run records of the config it was made with), or None
    when `path` is not JSON of that form (read_toml, which reads it next, says what is wrong)."""
    try:
        saved = read_json(path)
    except DDMError:
        return None
    config = saved.get("config") if isinstance(saved, dict) else None
    return config if isinstance(config, dict) else None


def is_text_config(path: str | Path) -> bool:
    """True when the TOML file has a top-level `kind` (only text configs have one: load_text_config then
    names a kind other than 'text_ar' or 'text_dfm'), or the file is a text run's config.json."""
    path = Path(path)
    if path.suffix == ".json":
        saved = _saved_config(path) if path.is_file() else None
        return saved is not None and "kind" in saved
    try:
        return "kind" in tomllib.loads(toml_text(path))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # not a text config: read_toml, which reads it next, says what is wrong
