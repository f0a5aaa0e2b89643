"""The user docs stay true: every relative link resolves (its #section too), every `ddmkit.x.y` they name exists,
they hold no time of day or commit hash (history lives in git), and the Python snippets of README.md and
docs/images.md run as written on tiny runs (docs/latent.md's: tests/test_latent.py)."""
import importlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"])


def prose(page: Path) -> str:
    return page.read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(page)):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name}: link to {target} does not resolve"


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", prose(page), flags=re.S)  # a '#' line inside a code block is no heading
    return {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_section_links_resolve(page):
    for target, section in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", prose(page)):
        if "://" in target:
            continue
        linked = page.parent / target if target else page
        if linked.suffix == ".md":
            assert section in anchors(linked), f"{page.name}: link to {target}#{section}: no such section"


def resolves(dotted: str) -> bool:
    """Whether ddmkit.a.b.c is a module, or an attribute reached from the longest importable module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_code_exists(page):
    names = {m.rstrip(".") for m in re.findall(r"\bddmkit(?:\.[A-Za-z_][A-Za-z0-9_]*)+\.?", prose(page))}
    missing = sorted(n for n in names if not resolves(n))
    assert not missing, f"{page.name} names code that does not exist: {missing}"


def test_the_sections_messages_point_to_exist():
    """An error message's docs/PAGE.md#section (e.g. docs/own-data.md#your-network) is a section of that page."""
    named = {(page, section) for source in (ROOT / "src" / "ddmkit").rglob("*.py")
             for page, section in re.findall(r"docs/([\w-]+\.md)#([\w-]+)", source.read_text())}
    assert ("own-data.md", "your-network") in named
    missing = sorted(f"docs/{page}#{section}" for page, section in named
                     if section not in anchors(ROOT / "docs" / page))
    assert not missing, f"messages point to sections that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_times_of_day_or_commit_hashes(page):
    text = prose(page)
    times = [t for t in re.findall(r"\b(?:[01][0-9]|2[0-3]):[0-5][0-9]\b", text) if t not in ("24:00",)]
    assert not [t for t in times if not re.search(re.escape(t) + r":00", text)], f"{page.name}: times of day {times}"
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    assert not hashes, f"{page.name}: commit hashes {hashes}"


def test_the_checks_catch_a_stale_name_and_a_hash():
    assert heading_anchor("Measured: Fashion-MNIST, K = 8 at four budgets") == "measured-fashion-mnist-k--8-at-four-budgets"
    assert resolves("ddmkit.routing.table.parse_strategy") and not resolves("ddmkit.pipeline.images.guided_field")
    assert re.findall(r"\b[0-9a-f]{7,40}\b", "fixed in cf6a9f0") == ["cf6a9f0"]


# The Python snippets a researcher copies: run as the pages write them, on tiny runs, with what the pages say they give.

def python_block(page: Path, after: str) -> str:
    """The first ```python block of `page` after the text `after`."""
    text = prose(page)
    block = re.search(r"```python\n(.*?)```", text[text.index(after):], flags=re.S)
    assert block, f"{page.name}: no python block after {after!r}"
    return block.group(1)


def test_the_readmes_python_snippet_runs_as_written(tmp_path, capsys):
    """README's "Using it from Python": a run folder loads, top-2 with heun gives (n, 2) float32 samples at 2 experts x
    2 evaluations x 50 steps per sample, and the commented monolith line runs as written."""
    from ddmkit.pipeline.prepare import prepare_run_dir
    from ddmkit.pipeline.stages import (stage_data, stage_experts, stage_monolith, stage_partition, stage_registry,
                                        stage_router)
    from test_registry import small_config

    cfg = small_config()
    run = prepare_run_dir(tmp_path / "run", cfg, log=lambda m: None)
    for stage in (stage_data, stage_partition, stage_experts, stage_monolith, stage_router, stage_registry):
        stage(cfg, run, lambda m: None)
    code = python_block(ROOT / "README.md", "## Using it from Python")
    assert '"demo_out"' in code
    namespace = {}
    exec(code.replace('"demo_out"', repr(str(run))), namespace)
    x0, info = namespace["x0"], namespace["info"]
    assert x0.shape == (1000, 2) and x0.dtype == torch.float32 and bool(torch.isfinite(x0).all())
    assert capsys.readouterr().out == "200.0\n" and info["strategy"] == "top-2"
    monolith = re.search(r"# the run's FLOP-matched monolith: (ddmkit\.ddm\.sample_single\(.*\))\n", code).group(1)
    x, single = eval(monolith.replace('"demo_out"', repr(str(run))), {"ddmkit": importlib.import_module("ddmkit"),
                                                                        "ddm": namespace["ddm"]})
    assert x.shape == (1000, 2) and single["expert_calls_per_sample"] == 50


def test_the_image_pages_python_snippet_saves_pngs(tmp_path, monkeypatch):
    """docs/images.md "From Python": a class-conditional image run samples (16, C, H, W), not clamped, and the
    snippet writes 16 PNGs of the images' size."""
    import numpy as np
    from PIL import Image

    from ddmkit.config import RunConfig, load_config, validate
    from ddmkit.pipeline.prepare import prepare_run_dir
    from ddmkit.pipeline.stages import stage_data, stage_experts, stage_partition, stage_registry, stage_router

    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (150, 8, 8), dtype=np.uint8)
    x[rng.integers(0, 2, 150).astype(bool), :4] += 180
    np.savez(tmp_path / "images.npz", x=x, labels=rng.integers(0, 3, 150))
    raw = load_config(ROOT / "tests" / "configs" / "tiny_images.toml").model_dump()
    raw["data"]["params"]["path"] = str(tmp_path / "images.npz")
    cfg = validate(RunConfig, raw)
    run = prepare_run_dir(tmp_path / "fm", cfg, log=lambda m: None)
    for stage in (stage_data, stage_partition, stage_experts, stage_router, stage_registry):
        stage(cfg, run, lambda m: None)
    code = python_block(ROOT / "docs" / "images.md", "## From Python")
    assert '"runs/fm"' in code and "steps=50" in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(code.replace('"runs/fm"', repr(str(run))).replace("steps=50", "steps=4"), namespace)
    assert namespace["x0"].shape == (16, 1, 8, 8) and namespace["pixels"].dtype == torch.uint8
    saved = sorted(tmp_path.glob("sample_*.png"))
    assert len(saved) == 16 and Image.open(saved[0]).size == (8, 8) and Image.open(saved[0]).mode == "L"
