"""Text runs get what vector and image runs have (docs/reliability.md): every check before the
first write, so a bad config leaves the folder as it was; one writer per run folder (RUN/.lock on
every stage that writes, a dead holder's lock taken over); stale temporary files removed."""
import json
import os
import re
import subprocess
import sys

import pytest

from ddmkit.registry import verify_registry

from ddmkit.errors import DDMError
from ddmkit.data.partition import read_shard
from ddmkit.io import HOST, save_tensors
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


BAD = [  # (replace, by, message): each found before anything is written
    ("k = 2", "k = 50", r"partition\.k = 50 is larger than the number of training documents"),
    ("width = 16", "width = 16\nheads = 3", r"router: width \(16\) must be divisible by heads \(3\); give "
     r"router\.width = 18 \(--set router\.width=18\)"),
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
    code, err = cli("run", bad_config(tmp_path, *BAD[0][:2]), "--out", run, "--force")
    assert code == 2 and "larger than the number of training documents" in err
    assert files(run) == before


def test_force_never_removes_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    """`ddmkit run TEXT_CONFIG --out FOLDER --force` removed every file of a folder that was not a run (the
    corpus itself, given as --out, too)."""
    config = write_config(tmp_path, "text_ar")
    corpus = next(p.parent for p in tmp_path.rglob("*.txt"))
    before = files(corpus)
    for command in (["run", config], ["text", "run", config], ["partition", "--config", config]):
        code, err = cli(*command, "--out", corpus, "--force")
        assert code == 2 and f"{corpus} is not a ddmkit run folder and is not empty" in err, err
    with pytest.raises(DDMError, match="--force replaces only a run it wrote, never other files"):
        run_text(config, corpus, force=True, log=QUIET)
    assert files(corpus) == before


def test_a_stopped_text_expert_job_says_it_starts_again_and_resume_says_so(tmp_path, monkeypatch, capsys):
    """Ctrl-C said "its last checkpoint is kept; run the same command with --resume", and --resume (which every
    SLURM task passes) silently trained from the start: text experts write no checkpoints."""
    import ddmkit.pipeline.text as text

    config = write_config(tmp_path, "text_ar")
    run = tmp_path / "run"
    partition_text_run(config, run, log=QUIET)
    shard = RunFolder(run).partition / "shards" / "cluster_00.safetensors"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text, "train_text_expert", stopped)
    code, err = cli("train-expert", shard, "--config", RunFolder(run).config, "--out",
                    RunFolder(run).expert(0), "--resume")
    said = " ".join(err.split())
    assert code == 130 and "note: text experts write no checkpoints, so --resume has nothing to continue" in said
    assert "interrupted: nothing was written (text experts write no checkpoints); run the same command" in said, said
    assert "checkpoint is kept" not in said and not RunFolder(run).expert(0).exists()


def test_nproc_for_a_text_expert_names_the_text_configs_threads(tmp_path):
    """--nproc 2 with a text config said "(on cfg.threads threads)", a name of the code, and no way out."""
    code, err = cli("train-expert", tmp_path / "cluster_00.safetensors", "--config", write_config(tmp_path, "text_ar"),
                    "--out", tmp_path / "e", "--nproc", 2)
    said = " ".join(err.split())
    assert code == 2 and said == ("error: --nproc 2: text experts train in one process, on the text config's "
                                  "`threads` CPU threads; leave --nproc out (and raise `threads` in the text config "
                                  "for more)"), said
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("command", ["sample", "analyze"])
def test_a_text_run_of_its_partition_alone_is_refused_without_a_note_first(tmp_path, command):
    """`ddmkit sample RUN` on a text run that holds only its partition (K = 2, top-2 asked) printed 'note: top-2 on a
    DDM of K = 2 experts calls every expert ...', then refused ('expert_00 is missing'). Now the refusal alone."""
    run = tmp_path / "run"
    partition_text_run(write_config(tmp_path, "text_ar"), run, log=QUIET)
    code, err = cli(command, run, "--strategy", "top-2")
    assert code == 2 and f"{RunFolder(run).expert(0)} is missing; train it with" in " ".join(err.split()), err
    assert "note:" not in err, err


def test_a_text_expert_trained_already_is_not_said_to_be_written(tmp_path, monkeypatch, capsys):
    """train-expert on an expert folder of the same settings and shard reused the model and said 'expert written
    to' anyway."""
    config = write_config(tmp_path, "text_ar")
    run = tmp_path / "run"
    partition_text_run(config, run, log=QUIET)
    shard, out = RunFolder(run).partition / "shards" / "cluster_00.safetensors", tmp_path / "e"
    code, err = cli("train-expert", shard, "--config", RunFolder(run).config, "--out", out)
    assert code in (0, None) and f"expert written to {out}" in err, err
    code, err = cli("train-expert", shard, "--config", RunFolder(run).config, "--out", out)
    said = " ".join(err.split())
    assert code in (0, None) and "this expert is trained already" in said and "written" not in said, said


def test_evaluate_refuses_a_test_shard_changed_since_partitioning(text_runs, tmp_path):
    """evaluate scored the run on an edited held-out shard; verify refused it."""
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(text_runs["text_ar"], run)
    test = RunFolder(run).partition / json.loads(RunFolder(run).manifest.read_text())["test_shards"][0]["path"]
    stream, _, meta = read_shard(test)
    save_tensors(test, {"x": stream.flip(0)}, metadata=meta)
    with pytest.raises(DDMError, match=r"test/cluster_00.safetensors: SHA-256 differs from the one .*manifest.json "
                                       r"records"):
        evaluate_text(run, log=QUIET)


def test_a_text_runs_slurm_script_trains_its_experts_on_the_cpu(tmp_path, monkeypatch, capsys):
    """`ddmkit launch RUN --emit slurm`, which text runs' messages offer, failed: it read the text config as a
    vector run's. Its tasks hold no GPU, and one task run as SLURM would run it writes its expert."""
    config = write_config(tmp_path, "text_ar")
    run = tmp_path / "run"
    partition_text_run(config, run, log=QUIET)
    code, err = cli("launch", run, "--emit", "slurm", "--gpus", "1")
    assert code == 2 and "--gpus 1: " in err and "is a text run, whose experts train on the CPU" in err, err
    code, err = cli("launch", run, "--emit", "slurm")
    script = run / "launch" / "train_experts.slurm"
    assert code == 0 and script.exists(), err
    assert "--gres" not in script.read_text() and "--array=0-1" in script.read_text()
    done = subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "1", "DDMKIT_QUIET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (RunFolder(run).expert(1) / "model.safetensors").exists() and not RunFolder(run).expert(0).exists()


