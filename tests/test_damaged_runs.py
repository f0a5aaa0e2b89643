"""Damaged, foreign and odd run folders given to the command line: every case is exit 2 with one message
naming the file (and field) and a fix that works, no traceback, and nothing deleted or half-written.
docs/reliability.md lists these promises and points here."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ddmkit.config import load_config, validate, RunConfig
from ddmkit.pipeline.prepare import prepare_run_dir
from ddmkit.pipeline.stages import (stage_data, stage_experts, stage_monolith, stage_partition, stage_registry,
                                    stage_router)

TINY = Path(__file__).parent / "configs" / "tiny.toml"
QUIET = lambda m: None  # noqa: E731


def tiny_config() -> RunConfig:
    """The tiny test config, smaller: k = 2, 20 steps per network, 100 samples per set."""
    raw = load_config(TINY).model_dump()
    raw["data"].update(n_train=400, n_test=400)
    raw["partition"]["k"] = 2
    raw["sample"].update(n=100, strategies=["monolith", "top-1"])
    for net in ("expert", "router"):
        raw[net]["train"].update(steps=20, warmup=2, log_every=10)
    return validate(RunConfig, raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained, registered run: data, partition, 2 experts, monolith, router, registry."""
    cfg = tiny_config()
    run = prepare_run_dir(tmp_path_factory.mktemp("damaged") / "run", cfg, log=QUIET)
    for stage in (stage_data, stage_partition, stage_experts, stage_monolith, stage_router, stage_registry):
        stage(cfg, run, QUIET)
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def files(root: Path) -> dict:
    """Every file under root (links as links) with its bytes; the run's lock aside."""
    return {p.relative_to(root): ("link" if p.is_symlink() else p.read_bytes())
            for p in root.rglob("*") if (p.is_symlink() or p.is_file()) and p.name != ".lock"}


def edit_json(path: Path, change) -> None:
    """The JSON file at path changed in place by change(data), or replaced by what it returns (not None)."""
    data = json.loads(path.read_text())
    new = change(data)
    path.write_text(json.dumps(data if new is None else new))


# ----- router and monolith folders: the user's files are never deleted ------------------------------------
@pytest.mark.parametrize("role", ["router", "monolith"])
def test_training_the_router_or_monolith_refuses_a_folder_of_other_files(run, ddmkit, role):
    """train-router / train-monolith deleted the files a user kept in RUN/router or RUN/monolith (the staged
    folder replaced it whole); expert folders were refused in that case."""
    folder = run / role
    shutil.rmtree(folder)
    (folder / "my_backup").mkdir(parents=True)
    (folder / "my_backup" / "w.bin").write_text("x")
    (folder / "NOTES.md").write_text("notes")
    before = files(run)
    code, _, err = ddmkit(f"train-{role}", run)
    assert code == 2 and f"{folder} holds files that are not the {role}'s (NOTES.md, my_backup)" in err, err
    assert "move them elsewhere" in err and files(run) == before
    shutil.rmtree(folder)  # the fix the message gives
    code, _, err = ddmkit(f"train-{role}", run)
    assert code == 0 and (folder / "model.safetensors").is_file(), err


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """A run of the same settings on other data (another data seed): another partition's shards."""
    cfg = tiny_config()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seed": cfg.data.seed + 1})})
    run = prepare_run_dir(tmp_path_factory.mktemp("other") / "run", cfg, log=QUIET)
    for stage in (stage_data, stage_partition, stage_monolith, stage_router):
        stage(cfg, run, QUIET)
    return run


@pytest.mark.parametrize("role", ["router", "monolith"])
def test_a_router_or_monolith_of_another_run_is_refused(run, other_run, ddmkit, role):
    """A router copied from another run was registered and used: it routed to the wrong experts (learned-router
    accuracy 0.36 -> 0.02) without a word. The router and monolith record the shards they trained on."""
    shutil.rmtree(run / role)
    shutil.copytree(other_run / role, run / role)
    code, _, err = ddmkit("register", run)
    assert code == 2 and f"{run / role}: trained on the shards of another partition" in err, err
    assert f"rm -r {run / role} && ddmkit train-{role} {run}" in err
    if role == "router":  # a run without a registry loads it unchecked, but not another run's router
        (run / "registry.json").unlink()
        code, _, err = ddmkit("sample", run, "--strategy", "top-1", "--n", 10)
        assert code == 2 and "trained on the shards of another partition" in err, err
    shutil.rmtree(run / role)  # the fix the message gives
    assert ddmkit(f"train-{role}", run)[0] == 0 and ddmkit("register", run)[0] == 0


def test_the_monolith_of_a_grown_run_is_the_one_trained_before_the_growth(run, other_run, ddmkit):
    """add-expert keeps the monolith trained on the shards before the growth (a reference): not refused."""
    shutil.rmtree(run / "monolith")
    shutil.copytree(other_run / "monolith", run / "monolith")
    (run / "grow.json").write_text(json.dumps({"format": "ddmkit-grow-1", "router": "learned", "events": []}))
    assert ddmkit("register", run)[0] == 0


@pytest.mark.parametrize("role", ["router", "monolith"])
def test_a_router_or_monolith_folder_cut_short_is_trained_again(run, ddmkit, role):
    """A copy cut short (the network's config.json and log, no weights) is the network's own: trained again."""
    (run / role / "model.safetensors").unlink()
    code, _, err = ddmkit(f"train-{role}", run)
    assert code == 0 and (run / role / "model.safetensors").is_file(), err


