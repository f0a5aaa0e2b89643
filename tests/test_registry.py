"""The expert registry, missing experts at sampling time."""
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from ddmkit.config import load_config
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors, read_metadata, save_tensors
from ddmkit.ddm import load_ddm
from ddmkit.pipeline.prepare import prepare_run_dir
from ddmkit.pipeline.stages import stage_data, stage_experts, stage_partition, stage_registry, stage_router
from ddmkit.ddm.sampling import sample_ddm
from ddmkit.registry import safe_join, verify_registry, write_registry

TINY = Path(__file__).parent / "configs" / "tiny.toml"


def small_config():
    """The tiny config, 20 steps for each network."""
    cfg = load_config(TINY)
    short = {"steps": 20, "warmup": 2, "log_every": 10}
    return cfg.model_copy(update={
        "expert": cfg.expert.model_copy(update={"train": cfg.expert.train.model_copy(update=short)}),
        "router": cfg.router.model_copy(update={"train": cfg.router.train.model_copy(update=short)})})


def small_run(root: Path) -> Path:
    """partition, 4 experts, router and registry of the tiny config, 20 steps each."""
    cfg = small_config()
    run = prepare_run_dir(root, cfg)
    quiet = lambda m: None  # noqa: E731
    for stage in (stage_data, stage_partition, stage_experts, stage_router, stage_registry):
        stage(cfg, run, quiet)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("reg") / "run")


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_registry_lists_every_model_with_hashes(run):
    reg = json.loads((run / "registry.json").read_text())
    experts = [m for m in reg["models"] if m["role"] == "expert"]
    assert len(experts) == 4 and {m["name"] for m in reg["models"]} >= {"expert_00", "router"}
    manifest = json.loads((run / "partition" / "manifest.json").read_text())
    assert [m["shard_sha256"] for m in experts] == [s["sha256"] for s in manifest["shards"]]
    assert reg["time_convention"].startswith("linear") and reg["ddmkit_version"]
    assert verify_registry(run) == {"missing": [], "verified": [m["path"] for m in reg["models"]]}


def test_changed_weights_or_config_are_refused(copy):
    w = copy / "experts" / "expert_02" / "model.safetensors"
    tensors = load_tensors(w)
    save_tensors(w, {name: t + 0.01 for name, t in tensors.items()}, read_metadata(w))  # retrained, say
    with pytest.raises(DDMError, match="expert_02.*SHA-256 differs"):
        load_ddm(copy)
    write_registry(copy)  # `ddmkit register` accepts the change explicitly
    load_ddm(copy)


