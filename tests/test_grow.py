"""Growing a trained run (ddmkit.pipeline.grow): a run on 3 of 4 well-separated Gaussians gets the 4th
as a new island (add-expert, router retrained or statistics-only), as rows of its nearest cluster
(mode nearest), or has one expert replaced by a folder from elsewhere; bad input changes no byte."""
import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddmkit.config import ExpertConfig, RunConfig, validate
from ddmkit.data import ArrayData, content_hash
from ddmkit.ddm import load_ddm
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors, read_json, read_metadata, write_json
from ddmkit.layout import RunFolder
from ddmkit.pipeline.grow import add_expert, check_island, joined_truth, replace_expert, trained_run
from ddmkit.pipeline.models import describe_models
from ddmkit.pipeline.prepare import run_config
from ddmkit.pipeline.run import run_pipeline, sample_run
from ddmkit.registry import load_partition_checked, verify_registry, write_registry
from ddmkit.train.jobs import train_expert
from ddmkit.truth import GaussianMixture

MEANS = np.array([[-3.0, -3.0], [3.0, -3.0], [-3.0, 3.0], [3.0, 3.0]])
TRUTH = GaussianMixture.from_covariances(np.ones(4), MEANS, np.full(4, 0.25))
SMALL = {"net": {"arch": "mlp", "kwargs": {"width": 32, "depth": 1}},
         "train": {"steps": 60, "batch_size": 64, "log_every": 20}}


@pytest.fixture
def cli(ddmkit):
    """(exit code, stderr on one line) of `ddmkit ARGS`, run in this process (conftest's ddmkit)."""
    return lambda *args: ddmkit(*args)[::2]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(root: Path) -> dict[str, str]:
    """Every file of a folder, by relative path, with its SHA-256."""
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def component(i: int, n: int, seed: int) -> ArrayData:
    """n rows of component i of TRUTH, labelled 0, with that component as the exact truth."""
    sub = TRUTH.subset([i])
    x, labels = sub.sample(n, torch.Generator().manual_seed(seed), return_labels=True)
    return ArrayData(f"component{i}", x.float(), labels, sub)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained run (train stages only) on components 0, 1, 2 (k = 3), and the 4th component as an .npz."""
    root = tmp_path_factory.mktemp("grow")
    x, labels = TRUTH.sample(1000, torch.Generator().manual_seed(0), return_labels=True)
    old = labels < 3
    np.savez(root / "old.npz", x=x[old].float().numpy(), labels=labels[old].numpy())
    np.savez(root / "new.npz", x=x[~old].float().numpy(), labels=labels[~old].numpy())
    cfg = validate(RunConfig, {"data": {"name": str(root / "old.npz"), "n_train": 10_000, "n_test": 0,
                                        "params": {"test_fraction": 0.3}},
                               "partition": {"k": 3}, "expert": SMALL,
                               "router": {**SMALL, "net": {"arch": "router_mlp", "kwargs": {"width": 32, "depth": 1}}},
                               "sample": {"n": 60, "steps": 8, "strategies": ["top-2"]},
                               "evaluate": {"chunk": 30, "missing_experts": False}})
    run_pipeline(cfg, root / "base", log=lambda m: None, stages="train")
    return root


@pytest.fixture
def run(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base / "base", out)
    return out


def test_new_cluster_adds_one_expert_and_a_router_over_k_plus_1(base, run, cli):
    folder = RunFolder(run)
    sample_run(run, ["top-2"], log=lambda m: None)  # a sample set of the old DDM, to be cleared
    before = hashes(run)
    old_manifest, old_t = read_json(folder.manifest), load_tensors(run / "partition" / "partition.safetensors")
    new_x = torch.as_tensor(np.load(base / "new.npz")["x"])
    old_test = load_tensors(folder.split("test"))["x"]
    share = len(old_test) / (len(old_test) + old_manifest["n"])
    n_test = int(round(len(new_x) * share))  # the island holds out the run's own share of its rows
    event = add_expert(run, str(base / "new.npz"), log=lambda m: None)

    m = read_json(folder.manifest)
    assert m["k"] == 4 and m["counts"][:3] == old_manifest["counts"] and m["shards"][:3] == old_manifest["shards"]
    after = hashes(run)
    kept = [p for p in before if p.startswith(("partition/shards/", "experts/", "monolith/"))]
    assert kept and all(after[p] == before[p] for p in kept)  # old shards, experts and monolith: same bytes
    assert before["config.json"] == after["config.json"] and run_config(run).partition.k == 3
    shard = run / "partition" / m["shards"][3]["path"]
    x3 = load_tensors(shard)["x"]
    assert m["counts"][3] == len(x3) == len(new_x) - n_test == event["rows"]
    t = load_tensors(run / "partition" / "partition.safetensors")
    assert torch.equal(t["centroids"][:3], old_t["centroids"])
    assert torch.allclose(t["centroids"][3], x3.mean(0), atol=1e-5)  # identity features: the mean of the rows
    assert torch.allclose(t["cluster_means"][3], x3.mean(0), atol=1e-5)
    assert (t["assignments"][-len(x3):] == 3).all() and len(t["assignments"]) == m["n"]
    cfg3 = read_json(folder.expert(3) / "config.json")
    assert (cfg3["cluster"], cfg3["shard_sha256"], cfg3["shard_count"]) == (3, sha(shard), len(x3))
    assert read_json(folder.router / "config.json")["k"] == 4 and after["router/model.safetensors"] != \
        before["router/model.safetensors"]
    ddm = load_ddm(run)
    assert ddm.k == 4 and ddm.router(torch.zeros(5, 2), torch.full((5,), 0.5)).shape == (5, 4)
    assert not folder.samples.exists()
    assert len(load_tensors(folder.split("train"))["x"]) == m["n"]
    test = load_tensors(folder.split("test"))["x"]
    is_new = (test - torch.as_tensor(MEANS[3])).norm(dim=1) < 2.5  # rows of the 4th component
    assert len(test) == len(old_test) + n_test and int(is_new.sum()) == n_test
    for n in (10, len(test) // 4, len(test) // 2):  # the evaluation takes a prefix: it holds the new rows too
        assert abs(int(is_new[:n].sum()) - n * n_test / len(test)) <= 1
    log = read_json(folder.grow)
    assert log["router"] == "learned" and [e["n"] for e in log["events"]] == [1] and event["test_rows"] == n_test
    assert verify_registry(run)["missing"] == []
    assert cli("verify", run)[0] == 0
    grown = hashes(run)
    with pytest.raises(DDMError, match=r"rows were added to .* before \(grow.json entry 1\)"):
        add_expert(run, str(base / "new.npz"), log=lambda m: None)  # the same island again
    assert hashes(run) == grown


def _own_rows(run) -> tuple:
    """Rows of the run's own data: 30 training rows and 10 test rows, with their labels."""
    train, test = load_tensors(RunFolder(run).split("train")), load_tensors(RunFolder(run).split("test"))
    return torch.cat([train["x"][:30], test["x"][:10]]), torch.cat([train["labels"][:30], test["labels"][:10]])


