

def test_every_config_field_is_documented():
    """docs/config.md names every field of RunConfig (as `name` in a table or the text)."""
    from pathlib import Path

    from pydantic import BaseModel

    from ddmkit.config import RunConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()

    def leaves(model):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from leaves(ann)
            else:
                yield name

    missing = sorted({name for name in leaves(RunConfig) if f"`{name}`" not in doc and f"] {name}`" not in doc})
    assert not missing, f"docs/config.md does not document: {missing}"


def test_bad_compile_mode_names_the_field_and_the_accepted_values(tmp_path):
    import pytest

    from ddmkit.config import load_config
    from ddmkit.errors import DDMError

    path = tmp_path / "bad.toml"
    path.write_text('[expert.train]\ncompile_mode = "fast"\n')
    with pytest.raises(DDMError, match=r"expert\.train\.compile_mode.*'default', 'reduce-overhead' or 'max-autotune'"):
        load_config(path)


def test_a_setting_added_later_leaves_the_digest_of_older_runs_as_it_was():
    """A run's config.json written before train.parallel existed validates with its default, and keeps its
    digest (else every run, sweep cell and kept measurement made before would be trained or measured again)."""
    from ddmkit.config import RunConfig, json_digest, validate

    cfg = validate(RunConfig, {"partition": {"k": 3}})
    older = cfg.model_dump()
    for section in ("expert", "router", "latent"):
        older[section]["train"].pop("parallel")
    assert json_digest(older) == cfg.digest() == validate(RunConfig, older).digest()
    fsdp = validate(RunConfig, {"partition": {"k": 3}, "expert": {"train": {"parallel": "fsdp"}}})
    assert fsdp.digest() != cfg.digest()


def test_a_bad_train_device_names_the_accepted_devices_not_a_pattern():
    """`--set expert.train.device=gpu` printed pydantic's raw regex ("String should match pattern '^(auto|...")."""
    import pytest

    from ddmkit.config import RunConfig, validate
    from ddmkit.errors import DDMError

    with pytest.raises(DDMError) as info:
        validate(RunConfig, {"router": {"train": {"device": "gpu"}}})
    said = str(info.value)
    assert "router.train.device: 'gpu' is not a device; accepted: auto, cpu, cuda, cuda:N or mps" in said, said
    assert "pattern" not in said
    assert validate(RunConfig, {"expert": {"train": {"device": "cuda:3"}}}).expert.train.device == "cuda:3"


def test_text_is_not_read_as_a_number_or_a_boolean():
    """`balanced = "yes"` was read as true and `k = "4"` as 4 (pydantic's lax mode); a value is what was written,
    and the message names the field (it named its section: 'partition: k = '4' is text')."""
    import re

    import pytest

    from ddmkit.config import RunConfig, validate
    from ddmkit.errors import DDMError

    for section, words in (({"balanced": "yes"}, '  partition.balanced: "yes" is text, and this field takes true or '
                                                 "false: give false (on the command line: "
                                                 "--set partition.balanced=false)"),
                           ({"k": "4"}, '  partition.k: "4" is text, and this field takes a whole number: give 4, '
                                        "without quotes (on the command line: --set partition.k=4)"),
                           ({"pca_dim": "8"}, '  partition.pca_dim: "8" is text, and this field takes a whole number: '
                                              "give 8, without quotes")):
        with pytest.raises(DDMError, match=re.escape(words)):
            validate(RunConfig, {"partition": section})
    assert validate(RunConfig, {"partition": {"k": 4, "balanced": True, "features": "pca"}}).partition.k == 4


def test_a_number_is_not_read_as_a_boolean():
    """`cuda_graph = 1` was read as true and `concurrent = 0.0` as false (pydantic's lax mode), and
    `cuda_graph = 2` refused as 'unable to interpret input', without saying what to give."""
    import pytest

    from ddmkit.config import RunConfig, validate
    from ddmkit.errors import DDMError

    for value in (1, 0.0, 2):
        with pytest.raises(DDMError, match=f"  expert.train.cuda_graph: {value} is a number, and this field takes "
                                           "true or false: give false"):
            validate(RunConfig, {"expert": {"train": {"cuda_graph": value}}})
    with pytest.raises(DDMError, match="  expert.concurrent: 0 is a number, and this field takes true or false"):
        validate(RunConfig, {"expert": {"concurrent": 0}})
    assert validate(RunConfig, {"expert": {"train": {"cuda_graph": True, "steps": 3}}}).expert.train.cuda_graph


