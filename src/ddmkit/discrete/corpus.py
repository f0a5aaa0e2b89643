"""Plain-text corpora: a folder of files, one document per file or per
blank-line block. Text is kept as bytes (byte-level tokens need no decoding).

    docs = load_corpus(CorpusConfig(source="stdlib"))
    train, test = split_documents(docs, test_fraction=0.15, seed=0)

`source = "stdlib"` is the Python standard library's own source folder
(`sysconfig.get_paths()["stdlib"]`, without site-packages): present on every
machine with Python, and written by nobody here. Any other value is a folder
(or a single file) of the user's own text; a relative path is read from the current folder.
Binary files (holding a NUL byte) are skipped, and files that are not valid UTF-8 kept,
both named in a log line.
"""
from __future__ import annotations

import codecs
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ddmkit.errors import DDMError, counted

SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}
BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32",  # before UTF-16's: FF FE begins both
        codecs.BOM_UTF16_LE: "UTF-16", codecs.BOM_UTF16_BE: "UTF-16"}


@dataclass(frozen=True)
class Document:
    name: str  # file path relative to the source, plus "#block" for block units
    text: bytes


def resolve_source(source: str) -> Path:
    """The folder or file a `corpus.source` names."""
    path = Path(sysconfig.get_paths()["stdlib"]) if source == "stdlib" else Path(source).expanduser().absolute()
    if not source.strip() or not path.exists():
        raise DDMError(f"corpus.source: {source!r} ({path}) does not exist; give 'stdlib' or a folder (or file) of "
                       "text, an absolute path or one relative to the current folder")
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
    """Blocks separated by one or more blank lines (LF or CRLF line ends), without the line breaks at their
    ends, empty ones dropped."""
    return [b.strip(b"\r\n") for b in re.split(rb"\n[ \t\r]*\n", text) if b.strip()]


def is_utf8(text: bytes) -> bool:
    try:
        text.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def wide_encoding(text: bytes) -> str | None:
    """'UTF-16' or 'UTF-32' for text that begins with that encoding's byte-order mark, else None."""
    return next((name for bom, name in BOMS.items() if text.startswith(bom)), None)


