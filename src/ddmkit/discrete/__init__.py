"""Decentralized discrete generation: byte-level text, autoregressive experts with a prefix
router, masked discrete flow matching, an exact Markov-mixture check, and expert-data alignment
for token experts (docs/discrete.md). The run stages are in ddmkit.pipeline.text.
"""
from ddmkit.discrete.config import TextRunConfig, load_text_config

__all__ = ["TextRunConfig", "load_text_config"]