def test_a_table_given_in_part_keeps_the_defaults_the_section_documents():
    """`[router.net]` with kwargs only was an mlp (NetConfig's own arch), and `[latent.train]` with steps only
    lost the autoencoder's batch 64 and lr 1e-3, while --set of the same keys kept them."""
    from ddmkit.config import LatentConfig, RouterConfig, RunConfig, TrainConfig, validate
    from ddmkit.discrete.config import TextRouterConfig

    router = validate(RunConfig, {"router": {"net": {"kwargs": {"width": 64}}}}).router.net
    assert (router.arch, router.kwargs) == ("router_mlp", {"width": 64, "depth": 2})
    named = validate(RunConfig, {"router": {"net": {"arch": "router_mlp", "kwargs": {"width": 64}}}}).router.net
    assert named.kwargs == {"width": 64}  # a table naming its arch: its kwargs as given (the class's defaults), as before
    other = validate(RunConfig, {"router": {"net": {"arch": "router_cnn", "kwargs": {"channels": [8]}}}}).router.net
    assert other.kwargs == {"channels": [8]}
    expert = validate(RunConfig, {"expert": {"net": {"kwargs": {"depth": 1}}}}).expert.net  # mlp, read as before
    assert (expert.arch, expert.kwargs) == ("mlp", {"depth": 1})
    latent = validate(RunConfig, {"latent": {"train": {"steps": 2}}}).latent.train
    assert latent == LatentConfig().train.model_copy(update={"steps": 2}) and latent.batch_size == 64
    assert RouterConfig(train={"steps": 3}).train == TrainConfig(steps=3)  # a plain default: unchanged
    text = TextRouterConfig(train={"steps": 5}).train
    assert text == TextRouterConfig().train.model_copy(update={"steps": 5}) and text.weight_decay == 0.01


def test_one_value_for_a_list_or_a_table_says_what_to_give():
    """`--set router.kinds=bayes` said only 'Input should be a valid list' (and `--set evaluate=3` 'Input should be
    a valid dictionary or instance of EvalConfig'), not how to give a list on the command line."""
    import pytest

    from ddmkit.config import RunConfig, apply_overrides, validate
    from ddmkit.discrete.config import TextRunConfig
    from ddmkit.errors import DDMError

    text = {"kind": "text_ar"}
    with pytest.raises(DDMError, match=r"router\.kinds: 'bayes' is one value, and this field is a list: give "
                                       r"\[\"bayes\"\] \(on the command line: --set 'router\.kinds=\[\"bayes\"\]'\)"):
        validate(TextRunConfig, apply_overrides(text, ["router.kinds=bayes"]), "text.toml with --set")
    assert validate(TextRunConfig, apply_overrides(text, ['router.kinds=["bayes"]']), "--set").router.kinds == ["bayes"]
    with pytest.raises(DDMError, match=r"evaluate: 3 is one value, and this is a table of fields: set one of them "
                                       r"\(evaluate\.FIELD = VALUE\)"):
        validate(RunConfig, apply_overrides({}, ["evaluate=3"]), "demo with --set")


def test_a_number_where_a_list_of_texts_goes_is_told_a_form_that_works():
    """`sample.strategies = 3` was told to give [3], which then failed as 'Input should be a valid string'. The
    number quoted is suggested where the field takes it, else an item of the field's default, and the form
    suggested on the command line validates."""
    import re

    import pytest
    from pydantic import BaseModel

    from ddmkit.config import RunConfig, apply_overrides, validate
    from ddmkit.discrete.config import TextRunConfig
    from ddmkit.errors import DDMError

    for model, raw, item, field in ((RunConfig, {}, "sample.strategies=3", "sample.strategies"),
                                    (RunConfig, {}, "sample.strategies=2.5", "sample.strategies"),
                                    (TextRunConfig, {"kind": "text_ar"}, "router.kinds=3", "router.kinds")):
        with pytest.raises(DDMError) as err:
            validate(model, apply_overrides(raw, [item]), "--set")
        said = str(err.value)
        assert f"{field}: {item.split('=')[1]} is one value, and this field is a list of texts, each in quotes" in said
        assert "[3]" not in said and "[2.5]" not in said, said
        suggested = re.search(r"--set '([^']+)'", said).group(1)
        validate(model, apply_overrides(raw, [suggested]), "--set")  # the form it suggests works

    class Names(BaseModel):
        names: list[str] = []

    with pytest.raises(DDMError, match=r"names: 3 is one value, and this field is a list of texts, each in quotes: "
                                       r"give \[\"3\"\] \(on the command line: --set 'names=\[\"3\"\]'\)"):
        validate(Names, {"names": 3}, "--set")
    assert validate(Names, {"names": ["3"]}, "--set").names == ["3"]
    with pytest.raises(DDMError, match=r"sample\.strategies: 3 is .* \"3\" would not do: unknown routing strategy"):
        validate(RunConfig, {"sample": {"strategies": 3}}, "run.toml")


