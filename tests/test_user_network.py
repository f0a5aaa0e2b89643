"""The user's own network classes, named in the config as "package.module:Class": trained, saved,
loaded and sampled like the built-ins; imported only from the config the user runs, never because
a run folder names them; a class whose output has the wrong shape is refused before training."""
import json
import re
import shutil
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch

from ddmkit.cli import main
from ddmkit.errors import DDMError
from ddmkit.nets import build_seeded, from_pretrained, save_pretrained, use_network
from ddmkit.pipeline.prepare import trained_sha256
import ddmkit.nets.user as user

from conftest import HAS_RAY, run_cli


NETS = '''
import math

import torch
from torch import nn


class Velocity(nn.Module):
    def __init__(self, data_shape, width=16):
        super().__init__()
        dim = math.prod(data_shape)
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, dim + EXTRA))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x.flatten(1), t[:, None]], dim=1)).reshape(len(x), -1)


class Router(nn.Module):
    def __init__(self, data_shape, num_experts, width=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(math.prod(data_shape) + 1, width), nn.SiLU(),
                                 nn.Linear(width, num_experts))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x.flatten(1), t[:, None]], dim=1))
'''

CONFIG = """
[data]
name = "ring8"
n_train = 400
n_test = 200

[partition]
k = 2

[expert.net]
arch = "{module}:Velocity"
kwargs = {{ width = 16 }}

[expert.train]
steps = 20
batch_size = 32
log_every = 10

[router.net]
arch = "{module}:Router"

[router.train]
steps = 20
batch_size = 32
log_every = 10

[monolith]
enabled = false

[sample]
n = 100
steps = 4
strategies = ["top-1", "full"]

[evaluate]
chunk = 50
missing_experts = false
stats_router = false
"""


def write_nets(folder: Path, module: str, extra: int = 0) -> Path:
    """A module of the user's networks (extra > 0: the velocity has `extra` columns too many) and a
    config naming them; returns the config."""
    (folder / f"{module}.py").write_text(NETS.replace("EXTRA", str(extra)))
    config = folder / f"{module}.toml"
    config.write_text(CONFIG.format(module=module))
    return config


def ddmkit(monkeypatch, capsys, *args, path: Path) -> tuple[int, str]:
    """`ddmkit ARGS` in this process as in a new one that finds the user's code on its path: no network
    class registered yet; returns (exit code, stderr on one line, when capsys is given)."""
    monkeypatch.setattr(user, "_USER", {})
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.setattr(sys, "argv", ["ddmkit", *map(str, args)])
    if capsys:
        capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main()
    return exit.value.code, " ".join(capsys.readouterr().err.split()) if capsys else ""


@pytest.fixture
def here(monkeypatch, capsys):
    return lambda *args, path: ddmkit(monkeypatch, capsys, *args, path=path)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """(folder of the user's code, config, run folder) of a finished `ddmkit run`."""
    home = tmp_path_factory.mktemp("user")
    config = write_nets(home, "my_nets")
    with pytest.MonkeyPatch.context() as monkeypatch:
        code, _ = ddmkit(monkeypatch, None, "run", config, "--out", home / "run", path=home)
    assert code == 0
    return home, config, home / "run"


def test_a_run_with_the_users_networks_finishes_and_records_their_names(user_run):
    home, config, run = user_run
    assert (run / "report.md").exists() and (run / "metrics.json").exists()
    assert json.loads((run / "experts" / "expert_01" / "config.json").read_text())["arch"] == "my_nets:Velocity"
    assert json.loads((run / "router" / "config.json").read_text())["arch"] == "my_nets:Router"


