"""Benchmarks use only the public API: every name they import from ddmkit is in the __all__ of
`ddmkit` or of the package they import it from (never a module inside a package)."""
import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def private_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("ddmkit") and a.name != "ddmkit"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddmkit"):
            module = importlib.import_module(node.module)
            public = set(getattr(module, "__all__", ()))
            is_package = hasattr(module, "__path__")
            found += [f"{node.module}.{a.name}" for a in node.names if not is_package or a.name not in public]
    return found


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmarks_import_only_public_names(script):
    assert private_imports(script.read_text()) == []


def test_the_check_finds_a_private_import():
    assert private_imports("from ddmkit.routing.combine import make_plan\nfrom ddmkit.routing import make_plan") == \
        ["ddmkit.routing.combine.make_plan"]
    assert private_imports("from ddmkit.nets import NotThere") == ["ddmkit.nets.NotThere"]


def test_text_seeds_refuses_a_folder_of_another_config_in_a_setting_the_toml_leaves_out(tmp_path):
    """text_seeds.py compared only the settings the TOML sets: a seed folder made with --set of a default
    (here sample.steps) was taken as CONFIG's run and its numbers printed as CONFIG's."""
    import json
    import subprocess
    import sys

    from ddmkit.discrete import load_text_config

    root = Path(__file__).resolve().parents[1]
    config = root / "configs" / "text_ar.toml"
    seed = tmp_path / "s0"
    seed.mkdir()
    cfg = load_text_config(config).with_seed(0)
    (seed / "report.json").write_text(json.dumps({"bits_per_byte": {"expert": {"all": 2.5}}}))

    def run_script():
        return subprocess.run([sys.executable, str(root / "benchmarks" / "text_seeds.py"), str(config), "--out",
                               str(tmp_path), "--seeds", "0"], capture_output=True, text=True)

    (seed / "config.json").write_text(json.dumps({"digest": cfg.digest(), "config": cfg.model_dump()}))
    same = run_script()
    assert same.returncode == 0 and "| expert | 2.500 |" in same.stdout, same.stderr
    other = cfg.model_dump()
    other["sample"]["steps"] += 1  # configs/text_ar.toml leaves it at its default
    (seed / "config.json").write_text(json.dumps({"digest": "x", "config": other}))
    refused = run_script()
    assert refused.returncode == 2 and "sample.steps differ" in refused.stderr, refused.stderr


def test_training_quick_runs_on_one_thread(monkeypatch):
    """training.py --quick is a check on a 2-core CPU: on PyTorch's threads, spinning against other jobs, the
    tiny stacked networks took 20-40 s there instead of 5. A --threads given is kept."""
    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    training = importlib.import_module("training")
    for mode in ("single", "stacked"):
        assert training.parse_args(["--quick", "--mode", mode]).threads == 1
    assert training.parse_args(["--quick", "--threads", "2"]).threads == 2
    assert training.parse_args(["--device", "cpu"]).threads is None  # a measurement: PyTorch's, as before
