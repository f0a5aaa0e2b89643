"""Decentralized discrete generation: byte-level text, autoregressive experts
with a prefix router, masked discrete flow matching, and an exact
Markov-mixture check (docs/discrete.md).

    from ddmkit.discrete.pipeline import run_text
    run_text("configs/text_ar.toml", "runs/text_ar")
"""
from ddmkit.discrete import transformer  # noqa: F401  (registers the transformer architectures)