def test_sampling_needs_the_config_that_names_the_classes(user_run, here):
    home, config, run = user_run
    assert here("sample", run, "--strategy", "top-1", "--n", "20", "--config", config, path=home)[0] == 0
    code, message = here("sample", run, "--strategy", "top-1", "--n", "10", path=home)
    message = " ".join(message.split())  # both classes at once (it named the expert's, then, once given, the router's)
    assert "replaces the set drawn before" not in message, message  # it was said, and the set kept
    assert code == 2 and "the network classes 'my_nets:Velocity' (expert.net.arch) and 'my_nets:Router' " \
        "(router.net.arch) are not registered" in message, message
    assert "--config CONFIG" in message and "ddmkit.nets.use_network(NAME) for each" in message
    assert "--set expert.net.arch=my_nets:Velocity --set router.net.arch=my_nets:Router" in message
    code, message = here("sample", run, "--strategy", "top-1", "--n", "20", "--set", "expert.net.arch=my_nets:Velocity",
                         path=home)  # the router's class: its own field (the message named expert.net.arch)
    assert code == 2 and "--set router.net.arch=my_nets:Router;" in " ".join(message.split()), message
    assert here("sample", run, "--strategy", "top-1", "--n", "20", "--set", "expert.net.arch=my_nets:Velocity",
                "--set", "router.net.arch=my_nets:Router", path=home)[0] == 0  # named on the command line


def test_register_takes_the_config_that_names_the_classes(user_run, here, tmp_path):
    """register loads the networks and took no --config: a run of the user's classes could not be registered."""
    home, config, run = user_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "registry.json").unlink()
    code, message = here("register", copy, path=home)
    assert code == 2 and "is not registered in this process" in message and "--config CONFIG" in message, message
    assert not (copy / "registry.json").exists()
    assert here("register", copy, "--config", config, path=home)[0] == 0 and (copy / "registry.json").exists()