def test_rows_of_the_run_are_refused_in_any_split_or_form(run, tmp_path, cli):
    """grow.json's hash of the island's training split was the only check: the run's own data set, or an added
    file split otherwise (--params test_fraction), was accepted as a new island (duplicated training rows, test
    rows trained on)."""
    from ddmkit.pipeline.grow import rows_in

    x = torch.randn(50, 2)
    assert rows_in(x[10:20], x) == 10 and rows_in(x[10:20] + 1e-6, x) == 0 and rows_in(x[:0], x) == 0
    assert rows_in(torch.cat([x[:5], torch.randn(3, 2)]).double(), x) == 5  # compared in the run's dtype
    before = hashes(run)
    rows, labels = _own_rows(run)
    np.savez(tmp_path / "mine.npz", x=rows.numpy(), labels=labels.numpy())
    code, err = cli("add-expert", run, "--data", tmp_path / "mine.npz", "--params", '{"test_fraction": 0.5}')
    assert code == 2 and "40 of the new rows are in the run already" in err, err
    assert hashes(run) == before


def test_stats_router_trains_nothing_and_routes_the_new_island(run, cli):
    before = hashes(run)
    said = []
    add_expert(run, component(3, 200, seed=1), router="stats", log=said.append)
    assert f"router removed; the run routes by the islands' statistics ({run / 'grow.json'})" in " ".join(said)
    weights = sorted(p.parent.relative_to(run).as_posix() for p in run.rglob("model.safetensors"))
    assert weights == ["experts/expert_00", "experts/expert_01", "experts/expert_02", "experts/expert_03", "monolith"]
    assert read_json(RunFolder(run).grow)["router"] == "statistics"
    assert all(hashes(run)[f"experts/expert_0{c}/model.safetensors"] == before[f"experts/expert_0{c}/model.safetensors"]
               for c in range(3))
    ddm = load_ddm(run)
    assert ddm.meta["router"] == "statistics" and ddm.k == 4
    p = ddm.router(torch.tensor(MEANS, dtype=torch.float32), torch.full((4,), 0.05))
    assert p[3, 3] > 0.99  # at the new component's mean, nearly all weight on the new island
    info, = sample_run(run, ["top-2"], log=lambda m: None)  # what `ddmkit sample` does
    x0 = load_tensors(RunFolder(run).sample_set("top-2"))["x"]
    assert x0.shape == (60, 2) and torch.isfinite(x0).all() and info["missing_experts"] == []
    verify_registry(run)
    from ddmkit.pipeline.run import untrained_parts  # `ddmkit run ... --stages evaluate` refused it: "no router"

    assert untrained_parts(run_config(run), run) == []
    rows, _ = describe_models(run, run_config(run))  # the report's networks table said "router | missing"
    assert [r[1] for r in rows if r[0] == "router"] == ["statistics-only (no network: grow.json)"]
    from ddmkit.pipeline.models import partition_k  # the report said "Partition: k = 3" above 4 experts

    assert partition_k(run, run_config(run)) == "k = 3 when made, 4 now (add-expert: grow.json)"
    from ddmkit.pipeline.analyze import analyze_run  # the diagnostics route by the statistics router too

    result = analyze_run(run, run / "analysis", strategies=["top-2"], n=64, n_boot=20, n_heldout=64, log=lambda m: None)
    assert (run / "analysis" / "analysis.md").exists() and result
    before = hashes(run)  # an explicit --router learned is refused: the run has none (it routed by statistics)
    code, err = cli("sample", run, "--strategy", "top-1", "--router", "learned")
    assert code == 2 and "--router learned" in err and "train-router" in err, err
    assert hashes(run) == before
    assert cli("sample", run, "--strategy", "top-1")[0] == 0  # left out: the run's own (statistics) router


def test_unlabelled_rows_join_a_labelled_run_whose_networks_take_no_labels(base, run, tmp_path, cli):
    """The run's rows carry labels that nothing reads (unconditional networks, no exact truth to keep): an
    island of plain rows was refused, asking for 'the component each row was drawn from', which it has not."""
    plain = np.load(base / "new.npz")["x"]
    np.savez(tmp_path / "plain.npz", x=plain)
    conditional = trained_run(run)  # class-conditional networks read the labels: still refused
    conditional.expert_config = {**conditional.expert_config, "kwargs": {"num_classes": 4}}
    with pytest.raises(DDMError, match=r"class-conditional \(4 classes\) .* its class, 0 \.\. 3"):
        check_island(conditional, ArrayData("plain", torch.as_tensor(plain)), "training")
    code, err = cli("add-expert", run, "--data", tmp_path / "plain.npz", "--router", "stats")
    assert code == 0, err
    folder = RunFolder(run)
    m = read_json(folder.manifest)
    assert m["k"] == 4 and "labels" not in load_tensors(run / "partition" / m["shards"][3]["path"])
    assert all("labels" not in load_tensors(folder.split(s)) for s in ("train", "test"))  # dropped, not half-kept
    assert cli("verify", run)[0] == 0
    info, = sample_run(run, ["top-2"], log=lambda m: None)
    assert info["missing_experts"] == []


def test_exact_mixtures_are_joined_by_training_counts():
    old, new = TRUTH.subset([0, 1, 2]), TRUTH.subset([3])
    joined = joined_truth(old, new, 300, 100)
    x = torch.randn(50, 2, dtype=torch.float64) * 3
    want = torch.logsumexp(torch.stack([old.log_prob(x) + np.log(0.75), new.log_prob(x) + np.log(0.25)]), 0)
    assert torch.allclose(joined.log_prob(x), want, atol=1e-10)
    assert torch.allclose(joined.log_prob(x), TRUTH.log_prob(x), atol=1e-10)  # equal weights: the full mixture
    assert joined_truth(old, None, 300, 100) is None


