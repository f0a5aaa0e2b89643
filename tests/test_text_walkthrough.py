"""What docs/discrete.md tells a user to do, when a step goes wrong: each refusal names a fix that works as given
(the run's own config.json, never a CONFIG placeholder) and exits with code 2, writing nothing."""
from __future__ import annotations

import re
import shlex
import shutil

import pytest

from ddmkit.discrete.config import load_text_config
from ddmkit.errors import DDMError
from ddmkit.pipeline.text import run_text, sample_text
from test_discrete_pipeline import write_config
from test_hardening import cli

QUIET = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained text_ar run made with a --set (so its TOML alone is not its config)."""
    root = tmp_path_factory.mktemp("walk")
    run = root / "run"
    run_text(write_config(root, "text_ar"), run, log=QUIET, overrides=["sample.n=1"])
    return run


def copy_of(run, tmp_path, *leave_out: str):
    """A copy of the run without the named parts."""
    new = tmp_path / "run"
    shutil.copytree(run, new, ignore=shutil.ignore_patterns(*leave_out))
    return new


def fix_in(message: str, start: str) -> list[str]:
    """The arguments of the command in backquotes of `message` that starts with `start`, without `ddmkit`."""
    said = " ".join(message.split())
    command = next(part for part in said.split("`")[1::2] if part.startswith(start))
    return shlex.split(command)[1:]


def test_a_missing_expert_names_ddmkit_run_of_the_runs_own_config_json_and_that_command_trains_it(trained,
                                                                                                     tmp_path):
    """The fix named `ddmkit run CONFIG --out RUN`: which CONFIG? The TOML the run was made from is refused
    there when the run was made with --set; the run's own config.json is taken, and trains what is missing."""
    run = copy_of(trained, tmp_path, "expert_01")
    with pytest.raises(DDMError) as raised:
        sample_text(run, ["top-1"], n=1, log=QUIET)
    args = fix_in(str(raised.value), "ddmkit run ")
    assert args == ["run", str(run / "config.json"), "--out", str(run)], args
    code, err = cli(*args)
    assert code == 0, err
    assert (run / "experts/expert_01/model.safetensors").read_bytes() == \
        (trained / "experts/expert_01/model.safetensors").read_bytes()


def test_a_lost_partition_names_ddmkit_partition_of_the_runs_own_config_json_and_that_command_makes_it(
        trained, tmp_path):
    run = copy_of(trained, tmp_path, "partition")
    for command in (["sample", run], ["evaluate", run], ["train-router", run]):
        code, err = cli(*command)
        assert code == 2 and "CONFIG" not in err, err
        args = fix_in(err, "ddmkit partition ")
        assert args == ["partition", "--config", str(run / "config.json"), "--out", str(run)], args
    assert cli(*args)[0] == 0
    assert sample_text(run, ["top-1"], n=1, log=QUIET)


@pytest.mark.parametrize("command", [["sample"], ["evaluate"], ["analyze"], ["train-router"], ["launch"]])
@pytest.mark.parametrize("option", [["--set", "sample.n=2"], ["--config", "configs/text_ar.toml"]])
def test_set_on_a_trained_text_run_names_ddmkit_run_of_its_config_json_which_keeps_the_models(trained, tmp_path,
                                                                                               command, option):
    """`ddmkit sample RUN --set sample.n=2` said 'give --set to `ddmkit run TEXT_CONFIG` when making the run':
    too late, and TEXT_CONFIG unnamed. Now: the run's config.json, into the run (the models are kept)."""
    run = trained
    before = {p: p.read_bytes() for p in run.rglob("*.safetensors")}
    if command == ["analyze"] and option[0] == "--set":
        pytest.skip("analyze takes no --set")
    code, err = cli(*command, run, *option)
    assert code == 2 and f"{option[0]}: a trained text run keeps" in err, err
    args = fix_in(err, "ddmkit run ")
    assert args == ["run", str(run / "config.json"), "--out", str(run), "--set", "FIELD=VALUE"], args
    if command == ["sample"] and option[0] == "--set":  # the fix, as given, with the field asked
        fixed = copy_of(trained, tmp_path)
        code, err = cli(*[str(fixed) if a == str(run) else a for a in args[:-1]], "sample.n=2")
        assert code == 0, err
        assert {p.relative_to(fixed): p.read_bytes() for p in fixed.rglob("*.safetensors")} == \
            {p.relative_to(run): b for p, b in before.items()}
        assert load_text_config(fixed / "config.json").sample.n == 2