def test_a_run_folder_naming_a_class_never_imports_it(user_run, here, tmp_path):
    """A module with a side effect on import, named by a model folder's config.json and by the run's own
    config.json: sampling and training the router refuse (exit 2) and the module is never imported."""
    home, config, run = user_run
    marker = tmp_path / "imported"
    (tmp_path / "probe_nets.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("imported")
        from my_nets import Router, Velocity
    """))
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "registry.json").unlink()
    expert = copy / "experts" / "expert_00" / "config.json"
    expert.write_text(expert.read_text().replace("my_nets:Velocity", "probe_nets:Velocity"))
    code, message = here("sample", copy, "--strategy", "top-1", "--n", "20", "--config", config, path=home)
    assert code == 2 and "'probe_nets:Velocity' is not registered" in message

    run_config = copy / "config.json"
    run_config.write_text(run_config.read_text().replace("my_nets:Router", "probe_nets:Router"))
    recorded = json.loads(run_config.read_text())  # as a run made with that router records it (not an edit)
    run_config.write_text(json.dumps({**recorded, "trained_sha256": trained_sha256(recorded["config"])}))
    shutil.rmtree(copy / "router")
    code, message = here("train-router", copy, path=tmp_path)
    assert code == 2 and "'probe_nets:Router' is not registered" in message
    assert not marker.exists() and "probe_nets" not in sys.modules


@pytest.mark.parametrize("extra, where", [(1, r"expert.net.arch = 'bad_nets_1:Velocity'.*returned \(2, 3\)"),
                                          (0, r"router.net.arch = 'bad_nets_0:Router'.*returned \(2, 3\)")])
def test_a_wrong_output_shape_is_refused_before_training(tmp_path, here, extra, where):
    config = write_nets(tmp_path, f"bad_nets_{extra}", extra)
    if not extra:  # a router of 3 logits for 2 clusters
        nets = tmp_path / "bad_nets_0.py"
        nets.write_text(nets.read_text().replace("nn.Linear(width, num_experts)", "nn.Linear(width, num_experts + 1)"))
    code, message = here("run", config, "--out", tmp_path / "run", path=tmp_path)
    assert code == 2 and re.search(where, message), message
    assert not (tmp_path / "run").exists()


# ----- in this process ---------------------------------------------------------------------------------
class Doubler(torch.nn.Module):
    """x -> 2 x W: a velocity network of one linear map."""

    def __init__(self, data_shape, width=4):
        super().__init__()
        self.lin = torch.nn.Linear(data_shape[0], data_shape[0])

    def forward(self, x, t, y=None):
        return 2 * self.lin(x)


def test_a_registered_class_round_trips_through_a_model_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(user, "_USER", {})
    name = use_network(Doubler)
    model = build_seeded(user.class_name(Doubler), 3, data_shape=[2])
    save_pretrained(tmp_path / "m", model, {"arch": user.class_name(Doubler), "kwargs": {"data_shape": [2]}})
    loaded, cfg = from_pretrained(tmp_path / "m")
    x, t = torch.randn(5, 2), torch.rand(5)
    assert isinstance(loaded, name) and torch.equal(loaded(x, t), model(x, t))

    monkeypatch.setattr(user, "_USER", {})  # another process, that did not register it
    with pytest.raises(DDMError, match=re.escape(f"use_network({user.class_name(Doubler)!r})")):
        from_pretrained(tmp_path / "m")


class Widened(Doubler):
    """Doubler's weights, but a forward that takes one more column than the data (its code changed since)."""

    def forward(self, x, t, y=None):
        return self.lin(torch.cat([x, t[:, None]], 1))


class Narrowed(Doubler):
    """Doubler's weights, but a forward that returns one column (its code changed since)."""

    def forward(self, x, t, y=None):
        return self.lin(x)[:, :1]


class Deepened(Doubler):
    """Doubler with one more layer: other tensors than the folder's."""

    def __init__(self, data_shape, width=4):
        super().__init__(data_shape, width)
        self.extra = torch.nn.Linear(2, 2)


@pytest.mark.parametrize("changed, message", [
    (Widened, r"the network class '.*:Doubler' raised RuntimeError \(mat1 and mat2 shapes cannot be multiplied.*\) on "
              r"x of shape \(2, 2\) \(its data_shape \[2\]\) and t of shape \(2,\); the class is not as it was"),
    (Narrowed, r"the network class '.*:Doubler' returned \(2, 1\) for x of shape \(2, 2\); expected \(2, 2\); the "
               r"class is not as it was when .* was trained"),
    (Deepened, r"config.json was edited .* or the class '.*:Doubler' has changed since they were trained")])
def test_a_class_changed_since_its_folder_was_trained_is_named_as_it_loads(tmp_path, monkeypatch, changed, message):
    """A run's user network whose code changed after training: a forward that raises on the data shape it is given
    was torch's error from inside the sampler (a traceback), an output of another shape "expert 0 returned (B, 1)",
    and other tensors "config.json was edited or the weights are another network's" alone. As it was, it loads."""
    from ddmkit.registry import load_model

    monkeypatch.setattr(user, "_USER", {})
    name = user.class_name(Doubler)
    use_network(Doubler)
    model = build_seeded(name, 3, data_shape=[2])
    save_pretrained(tmp_path / "m", model, {"arch": name, "kwargs": {"data_shape": [2]}})
    use_network(name, changed)  # the same name, its code changed
    with pytest.raises(DDMError, match=message):
        load_model(tmp_path / "m")
    use_network(name, Doubler)  # as it was: loads, in eval mode
    model, _ = load_model(tmp_path / "m")
    assert not model.training


class NoTime(torch.nn.Module):
    """A forward that takes no t."""

    def __init__(self, data_shape):
        super().__init__()
        self.lin = torch.nn.Linear(data_shape[0], data_shape[0])

    def forward(self, x):
        return self.lin(x)


class Weightless(torch.nn.Module):
    """No trainable parameter."""

    def __init__(self, data_shape):
        super().__init__()

    def forward(self, x, t, y=None):
        return x


@pytest.mark.parametrize("cls, said", [
    (NoTime, "forward(x, t) raised TypeError"), (Weightless, "builds a network with no trainable parameters")])
def test_a_user_network_that_fails_its_checks_is_pointed_to_the_page_on_own_networks(monkeypatch, cls, said):
    """The messages pointed to ddmkit.nets.user (a module's docstring) or docs/config.md (the built-in networks'
    widths and depths) rather than the section on your own network."""
    from ddmkit.config import RunConfig
    from ddmkit.pipeline.stages import check_networks

    monkeypatch.setattr(user, "_USER", {})
    use_network(f"custom:{cls.__name__}", cls)
    cfg = RunConfig.model_validate({"expert": {"net": {"arch": f"custom:{cls.__name__}", "kwargs": {}}}})
    with pytest.raises(DDMError, match=re.escape(said)) as error:
        check_networks(cfg, (2,))
    message = str(error.value)
    assert "docs/own-data.md#your-network" in message and "ddmkit.nets.user" not in message \
        and "docs/config.md" not in message, message


@pytest.mark.parametrize("value, said", [(3, "is an int,"), ("x", "is a str,"), (dict, "is a class,"),
                                         (len, "is a builtin_function_or_method,")])
def test_what_is_not_a_module_class_is_named_in_plain_words(monkeypatch, value, said):
    """'mynets:WIDTH' is a int, not a torch.nn.Module subclass'."""
    monkeypatch.setattr(user, "_USER", {})
    with pytest.raises(DDMError, match=re.escape(f"'custom:X' {said} not a torch.nn.Module subclass; name your "
                                                 "network's class (docs/own-data.md#your-network)")):
        use_network("custom:X", value)


def test_use_network_refuses_what_is_not_a_module_class(monkeypatch):
    monkeypatch.setattr(user, "_USER", {})
    with pytest.raises(DDMError, match="not a torch.nn.Module subclass"):
        use_network("tests.test_user_network:write_nets")
    with pytest.raises(DDMError, match="cannot import"):
        use_network("tests.no_such_module:Net")
    assert user.user_networks() == ()


def test_an_import_failure_says_which_part_failed(tmp_path, monkeypatch):
    """Every failure said "install the package that defines it (or put its folder on PYTHONPATH), or fix the
    name": also for a module that was found but failed as it loaded, or a class name with a typo."""
    from ddmkit.user_code import import_named

    (tmp_path / "broken_nets.py").write_text("import no_such_dependency_of_it\n")
    (tmp_path / "typo_nets.py").write_text("class Velocity:\n    pass\n")
    (tmp_path / "syntax_nets.py").write_text("class A\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    field = "expert.net.arch"
    with pytest.raises(DDMError, match=r"there is no module 'no_such_nets'; put the folder that holds it on PYTHONPATH"):
        import_named("no_such_nets:Velocity", field)
    with pytest.raises(DDMError, match=rf"the module 'broken_nets' was found but failed as it loaded \(ModuleNotFound"
                                       rf"Error: No module named 'no_such_dependency_of_it' at "
                                       rf"{re.escape(str(tmp_path / 'broken_nets.py'))}:1\); fix the module$"):
        import_named("broken_nets:Velocity", field)
    with pytest.raises(DDMError, match=r"the module 'syntax_nets' was found but failed as it loaded \(SyntaxError: "):
        import_named("syntax_nets:A", field)
    with pytest.raises(DDMError, match=r"^expert.net.arch: cannot import 'typo_nets:Velocty': 'typo_nets' has no "
                                       r"'Velocty'; did you mean 'Velocity'\?$"):
        import_named("typo_nets:Velocty", field)
    assert import_named("typo_nets:Velocity", field).__name__ == "Velocity"


@pytest.mark.parametrize("name", ["expert", "router"])
def test_a_class_that_cannot_be_imported_names_its_setting(tmp_path, here, name):
    code, err = here("partition", "--config", Path(__file__).parent / "configs" / "tiny.toml", "--out", tmp_path / "run",
                     "--set", f"{name}.net.arch=no_such_module:Net", path=tmp_path)
    assert code == 2 and f"{name}.net.arch: cannot import 'no_such_module:Net'" in err
    assert not (tmp_path / "run").exists()


def test_a_class_registered_under_a_name_of_its_own_is_used_by_that_name(monkeypatch):
    """use_network("custom:Name", cls) registers a class no import could find; a config naming
    "custom:Name" then trains it (the pipeline's use_network(name) imports nothing)."""
    from ddmkit.config import RunConfig
    from ddmkit.pipeline.stages import register_user_networks

    monkeypatch.setattr(user, "_USER", {})
    use_network("custom:Doubler", Doubler)
    cfg = RunConfig.model_validate({"expert": {"net": {"arch": "custom:Doubler"}}})
    register_user_networks(cfg)
    assert use_network("custom:Doubler") is Doubler and user.user_networks() == ("custom:Doubler",)


def test_a_class_registered_under_a_name_of_no_module_is_refused_for_worker_processes(monkeypatch, tmp_path):
    """use_network("custom:Vel", Vel) then the processes backend: the run wrote its data and partition and trained
    its monolith before every worker failed to import 'custom:Vel' (the message said to install a package)."""
    from ddmkit.config import RunConfig
    from ddmkit.launch import check_launch
    from ddmkit.pipeline.run import run_pipeline

    monkeypatch.setattr(user, "_USER", {})
    use_network("custom:Doubler", Doubler)
    said = r"backend 'processes': the network class registered as 'custom:Doubler' can be used in this process only"
    with pytest.raises(DDMError, match=said):
        check_launch("processes")
    cfg = RunConfig.model_validate({"expert": {"net": {"arch": "custom:Doubler"}}})
    with pytest.raises(DDMError, match=said):
        run_pipeline(cfg, tmp_path / "run", backend="processes", log=lambda m: None)
    assert not (tmp_path / "run").exists()
    check_launch("inline")
    monkeypatch.setattr(user, "_USER", {})
    use_network(Doubler)  # its own name, a module the workers import
    use_network("__main__:Net", Doubler)  # a class of the script run (spawned workers run it as their __main__)
    script = types.ModuleType("__main__")
    script.__file__ = __file__  # a script file, whatever runs the tests (pytest-xdist's workers have none)
    monkeypatch.setitem(sys.modules, "__main__", script)
    check_launch("processes")


def test_a_class_of_a_notebook_is_refused_for_worker_processes(monkeypatch, tmp_path):
    """use_network(Vel) in a notebook (or `python -c`) names '__main__:Vel', which spawned workers cannot import:
    the run wrote its data, partition, monolith and router before every worker failed on '__main__' has no 'Vel'."""
    from ddmkit.config import RunConfig
    from ddmkit.launch import check_launch
    from ddmkit.pipeline.run import run_pipeline

    monkeypatch.setattr(user, "_USER", {})
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no file, no spec: a notebook's
    use_network("__main__:Net", Doubler)
    cfg = RunConfig.model_validate({"expert": {"net": {"arch": "__main__:Net"}}})
    said = (r"backend 'processes': the network class registered as '__main__:Net' can be used in this process only "
            r"\(defined in a notebook, .*e.g. mynets.py beside the notebook")
    with pytest.raises(DDMError, match=said):
        run_pipeline(cfg, tmp_path / "run", backend="processes", log=lambda m: None)
    assert not (tmp_path / "run").exists()
    script = types.ModuleType("__main__")
    script.__file__ = __file__  # a script file: spawned workers run it again as their __main__
    monkeypatch.setitem(sys.modules, "__main__", script)
    check_launch("processes")
    if not HAS_RAY:  # without Ray, the launch is refused naming Ray first
        return
    with pytest.raises(DDMError, match=r"'__main__:Net' .* \(a class of the main script, which Ray's workers do not"):
        check_launch("ray")  # Ray's workers have a __main__ of their own


class NaNOut(torch.nn.Module):
    """A network of the right shape whose output is NaN: it would train to NaN weights."""

    def __init__(self, data_shape):
        super().__init__()
        self.lin = torch.nn.Linear(data_shape[0], data_shape[0])

    def forward(self, x, t, y=None):
        return self.lin(x) * float("nan")


def test_a_network_whose_output_is_not_finite_is_refused_before_training():
    with pytest.raises(DDMError, match=r"expert.net.arch = 'x': forward\(x, t\) returned NaN or infinite values"):
        user.check_output(NaNOut([2]), "expert.net.arch = 'x'", [2])
    user.check_output(Doubler([2]), "expert.net.arch = 'x'", [2])


class SoftmaxRouter(torch.nn.Module):
    """A router that returns probabilities, which ddmkit would put through softmax again."""

    def __init__(self, data_shape, num_experts):
        super().__init__()
        self.lin = torch.nn.Linear(data_shape[0], num_experts)

    def forward(self, x, t):
        return self.lin(x).softmax(-1)


def test_a_router_returning_probabilities_is_warned_of_and_one_returning_logits_is_not():
    """A router ending in softmax was accepted, and ddmkit applied softmax again to its probabilities."""
    where = "router.net.arch = 'x'"
    with pytest.warns(UserWarning, match=r"^router.net.arch = 'x': forward\(x, t\) returns what look like "
                                         r"probabilities .*; ddmkit applies softmax to the router's output: return "
                                         r"logits"):
        user.check_output(SoftmaxRouter([2], 3), where, [2], num_experts=3)
    torch.manual_seed(0)
    logits = SoftmaxRouter([2], 3)
    logits.forward = lambda x, t: logits.lin(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        user.check_output(logits, where, [2], num_experts=3)
        user.check_output(SoftmaxRouter([2], 1), where, [2], num_experts=1)  # one expert: softmax changes nothing


class NoGrad(NaNOut):
    """A forward under torch.no_grad(): the right shape and values, nothing to train."""

    def forward(self, x, t, y=None):
        with torch.no_grad():
            return self.lin(x)


class TwoRowsOnly(NaNOut):
    """Right for a batch of 2 (as the check called it), wrong for any other."""

    def forward(self, x, t, y=None):
        return self.lin(x) if len(x) == 2 else self.lin(x)[:, :1]


def test_a_network_that_cannot_train_is_refused_before_training():
    """Both passed the check of two rows without gradients, then stopped training with a traceback (exit 1)."""
    with pytest.raises(DDMError, match=r"^expert.net.arch = 'x': forward\(x, t\) returns a tensor that carries no "
                                       r"gradient \(a forward under torch.no_grad\(\), or a detached output\)"):
        user.check_output(NoGrad([2]), "expert.net.arch = 'x'", [2])
    with pytest.raises(DDMError, match=r"^expert.net.arch = 'x': forward\(x, t\) returned \(3, 1\) for x of shape "
                                       r"\(3, 2\); expected \(3, 2\) \(it is right for 2 rows\): a network must take "
                                       r"any batch size$"):
        user.check_output(TwoRowsOnly([2]), "expert.net.arch = 'x'", [2])


def test_growing_a_run_of_the_users_networks_takes_the_config_that_names_them(user_run, here, tmp_path):
    """add-expert and replace-expert had no --config: a run of the user's own classes could not be grown
    from the command line (the refusal suggested --config, which they lacked)."""
    import numpy as np

    home, config, run = user_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code, message = here("replace-expert", copy, 1, copy / "experts" / "expert_00", path=home)
    assert code == 2 and "'my_nets:Velocity' is not registered" in message
    assert here("replace-expert", copy, 1, copy / "experts" / "expert_00", "--config", config, path=home)[0] == 0
    island = tmp_path / "island.npz"  # ring8's rows carry labels (their component): so do these
    np.savez(island, x=np.random.default_rng(0).normal(4.0, 0.1, (60, 2)).astype(np.float32),
             labels=np.zeros(60, dtype=np.int64))
    code, message = here("add-expert", copy, "--data", island, path=home)
    assert code == 2 and "'my_nets:Velocity' is not registered" in message
    assert here("add-expert", copy, "--data", island, "--config", config, path=home)[0] == 0
    assert json.loads((copy / "experts" / "expert_02" / "config.json").read_text())["arch"] == "my_nets:Velocity"


def test_a_slurm_task_of_a_run_of_the_users_networks_imports_them(user_run, here, tmp_path):
    """`launch --emit slurm` wrote tasks that failed ('not registered'): a task reads the run's config.json,
    which never imports code; the script now names the class on each task's line."""
    import os
    import subprocess

    home, config, run = user_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "experts" / "expert_01")
    (copy / "registry.json").unlink()
    assert here("launch", copy, "--emit", "slurm", "--gpus", "0", path=home)[0] == 0
    script = copy / "launch" / "train_experts.slurm"
    assert "--set expert.net.arch=my_nets:Velocity" in script.read_text()
    src = str(Path(__file__).parents[1] / "src")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "SLURM_ARRAY_TASK_ID": "1", "PYTHONPATH": f"{src}:{home}",
                               "DDMKIT_QUIET": "1"})
    assert done.returncode == 0, done.stderr
    assert json.loads((copy / "experts" / "expert_01" / "config.json").read_text())["arch"] == "my_nets:Velocity"
    shutil.rmtree(copy / "experts" / "expert_01")
    code, message = here("launch", copy, "--emit", "slurm", "--gpus", "3", path=home)  # batch 32 over 3 GPUs
    assert code == 2 and "--gpus 3: expert.train.batch_size = 32 does not split into 3 equal slices" in message