def test_weights_copied_from_another_expert_folder_are_refused(copy):
    """model.safetensors of expert 3 copied into expert 2's folder (its config.json kept) passed register,
    verify and sampling: the checks read config.json only, and the samples were silently worse."""
    w = copy / "experts" / "expert_02" / "model.safetensors"
    assert read_metadata(w) == {"role": "expert", "cluster": 2,
                                "shard_sha256": json.loads((w.parent / "config.json").read_text())["shard_sha256"]}
    shutil.copyfile(copy / "experts" / "expert_03" / "model.safetensors", w)
    said = r"expert_02/model.safetensors is not the weights of its config.json: they were written for cluster 3 " \
           r"\(config.json: 2\), shard_sha256 '[0-9a-f]{64}' \(config.json: '[0-9a-f]{64}'\); one of the two " \
           r"was copied from another model folder"
    with pytest.raises(DDMError, match=said):
        write_registry(copy)
    (copy / "registry.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no registry.json
        with pytest.raises(DDMError, match=said):
            load_ddm(copy)


def test_registering_non_finite_weights_is_refused(copy):
    from ddmkit.io import load_tensors, save_tensors
    w = copy / "experts" / "expert_01" / "model.safetensors"
    state = load_tensors(w)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    save_tensors(w, state)
    before = (copy / "registry.json").read_bytes()
    with pytest.raises(DDMError, match=f"expert_01.*{name}.*NaN"):
        write_registry(copy)
    assert (copy / "registry.json").read_bytes() == before  # nothing registered


def test_training_again_never_registers_a_changed_file(copy, monkeypatch, capsys):
    """`ddmkit run` / `launch` train what a run lacks and register it again: a registered file changed since
    is refused first (not vouched for by the new registry); a listed folder that is gone is trained again."""
    from ddmkit.pipeline.run import train_stages

    quiet = lambda m: None  # noqa: E731
    before = (copy / "registry.json").read_bytes()
    shutil.rmtree(copy / "router")
    train_stages(small_config(), copy, quiet)  # the router, trained again, and registered
    assert (copy / "router" / "model.safetensors").exists() and verify_registry(copy)["missing"] == []
    w = copy / "experts" / "expert_02" / "model.safetensors"
    w.write_bytes((copy / "experts" / "expert_03" / "model.safetensors").read_bytes())
    registered = (copy / "registry.json").read_bytes()
    with pytest.raises(DDMError, match="expert_02.*SHA-256 differs"):
        train_stages(small_config(), copy, quiet)
    assert (copy / "registry.json").read_bytes() == registered and registered != before
    from ddmkit.cli import main

    monkeypatch.setattr("sys.argv", ["ddmkit", "launch", str(copy)])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 2 and "SHA-256 differs" in capsys.readouterr().err
    assert (copy / "registry.json").read_bytes() == registered


def test_expert_from_another_partition_is_refused(copy):
    cfg_path = copy / "experts" / "expert_01" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["shard_sha256"] = "0" * 64
    cfg_path.write_text(json.dumps(cfg))
    weights = cfg_path.parent / "model.safetensors"  # the whole folder of an expert of another partition
    save_tensors(weights, load_tensors(weights), {**read_metadata(weights), "shard_sha256": "0" * 64})
    before = (copy / "registry.json").read_bytes()
    with pytest.raises(DDMError, match=r"expert_01: trained on shard 000000000000\.\.\. .*another partition"):
        write_registry(copy)  # `ddmkit register` refuses it: nothing could load it
    assert (copy / "registry.json").read_bytes() == before
    from ddmkit.io import sha256_file

    reg = json.loads(before)  # a registry that lists it all the same (written by hand) is refused on load
    entry = next(m for m in reg["models"] if m["name"] == "expert_01")
    entry.update(shard_sha256="0" * 64, config_sha256=sha256_file(cfg_path), weights_sha256=sha256_file(weights))
    (copy / "registry.json").write_text(json.dumps(reg))
    with pytest.raises(DDMError, match="another partition"):
        verify_registry(copy)


def test_a_registered_expert_replaced_by_one_register_refuses_names_the_fix_that_works(copy, ddmkit, tmp_path):
    """An expert folder replaced by another cluster's expert or another partition's: `verify`, `sample` and
    `launch` said to run `ddmkit register` "if the change is intended", which then refused the folder."""
    experts = copy / "experts"
    other = tmp_path / "other"  # an expert of another partition: its config and weights record another shard
    shutil.copytree(experts / "expert_01", other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "shard_sha256": "0" * 64}))
    weights = other / "model.safetensors"
    save_tensors(weights, load_tensors(weights), {**read_metadata(weights), "shard_sha256": "0" * 64})
    fixes = {experts / "expert_02": "move the folder to experts/expert_02, or copy the right expert here",
             other: "another partition: copy the expert trained on this partition's shard, or remove the folder "
                    "and `ddmkit launch RUN` trains it again"}
    for replacement, fix in fixes.items():
        shutil.rmtree(experts / "expert_01")
        shutil.copytree(replacement, experts / "expert_01")
        for command in ("verify", "sample", "launch"):
            code, _, err = ddmkit(command, copy)
            assert code == 2 and "SHA-256 differs" in err and fix in err, (command, err)
            assert "`ddmkit register` refuses what it holds now" in err and "if the change is intended" not in err
        code, _, err = ddmkit("register", copy)
        assert code == 2 and fix in err, err
    shutil.rmtree(experts / "expert_01")
    w = experts / "expert_02" / "model.safetensors"  # its own expert, trained again: registering is the fix
    save_tensors(w, {name: t + 0.01 for name, t in load_tensors(w).items()}, read_metadata(w))
    code, _, err = ddmkit("verify", "--allow-missing", copy)
    assert code == 2 and "run `ddmkit register` if the change is intended" in err, err
    assert ddmkit("register", copy)[0] == 0 and ddmkit("verify", "--allow-missing", copy)[0] == 0


def test_other_version_or_time_convention_is_refused(copy):
    path = copy / "registry.json"
    reg = json.loads(path.read_text())
    path.write_text(json.dumps({**reg, "ddmkit_version": "9.0.0"}))
    with pytest.raises(DDMError, match="ddmkit 9.0.0"):
        verify_registry(copy)
    path.write_text(json.dumps({**reg, "time_convention": "vp: t=1 data"}))
    with pytest.raises(DDMError, match="time convention"):
        verify_registry(copy)


