"""Text runs get what vector and image runs have (docs/reliability.md): every check before the
first write, so a bad config leaves the folder as it was; one writer per run folder (RUN/.lock on
every stage that writes, a dead holder's lock taken over); stale temporary files removed."""
import json
import os
import subprocess
import sys

import pytest

from ddmkit.errors import DDMError
from ddmkit.io import HOST
from ddmkit.layout import RunFolder
from ddmkit.pipeline.text import (analyze_text, evaluate_text, partition_text_run, run_text, sample_text,
                                  train_text_experts, train_text_monolith, train_text_router)
from test_discrete_pipeline import write_config
from test_hardening import cli, dead_holders_lock, files_but_the_lock, held_lock

QUIET = lambda m: None  # noqa: E731


def files(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def bad_config(tmp_path, old: str, new: str):
    good = write_config(tmp_path, "text_ar")
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace(old, new, 1))
    return bad


BAD = [  # (replace, by, message): each found only after the config itself loaded
    ("k = 2", "k = 50", r"partition\.k = 50 is larger than the number of training documents"),
    ("width = 16", "width = 16\nheads = 3", r"router: .*not divisible by heads 3"),
    ("seq_len = 24", "seq_len = 4000", r"fewer bytes of training text than model\.seq_len = 4000"),
    ('pattern = "*.txt"', 'pattern = "*.md"', "no files match pattern"),
]


@pytest.mark.parametrize("old, new, message", BAD, ids=["k", "router", "seq_len", "corpus"])
def test_a_text_config_that_fails_its_checks_writes_nothing(tmp_path, old, new, message):
    bad = bad_config(tmp_path, old, new)
    with pytest.raises(DDMError, match=message):
        run_text(bad, tmp_path / "run", log=QUIET)
    with pytest.raises(DDMError, match=message):
        partition_text_run(bad, tmp_path / "run", log=QUIET)
    assert not (tmp_path / "run").exists()