class NoShape(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)


class TensorSizes(torch.nn.Module):
    """Sizes computed with tensors in __init__: fine on the CPU, not on the meta device."""

    def __init__(self, data_shape):
        super().__init__()
        self.lin = torch.nn.Linear(int(torch.tensor(data_shape).prod()), 2)


class AnyArguments(torch.nn.Module):
    """A class taking **kwargs: any name is its own to check."""

    def __init__(self, data_shape, **kwargs):
        super().__init__()
        self.lin = torch.nn.Linear(data_shape[0], data_shape[0])


def test_a_misspelt_argument_of_a_user_network_is_named_from_the_config_alone(monkeypatch):
    """Checked against its __init__ before any data are read, with the nearest name; a class taking **kwargs
    is left to check its own."""
    from ddmkit.config import RunConfig
    from ddmkit.pipeline.stages import check_network_arguments

    monkeypatch.setattr(user, "_USER", {})
    use_network("custom:Doubler", Doubler)
    use_network("custom:AnyArguments", AnyArguments)
    cfg = RunConfig.model_validate({"expert": {"net": {"arch": "custom:Doubler", "kwargs": {"widht": 8}}}})
    with pytest.raises(DDMError, match=re.escape("expert.net.kwargs.widht: 'custom:Doubler' takes no argument "
                                                 "'widht'; did you mean 'width'? (accepted: width)")):
        check_network_arguments(cfg)
    check_network_arguments(cfg.model_copy(update={"expert": cfg.expert.model_copy(update={
        "net": cfg.expert.net.model_copy(update={"arch": "custom:AnyArguments"})})}))


