"""Byte-level tokens: every UTF-8 byte is a token, plus two special ones.

    ids 0..255   the bytes themselves (so any text, any language, round-trips)
    BOS = 256    start of a window (autoregressive models read it first)
    MASK = 257   the absorbing state of masked discrete flow matching

Experts predict only bytes (256 outputs); the special tokens are inputs.
"""
from __future__ import annotations

import torch

NUM_BYTES = 256
BOS = 256
MASK = 257


def encode(text: str | bytes) -> torch.Tensor:
    """UTF-8 bytes of `text` as a (n,) int64 tensor of ids in [0, 256)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)


def decode(ids, mask_char: str = "_") -> str:
    """Text of a sequence of ids; BOS is dropped, MASK shows as `mask_char`,
    invalid UTF-8 shows as U+FFFD. decode(encode(s)) == s for every str s."""
    out, run = [], bytearray()
    for i in (ids.tolist() if torch.is_tensor(ids) else list(ids)):
        if i < NUM_BYTES:
            run.append(i)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        if i == MASK:
            out.append(mask_char)
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)
