"""The layers of docs/architecture.md hold in the source: each package has a layer and each name of the table is a
package, no module imports from a higher layer, and no two modules import each other, directly or through others
(imports inside functions count)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ddmkit"


def documented_layers() -> list[list[str]]:
    """The layer table of docs/architecture.md: lines '  N  name name ...' in the block after '## Layers'."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    layers = {}
    for line in block.splitlines():
        m = re.match(r"\s*(\d+)\s+(.+)", line)
        if m:
            layers[int(m.group(1))] = m.group(2).split()
    return [layers[i] for i in sorted(layers)]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """ddmkit modules named by every import in the file (absolute or relative, anywhere in it)."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in out if name == "ddmkit" or name.startswith("ddmkit.")}


def unit(module: str) -> str:
    """The layer unit of a module: its top-level package or module under ddmkit ('__init__' for ddmkit)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        targets = set()
        for imported in imports(path):
            while imported and imported not in files:  # `from pkg import function` names pkg
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def upward(edges: dict[str, set[str]], level: dict[str, int]) -> list[str]:
    """Every import from a module to a module of a higher layer."""
    return sorted(f"{a} -> {b} (layer {level[unit(a)]} imports layer {level[unit(b)]})"
                  for a, targets in edges.items() for b in targets if level[unit(b)] > level[unit(a)])


def test_every_package_has_a_layer_and_no_import_goes_up():
    layers = documented_layers()
    level = {name: i for i, names in enumerate(layers) for name in names}
    edges = graph()
    missing = sorted({unit(m) for m in edges} - set(level))
    assert not missing, f"packages without a layer in docs/architecture.md: {missing}"
    stale = sorted(set(level) - {unit(m) for m in edges})
    assert not stale, f"layers in docs/architecture.md name no package or module of src/ddmkit: {stale}"
    assert not upward(edges, level), "imports that run up a layer:\n" + "\n".join(upward(edges, level))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_catch_a_violation():
    """The two checks find a made-up upward import and a made-up cycle."""
    level = {"routing": 3, "pipeline": 9}
    edges = {"ddmkit.routing.combine": {"ddmkit.pipeline.run"}, "ddmkit.pipeline.run": {"ddmkit.routing.combine"}}
    assert upward(edges, level) == ["ddmkit.routing.combine -> ddmkit.pipeline.run (layer 3 imports layer 9)"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