def test_set_reaches_a_text_config_and_a_bad_one_writes_nothing(tmp_path, monkeypatch, capsys):
    """`ddmkit partition --config TEXT --set` (as `ddmkit run TEXT --set`) applies each field to the text
    config; an unknown field or a value that fails the checks exits 2 before the folder is made."""
    config = write_config(tmp_path, "text_ar")
    code, err = cli("partition", "--config", config, "--out", tmp_path / "bad",
                    "--set", "partition.kk=2")
    assert code == 2 and "partition.kk: unknown field" in err and not (tmp_path / "bad").exists()
    code, err = cli("run", config, "--out", tmp_path / "bad", "--set", "partition.k=50")
    assert code == 2 and "partition.k = 50 is larger" in err and not (tmp_path / "bad").exists()
    code, err = cli("partition", "--config", config, "--out", tmp_path / "run",
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
        code, err = cli(*WRITERS[writer](run, config))
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


# ----- a user's error is found when the config loads or the run is checked, before any training -----
CONFIG_ERRORS = [  # (--set items, words of the message)
    (["sample.prompt='" + "x" * 24 + "'"], "prompt is 24 bytes, which leaves no room in model.seq_len = 24"),
    (["sample.prompt='0123456789012'", "sample.length=30"], "set sample.length at most 11"),
    (["partition.seed=-3"], "partition.seed: Input should be greater than or equal to 0"),
    (["sample.seed=9223372036854775808"], "sample.seed: Input should be less than or equal to 9223372036854775807"),
    (["corpus.seed=-1"], "corpus.seed: Input should be greater than or equal to 0"),
    (["corpus.pattern='/tmp/x/*.txt'"], "corpus.pattern: '/tmp/x/*.txt' is not a glob below corpus.source"),
    (["corpus.pattern=''"], "corpus.pattern: '' is not a glob"),
    (["corpus.source=''"], "corpus.source: empty"),
    (["router.kinds=[]"], "router.kinds: empty"),
    (["router.kinds=['learned', 'learned']"], 'router.kinds: ["learned", "learned"] names \'learned\' more than once: '
     'each kind is one router; give each once, e.g. kinds = ["learned"] under [router] (on the command line: --set '
     '\'router.kinds=["learned"]\')'),  # it trained one router without a word
    (["router.kinds=['bayes', 'learned', 'bayes']"], 'e.g. kinds = ["bayes", "learned"] under [router] (on the '
     'command line: --set \'router.kinds=["bayes", "learned"]\'); kind = \'text_dfm\' takes ["learned"] alone'),
    (["evaluate.strategies=[]"], 'evaluate.strategies: empty: the report scores the decentralized model with each of '
     'these routing strategies; give at least one, e.g. strategies = ["full", "top-1"] under [evaluate] (on the '
     'command line: --set \'evaluate.strategies=["full", "top-1"]\')'),  # the report had no routed rows
    (["corpus.min_doc_bytes=300", "corpus.max_doc_bytes=200"], "min_doc_bytes (300) is above max_doc_bytes (200)"),
    (["evaluate.strategies=['top-1', 'gated-2@30']"], "evaluate.strategies: strategy 'gated-2@30' needs continuous-data "
     "state (it compares the experts' velocities), which a text run does not have; accepted for text runs: full, "
     "top-K, threshold-P, sample-K[@T], nucleus-P[@T], switch, adaptive-P, adaptive-ent-H"),
    (["evaluate.strategies=['top-9x']"], "evaluate.strategies: unknown routing strategy 'top-9x'; accepted for text "
     "runs: full, top-K,"),
    (["expert.train.device='cuda:3'"], "expert.train.device: 'cuda:3': text runs train on the CPU; set it to \"cpu\""),
    (["router.train.device='mps'"], "router.train.device: 'mps': text runs train on the CPU"),
    (["expert.train.checkpoint_every=10"], "expert.train.checkpoint_every: 10: text models train "
     "without checkpoints"),  # it was accepted and did nothing
    (["expert.train.cuda_graph=true"], "expert.train.cuda_graph: true: a text model does not support it (text "
     "models train on the CPU, where no step is captured;"),  # accepted and did nothing too
    (["router.train.cuda_graph=true"], "router.train.cuda_graph: true: a text model does not support it"),
    # one n-gram (a traceback from scikit-learn) or one SVD dimension (every document the same unit vector)
    (["partition.max_features=1"], "partition.max_features: Input should be greater than or equal to 2"),
    (["partition.svd_dim=1"], "partition.svd_dim: Input should be greater than or equal to 2"),
]


@pytest.mark.parametrize("items, message", CONFIG_ERRORS, ids=[c[0][0].split("=")[0] + str(i)
                                                               for i, c in enumerate(CONFIG_ERRORS)])
def test_a_bad_text_setting_is_refused_when_the_config_loads(tmp_path, monkeypatch, capsys, items, message):
    config = write_config(tmp_path, "text_ar")
    args = [arg for item in items for arg in ("--set", item)]
    code, err = cli("run", config, "--out", tmp_path / "run", *args)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("items, message", [
    (["sample.length=16"], "length (16) must equal model.seq_len (24) for kind = 'text_dfm'"),
    (["sample.prompt='ab'"], "prompt: kind = 'text_dfm' samples whole windows and takes no prompt"),
])
def test_a_flow_matching_config_refuses_a_prompt_and_a_shorter_length(tmp_path, items, message):
    from ddmkit.discrete.config import load_text_config

    with pytest.raises(DDMError, match=re.escape(message)):
        load_text_config(write_config(tmp_path, "text_dfm", '["learned"]'), items)


@pytest.mark.parametrize("command", [["run"], ["text", "run"]])
def test_a_seed_out_of_range_is_one_clear_line(tmp_path, monkeypatch, capsys, command):
    config = write_config(tmp_path, "text_ar")
    for seed in ("-1", str(2**63)):
        code, err = cli(*command, config, "--out", tmp_path / "run", "--seed", seed)
        assert code == 2 and f"--seed {seed}: seeds are 0 .. 2**63 - 1" in err, err
    code, err = cli(*command, config, "--out", tmp_path / "run", "--device", "cuda")
    assert code == 2 and "--device cuda: text runs train and sample on the CPU" in err, err  # text run: no such option
    assert not (tmp_path / "run").exists()


def test_a_large_partition_seed_is_taken_modulo_2_to_the_32(tmp_path):
    """scikit-learn takes seeds below 2**32: partition.seed = 2**32 + 5 makes the partition of seed 5."""
    config = write_config(tmp_path, "text_ar")
    shards = {}
    for seed in (5, 2**32 + 5):
        manifest = partition_text_run(config, tmp_path / str(seed), log=QUIET, overrides=[f"partition.seed={seed}"])
        shards[seed] = [s["sha256"] for s in manifest["shards"]]
    assert shards[5] == shards[2**32 + 5]


def test_no_held_out_window_is_refused_before_training(tmp_path):
    """Long windows and few held-out documents: every cluster trains, but none could be evaluated."""
    config = write_config(tmp_path, "text_ar")
    with pytest.raises(DDMError, match=r"corpus.test_fraction = 0.05: no cluster holds a held-out window"):
        partition_text_run(config, tmp_path / "run", log=QUIET,
                           overrides=["corpus.test_fraction=0.05", "model.seq_len=1000"])
    assert not (tmp_path / "run").exists()


def test_binary_files_are_skipped_and_other_encodings_named(tmp_path):
    from ddmkit.discrete.config import CorpusConfig
    from ddmkit.discrete.corpus import all_documents

    for i in range(2):
        (tmp_path / f"ok{i}.txt").write_text("plain text " * 10)
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("café crème ".encode("latin-1") * 10)
    lines = []
    docs = all_documents(CorpusConfig(source=str(tmp_path), pattern="*.txt", min_doc_bytes=16), lines.append)
    assert sorted(d.name for d in docs) == ["latin1.txt", "ok0.txt", "ok1.txt"]
    assert lines == ["corpus: skipped 1 binary file (holding a NUL byte): bin.txt",
                     "corpus: 1 file is not UTF-8 (another encoding?), used as bytes: latin1.txt"]  # not '1 files are'
    (tmp_path / "bin2.txt").write_bytes(bytes(range(256)))
    (tmp_path / "latin2.txt").write_bytes("déjà vu ".encode("latin-1") * 10)
    lines.clear()
    all_documents(CorpusConfig(source=str(tmp_path), pattern="*.txt", min_doc_bytes=16), lines.append)
    assert lines == ["corpus: skipped 2 binary files (holding a NUL byte): bin.txt, bin2.txt",
                     "corpus: 2 files are not UTF-8 (another encoding?), used as bytes: latin1.txt, latin2.txt"]


def test_corpus_hints_name_the_setting_that_helps(tmp_path):
    from ddmkit.discrete.config import CorpusConfig
    from ddmkit.discrete.corpus import all_documents

    (tmp_path / "single").mkdir()
    one = tmp_path / "single" / "one.txt"
    one.write_text(("a paragraph of text " * 5 + "\n\n") * 4)
    with pytest.raises(DDMError, match='only 1 document of .* use unit = "block"'):
        all_documents(CorpusConfig(source=str(one), min_doc_bytes=16))
    assert len(all_documents(CorpusConfig(source=str(one), unit="block", min_doc_bytes=16))) == 4
    config = write_config(tmp_path, "text_ar")  # 40 documents
    with pytest.raises(DDMError, match=r"raise corpus.max_docs \(it keeps 2 of the 40 documents found\)"):
        partition_text_run(config, tmp_path / "a", log=QUIET, overrides=["corpus.max_docs=2"])
    with pytest.raises(DDMError, match=r"larger than the number of training documents \(32: corpus.test_fraction = "
                                       r"0.2 holds out 8 of the 40\); lower partition.k or corpus.test_fraction, "
                                       r"or use more text"):
        partition_text_run(config, tmp_path / "b", log=QUIET, overrides=["partition.k=33"])
    with pytest.raises(DDMError, match=r"larger than the number of training documents \(32\); lower partition.k "
                                       r"or use more text"):  # 40 documents: held-out ones leave 39 at most
        partition_text_run(config, tmp_path / "c", log=QUIET, overrides=["partition.k=40"])
    # most documents held out: the fix is to hold out fewer, which the message names
    with pytest.raises(DDMError, match=r"documents \(0: corpus.test_fraction = 0.99 holds out 40 of the 40\); "
                                       r"lower partition.k or corpus.test_fraction,"):
        partition_text_run(config, tmp_path / "d", log=QUIET, overrides=["corpus.test_fraction=0.99"])


def test_relative_source_is_read_from_the_current_folder(tmp_path, monkeypatch):
    from ddmkit.discrete.corpus import resolve_source

    (tmp_path / "corp").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_source("corp") == tmp_path / "corp"
    with pytest.raises(DDMError, match=rf"'nope' \({tmp_path / 'nope'}\) does not exist"):
        resolve_source("nope")


def test_streams_count_documents_and_separators_and_an_empty_cluster_is_empty():
    from ddmkit.discrete.corpus import Document
    from ddmkit.discrete.shards import stream

    assert len(stream([])) == 0
    assert bytes(stream([Document("a", b"abc"), Document("b", b"de")]).tolist()) == b"abc\n\nde\n\n"


def test_report_samples_show_control_characters_as_escapes():
    from ddmkit.discrete.report import visible

    assert visible("a\x1b[31mb\x1a\x7f\n\tc") == "a\\x1b[31mb\\x1a\\x7f\n\tc"


def test_a_misspelt_kind_or_a_text_config_for_a_vector_command_is_one_line(tmp_path, monkeypatch, capsys):
    from ddmkit.pipeline.text import refuse_text

    config = write_config(tmp_path, "text_ar")
    typo = tmp_path / "typo.toml"
    typo.write_text(config.read_text().replace('kind = "text_ar"', 'kind = "text_ra"'))
    code, err = cli("run", typo, "--out", tmp_path / "run")
    assert code == 2 and err.strip() == f"error: {typo}: kind: 'text_ra' unknown; accepted: text_ar, text_dfm"
    with pytest.raises(DDMError, match=r"is a text config; `ddmkit sweep` works on vector and image runs"):
        refuse_text(config, "sweep")
    partition_text_run(config, tmp_path / "run", log=QUIET)
    with pytest.raises(DDMError, match=r"is a text run; `ddmkit add-expert` works on vector and image runs"):
        refuse_text(tmp_path / "run", "add-expert")
    for args, command in ((["sweep", config, "--k", 2, "--budget", 1], "sweep"),
                          (["study", "misalignment", config], "study misalignment"),
                          (["add-expert", tmp_path / "run", "--data", "ring8"], "add-expert"),
                          (["replace-expert", tmp_path / "run", 0, tmp_path], "replace-expert")):
        code, err = cli(*args)  # the vector commands say so in one line
        assert code == 2 and f"`ddmkit {command}` works on vector and image runs" in err and \
            len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [
    (["--length", "0"], "--length 0: give a whole number, from 1 to 20 (e.g. --length 6)"),
    (["--length", "-2"], "--length -2: give a whole number, from 1 to 20"),
    (["--length", "99999999999999999999"], "--length 99999999999999999999: give a whole number, from 1 to 20"),  # it
    # computed vocab**length first, for hours (a vocab of 2 or more makes over 2e6 sequences at length 21)
    (["--k", "0"], "--k 0: give a whole number, from 1 to 256 (e.g. --k 3)"),
    (["--vocab", "1"], "--vocab 1: give a whole number, at least 2 (e.g. --vocab 4)"),
    (["--seed", "-1"], "--seed -1: give a whole number, from 0 to"),
    (["--out", "."], "--out . is a folder; give the path of a JSON file"),
    (["--out", f"{__file__}/x.json"], "test_text_hardening.py is a file, not a folder"),
    (["--k", "1000000000000"], "--k 1000000000000: give a whole number, from 1 to 256"),  # a memory error before
    (["--k", "256", "--vocab", "4", "--length", "10"], "keep k * vocab**length <= 2e7"),
])
def test_exactness_options_are_checked_first(monkeypatch, capsys, args, message):
    code, err = cli("text", "exactness", *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert "router eps" not in capsys.readouterr().out  # refused before the table is computed


def test_text_run_takes_set(tmp_path, monkeypatch, capsys):
    code, err = cli("text", "run", write_config(tmp_path, "text_ar"), "--out", tmp_path / "run",
                    "--set", "partition.k=50")
    assert code == 2 and "partition.k = 50 is larger" in err and not (tmp_path / "run").exists()


def test_a_bayes_only_router_trains_nothing_and_says_so(tmp_path):
    run = tmp_path / "run"
    partition_text_run(write_config(tmp_path, "text_ar"), run, log=QUIET, overrides=['router.kinds=["bayes"]'])
    lines = []
    train_text_router(run, lines.append)
    assert not RunFolder(run).router.exists() and "nothing written" in lines[0]


def test_text_train_expert_never_deletes_a_folder_that_is_not_an_expert(tmp_path, monkeypatch):
    """A text expert replaced its --out folder whole, with the user's files in it (a vector expert refused such a
    folder); `--out .` (or an empty --out) in an empty folder was a ValueError's traceback. An empty --out is
    refused as such (not read as '.')."""
    config, run = write_config(tmp_path, "text_ar"), tmp_path / "run"
    partition_text_run(config, run, log=QUIET)
    shard = run / "partition" / "shards" / "cluster_00.safetensors"
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("important")
    code, err = cli("train-expert", shard, "--config", config, "--out", mine)
    assert code == 2 and f"--out {mine} holds files that are not an expert (sub, thesis.txt)" in err, err
    assert (mine / "thesis.txt").read_text() == "important" and (mine / "sub").is_dir()
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    code, err = cli("train-expert", shard, "--config", config, "--out", ".")
    assert code == 2 and "--out . is the current, a parent or the root folder" in err, err
    code, err = cli("train-expert", shard, "--config", config, "--out", "")
    assert code == 2 and "--out is empty: give the expert folder to write" in err, err
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("field", ["threads", "model.seq_len", "model.depth", "router.depth", "partition.k",
                                   "router.width", "evaluate.windows_per_cluster"])
def test_a_huge_count_in_a_text_config_is_refused_naming_the_field(tmp_path, field):
    """The text config's counts had no upper bound: threads = 10**20 was an OverflowError's traceback, a seq_len,
    k or width a torch TypeError quoted by name, a depth built layer by layer for ever."""
    code, err = cli("text", "run", write_config(tmp_path, "text_ar"), "--out", tmp_path / "run",
                    "--set", f"{field}=99999999999999999999")
    said = " ".join(err.split())
    assert code == 2 and f"{field}: Input should be less than or equal to" in said, said
    assert not re.search(r"\w+Error\b", said) and not (tmp_path / "run").exists()


# ----- a trained tiny run: sample, analyze, evaluate and its files -----
@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """Trained tiny runs: {"text_ar": run, "text_dfm": run}."""
    runs = {}
    for kind, kinds in (("text_ar", '["bayes", "learned"]'), ("text_dfm", '["learned"]')):
        folder = tmp_path_factory.mktemp(kind)
        runs[kind] = folder / "run"
        run_text(write_config(folder, kind, kinds), runs[kind], log=QUIET)
    return runs


def test_text_models_record_no_gaussian_time_convention(text_runs):
    for kind, run in text_runs.items():
        folder = RunFolder(run)
        for model in (folder.expert(0), folder.expert(1), folder.monolith, folder.router):
            config = json.loads((model / "config.json").read_text())
            assert "time_convention" not in config
            assert ("discrete_time" in config) == (kind == "text_dfm")
        assert "time_convention" not in json.loads(folder.manifest.read_text())
        if folder.registry.exists():
            assert json.loads(folder.registry.read_text())["time_convention"] is None
            verify_registry(run)


def test_a_huge_sample_n_of_a_text_run_is_refused_not_a_traceback(text_runs):
    """`ddmkit sample TEXT_RUN --n 10**20` was a TypeError's traceback from torch.full."""
    code, err = cli("sample", text_runs["text_ar"], "--n", "99999999999999999999")
    assert code == 2 and "--n = 99999999999999999999: must be at most 1,000,000,000" in err, err  # as analyze says it


def test_a_text_sample_n_whose_byte_probabilities_outgrow_the_memory_is_refused(text_runs, tmp_path, monkeypatch):
    """A text run samples its n sequences in one batch: every step holds n x positions x 256 byte probabilities
    (8 bytes each, at least), which a large sample.n (or --n) took past the memory, and the kernel killed the
    command without a word. Refused before anything is written, naming a count that fits."""
    import ddmkit.pipeline.checks as checks
    from ddmkit.discrete.config import load_text_config
    from ddmkit.pipeline.text import sample_positions

    per_row = 8 * 256 * 24  # model.seq_len = 24 positions
    monkeypatch.setattr(checks, "available_memory", lambda device: 1000 * per_row)
    config = write_config(tmp_path, "text_dfm", '["learned"]')
    code, err = cli("text", "run", config, "--out", tmp_path / "run", "--set", "sample.n=1001")
    said = " ".join(err.split())
    assert code == 2 and "sample.n = 1001: one sampling step's byte probabilities alone would take" in said, said
    assert "set sample.n = 500 or less (--set sample.n=500)" in said and not (tmp_path / "run").exists(), said
    ar = text_runs["text_ar"]
    before = files(ar)
    code, err = cli("sample", ar, "--strategy", "top-1", "--n", "1001")
    said = " ".join(err.split())
    assert code == 2 and "--n = 1001: one sampling step's byte probabilities" in said, said
    assert "(1001 x 24 positions x 256 byte values, 8 bytes each)" in said and "give --n 500 or less" in said, said
    assert files(ar) == before
    assert cli("sample", ar, "--strategy", "top-1", "--n", "500")[0] in (0, None)
    prompted = load_text_config(write_config(tmp_path, "text_ar"), ['sample.prompt="dé"', "sample.length=5"])
    assert sample_positions(prompted) == 3 + 5  # the prompt's UTF-8 bytes and the drawn ones


def test_a_text_report_whose_sample_n_outgrows_the_memory_is_refused(text_runs, tmp_path, monkeypatch):
    """`ddmkit evaluate TEXT_RUN` draws the report's sample.n samples in one batch, as `ddmkit sample` does, and was
    not checked: the kernel killed it without a word. Refused before anything is written, with a fix it takes
    (evaluate takes no --set: `ddmkit run` of the run's config.json, which keeps the trained networks)."""
    import shutil

    import ddmkit.pipeline.checks as checks

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    stored = json.loads((run / "config.json").read_text())
    stored["config"]["sample"]["n"] = 1001
    (run / "config.json").write_text(json.dumps(stored))
    monkeypatch.setattr(checks, "available_memory", lambda device: 1000 * 8 * 256 * 24)  # 24 positions
    before = files(run)
    code, err = cli("evaluate", run)
    said = " ".join(err.split())
    assert code == 2 and "sample.n = 1001: one sampling step's byte probabilities alone would take" in said, said
    fix = f"ddmkit run {run / 'config.json'} --out {run} --set sample.n=500"
    assert f"rerun `{fix}`, which keeps the trained networks" in said, said
    assert files(run) == before
    experts = {path: data for path, data in before.items() if path.parts[0] == "experts"}
    assert experts
    assert cli(*fix.split()[1:])[0] in (0, None)
    assert json.loads((run / "report.json").read_text())["config"]["sample"]["n"] == 500
    assert {path: data for path, data in files(run).items() if path.parts[0] == "experts"} == experts


def test_sampled_bytes_that_are_not_utf8_are_kept_byte_identical(text_runs, tmp_path, monkeypatch):
    """text.json shows bytes that are not valid UTF-8 as U+FFFD: the drawn bytes were lost. text_bytes.json
    keeps each sample's bytes (base64) as the model drew them."""
    import base64
    import shutil

    import torch

    import ddmkit.discrete.evaluate as evaluate

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    stored = json.loads((run / "config.json").read_text())
    stored["config"]["sample"]["prompt"] = "dé "  # sampled rows start with its bytes
    (run / "config.json").write_text(json.dumps(stored))
    drawn = [b"ok \xff\xfe", b"\xc3( \xe2\x82", "naïve".encode()]  # invalid byte, bad continuation, cut off
    rows = torch.tensor([list(row.ljust(7, b" ")) for row in drawn])
    monkeypatch.setattr(evaluate, "sample_ar", lambda *args: (rows, None))
    texts = sample_text(run, ["top-1"], n=3, log=QUIET)
    prompt = "dé ".encode()
    kept = json.loads((run / "samples" / "text_bytes.json").read_text())
    assert set(kept) == set(texts) and len(texts) >= 2
    for name, rows_of_set in kept.items():
        got = [base64.b64decode(row) for row in rows_of_set]
        assert got == [prompt + row.ljust(7, b" ") for row in drawn]
        assert texts[name] == [row.decode("utf-8", errors="replace") for row in got]
    assert "\ufffd" in texts[name][0] and texts[name][2].endswith("naïve ")


def test_sample_honours_steps_for_flow_matching_and_refuses_vector_options(text_runs, monkeypatch, capsys):
    dfm, ar = text_runs["text_dfm"], text_runs["text_ar"]
    both = ["top-1", "monolith"]
    one = sample_text(dfm, both, log=QUIET, steps=1)
    assert sample_text(dfm, both, log=QUIET, steps=1) == one != sample_text(dfm, both, log=QUIET, steps=4)
    info = json.loads((RunFolder(dfm).samples / "info.json").read_text())  # text.json said not how it was drawn
    assert len(one) >= 2 and all(info[name]["drawn_with"]["steps"] == 4 for name in one), info
    drawn = sample_text(ar, ["top-1"], log=QUIET, n=2, seed=7)
    assert "centralized" not in drawn  # drawn whatever was asked
    assert list(sample_text(ar, ["monolith"], log=QUIET, n=2, seed=7)) == ["centralized"]
    info = json.loads((RunFolder(ar).samples / "info.json").read_text())
    for name in drawn:
        assert {key: info[name]["drawn_with"][key] for key in ("n", "seed")} == {"n": 2, "seed": 7}
        assert "steps" not in info[name]["drawn_with"]  # one byte per step: no steps setting
    code, err = cli("sample", dfm, "--strategy", "top-1", "--solver", "rk4", "--guidance", "3",
                    "--batch-size", "1")
    assert code == 2 and "--solver, --guidance, --batch-size: not used by a text run" in err, err
    code, err = cli("sample", dfm, "--strategy", "top-1", "--no-cuda-streams")
    assert code == 2 and "--cuda-streams: not used by a text run" in err, err
    code, err = cli("sample", dfm, "--strategy", "top-1", "--device", "cuda")
    assert code == 2 and "error: --device cuda: text runs train and sample on the CPU" in " ".join(err.split()), err
    for command in ("evaluate", "analyze"):  # --device cpu asks for what a text run does: it was refused, naming --set
        code, err = cli(command, ar, "--device", "cpu", *(["--n", "2"] if command == "analyze" else []))
        assert code == 0, err
    code, err = cli("sample", ar, "--strategy", "top-1", "--router", "statistics")  # said "its learned router only"
    assert code == 2 and "--router statistics: a text run samples with each router of its config's router.kinds " \
        "(sets named 'bayes / ...', 'learned / ...')" in " ".join(err.split()), err
    code, err = cli("sample", ar, "--strategy", "top-1", "--steps", "3")
    assert code == 2 and "--steps: autoregressive sampling draws one byte per step" in err, err


def test_analyze_honours_strategy_n_and_seed(text_runs, monkeypatch, capsys):
    run = text_runs["text_ar"]
    lines = []
    result = analyze_text(run, run / "a1", lines.append, strategies=["top-1", "top-2"], n=1, seed=9)
    assert set(result["own_cluster_weight"]) == {"bayes / top-1", "bayes / top-2", "learned / top-1",
                                                 "learned / top-2"}
    assert lines[0] == "note: top-2 on a DDM of K = 2 experts calls every expert: the same routing as full"
    assert analyze_text(run, run / "a2", QUIET, ["top-1", "top-2"], n=2)["bits_per_byte"] != result["bits_per_byte"]
    code, err = cli("analyze", run, "--out", run / "a3", "--max-steps", "3")
    assert code == 2 and "--max-steps: not used by a text run" in err, err
    code, err = cli("analyze", run, "--out", run / "a3", "--n", "0")  # named only the field, then on two lines
    assert code == 2 and err.strip() == "error: --n (evaluate.windows_per_cluster): Input should be greater than " \
        "or equal to 1: give --n 48", err  # a value that works, as the option given (not as --set)
    code, err = cli("analyze", run, "--out", run / "a3", "--seed", "-1")
    assert code == 2 and err.strip() == "error: --seed (seed): Input should be greater than or equal to 0: give " \
        "--seed 0", err


def test_analyze_of_the_monolith_says_evaluate_scores_it(text_runs):
    """It said "unknown routing strategy 'monolith'", as if it were misspelt."""
    run = text_runs["text_ar"]
    code, err = cli("analyze", run, "--out", run / "a4", "--strategy", "monolith")
    assert code == 2 and err.strip() == "error: --strategy monolith: analyze scores routing strategies only (the " \
        "centralized model is scored by `ddmkit evaluate`); give one or more of: full, top-K, threshold-P, " \
        "sample-K[@T], nucleus-P[@T], switch, adaptive-P, adaptive-ent-H", err
    assert not (run / "a4").exists()


def test_a_test_shard_is_refused_and_a_leaked_expert_is_not_evaluated(text_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    folder = RunFolder(run)
    from ddmkit.pipeline.text import read_text_config, train_text_expert

    with pytest.raises(DDMError, match=r"is held-out text \(a test shard\)"):
        train_text_expert(folder.partition / "test" / "cluster_01.safetensors", read_text_config(folder.config),
                          tmp_path / "leak")
    assert not (tmp_path / "leak").exists()
    expert = folder.expert(1) / "config.json"
    leaked = json.loads(expert.read_text())
    leaked["shard_sha256"] = json.loads(folder.manifest.read_text())["test_shards"][1]["sha256"]
    expert.write_text(json.dumps(leaked))
    with pytest.raises(DDMError, match=r"expert_01 was trained on shard .*, not on cluster 1's training shard"):
        evaluate_text(run, log=QUIET)


def test_verify_checks_the_held_out_text(text_runs, tmp_path):
    """A changed or lost partition/test/ shard of a text run passed `ddmkit verify`, which evaluate then refused."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    held_out = RunFolder(run).partition / "test" / "cluster_01.safetensors"
    kept = held_out.read_bytes()
    held_out.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))
    code, err = cli("verify", run)
    assert code == 2 and f"{held_out}: SHA-256 differs from the one" in err and "remove" in err, err
    held_out.unlink()
    code, err = cli("verify", run)
    assert code == 2 and f"{held_out} is missing (the held-out text of cluster 1)" in " ".join(err.split()), err
    held_out.write_bytes(kept)
    assert cli("verify", run)[0] == 0


def test_a_text_shard_without_its_text_config_is_refused(text_runs, monkeypatch, capsys, tmp_path):
    """train-expert on a text shard without --config trained the default vector MLP on its bytes, as
    scalars (exit 0, final loss in the thousands)."""
    shard = RunFolder(text_runs["text_ar"]).partition / "shards" / "cluster_00.safetensors"
    code, err = cli("train-expert", shard, "--out", tmp_path / "e")
    assert code == 2 and "is a text shard (a stream of bytes)" in err and "--config RUN/config.json" in err, err
    assert not (tmp_path / "e").exists()


def test_a_vector_runs_shard_with_a_text_config_is_refused(text_runs, tmp_path):
    """train-expert on a vector run's shard with a text run's config.json ended in a traceback (a RuntimeError of
    the transformer's shapes), after starting to train."""
    from pathlib import Path

    code, err = cli("partition", "--config", Path(__file__).parent / "configs" / "tiny.toml", "--out", tmp_path / "v")
    assert code == 0, err
    shard = tmp_path / "v" / "partition" / "shards" / "cluster_00.safetensors"
    code, err = cli("train-expert", shard, "--config", RunFolder(text_runs["text_ar"]).config, "--out", tmp_path / "e")
    assert code == 2 and "is not a text shard" in err and "--config RUN/config.json" in err, err
    assert not (tmp_path / "e").exists()
    code, err = cli("train-expert", shard, "--config", tmp_path / "v" / "config.json", "--out", tmp_path / "e")
    assert code == 0, err  # the fix it names works


def test_the_partition_of_a_text_run_is_made_again_by_the_fix_its_errors_name(text_runs, tmp_path):
    """A text run's shard changed (or its manifest lost) since partitioning: the error said to remove the partition
    and run `ddmkit partition --config RUN/config.json --out RUN`, which read the text run's config.json as a
    vector config ("kind: unknown field", exit 2)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    folder = RunFolder(run)
    shard = folder.partition / "shards" / "cluster_01.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    code, err = cli("verify", run)
    fix = f"remove {folder.partition} and run `ddmkit partition --config {folder.config} --out {run}`"
    assert code == 2 and "cluster_01.safetensors" in err and fix in " ".join(err.split()), err
    shutil.rmtree(folder.partition)
    code, err = cli("partition", "--config", folder.config, "--out", run)
    assert code == 0, err
    assert shard.read_bytes() == whole
    code, err = cli("verify", run)
    assert code == 0, err
    (folder.partition / "manifest.json").unlink()  # a copy cut short: the same fix is named, and works
    code, err = cli("register", run)
    assert code == 2 and "manifest.json is missing" in err and fix in " ".join(err.split()), err
    shutil.rmtree(folder.partition)
    assert cli("partition", "--config", folder.config, "--out", run)[0] == 0 and cli("verify", run)[0] == 0


def test_a_text_expert_goes_to_its_own_cluster_s_folder(text_runs, tmp_path):
    """train-expert cluster_01's shard --out RUN/experts/expert_00 replaced expert 0 with cluster 1's expert;
    evaluate then called it 'missing or trained with other settings'."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    folder = RunFolder(run)
    from ddmkit.pipeline.text import read_text_config, train_text_expert

    before = (folder.expert(0) / "model.safetensors").read_bytes()
    with pytest.raises(DDMError, match=r"expert_00 is the folder of expert 0, but .*cluster_01.safetensors is cluster "
                                       r"1's shard; give --out .*expert_01, or the shard cluster_00.safetensors"):
        train_text_expert(folder.partition / "shards" / "cluster_01.safetensors", read_text_config(folder.config),
                          folder.expert(0))
    assert (folder.expert(0) / "model.safetensors").read_bytes() == before


def test_a_text_run_is_not_partitioned_again_in_place_without_force(tmp_path):
    """Its models (and registry) belong to the old partition: the new one was written, then refused."""
    config, run = write_config(tmp_path, "text_ar"), tmp_path / "run"
    partition_text_run(config, run, log=QUIET)
    before = (run / "partition" / "manifest.json").read_bytes()
    with pytest.raises(DDMError, match=r"already holds a different run: its config.json differs in partition.seed "
                                       r"\(0, asked 5\); choose another --out folder or pass --force"):
        partition_text_run(config, run, log=QUIET, overrides=["partition.seed=5"])
    assert (run / "partition" / "manifest.json").read_bytes() == before
    partition_text_run(config, run, force=True, log=QUIET, overrides=["partition.seed=5"])
    assert (run / "partition" / "manifest.json").read_bytes() != before


@pytest.mark.parametrize("option", [("--stages", "train"), ("--backend", "processes"), ("--workers", "2"),
                                    ("--address", "auto")])
def test_ddmkit_run_of_a_text_config_refuses_the_vector_runs_options(tmp_path, monkeypatch, capsys, option):
    """A text run trains inline, every stage in one command: an option that would change that is named
    (exit 2) before anything is written, not left unread."""
    config = write_config(tmp_path, "text_ar")
    monkeypatch.chdir(tmp_path)
    code, err = cli("run", config, *option)
    assert code == 2 and option[0] in err and "a text run trains on the CPU" in err, err
    assert not (tmp_path / "runs").exists()


def test_text_sample_and_evaluate_remove_what_killed_writers_left(text_runs, tmp_path):
    """A killed writer's temporary file in a text run is removed by `ddmkit sample` and `evaluate` (only
    `ddmkit run` did); a live writer's stays."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for call in (lambda log: sample_text(run, ["top-1"], n=1, log=log), lambda log: evaluate_text(run, log)):
        stale = run / "samples" / f".text.json.{dead.pid}-{HOST}.a1b2c3d4.tmp"
        live = run / f".report.md.{os.getpid()}-{HOST}.q1w2e3r4.tmp"
        for path in (stale, live):
            path.parent.mkdir(exist_ok=True)
            path.write_text("half")
        said = []
        call(said.append)
        assert not stale.exists() and live.exists()
        assert said[0] == f"{run}: removed 1 temporary files or folders left by an interrupted run"
        live.unlink()


def test_a_cluster_without_held_out_text_has_no_other_experts_mean():
    """bits[j][c]: expert j on cluster c's held-out text. A cluster with none has no mean (it was 0.0 bits per
    byte, a perfect model), and one expert alone has no other experts."""
    from ddmkit.pipeline.text import other_experts_mean

    bits = [[None, 2.0, 4.0], [None, 1.0, 6.0], [None, 3.0, 1.0]]
    assert other_experts_mean(bits) == [None, 2.5, 5.0]
    assert other_experts_mean([[1.5]]) == [None]


def test_text_run_of_a_builtin_name_says_what_a_text_config_is(monkeypatch, capsys):
    """`ddmkit text run demo` said 'config file demo does not exist' (`ddmkit run demo` takes the name)."""
    code, err = cli("text", "run", "demo")
    assert code == 2 and "a text config is a TOML file" in err and "`ddmkit run demo`" in err, err


def test_a_text_run_refuses_other_training_settings_without_force(text_runs, tmp_path, monkeypatch, capsys):
    """`ddmkit run TEXT --out RUN --set expert.train.steps=25` on a finished run trained its models again and
    overwrote them (exit 0); a changed setting of what the run trains is refused, naming the fields, as for
    vector runs. Settings of sampling and evaluation only (and the seed of evaluation) keep the models."""
    import shutil

    run, config = tmp_path / "run", text_runs["text_ar"].parent / "text_ar.toml"
    shutil.copytree(text_runs["text_ar"], run)
    before = files(run)
    code, err = cli("run", config, "--out", run, "--set", "expert.train.steps=25",
                    "--set", "router.train.lr=0.01")
    assert code == 2 and f"{run} already holds a different run: its config.json differs in expert.train.steps " \
        "(60, asked 25); router.train.lr (0.002, asked 0.01); choose another --out folder or pass --force to " \
        "replace it" in " ".join(err.split()), err
    for item in ("model.width=16", "centralized.steps=7", "router.kinds=['learned']", "corpus.max_docs=30"):
        code, err = cli("run", config, "--out", run, "--set", item)
        assert code == 2 and f"differs in {item.split('=')[0]} (" in err, err
    assert files(run) == before
    code, err = cli("run", config, "--out", run, "--set", "sample.n=1", "--set", "seed=4",
                    "--set", "evaluate.windows_per_cluster=3", "--set", "threads=2")
    assert code == 0, err
    after = files(run)
    models = [p for p in before if p.parts[0] in ("partition", "experts", "monolith", "router")]
    assert models and all(after[p] == before[p] for p in models)
    assert after[RunFolder(run).report.relative_to(run)] != before[RunFolder(run).report.relative_to(run)]


STRATEGY_EXAMPLES = {"full": "full", "top-K": "top-1", "threshold-P": "threshold-0.3", "sample-K[@T]": "sample-1@0.5",
                     "nucleus-P[@T]": "nucleus-0.9", "switch": "switch", "oracle": "oracle", "nearest": "nearest",
                     "adaptive-P": "adaptive-0.9", "adaptive-ent-H": "adaptive-ent-0.3", "gated-K@A": "gated-2@30"}


def test_text_runs_take_the_strategies_they_list_and_refuse_the_others(text_runs):
    """The strategies a text config takes, and lists in its messages, are the strategy table's forms less those
    that need continuous-data state: every one of them samples and analyzes a text run of each kind; gated-K@A
    (refused only after training) and the others are refused when the config is validated."""
    from ddmkit.discrete.config import NOT_FOR_TEXT, TEXT_STRATEGY_FORMS
    from ddmkit.routing.table import STRATEGIES

    forms = [s.form for s in STRATEGIES]
    assert sorted(STRATEGY_EXAMPLES) == sorted(forms)  # a new strategy: add an example name here
    taken = [f for f in forms if f not in NOT_FOR_TEXT]
    assert TEXT_STRATEGY_FORMS == ", ".join(taken)
    names = [STRATEGY_EXAMPLES[f] for f in taken]
    for kind, run in text_runs.items():
        texts = sample_text(run, names, n=1, log=QUIET)
        assert {name for name in texts if name.startswith("learned / ")} == {f"learned / {n}" for n in names}, kind
        weights = analyze_text(run, run / "strategies", QUIET, names, n=1)["own_cluster_weight"]
        assert {f"learned / {n}" for n in names} <= set(weights), kind
        for form in NOT_FOR_TEXT:
            with pytest.raises(DDMError, match=re.escape(f"--strategy (evaluate.strategies): strategy "
                                                         f"{STRATEGY_EXAMPLES[form]!r} needs continuous-data state")):
                sample_text(run, [STRATEGY_EXAMPLES[form]], log=QUIET)


def test_a_text_run_takes_device_cpu_and_is_named_where_a_vector_run_is_expected(text_runs, tmp_path, monkeypatch,
                                                                               capsys):
    """--device cpu (or auto) is what a text run does, as discrete.md says: `run` and `train-expert` refused it.
    A vector config given a text run's folder said its config.json could not be read (cut mid-word), and
    DDM.from_pretrained said an expert had no data_shape."""
    import shutil

    from ddmkit.ddm import DDM

    run = tmp_path / "copy"
    shutil.copytree(text_runs["text_ar"], run)
    config = run / "config.json"
    for args in (["run", text_runs["text_ar"].parent / "text_ar.toml", "--out", run, "--device", "cpu"],
                 ["train-expert", run / "partition" / "shards" / "cluster_00.safetensors", "--config", config,
                  "--out", tmp_path / "e", "--device", "auto"]):
        code, err = cli(*args)
        assert code in (0, None), err
    code, err = cli("train-expert", run / "partition" / "shards" / "cluster_00.safetensors",
                    "--config", config, "--out", tmp_path / "e2", "--device", "cuda")
    assert code == 2 and "--device cuda: text runs train and sample on the CPU" in " ".join(err.split()), err
    code, err = cli("run", "demo", "--out", run)
    said = " ".join(err.split())
    assert code == 2 and "holds a run of another kind ('text_ar': a text run)" in said and "--force" in said, said
    with pytest.raises(DDMError, match=r"is a text run: its models draw bytes.*ddmkit sample"):
        DDM.from_pretrained(run)



def test_a_model_of_the_other_kind_under_this_runs_digest_is_not_loaded(tmp_path):
    """A masked (text_dfm) expert trained with `train-expert` into an autoregressive run's slot matched the run's
    digest (it leaves the kind out) and was loaded and scored as autoregressive: it sees the byte it predicts."""
    import torch

    from ddmkit.discrete.config import TextTrainConfig
    from ddmkit.errors import DDMError
    from ddmkit.pipeline.text import train_or_load

    kwargs = {"seq_len": 8, "out_dim": 258, "width": 16, "depth": 1, "heads": 2}
    train = TextTrainConfig(steps=1, batch_size=2, warmup=0, log_every=1, device="cpu")
    loss = lambda model, g: model(torch.zeros(2, 8, dtype=torch.long)).float().mean()  # noqa: E731
    folder = tmp_path / "expert_00"
    train_or_load(folder, "digest", "bidirectional_transformer", kwargs, loss, train, {}, "masked")
    with pytest.raises(DDMError, match="is a bidirectional_transformer, but this run's are causal_transformers"):
        train_or_load(folder, "digest", "causal_transformer", kwargs, loss, train, {}, "causal", train=False)
    model = train_or_load(folder, "digest", "causal_transformer", kwargs, loss, train, {}, "causal")
    assert json.loads((folder / "config.json").read_text())["arch"] == "causal_transformer"
    assert type(model).__name__ == "CausalTransformer"


DAMAGES = {"not JSON": lambda path: path.write_text('{"digest": '), "no run config": lambda path: path.write_text("[]"),
           "missing": lambda path: path.unlink()}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_text_runs_damaged_config_json_is_named_as_a_text_runs(text_runs, tmp_path, monkeypatch, capsys, damage):
    """A text run's config.json that was not JSON (or not a run's config, or gone) was read as a vector run's: the
    error said `ddmkit sample` and the others take the settings from --config CONFIG, which a text run does not
    take. Every command names the file as a text run's, with fixes that work for one: copy it back, or make the
    run again from its TOML (`--force` into this folder when the damaged file is there)."""
    import shutil

    run, toml = tmp_path / "run", text_runs["text_ar"].parent / "text_ar.toml"
    shutil.copytree(text_runs["text_ar"], run)
    config = run / "config.json"
    original = config.read_bytes()
    DAMAGES[damage](config)
    commands = [["sample", run, "--strategy", "top-1"], ["evaluate", run], ["analyze", run], ["train-router", run],
                ["register", run], ["launch", run], ["distill", run]]
    for args in commands + ([] if damage == "missing" else [["verify", run], ["run", toml, "--out", run]]):
        code, err = cli(*args)
        said = " ".join(err.split())
        assert code == 2 and str(config) in said and "--config CONFIG" not in said, (args, said)
        assert "copy it back from another copy of the run (a text run reads its settings from that file alone), " \
            "or make the run again from the text config (TOML) it was made with: `ddmkit run TEXT_CONFIG --out " \
            "NEW_RUN`" in said, (args, said)
    if damage == "not JSON":  # the fix that keeps the folder
        code, err = cli("run", toml, "--out", run, "--force")
        assert code in (0, None) and sample_text(run, ["top-1"], n=1, log=QUIET)["learned / top-1"], err
    config.write_bytes(original)
    assert sample_text(run, ["top-1"], n=1, log=QUIET)["learned / top-1"]


PARTITION_DAMAGES = {
    "training shard": lambda p: p.joinpath("shards", "cluster_01.safetensors").write_bytes(b"x" * 50),
    "held-out shard": lambda p: p.joinpath("test", "cluster_01.safetensors").write_bytes(b"x" * 50),
    "manifest not JSON": lambda p: p.joinpath("manifest.json").write_text("{bad"),
    "partition.safetensors missing": lambda p: p.joinpath("partition.safetensors").unlink(),
    "partition.safetensors changed": lambda p: p.joinpath("partition.safetensors").write_bytes(b"x" * 50),
}


@pytest.mark.parametrize("damage", list(PARTITION_DAMAGES))
def test_partition_on_a_damaged_text_partition_names_it_and_its_fix_works(text_runs, tmp_path, damage):
    """`ddmkit partition --config RUN/config.json --out RUN` on a text run whose shard was changed said
    'partition: k=...', exit 0, and left the damage; a manifest that was not JSON was a dead end ('re-create it
    with the ddmkit command that wrote it': that command refused it, --force too); a changed held-out shard said
    to partition again in a new run folder. A missing partition.safetensors named `ddmkit run CONFIG --out RUN`, a
    changed one 'partition again in a new run folder': the fix of a damaged shard is theirs too."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    folder = RunFolder(run)
    PARTITION_DAMAGES[damage](folder.partition)
    before = files(run)
    fix = f"remove {folder.partition} and run `ddmkit partition --config {folder.config} --out {run}`"
    commands = [["partition", "--config", folder.config, "--out", run], ["run", folder.config, "--out", run]]
    if not damage.startswith("partition.safetensors"):  # evaluate reads no centroids
        commands.append(["evaluate", run])
    for args in commands:
        code, err = cli(*args)
        said = " ".join(err.split())
        assert code == 2 and fix in said, (args, said)
    assert files(run) == before
    shutil.rmtree(folder.partition)  # the fix named
    code, err = cli("partition", "--config", folder.config, "--out", run)
    assert code in (0, None) and cli("verify", run)[0] in (0, None), err
    assert evaluate_text(run, log=QUIET)


def test_sample_and_analyze_of_a_text_run_need_no_centralized_model_unless_it_is_asked_for(text_runs, tmp_path):
    """Step by step without `ddmkit train-monolith` (the centralized baseline): `ddmkit sample RUN --strategy top-1`
    and `ddmkit analyze RUN`, which use no centralized model, said 'RUN/monolith is missing'."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run, ignore=shutil.ignore_patterns("monolith", "samples"))
    texts = sample_text(run, ["top-1"], n=1, log=QUIET)
    assert set(texts) == {"bayes / top-1", "learned / top-1"}
    assert analyze_text(run, tmp_path / "analysis", log=QUIET, n=1)["own_expert"]
    with pytest.raises(DDMError, match="monolith is missing"):
        sample_text(run, ["monolith"], n=1, log=QUIET)


def test_a_missing_text_monolith_or_router_names_the_command_that_trains_it(text_runs, tmp_path):
    """'RUN/monolith is missing; train it with `ddmkit run CONFIG --out RUN` (or the matching `ddmkit train-*`
    command)': which one? The message names `ddmkit train-monolith RUN` (the router: `train-router RUN`)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run, ignore=shutil.ignore_patterns("monolith", "router", "samples"))
    for strategies, part, command in ((["monolith"], "monolith", "train-monolith"), (["top-1"], "router",
                                                                                        "train-router")):
        with pytest.raises(DDMError) as raised:
            sample_text(run, strategies, n=1, log=QUIET)
        said = " ".join(str(raised.value).split())
        assert f"{run / part} is missing; train it with `ddmkit {command} {run}` (or `ddmkit run " \
               f"{run / 'config.json'} --out {run}`" in said and "train-*" not in said, said


def test_a_corpus_of_utf16_text_says_its_files_were_skipped_as_binary_and_how_to_convert_them(tmp_path):
    """UTF-16 text holds NUL bytes, so every file was skipped as binary, and the error said only 'lower
    corpus.min_doc_bytes or use more text', which cannot help."""
    from ddmkit.discrete.config import CorpusConfig
    from ddmkit.discrete.corpus import all_documents

    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_bytes(("plain text, saved as UTF-16 " * 10).encode("utf-16"))
    with pytest.raises(DDMError, match=r"skipped as binary \(3 of 3 files matched\): doc0.txt, doc1.txt, doc2.txt; "
                                       r".*UTF-16 .*convert it to UTF-8"):
        all_documents(CorpusConfig(source=str(tmp_path), pattern="*.txt", min_doc_bytes=16), QUIET)


def test_train_expert_given_the_shards_folder_says_to_give_one_shard_in_it(text_runs, tmp_path):
    """`ddmkit train-expert RUN/partition/shards --config RUN/config.json` said to 'move it away': the run's own
    shards folder."""
    folder = RunFolder(text_runs["text_ar"])
    shards = folder.partition / "shards"
    code, err = cli("train-expert", shards, "--config", folder.config, "--out", tmp_path / "expert")
    said = " ".join(err.split())
    assert code == 2 and f"shard {shards} is a folder; give one shard file in it, e.g. " \
        f"{shards / 'cluster_00.safetensors'}" in said and "move it away" not in said, said
    assert not (tmp_path / "expert").exists()


def test_train_expert_given_the_config_or_manifest_as_the_shard_shows_the_right_form(text_runs, tmp_path):
    """`ddmkit train-expert RUN/config.json --config RUN/config.json` (or the manifest, or the TOML) said the file
    was 'corrupt or not a safetensors file ...; copy the shard again'."""
    folder = RunFolder(text_runs["text_ar"])
    form = (f"the shard goes first, the config to --config: `ddmkit train-expert {folder.partition}/shards/"
            f"cluster_00.safetensors --config {folder.config} --out {folder.expert(0)}`")
    for given, what in ((folder.config, "a run's config (JSON text)"),
                        (folder.manifest, "a partition's manifest (JSON text)")):
        code, err = cli("train-expert", given, "--config", folder.config, "--out", tmp_path / "expert")
        said = " ".join(err.split())
        assert code == 2 and f"shard {given} is {what}, given where a shard goes; {form}" in said, said
        assert "corrupt" not in said and not (tmp_path / "expert").exists()
    toml = tmp_path / "text.toml"
    toml.write_text('kind = "text_ar"\n')
    code, err = cli("train-expert", toml, "--config", folder.config, "--out", tmp_path / "expert")
    assert code == 2 and f"shard {toml} is a config (TOML text), given where a shard goes" in " ".join(err.split())


def test_blocks_of_crlf_text_keep_no_carriage_return_at_their_ends():
    """CRLF text split into blocks gave documents beginning with '\\r\\n' and ending with '\\r'."""
    from ddmkit.discrete.corpus import split_blocks

    text = b"first line\r\nsecond\r\n\r\n\r\nnext block\r\n\r\nlast\r\n"
    assert split_blocks(text) == [b"first line\r\nsecond", b"next block", b"last"]
    assert split_blocks(text.replace(b"\r\n", b"\n")) == [b"first line\nsecond", b"next block", b"last"]


def test_utf16_and_utf32_files_beside_utf8_ones_are_named_as_such_with_the_command_that_converts_them(tmp_path):
    """A UTF-16 file among UTF-8 ones was logged as 'skipped 1 binary file', with no word of its encoding."""
    from ddmkit.discrete.config import CorpusConfig
    from ddmkit.discrete.corpus import all_documents

    for i in range(2):
        (tmp_path / f"ok{i}.txt").write_text("plain text " * 10)
    (tmp_path / "wide16.txt").write_bytes("text saved as UTF-16 ".encode("utf-16") * 5)
    (tmp_path / "wide32.txt").write_bytes("text saved as UTF-32 ".encode("utf-32") * 5)
    lines = []
    docs = all_documents(CorpusConfig(source=str(tmp_path), pattern="*.txt", min_doc_bytes=16), lines.append)
    assert sorted(d.name for d in docs) == ["ok0.txt", "ok1.txt"]
    assert lines == ["corpus: skipped 1 UTF-16 text file (a byte-order mark): wide16.txt; convert to UTF-8 to use it "
                     "(e.g. `iconv -f UTF-16 -t UTF-8 IN > OUT`)",
                     "corpus: skipped 1 UTF-32 text file (a byte-order mark): wide32.txt; convert to UTF-8 to use it "
                     "(e.g. `iconv -f UTF-32 -t UTF-8 IN > OUT`)"]


@pytest.mark.parametrize("unit, text, fix", [
    ("file", b"", r"the 1 file read holds no text \(empty or blank\); add text$"),
    ("block", b"one long line " * 1000, r'the text is one block .*separate documents by a blank line, or put one '
                                         r'document per file and use unit = "file"$'),
    ("block", b"many lines\n" * 1000, "the text is one block"),
], ids=["empty", "one-line", "no-blank-line"])
def test_too_few_documents_names_the_fix_that_helps(tmp_path, unit, text, fix):
    """An empty file, or one long line with unit = "block", was told to lower corpus.min_doc_bytes, which cannot
    help."""
    from ddmkit.discrete.config import CorpusConfig
    from ddmkit.discrete.corpus import all_documents

    (tmp_path / "one.txt").write_bytes(text)
    with pytest.raises(DDMError, match=fix) as caught:
        all_documents(CorpusConfig(source=str(tmp_path), pattern="*.txt", unit=unit, min_doc_bytes=16), QUIET)
    assert "min_doc_bytes or" not in str(caught.value)


def test_a_pattern_that_misses_files_in_subfolders_says_which_pattern_finds_them(tmp_path):
    """`pattern = "*.txt"` over a folder of subfolders said only 'no files match', with no fix."""
    from ddmkit.discrete.config import CorpusConfig
    from ddmkit.discrete.corpus import all_documents

    (tmp_path / "a").mkdir()
    for i in range(2):
        (tmp_path / "a" / f"doc{i}.txt").write_text("plain text " * 10)
    with pytest.raises(DDMError, match=r"no files match pattern '\*\.txt' \(corpus.pattern\) under .*; files in its "
                                       r"subfolders match '\*\*/\*\.txt': set corpus.pattern = '\*\*/\*\.txt'$"):
        all_documents(CorpusConfig(source=str(tmp_path), pattern="*.txt", min_doc_bytes=16), QUIET)
    assert len(all_documents(CorpusConfig(source=str(tmp_path), pattern="**/*.txt", min_doc_bytes=16), QUIET)) == 2
    with pytest.raises(DDMError, match=r"no files match pattern '\*\.md' \(corpus.pattern\) under \S+$"):
        all_documents(CorpusConfig(source=str(tmp_path), pattern="*.md", min_doc_bytes=16), QUIET)


def test_verify_of_a_folder_inside_a_run_or_of_no_run_names_the_run_folder_not_register(text_runs, tmp_path):
    """`ddmkit verify RUN/partition` (or a folder of runs, or a corpus folder) said to run `ddmkit register` on
    that folder, which then refused it too."""
    run = text_runs["text_ar"]
    for inside in (run / "partition", run / "plots"):
        code, err = cli("verify", inside)
        said = " ".join(err.split())
        assert code == 2 and f"{inside} is a folder inside the run {run.resolve()}; give the run folder itself" \
            in said and "register" not in said, said
    code, err = cli("verify", tmp_path)
    said = " ".join(err.split())
    assert code == 2 and f"{tmp_path} is not a ddmkit run folder (no config.json)" in said and "register" not in said


def test_a_run_of_one_cluster_and_one_router_says_expert_and_router_in_the_singular(tmp_path):
    """partition.k = 1 said 'text models: 1 experts, routers learned'."""
    lines = []
    run_text(write_config(tmp_path, "text_dfm", kinds='["learned"]'), tmp_path / "run", log=lines.append,
             overrides=["partition.k=1", "expert.train.steps=2", "router.train.steps=2", "centralized.enabled=false"])
    said = next(line for line in lines if line.startswith("text models:"))
    assert said.startswith("text models: 1 expert, router learned ready in"), said


def test_train_expert_refuses_another_runs_or_a_changed_text_shard_for_a_runs_slot(text_runs, tmp_path):
    """A text expert trained into RUN/experts/expert_00 on another run's shard of cluster 0 (or on this run's
    shard changed since the partition was made) replaced the run's expert; only evaluate or register refused it,
    after its training. Image experts were refused before training (check_shard_for_slot): so are text ones."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_runs["text_ar"], run)
    folder = RunFolder(run)
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(other, "text_ar")
    config.write_text(config.read_text().replace("test_fraction = 0.2", "test_fraction = 0.4"))
    partition_text_run(config, other / "run", log=QUIET)
    own = folder.partition / "shards" / "cluster_00.safetensors"
    before = files(folder.expert(0))
    code, err = cli("train-expert", other / "run" / "partition" / "shards" / "cluster_00.safetensors", "--config",
                    folder.config, "--out", folder.expert(0))
    said = " ".join(err.split())
    assert code == 2 and "cluster 0's shard of another partition" in said and f"give {own}, or another --out" in said
    x, _, meta = read_shard(own)
    save_tensors(own, {"x": x.flip(0)}, meta)  # the run's own shard, its bytes changed
    code, err = cli("train-expert", own, "--config", folder.config, "--out", folder.expert(0))
    said = " ".join(err.split())
    assert code == 2 and f"{own}: SHA-256 differs from the one the run {run} records for cluster 0" in said, said
    assert "copy the shard back" in said and files(folder.expert(0)) == before


@pytest.mark.parametrize("unit", ["file", "block"])
def test_documents_cut_to_max_doc_bytes_are_counted_in_one_log_line(tmp_path, unit):
    """A document of one very long line was cut to corpus.max_doc_bytes without a word: most of its text was
    left out of the run, and nothing said so or named the setting."""
    from ddmkit.discrete.config import CorpusConfig
    from ddmkit.discrete.corpus import all_documents

    (tmp_path / "long.txt").write_text("word " * 2000)  # 10000 bytes, no line break
    (tmp_path / "longer.txt").write_text("x" * 12000)
    for i in range(3):
        (tmp_path / f"short{i}.txt").write_text("plain text " * 10)
    lines = []
    cfg = CorpusConfig(source=str(tmp_path), pattern="*.txt", unit=unit, min_doc_bytes=16, max_doc_bytes=4096)
    docs = all_documents(cfg, lines.append)
    assert sorted(len(d.text) for d in docs) == [110, 110, 110, 4096, 4096]
    name = "longer.txt" if unit == "file" else "longer.txt#0"
    assert lines == [f"corpus: 2 of 5 documents are longer than corpus.max_doc_bytes = 4096 and cut to that many "
                     f"bytes (the longest: {name}, 12000 bytes in one line); raise corpus.max_doc_bytes to keep more "
                     "of them"], lines
    lines.clear()
    assert len(all_documents(cfg.model_copy(update={"max_doc_bytes": 12000}), lines.append)) == 5 and lines == []