@pytest.mark.parametrize("section, arch, key, value, passed, source", [
    ("expert", "mlp", "data_shape", "[3]", "[2]", "the shape of the data"),
    ("expert", "custom:Doubler", "data_shape", "[3]", "[2]", "the shape of the data"),
    ("router", "router_mlp", "num_experts", "3", "4", "partition.k"),
    ("router", "router_mlp", "data_shape", "[1, 2]", "[2]", "the shape of the data")])
def test_net_kwargs_that_ddmkit_sets_itself_are_refused(tmp_path, monkeypatch, section, arch, key, value, passed,
                                                        source):
    """expert.net.kwargs.data_shape or router.net.kwargs.num_experts overrode what ddmkit passes: the network was
    built for another shape or number of experts, and training failed with torch's traceback (mat1 and mat2 shapes
    cannot be multiplied; Target 3 is out of bounds) after the run folder was written. Refused at once, exit 2;
    the value ddmkit passes is taken as it is."""
    monkeypatch.setattr(user, "_USER", {})
    use_network("custom:Doubler", Doubler)
    tiny = Path(__file__).parent / "configs" / "tiny.toml"
    setting = ["--set", f"{section}.net.arch={arch}", "--set", f"{section}.net.kwargs={{{key}={value}}}"]
    done = run_cli("run", tiny, "--out", tmp_path / "run", *setting)
    said = f"error: {section}.net.kwargs.{key} = {value}: ddmkit passes {key} = {passed} ({source}) itself; " \
           f"remove it from {section}.net.kwargs"
    assert done.returncode == 2 and done.stderr.strip() == said, done.stderr
    assert not (tmp_path / "run").exists()
    setting[-1] = f"{section}.net.kwargs={{{key}={passed}}}"
    done = run_cli("partition", "--config", tiny, "--out", tmp_path / "same", *setting)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("cls, kwargs, said, hinted", [
    (Doubler, {"widht": 4}, "accepted: width", False),
    (NoShape, {}, "its __init__ takes no data_shape", False),
    (TensorSizes, {}, "TensorSizes", True)])
