"""The user docs stay true: every relative link resolves (its #section too), every `ddmkit.x.y` they name exists, and
they hold no time of day or commit hash (history lives in git)."""
import importlib
import re
from pathlib import Path

import pytest

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