def test_missing_experts_renormalise_warn_and_are_recorded(copy):
    shutil.rmtree(copy / "experts" / "expert_01")
    shutil.rmtree(copy / "experts" / "expert_03")
    with pytest.warns(UserWarning, match=r"experts \[1, 3\] of 4 are missing"):
        ddm = load_ddm(copy)
    assert ddm.meta["missing_experts"] == [1, 3]
    x, t = torch.randn(64, 2), torch.rand(64)
    p = ddm.router(x, t)
    assert torch.allclose(p.sum(1), torch.ones(64)) and (p[:, [1, 3]] == 0).all()
    assert float(ddm.prior[[1, 3]].sum()) == 0 and abs(float(ddm.prior.sum()) - 1) < 1e-6
    for strategy in ("full", "top-1", "top-2", "switch", "oracle", "nearest"):
        x0, info = sample_ddm(ddm, strategy, 50, steps=3)
        assert torch.isfinite(x0).all()
    with pytest.raises(DDMError, match=r"experts \[1, 3\] are missing"):
        load_ddm(copy, allow_missing=False)


def test_all_experts_missing_is_a_clear_error(copy):
    shutil.rmtree(copy / "experts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DDMError, match="no expert is present") as info:
            load_ddm(copy)
    # the fix names train-expert per shard with the run's own paths: the shards it names are there
    shard = f"{copy / 'partition' / 'shards'}/cluster_XX.safetensors"
    assert f"`ddmkit train-expert {shard} --config {copy / 'config.json'} --out {copy / 'experts'}/expert_XX`" \
        in str(info.value)
    assert Path(shard.replace("XX", "00")).is_file()


def test_sample_metadata_records_missing_experts(copy):
    from ddmkit.io import read_metadata
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.prepare import run_config
    from ddmkit.pipeline.run import sample_run

    shutil.rmtree(copy / "experts" / "expert_00")
    cfg = run_config(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = sample_run(copy, ["top-2"], cfg)[0]
    assert info["missing_experts"] == [0]
    assert read_metadata(RunFolder(copy).sample_set("top-2"))["missing_experts"] == [0]
    assert json.loads((copy / "samples" / "info.json").read_text())["top-2"]["missing_experts"] == [0]


@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd", "a/../../b", "", "~/x", "a\\..\\b", 5, None])
def test_manifest_paths_cannot_escape(tmp_path, bad):
    with pytest.raises(DDMError):
        safe_join(tmp_path, bad)


def test_symlink_out_of_the_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "link").symlink_to(tmp_path)
    with pytest.raises(DDMError, match=rf"'link/secret' resolves outside the run folder \({tmp_path / 'run' / 'link'} "
                                       rf"is a symbolic link to {tmp_path}: copy that folder in instead\)"):
        safe_join(tmp_path / "run", "link/secret")
    assert safe_join(tmp_path / "run", "experts/expert_00") == tmp_path / "run" / "experts" / "expert_00"


def test_training_the_router_or_monolith_again_keeps_a_registered_run_registered(copy, monkeypatch, capsys):
    """train-router / train-monolith on a run with a registry check it first, then record what they trained
    (a router trained again was refused on the next load until `ddmkit register`). The registered router here is
    one of another seed, so the one train-router trains (the run's seed; another is refused) differs from it."""
    from ddmkit.cli import main

    def ddmkit(*args):
        monkeypatch.setattr("sys.argv", ["ddmkit", *map(str, args)])
        with pytest.raises(SystemExit) as exit:
            main()
        return exit.value.code

    cfg = load_config(copy / "config.json")
    shutil.rmtree(copy / "router")
    stage_router(cfg.model_copy(update={"router": cfg.router.model_copy(update={
        "train": cfg.router.train.model_copy(update={"seed": 5})})}), copy, lambda m: None)
    stage_registry(cfg, copy, lambda m: None)
    before = json.loads((copy / "registry.json").read_text())
    shutil.rmtree(copy / "router")
    assert ddmkit("train-router", copy, "--seed", "5") == 2 and "router.train.seed" in capsys.readouterr().err
    assert ddmkit("train-router", copy) == 0
    after = json.loads((copy / "registry.json").read_text())
    router = [m["weights_sha256"] for reg in (before, after) for m in reg["models"] if m["role"] == "router"]
    assert router[0] != router[1] and verify_registry(copy)["missing"] == []
    load_ddm(copy)
    w = copy / "experts" / "expert_02" / "model.safetensors"
    w.write_bytes((copy / "experts" / "expert_03" / "model.safetensors").read_bytes())
    assert ddmkit("train-monolith", copy) == 2 and "SHA-256 differs" in capsys.readouterr().err
    assert not (copy / "monolith").exists()


def test_an_expert_folder_the_registry_does_not_list_is_refused_until_registered(copy):
    """An expert copied in after `ddmkit register` was loaded unchecked (even one of another partition)."""
    reg = json.loads((copy / "registry.json").read_text())
    reg["models"] = [m for m in reg["models"] if m["name"] != "expert_03"]
    (copy / "registry.json").write_text(json.dumps(reg))
    with pytest.raises(DDMError, match=r"does not list experts \[3\], but their folders are there.*ddmkit register"):
        load_ddm(copy)
    with pytest.raises(DDMError, match="does not list experts"):
        verify_registry(copy)
    write_registry(copy)  # `ddmkit register` checks the folder and records it
    assert load_ddm(copy).k == 4


@pytest.mark.parametrize("name", ["router", "monolith"])
def test_a_router_or_monolith_folder_the_registry_does_not_list_is_refused_until_registered(copy, name):
    """A router or monolith copied in (or trained) after `ddmkit register` was loaded unchecked, and `ddmkit
    verify` said verified; an unlisted expert was refused. Now they are refused alike, until registered."""
    from ddmkit.ddm.load import monolith_field
    from ddmkit.pipeline.stages import stage_monolith

    if name == "monolith":  # trained after the registry was written, which so lists no monolith
        cfg = small_config()
        stage_monolith(cfg.model_copy(update={"monolith": cfg.monolith.model_copy(update={"enabled": True})}), copy,
                       lambda m: None)
    else:
        reg = json.loads((copy / "registry.json").read_text())
        reg["models"] = [m for m in reg["models"] if m["role"] != "router"]
        (copy / "registry.json").write_text(json.dumps(reg))
    refused = rf"does not list the {name}, but .*{name} is there .*`ddmkit register"
    with pytest.raises(DDMError, match=refused):
        verify_registry(copy)
    load = load_ddm if name == "router" else monolith_field
    with pytest.raises(DDMError, match=refused):
        load(copy)
    write_registry(copy)  # `ddmkit register` checks the folder and records it
    assert f"{name}" in verify_registry(copy)["verified"]
    load(copy)


@pytest.mark.parametrize("command", ["train-router", "train-monolith"])
def test_training_in_a_run_folder_that_does_not_exist_says_so(tmp_path, ddmkit, command):
    """A misspelt run folder was told to be partitioned (`ddmkit partition ... --out` the misspelt path)."""
    code, _, err = ddmkit(command, tmp_path / "nope")
    assert code == 2 and f"{tmp_path / 'nope'} is not a run folder (no such folder)" in err, err
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("args, make", [
    (["add-expert", "--data", "x.pt"], "ddmkit run CONFIG --out"), (["distill"], "ddmkit run CONFIG --out"),
    (["replace-expert", "0", "other"], "ddmkit run CONFIG --out"), (["analyze"], "ddmkit run CONFIG --out"),
    (["train-router"], "ddmkit partition --config CONFIG --out")])
def test_a_missing_run_folder_is_told_to_be_made_as_the_command_needs_it(tmp_path, ddmkit, args, make):
    """Commands that need trained networks were told to partition the misspelt folder, which does not let them
    run; those that need a partition only are still told to partition it."""
    code, _, err = ddmkit(args[0], tmp_path / "nope", *args[1:])
    assert code == 2 and f"(or make one with `{make} {tmp_path / 'nope'}`)" in err, err
    assert not (tmp_path / "nope").exists()


def test_verify_of_a_folder_that_does_not_exist_says_so(tmp_path):
    from ddmkit.registry import load_partition_checked

    with pytest.raises(DDMError, match=rf"^{tmp_path / 'nope'} is not a run folder \(no such folder\)"):
        load_partition_checked(tmp_path / "nope" / "partition")  # train-router of a misspelt run said 'partition it'

    with pytest.raises(DDMError, match=r"nowhere is not a run folder \(no such folder\)"):
        verify_registry(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DDMError, match=r"afile is a file, not a run folder"):  # was "(no such folder)"
        verify_registry(tmp_path / "afile")


def test_partition_tensors_changed_after_partitioning_are_refused(copy, monkeypatch, capsys):
    """Centroids rewritten in partition/partition.safetensors passed verify and routed `nearest` (no hash)."""
    from ddmkit.cli import main
    from ddmkit.io import load_tensors, read_metadata, save_tensors

    path = copy / "partition" / "partition.safetensors"
    tensors = load_tensors(path)
    tensors["centroids"] = torch.full_like(tensors["centroids"], 100.0)
    save_tensors(path, tensors, read_metadata(path))
    for command in (["verify", copy], ["sample", copy, "--strategy", "nearest", "--n", 10]):
        monkeypatch.setattr("sys.argv", ["ddmkit", *map(str, command)])
        with pytest.raises(SystemExit) as exit:
            main()
        err = " ".join(capsys.readouterr().err.split())
        assert exit.value.code == 2 and "partition.safetensors: SHA-256 differs from the one manifest.json records" \
            in err, (command, err)
    assert not (copy / "samples" / "nearest.safetensors").exists()


def test_a_shard_changed_after_partitioning_is_refused_before_training_or_routing_on_it(copy, monkeypatch, capsys):
    from ddmkit.cli import main
    from ddmkit.ddm.load import island_stats_router

    shards = copy / "partition" / "shards"
    (shards / "cluster_03.safetensors").write_bytes((shards / "cluster_00.safetensors").read_bytes())
    monkeypatch.setattr("sys.argv", ["ddmkit", "verify", str(copy)])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 2 and "cluster_03.safetensors: SHA-256 differs" in capsys.readouterr().err
    verify_registry(copy)  # loading checks the model folders, not the data (that reads every shard)
    island_stats_router(copy)  # routed by the statistics the expert folders publish: no shard is read
    (copy / "experts" / "expert_03" / "statistics.safetensors").unlink()  # an expert that published none
    with pytest.raises(DDMError, match="cluster_03.safetensors: SHA-256 differs .* for cluster 3"):
        island_stats_router(copy)  # its statistics come from its shard, checked first
    shutil.rmtree(copy / "router")
    with pytest.raises(DDMError, match="cluster_03.safetensors: SHA-256 differs"):
        stage_router(small_config(), copy, lambda m: None)
    assert not (copy / "router").exists()


def test_a_damaged_shard_or_a_diverging_loss_stops_a_job_before_it_writes(copy, tmp_path):
    from safetensors.torch import load_file, save_file

    from ddmkit.config import ExpertConfig, validate
    from ddmkit.train.jobs import train_expert, train_velocity_model

    cfg = validate(ExpertConfig, {"net": {"arch": "mlp", "kwargs": {"width": 8, "depth": 1}},
                                  "train": {"steps": 10, "batch_size": 8, "log_every": 5}})
    shard = copy / "partition" / "shards" / "cluster_02.safetensors"
    from ddmkit.io import read_metadata

    tensors, meta = load_file(shard), read_metadata(shard)
    tensors["x"][3, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors", metadata={k: str(v) for k, v in meta.items()})
    with pytest.raises(DDMError, match=r"nan.safetensors: its rows hold NaN or infinite values \(first bad rows: \[3\]\)"):
        train_expert(tmp_path / "nan.safetensors", cfg, tmp_path / "e1")
    with pytest.raises(DDMError, match="train.safetensors is not a cluster's shard"):
        train_expert(copy / "data" / "train.safetensors", cfg, tmp_path / "e2")
    with pytest.raises(DDMError, match=r"expert: the loss is (inf|nan) at step 5: training diverged"):
        train_velocity_model(torch.full((16, 2), 1e30), cfg, tmp_path / "e3", "expert")
    assert not any((tmp_path / e).exists() for e in ("e1", "e2", "e3"))


def test_the_missing_expert_study_removes_only_experts_the_run_has(copy):
    """With expert 1 already gone, the study's rows 'removed' it again (a row equal to the one before) and
    its row 0 was labelled as if every expert were there."""
    from ddmkit.evaluation.studies import missing_expert_study, removal_order
    from ddmkit.pipeline.prepare import run_config

    shutil.rmtree(copy / "experts" / "expert_01")
    cfg = run_config(copy)
    cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"n": 200, "steps": 2}),
                                 "evaluate": cfg.evaluate.model_copy(update={"chunk": 200})})
    test = torch.randn(400, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = missing_expert_study(cfg, copy, test, None)
    assert len(rows) == 3 and all(r["already_missing"] == [1] for r in rows)
    assert [1 in r["experts_removed"] for r in rows] == [False] * 3
    order = [c for c in removal_order(4, cfg.sample.seed) if c != 1]
    assert [r["experts_removed"] for r in rows] == [sorted(order[:m]) for m in range(3)]


def test_the_studies_draw_the_learned_routers_whole_row_once(copy, monkeypatch):
    """The missing-expert study's row 0 (top-2, every expert, the learned router) is the statistics-only router
    study's 'top-2 (learned router)' row: it was drawn twice per evaluation. Drawn once, its scores are those a
    second draw gives."""
    import ddmkit.evaluation.studies as studies
    from ddmkit.pipeline.prepare import run_config

    cfg = run_config(copy)
    cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"n": 200, "steps": 2}),
                                 "evaluate": cfg.evaluate.model_copy(update={"chunk": 100, "study_n": 200})})
    test = torch.randn(800, 2, generator=torch.Generator().manual_seed(0))
    calls, real = [], studies.sample_ddm
    monkeypatch.setattr(studies, "sample_ddm", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    drawn: dict = {}
    rows = studies.missing_expert_study(cfg, copy, test, None, drawn=drawn)
    shared = studies.stats_router_study(cfg, copy, test, None, drawn=drawn)
    assert len(calls) == len(rows) + 5 and calls.count("top-2") == len(rows) + 1  # not drawn again
    again = studies.stats_router_study(cfg, copy, test, None)
    for name, row in again["rows"].items():
        assert {**shared["rows"][name], "wall_time": None} == {**row, "wall_time": None}, name
    assert shared["rows"]["top-2 (learned router)"]["w2"] == rows[0]["w2"]


def test_an_experts_published_statistics_are_registered_and_verified(copy):
    """registry.json hashed only the weights and config.json: an edited or deleted statistics.safetensors (what
    the statistics-only router routes by) passed verify."""
    entries = [m for m in json.loads((copy / "registry.json").read_text())["models"] if m["role"] == "expert"]
    assert all(len(m["statistics_sha256"]) == 64 for m in entries)
    published = copy / "experts" / "expert_02" / "statistics.safetensors"
    kept = published.read_bytes()
    published.write_bytes(kept[:-8] + b"\x00" * 8)
    with pytest.raises(DDMError, match=r"expert_02/statistics.safetensors: SHA-256 differs from .*registry.json"):
        verify_registry(copy)
    published.unlink()
    with pytest.raises(DDMError, match=r"expert_02/statistics.safetensors is missing \(.*registry.json records it\)"):
        verify_registry(copy)
    published.write_bytes(kept)
    verify_registry(copy)


def test_a_registry_naming_the_wrong_cluster_is_called_wrong_not_the_folder(copy):
    """With the clusters swapped in registry.json, verify said to move expert_00 to experts/expert_00."""
    reg = json.loads((copy / "registry.json").read_text())
    for m in reg["models"]:
        if m["role"] == "expert" and m["cluster"] in (0, 1):
            m["cluster"] = 1 - m["cluster"]
    (copy / "registry.json").write_text(json.dumps(reg))
    with pytest.raises(DDMError, match=r"recorded as the expert of cluster 1, but it sits in the slot of cluster 0, "
                                       r"whose shard it was trained on: the record is wrong"):
        verify_registry(copy)


def test_without_a_registry_each_slot_must_hold_its_own_clusters_expert(copy):
    """Without registry.json an expert of another cluster (or partition) in a slot was loaded with only the
    generic 'loaded unchecked' warning; with one, the refusal said 'another partition' for the same
    partition's other cluster."""
    shutil.copytree(copy / "experts" / "expert_00", copy / "e0")
    shutil.rmtree(copy / "experts" / "expert_01")
    shutil.copytree(copy / "e0", copy / "experts" / "expert_01")  # cluster 0's expert in slot 1
    shutil.rmtree(copy / "e0")
    with pytest.raises(DDMError, match=r"expert_01: trained on the shard of cluster 0 of this partition, not of "
                                       r"cluster 1: it is the expert of cluster 0 \(experts/expert_00\)"):
        write_registry(copy)
    (copy / "registry.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no registry.json
        with pytest.raises(DDMError, match="it is the expert of cluster 0"):
            load_ddm(copy)
        cfg_path = copy / "experts" / "expert_01" / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "shard_sha256": "0" * 64}))
        with pytest.raises(DDMError, match="another partition"):
            load_ddm(copy)