@pytest.mark.parametrize("role", ["router", "monolith"])
def test_a_file_where_the_router_or_monolith_goes_is_named_without_an_out_option(run, ddmkit, role):
    """A file there said 'move it away or choose another --out'; these commands have no --out."""
    folder = run / role
    shutil.rmtree(folder)
    folder.write_text("a file")
    code, _, err = ddmkit(f"train-{role}", run)
    assert code == 2 and f"{folder} is a file" in err and "move that file elsewhere" in err, err
    assert "--out" not in err and folder.read_text() == "a file"


# ----- symbolic links that lead nowhere --------------------------------------------------------------------
@pytest.mark.parametrize("place", ["experts/expert_01", "router", "partition/shards/cluster_01.safetensors"])
def test_a_link_loop_in_a_run_is_named_by_every_command(run, ddmkit, place):
    """A link to itself made verify, sample and evaluate fail with 'RuntimeError: Symlink loop' (a traceback),
    and register leave the folder out without a word."""
    path = run / place
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(path)
    before = files(run)
    for command in (["verify"], ["register"], ["sample", "--strategy", "top-1"]):
        code, _, err = ddmkit(*command, run)
        assert code == 2 and f"{path} is a symbolic link that leads nowhere" in err, (command, err)
        assert f"rm {path}" in err and files(run) == before, command


def test_a_dangling_expert_link_is_named_not_a_temporary_folder(run, ddmkit):
    """experts/expert_01 a link to nothing: register recorded it as missing, and launch then said 'Not a
    directory: RUN/experts/.expert_01.PID-HOST.R.tmp; check that path (its permissions, the free space of its
    disk)'. The fix it names now works: remove the link, and launch trains the expert again."""
    path = run / "experts" / "expert_01"
    shutil.rmtree(path)
    path.symlink_to(run / "nowhere")
    for command in ("register", "launch"):
        code, _, err = ddmkit(command, run)
        assert code == 2 and f"{path} is a symbolic link that leads nowhere" in err and ".tmp" not in err, err
    path.unlink()
    code, _, err = ddmkit("launch", run)
    assert code == 0 and (path / "model.safetensors").is_file(), err


@pytest.mark.parametrize("role", ["router", "monolith"])
def test_a_link_where_the_router_or_monolith_is_trained_is_named(run, ddmkit, role):
    """A link looping on itself said 'Not a directory: RUN/.router.PID-HOST.R.tmp; check that path (its
    permissions, ...)'."""
    folder = run / role
    shutil.rmtree(folder)
    folder.symlink_to(folder)
    code, _, err = ddmkit(f"train-{role}", run)
    assert code == 2 and f"{folder} is a symbolic link" in err and f"rm {folder}" in err, err
    assert ".tmp" not in err and folder.is_symlink()


def test_a_samples_link_loop_is_named_where_sets_are_written(run, ddmkit):
    """RUN/samples a link to itself: 'File exists: RUN/samples; check that path (its permissions, the free space
    of its disk)'."""
    shutil.rmtree(run / "samples", ignore_errors=True)
    (run / "samples").symlink_to(run / "samples")
    code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 2 and f"{run / 'samples'} is a symbolic link that leads nowhere" in err, err
    assert f"rm {run / 'samples'}" in err


# ----- a model folder's config.json with fields missing or of the wrong type ---------------------------------
def rehash(run: Path, model: str) -> None:
    """registry.json given the SHA-256 of MODEL's config.json as it is now (a registry edited by hand, or
    written past the checks), so that the commands after it read the file."""
    from ddmkit.io import sha256_file

    def change(reg):
        for m in reg["models"]:
            if m["path"] == model:
                m["config_sha256"] = sha256_file(run / model / "config.json")
    edit_json(run / "registry.json", change)


def drop(key):
    def change(config):
        del config[key]
    return change


def put(key, value):
    return lambda c: c.update({key: value})


def put_kwarg(key, value):
    return lambda c: c["kwargs"].update({key: value})


BAD_MODEL_CONFIGS = [  # (model folder, change of its config.json, what the message says after the file's path)
    ("experts/expert_01", drop("kwargs"), "invalid file kwargs: Field required"),
    ("experts/expert_01", put("kwargs", None), "invalid file kwargs: Input should be a valid dictionary"),
    ("experts/expert_01", put("kwargs", []), "invalid file kwargs: Input should be a valid dictionary"),
    ("experts/expert_01", put("data_shape", 2), "invalid file data_shape: Input should be a valid list"),
    ("experts/expert_01", put("data_shape", None), "has no data_shape"),
    ("experts/expert_01", put_kwarg("num_classes", "x"), "invalid file kwargs.num_classes: Input should be a valid "
                                                         "integer"),
    ("experts/expert_01", lambda c: [], "invalid file: expected a table (JSON object), got list"),
    ("experts/expert_01", put("cluster", "1"), "invalid file cluster: Input should be a valid integer"),
    ("experts/expert_01", put("cluster", None), 'cluster is null, but an expert\'s config.json records the cluster '
                                                'of the shard it was trained on; the folder is the slot of cluster 1: '
                                                'write "cluster": 1'),
    ("router", put("data_shape", None), "has no data_shape"),
    ("router", lambda c: [], "invalid file: expected a table (JSON object), got list"),
    ("router", put("k", "2"), "invalid file k: Input should be a valid integer"),
    ("monolith", put("data_shape", None), "has no data_shape"),
    ("monolith", put("prediction", 3), "invalid file prediction: Input should be a valid string"),
]


