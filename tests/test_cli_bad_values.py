"""Every command of `ddmkit` and every option or argument of it that takes a value, given bad values of its kind
(numbers: -1, 0, nan, inf, 1e999, 2.5, a word, '', 10**20; paths: a missing one, a file where a folder belongs and
the other way round, an empty folder; texts: '', a word no choice takes, a very long one) with the other arguments
valid: each case is exit 0 (the value is legal) or exit 2 with an `error:` line naming the option, field or path,
never a traceback, an exception's type name, another exit status or a hang, and a refused case leaves every
folder as it was. Training, sampling and the theory studies are stopped where they would begin: a legal value
counts as accepted there. The default suite tries two values per option of the vector and image commands; the
slow target tries the whole table, on text runs too. A command or option added later is swept as well (the
command tree is read from the CLI); a command needs its valid arguments in BASE."""
import importlib
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import typer

from conftest import run_cli
from ddmkit.cli import app
from ddmkit.errors import DDMError, shortened
from test_damaged_runs import tiny_config
from test_discrete_pipeline import write_config

TINY = Path(__file__).parent / "configs" / "tiny.toml"
QUIET = lambda m: None  # noqa: E731
LIMIT = 60  # seconds a case may take: past it the command hangs (long work is stopped where it begins)
HUGE = "99999999999999999999"

# the valid arguments of every command; RUN: a trained run (sampled), PART: a partitioned one, OUT: a new folder
BASE = {
    "partition": ["--out", "OUT", "--config", "CONFIG"],
    "train-expert": ["SHARD", "--out", "OUT", "--config", "CONFIG"],
    "train-router": ["PART"], "train-monolith": ["PART"],
    "sample": ["RUN"], "evaluate": ["RUN"], "analyze": ["RUN"],
    "run": ["CONFIG", "--out", "OUT"],
    "sweep": ["CONFIG", "--out", "OUT", "--k", "2", "--budget", "1"],
    "launch": ["PART"],
    "register": ["RUN"], "verify": ["RUN"],
    "demo": ["--out", "OUT", "--backend", "inline"],
    "add-expert": ["RUN", "--data", "ring8", "--params", '{"seed": 7}'],
    "replace-expert": ["RUN", "0", "FOLDER"],
    "distill": ["RUN"],
    "theory convergence": ["--quick", "--out", "OUT"],
    "theory distill": ["--quick", "--out", "OUT"],
    "text run": ["TEXT", "--out", "OUT"],
    "text exactness": [],
    "study misalignment": ["CONFIG", "--out", "OUT", "--seeds", "1", "--n", "100"],
}
SLURM = ("--script", "--time", "--cpus", "--gpus", "--mem", "--partition", "--expert")  # launch's, with --emit slurm
TEXT = ("partition", "train-expert", "train-router", "train-monolith", "sample", "evaluate", "analyze", "run",
        "launch", "register", "verify")  # the commands that also take a text run or config

FULL = {
    "int": ["-1", "0", "nan", "inf", "1e999", "2.5", "two", "", HUGE],
    "float": ["-1", "0", "nan", "inf", "-inf", "1e999", "two", ""],
    "path": ["MISSING", "AFILE", "EMPTYDIR", ""],
    "str": ["", "zzz", "x" * 3000, " "],
    "set": ["", "zzz", "=1", "expert.train.steps=", "expert.train.steps=nan", "sample.n=inf", "x" * 3000 + "=1",
            "expert.train.lr=1e999", "partition.k=2.5", "sample.steps=-1", f"data.n_train={HUGE}",
            f"expert.net.kwargs.depth={HUGE}", f"expert.net.kwargs.width={HUGE}", "expert.net.kwargs.width=-1",
            "data.params.std=inf", f"threads={HUGE}", f"model.depth={HUGE}", f"model.seq_len={HUGE}"],
}
QUICK = {"int": ["2.5", HUGE], "float": ["two"], "path": ["AFILE"], "str": [""],
         "set": ["expert.train.steps=inf", f"expert.net.kwargs.depth={HUGE}"]}
