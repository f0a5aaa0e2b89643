"""Markdown tables for the reports: numbers to a few significant digits, None as '-'."""
from __future__ import annotations

import math

import numpy as np


def fmt(v, digits: int = 4) -> str:
    """A table cell: numbers to `digits` significant digits, None as '-', text as is."""
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        if math.isinf(v) or math.isnan(v):
            return str(float(v))
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(headers: list[str], rows: list[list], digits: int = 4) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(out)