@pytest.mark.parametrize("section", ["model", "router"])
def test_a_width_that_heads_do_not_divide_names_the_section_and_a_width_that_loads(tmp_path, section):
    """router.heads = 3 with router.width = 16 was refused only when the run started, as "router: arch
    'causal_transformer': bad arguments {...}", naming neither field nor a value that works."""
    config = write_config(tmp_path, "text_ar")
    with pytest.raises(DDMError) as raised:
        load_text_config(config, [f"{section}.width=16", f"{section}.heads=3"])
    said = " ".join(str(raised.value).split())
    assert f"{section}: width (16) must be divisible by heads (3)" in said, said
    assert f"give {section}.width = 18 (--set {section}.width=18)" in said, said
    assert load_text_config(config, [f"{section}.width=18", f"{section}.heads=3"])
    code, err = cli("run", config, "--out", tmp_path / "run", "--set", f"{section}.heads=3", "--set",
                    f"{section}.width=16")
    assert code == 2 and f"{section}.width = 18" in err and not (tmp_path / "run").exists(), err


def test_the_pages_tiny_run_is_a_valid_tiny_config_of_both_kinds():
    """docs/discrete.md's quick try: its --set values load for text_ar, and with sample.steps for text_dfm."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "discrete.md").read_text()
    block = page[page.index("--out runs/text_tiny"):]
    block = block[:block.index("\n\n")].replace("\\\n", " ")
    sets = re.findall(r"--set (\S+)", block)
    assert "model.seq_len=32" in sets and "expert.train.steps=5" in sets, sets
    for name, extra in (("text_ar", []), ("text_dfm", ["sample.steps=4"])):
        cfg = load_text_config(root / "configs" / f"{name}.toml", sets + extra)
        assert cfg.model.width <= 16 and cfg.expert.train.steps <= 5 and cfg.router.train.steps <= 5
        assert cfg.corpus.max_docs <= 40 and cfg.sample.n == 1


@pytest.mark.parametrize("given, text", [("123", "123"), ("true", "true")])
def test_a_prompt_that_toml_reads_as_a_number_is_offered_back_as_text(tmp_path, given, text):
    """`--set sample.prompt=123` was told to give "" (the default): a fix that loads, but drops the prompt
    asked for. The value given, as text, is offered first, and the --set named loads with it."""
    config = write_config(tmp_path, "text_ar")
    with pytest.raises(DDMError) as raised:
        load_text_config(config, [f"sample.prompt={given}"])
    said = " ".join(str(raised.value).split())
    fix = f"--set 'sample.prompt=\"{text}\"'"
    assert f'give "{text}" (on the command line: {fix})' in said, said
    assert load_text_config(config, [shlex.split(fix)[1]]).sample.prompt == text


def test_a_run_without_a_centralized_model_names_the_new_run_that_has_one(tmp_path):
    """`--strategy monolith` on a run made with centralized.enabled = false said only that it has none; and
    `train-monolith` 'nothing to train'. Both now name the new run that has one, which samples it."""
    run = tmp_path / "run"
    run_text(write_config(tmp_path, "text_ar"), run, log=QUIET, overrides=["centralized.enabled=false",
                                                                          "sample.n=1"])
    for command in (["sample", run, "--strategy", "monolith"], ["train-monolith", run]):
        code, err = cli(*command)
        assert code == 2 and "centralized.enabled" in err, err
        args = fix_in(err, "ddmkit run ")
        assert args == ["run", str(run / "config.json"), "--out", "NEW_RUN", "--set", "centralized.enabled=true"]
    new = tmp_path / "new"
    assert cli(*[str(new) if a == "NEW_RUN" else a for a in args])[0] == 0
    assert sample_text(new, ["monolith"], n=1, log=QUIET)