@pytest.mark.parametrize("model, change, said", BAD_MODEL_CONFIGS)
def test_register_verify_and_sample_name_the_file_and_field_of_a_bad_model_config(run, ddmkit, model, change, said):
    """config.json with a field missing or of the wrong type: register and verify gave tracebacks (KeyError,
    TypeError, AttributeError in ddm/load.py and registry.py), sample did too for some; register's traceback was
    the fix verify's 'SHA-256 differs ... run `ddmkit register`' led to."""
    path = run / model / "config.json"
    edit_json(path, change)
    registry = (run / "registry.json").read_bytes()
    code, _, err = ddmkit("register", run)
    assert code == 2 and f"{path}" in err and said in err, err
    assert (run / "registry.json").read_bytes() == registry  # nothing written
    rehash(run, model)
    strategy = "monolith" if model == "monolith" else "top-1"
    for command in (["verify"], ["sample", "--strategy", strategy]):
        code, _, err = ddmkit(*command, run)
        assert code == 2 and f"{run / model}" in err and said in err, (command, err)


def test_a_width_edited_in_an_experts_config_json_names_the_shapes_and_a_fix_that_works(run, trained, ddmkit):
    """An expert's kwargs.width edited by hand: verify says to run `ddmkit register`, which refused with "does not
    match its config.json (tensors [...] differ)" and no way out; now it names a tensor's two shapes and the fix."""
    path = run / "experts" / "expert_01" / "config.json"
    edit_json(path, put_kwarg("width", 48))
    registry = (run / "registry.json").read_bytes()
    code, _, err = ddmkit("register", run)
    assert code == 2 and f"{path.parent / 'model.safetensors'} does not match its config.json" in err, err
    assert "[32] in the weights, [48] as config.json builds it" in err and "copy the whole model folder again" in err
    assert (run / "registry.json").read_bytes() == registry
    shutil.rmtree(path.parent)
    shutil.copytree(trained / "experts" / "expert_01", path.parent)  # the fix the message gives
    code, _, err = ddmkit("verify", run)
    assert code == 0, err


def test_a_router_that_records_no_k_names_the_fix_that_works(run, ddmkit):
    """A router config.json without k said 'routes over None clusters ... retrain it with `ddmkit train-router
    RUN`', which answered 'is trained already'. The message names the folder to remove first, which works."""
    edit_json(run / "router" / "config.json", drop("k"))
    code, _, err = ddmkit("register", run)
    assert code == 2 and "router/config.json: the router routes over no number of clusters but the partition " \
        f"has 2; train it again: remove {run / 'router'}, then run `ddmkit train-router {run}`" in err, err
    shutil.rmtree(run / "router")
    code, _, err = ddmkit("train-router", run)
    assert code == 0, err
    code, _, err = ddmkit("verify", run)
    assert code == 0, err


def test_network_arguments_that_do_not_build_name_the_config_file(run, ddmkit):
    """kwargs.width "128": 'arch 'mlp': bad arguments {...}: TypeError ...' named no file, so a user could not tell
    which of the run's model folders it was."""
    path = run / "experts" / "expert_01" / "config.json"
    edit_json(path, put_kwarg("width", "128"))
    code, _, err = ddmkit("register", run)
    assert code == 2 and f"{path}: arch 'mlp': bad arguments" in err, err
    rehash(run, "experts/expert_01")
    code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 2 and f"{path}: arch 'mlp': bad arguments" in err, err


# ----- other files of the wrong shape ------------------------------------------------------------------------
def test_a_registry_that_is_not_an_object_is_named_by_sample(run, ddmkit):
    """registry.json `[]`: sample gave an AttributeError (it hashed the raw registry); verify named it."""
    (run / "registry.json").write_text("[]")
    code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 2 and f"{run / 'registry.json'}: invalid file: expected a table (JSON object), got list" in err, err


def test_a_manifest_k_that_is_a_string_is_named_with_a_fix_that_works(run, ddmkit):
    """partition/manifest.json k "2": sample gave a TypeError; verify and register blamed partition.safetensors.
    The message names the manifest and its field, and the fix it gives works."""
    manifest = run / "partition" / "manifest.json"
    edit_json(manifest, put("k", "2"))
    for command in (["sample", "--strategy", "top-1"], ["verify"], ["register"], ["evaluate"]):
        code, _, err = ddmkit(*command, run)
        assert code == 2 and f"{manifest}: invalid partition manifest k: Input should be a valid integer" in err, err
        assert "partition.safetensors" not in err
    assert f"remove {run / 'partition'} and run `ddmkit partition --config {run / 'config.json'} --out {run}`" in err
    shutil.rmtree(run / "partition")
    code, _, err = ddmkit("partition", "--config", run / "config.json", "--out", run)
    assert code == 0, err
    code, _, err = ddmkit("verify", run)
    assert code == 0, err


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_lost_shard_is_named_by_partition_and_made_again_as_the_message_says(run, ddmkit, damage):
    """A deleted shard: verify said 'copy it back or re-create it', and `ddmkit partition` on the run said 'holds
    this partition already ... nothing to do'; a truncated one said to partition again in a new run folder."""
    shard = run / "partition" / "shards" / "cluster_01.safetensors"
    shard.unlink() if damage == "deleted" else shard.write_bytes(shard.read_bytes()[:100])
    said = f"{shard} is missing (the shard of cluster 1)" if damage == "deleted" else f"{shard}: SHA-256 differs"
    for command in (["verify"], ["partition", "--config", run / "config.json", "--out"]):
        code, _, err = ddmkit(*command, run)
        assert code == 2 and said in err and "nothing to do" not in err, err
        assert f"remove {run / 'partition'} and run `ddmkit partition --config {run / 'config.json'} --out {run}`" \
            in err
    shutil.rmtree(run / "partition")
    code, _, err = ddmkit("partition", "--config", run / "config.json", "--out", run)
    assert code == 0 and shard.is_file(), err
    code, _, err = ddmkit("verify", run)
    assert code == 0, err


