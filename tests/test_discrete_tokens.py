"""Byte tokens and the text corpus: round trips and known answers."""
import pytest
import torch

from ddmkit.discrete.config import CorpusConfig
from ddmkit.discrete.corpus import load_corpus, split_blocks, split_documents
from ddmkit.discrete.shards import eval_windows, sample_windows, stream
from ddmkit.discrete.tokens import BOS, MASK, decode, encode
from ddmkit.errors import DDMError


@pytest.mark.parametrize("text", ["", "hello", "naïve café", "日本語のテキスト", "emoji 🙂 and\ttabs\n", "\x00\x7f"])
def test_encode_decode_round_trip(text):
    ids = encode(text)
    assert ids.dtype == torch.long and len(ids) == len(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids.tolist())
    assert decode(ids) == text
    assert decode(encode(text.encode("utf-8"))) == text


def test_decode_special_tokens():
    assert decode([BOS, 104, 105]) == "hi"
    assert decode([104, MASK, 105], mask_char="_") == "h_i"
    assert encode("A").tolist() == [65]


def test_split_blocks():
    assert split_blocks(b"a\nb\n\n\nc\n  \nd\n") == [b"a\nb", b"c", b"d"]


def write_corpus(folder, n=6):
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(f"first block {i} " * 20 + "\n\nsecond block " * 3)
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_text("hidden " * 100)


def test_load_corpus_files_and_blocks(tmp_path):
    write_corpus(tmp_path)
    docs = load_corpus(CorpusConfig(source=str(tmp_path), pattern="**/*.txt", min_doc_bytes=10))
    assert sorted(d.name for d in docs) == [f"doc{i}.txt" for i in range(6)]  # hidden folder skipped
    blocks = load_corpus(CorpusConfig(source=str(tmp_path), pattern="*.txt", unit="block", min_doc_bytes=10))
    assert len(blocks) == 24 and {d.name.split("#")[1] for d in blocks} == {"0", "1", "2", "3"}
    cut = load_corpus(CorpusConfig(source=str(tmp_path), pattern="*.txt", min_doc_bytes=10, max_doc_bytes=20))
    assert all(len(d.text) == 20 for d in cut)


def test_split_documents_is_a_partition(tmp_path):
    write_corpus(tmp_path, 20)
    docs = load_corpus(CorpusConfig(source=str(tmp_path), pattern="*.txt", min_doc_bytes=10))
    train, test = split_documents(docs, 0.25, seed=0)
    assert len(test) == 5 and len(train) == 15
    assert {d.name for d in train}.isdisjoint(d.name for d in test)


def test_corpus_errors(tmp_path):
    with pytest.raises(DDMError, match="corpus.source"):
        load_corpus(CorpusConfig(source=str(tmp_path / "missing")))
    with pytest.raises(DDMError, match="no files match"):
        load_corpus(CorpusConfig(source=str(tmp_path), pattern="*.nothing"))


def test_stdlib_corpus_is_found():
    docs = load_corpus(CorpusConfig(max_docs=5))
    assert len(docs) == 5 and all(len(d.text) >= 256 for d in docs)
    assert not any("site-packages" in d.name for d in docs)


def test_windows_come_from_the_stream():
    x = stream([type("D", (), {"text": b"abcdefgh"})()])
    assert decode(x) == "abcdefgh\n\n"
    w = sample_windows(x, 4, 50, torch.Generator().manual_seed(0))
    text = decode(x)
    assert all(decode(row) in text for row in w)
    assert eval_windows(x, 4, 10).tolist() == [encode("abcd").tolist(), encode("efgh").tolist()]
    with pytest.raises(DDMError, match="seq_len"):
        sample_windows(x, 100, 1, torch.Generator())
