"""Provenance checks read each file once: a file is hashed as it is loaded (io.load_tensors_hashed), with no copy
of its bytes held beside its tensors."""
import hashlib
import json
import re
import tracemalloc

import pytest
import torch
from safetensors.torch import load, save

from ddmkit.errors import DDMError
from ddmkit.io import load_tensors_hashed, save_tensors

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