def test_a_registry_entry_of_a_cluster_the_partition_lacks_is_named():
    from ddmkit.registry import check_shard

    with pytest.raises(DDMError, match=r"cluster 5 is not a cluster of this partition \(0 \.\. 3\)"):
        check_shard("experts/expert_05", 5, "a" * 64, {c: str(c) * 64 for c in range(4)})


def test_register_says_which_experts_are_missing(copy, monkeypatch, capsys):
    """`ddmkit register` with experts absent said only '3 model folders recorded'."""
    from ddmkit.cli import main

    shutil.rmtree(copy / "experts" / "expert_02")
    for name in ("model.safetensors", "config.json"):  # expert 3's files copied into experts/ itself (cp -r A/ B)
        (copy / "experts" / "expert_03" / name).rename(copy / "experts" / name)
    shutil.rmtree(copy / "experts" / "expert_03")
    monkeypatch.setattr("sys.argv", ["ddmkit", "register", str(copy)])
    with pytest.raises(SystemExit) as exit:
        main()
    said = " ".join(capsys.readouterr().err.split())
    assert exit.value.code in (0, None) and "experts [2, 3] of 4 are missing" in said, said
    assert f"note: {copy / 'experts'} holds a model.safetensors itself: an expert's files go in its own folder" in said


def test_register_names_every_setting_an_expert_trained_elsewhere_differs_in(copy, ddmkit):
    """An expert trained elsewhere with another warm-up and weight decay was registered without a word: register
    compared only the network, prediction, steps, batch, lr, seed and EMA. How its job ran (threads, logging) is
    not a difference."""
    from ddmkit.train.jobs import train_expert

    expert = small_config().expert
    train = expert.train.model_copy(update={"warmup": 5, "weight_decay": 0.1, "threads": 2, "log_every": 5})
    shutil.rmtree(copy / "experts" / "expert_03")
    train_expert(copy / "partition" / "shards" / "cluster_03.safetensors", expert.model_copy(update={"train": train}),
                 copy / "experts" / "expert_03")
    code, _, said = ddmkit("register", copy)
    assert code == 0 and ("note: expert 3 differs from the run's [expert] section in train.warmup (5, config 2); "
                          "train.weight_decay (0.1, config 0.0)") in said, said
    assert "threads" not in said and "log_every" not in said and "expert 0" not in said, said
    load_ddm(copy)  # a warning, not a refusal: the DDM samples with it