def test_a_sample_record_of_the_wrong_shape_is_named_with_its_fix(run, ddmkit):
    """samples/info.json {"top-1": []}: evaluate gave an AttributeError."""
    code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 0, err
    info = run / "samples" / "info.json"
    edit_json(info, put("top-1", []))
    code, _, err = ddmkit("evaluate", run)
    assert code == 2 and f"{info}: invalid record of the sample sets top-1: Input should be a valid dictionary" \
        in err and "to go on: delete it" in err, err
    info.unlink()  # the fix it names: delete it, then draw the sets again
    for command in (["sample", "--strategy", "top-1"], ["sample", "--strategy", "monolith"], ["evaluate"]):
        code, _, err = ddmkit(*command, run)
        assert code == 0, (command, err)


def test_a_grow_log_entry_of_the_wrong_shape_is_named(run, ddmkit, tmp_path):
    """grow.json events[0] "x": add-expert gave an AttributeError."""
    import numpy as np

    np.savez(tmp_path / "island.npz", x=np.random.default_rng(0).normal(size=(300, 2)).astype("float32") + 5)
    (run / "grow.json").write_text(json.dumps({"format": "ddmkit-grow-1", "router": "learned", "events": ["x"]}))
    before = files(run)
    code, _, err = ddmkit("add-expert", run, "--data", tmp_path / "island.npz", "--router", "stats")
    assert code == 2 and f"{run / 'grow.json'}: events[0] is 'x', not an entry of add-expert or replace-expert" in err
    assert files(run) == before


# ----- register writes nothing before its checks pass -------------------------------------------------------
@pytest.mark.parametrize("damage, said", [
    (lambda p: p.write_text("{"), "config.json is not valid JSON"),
    (lambda p: p.unlink(), "has no config.json"),
    (lambda p: edit_json(p, lambda c: c["config"]["partition"].update(k="2")), 'partition.k: "2" is text'),
    (lambda p: edit_json(p, lambda c: c["config"].update(colour="blue")), "colour: unknown field"),
])
def test_register_writes_nothing_when_the_runs_config_is_broken(run, ddmkit, damage, said):
    """register wrote registry.json, then exited 2 on RUN/config.json (a registry of 3 models instead of 4)."""
    shutil.rmtree(run / "experts" / "expert_01")
    damage(run / "config.json")
    registry = (run / "registry.json").read_bytes()
    code, _, err = ddmkit("register", run)
    assert code == 2 and said in err, err
    assert (run / "registry.json").read_bytes() == registry


def test_register_names_a_shard_changed_after_training_as_verify_does(run, trained, ddmkit, tmp_path):
    """A shard changed after the experts were trained: register wrote a registry that verify then refused. It names
    the changed shard, as verify does, and writes nothing; training that cluster's expert again on the changed
    shard is refused before it trains, naming the shard as changed (not as 'another partition's). A run without
    its shards (the data kept on the islands) is still registered."""
    from ddmkit.io import load_tensors, read_metadata, save_tensors

    shard = run / "partition" / "shards" / "cluster_01.safetensors"
    tensors, meta = load_tensors(shard), read_metadata(shard)
    save_tensors(shard, {**tensors, "x": tensors["x"] * 1.01}, metadata=meta)
    said = f"{shard}: SHA-256 differs from the one {run / 'partition' / 'manifest.json'} records for cluster 1"
    registry = (run / "registry.json").read_bytes()
    for command in ("verify", "register"):
        code, _, err = ddmkit(command, run)
        assert code == 2 and said in err and "another partition" not in err, err
    expert = run / "experts" / "expert_01"
    code, _, err = ddmkit("train-expert", shard, "--config", run / "config.json", "--out", expert, "--force")
    assert code == 2 and f"{shard}: SHA-256 differs from the one the run {run} records for cluster 1" in err \
        and "another partition" not in err, err  # refused before training, as register refuses the expert after
    code, _, err = ddmkit("register", run)
    assert code == 2 and said in err and "another partition" not in err, err
    assert (run / "registry.json").read_bytes() == registry
    gathered = Path(shutil.copytree(trained, tmp_path / "gathered"))
    for path in (gathered / "partition" / "shards").iterdir():
        path.unlink()
    assert ddmkit("register", gathered)[0] == 0


def test_sample_takes_the_settings_of_a_run_that_lost_its_config_from_config(run, ddmkit, tmp_path):
    """'give the run's TOML with --config CONFIG': evaluate took it, sample repeated the same error. Every
    command the message names now runs with --config."""
    saved = Path(shutil.copy(run / "config.json", tmp_path / "saved.json"))
    (run / "config.json").unlink()
    code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 2 and "has no config.json" in err, err
    code, _, err = ddmkit("sample", run, "--strategy", "top-1", "--config", saved)
    assert code == 0 and (run / "samples" / "top-1.safetensors").is_file(), err
    shutil.rmtree(run / "router")  # the other commands the message names
    for command in (["train-router", run], ["launch", run], ["evaluate", run]):
        code, _, err = ddmkit(*command, "--config", saved)
        assert code == 0, (command, err)
    assert (run / "router" / "model.safetensors").is_file() and (run / "report.md").is_file()


# ----- registry entries and expert folders the run does not have -------------------------------------------
def test_an_expert_folder_beyond_k_is_refused(run, ddmkit):
    """experts/expert_02 in a run of k = 2 was ignored without a word by verify, register and sample."""
    shutil.copytree(run / "experts" / "expert_01", run / "experts" / "expert_02")
    registry = (run / "registry.json").read_bytes()
    for command in (["verify"], ["register"], ["sample", "--strategy", "top-1"]):
        code, _, err = ddmkit(*command, run)
        assert code == 2 and f"{run / 'experts' / 'expert_02'} is the folder of an expert of cluster 02, but the " \
            "partition has 2 clusters (0 .. 1)" in err and f"move it out of {run / 'experts'}" in err, (command, err)
    assert (run / "registry.json").read_bytes() == registry
    shutil.rmtree(run / "experts" / "expert_02")
    code, _, err = ddmkit("verify", run)
    assert code == 0, err