def _named(paths: list[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def units(name: str, text: bytes, cfg) -> list[Document]:
    """The documents of one file: the file or its blocks (cfg.unit), those shorter than
    cfg.min_doc_bytes dropped; not cut (cut_documents cuts them to cfg.max_doc_bytes)."""
    if cfg.unit == "file":
        return [Document(name, text)] if len(text) >= cfg.min_doc_bytes else []
    return [Document(f"{name}#{i}", unit) for i, unit in enumerate(split_blocks(text))
            if len(unit) >= cfg.min_doc_bytes]


def cut_documents(docs: list[Document], cfg, log: Callable[[str], None]) -> list[Document]:
    """The documents cut to cfg.max_doc_bytes; one log line says how many were cut (naming the longest, and
    the setting that keeps more of them), none where no document is longer."""
    longer = [d for d in docs if len(d.text) > cfg.max_doc_bytes]
    if longer:
        top = max(longer, key=lambda d: len(d.text))
        line = " in one line" if b"\n" not in top.text.strip() else ""
        log(f"corpus: {len(longer)} of {len(docs)} documents {'is' if len(longer) == 1 else 'are'} longer than "
            f"corpus.max_doc_bytes = {cfg.max_doc_bytes} and cut to that many bytes (the longest: {top.name}, "
            f"{len(top.text)} bytes{line}); raise corpus.max_doc_bytes to keep more of them")
    return [Document(d.name, d.text[:cfg.max_doc_bytes]) if len(d.text) > cfg.max_doc_bytes else d for d in docs]


def all_documents(cfg, log: Callable[[str], None] = print) -> list[Document]:
    """Every document of a corpus (cfg: a CorpusConfig), in file order. Binary files (a NUL byte)
    are skipped, files that are not UTF-8 kept (bytes are the tokens), both named in a log line; documents
    longer than cfg.max_doc_bytes are cut to it, counted in one (cut_documents)."""
    root = resolve_source(cfg.source)
    files = list_files(root, cfg.pattern)
    if not files:
        deeper = f"**/{cfg.pattern}"  # '*.txt' finds no file in a subfolder
        hint = (f"; files in its subfolders match {deeper!r}: set corpus.pattern = {deeper!r}"
                if not cfg.pattern.startswith("**") and list_files(root, deeper) else "")
        raise DDMError(f"corpus: no files match pattern {cfg.pattern!r} (corpus.pattern) under {root}{hint}")
    docs, binary, wide, other, texts = [], [], {}, [], []
    for path in files:
        text, name = path.read_bytes(), str(path.relative_to(root)) if root.is_dir() else path.name
        if b"\0" in text:
            encoding = wide_encoding(text)
            if encoding is None:
                binary.append(name)
            else:
                wide.setdefault(encoding, []).append(name)
            continue
        if not is_utf8(text):
            other.append(name)
        texts.append(text)
        docs += units(name, text, cfg)
    if binary:
        log(f"corpus: skipped {counted(len(binary), 'binary file')} (holding a NUL byte): "
            f"{_named(binary)}")
    for encoding, names in wide.items():
        log(f"corpus: skipped {counted(len(names), f'{encoding} text file')} (a byte-order mark): {_named(names)}; "
            f"convert to UTF-8 to use it (e.g. `iconv -f {encoding} -t UTF-8 IN > OUT`)")
    if other:
        log(f"corpus: {counted(len(other), 'file is', 'files are')} not UTF-8 (another encoding?), used as bytes: "
            f"{_named(other)}")
    if len(docs) < 2:
        raise too_few_documents(cfg, root, len(files), texts, len(docs), binary + sum(wide.values(), []))
    return cut_documents(docs, cfg, log)


def too_few_documents(cfg, root: Path, n_files: int, texts: list[bytes], n_docs: int,
                      skipped: list[str]) -> DDMError:
    """The error for a corpus of fewer than 2 documents, with the fix that helps: the files skipped for a
    NUL byte, files holding no text, a single block of text, or documents shorter than cfg.min_doc_bytes;
    texts: the contents of the n_files files matched that were read (those without a NUL byte)."""
    pieces = sum(len(split_blocks(t)) if cfg.unit == "block" else bool(t.strip()) for t in texts)
    if pieces == 0:
        fix = f"the {counted(len(texts), 'file read holds', 'files read hold')} no text (empty or blank); add text"
    elif pieces == 1 and cfg.unit == "block":
        fix = ('the text is one block (unit = "block" splits at blank lines): separate documents by a blank line, '
               'or put one document per file and use unit = "file"')
    elif pieces == 1:
        fix = 'use unit = "block" (one document per blank-line-separated block), or add files'
    else:
        fix = "lower corpus.min_doc_bytes or use more text"
    if skipped:  # UTF-16 and UTF-32 text hold NUL bytes: no setting reads them
        convert = (f"skipped as binary ({len(skipped)} of {n_files} files matched): {_named(skipped)}; a NUL "
                   "byte means not text, or text in UTF-16 or UTF-32: convert it to UTF-8 (e.g. `iconv -f UTF-16 "
                   "-t UTF-8 IN > OUT`)")
        fix = f"{convert}; else {fix}" if texts else convert
    return DDMError(f"corpus: only {counted(n_docs, 'document')} of at least {cfg.min_doc_bytes} bytes under {root}, "
                    f"2 at least are needed; {fix}")


def sample_documents(docs: list[Document], cfg) -> list[Document]:
    """At most cfg.max_docs of the documents, a seeded sample in a seeded order."""
    docs = list(docs)
    random.Random(cfg.seed).shuffle(docs)
    return docs[:cfg.max_docs]


def load_corpus(cfg, log: Callable[[str], None] = print) -> list[Document]:
    """Documents of a corpus (cfg: a CorpusConfig), in a seeded order: at most cfg.max_docs of
    all_documents (a seeded sample)."""
    return sample_documents(all_documents(cfg, log), cfg)


def split_documents(docs: list[Document], test_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, test): whole documents held out, before anything is fitted."""
    order = list(range(len(docs)))
    random.Random(seed + 1).shuffle(order)
    n_test = max(1, round(test_fraction * len(docs)))
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [docs[i] for i in train], [docs[i] for i in test]