def test_nearest_mode_grows_the_nearest_shard_and_retrains_its_expert(run):
    folder = RunFolder(run)
    before, old_m = hashes(run), read_json(folder.manifest)
    centroids = load_tensors(run / "partition" / "partition.safetensors")["centroids"]
    c = int(torch.cdist(torch.tensor(MEANS[:1], dtype=torch.float32), centroids).argmin())
    rows = component(0, 50, seed=2)
    old_x = load_tensors(run / "partition" / old_m["shards"][c]["path"])["x"]
    event = add_expert(run, rows, mode="nearest", log=lambda m: None)
    m = read_json(folder.manifest)
    assert m["k"] == 3 and m["counts"][c] == old_m["counts"][c] + 50 and event["experts_trained"] == [c]
    x = load_tensors(run / "partition" / m["shards"][c]["path"])["x"]
    assert torch.equal(x[:len(old_x)], old_x) and torch.equal(x[len(old_x):], rows.x)
    after = hashes(run)
    for other in {0, 1, 2} - {c}:
        for rel in (m["shards"][other]["path"], f"../experts/expert_0{other}/model.safetensors"):
            key = os.path.normpath(f"partition/{rel}")
            assert after[key] == before[key]
    assert read_json(folder.expert(c) / "config.json")["shard_sha256"] == m["shards"][c]["sha256"]
    assert after[f"experts/expert_0{c}/model.safetensors"] != before[f"experts/expert_0{c}/model.safetensors"]
    assert read_json(folder.router / "config.json")["k"] == 3
    verify_registry(run)


def test_replace_expert_copies_a_foreign_folder_that_verifies_and_is_flagged(run, tmp_path, cli):
    foreign = tmp_path / "foreign"
    other = validate(ExpertConfig, {"net": {"arch": "mlp", "kwargs": {"width": 16, "depth": 1}},
                                    "train": {"steps": 20, "batch_size": 32, "seed": 5}})
    train_expert(run / "partition" / "shards" / "cluster_00.safetensors", other, foreign)
    folder = RunFolder(run)
    (folder.students / "dense").mkdir(parents=True)  # distilled from the old DDM: distill reused them as up to date
    (folder.students / "report.md").write_text("the old teacher's")
    said = []
    event = replace_expert(run, 1, foreign, log=said.append)
    assert not folder.students.exists() and f"removed {folder.students}: students distilled from the old DDM " \
        "(`ddmkit distill` makes them again)" in said, said
    copied, source = folder.expert(1) / "model.safetensors", foreign / "model.safetensors"
    assert load_tensors(copied).keys() == load_tensors(source).keys()  # the same tensors, written as the slot's own
    assert all(torch.equal(t, load_tensors(source)[name]) for name, t in load_tensors(copied).items())
    cfg = read_json(folder.expert(1) / "config.json")
    assert read_metadata(copied) == {"role": "expert", "cluster": 1, "shard_sha256": cfg["shard_sha256"]}
    assert cfg["replaced_from"]["weights_sha256"] == sha(source)
    assert cfg["cluster"] == 1 and cfg["replaced_from"]["cluster"] == 0 and event["expert"] == 1
    assert cfg["shard_count"] == read_json(folder.manifest)["counts"][1] != cfg["replaced_from"]["shard_count"]
    verify_registry(run)
    _, notes = describe_models(run, run_config(run))
    assert len(notes) == 2 and notes[0].startswith("expert 1 differs") and "kwargs" in notes[0]
    assert "the 3 experts on" in notes[1] and "not their FLOP-matched baseline" in notes[1]  # 20 x 32 steps now
    assert load_ddm(run).k == 3
    code, err = cli("register", run)  # says what the report's table would: only `evaluate` said it before
    assert code == 0 and "note: expert 1 differs from the run's [expert] section in net.kwargs.width" in " ".join(err.split())
    before = hashes(run)  # the same command again wrote a second grow.json entry
    code, err = cli("replace-expert", run, 1, foreign)
    assert code == 0 and f"expert 1 is a copy of these weights already ({foreign}); nothing to do" in err, err
    assert hashes(run) == before


