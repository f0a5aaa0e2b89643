"""Plain-text corpora: a folder of files, one document per file or per
blank-line block. Text is kept as bytes (byte-level tokens need no decoding).

    docs = load_corpus(CorpusConfig(source="stdlib"))
    train, test = split_documents(docs, test_fraction=0.15, seed=0)

`source = "stdlib"` is the Python standard library's own source folder
(`sysconfig.get_paths()["stdlib"]`, without site-packages): present on every
machine with Python, and written by nobody here. Any other value is a folder
(or a single file) of the user's own text.
"""
from __future__ import annotations

import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ddmkit.errors import DDMError

SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str  # file path relative to the source, plus "#block" for block units
    text: bytes


def resolve_source(source: str) -> Path:
    """The folder or file a `corpus.source` names."""
    path = Path(sysconfig.get_paths()["stdlib"]) if source == "stdlib" else Path(source).expanduser()
    if not path.exists():
        raise DDMError(f"corpus.source: {source!r} does not exist; give 'stdlib' or a folder of text files")
    return path


def list_files(root: Path, pattern: str) -> list[Path]:
    """Files under root matching the glob, sorted, without hidden folders,
    caches and installed packages."""
    if root.is_file():
        return [root]
    files = [p for p in root.glob(pattern) if p.is_file()
             and not any(part in SKIP_PARTS or part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files)


def split_blocks(text: bytes) -> list[bytes]:
    """Blocks separated by one or more blank lines, stripped, empty ones dropped."""
    return [b.strip(b"\n") for b in re.split(rb"\n[ \t\r]*\n", text) if b.strip()]


def load_corpus(cfg) -> list[Document]:
    """Documents of a corpus (cfg: a CorpusConfig), in a seeded order.

    Documents shorter than cfg.min_doc_bytes are dropped, longer ones cut to
    cfg.max_doc_bytes; at most cfg.max_docs are kept (a seeded sample)."""
    root = resolve_source(cfg.source)
    files = list_files(root, cfg.pattern)
    if not files:
        raise DDMError(f"corpus: no files match pattern {cfg.pattern!r} under {root}")
    docs = []
    for path in files:
        text = path.read_bytes()
        name = str(path.relative_to(root)) if root.is_dir() else path.name
        units = [text] if cfg.unit == "file" else split_blocks(text)
        for i, unit in enumerate(units):
            if len(unit) >= cfg.min_doc_bytes:
                docs.append(Document(name if cfg.unit == "file" else f"{name}#{i}", unit[:cfg.max_doc_bytes]))
    if len(docs) < 2:
        raise DDMError(f"corpus: only {len(docs)} documents of at least {cfg.min_doc_bytes} bytes under {root}; "
                       "lower corpus.min_doc_bytes or use more text")
    random.Random(cfg.seed).shuffle(docs)
    return docs[:cfg.max_docs]


def split_documents(docs: list[Document], test_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, test): whole documents held out, before anything is fitted."""
    order = list(range(len(docs)))
    random.Random(seed + 1).shuffle(order)
    n_test = max(1, round(test_fraction * len(docs)))
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [docs[i] for i in train], [docs[i] for i in test]
