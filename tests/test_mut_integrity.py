"""Known-answer tests of ddmkit's integrity code: atomic writes, safetensors metadata, JSON reading, folder locks
(ddmkit.io), the registry's hashes and checks (ddmkit.registry) and the run folder's layout (ddmkit.layout)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ddmkit.io as io
from ddmkit.errors import DDMError
from ddmkit.io import (folder_lock, read_json, read_metadata, save_tensors, sha256_file, staging_dir, stale_staging,
                       write_bytes_atomic)
from ddmkit.layout import RunFolder, check_run_exists, is_run_folder, remake_partition, safe_name
from ddmkit.registry import (_same_release, check_model_folder, check_no_extra_experts, check_shard, safe_join,
                             verify_registry, write_registry)
from test_registry import small_run


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- atomic writes -------------------------------------------------------------
def test_an_atomic_write_leaves_exactly_the_bytes_with_an_ordinary_files_mode_and_nothing_beside(tmp_path):
    path = tmp_path / "f.bin"
    write_bytes_atomic(path, b"\x00ddm\xff" * 3)
    assert path.read_bytes() == b"\x00ddm\xff" * 3
    assert sha256_file(path) == sha(b"\x00ddm\xff" * 3)
    assert path.stat().st_mode & 0o777 == 0o666 & ~io.UMASK
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_an_atomic_write_syncs_the_closed_temporary_before_renaming_it(tmp_path, monkeypatch):
    """The bytes reach the disk under the temporary name, then the name is swapped: a crash leaves the old file or
    the new one, never an empty one under the final name."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (calls.append(("replace", Path(a).read_bytes())),
                                                        real_replace(a, b))[1])
    write_bytes_atomic(tmp_path / "f.bin", b"new")
    assert calls == ["fsync", ("replace", b"new")]


@pytest.mark.parametrize("failing", ["fsync", "replace", "data"])
def test_an_interrupted_write_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "f.json"
    path.write_bytes(b"old bytes")
    data: object = b"new bytes"
    if failing == "data":
        data = "not bytes"  # f.write raises TypeError
    else:
        def boom(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(io.os, failing, boom)
    with pytest.raises((KeyboardInterrupt, TypeError)):
        write_bytes_atomic(path, data)
    assert path.read_bytes() == b"old bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_an_atomic_write_onto_a_folder_is_a_ddm_error(tmp_path):
    (tmp_path / "f.json" / "inner").mkdir(parents=True)
    with pytest.raises(DDMError, match="is a folder, but a file is written there"):
        write_bytes_atomic(tmp_path / "f.json", b"{}")
    assert (tmp_path / "f.json" / "inner").is_dir()


def test_a_failed_staging_folder_leaves_the_old_folder_whole_and_no_temporary(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), staging_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "a.txt").read_text() == "old"


def test_a_failed_staging_folder_removes_the_empty_parents_it_made(tmp_path):
    with pytest.raises(RuntimeError), staging_dir(tmp_path / "a" / "b" / "out"):
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# ----- JSON and safetensors metadata ---------------------------------------------
def test_read_json_names_undecodable_bytes_and_folders_as_ddm_errors(tmp_path):
    (tmp_path / "bad.json").write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(DDMError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DDMError, match="dir.json is a folder"):
        read_json(tmp_path / "dir.json")


def test_metadata_is_one_sorted_json_string_under_the_ddmkit_key(tmp_path):
    t = {"w": torch.arange(3, dtype=torch.float32)}
    save_tensors(tmp_path / "a.safetensors", t, {"role": "expert", "cluster": 2})
    save_tensors(tmp_path / "b.safetensors", t, {"cluster": 2, "role": "expert"})
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"ddmkit": '{"cluster": 2, "role": "expert"}'}
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert read_metadata(tmp_path / "b.safetensors") == {"cluster": 2, "role": "expert"}


def test_metadata_that_is_no_json_object_is_a_ddm_error(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={"ddmkit": "[1, 2]"})
    with pytest.raises(DDMError, match="not a JSON object"):
        read_metadata(tmp_path / "m.safetensors")


def test_sha256_file_hashes_every_byte_of_a_file_of_several_chunks(tmp_path):
    data = bytearray(os.urandom(3 * (1 << 20) + 7))
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == sha(bytes(data))
    data[-1] ^= 1
    path.write_bytes(data)
    assert sha256_file(path) == sha(bytes(data))