@pytest.mark.parametrize("stage", ["expert", "router"])
def test_an_interrupted_add_expert_leaves_nothing_in_the_run(base, run, stage, monkeypatch):
    """Ctrl-C or SIGTERM (KeyboardInterrupt) while the new expert or the router trained removed the staging
    folders but left the job's checkpoint (experts/.expert_03.checkpoint.safetensors.PID-HOST.R.tmp) in the run."""
    import ddmkit.train.jobs as jobs

    config = read_json(run / "config.json")
    config["config"][stage]["train"]["checkpoint_every"] = 10
    write_json(run / "config.json", config)
    before = hashes(run)
    name = "flow_matching_loss" if stage == "expert" else "router_loss"
    real, calls, checkpoints = getattr(jobs, name), [], []

    def stopped_at_step_26(*args, **kwargs):  # after the checkpoints of steps 10 and 20
        calls.append(1)
        if len(calls) > 25:
            checkpoints.extend(run.rglob(".*.checkpoint.safetensors.*.tmp"))
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, name, stopped_at_step_26)
    with pytest.raises(KeyboardInterrupt):
        add_expert(run, str(base / "new.npz"), log=lambda m: None)
    assert len(checkpoints) == 1  # the job had written one
    assert hashes(run) == before
    assert not [p for p in run.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_a_stop_while_the_grown_run_is_written_waits_until_it_is_whole(base, run, monkeypatch):
    """SIGTERM (or Ctrl-C) between the final renames left the old router removed, the new one not in place and
    grow.json's entry written: the run failed verify, and the same command again was refused as added before."""
    import signal

    import ddmkit.io as io
    import ddmkit.pipeline.grow as grow

    real_registry = grow.write_registry

    def terminated(signum, frame):  # as the command's handler (a KeyboardInterrupt would stop pytest itself)
        raise RuntimeError("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminated)
    real, said = os.replace, []

    def sigterm_before_the_router_lands(src, dst):
        if Path(dst) == run / "router":
            signal.raise_signal(signal.SIGTERM)
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", sigterm_before_the_router_lands)
    try:
        entry = add_expert(run, str(base / "new.npz"), log=said.append)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert entry["k_after"] == 4 and verify_registry(run)
    assert "add-expert: Ctrl-C or SIGTERM came while the run was being written: it was finished first" in said
    said.clear()  # replace-expert: a stop before the registry was rewritten left one that failed verify, and the
    # same command again did nothing (the slot held the copy already)
    monkeypatch.setattr(grow, "write_registry", lambda root: (signal.raise_signal(signal.SIGTERM), real_registry(root)))
    signal.signal(signal.SIGTERM, terminated)
    try:
        assert replace_expert(run, 1, base / "base" / "experts" / "expert_02", log=said.append)["expert"] == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert verify_registry(run) and "replace-expert: Ctrl-C or SIGTERM came while the run was being written: it " \
        "was finished first" in said


def test_bad_input_exits_2_and_changes_no_byte(base, run, tmp_path, cli):
    before = hashes(run)
    np.save(tmp_path / "cube.npy", np.zeros((20, 3), dtype=np.float32))
    np.savez(tmp_path / "two.npz", x=np.float32(MEANS[[3, 3]] + [[0, 0], [0.1, 0]]),
             labels=np.array([3, 3]))  # one row held out as the run's test share: "1 new training row" alone puzzled
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    calls = [(("add-expert", run, "--data", base / "new.npz", "--params", "{oops"), ("--params", "JSON")),
             (("add-expert", run, "--data", "nosuchset"), ("--data: unknown data set 'nosuchset'",)),
             (("add-expert", run, "--data", "ring8", "--params", '{"nope": 1}'), ("--params key 'nope'",)),
             (("replace-expert", run, 3, run / "experts" / "expert_00"), ("K", "0 .. 2")),
             (("replace-expert", run, -1, run / "experts" / "expert_00"), ("K", "0 .. 2"))]
    for (code, stderr), (_, words) in zip([cli(*args) for args, _ in calls], calls):
        assert code == 2 and all(w in stderr for w in words), stderr
    nan = component(3, 20, seed=3)
    nan.x[4, 1] = float("nan")
    unlabelled = component(3, 20, seed=3)
    unlabelled.labels = None
    for call, words in [(lambda: add_expert(run, str(tmp_path / "cube.npy")), "shape (3,)"),
                        (lambda: add_expert(run, component(3, 20, 3), mode="join"), "--mode"),
                        (lambda: add_expert(run, component(3, 20, 3), router="none"), "--router"),
                        (lambda: add_expert(run, nan, log=print), "NaN"),
                        (lambda: add_expert(run, unlabelled), "the component it was drawn from"),
                        (lambda: add_expert(run, component(3, 1, 3), router="stats"), "at least 2"),
                        (lambda: add_expert(run, component(3, 1, 3)), "at least 2"),  # retrain: was accepted
                        (lambda: add_expert(run, str(tmp_path / "two.npz")), "data: 1 new training row(s) (1 more "
                                                                             "held out as test rows, the run's share)"),
                        (lambda: add_expert(run, ArrayData("own rows", *_own_rows(run))), "in the run already"),
                        (lambda: add_expert(run, {"name": "ring8", "nope": 1}), "nope"),
                        (lambda: replace_expert(run, 0, tmp_path / "junk"), "config.json"),
                        (lambda: replace_expert(run, 0, run / "router"), "router"),
                        (lambda: replace_expert(run, 0, run), "is a run folder; give one of its model folders"),
                        (lambda: replace_expert(run, -1, run / "experts" / "expert_01"), "0 .. 2"),
                        (lambda: replace_expert(run, 1, run / "experts" / "expert_01"), "is expert 1 of this run")]:
        with pytest.raises(DDMError, match=words if words.startswith("-") else None) as err:
            call()
        assert words in str(err.value)
    assert hashes(run) == before
    shutil.rmtree(run / "experts" / "expert_02")  # a run whose training did not finish
    untrained = hashes(run)
    with pytest.raises(DDMError, match="not trained"):
        add_expert(run, component(3, 20, 3))
    assert hashes(run) == untrained


def test_too_few_training_rows_name_the_mode_and_a_test_fraction_that_keeps_more(run, tmp_path):
    """With --mode nearest the refusal spoke of 'a new cluster', which nearest makes none of; and 'give more rows'
    was the only fix offered where the run's share of 3 rows held out 2 of them."""
    x = np.float32(MEANS[[3, 3, 3]] + [[0, 0], [0.1, 0], [0, 0.1]])
    np.save(tmp_path / "two.npy", x[:2])
    np.save(tmp_path / "three.npy", x)
    with pytest.raises(DDMError, match=r"; an island needs at least 2: give more rows$"):  # 1 test row, 1 training
        add_expert(run, str(tmp_path / "two.npy"), mode="nearest", log=lambda m: None)
    with pytest.raises(DDMError, match=r"; a new cluster needs at least 2 \(its statistics hold a covariance\): give "
                                       r"more rows, or hold fewer out as test rows \(--params '\{\"test_fraction\": "
                                       r"0.1\}' for a file\)$"):
        add_expert(run, {"name": str(tmp_path / "three.npy"), "params": {"test_fraction": 0.7}}, log=lambda m: None)
    entry = add_expert(run, {"name": str(tmp_path / "three.npy"), "params": {"test_fraction": 0.1}}, router="stats",
                       log=lambda m: None)  # the fix offered works
    assert (entry["rows"], entry["test_rows"]) == (2, 1)


def test_replace_expert_names_the_folder_of_a_bad_path(run, tmp_path):
    """'config.json path.steps: -3 ...' named no folder."""
    bad = tmp_path / "bad"
    shutil.copytree(run / "experts" / "expert_01", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "path": {"kind": "vp", "steps": -3}}))
    with pytest.raises(DDMError, match=rf"^FOLDER {re.escape(str(bad))}: config.json path.steps: -3"):
        replace_expert(run, 1, bad)


def test_replace_expert_from_a_folder_that_does_not_exist_says_so(run, tmp_path):
    """A mistyped path was called 'not a model folder ...; train or copy it again'."""
    with pytest.raises(DDMError, match=rf"^FOLDER {re.escape(str(tmp_path / 'typo'))} does not exist; give the model"):
        replace_expert(run, 1, tmp_path / "typo")


