"""Provenance checks: a file is hashed as it is streamed, then loaded (io.load_tensors_hashed), with no copy of its
bytes held beside its tensors; data.json and the partition manifest are read once per check."""
import collections
import hashlib
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

import ddmkit.io
from ddmkit.data.arrays import ArrayData
from ddmkit.data.partition import partition_data
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors_hashed, save_tensors, write_json
from ddmkit.registry import checked_data_files, data_sha256, load_partition_checked

TENSORS = {"b": torch.randn(3, 2), "a": torch.arange(5), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
           "bool": torch.tensor([True, False, True]), "bf16": torch.randn(7).bfloat16(),
           "u8": torch.arange(3, dtype=torch.uint8)}


def test_a_hashed_load_gives_the_tensors_and_the_hash_of_the_file(tmp_path):
    data = save(TENSORS, metadata={"ddmkit": "{}"})
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    tensors, digest = load_tensors_hashed(path)
    assert digest == hashlib.sha256(data).hexdigest() and sorted(tensors) == sorted(TENSORS)
    for name, want in load(data).items():
        assert tensors[name].dtype == want.dtype and tensors[name].shape == want.shape, name
        assert torch.equal(tensors[name].float(), want.float()), name
    some, digest = load_tensors_hashed(path, keys=["a", "scalar", "absent"])
    assert digest == hashlib.sha256(data).hexdigest() and list(some) == ["a", "scalar"]


@pytest.mark.parametrize("keys", [None, ["labels"]])
def test_a_hashed_load_holds_no_copy_of_the_file(tmp_path, keys):
    """load_tensors_hashed held the file's bytes beside the tensors made of them: twice a sample set's memory. It
    hashes the file through a small buffer, then safetensors loads it (tracemalloc sees Python's allocations,
    not the tensors')."""
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