def test_a_number_inside_a_list_of_texts_names_the_field_and_a_form_that_works():
    """`--set 'sample.strategies=[3]'` was pydantic's bare 'sample.strategies.0: Input should be a valid string'; it
    names the field once, whatever the numbers in the list, with an example that the config takes."""
    import re

    import pytest
    from pydantic import BaseModel

    from ddmkit.config import RunConfig, apply_overrides, validate
    from ddmkit.errors import DDMError

    for item, field, head in (("sample.strategies=[3]", "sample.strategies", "3 in [3] is not text"),
                              ('sample.strategies=["top-2", 3, 4]', "sample.strategies",
                               '3 and 4 in ["top-2", 3, 4] are not text'),
                              ("sample.stats_router_strategies=[2.5]", "sample.stats_router_strategies",
                               "2.5 in [2.5] is not text")):
        with pytest.raises(DDMError) as err:
            validate(RunConfig, apply_overrides({}, [item]), "--set")
        lines = str(err.value).splitlines()[1:]
        assert len(lines) == 1 and lines[0].startswith(f"  {field}: {head}, and this field is a list of texts, each "
                                                       f"in quotes, e.g. [\"top-2\", \"full\"]"), lines
        validate(RunConfig, apply_overrides({}, [re.search(r"--set '([^']+)'", lines[0]).group(1)]), "--set")

    class Names(BaseModel):
        names: list[str] = []

    with pytest.raises(DDMError, match=re.escape("names: 3 in [\"a\", 3] is not text, and this field is a list of "
                                                 "texts, each in quotes: give [\"a\", \"3\"] (on the command line: "
                                                 "--set 'names=[\"a\", \"3\"]')")):
        validate(Names, {"names": ["a", 3]}, "--set")


def test_every_list_of_texts_field_given_a_number_is_told_a_set_that_parses():
    """A number given to any list-of-texts field of a run's config (vector or text) is told a --set that parses:
    sample.stats_router_strategies, empty by default, was told the placeholder ["NAME"]."""
    import re

    import pytest
    from pydantic import BaseModel

    from ddmkit.config import RunConfig, apply_overrides, validate
    from ddmkit.config_messages import _of_texts
    from ddmkit.discrete.config import TextRunConfig
    from ddmkit.errors import DDMError

    def texts_fields(model, prefix=""):
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                yield from texts_fields(f.annotation, f"{prefix}{name}.")
            elif _of_texts(f.annotation):
                yield f"{prefix}{name}"

    checked = []
    for model, raw in ((RunConfig, {}), (TextRunConfig, {"kind": "text_ar"}), (TextRunConfig, {"kind": "text_dfm"})):
        for field in texts_fields(model):  # text_dfm: router.kinds was told ["bayes"], which it refuses
            with pytest.raises(DDMError) as err:
                validate(model, apply_overrides(raw, [f"{field}=3"]), "--set")
            said = str(err.value)
            suggested = re.search(rf"--set '({re.escape(field)}=[^']+)'", said).group(1)
            assert "NAME" not in suggested, said
            validate(model, apply_overrides(raw, [suggested]), "--set")  # the form it suggests works
            checked.append(field)
    assert "sample.stats_router_strategies" in checked and "router.kinds" in checked, checked


def test_text_dfm_router_kinds_given_a_number_is_told_a_kind_that_config_takes():
    """`--set router.kinds=3` on a text_dfm config was told ["bayes"] (the field's default's first item), which
    that config then refused; it is told ["learned"], also while another router field is bad (which skips the
    section's own check)."""
    import pytest

    from ddmkit.config import apply_overrides, validate
    from ddmkit.discrete.config import TextRunConfig
    from ddmkit.errors import DDMError

    for extra in ([], ["router.width=2"]):
        with pytest.raises(DDMError) as err:
            validate(TextRunConfig, apply_overrides({"kind": "text_dfm"}, ["router.kinds=3", *extra]), "--set")
        assert """e.g. ["learned"] (on the command line: --set 'router.kinds=["learned"]')""" in str(err.value)
    with pytest.raises(DDMError, match=r"e\.g\. \[\"bayes\"\]"):  # text_ar takes both: its default's first
        validate(TextRunConfig, apply_overrides({"kind": "text_ar"}, ["router.kinds=3"]), "--set")


