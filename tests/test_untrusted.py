"""Untrusted input: malformed configs, manifests and weight files give a clear
DDMError, never another exception, a crash or a partial write; torch.load and
pickle are never used."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddmkit.config import RunConfig, load_config, validate
from ddmkit.errors import DDMError
from ddmkit.io import save_tensors
from ddmkit.nets import build_model, save_pretrained
from ddmkit.registry import check_model_folder, load_model, load_partition_checked, verify_registry

SRC = Path(__file__).parents[1] / "src" / "ddmkit"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                          max_size=4), max_leaves=12)
config_keys = st.sampled_from(["data", "partition", "expert", "router", "sample", "evaluate", "monolith", "net",
                               "train", "steps", "k", "name", "strategies", "lr", "kwargs", "n_train"])
config_like = st.recursive(json_values, lambda inner: st.dictionaries(config_keys, inner, max_size=4), max_leaves=15)


@FAST
@given(config_like)
def test_malformed_config_dicts_raise_ddmerror(data):
    try:
        validate(RunConfig, data if isinstance(data, dict) else {"data": data})
    except DDMError as e:
        assert "invalid configuration" in str(e)


@FAST
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_malformed_config_files_raise_ddmerror(tmp_path, blob):
    for suffix in (".toml", ".json"):
        path = tmp_path / f"c{suffix}"
        path.write_bytes(blob)
        try:
            load_config(path)
        except DDMError:
            pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "model"
    model = build_model("mlp", data_shape=[2], width=8, depth=1)
    save_pretrained(folder, model, {"role": "expert", "arch": "mlp", "data_shape": [2],
                                    "kwargs": {"data_shape": [2], "width": 8, "depth": 1}})
    return folder


@FAST
@given(st.data())
def test_truncated_or_flipped_weights_raise_ddmerror(model_dir, tmp_path, data):
    blob = (model_dir / "model.safetensors").read_bytes()
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    cut = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.none() | st.integers(0, len(blob) - 1))
    damaged = bytearray(blob[:cut] if flip is None else blob)
    if flip is not None:
        damaged[flip] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(damaged))
    try:
        load_model(folder)
    except DDMError as e:
        assert "model.safetensors" in str(e) or "config.json" in str(e)


@FAST
@given(json_values | st.dictionaries(st.sampled_from(["arch", "kwargs", "data_shape", "time_convention"]),
                                     json_values, max_size=4))
def test_malformed_model_configs_raise_ddmerror(model_dir, tmp_path, cfg):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DDMError):
        check_model_folder(folder)


def test_model_config_that_builds_something_else_is_refused_before_allocating(model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["kwargs"]["width"] = 10**9  # would need petabytes if built for real
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DDMError, match="does not match its config.json|do not build"):
        load_model(folder)


def _partition(tmp_path: Path, manifest) -> Path:
    folder = tmp_path / "partition"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    save_tensors(folder / "partition.safetensors", {"centroids": torch.zeros(1, 2)})
    return folder


GOOD = {"k": 1, "counts": [3], "features": {"kind": "identity"}, "data_shape": [2],
        "shards": [{"cluster": 0, "path": "shards/cluster_00.safetensors", "count": 3, "sha256": "a" * 64}]}


@FAST
@given(st.dictionaries(st.sampled_from(sorted(GOOD)), json_values, max_size=5) | json_values)
def test_malformed_partition_manifests_raise_ddmerror(tmp_path, patch):
    manifest = {**GOOD, **patch} if isinstance(patch, dict) else patch
    try:
        load_partition_checked(_partition(tmp_path, manifest))
    except DDMError:
        pass


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "shards/../../x"])
def test_partition_shard_paths_cannot_escape(tmp_path, path):
    manifest = json.loads(json.dumps(GOOD))
    manifest["shards"][0]["path"] = path
    with pytest.raises(DDMError, match="leaves the run folder"):
        load_partition_checked(_partition(tmp_path, manifest))


@FAST
@given(json_values | st.dictionaries(st.sampled_from(["format", "ddmkit_version", "time_convention", "k", "models",
                                                      "partition_sha256"]), json_values, max_size=6))
def test_malformed_registries_raise_ddmerror(tmp_path, reg):
    (tmp_path / "registry.json").write_text(json.dumps(reg))
    with pytest.raises(DDMError):
        verify_registry(tmp_path)


def test_registry_path_escape_is_refused(tmp_path):
    _partition(tmp_path, GOOD)
    from ddmkit.io import sha256_file

    reg = {"format": "ddmkit-registry-1", "ddmkit_version": "0.1.0", "k": 1,
           "time_convention": __import__("ddmkit").TIME_CONVENTION,
           "partition_sha256": sha256_file(tmp_path / "partition" / "manifest.json"),
           "models": [{"name": "x", "role": "router", "path": "../elsewhere", "weights_sha256": "a" * 64,
                       "config_sha256": "b" * 64}]}
    (tmp_path / "registry.json").write_text(json.dumps(reg))
    with pytest.raises(DDMError, match="leaves the run folder"):
        verify_registry(tmp_path)


def test_bad_shard_leaves_no_partial_output(tmp_path):
    from ddmkit.config import ExpertConfig
    from ddmkit.train.jobs import train_expert

    shard = tmp_path / "shard.safetensors"
    shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    with pytest.raises(DDMError):
        train_expert(shard, ExpertConfig(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.safetensors"]


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(Exception):
        save_tensors(tmp_path / "w.safetensors", {"x": "not a tensor"})
    assert list(tmp_path.iterdir()) == []


def test_no_torch_load_or_pickle_in_the_package():
    pattern = re.compile(r"torch\.load\(|import pickle|pickle\.load|torch\.save\(|weights_only")
    hits = [f"{p}:{i}" for p in SRC.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and not line.lstrip().startswith("#")]
    assert hits == []


def test_loading_a_run_never_calls_torch_load(tmp_path, monkeypatch, model_dir):
    def refuse(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    load_model(model_dir)


def test_load_tensors_reads_only_the_keys_asked_for(tmp_path):
    import torch

    from ddmkit.errors import DDMError
    from ddmkit.io import load_tensors, save_tensors

    path = tmp_path / "t.safetensors"
    save_tensors(path, {"x": torch.arange(6.0).reshape(2, 3), "labels": torch.tensor([4, 7])})
    got = load_tensors(path, ["labels", "absent"])
    assert list(got) == ["labels"] and torch.equal(got["labels"], torch.tensor([4, 7]))
    path.write_bytes(path.read_bytes()[:20])  # truncated
    with pytest.raises(DDMError, match="corrupt"):
        load_tensors(path, ["labels"])