def test_a_misnamed_expert_folder_is_named_where_its_expert_is_said_to_be_missing(copy, ddmkit):
    """experts/expert_1 (for expert_01) was reported only as "experts [1] are missing", the folder unnamed."""
    experts = copy / "experts"
    (experts / "expert_01").rename(experts / "expert_1")
    (experts / "notes").mkdir()
    said = f"{experts / 'expert_1'} looks like expert 1's folder, misnamed: rename it to {experts / 'expert_01'}"
    for command in ("verify", "register"):
        code, _, err = ddmkit(command, copy)
        assert code == (2 if command == "verify" else 0) and said in err and "notes" not in err, (command, err)
    with pytest.warns(UserWarning, match=re.escape(f"renormalised over them; {said}")):
        load_ddm(copy)  # as `ddmkit sample` warns
    with pytest.raises(DDMError, match=re.escape(f"experts [1] are missing (no experts/expert_XX/model.safetensors; "
                                                 f"{said})")):
        load_ddm(copy, allow_missing=False)
    (experts / "expert_1").rename(experts / "Expert-01")
    code, _, err = ddmkit("verify", copy)
    assert code == 2 and f"{experts / 'Expert-01'} looks like expert 1's folder" in err, err


def test_register_on_a_run_without_experts_is_refused_and_writes_nothing(copy, monkeypatch, capsys):
    """It wrote a registry of no model and said "the DDM samples without them" of all K experts."""
    from ddmkit.cli import main

    shutil.rmtree(copy / "experts")
    (copy / "registry.json").unlink()
    monkeypatch.setattr("sys.argv", ["ddmkit", "register", str(copy)])
    with pytest.raises(SystemExit) as exit:
        main()
    said = " ".join(capsys.readouterr().err.split())
    assert exit.value.code == 2 and f"{copy} holds no trained expert (no experts/expert_XX/model.safetensors)" in said
    assert f"`ddmkit launch {copy}`" in said and not (copy / "registry.json").exists()


