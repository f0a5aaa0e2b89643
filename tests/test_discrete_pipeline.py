"""The text pipelines on a tiny synthetic corpus with two obvious clusters
(letters vs digits): partition recovers them, the Bayes router finds them,
reports are written, stages are reused, bad configs fail clearly."""
import json
import random

import pytest
from typer.testing import CliRunner

from ddmkit.cli import text_app as app
from ddmkit.discrete.config import is_text_config, load_text_config
from ddmkit.pipeline.text import run_text
from ddmkit.config import load_config
from ddmkit.errors import DDMError

TINY = """
kind = "{kind}"
threads = 1
[corpus]
source = "{source}"
pattern = "*.txt"
min_doc_bytes = 32
test_fraction = 0.2
[partition]
k = 2
[model]
seq_len = 24
width = 32
depth = 1
heads = 2
[expert.train]
steps = 60
batch_size = 16
lr = 3e-3
warmup = 5
ema_decay = 0.5
device = "cpu"
[router]
kinds = {kinds}
width = 16
[router.train]
steps = 30
batch_size = 16
warmup = 5
ema_decay = 0.5
device = "cpu"
[evaluate]
windows_per_cluster = 6
t_points = 4
strategies = ["full", "top-1", "switch"]
[sample]
n = 2
steps = 4
"""


def make_corpus(folder):
    rng = random.Random(0)
    for i in range(20):
        words = ["".join(rng.choice("abcde") for _ in range(4)) for _ in range(40)]
        (folder / f"letters{i}.txt").write_text(" ".join(words))
        nums = ["".join(rng.choice("01234") for _ in range(4)) for _ in range(40)]
        (folder / f"digits{i}.txt").write_text(" ".join(nums))


def write_config(tmp_path, kind, kinds='["bayes", "learned"]'):
    make_corpus(tmp_path)
    path = tmp_path / f"{kind}.toml"
    path.write_text(TINY.format(kind=kind, source=tmp_path, kinds=kinds))
    return path


def test_ar_pipeline_end_to_end(tmp_path):
    config = write_config(tmp_path, "text_ar")
    report = run_text(config, tmp_path / "out")
    for name in json.loads((tmp_path / "out" / "partition" / "manifest.json").read_text())["shards"]:
        kinds = {e[:6] for e in name["examples"]}
        assert len(kinds) == 1  # each cluster is all letters or all digits
    assert report["k"] == 2 and abs(sum(report["prior"]) - 1) < 1e-12
    bpb = report["bits_per_byte"]
    assert {"centralized", "own expert (true cluster)", "bayes / full", "learned / top-1"} <= set(bpb)
    assert bpb["own expert (true cluster)"]["all"] < 4.0  # 6 symbols in play: far below 8 bits
    assert report["router_accuracy"]["bayes"][23] == 1.0  # a whole window tells letters from digits
    assert report["compute"]["decentralized_train_tokens"] == report["compute"]["centralized_train_tokens"]
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Decentralized text model")
    assert "![training loss](plots/training.png)" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "plots" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("experts/expert_00", "experts/expert_01", "monolith", "router"):
        assert {p.name for p in (tmp_path / "out" / folder).iterdir()} == {
            "config.json", "model.safetensors", "train_log.jsonl"}
    again = run_text(config, tmp_path / "out")  # every stage reused: the same numbers
    assert again["bits_per_byte"] == bpb and again["seconds"]["train"] < report["seconds"]["train"]
    fresh = run_text(config, tmp_path / "out2")  # same seed, same bytes
    assert fresh["bits_per_byte"] == bpb and fresh["samples"] == report["samples"]
    weights = "experts/expert_01/model.safetensors"
    assert (tmp_path / "out" / weights).read_bytes() == (tmp_path / "out2" / weights).read_bytes()


