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


# ----- fuzzing every file ddmkit reads, with NaN, infinities, other dtypes, huge integers, unknown
# kinds, wrong-kind paths and symbolic links (issue 19). Each check runs twice: a bounded number of
# examples in the default suite, many more in the slow target. Counts: --hypothesis-show-statistics.
import math  # noqa: E402
import tempfile  # noqa: E402

from pydantic import BaseModel  # noqa: E402

from ddmkit.config import MAX_SEED  # noqa: E402
from ddmkit.data import load_dataset  # noqa: E402

LONG = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

numbers = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2**70, 2**70)
           | st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, 2**64, 1e308, -0.0, float("nan"), float("inf")]))
odd_values = numbers | st.booleans() | st.none() | st.text(max_size=8) | st.lists(numbers, max_size=3)


def _leaves(model, prefix=()):
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from _leaves(f.annotation, (*prefix, name))
        else:
            yield (*prefix, name)


CONFIG_LEAVES = list(_leaves(RunConfig))


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def check_config_numbers(patches):
    raw: dict = {}
    for path, value in patches:
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    try:
        cfg = validate(RunConfig, raw)
    except DDMError as e:
        assert "invalid configuration" in str(e) or "strategy" in str(e)
        return
    dump = cfg.model_dump()
    for section in ("data", "partition", "expert", "router", "sample", "evaluate"):  # params/kwargs: checked later
        values = {k: v for k, v in dump[section].items() if k not in ("params",)}
        if section in ("expert", "router"):
            values = {k: v for k, v in values.items() if k != "net"}
        assert all(math.isfinite(x) and abs(x) <= MAX_SEED for x in _numbers(values)), values
    seeds = [dump["data"]["seed"], dump["partition"]["seed"], dump["expert"]["train"]["seed"],
             dump["router"]["train"]["seed"], dump["sample"]["seed"]]
    assert all(0 <= s <= MAX_SEED for s in seeds)


config_patches = st.lists(st.tuples(st.sampled_from(CONFIG_LEAVES), odd_values), max_size=6)
test_fuzz_config_numbers = FUZZ(given(config_patches)(check_config_numbers))
test_fuzz_config_numbers_long = pytest.mark.slow(LONG(given(config_patches)(check_config_numbers)))


def check_data_params(name, params):
    try:
        train, test = load_dataset(name, 50, 20, 0, params)
    except DDMError:
        return
    assert len(train) == 50 and torch.isfinite(train.x).all() and torch.isfinite(test.x).all()


param_keys = st.sampled_from(["k", "radius", "std", "side", "spacing", "dim", "separation", "seed", "noise",
                              "squares", "key", "path", "radiuss", ""])
data_params = st.dictionaries(param_keys, odd_values | st.integers(0, 6) | st.floats(0.05, 3), max_size=3)
data_names = st.sampled_from(["ring8", "grid25", "gmm32", "moons", "checkerboard"])
test_fuzz_data_params = FUZZ(given(data_names, data_params)(check_data_params))
test_fuzz_data_params_long = pytest.mark.slow(LONG(given(data_names, data_params)(check_data_params)))


def _good_partition(root: Path) -> Path:
    from ddmkit.data.arrays import ArrayData
    from ddmkit.data.partition import partition_data

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g) + 5])
    partition_data(ArrayData("x", x), 2, root / "partition")
    return root / "partition"


feature_specs = (st.fixed_dictionaries({"kind": st.sampled_from(["identity", "pca", "function", "tfidf_char_ngrams",
                                                                 "module", "", "PCA"])},
                                       optional={"dim": odd_values | st.integers(1, 4),
                                                 "function": st.text(max_size=12) | st.just("os:system")})
                 | json_values)
manifest_patches = st.dictionaries(st.sampled_from(["k", "counts", "features", "data_shape", "shards"]),
                                   feature_specs | st.lists(odd_values, max_size=3) | odd_values, max_size=3)
tensor_patches = st.dictionaries(st.sampled_from(["centroids", "cluster_means", "pca_mean", "assignments"]),
                                 st.tuples(st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int8,
                                                            torch.int64, torch.bool]),
                                           st.sampled_from([(2, 2), (3, 2), (2,), (0, 2), (2, 5)]),
                                           st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -1e30])),
                                 max_size=2)


def check_partition(patch, tensor_patch):
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = _good_partition(Path(tmp))
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, **patch}))
        tensors = load_file(str(folder / "partition.safetensors"))
        for name, (dtype, shape, value) in tensor_patch.items():
            tensors[name] = torch.full(shape, value).to(dtype)
        save_tensors(folder / "partition.safetensors", tensors)
        try:
            m, t = load_partition_checked(folder)
        except DDMError:
            return
        assert m["k"] == len(m["counts"]) and all(isinstance(c, int) and c >= 1 for c in m["counts"])
        assert m["features"]["kind"] in ("identity", "pca", "function", "tfidf_char_ngrams")
        assert t["centroids"].shape[0] == m["k"] and torch.isfinite(t["centroids"]).all()


test_fuzz_partitions = FUZZ(given(manifest_patches, tensor_patches)(check_partition))
test_fuzz_partitions_long = pytest.mark.slow(LONG(given(manifest_patches, tensor_patches)(check_partition)))