def test_one_value_for_data_params_says_it_is_a_table_of_the_data_sets_parameters(tmp_path):
    """`data.params = 3` said only 'Input should be a valid dictionary'. It says what the table holds and how to
    write one, in the TOML and with --set, and both forms it names are read."""
    import pytest

    from ddmkit.config import RunConfig, apply_overrides, load_config, validate
    from ddmkit.errors import DDMError

    path = tmp_path / "run.toml"
    path.write_text("[data]\nname = \"ring8\"\nparams = 3\n")
    with pytest.raises(DDMError) as err:
        load_config(path)
    said = str(err.value)
    assert "data.params: 3 is one value, and this is a table of the data set's parameters (the keywords of its " \
           "preset or loader, e.g. radius for ring8): write each as NAME = VALUE under [data.params] in the TOML, " \
           "or --set data.params.NAME=VALUE on the command line" in said and "valid dictionary" not in said, said
    with pytest.raises(DDMError, match=r"expert\.net\.kwargs: \[1\] is a list, and this is a table of the network's "
                                       r"keyword arguments .*--set expert\.net\.kwargs\.NAME=VALUE"):
        validate(RunConfig, apply_overrides({}, ["expert.net.kwargs=[1]"]), "--set")
    path.write_text("[data]\nname = \"ring8\"\n\n[data.params]\nradius = 3.0\n")
    assert load_config(path).data.params == {"radius": 3.0}
    assert validate(RunConfig, apply_overrides({}, ["data.params.radius=3.0"]), "--set").data.params == {"radius": 3.0}


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Some Windows editors start a UTF-8 file with a byte-order mark: tomllib refused it with 'Invalid statement
    (at line 1, column 1)', which names nothing the user wrote; a text config's kind was not seen."""
    from ddmkit.config import load_config
    from ddmkit.discrete.config import is_text_config

    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[sample]\nn = 5\n")
    assert load_config(path).sample.n == 5
    path.write_bytes(b'\xef\xbb\xbfkind = "text_ar"\n')
    assert is_text_config(path)


def test_a_section_written_as_a_list_of_tables_says_to_write_one_table(tmp_path):
    """`[[sample]]` (TOML's list of tables) was refused as "[{'n': 3}] is one value, and this is a table of fields"."""
    import pytest

    from ddmkit.config import load_config
    from ddmkit.errors import DDMError

    path = tmp_path / "run.toml"
    path.write_text("[[sample]]\nn = 3\n\n[[expert.train]]\nsteps = 3\n")
    with pytest.raises(DDMError) as err:
        load_config(path)
    assert "sample: written as a list of tables ([[sample]]); a section is one table: write [sample]" in str(err.value)
    assert "expert.train: written as a list of tables ([[expert.train]]); a section is one table: write " \
           "[expert.train]" in str(err.value)


def test_every_default_in_config_md_is_the_configs():
    """Each row `| `field` | default | ...` of docs/config.md's tables whose default is a TOML value (`"ring8"`, 8,
    2e-3, null, [32, 64, 64]) gives that field's default in RunConfig(); a row `[expert.path] kind` names its table."""
    import re
    import tomllib
    from pathlib import Path

    from ddmkit.config import RunConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    tables, checked, wrong = [], 0, []
    for line in doc.splitlines():
        if heading := re.match(r"^## `\[(\w+)\]`", line):
            tables = [heading.group(1)]
        elif re.match(r"^`\[\w+\.\w+\]`( / `\[\w+\.\w+\]`)*:$", line):  # `[expert.train]` / `[router.train]`:
            tables = re.findall(r"\[([\w.]+)\]", line)
        row = re.match(r"^\| `(?:\[([\w.]+)\] )?(\w+)` \| (.*?) \|", line)
        if not row:
            continue
        table, name, default = row.groups()
        text = default.replace("`", "")
        try:
            value = None if text == "null" else tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            continue  # a default in words (sample.strategies, latent.train)
        for where in [table] if table else tables:
            field = RunConfig()
            for key in [*where.split("."), name]:
                field = getattr(field, key)
            checked += 1
            if field != value or type(field) is not type(value) and value is not None:
                wrong.append(f"{where}.{name}: docs {text}, config {field!r}")
    assert not wrong, f"docs/config.md gives other defaults than the config: {wrong}"
    assert checked >= 80, checked


def test_a_field_written_in_another_section_is_told_where_it_goes():
    """expert.steps, sample.chunk, partition.K were 'unknown field (check the spelling ...)', naming no field; the
    field of that name below the section, or in another section, is named, and the first one named works."""
    import pytest

    from ddmkit.config import RunConfig, apply_overrides, validate
    from ddmkit.errors import DDMError

    for given, meant in [("expert.steps", "'expert.train.steps' or 'expert.path.steps'"),
                         ("expert.lr", "'expert.train.lr'"), ("sample.chunk", "'evaluate.chunk'"),
                         ("partition.K", "'partition.k'")]:
        with pytest.raises(DDMError) as refused:
            validate(RunConfig, apply_overrides({}, [f"{given}=10"]))
        assert f"  {given}: unknown field here; did you mean {meant}?" in str(refused.value).splitlines()
        validate(RunConfig, apply_overrides({}, [f"{meant.split(chr(39))[1]}=10"]))
    with pytest.raises(DDMError, match=r"  train: unknown field here; did you mean 'expert.train', 'router.train' or "
                                       r"'latent.train'\?"):
        validate(RunConfig, {"train": {"steps": 10}})
    with pytest.raises(DDMError, match=r"sample.n_samples: unknown field \(check the spelling"):
        validate(RunConfig, {"sample": {"n_samples": 5}})  # no field of that name anywhere
    with pytest.raises(DDMError, match=r"expert.train.stepz: unknown field; did you mean 'steps'\?"):
        validate(RunConfig, {"expert": {"train": {"stepz": 5}}})  # a misspelt name of the section, as before


def test_a_network_argument_written_outside_kwargs_is_told_its_kwargs_path():
    """`--set expert.net.width=64` (or `width = 64` under [expert.net]) was 'unknown field (check the spelling
    ...)', naming no field; the key of that name in the section's free-form table is named, and works. Close
    names of the section (kwarg, arc) are suggested as before."""
    import pytest

    from ddmkit.config import RunConfig, apply_overrides, validate
    from ddmkit.errors import DDMError

    width = "expert.net.kwargs.width"
    for given, raw, meant in [("expert.net.width", apply_overrides({}, ["expert.net.width=64"]), width),
                              ("expert.net.width", {"expert": {"net": {"arch": "mlp", "width": 64}}}, width),  # TOML
                              ("router.net.depth", {"router": {"net": {"depth": 3}}}, "router.net.kwargs.depth"),
                              ("data.radius", {"data": {"radius": 2.0}}, "data.params.radius")]:
        with pytest.raises(DDMError) as refused:
            validate(RunConfig, raw)
        assert f"  {given}: unknown field here; did you mean {meant!r}?" in str(refused.value).splitlines(), refused
        validate(RunConfig, apply_overrides({}, [f"{meant}=3"]))
    with pytest.raises(DDMError, match=r"  expert.net.steps: unknown field here; did you mean 'expert.train.steps', "
                                       r".* or 'expert.net.kwargs.steps'\?"):  # the fields of that name first
        validate(RunConfig, apply_overrides({}, ["expert.net.steps=3"]))
    for close, meant in (("kwarg", "kwargs"), ("arc", "arch")):
        with pytest.raises(DDMError, match=rf"expert.net.{close}: unknown field; did you mean '{meant}'\?"):
            validate(RunConfig, apply_overrides({}, [f"expert.net.{close}=3"]))


def test_a_config_file_that_does_not_exist_is_named_with_a_fix(tmp_path, monkeypatch):
    """`ddmkit run nosuch.toml` said only 'config file nosuch.toml does not exist': it names where a relative path
    is read from and the built-in names (a text config's reader, the TOML path alone)."""
    import pytest

    from ddmkit.config import load_config, read_toml
    from ddmkit.errors import DDMError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DDMError, match=rf"config file nosuch.toml does not exist; give a TOML file's path \(a "
                                       rf"relative one is read from {tmp_path}, .*\), or a built-in name: demo$"):
        load_config("nosuch.toml")
    with pytest.raises(DDMError, match=rf"config file nosuch.toml does not exist; give a TOML file's path \(a "
                                       rf"relative one is read from {tmp_path}, [^)]*\)$"):
        read_toml("nosuch.toml")


