"""`ddmkit sample`, `evaluate` and `analyze` on every kind of run, through the command line: an
image run (the tiny Fashion-MNIST config on a small IDX folder) and a text run (two obvious
clusters, letters and digits, so the alignment answer is known)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from ddmkit.config import RunConfig, load_config, validate
from ddmkit.io import load_tensors
from ddmkit.layout import RunFolder
from ddmkit.pipeline.run import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from test_images import write_idx_set

    root = tmp_path_factory.mktemp("images")
    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(write_idx_set(root / "fm", 160, 48))}
    raw["sample"].update(n=16, steps=2, strategies=["monolith", "top-1"], guidance_sweep=[], stats_router_strategies=[])
    run_pipeline(validate(RunConfig, raw), root / "run", stages="train", log=lambda m: None)
    return root / "run"


def test_sample_evaluate_and_analyze_an_image_run(image_run, cli):
    done = cli("sample", image_run, "--strategy", "top-2", "--strategy", "monolith", "--n", "12", "--guidance", "2")
    assert done.returncode == 0, done.stderr
    folder = RunFolder(image_run)
    infos = json.loads(folder.sample_info.read_text())
    assert infos["top-2"]["guidance"] == 2.0
    assert infos["top-2"]["expert_calls_per_sample"] == 2 * 2  # K = 2 experts x 2 steps
    x = load_tensors(folder.sample_set("top-2"))["x"]
    assert x.shape == (12, 1, 28, 28) and x.abs().max() <= 1  # images, clamped to [-1, 1]
    labels = load_tensors(folder.sample_set("top-2"))["y"]
    assert labels.shape == (12,) and int(labels.max()) < 10  # class-conditional experts: labels drawn and kept
    assert torch.equal(load_tensors(folder.sample_set("monolith"))["y"], labels)  # the same labels for every set
    done = cli("evaluate", image_run)
    assert done.returncode == 0, done.stderr
    rows = json.loads(folder.metrics.read_text())["rows"]
    assert {"train images (floor)", "top-2", "monolith"} <= set(rows)
    assert all(torch.isfinite(torch.tensor(rows[name]["fid"])) for name in ("top-2", "monolith"))
    assert "## Networks" in folder.report.read_text()
    done = cli("analyze", image_run, "--strategy", "top-1", "--strategy", "top-2", "--strategy", "full",
               "--n", "6", "--max-steps", "1", "--jvp-rows", "2")
    assert done.returncode == 0, done.stderr
    analysis = json.loads((folder.analysis / "analysis.json").read_text())
    assert analysis["quality_name"] == "NN distance" and set(analysis["strategies"]) == {"top-1", "full"}  # K = 2:
    # top-2 is full routing, measured once


def test_the_report_flags_an_expert_trained_with_other_settings(image_run, tmp_path):
    """A run collected from experts trained elsewhere: the report reads each folder's own config."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(image_run, copy)
    path = RunFolder(copy).expert(1) / "config.json"
    config = json.loads(path.read_text())
    config["train"]["steps"] = 99
    path.write_text(json.dumps(config))
    (copy / "registry.json").unlink()  # the change is intended: the experts come from elsewhere
    from ddmkit.pipeline.models import describe_models
    from ddmkit.pipeline.prepare import run_config

    rows, notes = describe_models(copy, run_config(copy))
    assert [r[0] for r in rows if r[-1] != "-"] == ["expert 1"] and "steps (99, config 4)" in notes[0]
    assert rows[0][3] == 4 and rows[1][3] == 99  # steps as each folder recorded them


def test_an_image_report_states_each_set_s_own_count_guidance_and_labels(image_run, tmp_path, cli):
    """Sets drawn again by `ddmkit sample` with another --guidance or --n were reported with the config's:
    the row of a set drawn at guidance 3 was 'top-2' under 'guidance 1.0 unless a row names another', a
    set of 8 images had n = 16, and samples/labels.safetensors held only the last call's labels."""
    from ddmkit.pipeline.sampling import sample_labels

    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    assert cli("sample", run, "--strategy", "top-1", "--strategy", "monolith").returncode == 0
    assert cli("sample", run, "--strategy", "top-2", "--guidance", "3").returncode == 0
    done = cli("sample", run, "--strategy", "top-1", "--n", "8", "--seed", "7")
    assert done.returncode == 0, done.stderr
    done = cli("evaluate", run)
    assert done.returncode == 0, done.stderr
    folder = RunFolder(run)
    rows = json.loads(folder.metrics.read_text())["rows"]
    assert rows["top-1"]["n"] == 8 and rows["monolith"]["n"] == 16 and rows["top-2"]["n"] == 16
    table = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in folder.report.read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| samples")}
    assert table["top-2 @ cfg 3"] == "16" and table["top-1"] == "8" and "top-2" not in table, table
    assert torch.equal(load_tensors(folder.sample_set("top-1"))["y"], sample_labels(10, 8, 7, "cpu"))
    assert torch.equal(load_tensors(folder.sample_set("monolith"))["y"], sample_labels(10, 16, 0, "cpu"))