def test_an_expert_folder_without_weights_is_named_alike_by_verify_and_sample_with_a_fix_that_works(run, ddmkit):
    """experts/expert_01 holding config.json but no model.safetensors (training stopped before writing them):
    verify said 'experts [1] are missing; copy them back', sample warned 'experts [1] of 2 are missing', neither
    naming the folder nor that training it again is the fix. Both now name it in the same words."""
    import re
    import shlex

    folder = run / "experts" / "expert_01"
    (folder / "model.safetensors").unlink()
    said = f"{folder} holds config.json but no model.safetensors: an unfinished or damaged expert"
    code, _, err = ddmkit("verify", run)
    assert code == 2 and said in err and "--allow-missing" in err, err
    commands = re.findall(r"train it again with `([^`]+)` \(it trains the run's missing experts\) or `([^`]+)`", err)
    assert len(commands) == 1, err
    with pytest.warns(UserWarning, match="of 2 are missing: sampling with the other 1") as warned:
        code, _, err = ddmkit("sample", run, "--strategy", "top-1", "--n", 8)  # goes on without it, as documented
    assert code == 0, err
    code, _, err = ddmkit("verify", run, "--allow-missing")
    assert code == 0, err
    for other in (" ".join(str(w.message) for w in warned), err):
        assert said in other and commands == re.findall(r"`([^`]+)` \(it trains the run's missing experts\) or "
                                                        r"`([^`]+)`", other), other
    launch, train_expert = (shlex.split(command) for command in commands[0])
    assert launch == ["ddmkit", "launch", str(run)], launch
    code, _, err = ddmkit(*train_expert[1:])  # the fix for this one expert
    assert code == 0 and (folder / "model.safetensors").is_file(), err
    for command in ("register", "verify"):
        code, _, err = ddmkit(command, run)
        assert code == 0 and said not in err, (command, err)


@pytest.mark.parametrize("edit, said", [
    (lambda r: r["models"].append(dict(r["models"][0])), "models: experts/expert_00 is listed twice (or more)"),
    (lambda r: r.update(k=3), "registry.json: k = 3, but the partition it records has 2 clusters"),
    (lambda r: r["models"][1].update(cluster="1"), "models.1.cluster: Input should be a valid integer"),
    (lambda r: r["models"][1].update(cluster=0, path="experts/expert_00"), "experts/expert_00 is listed twice"),
    (lambda r: r["models"][1].update(cluster=0), "the expert of cluster 0 is listed twice"),
])
def test_a_registry_listing_a_model_twice_or_another_k_is_refused(run, ddmkit, edit, said):
    """A duplicate entry gave 'verified 5 model folders' of a run of 4; k 9 and cluster "3" were accepted."""
    edit_json(run / "registry.json", edit)
    code, _, err = ddmkit("verify", run)
    assert code == 2 and said in err, err
    code, _, err = ddmkit("register", run)  # the fix the messages name
    assert code == 0, err
    code, _, err = ddmkit("verify", run)
    assert code == 0, err


def test_a_damaged_data_split_names_the_command_that_makes_it_again(run, ddmkit):
    """data/test.safetensors truncated: 're-train or re-copy it' (nothing to train)."""
    for command in (["sample", "--strategy", "top-1"], ["sample", "--strategy", "monolith"]):
        assert ddmkit(*command, run)[0] == 0
    split = run / "data" / "test.safetensors"
    split.write_bytes(split.read_bytes()[:100])
    code, _, err = ddmkit("evaluate", run)
    assert code == 2 and f"{split} is corrupt" in err and "re-train" not in err, err
    assert f"remove it, and `ddmkit partition --out {run} --config {run / 'config.json'}` makes it again" in err
    split.unlink()
    code, _, err = ddmkit("partition", "--out", run, "--config", run / "config.json")
    assert code == 0, err
    code, _, err = ddmkit("evaluate", run)
    assert code == 0, err


# ----- messages whose fix did not work -------------------------------------------------------------------------
@pytest.mark.parametrize("damage, said", [
    ("truncated weights", "model.safetensors is corrupt or not a safetensors file"),
    ("no config.json", "config.json is missing"), ("no weights", "model.safetensors is missing (or not a file)"),
    ("edited config.json", "model.safetensors does not match its config.json"),
])
def test_a_damaged_student_is_not_up_to_date_and_force_is_named(run, ddmkit, cli, damage, said):
    """distill said '.../students/dense is up to date' of a student whose weights were truncated or whose
    config.json was gone (it looked for model.safetensors alone); the report then failed, and running distill again
    did the same. --force, which works, was not named; then it was, on a second line after the model folder's
    own fix ('copy the whole model folder again, or remove the folder and train it again'). One message now:
    the folder, what is wrong, --force."""
    code, _, err = ddmkit("distill", run, "--steps", 2, "--no-report")
    assert code == 0, err
    dense = run / "students" / "dense"
    if damage == "truncated weights":
        weights = dense / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "no config.json":
        (dense / "config.json").unlink()
    elif damage == "no weights":
        (dense / "model.safetensors").unlink()
    else:
        edit_json(dense / "config.json", lambda c: c["kwargs"].update(width=c["kwargs"]["width"] * 2))
    done = cli("distill", run, "--steps", 2, "--no-report")
    err = done.stderr.strip()
    assert done.returncode == 2 and "up to date" not in err and "\n" not in err, err  # one message, one line
    assert err.startswith(f"error: {dense} is a damaged student: {dense}/{said}"), err
    assert err.endswith(f". Pass --force to remove {run / 'students'} (every student in it) and distill again"), err
    assert "copy" not in err and "train it again" not in err, err  # the model folder's own fix, not a student's
    code, _, err = ddmkit("distill", run, "--steps", 2, "--no-report", "--force")
    assert code == 0 and (dense / "config.json").is_file(), err