EXTRA = {  # values of the options that take names or forms
    "--strategy": ["top-0", f"top-{HUGE}", "threshold-nan", "sample-2@-1", "nucleus-1e999", "adaptive-ent-inf"],
    "--teacher": ["top-0", "threshold-inf"],
    "--device": ["cuda:-1", f"cuda:{HUGE}", "cuda:1.5"],
    "--params": ['{"std": 1e999}', "[1]", "{"],
    "--time": ["-1", "24:61:00"],
    "--mem": ["-1G", "nanG"],
    "K": ["-1", HUGE, "1.5"],
    "--conditions": ["overlap-nan", "overlap-1e999", "random+tempered-0"],
}


class Accepted(BaseException):
    """A legal value reached long work (training, sampling, a theory study): stopped there."""


class TooLong(BaseException):
    """The case ran past LIMIT seconds."""


def commands():
    """(path, click command) of every command of the CLI, groups (study, theory, text) walked."""
    def walk(group, path):
        for name, sub in group.commands.items():
            yield from walk(sub, path + (name,)) if hasattr(sub, "commands") else [(path + (name,), sub)]
    return list(walk(typer.main.get_command(app), ()))


COMMANDS = dict(commands())


def kind(param) -> str:
    """The bad values a parameter gets: those of int, float, path, str, or --set's."""
    if param.name == "set_":
        return "set"
    annotation = str(getattr(getattr(param, "type_descriptor", None), "annotation", ""))
    return next((k for k, word in (("path", "Path"), ("float", "float"), ("int", "int")) if word in annotation), "str")


def label(param) -> str:
    return max(param.opts, key=len) if param.param_type_name == "option" else param.name.upper()


def cases(command, table):
    """(param, value) of every parameter of `command` that takes a value, with the bad values of `table`."""
    for param in command.params:
        if getattr(param, "is_flag", False) or param.name == "help":
            continue
        extra = EXTRA.get(label(param), []) if table is FULL else []
        for value in table[kind(param)] + extra:
            yield param, value