def test_a_lost_partition_file_says_how_to_make_the_partition_again(copy):
    """'partition.safetensors is missing; re-train or re-copy it': nothing trains a partition, and `ddmkit
    partition` on the folder did nothing (its manifest is there)."""
    (copy / "partition" / "partition.safetensors").unlink()
    with pytest.raises(DDMError, match=r"partition.safetensors is missing; copy the run's partition/ folder back "
                                       r"whole, or make the partition again: remove .*partition and run `ddmkit "
                                       r"partition --config .*config.json --out "):
        verify_registry(copy)


@pytest.mark.parametrize("model, change, message", [
    ("experts/expert_01", lambda c: c.update(prediction="x1"), r"expert_01: config.json prediction: 'x1' on the "
                                                               r"linear path"),
    ("experts/expert_01", lambda c: c.update(path={"kind": "vp", "steps": -3}),
     r"expert_01: config.json path.steps: -3"),
    ("experts/expert_01", lambda c: c.update(cluster=3),
     r"expert_01/config.json: cluster 3, but the folder is the slot of cluster 1.*: move the folder to "
     r"experts/expert_03"),
    ("experts/expert_01", lambda c: c.pop("data_shape"), r"expert_01/config.json has no data_shape"),
    ("router", lambda c: c.update(k=5), r"router/config.json: the router routes over 5 clusters but the partition has "
                                        r"4; train it again: remove .*router, then run `ddmkit train-router"),
    # (a grown run given back its old router)
])
def test_register_and_verify_refuse_a_folder_the_ddm_cannot_load(copy, monkeypatch, capsys, model, change, message):
    """A model folder whose config.json no sampling could load was registered (exit 0) and verified
    ('verified 5 model folders'); sampling then failed without naming the folder, and a wrong cluster made
    verify refuse the registry register had just written."""
    from ddmkit.cli import main

    def ddmkit(*args):
        monkeypatch.setattr("sys.argv", ["ddmkit", *map(str, args)])
        with pytest.raises(SystemExit) as exit:
            main()
        return exit.value.code, " ".join(capsys.readouterr().err.split())

    path = copy / model / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    weights, recorded = path.parent / "model.safetensors", read_metadata(path.parent / "model.safetensors")
    if any(config.get(key) != value for key, value in recorded.items()):  # a whole folder made so, not an edit
        save_tensors(weights, load_tensors(weights), {key: config[key] for key in recorded})
    registry = (copy / "registry.json").read_bytes()
    code, said = ddmkit("register", copy)
    assert code == 2 and __import__("re").search(message, said), said
    assert (copy / "registry.json").read_bytes() == registry  # nothing written
    write_registry(copy)  # registered from Python past the check: verify still refuses
    code, said = ddmkit("verify", copy)
    assert code == 2 and __import__("re").search(message, said), said