def check_weights(dtype, value, which):
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model = build_model("mlp", data_shape=[2], width=8, depth=1)
        save_pretrained(folder, model, {"role": "expert", "arch": "mlp", "data_shape": [2],
                                        "kwargs": {"data_shape": [2], "width": 8, "depth": 1}})
        state = load_file(str(folder / "model.safetensors"))
        name = sorted(state)[which % len(state)]
        state[name] = state[name].fill_(value).to(dtype) if dtype.is_floating_point else state[name].to(dtype)
        save_tensors(folder / "model.safetensors", state)
        try:
            loaded, _ = load_model(folder)
        except DDMError as e:
            assert "model.safetensors" in str(e)
            return
        assert dtype == torch.float32 and math.isfinite(value)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in loaded.state_dict().values())


weight_args = (st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32,
                                torch.uint8, torch.bool]),
               st.sampled_from([0.5, float("nan"), float("inf"), -float("inf"), 3e38]), st.integers(0, 50))
test_fuzz_weights = FUZZ(given(*weight_args)(check_weights))
test_fuzz_weights_long = pytest.mark.slow(LONG(given(*weight_args)(check_weights)))


def check_wrong_kind_paths(name, kind):
    """A model folder's or run folder's file replaced by a folder, a dangling link, a link to a folder
    or a link loop: a DDMError, never another exception."""
    from ddmkit.pipeline.prepare import run_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "model"
        model = build_model("mlp", data_shape=[2], width=8, depth=1)
        save_pretrained(folder, model, {"role": "expert", "arch": "mlp", "data_shape": [2],
                                        "kwargs": {"data_shape": [2], "width": 8, "depth": 1}})
        (tmp / "run").mkdir()
        (tmp / "run" / "config.json").write_text(json.dumps({"config": {}}))
        target = (folder / name) if name != "run config.json" else tmp / "run" / "config.json"
        target.unlink()
        if kind == "folder":
            target.mkdir()
        elif kind == "dangling link":
            target.symlink_to(tmp / "nowhere")
        elif kind == "link to a folder":
            target.symlink_to(tmp)
        else:
            target.symlink_to(target)
        with pytest.raises(DDMError):
            load_model(folder) if name != "run config.json" else run_config(tmp / "run")


test_fuzz_wrong_kind_paths = FUZZ(given(st.sampled_from(["config.json", "model.safetensors", "run config.json"]),
                                        st.sampled_from(["folder", "dangling link", "link to a folder", "link loop"]))
                                  (check_wrong_kind_paths))


def check_model_kwargs(kwargs):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model = build_model("mlp", data_shape=[2], width=8, depth=1)
        save_pretrained(folder, model, {"role": "expert", "arch": "mlp", "data_shape": [2],
                                        "kwargs": {"data_shape": [2], "width": 8, "depth": 1}})
        cfg = json.loads((folder / "config.json").read_text())
        cfg["kwargs"].update(kwargs)
        (folder / "config.json").write_text(json.dumps(cfg))
        try:
            load_model(folder)
        except DDMError:
            return
        assert all(cfg["kwargs"][k] == v for k, v in {"data_shape": [2], "width": 8, "depth": 1}.items())


model_kwargs = st.dictionaries(st.sampled_from(["width", "depth", "data_shape", "num_classes", "time_dim", "x"]),
                               odd_values | st.lists(st.integers(-3, 2**40), max_size=3), max_size=3)
test_fuzz_model_kwargs = FUZZ(given(model_kwargs)(check_model_kwargs))
test_fuzz_model_kwargs_long = pytest.mark.slow(LONG(given(model_kwargs)(check_model_kwargs)))


@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_that_is_a_symbolic_link_is_refused_and_nothing_is_written_where_it_points(tmp_path, dangling):
    """RUN/.lock a link to a file outside the run (or to no file yet): taking the lock would write this
    process's id there. Refused naming the link, the file it points to as it was (or still absent)."""
    from ddmkit.pipeline.stages import run_lock

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    if not dangling:
        victim.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(DDMError, match=r"\.lock is a symbolic link, not a lock file; remove it"):
        with run_lock(run):
            pass
    assert sorted(p.name for p in outside.iterdir()) == ([] if dangling else ["victim.txt"])
    assert dangling or victim.read_text() == "keep me\n"
    assert (run / ".lock").is_symlink()  # left for the user to look at and remove


def test_a_folder_where_the_lock_goes_is_named(tmp_path):
    """RUN/.lock as a folder gave the generic 'Is a directory: ...; check that path (its permissions, the free
    space of its disk)'."""
    from ddmkit.pipeline.stages import run_lock

    (tmp_path / "run" / ".lock").mkdir(parents=True)
    with pytest.raises(DDMError, match=r"\.lock is a folder, not a lock file; remove it"):
        with run_lock(tmp_path / "run"):
            pass


def test_kwargs_data_shape_other_than_the_folders_is_refused(tmp_path):
    """An MLP's kwargs.data_shape [1, 2] where the folder's data_shape is [2] fits the same weights (the inputs are
    flattened) but builds a network of other inputs: refused naming both (a fuzz draw found it loading)."""
    folder = tmp_path / "model"
    save_pretrained(folder, build_model("mlp", data_shape=[2], width=8, depth=1),
                    {"role": "expert", "arch": "mlp", "data_shape": [2],
                     "kwargs": {"data_shape": [2], "width": 8, "depth": 1}})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["kwargs"]["data_shape"] = [1, 2]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DDMError, match=r"kwargs.data_shape \[1, 2\] differs from its data_shape \[2\]"):
        load_model(folder)