def argv(path, param, value) -> list[str]:
    """The command line: BASE's, with `value` for `param` (in place of BASE's own value, or added)."""
    args = list(BASE[" ".join(path)])
    if path == ("launch",) and label(param) in SLURM:
        args += ["--emit", "slurm"]
    if param.param_type_name == "argument":
        names = [p.name for p in COMMANDS[path].params if p.param_type_name == "argument"]
        places = [i for i, a in enumerate(args)  # the positional ones: neither an option nor an option's value
                  if not a.startswith("--") and (i == 0 or not args[i - 1].startswith("--"))]
        args[places[names.index(param.name)]] = value
        return [*path, *args]
    option = label(param)
    if option in args and param.name != "set_":
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return [*path, *args]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The folders the cases start from: a trained and sampled vector run, a partitioned one, the tiny config they
    were made with, a trained and a partitioned text run and their config."""
    from ddmkit.pipeline.prepare import prepare_run_dir
    from ddmkit.pipeline.run import sample_run
    from ddmkit.pipeline.stages import (stage_data, stage_experts, stage_monolith, stage_partition, stage_registry,
                                        stage_router)
    from ddmkit.pipeline.text import partition_text_run, run_text

    root = tmp_path_factory.mktemp("bad_values")
    cfg = tiny_config()
    run, part = prepare_run_dir(root / "run", cfg, log=QUIET), prepare_run_dir(root / "part", cfg, log=QUIET)
    for stage in (stage_data, stage_partition, stage_experts, stage_monolith, stage_router, stage_registry):
        stage(cfg, run, QUIET)
    for stage in (stage_data, stage_partition):
        stage(cfg, part, QUIET)
    sample_run(run, ["top-1", "monolith"], cfg, QUIET)
    (root / "tiny.toml").write_text(TINY.read_text().replace("n_train = 1600", "n_train = 400").replace(
        "n_test = 1600", "n_test = 400").replace("k = 4", "k = 2").replace("n = 400", "n = 100"))
    (root / "corpus").mkdir()
    text = write_config(root / "corpus", "text_ar")
    run_text(text, root / "textrun", log=QUIET)
    partition_text_run(text, root / "textpart", log=QUIET)
    return root


def stop_long_work(monkeypatch) -> None:
    """Training (fit), integration (the solvers) and the theory studies raise Accepted where they would begin,
    in every module of ddmkit that holds them."""
    for name in ("ddmkit.pipeline.run", "ddmkit.pipeline.sweep", "ddmkit.pipeline.text", "ddmkit.pipeline.distill",
                 "ddmkit.pipeline.misalignment", "ddmkit.pipeline.analyze", "ddmkit.pipeline.grow",
                 "ddmkit.train.concurrent", "ddmkit.train.autoencoder", "ddmkit.theory.convergence",
                 "ddmkit.theory.distill", "ddmkit.theory.students"):
        importlib.import_module(name)
    from ddmkit.sample import solvers
    from ddmkit.theory.convergence import run_convergence
    from ddmkit.theory.distill import run_distill
    from ddmkit.train.loop import fit

    def stop(*args, **kwargs):
        raise Accepted
    for real in (fit, run_convergence, run_distill, solvers.sample_adaptive):
        for name, module in list(sys.modules.items()):
            if name.startswith("ddmkit") and getattr(module, real.__name__, None) is real:
                monkeypatch.setattr(module, real.__name__, stop)
    monkeypatch.setattr(solvers, "_integrate", stop)
    monkeypatch.setitem(solvers.SOLVERS, "adaptive", stop)


def case_folder(made: Path, tmp: Path, text: bool) -> dict[str, str]:
    """A fresh copy of the runs in tmp, and the placeholders of BASE and of the path values as its paths."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    shutil.copytree(made / ("textrun" if text else "run"), tmp / "run")
    shutil.copytree(made / ("textpart" if text else "part"), tmp / "part")
    shutil.copytree(made / "run" / "experts" / "expert_01", tmp / "folder")
    (tmp / "afile.txt").write_text("hello")
    (tmp / "emptydir").mkdir()
    config = made / "corpus" / "text_ar.toml" if text else made / "tiny.toml"
    return {"RUN": tmp / "run", "PART": tmp / "part", "OUT": tmp / "out", "CONFIG": config,
            "TEXT": made / "corpus" / "text_ar.toml", "FOLDER": tmp / "folder",
            "SHARD": tmp / "part" / "partition" / "shards" / "cluster_00.safetensors",
            "MISSING": tmp / "missing" / "nothing", "AFILE": tmp / "afile.txt", "EMPTYDIR": tmp / "emptydir"}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def attempt(args: list) -> tuple[object, str]:
    """(exit status, or 'accepted', or what went wrong; stdout and stderr) of `ddmkit ARGS` in this process."""
    def too_long(*_):
        raise TooLong
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(LIMIT)
    try:
        done = run_cli(*args)
        return done.returncode, done.stdout + done.stderr
    except Accepted:
        return "accepted", ""
    except TooLong:
        return f"no answer within {LIMIT} s", ""
    except BaseException as e:  # noqa: BLE001 - a traceback for a user
        return f"traceback: {type(e).__name__}: {str(e)[:200]}", ""
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


NAMED_BY_TYPE = re.compile(r"Traceback|frame #\d|\b[A-Z]\w*(Error|Exception)\b")


def names(param, value: str, paths: dict) -> list[str]:
    """What an error about `value` of `param` may name: the option, the path, the --set field (or its table)."""
    given = str(paths.get(value, value))
    out = [label(param), given.strip(), str(Path(given)) if given else "."]
    if param.name == "set_" and "=" in value:
        field = value.split("=", 1)[0].strip()
        out += [field, field.rsplit(".", 1)[-1], ".".join(field.split(".")[:2])]
    return [shortened(n) for n in out if n]  # a very long one as an error shows it