def test_replace_expert_into_a_missing_slot_says_an_expert_is_copied_in(run, tmp_path):
    """It offered training alone, where an island's expert goes in by copying its folder."""
    shutil.move(run / "experts" / "expert_01", tmp_path / "island")
    with pytest.raises(DDMError, match=r"experts \[1\] are missing; .* or copy the folders of experts trained "
                                       r"elsewhere on those shards into .*experts/expert_XX \(then `ddmkit register"):
        replace_expert(run, 1, tmp_path / "island")
    shutil.copytree(tmp_path / "island", run / "experts" / "expert_01")  # what the message says
    assert replace_expert(run, 1, tmp_path / "island") is None  # a copy of those weights already: nothing to do


def test_add_expert_trains_on_the_device_given(base, run, cli):
    """A run trained on a GPU (its config names cuda:7) grown on a machine without it: the error said to pass
    --device cpu, an option add-expert did not have."""
    path = RunFolder(run).config
    raw = json.loads(path.read_text())["config"]
    for name in ("expert", "router"):
        raw[name]["train"]["device"] = "cuda:7"
    cfg = validate(RunConfig, raw)
    path.write_text(json.dumps({"digest": cfg.digest(), "config": cfg.model_dump()}))
    before = hashes(run)
    code, err = cli("add-expert", run, "--data", base / "new.npz")
    said = " ".join(err.split())
    assert code == 2 and "expert.train.device = 'cuda:7'" in said and "--device cpu" in said, said
    assert hashes(run) == before
    code, err = cli("add-expert", run, "--data", base / "new.npz", "--device", "cpu")
    assert code == 0, err
    assert load_partition_checked(RunFolder(run).partition)[0]["k"] == 4
    said = " ".join(err.split())
    assert f"sample and score with `ddmkit run {run}/config.json --out {run} --stages evaluate`" in said
    e = read_json(RunFolder(run).grow)["events"][0]  # where the file's rows went: "N rows added" hid the test rows
    assert e["test_rows"] > 0 and e["rows"] + e["test_rows"] == len(np.load(base / "new.npz")["x"])
    assert f"{e['rows']} training rows and {e['test_rows']} test rows (the run's share held out) added" in said


def test_a_device_given_that_this_machine_lacks_is_refused_with_a_device_to_give(base, run, cli):
    """--device cuda:63 said 'pass --device cpu (or set the config's train.device = "auto")': add-expert has
    no config to set, and a config's device would not apply where --device names one."""
    before = hashes(run)
    code, err = cli("add-expert", run, "--data", base / "new.npz", "--device", "cuda:63")
    assert code == 2 and re.fullmatch(r"error: --device: 'cuda:63', but this machine has \d+ CUDA device\(s\); "
                                      r"give --device cpu \(or auto: a GPU when there is one\)", err), err
    assert hashes(run) == before


def test_test_rows_held_out_by_the_islands_own_test_fraction_are_not_called_the_runs_share(base, run, cli):
    """--params '{"test_fraction": 0.5}' held out half of the file, and the command said '(the run's share held
    out)'."""
    code, err = cli("add-expert", run, "--data", base / "new.npz", "--params", '{"test_fraction": 0.5}')
    e = read_json(RunFolder(run).grow)["events"][0]
    assert code == 0 and e["test_rows"] == e["rows"] > 0, err
    assert f"{e['rows']} training rows and {e['test_rows']} test rows added to" in " ".join(err.split()), err


def test_add_expert_on_a_run_without_a_monolith_says_how_to_sample_and_score_it(base, run, cli):
    """The next step printed was `ddmkit run ... --stages evaluate`, which refuses a run without a monolith (the
    experts of islands, brought together, have none)."""
    shutil.rmtree(RunFolder(run).monolith)
    write_registry(run)
    code, err = cli("add-expert", run, "--data", base / "new.npz", "--router", "stats")
    assert code == 0 and f"sample and score with `ddmkit sample {run}`, then `ddmkit evaluate {run}`" in \
        " ".join(err.split()), err


def test_images_of_an_array_file_of_another_shape_are_pointed_to_image_array():
    """An .npz of (N, 8, 8) images given to a run of (1, 8, 8) images said only that the shapes differ."""
    from types import SimpleNamespace

    from ddmkit.pipeline.grow import check_island

    run = SimpleNamespace(manifest={"data_shape": [1, 8, 8]})
    with pytest.raises(DDMError, match=r"shape \(8, 8\) but the run's are \(1, 8, 8\).*--data image_array"):
        check_island(run, ArrayData("f.npz", torch.zeros(4, 8, 8)), "training")
    with pytest.raises(DDMError, match=r"shape \(3,\)") as error:
        check_island(run, ArrayData("f.npz", torch.zeros(4, 3)), "training")
    assert "image_array" not in str(error.value)
    # at another resolution the shape error did not say that the image loaders scale and cut (resize, crop)
    for other in ((1, 16, 16), (16, 12)):
        with pytest.raises(DDMError, match=r"images at another resolution.*--params '\{\"path\": \"FILE\", "
                                           r"\"resize\": 8, \"crop\": 8\}'"):
            check_island(run, ArrayData("f.npz", torch.zeros(4, *other)), "training")
    with pytest.raises(DDMError) as error:  # other channels: resize and crop would not help
        check_island(run, ArrayData("f.npz", torch.zeros(4, 3, 16, 16)), "training")
    assert "resize" not in str(error.value)


