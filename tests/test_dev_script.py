"""dev.py, the README's entry point: a target it does not know is refused before the setup, which creates
.venv and installs PyTorch (minutes and a large download for a typo)."""
import importlib.util
from pathlib import Path

import pytest


@pytest.fixture
def dev(monkeypatch):
    spec = importlib.util.spec_from_file_location("dev_script", Path(__file__).parents[1] / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def no_setup(*args, **kwargs):
        raise AssertionError("dev.py ran its setup")

    monkeypatch.setattr(module, "setup", no_setup)
    monkeypatch.setattr(module, "run", no_setup)
    return module


@pytest.mark.parametrize("target", ["tset", "demo_out", "--demo"])
def test_an_unknown_target_is_refused_before_the_setup(dev, target, capsys):
    assert dev.main(["dev.py", target]) == 2
    out, err = capsys.readouterr()
    assert "python3 dev.py demo" in out  # the usage
    assert f"unknown target {target!r}; choose one of setup, demo, test, test-slow" in err


def test_help_needs_no_setup(dev, capsys):
    assert dev.main(["dev.py"]) == 0
    assert dev.main(["dev.py", "--help"]) == 0
    assert "python3 dev.py test" in capsys.readouterr().out


def test_a_known_target_sets_up(dev):
    with pytest.raises(AssertionError, match="ran its setup"):
        dev.main(["dev.py", "setup"])