def test_a_new_run_inside_a_run_folder_is_refused_and_force_says_what_it_removes(copy):
    """run_pipeline(cfg, "RUN/experts", force=True) wrote a whole run inside the run's experts/; a folder inside
    an expert's was refused as holding 'a config.json that ddmkit cannot read'."""
    import re

    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    for inside in (copy / "experts", copy / "experts" / "expert_00", copy / "new"):
        with pytest.raises(DDMError, match=rf"^--out {re.escape(str(inside))} is inside the run folder "
                                           rf"{re.escape(str(copy.resolve()))}; give a folder outside any run"):
            prepare_run_dir(inside, small_config(), force=True)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    said = []
    other = small_config().model_copy(update={"partition": small_config().partition.model_copy(update={"k": 3})})
    prepare_run_dir(copy, other, force=True, log=said.append)
    assert any("--force: removed what it held (config.json, data, experts, partition, registry.json, router)" in m
               for m in said), said


def test_a_registered_run_whose_router_is_gone_samples_by_the_statistics_as_the_error_says(copy):
    """With router/ removed the error said to route by the statistics (router='statistics'); doing so was then
    refused because registry.json lists the router."""
    shutil.rmtree(copy / "router")
    with pytest.raises(DDMError, match="no router .*router='statistics'"):
        load_ddm(copy)
    assert load_ddm(copy, router="statistics").meta["router"] == "statistics"
    with pytest.raises(DDMError, match="router is listed but missing"):
        verify_registry(copy)  # what `ddmkit verify` checks: the run as registered