def problem(param, value, paths, code, said, before, after) -> str | None:
    """What is wrong with one case's answer, or None."""
    if code in (0, "accepted"):
        return None
    if not isinstance(code, int):
        return code
    if NAMED_BY_TYPE.search(said.replace("DDMError", "")):
        return f"exit {code}, a traceback or exception name: {' '.join(said.split())[:300]}"
    if code != 2:
        return f"exit {code}: {' '.join(said.split())[:300]}"
    errors = " ".join(line for line in said.splitlines() if line.startswith("error:"))
    errors += " ".join(said.split("error:", 1)[1:])  # a message of several lines (a config's fields)
    if not errors:
        return f"exit 2 without an error: line: {' '.join(said.split())[:300]}"
    if value.strip() and not any(name in errors for name in names(param, value, paths)):
        return f"the error names neither {label(param)} nor its value: {' '.join(errors.split())[:300]}"
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and
                     not (k in before and k in after and before[k][0]))  # a folder's own mtime aside
    if changed:
        return f"refused, but left {changed[:3]}"
    return None


def sweep(path, table, made, tmp_path, monkeypatch, text=False) -> list[str]:
    """Every case of one command: the problems found, one line each."""
    stop_long_work(monkeypatch)
    found = []
    for param, value in cases(COMMANDS[path], table):
        paths = case_folder(made, tmp_path / "case", text)
        monkeypatch.chdir(tmp_path / "case")
        args = [str(paths.get(a, a)) for a in argv(path, param, value)]
        before = snapshot(tmp_path / "case")
        code, said = attempt(args)
        wrong = problem(param, value, paths, code, said, before, snapshot(tmp_path / "case"))
        if wrong:
            found.append(f"{' '.join(path)} {label(param)} {value[:30]!r}: {wrong}")
    return found


def test_every_command_has_valid_arguments_to_start_from():
    assert sorted(" ".join(p) for p in COMMANDS) == sorted(BASE), "add the command's valid arguments to BASE"


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_bad_values_of_every_option_are_refused_in_one_line(path, made, tmp_path, monkeypatch):
    found = sweep(path, QUICK, made, tmp_path, monkeypatch)
    assert not found, "\n".join(found)


@pytest.mark.slow
@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_the_whole_table_of_bad_values_of_every_option(path, made, tmp_path, monkeypatch):
    found = sweep(path, FULL, made, tmp_path, monkeypatch)
    if " ".join(path) in TEXT:
        found += sweep(path, FULL, made, tmp_path, monkeypatch, text=True)
    assert not found, "\n".join(found)


# ----- values the sweep counts as legal (exit 0) or refused without naming them: each refused as it should be -----
def test_an_empty_router_is_refused_not_taken_for_the_default(tmp_path):
    """`sample --router ''` sampled with the learned router, as if --router were left out; it is refused, naming
    --router and the accepted values, before the run is read."""
    done = run_cli("sample", tmp_path / "run", "--router", "")
    assert done.returncode == 2 and "error: --router: unknown ''; accepted: learned, statistics" in done.stderr, \
        done.stderr


@pytest.mark.parametrize("args", [["sample", ""], ["verify", ""], ["evaluate", ""], ["launch", ""],
                                  ["distill", ""], ["replace-expert", "", "0", "FOLDER"]])
def test_an_empty_run_argument_is_refused_naming_run(args, tmp_path, monkeypatch):
    """`ddmkit sample ''` said '. is not a ddmkit run folder': Path('') is '.', the current folder. An empty RUN is
    refused as such, by the raw argument, before any folder is read (the current one, a run or not, is left)."""
    monkeypatch.chdir(tmp_path)
    done = run_cli(*args)
    assert done.returncode == 2 and done.stderr.startswith("error: RUN is empty: give the run folder"), done.stderr
    assert "or . for the current folder" in done.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("config", [[], ["--config", TINY]])