def test_images_of_other_channels_are_told_to_convert_them_not_to_use_image_array(tmp_path):
    """(N, 3, 8, 8) images given to a run of (1, 8, 8) ones were pointed to --data image_array, which reads
    float (N, C, H, W) images as they are: the same shape error again. Then the fix said x.mean(axis=1,
    keepdims=True), which on an array file's (N, H, W, 3) pixels gave (N, 1, W, 3) floats in 0 .. 255: refused
    again. Each way of giving images gets the fix that works for it, applied here: an image folder's mode, an
    array file's uint8 pixels, an ArrayData's tensor."""
    from types import SimpleNamespace

    from PIL import Image

    from ddmkit.data import load_dataset
    from ddmkit.pipeline.grow import check_island

    rng = np.random.default_rng(0)
    pixels = {1: rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), 3: rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)}
    for ours, theirs, mode, file_fix, tensor_fix in (
            (1, 3, "grey", "x.mean(axis=-1).round().astype(np.uint8)", "x.mean(1, keepdim=True)"),
            (3, 1, "rgb", "np.repeat(x[..., None], 3, axis=-1)", "x.repeat(1, 3, 1, 1)")):
        run = SimpleNamespace(manifest={"data_shape": [ours, 8, 8]}, expert_config={"kwargs": {}},
                              cfg=SimpleNamespace(router=SimpleNamespace(net=SimpleNamespace(kwargs={}))),
                              train=SimpleNamespace(labels=None))  # what check_island reads of a run without labels
        with pytest.raises(DDMError) as error:
            check_island(run, ArrayData("f.npz", torch.zeros(2, theirs, 8, 8)), "training")
        said = str(error.value)
        assert "image_array" not in said and f"(the run's images have {ours} channel(s), these {theirs}: " in said
        assert f'"mode": "{mode}" in --params' in said and f"e.g. {file_fix} of" in said and tensor_fix in said, said
        folder = tmp_path / f"to_{ours}"
        folder.mkdir()
        for i, image in enumerate(pixels[theirs]):
            Image.fromarray(image).save(folder / f"{i}.png")
        np.save(tmp_path / f"to_{ours}.npy", eval(file_fix, {"np": np, "x": pixels[theirs]}))
        for name, params in (("image_folder", {"path": str(folder), "mode": mode}),
                             ("image_array", {"path": str(tmp_path / f"to_{ours}.npy")})):
            train, _ = load_dataset(name, 6, 0, 0, params)
            check_island(run, train, "training")
        check_island(run, ArrayData("f", eval(tensor_fix, {"x": torch.zeros(2, theirs, 8, 8)})), "training")
    run = SimpleNamespace(manifest={"data_shape": [3, 8, 8]})
    with pytest.raises(DDMError, match=r"these 4: convert them\)$"):
        check_island(run, ArrayData("f.npz", torch.zeros(2, 4, 8, 8)), "training")


@pytest.mark.parametrize("command", [("add-expert", "{run}", "--data", "{run}"),
                                     ("replace-expert", "{run}", "0", "{tmp}"), ("distill", "{run}")])
def test_a_file_given_as_run_is_said_to_be_a_file_not_a_run_folder(tmp_path, cli, command):
    """`ddmkit add-expert island.npz ...` (the data file where RUN goes) said 'island.npz is a file, not a folder;
    move it away', as if the file were in the way of a folder to write."""
    data = tmp_path / "island.npz"
    np.savez(data, x=np.zeros((4, 2), dtype=np.float32))
    before = hashes(tmp_path)
    code, err = cli(*[part.format(run=data, tmp=tmp_path) for part in command])
    assert code == 2 and f"{data} is a file, not a run folder; give the folder a `ddmkit run` wrote" in err, err
    assert "move it away" not in err and hashes(tmp_path) == before
    code, err = cli(*[part.format(run=tmp_path / "nosuch", tmp=tmp_path) for part in command])
    assert code == 2 and f"{tmp_path / 'nosuch'} is not a run folder (no such folder)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["island.npz"]


def test_labels_of_an_array_data_that_do_not_fit_its_rows_are_refused(run):
    """An ArrayData island with 19 labels for 20 rows was added (RUN/data/train.safetensors then held fewer labels
    than rows); float labels were cut to whole numbers; labels (N, 1) failed with a RuntimeError."""
    before = hashes(run)
    island = component(3, 20, seed=3)
    for labels, words in [(island.labels[:19], "'labels' has shape (19,), expected (20,): one label per row"),
                          (island.labels.float() + 0.5, "expected whole numbers"),
                          (island.labels[:, None], "'labels' has shape (20, 1)")]:
        with pytest.raises(DDMError) as err:
            add_expert(run, ArrayData("island", island.x, labels, island.truth), router="stats", log=lambda m: None)
        assert str(err.value).startswith("data (training): ") and words in str(err.value), err.value
    assert hashes(run) == before


def test_replace_expert_takes_a_numpy_integer_as_k(run):
    """K from NumPy (np.argsort of per-expert scores) was refused: 'there is no expert np.int64(2)'."""
    event = replace_expert(run, np.int64(2), run / "experts" / "expert_00", log=lambda m: None)
    assert event["expert"] == 2 and type(event["expert"]) is int
    assert read_json(RunFolder(run).expert(2) / "config.json")["cluster"] == 2
    verify_registry(run)
    with pytest.raises(DDMError, match=r"K: there is no expert 3; this run has experts 0 \.\. 2"):
        replace_expert(run, np.int64(3), run / "experts" / "expert_00")
    before = hashes(run)  # K "1" (as typed) or 1.0 was said to be no expert: "there is no expert '1'"
    for k, kind in (("1", "str"), (1.0, "float"), (True, "bool")):
        with pytest.raises(DDMError) as error:
            replace_expert(run, k, run / "experts" / "expert_00")
        assert str(error.value) == (f"K: {k!r} is not a whole number ({kind}); give one of this run's experts 0 .. 2, "
                                    "an int"), error.value
    assert hashes(run) == before


def test_a_warning_while_add_expert_loads_the_data_names_its_option(run, tmp_path, cli):
    """A warning raised while `add-expert --data FILE` loads the island's data named data.name, a field of a
    config this command's user never wrote (its errors said --data already)."""
    np.save(tmp_path / "hwc.npy", np.zeros((20, 4, 4, 3), dtype=np.float32))  # channels-last images: warned of
    with pytest.warns(UserWarning, match="channels-last") as said:  # as the command line shows them, one a line
        code, stderr = cli("add-expert", run, "--data", tmp_path / "hwc.npy")
    assert code == 2 and "shape (4, 4, 3)" in stderr, stderr
    messages = [str(w.message) for w in said]
    assert len(messages) == 1 and messages[0].startswith("--data: data file") and "data.name" not in messages[0], \
        messages


def test_a_misspelt_mode_or_router_gets_a_did_you_mean(run):
    """`--mode nerest` listed the accepted values but not the one meant."""
    for kwargs, words in (({"mode": "nerest"}, "accepted: new-cluster, nearest; did you mean 'nearest'?"),
                          ({"router": "stat"}, "accepted: retrain, stats; did you mean 'stats'?")):
        with pytest.raises(DDMError) as error:
            add_expert(run, component(3, 20, 3), **kwargs)
        assert words in str(error.value), str(error.value)
    with pytest.raises(DDMError) as error:  # nothing near: no guess
        add_expert(run, component(3, 20, 3), mode="join")
    assert "did you mean" not in str(error.value)