def test_dfm_pipeline_end_to_end(tmp_path):
    report = run_text(write_config(tmp_path, "text_dfm", '["learned"]'), tmp_path / "out")
    assert report["kind"] == "text_dfm" and "learned / full" in report["bits_per_byte"]
    assert report["bits_per_byte"]["own expert (true cluster)"]["all"] < 6.0
    assert all(len(s) > 0 and "_" not in s for texts in report["samples"].values() for s in texts)


def test_config_errors(tmp_path):
    config = write_config(tmp_path, "text_ar")
    assert is_text_config(config)
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("[model]", "[model]\nwidht = 3"))
    with pytest.raises(DDMError, match="model.widht: unknown field; did you mean 'width'"):
        load_text_config(bad)
    bad.write_text(config.read_text().replace('kind = "text_ar"', 'kinds = "text_ar"'))  # 15 lines of unknown fields
    with pytest.raises(DDMError, match=r'^\S+bad.toml: kind: missing; a text config starts with kind = "text_ar"'):
        load_text_config(bad)
    with pytest.raises(DDMError, match=r'^\S+bad.toml: invalid configuration\n  kind: missing; a text config \(it has '
                                       r'\[corpus\], \[model\]\) starts with kind = "text_ar" \(autoregressive\) or '
                                       r'kind = "text_dfm" \(discrete flow matching\): docs/discrete.md$'):
        load_config(bad)  # read as a vector or image run's, as `ddmkit run` reads a config without kind
    bad.write_text(config.read_text().replace('kind = "text_ar"', 'kind = "text_xx"'))
    with pytest.raises(DDMError, match="kind: 'text_xx' unknown; accepted: text_ar, text_dfm"):
        load_text_config(bad)
    assert is_text_config(bad)  # a top-level kind: the text loader names the accepted kinds
    seeded = load_text_config(config).with_seed(7)
    assert (seeded.seed, seeded.corpus.seed, seeded.expert.train.seed, seeded.router.train.seed) == (7, 7, 7, 8)
    with pytest.raises(DDMError, match="'bayes' needs exact"):
        load_text_config(write_config(tmp_path, "text_dfm"))
    # without router.kinds a text_dfm config took text_ar's default (bayes too): trained, then crashed
    no_kinds = write_config(tmp_path, "text_dfm")
    no_kinds.write_text("\n".join(line for line in no_kinds.read_text().splitlines() if not line.startswith("kinds")))
    assert load_text_config(no_kinds).router.kinds == ["learned"]
    assert load_text_config(write_config(tmp_path, "text_ar", '["learned"]')).router.kinds == ["learned"]
    bad.write_text(config.read_text().replace('"switch"]', '"oracle"]'))
    with pytest.raises(DDMError, match="evaluate.strategies"):
        load_text_config(bad)


def test_cli(tmp_path, cli):
    runner = CliRunner()
    result = runner.invoke(app, ["exactness", "--k", "2", "--vocab", "3", "--length", "5",
                                 "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert rows[0]["kl_max"] < 1e-6
    done = cli("text", "run", tmp_path / "missing.toml")
    assert done.returncode == 2 and "does not exist" in " ".join(done.stderr.split())


CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["text_ar", "text_dfm"])
def test_shipped_configs_are_valid(name):
    assert is_text_config(CONFIGS / f"{name}.toml")
    assert load_text_config(CONFIGS / f"{name}.toml").kind == name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["text_ar", "text_dfm"])
def test_shipped_configs_run(name, tmp_path):
    """The default size on the Python standard library (about 4 minutes alone on 2 cores; the run
    time is reported, not asserted: speed belongs in benchmarks, and the slow suite runs the two
    configs side by side)."""
    report = run_text(CONFIGS / f"{name}.toml", tmp_path / name)
    bpb = report["bits_per_byte"]
    assert bpb["centralized"]["all"] < 6.0 and bpb["own expert (true cluster)"]["all"] < 6.0
    best = max(report["router_accuracy"]["learned"].values())
    assert best > 1.0 / report["k"]  # better than chance