def text_config(folder: Path) -> Path:
    """The tiny text config of test_discrete_pipeline on its letters-and-digits corpus, without the
    centralized model."""
    from test_discrete_pipeline import TINY, make_corpus

    make_corpus(folder)
    path = folder / "text.toml"
    path.write_text(TINY.format(kind="text_ar", source=folder, kinds='["bayes", "learned"]')
                    + "\n[centralized]\nenabled = false\n")
    return path


def test_sample_evaluate_and_analyze_a_text_run(tmp_path, cli):
    config = text_config(tmp_path)
    run = tmp_path / "run"
    done = cli("run", config, "--out", run)
    assert done.returncode == 0, done.stderr
    assert "text models: 2 experts, routers bayes, learned ready in" in done.stderr  # said "centralized" too
    done = cli("sample", run, "--strategy", "top-1", "--n", "3", "--seed", "5")
    assert done.returncode == 0, done.stderr
    texts = json.loads((run / "samples" / "text.json").read_text())
    assert set(texts) == {"bayes / top-1", "learned / top-1"} and all(len(v) == 3 for v in texts.values())
    (run / "report.md").unlink()
    done = cli("evaluate", run)
    assert done.returncode == 0, done.stderr
    assert (run / "report.md").read_text().startswith("# Decentralized text model")
    done = cli("analyze", run)
    assert done.returncode == 0, done.stderr
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    bits = analysis["bits_per_byte"]
    # letters and digits: each expert knows its own cluster and not the other one's
    assert bits[0][0] < bits[1][0] and bits[1][1] < bits[0][1]
    assert all(own < other for own, other in zip(analysis["own_expert"], analysis["other_experts_mean"]))
    bayes = analysis["own_cluster_weight"]["bayes / top-1"]["weight"]
    assert bayes[-1] == 1.0  # a whole window tells letters from digits: all weight on the own expert
    missing = cli("sample", tmp_path / "nothing", "--strategy", "top-1")
    assert missing.returncode == 2 and "is not a run folder (no such folder)" in missing.stderr
    done = cli("sample", run, "--strategy", "monolith")  # this config trains no centralized model
    assert done.returncode == 2 and "no centralized model (centralized.enabled = false" in done.stderr
    done = cli("sample", run, "--strategy", "nearest")
    assert done.returncode == 2 and "--strategy" in done.stderr and "needs continuous-data state" in done.stderr


def test_a_text_run_step_by_step_equals_the_whole_run(tmp_path, cli):
    """partition, one isolated job per expert shard, router, registry: the same bytes as `ddmkit run`."""
    config = text_config(tmp_path)
    whole, steps = tmp_path / "whole", tmp_path / "steps"
    assert cli("run", config, "--out", whole).returncode == 0
    assert cli("partition", "--config", config, "--out", steps).returncode == 0
    for k in (0, 1):
        done = cli("train-expert", steps / "partition" / "shards" / f"cluster_{k:02d}.safetensors",
                   "--config", steps / "config.json", "--out", steps / "experts" / f"expert_{k:02d}")
        assert done.returncode == 0, done.stderr
    assert cli("train-router", steps).returncode == 0
    done = cli("train-monolith", steps)
    assert done.returncode == 2 and "centralized.enabled" in done.stderr
    assert cli("register", steps).returncode == 0 and cli("verify", steps).returncode == 0
    for rel in ("experts/expert_00/model.safetensors", "experts/expert_01/model.safetensors",
                "router/model.safetensors"):
        assert (steps / rel).read_bytes() == (whole / rel).read_bytes(), rel
    shutil.move(steps / "experts" / "expert_01", tmp_path / "away")  # a lost expert: refused unless accepted
    done = cli("verify", steps)
    assert done.returncode == 2 and "experts [1] are missing" in done.stderr and "--allow-missing" in done.stderr
    assert cli("verify", steps, "--allow-missing").returncode == 0
    shutil.move(tmp_path / "away", steps / "experts" / "expert_01")
    router = (whole / "router" / "model.safetensors").read_bytes()
    (steps / "experts" / "expert_01" / "model.safetensors").write_bytes(router)
    done = cli("verify", steps)
    assert done.returncode == 2 and "SHA-256" in done.stderr