def test_a_k_that_is_not_a_whole_number_is_refused_in_one_line_with_the_runs_experts(run, tmp_path, cli):
    """`replace-expert RUN two FOLDER` got Typer's framed "Invalid value for 'K'", without the experts there are."""
    before, source = hashes(run), run / "experts" / "expert_00"
    for k in ("two", "1.5"):
        code, stderr = cli("replace-expert", run, k, source)
        assert code == 2 and stderr.startswith(f"error: K {k}: give a whole number, one of this run's experts 0 .. 2 "
                                               f"(e.g. `ddmkit replace-expert {run} 0 {source}`)"), stderr
    code, stderr = cli("replace-expert", tmp_path / "nothing", "two", source)  # no run to read: the rule alone
    assert code == 2 and "error: K two: give a whole number" in stderr and "Invalid value" not in stderr, stderr
    assert hashes(run) == before


def test_replace_expert_names_folder_when_it_is_no_model_folder(run, tmp_path, cli, monkeypatch):
    """`replace-expert RUN 0 .` said only 'config.json is missing; copy the whole model folder again': FOLDER is
    named, and the folder to give. An empty FOLDER is refused as such (not read as '.')."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    before = hashes(run)
    code, err = cli("replace-expert", run, 0, ".")
    assert code == 2 and "FOLDER . holds no config.json" in err, err
    assert "give the folder of the expert that is to replace it" in err, err
    code, err = cli("replace-expert", run, 0, "")
    assert code == 2 and "FOLDER is empty: give the model folder (config.json and model.safetensors)" in err, err
    shutil.copy(run / "experts" / "expert_01" / "config.json", tmp_path / "here")  # its weights not copied
    code, err = cli("replace-expert", run, 0, ".")
    assert code == 2 and "FOLDER .: model.safetensors" in err, err
    code, err = cli("replace-expert", run, 0, tmp_path / "here" / "config.json")
    assert code == 2 and f"FOLDER {tmp_path / 'here' / 'config.json'} is a file; give the folder" in err, err
    assert hashes(run) == before


def test_a_run_without_a_registry_and_a_damaged_expert_is_refused_before_it_grows(base, run, cli):
    """A run never registered, one expert's kwargs.width edited: add-expert trained the new expert and router,
    moved them in, cleared the samples, and only then refused (registering at the end): exit 2 on a grown run.
    Now it is refused first, the run as it was, and grows once the folder is copied back."""
    (run / "registry.json").unlink()
    config = run / "experts" / "expert_01" / "config.json"
    edited = json.loads(config.read_text())
    edited["kwargs"]["width"] = 48
    config.write_text(json.dumps(edited))
    before = hashes(run)
    code, err = cli("add-expert", run, "--data", base / "new.npz")
    assert code == 2 and f"{config.parent / 'model.safetensors'} does not match its config.json" in err, err
    assert hashes(run) == before and not (run / "experts" / "expert_03").exists()
    shutil.rmtree(config.parent)
    shutil.copytree(base / "base" / "experts" / "expert_01", config.parent)  # the fix the message gives
    code, err = cli("add-expert", run, "--data", base / "new.npz")
    assert code == 0 and (run / "experts" / "expert_03" / "model.safetensors").is_file(), err


@pytest.mark.parametrize("blocked", ["samples", "plots/sub", "."])
def test_a_derived_folder_that_cannot_be_removed_is_refused_before_any_training(base, run, cli, monkeypatch,
                                                                               blocked):
    """A read-only RUN/samples was found after the new expert and router had trained (the removal of the old
    samples failed, the growth rolled back: the training wasted), and the derived folders went one at a time (a
    read-only later one left the earlier ones gone). Now every path is checked first: exit 2, the path and the
    chmod named, no training, no byte changed."""
    import ddmkit.pipeline.grow as grow

    sample_run(run, ["top-2"], log=lambda m: None)
    (run / "plots" / "sub").mkdir(parents=True)
    (run / "plots" / "sub" / "a.png").write_bytes(b"png")
    before = hashes(run)
    target, access = (run / blocked).resolve(), os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p).resolve() == target and mode & os.W_OK
                        else access(p, mode, **kw))  # as for a user other than root

    def trained(*args, **kwargs):
        raise AssertionError("trained before the run was found read-only")
    monkeypatch.setattr(grow, "run_jobs", trained)
    monkeypatch.setattr(grow, "train_router", trained)
    code, err = cli("add-expert", run, "--data", base / "new.npz")
    err = " ".join(err.split())
    top = run if blocked == "." else run / blocked.split("/")[0]
    fix = f"chmod u+w {run}" if blocked == "." else f"chmod -R u+w {top}"
    assert code == 2 and f"`{fix}`" in err and "nothing was changed" in err, err
    assert f"{top} cannot be removed ({target} is not writable)" in err or blocked == ".", err
    assert hashes(run) == before
    code, err = cli("replace-expert", run, 1, base / "base" / "experts" / "expert_02")
    assert code == 2 and f"`{fix}`" in " ".join(err.split()) and hashes(run) == before, err


def test_an_unfinished_added_expert_is_trained_again_by_the_printed_command(base, run, ddmkit):
    """The added expert of a grown run left without weights: the train-expert command that verify prints for it
    names the added shard, and run as printed it trains the expert that shard's slot needs (verify passes)."""
    import shlex

    add_expert(run, str(base / "new.npz"), log=lambda m: None)
    folder = RunFolder(run)
    (folder.expert(3) / "model.safetensors").unlink()
    code, _, err = ddmkit("verify", run)
    commands = re.findall(r"train it again with `[^`]+` \(it trains the run's missing experts\) or `([^`]+)`", err)
    assert code == 2 and len(commands) == 1, err
    shard = run / "partition" / read_json(folder.manifest)["shards"][3]["path"]
    args = shlex.split(commands[0])
    assert args[:3] == ["ddmkit", "train-expert", str(shard)], args
    code, _, err = ddmkit(*args[1:])
    assert code == 0, err
    assert read_json(folder.expert(3) / "config.json")["shard_sha256"] == sha(shard)
    code, _, err = ddmkit("verify", run)
    assert code == 0, err