def test_a_value_of_its_kind_that_a_field_refuses_is_told_a_value_that_works():
    """`--set expert.train.lr=nan` said only 'Input should be a finite number', `--set sample.solver=bogus` only
    the choices: each pydantic check of a value of the field's kind (finite, bounds, choices, lengths) names a
    value the config takes, as --set, found from the field (its default, else a bound or a choice)."""
    import re

    import pytest

    from ddmkit.config import RunConfig, TrainConfig, apply_overrides, validate
    from ddmkit.discrete.config import TextRunConfig
    from ddmkit.errors import DDMError

    lr = TrainConfig.model_fields["lr"].default
    cases = [("expert.train.lr=nan", f"expert.train.lr: Input should be a finite number: give {lr} (on the command "
                                     f"line: --set expert.train.lr={lr})"),
             ("sample.solver=bogus", "sample.solver: Input should be 'euler', 'heun', 'midpoint', 'rk4' or "
                                     "'adaptive': give \"euler\" (on the command line: --set sample.solver=euler)"),
             ("data.seed=-1", "data.seed: Input should be greater than or equal to 0: give 0 (on the command line: "
                              "--set data.seed=0)"),
             ("latent.widths=[]", "latent.widths: List should have at least 1 item after validation, not 0: give "
                                  "[32, 64, 64] (on the command line: --set 'latent.widths=[32, 64, 64]')")]
    for item, said in cases:
        with pytest.raises(DDMError) as refused:
            validate(RunConfig, apply_overrides({}, [item]), "--set")
        assert str(refused.value) == f"--set: invalid configuration\n  {said}", str(refused.value)
        fix = re.search(r"--set '?([^')]+)'?\)$", said).group(1)
        validate(RunConfig, apply_overrides({}, [fix]), "--set")  # the value told is taken
    with pytest.raises(DDMError, match=r"^--set: invalid configuration\n  router\.kinds: \"x\" in \[\"bayes\", \"x\", "
                                       r"\"y\"\]: each item should be 'bayes' or 'learned': give \[\"bayes\", "
                                       r"\"learned\"\] \(on the command line: --set 'router\.kinds=\[\"bayes\", "
                                       r"\"learned\"\]'\)$"):  # one line for the list, not one per item
        validate(TextRunConfig, apply_overrides({"kind": "text_ar"}, ['router.kinds=["bayes", "x", "y"]']), "--set")