# ----- folder locks --------------------------------------------------------------
def free_to_lock(path: Path) -> bool:
    """Whether another open of path can take its flock now."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_a_lock_is_released_and_its_file_removed_after_an_error(tmp_path):
    lock = tmp_path / "run" / ".lock"
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError), folder_lock(lock):
        assert lock.read_text().split()[0] == str(os.getpid())
        raise ValueError("failed inside")
    assert not lock.exists() and str(lock) not in io._HELD and os.path.abspath(lock) not in io._HELD
    assert free_to_lock(lock)
    with folder_lock(lock):  # taken again at once
        assert lock.exists()
    assert not lock.exists()


def test_a_nested_hold_that_fails_keeps_the_outer_hold(tmp_path):
    lock = tmp_path / ".lock"
    key = os.path.abspath(lock)
    with folder_lock(lock):
        with contextlib.suppress(ValueError), folder_lock(lock):
            assert io._HELD[key][1] == 2
            raise ValueError
        assert io._HELD[key][1] == 1 and lock.exists()
    assert key not in io._HELD and not lock.exists()


def test_a_lock_held_by_another_open_file_is_refused(tmp_path):
    lock = tmp_path / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DDMError, match="is in use by"), folder_lock(lock):
            pass
    finally:
        os.close(fd)


# ----- stale temporaries ---------------------------------------------------------
def test_stale_staging_keeps_another_machines_temporary_and_lists_a_dead_writers_folder_once(tmp_path):
    dead = 2**22 + 12345  # above any pid_max default: no such process
    other_host = "abcdef" if io.HOST != "abcdef" else "fedcba"
    theirs = tmp_path / f".x.json.{dead}-{other_host}.0000.tmp"
    mine = tmp_path / f".out.{dead}-{io.HOST}.1111.tmp"
    theirs.write_text("")
    mine.mkdir()
    (mine / f".inner.{dead}-{io.HOST}.2222.tmp").write_text("")
    assert stale_staging(tmp_path) == [mine]


# ----- the run folder's layout ---------------------------------------------------
def test_check_run_exists_names_a_file_and_a_model_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DDMError, match="is a file, not a run folder"):
        check_run_exists(tmp_path / "f")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(DDMError, match="is a model folder"):
        check_run_exists(model)
    (model / "partition").mkdir()
    check_run_exists(model)  # a run that happens to hold those files


def test_a_run_folder_needs_both_its_config_and_its_partition(tmp_path):
    assert not is_run_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not is_run_folder(tmp_path)
    (tmp_path / "partition").mkdir()
    assert is_run_folder(tmp_path)
    (tmp_path / "config.json").unlink()
    assert not is_run_folder(tmp_path)


def test_layout_names(tmp_path):
    assert safe_name("top-2 @ cfg 2.5/x") == "top-2___cfg_2.5_x"
    run = RunFolder(tmp_path)
    assert run.expert(3) == tmp_path / "experts" / "expert_03"
    assert run.derived == [tmp_path / n for n in ("samples", "eval", "analysis", "plots", "report.md",
                                                  "metrics.json")]
    (tmp_path / "experts" / "expert_01").mkdir(parents=True)
    assert run.misnamed_experts([1]) == ""  # its own folder is not misnamed
    (tmp_path / "experts" / "Expert-2").mkdir()
    assert run.misnamed_experts([1, 2]) == (f"; {tmp_path / 'experts' / 'Expert-2'} looks like expert 2's folder, "
                                            f"misnamed: rename it to {run.expert(2)}")
    assert remake_partition(run).startswith("make the partition again")
    (tmp_path / "grow.json").write_text("{}")
    assert remake_partition(run).startswith("copy the run's partition/ folder back whole")


# ----- the registry --------------------------------------------------------------
def test_same_release_compares_major_and_minor():
    assert _same_release("1.4.0", "1.4.9") and not _same_release("1.4.0", "1.5.0")
    assert not _same_release("1.4.0", "2.4.0")


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "a/../b", "~/x", "/etc", "a\\b", ""])
def test_safe_join_refuses_paths_that_leave_the_run(tmp_path, rel):
    """Any '..' is refused by name, even one that would come back inside."""
    with pytest.raises(DDMError, match="leaves the run folder|not a relative path inside"):
        safe_join(tmp_path, rel)


def test_safe_join_keeps_a_path_inside(tmp_path):
    assert safe_join(tmp_path, "a/b") == tmp_path / "a" / "b"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("integrity") / "run")


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def model_files(run: Path) -> list[str]:
    reg = json.loads((run / "registry.json").read_text())
    return sorted(str(p.relative_to(run)) for m in reg["models"] for p in (run / m["path"]).iterdir()
                  if p.suffix in (".json", ".safetensors"))


def changed_one_byte(path: Path) -> None:
    """path with one byte changed: a JSON file's final newline made a space (still the same JSON), any other file's
    last byte flipped."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".json":
        assert data[-1:] == b"\n"
        data[-1:] = b" "
    else:
        data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_the_registry_records_the_sha256_of_each_model_file(run):
    reg = json.loads((run / "registry.json").read_text())
    files = {"weights_sha256": "model.safetensors", "config_sha256": "config.json",
             "statistics_sha256": "statistics.safetensors"}
    for m in reg["models"]:
        for field, name in files.items():
            path = run / m["path"] / name
            assert m[field] == (sha(path.read_bytes()) if path.exists() else None), (m["path"], field)
    assert reg["partition_sha256"] == sha((run / "partition" / "manifest.json").read_bytes())
    assert len(model_files(run)) == 4 * 3 + 2