def test_a_bad_text_config_with_force_leaves_the_old_run_as_it_was(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    partition_text_run(write_config(tmp_path, "text_ar"), run, log=QUIET)
    before = files(run)
    for old, new, message in BAD:
        with pytest.raises(DDMError, match=message):
            run_text(bad_config(tmp_path, old, new), run, force=True, log=QUIET)
    code, err = cli(monkeypatch, capsys, "run", bad_config(tmp_path, *BAD[0][:2]), "--out", run, "--force")
    assert code == 2 and "larger than the number of training documents" in err
    assert files(run) == before


def test_set_reaches_a_text_config_and_a_bad_one_writes_nothing(tmp_path, monkeypatch, capsys):
    """`ddmkit partition --config TEXT --set` (as `ddmkit run TEXT --set`) applies each field to the text
    config; an unknown field or a value that fails the checks exits 2 before the folder is made."""
    config = write_config(tmp_path, "text_ar")
    code, err = cli(monkeypatch, capsys, "partition", "--config", config, "--out", tmp_path / "bad",
                    "--set", "partition.kk=2")
    assert code == 2 and "partition.kk: unknown field" in err and not (tmp_path / "bad").exists()
    code, err = cli(monkeypatch, capsys, "run", config, "--out", tmp_path / "bad", "--set", "partition.k=50")
    assert code == 2 and "partition.k = 50 is larger" in err and not (tmp_path / "bad").exists()
    code, err = cli(monkeypatch, capsys, "partition", "--config", config, "--out", tmp_path / "run",
                    "--set", "partition.k=3")
    assert code == 0, err
    assert json.loads(RunFolder(tmp_path / "run").manifest.read_text())["k"] == 3


def test_a_text_run_over_a_run_of_the_other_kind_is_refused(tmp_path):
    run = tmp_path / "run"
    partition_text_run(write_config(tmp_path, "text_ar"), run, log=QUIET)
    before = files(run)
    with pytest.raises(DDMError, match="holds a text_ar run and the config's kind is text_dfm"):
        run_text(write_config(tmp_path, "text_dfm", '["learned"]'), run, log=QUIET)
    assert files(run) == before


WRITERS = {  # every library call and command that writes a text run folder
    "run_text": lambda run, config: run_text(config, run, log=QUIET),
    "partition_text_run": lambda run, config: partition_text_run(config, run, log=QUIET),
    "train_text_experts": lambda run, config: train_text_experts(run, QUIET),
    "train_text_router": lambda run, config: train_text_router(run, QUIET),
    "train_text_monolith": lambda run, config: train_text_monolith(run, QUIET),
    "sample_text": lambda run, config: sample_text(run, ["top-1"], log=QUIET),
    "evaluate_text": lambda run, config: evaluate_text(run, log=QUIET),
    "analyze_text": lambda run, config: analyze_text(run, log=QUIET),
    "ddmkit run": lambda run, config: ["run", config, "--out", run],
    "ddmkit partition": lambda run, config: ["partition", "--config", config, "--out", run],
    "ddmkit launch": lambda run, config: ["launch", run],
    "ddmkit train-router": lambda run, config: ["train-router", run],
    "ddmkit train-monolith": lambda run, config: ["train-monolith", run],
    "ddmkit sample": lambda run, config: ["sample", run, "--strategy", "top-1"],
    "ddmkit evaluate": lambda run, config: ["evaluate", run],
    "ddmkit analyze": lambda run, config: ["analyze", run],
}


@pytest.fixture(scope="module")
def locked_text_run(tmp_path_factory):
    """A partitioned text run whose lock another live process holds: (run, config, its pid, its files)."""
    root = tmp_path_factory.mktemp("text_locked")
    config, run = write_config(root, "text_ar"), root / "run"
    partition_text_run(config, run, log=QUIET)
    with held_lock(run) as pid:
        yield run, config, pid, files_but_the_lock(run)


@pytest.mark.parametrize("writer", WRITERS)
def test_every_text_writer_is_refused_while_another_process_holds_the_lock(locked_text_run, writer, monkeypatch,
                                                                          capsys):
    run, config, pid, before = locked_text_run
    if writer.startswith("ddmkit "):
        code, err = cli(monkeypatch, capsys, *WRITERS[writer](run, config))
        assert code == 2 and f"in use by process {pid}" in err, err
    else:
        with pytest.raises(DDMError, match=rf"in use by process {pid}\b"):
            WRITERS[writer](run, config)
    assert files_but_the_lock(run) == before  # nothing written


def test_text_stages_take_over_a_dead_holders_lock(tmp_path):
    config, run = write_config(tmp_path, "text_ar"), tmp_path / "run"
    for writer in ("run_text", "sample_text", "evaluate_text", "analyze_text"):
        dead_holders_lock(run)
        WRITERS[writer](run, config)
        assert not RunFolder(run).lock.exists(), writer  # taken over, and released after
    assert (run / "report.md").exists() and (run / "analysis" / "analysis.md").exists()


def test_stale_temporary_files_of_a_text_run_are_removed_by_the_next_run(tmp_path):
    config, run = write_config(tmp_path, "text_ar"), tmp_path / "run"
    partition_text_run(config, run, log=QUIET)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run / "experts" / f".expert_00.{dead.pid}-{HOST}.a1b2c3d4.tmp"
    live = run / "experts" / f".expert_01.{os.getpid()}-{HOST}.q1w2e3r4.tmp"
    for p in (stale, live):
        (p / "sub").mkdir(parents=True)
    partition_text_run(config, run, log=QUIET)
    assert not stale.exists() and live.exists()


def test_text_training_leaves_the_callers_thread_count(tmp_path):
    """Every text job runs on the config's threads and gives the caller's count back after."""
    import torch

    config, run = write_config(tmp_path, "text_ar"), tmp_path / "run"
    partition_text_run(config, run, log=QUIET)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        train_text_experts(run, QUIET)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
