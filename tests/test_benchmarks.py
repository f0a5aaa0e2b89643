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