def test_a_missing_stage_names_the_command_that_makes_it(tmp_path, cli):
    run = tmp_path / "run"
    assert cli("partition", "--config", ROOT / "tests" / "configs" / "tiny.toml", "--out", run).returncode == 0
    for args, command in ((("sample", run), "ddmkit launch"), (("evaluate", run), "ddmkit sample"),
                          (("train-router", tmp_path / "empty"), "ddmkit partition"),
                          (("verify", run), "ddmkit register")):
        done = cli(*args)
        assert done.returncode == 2 and command in done.stderr, (args, done.stderr)


def test_the_statistics_router_is_built_from_the_statistics_the_expert_folders_publish(image_run, tmp_path):
    """Each expert's training writes what its island publishes (statistics.safetensors in its folder): the
    label-conditional statistics-only router and the label counts read from them equal those computed from
    the shards, and a DDM routed by them loads and samples with no shard present at all."""
    from ddmkit import DDM
    from ddmkit.ddm.load import island_stats_router, shard_label_counts
    from ddmkit.errors import DDMError

    copy = tmp_path / "run"
    shutil.copytree(image_run, copy)
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(11, 1, 28, 28, generator=gen), torch.rand(11, generator=gen), torch.arange(11)  # 10: none
    published, conditional = island_stats_router(copy, classes=10)
    counts = shard_label_counts(copy, 10)
    assert conditional and int(counts.sum()) == 160 and counts.shape == (10, 2)
    for expert in sorted(RunFolder(copy).experts.glob("expert_*")):
        (expert / "statistics.safetensors").unlink()
    from_shards, _ = island_stats_router(copy, classes=10)
    assert torch.equal(published(x, t, y=y), from_shards(x, t, y=y))
    assert torch.equal(shard_label_counts(copy, 10), counts)

    islands = tmp_path / "islands"
    shutil.copytree(image_run, islands, ignore=shutil.ignore_patterns("shards"))
    assert not (islands / "partition" / "shards").exists()
    labels = torch.tensor([0, 3, 5, 9])
    drawn = DDM.from_pretrained(islands, router="statistics").sample("top-1", n=4, steps=2, seed=3, labels=labels)[0]
    same = DDM.from_pretrained(image_run, router="statistics").sample("top-1", n=4, steps=2, seed=3, labels=labels)[0]
    assert torch.equal(drawn, same)
    (islands / "experts" / "expert_01" / "statistics.safetensors").unlink()  # only cluster 1's shard is needed now
    with pytest.raises(DDMError, match=r"cluster_01.safetensors"):  # (it named cluster_00, whose expert publishes)
        island_stats_router(islands, classes=10)


def test_the_ddm_at_the_top(image_run):
    """ddmkit.DDM: from_pretrained, to, sample with labels and guidance; the same samples as the
    function behind it, and guidance reaches the experts."""
    from ddmkit import DDM, load_ddm, sample_ddm

    ddm = DDM.from_pretrained(image_run).to("cpu")
    assert ddm.num_classes == 10 and ddm.router_conditional and ddm.k == 2
    y = torch.tensor([0, 3, 5, 9])
    x, info = ddm.sample(strategy="top-1", n=4, steps=2, seed=3, labels=y, guidance=2.0)
    assert x.shape == (4, 1, 28, 28) and info["expert_calls_per_sample"] == 2
    same, _ = sample_ddm(load_ddm(image_run, guidance=2.0), "top-1", 4, 2, seed=3, cond={"y": y})
    assert torch.equal(x, same)
    plain, _ = ddm.sample(strategy="top-1", n=4, steps=2, seed=3, labels=y)
    assert not torch.allclose(plain, x)  # guidance 1 (as loaded) against 2
    guided = ddm.at_guidance(2.0)  # kept: its prepared networks (CUDA graphs) serve the next call at 2
    again, _ = ddm.sample(strategy="top-1", n=4, steps=2, seed=3, labels=y, guidance=2.0)
    assert torch.equal(again, x) and ddm.at_guidance(2.0) is guided and len(guided.accelerated) == 1
    stats = DDM.from_pretrained(image_run, router="statistics")
    assert not stats.router_capturable and stats.router_conditional  # label-conditional statistics router