def test_damaged_analysis_records_are_measured_again(run, ddmkit):
    """analysis/strategies/top-1.json not JSON: analyze, the command that writes it, repeated 'not valid JSON ...;
    re-create it with the ddmkit command that wrote it', and has no --force."""
    analyze = ("analyze", run, "--strategy", "top-1", "--n", 16, "--max-steps", 2, "--jvp-rows", 4)
    code, _, err = ddmkit(*analyze)
    assert code == 0, err
    record = run / "analysis" / "strategies" / "top-1.json"
    record.write_text('{"key": ')
    (record.with_suffix(".safetensors")).write_bytes(b"damaged")
    code, _, err = ddmkit(*analyze)
    assert code == 0 and json.loads(record.read_text())["key"], err


def test_a_data_json_of_another_type_is_refused_in_one_line(run, ddmkit):
    """data/data.json holding JSON of another type (a list) gave a traceback from sample's memory check."""
    (run / "data" / "data.json").write_text("[]")
    code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 2 and err.startswith("error: ") and "holds no data_shape" in err and "\n" not in err.strip(), err


@pytest.mark.parametrize("damaged", ["config.json", "data/data.json"])
def test_a_run_file_that_is_not_json_names_a_fix_that_works(run, ddmkit, tmp_path, damaged):
    """RUN/config.json or data/data.json not JSON: 're-create it with the ddmkit command that wrote it' (`ddmkit
    run` and `partition` refused the folder, or failed on the same file)."""
    saved = Path(shutil.copy(run / "config.json", tmp_path / "saved.json"))
    (run / damaged).write_text('{"data": ')
    code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 2 and f"{run / damaged} is not valid JSON" in err and "command that wrote it" not in err, err
    if damaged == "config.json":
        assert "copy it back from another copy of the run" in err and "once this one is removed" in err
        (run / damaged).unlink()
        code, _, err = ddmkit("sample", run, "--strategy", "top-1", "--config", saved)
    else:
        assert f"remove it, and `ddmkit partition --out {run} --config {run / 'config.json'}` makes it again" in err
        (run / damaged).unlink()
        assert ddmkit("partition", "--out", run, "--config", run / "config.json")[0] == 0
        code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 0, err


# ----- a set file swapped for another ------------------------------------------------------------------------
def test_a_sample_set_copied_over_another_is_refused_by_evaluate(run, ddmkit):
    """samples/monolith.safetensors copied over top-1.safetensors: evaluate scored it as top-1 (the report's top-1
    row became the monolith's). info.json records each set's SHA-256 now; a record without one (an earlier
    ddmkit's) is scored as before."""
    for strategy in ("top-1", "monolith"):
        assert ddmkit("sample", run, "--strategy", strategy)[0] == 0
    top1 = run / "samples" / "top-1.safetensors"
    original = top1.read_bytes()
    shutil.copyfile(run / "samples" / "monolith.safetensors", top1)
    code, _, err = ddmkit("evaluate", run)
    assert code == 2 and f"{top1}: SHA-256 differs from the one {run / 'samples' / 'info.json'} records" in err, err
    assert f"draw it again with `ddmkit sample {run} --strategy top-1`" in err and not (run / "report.md").exists()
    top1.write_bytes(original)
    edit_json(run / "samples" / "info.json", lambda infos: [info.pop("sha256") for info in infos.values()] and None)
    code, _, err = ddmkit("evaluate", run)
    assert code == 0, err


def test_evaluate_hashes_and_loads_each_sample_set_once(run, ddmkit, monkeypatch):
    """evaluate hashed every set file to check its recorded SHA-256, then hashed and loaded it again. Each set is
    now hashed once, as it is streamed (no copy of its bytes beside its tensors), then loaded once (the check of
    the test above still refuses a changed set)."""
    import collections

    from ddmkit import io as ddmkit_io

    for strategy in ("top-1", "monolith"):
        assert ddmkit("sample", run, "--strategy", strategy)[0] == 0
    calls = collections.Counter()

    def counted(name, real):
        def call(path, *args, **kwargs):
            if Path(path).parent == run / "samples":
                calls[name, Path(path).name] += 1
            return real(path, *args, **kwargs)
        return call
    for name in ("sha256_file", "load_tensors"):
        monkeypatch.setattr(ddmkit_io, name, counted(name, getattr(ddmkit_io, name)))
    code, _, err = ddmkit("evaluate", run)
    assert code == 0, err
    assert calls == {(what, f"{s}.safetensors"): 1 for what in ("sha256_file", "load_tensors")
                     for s in ("top-1", "monolith")}


def test_the_command_add_expert_suggests_pastes_as_one_argument_per_path(run, ddmkit, tmp_path):
    """In a run folder named with a space, add-expert printed `ddmkit run RUN/config.json --out RUN ...` unquoted;
    pasted, it gave 'Got unexpected extra argument(s)'."""
    import re
    import shlex

    import numpy as np

    spaced = Path(shutil.move(run, tmp_path / "my run ü"))
    np.savez(tmp_path / "island.npz", x=np.random.default_rng(0).normal(size=(300, 2)).astype("float32") + 5,
             labels=np.zeros(300, dtype="int64"))
    code, _, err = ddmkit("add-expert", spaced, "--data", tmp_path / "island.npz", "--router", "stats")
    assert code == 0, err
    command = re.search(r"sample and score with `([^`]+)`", err).group(1)
    assert shlex.split(command) == ["ddmkit", "run", str(spaced / "config.json"), "--out", str(spaced), "--stages",
                                    "evaluate"], command