def test_an_empty_value_for_a_field_whose_default_is_none_is_told_to_leave_it_out():
    """`--set 'latent.pretrained=""'` said only 'String should have at least 1 character': no value written in a
    TOML or --set gives the field's default (none, no folder) back, so the fix is to leave the field out."""
    import pytest

    from ddmkit.config import RunConfig, apply_overrides, validate
    from ddmkit.errors import DDMError

    with pytest.raises(DDMError) as refused:
        validate(RunConfig, apply_overrides({}, ['latent.pretrained=""']), "--set")
    assert str(refused.value) == ("--set: invalid configuration\n  latent.pretrained: String should have at least 1 "
                                  "character: leave latent.pretrained out of the TOML and of --set (its default is "
                                  "none)"), str(refused.value)
    assert validate(RunConfig, {}, "--set").latent.pretrained is None  # left out: the default


def test_an_encoder_size_out_of_range_names_the_encoders_own_size_not_1(tmp_path, ddmkit):
    """--set partition.encoder_size=0 was told "give 1", which then failed the encoder's patch-size check: the
    side that works depends on the encoder folder, so the message names it (and no value of its own)."""
    from ddmkit.config import RunConfig, apply_overrides, validate

    for given in ("0", "-3", "16385"):
        code, _, err = ddmkit("partition", "--config", "demo", "--out", tmp_path / "r", "--set",
                              f"partition.encoder_size={given}")
        assert code == 2 and f"partition.encoder_size: {given} is out of 1 .. 16384; give the side the encoder " \
            "folder was trained on" in err and "give 1" not in err, err
        assert not (tmp_path / "r").exists()
    for taken in (1, 224, 16_384):
        assert validate(RunConfig, apply_overrides({}, [f"partition.encoder_size={taken}"]), "--set") \
            .partition.encoder_size == taken