def test_a_user_network_that_does_not_build_says_why(monkeypatch, cls, kwargs, said, hinted):
    """Every refusal ended with the meta-device hint, irrelevant to a misspelt argument; a class taking no
    data_shape read 'accepted:  (data of shape (2,))'."""
    from ddmkit.config import RunConfig
    from ddmkit.pipeline.stages import check_networks

    monkeypatch.setattr(user, "_USER", {})
    use_network(f"custom:{cls.__name__}", cls)
    cfg = RunConfig.model_validate({"expert": {"net": {"arch": f"custom:{cls.__name__}", "kwargs": kwargs}}})
    with pytest.raises(DDMError, match=said) as error:
        check_networks(cfg, (2,))
    assert ("meta device" in str(error.value)) == hinted, str(error.value)


def test_a_class_of_a_notebook_is_refused_for_a_job_of_several_processes(monkeypatch, tmp_path):
    """train_expert_once(nproc=2) spawns the job's processes, which import the network classes by name: a class of
    a notebook ('__main__:Net', no file) is refused before the lock or any process, naming --nproc; one process,
    or a launcher's processes (torchrun runs the script in each), take it."""
    import ddmkit.train.jobs as jobs
    from ddmkit.config import ExpertConfig

    monkeypatch.setattr(user, "_USER", {})
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no file, no spec: a notebook's
    use_network("__main__:Net", Doubler)
    monkeypatch.setattr(jobs, "_train_expert_once", lambda *args: pytest.fail("the job started"))
    config = ExpertConfig.model_validate({"net": {"arch": "__main__:Net"}})
    out = tmp_path / "expert"
    with pytest.raises(DDMError, match=r"^--nproc 2: the network class registered as '__main__:Net' can be used in "
                                       r"this process only \(defined in a notebook, .* or train on one process"):
        jobs.train_expert_once(tmp_path / "shard.safetensors", config, out, nproc=2)
    assert not out.exists()
    monkeypatch.setattr(jobs, "_train_expert_once", lambda *args: True)
    assert jobs.train_expert_once(tmp_path / "shard.safetensors", config, out, nproc=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert jobs.train_expert_once(tmp_path / "shard.safetensors", config, tmp_path / "other", nproc=2)