# ----- a data split swapped for another ----------------------------------------------------------------------
def test_a_data_split_swapped_for_another_file_is_refused_with_a_fix_that_works(run, ddmkit):
    """data/train.safetensors copied over data/test.safetensors (400 rows each: the same shapes): evaluate scored
    every set, and the floor, against the training rows. data.json records each data file's SHA-256 now; one
    without them (an earlier ddmkit's) is read as before."""
    from ddmkit.ddm.load import load_truth
    from ddmkit.errors import DDMError
    from ddmkit.io import load_tensors, save_tensors

    data, config = run / "data", run / "config.json"
    recorded = json.loads((data / "data.json").read_text())["sha256"]
    assert recorded == {name: hashlib.sha256((data / name).read_bytes()).hexdigest()
                        for name in ("train.safetensors", "test.safetensors", "truth.safetensors")}
    assert ddmkit("sample", run, "--strategy", "top-1")[0] == 0
    test = data / "test.safetensors"
    original = test.read_bytes()
    shutil.copyfile(data / "train.safetensors", test)
    for command in (["evaluate", run], ["verify", run], ["partition", "--out", run, "--config", config],
                    ["analyze", run, "--strategy", "top-1", "--n", 16, "--max-steps", 2, "--jvp-rows", 4],
                    ["distill", run, "--steps", 2]):
        code, _, err = ddmkit(*command)
        assert code == 2 and f"{test}: SHA-256 differs from the one {data / 'data.json'} records" in err, (command, err)
        assert f"Remove it, and `ddmkit partition --out {run} --config {config}` makes it again" in err
    assert not (run / "report.md").exists()
    test.unlink()  # the fix the message names: the same bytes made again
    code, _, err = ddmkit("partition", "--out", run, "--config", config)
    assert code == 0 and test.read_bytes() == original, err
    assert ddmkit("evaluate", run)[0] == 0
    truth = load_tensors(data / "truth.safetensors")  # the exact truth (its W2 and likelihood scores) too
    save_tensors(data / "truth.safetensors", {**truth, "means": truth["means"] + 1})
    with pytest.raises(DDMError, match="truth.safetensors: SHA-256 differs from the one .*data.json records"):
        load_truth(run)
    save_tensors(data / "truth.safetensors", truth)
    shutil.copyfile(data / "train.safetensors", test)
    edit_json(data / "data.json", lambda info: info.pop("sha256") and None)  # as an earlier ddmkit wrote it
    code, _, err = ddmkit("evaluate", run)
    assert code == 0, err


# ----- a config.json edited by hand ----------------------------------------------------------------------------
def test_a_config_json_whose_trained_settings_were_edited_is_refused(run, ddmkit, tmp_path):
    """RUN/config.json's expert.train.steps edited by hand after training: register, verify, sample, evaluate and
    the others went on under settings the networks were not made with. config.json records the SHA-256 of each
    section that made the data and networks; the error names the section, and each fix it names works."""
    config = run / "config.json"
    saved = json.loads(config.read_text())
    data = json.dumps(saved["config"]["data"], sort_keys=True)  # a section with no setting of how jobs run
    assert saved["trained_sha256"]["data"] == hashlib.sha256(data.encode()).hexdigest()
    original = config.read_bytes()
    edit_json(config, lambda c: c["config"]["expert"]["train"].update(steps=21))
    edited, before = config.read_bytes(), files(run)
    commands = [["register", run], ["verify", run], ["sample", run, "--strategy", "top-1"], ["evaluate", run],
                ["analyze", run, "--strategy", "top-1", "--n", 16], ["launch", run], ["train-router", run],
                ["train-monolith", run], ["run", config, "--out", run], ["partition", "--out", run, "--config", config]]
    for command in commands:
        code, _, err = ddmkit(*command)
        assert code == 2 and f"{config}: its [expert] settings were changed after the run was made" in err, err
        assert f"make a run of them in another folder: `ddmkit run {config} --out NEW_RUN`" in err
    assert files(run) == before
    code, _, err = ddmkit("run", config, "--out", tmp_path / "new", "--stages", "train")
    assert code == 0 and json.loads((tmp_path / "new" / "config.json").read_text())["config"]["expert"]["train"][
        "steps"] == 21, err
    config.write_bytes(original)  # the settings put back
    assert ddmkit("sample", run, "--strategy", "top-1")[0] == 0
    config.write_bytes(edited)
    code, _, err = ddmkit("run", config, "--out", run, "--stages", "train", "--force")  # the run made again
    assert code == 0 and ddmkit("verify", run)[0] == 0, err


def test_train_expert_refuses_a_run_config_json_edited_since(run, ddmkit, tmp_path):
    """`ddmkit train-expert SHARD --config RUN/config.json` (a SLURM task's command) trained under a config.json whose
    trained sections were edited by hand, and only the next command (sample, verify, ...) refused the run. It is
    refused before training now, naming the section, with nothing written; each fix it names works, and what may
    change (how the job runs, --set expert.*) still trains."""
    config, shard = run / "config.json", run / "partition" / "shards" / "cluster_00.safetensors"
    original, before = config.read_bytes(), files(run)
    for out in (run / "experts" / "expert_00", tmp_path / "island"):
        for section, edit in (("expert", lambda c: c["config"]["expert"]["train"].update(steps=21)),
                              ("partition", lambda c: c["config"]["partition"].update(k=3))):
            config.write_bytes(original)
            edit_json(config, edit)
            edited = config.read_bytes()
            code, _, err = ddmkit("train-expert", shard, "--out", out, "--config", config, "--resume", "--force")
            assert code == 2 and f"{config}: its [{section}] settings were changed after the run was made" in err, err
            assert f"make a run of them in another folder: `ddmkit run {config} --out NEW_RUN`" in err
            assert ("give them as --set (e.g. --set expert.train.steps=N)" in err) == (section == "expert"), err
            assert files(run) == {**before, Path("config.json"): edited} and not (tmp_path / "island").exists()
    config.write_bytes(original)  # the fixes: the settings put back, and the new ones given as --set
    code, _, err = ddmkit("train-expert", shard, "--out", tmp_path / "island", "--config", config,
                          "--set", "expert.train.steps=21")
    assert code == 0 and json.loads((tmp_path / "island" / "config.json").read_text())["train"]["steps"] == 21, err
    edit_json(config, lambda c: c["config"]["expert"]["train"].update(threads=2, checkpoint_every=5)
              or c["config"]["sample"].update(n=50))  # how the job runs, and [sample]: may be edited
    code, _, err = ddmkit("train-expert", shard, "--out", tmp_path / "job", "--config", config, "--resume",
                          "--set", "expert.train.log_every=5")
    assert code == 0 and (tmp_path / "job" / "model.safetensors").is_file(), err