def test_verify_detects_one_changed_byte_in_any_file_of_any_model_folder(run, tmp_path):
    for rel in model_files(run):
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(run, copy)
        changed_one_byte(copy / rel)
        with pytest.raises(DDMError, match="SHA-256 differs"):
            verify_registry(copy)


def test_verify_detects_one_changed_byte_in_any_shard_or_data_file(run, tmp_path):
    files = sorted(str(p.relative_to(run)) for p in [*(run / "partition" / "shards").iterdir(),
                                                      *(run / "data").glob("*.safetensors")])
    assert len(files) == 4 + 3
    for rel in files:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(run, copy)
        changed_one_byte(copy / rel)
        verify_registry(copy)  # the model folders alone are checked
        with pytest.raises(DDMError, match="SHA-256 differs"):
            verify_registry(copy, shards=True)


def test_verify_detects_a_manifest_rewritten_to_the_same_content(copy):
    manifest = copy / "partition" / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=1))
    with pytest.raises(DDMError, match="partition manifest changed"):
        verify_registry(copy)


def test_a_data_file_that_data_json_does_not_record_is_refused(copy):
    info = json.loads((copy / "data" / "data.json").read_text())
    del info["sha256"]["test.safetensors"]
    (copy / "data" / "data.json").write_text(json.dumps(info))
    with pytest.raises(DDMError, match="test.safetensors: SHA-256 differs.*records none"):
        verify_registry(copy, shards=True)


def test_a_model_listed_twice_is_refused(copy):
    reg = json.loads((copy / "registry.json").read_text())
    router = next(m for m in reg["models"] if m["role"] == "router")
    (copy / "registry.json").write_text(json.dumps({**reg, "models": [*reg["models"], router]}))
    with pytest.raises(DDMError, match="models: router is listed twice"):
        verify_registry(copy)
    expert = {**reg["models"][0], "path": "experts/elsewhere"}  # one cluster's expert in two places
    (copy / "registry.json").write_text(json.dumps({**reg, "models": [*reg["models"], expert]}))
    with pytest.raises(DDMError, match="models: the expert of cluster 0 is listed twice"):
        verify_registry(copy)


def test_an_expert_folder_one_past_the_last_cluster_is_refused(copy):
    shutil.copytree(copy / "experts" / "expert_03", copy / "experts" / "expert_04")
    with pytest.raises(DDMError, match="expert_04 is the folder of an expert of cluster 04"):
        check_no_extra_experts(copy, 4)
    with pytest.raises(DDMError, match="expert_04"):
        write_registry(copy)


def test_check_model_folder_refuses_a_file_and_weights_of_another_dtype(copy):
    with pytest.raises(DDMError, match="is not a model folder"):
        check_model_folder(copy / "experts" / "expert_00" / "model.safetensors")
    w = copy / "experts" / "expert_00" / "model.safetensors"
    tensors = {k: v.double() for k, v in io.load_tensors(w).items()}
    save_tensors(w, tensors, read_metadata(w))
    with pytest.raises(DDMError, match="is F64 but the network's is F32"):
        check_model_folder(w.parent)