def test_an_empty_shard_argument_is_refused_naming_shard(config, tmp_path, monkeypatch):
    """`ddmkit train-expert ''` took the current folder for the shard ('shard . is a folder'), as an empty RUN was
    taken before: an empty SHARD is refused as such, by the raw argument, before any config or file is read."""
    monkeypatch.chdir(tmp_path)
    done = run_cli("train-expert", "", "--out", "e", *config)
    assert done.returncode == 2 and done.stderr.startswith(
        "error: SHARD is empty: give one shard file, e.g. RUN/partition/shards/cluster_00.safetensors"), done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [["sample", "   "], ["register", "\t"], ["replace-expert", " ", "0", "FOLDER"],
                                  ["train-expert", "  ", "--out", "e"]])
def test_a_run_or_shard_of_whitespace_only_is_refused_naming_it(args, tmp_path, monkeypatch):
    """A RUN of spaces ('   ', a legal folder name, never the one meant) was looked for as a folder of that name,
    and named as a blank ("    is not a run folder"); a SHARD of spaces as a file ("shard    does not exist"). Each
    is refused by its raw text, where an empty one is, naming the argument and what to give; nothing is written."""
    monkeypatch.chdir(tmp_path)
    done = run_cli(*args)
    name, blank = ("SHARD" if args[0] == "train-expert" else "RUN"), args[1]
    assert done.returncode == 2 and done.stderr.startswith(f"error: {name} is only whitespace ({blank!r}): give "), \
        done.stderr
    assert not list(tmp_path.iterdir())


OUTS = [path for path, command in COMMANDS.items() if any("--out" in param.opts for param in command.params)]


@pytest.mark.parametrize("value", ["", "   "])
@pytest.mark.parametrize("path", OUTS, ids=" ".join)
def test_an_empty_or_blank_out_is_refused_naming_out(path, value, made, tmp_path, monkeypatch):
    """`--out '   '` made a folder named three spaces and `--out ''` was taken for the current folder (Path('') is
    '.'), written to by some commands. Every command's --out refuses such a value by its raw text, as RUN does: one
    line naming --out and a value that works (here: accepted by the same command), before anything is read or
    written."""
    stop_long_work(monkeypatch)
    paths = case_folder(made, tmp_path / "case", text=False)
    monkeypatch.chdir(tmp_path / "case")
    out = next(param for param in COMMANDS[path].params if "--out" in param.opts)
    before = snapshot(tmp_path / "case")
    code, said = attempt([str(paths.get(a, a)) for a in argv(path, out, value)])
    what = "empty" if value == "" else f"only whitespace ({value!r})"
    assert code == 2 and said.startswith(f"error: --out is {what}: give the "), said
    assert snapshot(tmp_path / "case") == before
    works = re.search(r"e\.g\. --out (\S+)", said).group(1)
    assert attempt([str(paths.get(a, a)) for a in argv(path, out, works)])[0] in (0, "accepted"), works


def shown_name(param) -> str:
    """A parameter as its errors name it: an argument by its metavar (RUN, SHARD, FOLDER) or name (CONFIG), an
    option by its longest flag."""
    return param.metavar if param.param_type_name == "argument" and param.metavar else label(param)


PATHS = [(path, param) for path, command in COMMANDS.items() for param in command.params  # --out: tested above
         if (kind(param) == "path" or label(param) == "--data") and "--out" not in param.opts]