def test_sample_and_evaluate_settings_may_be_edited_and_an_earlier_config_json_is_read_as_before(run, ddmkit):
    """What a resumed run may change ([sample], [evaluate], how the jobs run) may be edited in config.json; a
    config.json of an earlier ddmkit, which records no SHA-256 of its sections, is read unchecked."""
    config = run / "config.json"
    edit_json(config, lambda c: c["config"]["sample"].update(n=50) or c["config"]["evaluate"].update(chunk=25)
              or c["config"]["expert"]["train"].update(threads=2, device="cpu"))
    for command in (["verify", run], ["sample", run, "--strategy", "top-1"], ["evaluate", run]):
        code, _, err = ddmkit(*command)
        assert code == 0, (command, err)
    edit_json(config, lambda c: c.pop("trained_sha256") and c["config"]["expert"]["train"].update(steps=21))
    code, _, err = ddmkit("sample", run, "--strategy", "top-1")
    assert code == 0, err


def test_an_unfinished_experts_train_expert_command_names_the_shard_it_trains_on(tmp_path):
    """The train-expert command named for an expert folder without weights gives the shard that expert trains on:
    partition/shards/cluster_XX of a run on data, latents/cluster_XX of a latent run (its experts learn latents;
    the pixel shard is refused by train-expert with a latent config)."""
    import shlex

    from ddmkit.layout import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.expert(1).mkdir(parents=True)
    (folder.expert(1) / "config.json").write_text("{}")

    def shard_named() -> str:
        command = folder.unfinished_experts([1]).split("or `")[-1].rstrip("`")
        args = shlex.split(command)
        assert args[:2] == ["ddmkit", "train-expert"] and args[-2:] == ["--out", str(folder.expert(1))], args
        return args[2]

    assert shard_named() == str(folder.root / "partition" / "shards" / "cluster_01.safetensors")
    folder.latents.mkdir()
    folder.latent_info.write_text("{}")
    assert shard_named() == str(folder.root / "latents" / "cluster_01.safetensors")


def test_sample_refuses_an_n_whose_noise_and_samples_outgrow_the_memory(run, monkeypatch, cli):
    """`ddmkit sample --n N` whose noise and samples alone (2 x N x the data's numbers, float32) are more than the
    available memory is one error line naming --n and an --n that fits, before anything is drawn (the kernel
    killed the command without a word); the --n it names samples."""
    import ddmkit.pipeline.checks

    dim = json.loads((run / "data" / "data.json").read_text())["data_shape"]
    monkeypatch.setattr(ddmkit.pipeline.checks, "available_memory", lambda device: 1000 * 2 * 4 * dim[0])
    before = files(run)
    done = cli("sample", run, "--strategy", "top-1", "--n", 1001, "--steps", 2)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--n = 1001: its noise and samples alone would take" in done.stderr and "give --n 500 or less" in done.stderr
    assert files(run) == before
    assert cli("sample", run, "--strategy", "top-1", "--n", 500, "--steps", 2).returncode == 0


@pytest.mark.parametrize("scale", ["-1", "nan", "1001"])
def test_sample_refuses_a_guidance_out_of_its_range_with_the_range_and_a_scale_that_works(run, cli, scale):
    """`ddmkit sample --guidance -1` is one line with the range of scales and one that works (pydantic's 'Input
    should be greater than or equal to 0' gave neither), before anything is drawn."""
    before = files(run)
    done = cli("sample", run, "--strategy", "top-1", "--n", 4, "--steps", 2, "--guidance", scale)
    assert done.returncode == 2 and done.stderr == (f"error: --guidance: {scale} is outside 0 to 1000; give a scale "
                                                    "from 0 to 1000 (1: no guidance, the default; e.g. --guidance 2)\n"
                                                    ), done.stderr
    assert files(run) == before


def test_analyze_refuses_an_out_it_cannot_write_before_measuring(run, tmp_path, monkeypatch, cli):
    """`ddmkit analyze RUN --out FOLDER` where FOLDER's nearest existing folder cannot be written (a read-only disk:
    faked here, as root writes through permissions) is one error line naming --out, before any strategy is
    measured (it measured the first, then failed to write it); nothing is made there."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real(path, mode, **kw))
    done = cli("analyze", run, "--strategy", "top-1", "--n", 30, "--max-steps", 1, "--out", locked / "an")
    assert done.returncode == 2 and done.stderr == (f"error: --out {locked / 'an'}: {locked} cannot be written to (a "
                                                    "read-only file system, or not your folder); give --out a folder "
                                                    "you can write to\n"), done.stderr
    assert list(locked.iterdir()) == [] and "analyze top-1" not in done.stdout + done.stderr
