"""Configuration of the text pipelines: TOML validated by pydantic, in the
style of ddmkit.config (unknown fields are errors naming the field).

A text config has a top-level `kind = "text_ar"` (autoregressive experts,
configs/text_ar.toml) or `kind = "text_dfm"` (masked discrete flow matching,
configs/text_dfm.toml); that key is how `ddmkit run` tells it from a vector run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ddmkit.config import Section, TrainConfig, apply_overrides, json_digest, read_toml, tomllib, validate
from ddmkit.errors import DDMError

KINDS = ("text_ar", "text_dfm")


class CorpusConfig(Section):
    source: str = Field("stdlib", description="'stdlib' (Python's own source files) or a folder / file of text")
    pattern: str = "**/*.py"
    unit: Literal["file", "block"] = "file"
    min_doc_bytes: int = Field(256, ge=1)
    max_doc_bytes: int = Field(8192, ge=16)
    max_docs: int = Field(600, ge=2)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = 0


class TextPartitionConfig(Section):
    k: int = Field(3, ge=1)
    ngram_min: int = Field(2, ge=1)
    ngram_max: int = Field(4, ge=1)
    max_features: int = Field(20000, ge=1)
    svd_dim: int = Field(64, ge=1)
    balanced: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _ngrams(self):
        if self.ngram_max < self.ngram_min:
            raise ValueError(f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})")
        return self


class ModelConfig(Section):
    seq_len: int = Field(128, ge=2, description="window length in bytes")
    width: int = Field(128, ge=8)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _heads(self):
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        return self


def _train(steps: int, batch_size: int = 32) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch_size, lr=2e-3, warmup=30, ema_decay=0.99, log_every=25,
                       device="cpu", weight_decay=0.01)


class TextExpertConfig(Section):
    train: TrainConfig = Field(default_factory=lambda: _train(300))


class TextRouterConfig(Section):
    kinds: list[Literal["bayes", "learned"]] = Field(default_factory=lambda: ["bayes", "learned"],
                                                     description="bayes: exact posterior from the experts' "
                                                     "likelihoods (autoregressive only); learned: a small model")
    width: int = Field(64, ge=8)
    depth: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    train: TrainConfig = Field(default_factory=lambda: _train(200))


class CentralizedConfig(Section):
    enabled: bool = True
    steps: int | None = Field(None, ge=1, description="default: K x expert steps (same total compute)")


class TextSampleConfig(Section):
    n: int = Field(3, ge=1)
    length: int | None = Field(None, ge=1, description="default: model.seq_len")
    steps: int = Field(32, ge=1, description="discrete flow matching: unmasking steps")
    temperature: float = Field(1.0, gt=0)
    prompt: str = ""
    seed: int = 0


class TextEvalConfig(Section):
    windows_per_cluster: int = Field(48, ge=1)
    t_points: int = Field(8, ge=1, description="discrete flow matching: time points of the ELBO")
    strategies: list[str] = Field(default_factory=lambda: ["full", "top-1", "top-2", "switch"])

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from ddmkit.routing.table import parse_strategy

        for s in v:
            if s in ("oracle", "nearest"):
                raise ValueError(f"strategy {s!r} needs continuous-data state; accepted here: full, top-K, "
                                 "threshold-P, sample-K[@T], nucleus-P[@T], switch")
            parse_strategy(s)
        return v


class TextRunConfig(Section):
    kind: Literal["text_ar", "text_dfm"]
    seed: int = 0
    threads: int = Field(2, ge=1, description="torch CPU threads")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    partition: TextPartitionConfig = Field(default_factory=TextPartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    expert: TextExpertConfig = Field(default_factory=TextExpertConfig)
    router: TextRouterConfig = Field(default_factory=TextRouterConfig)
    centralized: CentralizedConfig = Field(default_factory=CentralizedConfig)
    sample: TextSampleConfig = Field(default_factory=TextSampleConfig)
    evaluate: TextEvalConfig = Field(default_factory=TextEvalConfig)

    @model_validator(mode="after")
    def _bayes_is_ar_only(self):
        if self.kind == "text_dfm" and "bayes" in self.router.kinds:
            raise ValueError("router.kinds: 'bayes' needs exact sequence likelihoods, which masked experts do "
                             "not give; use ['learned'] for kind = 'text_dfm'")
        return self

    def with_seed(self, seed: int | None) -> "TextRunConfig":
        """Every seed derived from one (corpus sample and split, partition,
        experts, evaluation, sampling; the router seed + 1). None: unchanged."""
        if seed is None:
            return self
        d = self.model_dump()
        d["seed"] = d["corpus"]["seed"] = d["partition"]["seed"] = d["sample"]["seed"] = seed
        d["expert"]["train"]["seed"], d["router"]["train"]["seed"] = seed, seed + 1
        return TextRunConfig.model_validate(d)

    def digest(self, *sections: str) -> str:
        """Hash of the named sections (all when none): decides whether a stage can be reused."""
        dump = self.model_dump()
        part = {s: dump[s] for s in sections} if sections else dump
        return json_digest(part)


def load_text_config(path: str | Path, overrides: list[str] = ()) -> TextRunConfig:
    """Read and validate a text TOML config (kind = 'text_ar' or 'text_dfm'), with each --set
    "section.field=value" of `overrides` applied."""
    raw = read_toml(path)
    if raw.get("kind") not in KINDS:
        raise DDMError(f"{path}: kind: {raw.get('kind')!r} is not a text pipeline; accepted: {', '.join(KINDS)}")
    if overrides:
        return validate(TextRunConfig, apply_overrides(raw, list(overrides)), f"{path} with --set")
    return validate(TextRunConfig, raw, str(path))


def is_text_config(path: str | Path) -> bool:
    """True when the TOML file has a top-level kind = 'text_ar' or 'text_dfm'."""
    try:
        return tomllib.loads(Path(path).read_text()).get("kind") in KINDS
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # not a text config: read_toml, which reads it next, says what is wrong