@pytest.mark.parametrize("value", ["", "   "])
@pytest.mark.parametrize("path, param", PATHS, ids=[f"{' '.join(path)} {shown_name(p)}" for path, p in PATHS])
def test_every_empty_or_blank_path_is_refused_naming_it(path, param, value, made, tmp_path, monkeypatch):
    """`ddmkit run ''` and `--config ''` said 'config file . is a folder, not a TOML file' (Path('') is '.'),
    replace-expert's FOLDER '' read the current folder, add-expert's `--data ''` gave two lines of the config's
    validation, and `--script '   '` wrote a file named three spaces. Every path argument or option (CONFIG,
    FOLDER, --config, --data, --script, RUN, SHARD) of every command refuses such a value by its raw text, as
    --out does: one line naming it and what to give, exit 2, before anything is read or written."""
    stop_long_work(monkeypatch)
    paths = case_folder(made, tmp_path / "case", text=False)
    monkeypatch.chdir(tmp_path / "case")
    before = snapshot(tmp_path / "case")
    code, said = attempt([str(paths.get(a, a)) for a in argv(path, param, value)])
    what = "empty" if value == "" else f"only whitespace ({value!r})"
    assert code == 2 and said.startswith(f"error: {shown_name(param)} is {what}: give "), said
    assert len(said.strip().splitlines()) == 1 and snapshot(tmp_path / "case") == before, said


def test_a_very_long_value_is_shown_shortened_in_its_error(tmp_path, monkeypatch):
    """A 3000-character value was echoed whole in its error line. Every message the CLI prints (a DDMError's, a
    file system's) shows a value of more than 500 characters as its first 60, '...', its last 40 and its length; a
    path of 500 characters is shown whole."""
    long = "x" * 3000
    assert shortened(f"--k {long!r}: give a number") == (
        f"--k '{'x' * 60}...{'x' * 40} (3000 characters)': give a number")
    assert shortened("y" * 500 + " " + "a" * 61 + "b" * 400 + "c" * 40) == (
        "y" * 500 + " " + "a" * 60 + "..." + "c" * 40 + " (501 characters)")
    for args in (["sample", tmp_path / "run", "--router", long],  # a DDMError
                 ["train-router", tmp_path / long]):  # the file system's: File name too long
        done = run_cli(*args)
        said = done.stderr
        assert done.returncode == 2 and said.startswith("error: ") and "x" * 101 not in said, said[:300]
        assert re.search(r"\.\.\.\S{40} \(3\d{3} characters\)", said) and len(said) < 400, said[:300]


@pytest.mark.parametrize("option", ["--n", "--n-boot", "--w2-boot", "--stability-rows"])
def test_study_counts_past_their_range_are_refused_before_training(option, tmp_path, monkeypatch):
    """`study misalignment --n-boot 10**20` trained every run, then drew bootstrap resamples for ever: each count
    of the study is bounded, refused in one line before anything is trained or written (CLI and library)."""
    from ddmkit.config import load_config
    from ddmkit.pipeline.misalignment import study_misalignment

    stop_long_work(monkeypatch)  # training, were it reached, raises Accepted
    done = run_cli("study", "misalignment", TINY, "--out", tmp_path / "out", "--seeds", "1", "--n", "100",
                   option, HUGE)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {option} {HUGE}: give a whole number, from "), \
        done.stderr
    keyword = option.removeprefix("--").replace("-", "_")
    with pytest.raises(DDMError, match=re.escape(option)):
        study_misalignment(load_config(TINY), tmp_path / "out", [0], **{"n": 100, keyword: int(HUGE)}, log=QUIET)
    assert not (tmp_path / "out").exists()


def test_number_options_are_read_as_typer_before_0_28_holds_them():
    """Typer before 0.28 keeps an option's number type and range on its click type (IntRange(min=1),
    FloatParamType; from click or from Typer's copy of click, hence matched by class name), not on the option:
    those options get the one-line refusals too (they were Typer's framed box there)."""
    from ddmkit.cli import _number_option

    class IntParamType: ...
    class IntRange(IntParamType):
        min, max = 1, None
    class FloatParamType: ...
    class StringParamType: ...

    class Option:  # an option as that Typer builds it: no type_descriptor, a click type
        def __init__(self, kind):
            self.type = kind

    assert _number_option(Option(IntRange())) == (int, 1, None)
    assert _number_option(Option(IntParamType())) == (int, None, None)
    assert _number_option(Option(FloatParamType())) == (float, None, None)
    assert _number_option(Option(StringParamType())) == (None, None, None)
