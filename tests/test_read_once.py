"""Provenance checks read each file once: a data split is hashed as it is loaded (io.load_tensors_hashed), with
no copy of its bytes held beside its tensors; data.json and the partition manifest are read once per check; an
image evaluation of a latent run reads its train split once for both floors."""
import collections
import hashlib
import json
import re
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

import ddmkit.io
from ddmkit.data.arrays import ArrayData
from ddmkit.data.partition import partition_data
from ddmkit.errors import DDMError
from ddmkit.evaluation.images import SetScorer
from ddmkit.io import load_tensors_hashed, save_tensors, write_json
from ddmkit.registry import checked_data_files, data_sha256, load_data_file, load_partition_checked

TENSORS = {"b": torch.randn(3, 2), "a": torch.arange(5), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
           "bool": torch.tensor([True, False, True]), "bf16": torch.randn(7).bfloat16(),
           "u8": torch.arange(3, dtype=torch.uint8)}


def with_header(data: bytes, edit) -> bytes:
    """A safetensors file's bytes with its header JSON changed by edit(header) (in place), its data kept."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def test_a_hashed_load_gives_the_tensors_and_the_hash_of_the_file(tmp_path):
    data = save(TENSORS, metadata={"ddmkit": "{}"})
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    tensors, digest = load_tensors_hashed(path)
    assert digest == hashlib.sha256(data).hexdigest() and list(tensors) == sorted(TENSORS)
    for name, want in load(data).items():
        assert tensors[name].dtype == want.dtype and tensors[name].shape == want.shape, name
        assert torch.equal(tensors[name].float(), want.float()), name
    some, digest = load_tensors_hashed(path, keys=["a", "scalar", "absent"])  # the others read, hashed, dropped
    assert digest == hashlib.sha256(data).hexdigest() and list(some) == ["a", "scalar"]


@pytest.mark.parametrize("damage", [
    lambda data: data[:5],  # no header length
    lambda data: data[:20],  # in the header
    lambda data: data[:-1],  # in the data
    lambda data: data + b"\0\0\0",  # bytes no tensor holds
    lambda data: (2 ** 40).to_bytes(8, "little") + data[8:],  # a header longer than the file
    lambda data: data[:8] + b"[" + data[9:],  # a header that is not a JSON object
    lambda data: with_header(data, lambda h: h["b"].update(dtype="F99")),
    lambda data: with_header(data, lambda h: h["b"].update(shape=[3, 3])),
    lambda data: with_header(data, lambda h: (h["b"].update(shape=[4, 2]), h["a"].update(shape=[4]))),  # 32 + 32
    lambda data: with_header(data, lambda h: h["a"].update(data_offsets=[h["a"]["data_offsets"][0] + 8,
                                                                       h["a"]["data_offsets"][1] + 8])),
    lambda data: with_header(data, lambda h: h["__metadata__"].update(ddmkit=1)),
], ids=["5 bytes", "cut in the header", "cut in the data", "longer", "header length", "header not an object",
        "unknown dtype", "shape and offsets differ", "shapes of the same bytes in all", "a gap between tensors",
        "metadata not strings"])
def test_a_hashed_load_refuses_what_safetensors_refuses(tmp_path, damage):
    """The file is read by ddmkit's own reader (safetensors reads only whole bytes or a path): a file safetensors
    refuses is refused too, as corrupt, with the fix."""
    data = damage(save(TENSORS, metadata={"ddmkit": "{}"}))
    with pytest.raises(Exception):
        load(data)
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    said = f"{re.escape(str(path))} is corrupt or not a safetensors file .*; copy it back$"
    with pytest.raises(DDMError, match=said):
        load_tensors_hashed(path, "copy it back")


@pytest.mark.parametrize("keys", [None, ["labels"]])
def test_a_hashed_load_holds_no_copy_of_the_file(tmp_path, keys):
    """load_tensors_hashed held the file's bytes (and safetensors' copy of each tensor's) beside the tensors made
    of them: twice a sample set's memory. It reads into the tensors now, through a buffer of at most
    io.CHUNK bytes for a tensor not asked for (tracemalloc sees Python's allocations, not the tensors')."""
    path = tmp_path / "big.safetensors"
    save_tensors(path, {"x": torch.randn(4_000_000), "labels": torch.zeros(10, dtype=torch.int64)})  # 16 MB
    tracemalloc.start()
    try:
        tensors, _ = load_tensors_hashed(path, keys=keys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(tensors) == (keys or ["labels", "x"]) and peak < path.stat().st_size / 2, peak


def reads_of(monkeypatch) -> collections.Counter:
    """How many times ddmkit.io opens each file, by name, from now on (every read of a file, hashed or loaded,
    goes through ddmkit.io._existing_file first)."""
    reads, real = collections.Counter(), ddmkit.io._existing_file

    def counted(path, fix):
        reads[Path(path).name] += 1
        return real(path, fix)
    monkeypatch.setattr(ddmkit.io, "_existing_file", counted)
    return reads


def data_folder(tmp_path) -> Path:
    """A run's data folder: three splits and a data.json recording their SHA-256."""
    data = tmp_path / "data"
    for name in ("train", "test", "truth"):
        save_tensors(data / f"{name}.safetensors", {"x": torch.randn(20, 2), "labels": torch.zeros(20).long()})
    write_json(data / "data.json", {"sha256": data_sha256(data)})
    return data