@pytest.mark.parametrize("damage, own", [
    ("time convention", "; convert the model before mixing it"),
    ("dtype", ": re-train or re-export them"),
    ("identity", ". Copy whole model folders (config.json with its model.safetensors)"),
    ("not JSON", "; copy the whole model folder again, or remove the folder and train it again"),
])
def test_check_model_folder_ends_with_the_fix_it_is_given(copy, damage, own):
    """A caller's fix (distill's --force for a student) ends every message of check_model_folder in place of the
    folder's own, which is kept where none is given (distill cut it off with a regex before)."""
    folder = copy / "experts" / "expert_00"
    w = folder / "model.safetensors"
    if damage == "time convention":
        edit = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**edit, "time_convention": "cosine"}))
    elif damage == "dtype":
        save_tensors(w, {k: v.double() for k, v in io.load_tensors(w).items()}, read_metadata(w))
    elif damage == "identity":
        save_tensors(w, io.load_tensors(w), {**read_metadata(w), "cluster": 7})
    else:
        (folder / "config.json").write_text("{")
    with pytest.raises(DDMError) as own_fix:
        check_model_folder(folder)
    assert str(own_fix.value).endswith(own), own_fix.value
    with pytest.raises(DDMError) as given:
        check_model_folder(folder, "Pass --force")
    assert str(given.value) == str(own_fix.value).removesuffix(own) + ". Pass --force", given.value

def test_published_statistics_the_registry_does_not_record_or_that_are_gone_are_refused(copy):
    reg = json.loads((copy / "registry.json").read_text())
    reg["models"][0]["statistics_sha256"] = None  # added after registering
    (copy / "registry.json").write_text(json.dumps(reg))
    with pytest.raises(DDMError, match="statistics.safetensors: SHA-256 differs.*which records none"):
        verify_registry(copy)
    write_registry(copy)
    (copy / "experts" / "expert_01" / "statistics.safetensors").unlink()
    with pytest.raises(DDMError, match="expert_01/statistics.safetensors is missing"):
        verify_registry(copy)


def test_weights_of_another_shape_are_refused(copy):
    w = copy / "experts" / "expert_00" / "model.safetensors"
    tensors = io.load_tensors(w)
    name = sorted(tensors)[0]
    tensors[name] = torch.cat([tensors[name].reshape(-1), torch.zeros(1)])
    save_tensors(w, tensors, read_metadata(w))
    with pytest.raises(DDMError, match=f"does not match its config.json .tensors \\['{name}'\\] differ"):
        check_model_folder(w.parent)


def test_an_expert_trained_on_another_clusters_shard_is_refused():
    shards = {0: "a" * 64, 1: "b" * 64}
    check_shard("experts/expert_01", 1, "b" * 64, shards)
    with pytest.raises(DDMError, match="trained on the shard of cluster 0 of this partition, not of cluster 1"):
        check_shard("experts/expert_01", 1, "a" * 64, shards)
    with pytest.raises(DDMError, match="belongs to another partition: .* or remove the folder and `ddmkit launch RUN` "
                       "trains it again"):  # a fix that works: launch trains a missing expert, not one in place
        check_shard("experts/expert_01", 1, "c" * 64, shards)


def test_expert_router_and_monolith_folders_added_after_registering_are_refused(copy):
    reg = json.loads((copy / "registry.json").read_text())
    reg["models"] = [m for m in reg["models"] if m["path"] not in ("experts/expert_02", "router")]
    (copy / "registry.json").write_text(json.dumps(reg))
    with pytest.raises(DDMError, match=r"does not list experts \[2\], but their folders are there"):
        verify_registry(copy)
    shutil.rmtree(copy / "experts" / "expert_02")
    with pytest.raises(DDMError, match="does not list the router"):
        verify_registry(copy)
    shutil.copytree(copy / "router", copy / "monolith")
    shutil.rmtree(copy / "router")
    with pytest.raises(DDMError, match="does not list the monolith"):
        verify_registry(copy)
    shutil.rmtree(copy / "monolith")
    assert verify_registry(copy) == {"missing": [2], "verified": [m["path"] for m in reg["models"]]}
    with pytest.raises(DDMError, match=r"experts \[2\] are missing"):
        verify_registry(copy, allow_missing=False)


def test_a_registry_whose_k_was_edited_is_refused(copy):
    reg = json.loads((copy / "registry.json").read_text())
    (copy / "registry.json").write_text(json.dumps({**reg, "k": 5}))
    with pytest.raises(DDMError, match="k = 5, but the partition it records has 4 clusters"):
        verify_registry(copy)