def test_data_settings_in_add_experts_errors_are_given_as_its_options(run, tmp_path, cli):
    """Errors of the data loaders, worded for a config, reached add-expert as `--data = "image_folder" and --params
    key 'path' = "pngs"` or `(--set --params key 'path'=FILE.npy)`: no command to paste. They give --data and
    --params as typed, and the command they give loads the data (here: to be refused for its shape)."""
    from PIL import Image

    from ddmkit.cli import _as_data_options

    before = hashes(run)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(4):
        Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)).save(pngs / f"{i}.png")
    np.savez(tmp_path / "hwc.npz", x=np.zeros((6, 4, 4, 3), dtype=np.uint8))
    for data, fix in ((pngs, f"--data image_folder --params '{{\"path\": \"{pngs}\"}}'"),
                      (tmp_path / "hwc.npz",
                       f"--data image_array --params '{{\"path\": \"{tmp_path / 'hwc.npz'}\"}}'")):
        code, err = cli("add-expert", run, "--data", data)
        assert code == 2 and fix in err and "= \"image" not in err and "--params key" not in err, err
        code, err = cli("add-expert", run, *shlex.split(fix))  # the command it gives, pasted
        assert code == 2 and "the new data are of shape" in err and "but the run's are (2,)" in err, err
    code, err = cli("add-expert", run, "--data", "image_array")
    assert code == 2 and "no image array file given; give it with --params '{\"path\": \"FILE.npy\"}'" in err, err
    assert "--set" not in err and "config" not in err
    assert _as_data_options('set data.name = "image_array" (data.params.path = "a b.npz"); or data.params.resize = 8 '
                            'and data.params.crop = 8 (scaled)') == \
        "set --data image_array --params '{\"path\": \"a b.npz\"}'; or --params '{\"resize\": 8, \"crop\": 8}' (scaled)"
    assert _as_data_options('(a folder: data.name = "idx" and data.params.dir = "d") x') == \
        "(a folder: --data idx --params '{\"dir\": \"d\"}') x"
    assert hashes(run) == before


def test_an_array_data_of_numpy_arrays_is_added_and_one_of_lists_refused(run):
    """ArrayData("island", np.load(FILE)["x"]) (the page's snippet without its torch.as_tensor) failed with
    "AttributeError: 'numpy.ndarray' object has no attribute 'detach'"; its NumPy arrays are taken as tensors,
    and x or labels of another type are refused in one line naming the field, before any write."""
    island = component(3, 20, seed=3)
    before = hashes(run)
    for x, labels, field in ((island.x.tolist(), island.labels, "x is list"),
                             (island.x.numpy().astype(object), island.labels, "x is a NumPy array of object"),
                             (island.x.numpy(), island.labels.tolist(), "labels is list")):
        with pytest.raises(DDMError) as error:
            add_expert(run, ArrayData("island", x, labels), router="stats", log=lambda m: None)
        assert str(error.value).startswith(f"data: ArrayData.{field}; give a tensor (or a NumPy array)"), error.value
    assert hashes(run) == before
    entry = add_expert(run, ArrayData("island", island.x.numpy(), island.labels.numpy()), router="stats",
                       log=lambda m: None)
    assert entry["rows"] == 20 and entry["data_sha256"] == content_hash(island.x) and entry["k_after"] == 4
    verify_registry(run)


def test_an_expert_of_the_vp_path_replaces_one_and_is_converted_to_the_velocity(run, tmp_path):
    """docs/grow.md said the replacing folder must be "a velocity network"; an expert trained on the vp path with
    v prediction (another kind of run's) is taken, and the grown DDM mixes it as the velocity its config.json
    converts it to, the velocity of load_model + velocity_field of the folder."""
    from ddmkit.ddm.load import velocity_field
    from ddmkit.registry import load_model

    vp = tmp_path / "vp"
    config = validate(ExpertConfig, {**SMALL, "path": {"kind": "vp", "schedule": "cosine"}, "prediction": "v",
                                     "train": {**SMALL["train"], "steps": 10}})
    train_expert(run / "partition" / "shards" / "cluster_02.safetensors", config, vp)
    assert read_json(vp / "config.json")["path"]["kind"] == "vp"
    replace_expert(run, 2, vp, log=lambda m: None)
    verify_registry(run)
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(1)), torch.full((5,), 0.4)
    want = velocity_field(*load_model(vp))(x, t)
    assert torch.allclose(load_ddm(run).experts[2](x, t), want, atol=1e-6)
    text = " ".join((Path(__file__).parents[1] / "docs" / "grow.md").read_text().split())
    assert "an expert trained on the `vp` path or with another `prediction`" in text
    assert "is converted to the velocity from what its `config.json` records" in text


def test_the_image_fixes_of_add_expert_name_the_islands_file_and_loader(tmp_path, cli):
    """The shape errors of images said --params '{"path": "FILE"}' of the file given, and `--data image_array`
    also of an image folder at another resolution, which that loader refuses ("a folder, not an array file").
    They name the file or folder given, with its own loader, and the command they give adds the island."""
    from PIL import Image

    from ddmkit.config import load_config

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", x=rng.integers(0, 255, (60, 8, 8), dtype=np.uint8),
             labels=rng.integers(0, 3, 60))
    raw = load_config(Path(__file__).parent / "configs" / "tiny_images.toml").model_dump()
    raw["data"]["params"]["path"] = str(tmp_path / "images.npz")
    run = tmp_path / "run"
    run_pipeline(validate(RunConfig, raw), run, log=lambda m: None, stages="train")
    np.savez(tmp_path / "new.npz", x=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8), labels=rng.integers(0, 3, 20))
    big = tmp_path / "big"
    big.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(big / f"{i}.png")
    new = tmp_path / "new.npz"
    for given, fix in (((new,), f"--data image_array --params '{{\"path\": \"{new}\"}}'"),
                       (("image_folder", "--params", json.dumps({"path": str(big)})),
                        f"--data image_folder --params '{{\"path\": \"{big}\", \"resize\": 8, \"crop\": 8}}'")):
        before = hashes(run)
        code, err = cli("add-expert", run, "--data", *given)
        assert code == 2 and fix in err and "FILE" not in err, err
        assert hashes(run) == before
        code, err = cli("add-expert", run, *shlex.split(fix), "--router", "stats")  # the command it gives, pasted
        assert "the new data are of shape" not in err, err
    assert code == 2 and "have no labels" in err  # a folder without class sub-folders: past the shape, unlabelled
    assert json.loads((run / "grow.json").read_text())["events"][0]["rows"] > 0  # the .npz was added