def test_a_data_split_is_read_once_to_load_and_check_it(tmp_path, monkeypatch):
    """load_data_file loaded the split, then read it again to hash it (a split may be many GB)."""
    data = data_folder(tmp_path)
    reads = reads_of(monkeypatch)
    assert load_data_file(tmp_path, data / "train.safetensors")["x"].shape == (20, 2)
    assert load_data_file(tmp_path, data / "test.safetensors", ["labels"]).keys() == {"labels"}
    assert reads == {"train.safetensors": 1, "test.safetensors": 1, "data.json": 2}
    (data / "train.safetensors").write_bytes((data / "test.safetensors").read_bytes())  # still refused
    with pytest.raises(DDMError, match="train.safetensors: SHA-256 differs from the one .*data.json records"):
        load_data_file(tmp_path, data / "train.safetensors", ["labels"])


def test_the_data_files_are_checked_reading_data_json_once(tmp_path, monkeypatch):
    """checked_data_files read data.json again for each file it checked."""
    data = data_folder(tmp_path)
    reads = reads_of(monkeypatch)
    checked_data_files(tmp_path)
    assert reads == {"data.json": 1, "train.safetensors": 1, "test.safetensors": 1, "truth.safetensors": 1}
    (data / "truth.safetensors").write_bytes((data / "test.safetensors").read_bytes())
    with pytest.raises(DDMError, match="truth.safetensors: SHA-256 differs from the one .*data.json records"):
        checked_data_files(tmp_path)


def test_a_checked_partition_reads_its_manifest_once(tmp_path, monkeypatch):
    """load_partition_checked read manifest.json to validate it strictly, then load_partition read it again."""
    partition_data(ArrayData("x", torch.cat([torch.randn(40, 2), torch.randn(40, 2) + 6])), 2, tmp_path / "p")
    reads = reads_of(monkeypatch)
    manifest, tensors = load_partition_checked(tmp_path / "p")
    assert manifest["k"] == 2 and "centroids" in tensors
    assert reads["manifest.json"] == 1, reads


class Identity:
    """A stand-in autoencoder whose reconstructions are the images themselves."""
    encode = decode = staticmethod(lambda x: x)


def test_a_latent_runs_floors_read_the_train_split_once(tmp_path, monkeypatch):
    """SetScorer read the train split for the floor row's features, and reconstruction_floor read it again to
    encode the same images. The images are kept for it now (a run that is not latent keeps none)."""
    data = tmp_path / "data"
    save_tensors(data / "train.safetensors", {"x": torch.rand(50, 1, 4, 4) * 2 - 1})
    save_tensors(data / "test.safetensors", {"x": torch.rand(20, 1, 4, 4) * 2 - 1})
    write_json(data / "data.json", {"sha256": data_sha256(data)})
    assert SetScorer(tmp_path, "pixels", 10, 30, log=lambda _: None).floor_train is None  # not latent
    (tmp_path / "eval" / "reference_pixels.safetensors").unlink()
    write_json(tmp_path / "latents" / "latents.json", {})  # what makes a run folder latent (RunFolder.is_latent)
    reads = reads_of(monkeypatch)
    scorer = SetScorer(tmp_path, "pixels", 10, 30, log=lambda _: None)
    kept = scorer.reconstruction_floor(Identity())
    assert reads["train.safetensors"] == 1 and scorer.floor_train is None, reads  # read once; then let go
    (tmp_path / "eval" / "reference_pixels.safetensors").unlink()
    assert SetScorer(tmp_path, "pixels", 10, 30, log=lambda _: None).floor_train is None  # reconstructions cached
    (tmp_path / "eval" / "reconstructions.json").unlink()
    assert SetScorer(tmp_path, "pixels", 10, 30, log=lambda _: None).reconstruction_floor(Identity()) == kept
    assert reads["train.safetensors"] == 3  # features cached: read by the floor alone, the same images
    assert kept == {**scorer.floor(), "n": 30}  # identity reconstructions: the floor row's own scores
