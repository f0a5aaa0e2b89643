"""The user docs stay true: every relative link resolves (its #section too), every `ddmkit.x.y` they name exists,
they hold no time of day or commit hash (history lives in git), and the Python snippets of README.md and
docs/{images,routing,architecture,distill,grow,latent,analysis}.md run as written on tiny runs, and so do
docs/own-data.md's Python snippets and shell lines, on tiny data, with what the page says they give. Every
`ddmkit ...` and `python benchmarks/X.py ...` command they write names a command and options that exist, and every
`--set FIELD=VALUE` a field of the config."""
import argparse
import functools
import importlib
import itertools
import json
import re
import shlex
import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from ddmkit.errors import DDMError

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
    assert heading_anchor("Measured: Fashion-MNIST, K = 8 at four budgets") \
        == "measured-fashion-mnist-k--8-at-four-budgets"
    assert resolves("ddmkit.routing.table.parse_strategy") and not resolves("ddmkit.pipeline.images.guided_field")
    assert re.findall(r"\b[0-9a-f]{7,40}\b", "fixed in cf6a9f0") == ["cf6a9f0"]


def layout_paths(page: str) -> set[str]:
    """The paths the "## Layout" block of a page names, from the repository root: each entry (a line indented 4
    spaces: the repository's; 6: src/ddmkit/'s) and each NAME.py of its text, in the entry's folder (a folder
    entry's own, else src/ddmkit/; a name with a slash, e.g. train/loop.py: in src/ddmkit/)."""
    block = page.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths, folder = set(), ""
    for line in block.splitlines():
        indent, words = len(line) - len(line.lstrip()), line.split()
        if indent < 4:  # prose around the block
            continue
        if indent in (4, 6) and words:
            entry = ("src/ddmkit/" if indent == 6 else "") + words[0]
            paths.add(entry.rstrip("/"))
            folder, words = (entry if entry.endswith("/") else "src/ddmkit/"), words[1:]
        for name in re.findall(r"[\w/]+\.py\b", " ".join(words)):
            paths.add(("src/ddmkit/" if "/" in name else folder) + name)
    return paths


def test_the_architecture_layout_lists_every_module_and_only_what_exists():
    """docs/architecture.md's layout names every module of src/ddmkit (a package's __init__.py by its folder),
    and every file and folder it names exists."""
    named = layout_paths(prose(ROOT / "docs" / "architecture.md"))
    modules = {str((p.parent if p.name == "__init__.py" else p).relative_to(ROOT))
               for p in (ROOT / "src" / "ddmkit").rglob("*.py")}
    assert "src/ddmkit/routing/table.py" in named and "src/ddmkit/train/loop.py" in modules
    assert not sorted(modules - named), f"modules missing from the layout: {sorted(modules - named)}"
    gone = sorted(n for n in named if not (ROOT / n).exists())
    assert not gone, f"the layout names what does not exist: {gone}"


def test_the_layout_reader_reads_entries_their_modules_and_a_path_named_in_another():
    page = ("## Layout\n\nEvery module (tests/x.py):\n\n    src/ddmkit/\n      io.py   atomic writes\n      nets/   mlp.py, unet.py (see\n"
            "              train/loop.py's fit)\n    docs/   one page per task\n\n## Layers\n      cli.py\n")
    assert layout_paths(page) == {"src/ddmkit", "src/ddmkit/io.py", "src/ddmkit/nets", "src/ddmkit/nets/mlp.py",
                                  "src/ddmkit/nets/unet.py", "src/ddmkit/train/loop.py", "docs"}


# The Python snippets a researcher copies: run as the pages write them, on tiny runs, with what the pages say they give.

def code_block(page: Path, after: str, lang: str = "python") -> str:
    """The first ```python block of `page` after the text `after` (```LANG for another `lang`; "": a block of no
    language, as the pages write shell lines and messages)."""
    text = prose(page)
    start = text.index(after)
    for block in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M):
        if block.start() >= start and block.group(1) == lang:
            return block.group(2)
    raise AssertionError(f"{page.name}: no {lang or 'plain'} block after {after!r}")


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
    code = code_block(ROOT / "README.md", "## Using it from Python")
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
    code = code_block(ROOT / "docs" / "images.md", "## From Python")
    assert '"runs/try"' in code and "steps=50" in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(code.replace('"runs/try"', repr(str(run))).replace("steps=50", "steps=4"), namespace)
    assert namespace["x0"].shape == (16, 1, 8, 8) and namespace["pixels"].dtype == torch.uint8
    assert namespace["ddm"].codec is None  # docs/latent.md: a DDM of images has no codec
    saved = sorted(tmp_path.glob("sample_*.png"))
    assert len(saved) == 16 and Image.open(saved[0]).size == (8, 8) and Image.open(saved[0]).mode == "L"


def test_the_routing_pages_strategy_snippet_samples_by_name_and_as_an_object():
    """docs/routing.md "Writing a strategy": the snippet as written adds 'greedy' to the table; the DDM then samples
    it by name and as the object, the same as top-1 (the argmax, weight 1), and strategy_forms() lists it."""
    from ddmkit.ddm import DDM
    from ddmkit.routing import STRATEGIES, strategy_forms

    experts = [lambda x, t, y=None, j=j: torch.full_like(x, float(j)) for j in range(3)]
    ddm = DDM(experts=experts, router=lambda x, t: torch.softmax(x @ torch.ones(2, 3) * torch.arange(3.0), 1),
              prior=torch.ones(3) / 3, data_shape=(2,))
    namespace = {}
    exec(code_block(ROOT / "docs" / "routing.md", "## Writing a strategy"), namespace)
    try:
        x, info = ddm.sample("greedy", n=8, steps=3)
        assert info["strategy"] == "greedy" and info["expert_calls_per_sample"] == 3
        assert torch.equal(ddm.sample(namespace["Greedy"](), n=8, steps=3)[0], x)
        assert torch.equal(ddm.sample("top-1", n=8, steps=3)[0], x) and "greedy" in strategy_forms().split(", ")
    finally:
        STRATEGIES.pop()


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory) -> Path:
    """The tiny config's run (ring8, 4 experts, monolith and router, 20 steps each); tests copy it before
    writing into it."""
    from ddmkit.pipeline.prepare import prepare_run_dir
    from ddmkit.pipeline.stages import (stage_data, stage_experts, stage_monolith, stage_partition, stage_registry,
                                        stage_router)
    from test_registry import small_config

    cfg = small_config()
    run = prepare_run_dir(tmp_path_factory.mktemp("mixture") / "run", cfg, log=lambda m: None)
    for stage in (stage_data, stage_partition, stage_experts, stage_monolith, stage_router, stage_registry):
        stage(cfg, run, lambda m: None)
    return run


def copied_run(run: Path, folder: Path, name: str) -> Path:
    """A copy of `run` at folder/name, where a snippet may write (the folder made)."""
    import shutil

    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run, folder / name))


def indented_block(page: Path, first: str) -> str:
    """The block of lines indented 4 spaces (as the pages write a command and its Python call) that holds the
    line starting with `first`, dedented."""
    for block in re.findall(r"(?:^    .*\n)+", prose(page), flags=re.M):
        if any(line.strip().startswith(first) for line in block.splitlines()):
            return "\n".join(line[4:] for line in block.splitlines())
    raise AssertionError(f"{page.name}: no indented block with {first!r}")


def test_the_architecture_pages_public_api_snippet_runs_and_samples_with_labels(tmp_path, monkeypatch):
    """docs/architecture.md "The public API": on the tiny image config (3 classes) in place of Fashion-MNIST, the
    CPU in place of CUDA and 64 samples of 4 steps, run_pipeline trains and scores a run and the DDM samples
    top-2 with the snippet's own labels."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (150, 8, 8), dtype=np.uint8)
    x[rng.integers(0, 2, 150).astype(bool), :4] += 180
    np.savez(tmp_path / "images.npz", x=x, labels=rng.integers(0, 3, 150))
    monkeypatch.chdir(tmp_path)
    config = ROOT / "tests" / "configs" / "tiny_images.toml"
    code = shrunk(code_block(ROOT / "docs" / "architecture.md", "## The public API"),
                  ("configs/fashion_mnist.toml", str(config)), ('.to("cuda")', '.to("cpu")'),
                  ("torch.arange(1000) % 10", "torch.arange(64) % 3"), ("n=1000, steps=50", "n=64, steps=4"))
    namespace = {}
    exec(code, namespace)
    assert (tmp_path / "runs" / "fm" / "report.md").is_file()
    assert namespace["x0"].shape == (64, 1, 8, 8) and namespace["info"]["strategy"] == "top-2"


def test_the_distill_pages_python_snippet_trains_and_samples_both_students(mixture_run, tmp_path, monkeypatch):
    """docs/distill.md "Commands": distill_run on a trained run (20 steps a student, 64 trajectories) writes the
    report, the dense student samples in the 50 calls of the comment, the few-step one in 4."""
    copied_run(mixture_run, tmp_path / "runs", "demo")
    monkeypatch.chdir(tmp_path)
    code = shrunk(code_block(ROOT / "docs" / "distill.md", "From Python (`ddmkit.pipeline.distill`)"),
                  ('grid="lambda")', 'grid="lambda", steps=20, trajectories=64, log=lambda m: None)'))
    assert "steps=50)" in code and "# like the monolith: 50 calls" in code and "# 4 calls" in code
    namespace = {}
    exec(code.replace("x0, info = sample_single", "dense_x0, dense_info = sample_single"), namespace)
    assert (tmp_path / "runs" / "demo" / "students" / "report.md").is_file() and namespace["report"]
    assert namespace["dense_x0"].shape == (1000, 2) and namespace["dense_info"]["expert_calls_per_sample"] == 50
    assert namespace["x0"].shape == (1000, 2) and namespace["info"]["expert_calls_per_sample"] == 4


def test_the_grow_pages_python_snippet_adds_an_island_routed_by_statistics(mixture_run, tmp_path, monkeypatch):
    """docs/grow.md "Add an island": an island of 300 rows (with labels) in new_island.npz joins a trained run
    as cluster 4, its expert trained alone and the router removed; the entry is grow.json's."""
    import numpy as np

    run = copied_run(mixture_run, tmp_path / "runs", "islands")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "new_island.npz", x=(rng.normal(size=(300, 2)) * 0.2 + 6).astype("float32"),
             labels=np.full(300, 8))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(code_block(ROOT / "docs" / "grow.md", "## Add an island"), namespace)
    entry = namespace["entry"]
    assert entry["k_after"] == 5 and entry["experts_trained"] == [4] and entry["rows"] == 300
    assert not (run / "router").exists() and json.loads((run / "grow.json").read_text())["events"][-1] == entry


def test_the_latent_pages_python_snippet_decodes_and_gives_latents(tmp_path, monkeypatch):
    """docs/latent.md "From Python": a tiny latent run (2 latent channels) samples 64 labelled images decoded to
    (64, 1, 32, 32) and their latents (64, 2, 8, 8); the snippet's last line decodes the latents."""
    from test_latent import latent_config, run_cli

    monkeypatch.chdir(tmp_path)
    done = run_cli("run", latent_config(tmp_path), "--out", "runs/fmnist-latent", "--stages", "train")
    assert done.exit_code == 0, done.output
    code = shrunk(code_block(ROOT / "docs" / "latent.md", "## From Python"), ('.to("cuda")', '.to("cpu")'),
                  ("steps=50", "steps=2"), ("decode=False)", "decode=False, steps=2)"))
    namespace = {}
    exec(code.replace("images = ddm.codec", "decoded = ddm.codec"), namespace)
    assert namespace["images"].shape == (64, 1, 32, 32) and namespace["latents"].shape == (64, 2, 8, 8)
    assert namespace["decoded"].shape == (64, 1, 32, 32)


def test_the_analysis_pages_python_call_writes_the_analysis(mixture_run, tmp_path, monkeypatch):
    """docs/analysis.md, first lines: analyze_run as written (200 samples) measures the three strategies and
    writes RUN/analysis/analysis.md."""
    run = copied_run(mixture_run, tmp_path / "runs", "demo")
    monkeypatch.chdir(tmp_path)
    code = shrunk(indented_block(ROOT / "docs" / "analysis.md", "from ddmkit.pipeline.analyze import"),
                  ('device="cpu")', 'device="cpu", n=200, n_boot=20, n_heldout=200, log=lambda m: None)'))
    namespace = {}
    exec(code, namespace)
    assert namespace["result"]["settings"]["strategies"] == ["full", "top-2", "nearest"]
    assert (run / "analysis" / "analysis.md").is_file()


MISALIGNMENT = (("seeds=[0, 1, 2]", "seeds=[0]"), ('"tempered-3"]', '"tempered-3"], log=lambda m: None'))


def test_the_analysis_pages_misalignment_call_runs_on_a_mixture(tmp_path, monkeypatch):
    """docs/analysis.md "Controlled misalignment": the Python call, on the tiny config in place of the demo's
    (one seed, 200 samples), trains both conditions and writes the report."""
    monkeypatch.chdir(tmp_path)
    code = shrunk(indented_block(ROOT / "docs" / "analysis.md", "from ddmkit.pipeline.misalignment import"),
                  ('load_config("demo")', f'load_config({str(ROOT / "tests" / "configs" / "tiny.toml")!r})'),
                  *MISALIGNMENT, ("log=lambda m: None", "log=lambda m: None, n=200, n_boot=20, w2_boot=5"))
    namespace = {}
    exec(code, namespace)
    assert set(namespace["report"]["conditions"]) == {"disjoint", "tempered-3"}
    assert (tmp_path / "runs" / "misalignment" / "report.md").is_file()


def test_the_analysis_pages_misalignment_call_runs_on_images(tmp_path, monkeypatch):
    """docs/analysis.md "On image runs": the Python call with the config it loads, on the tiny image config (the
    CPU, one seed, 16 samples, 8 stability rows) in place of Fashion-MNIST, writes the report."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (150, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x=x, labels=rng.integers(0, 3, 150))
    monkeypatch.chdir(tmp_path)
    text = prose(ROOT / "docs" / "analysis.md").split("### On image runs", 1)[1].split("\n## ", 1)[0]
    assert 'cfg = load_config("configs/fashion_mnist.toml")' in text
    code = shrunk(indented_block(ROOT / "docs" / "analysis.md", 'cfg = load_config("configs/fashion_mnist.toml")'),
                  ("configs/fashion_mnist.toml", str(ROOT / "tests" / "configs" / "tiny_images.toml")),
                  *MISALIGNMENT, ('device="cuda", stability_rows=256', 'device="cpu", stability_rows=8, n=16'))
    namespace = {"load_config": importlib.import_module("ddmkit").load_config}
    exec("from ddmkit.pipeline.misalignment import study_misalignment\n" + code, namespace)
    assert (tmp_path / "runs" / "mis-fmnist" / "report.md").is_file()


# docs/own-data.md: a researcher's folder (the test's own) where the page's files are written and its lines run.

OWN = ROOT / "docs" / "own-data.md"


def shrunk(text: str, *edits: tuple[str, str]) -> str:
    """`text` with each (old, new) replaced: the page's sizes made tiny (each old must be in the text)."""
    for old, new in edits:
        assert old in text, f"{old!r} is no longer in the snippet"
        text = text.replace(old, new)
    return text


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """Runs one line of a page's shell block in the folder tmp_path, in this process as in a new one started
    there: `[PYTHONPATH=.] ddmkit ARGS` (run_cli; no network class registered yet, the folder's modules not yet
    imported, the folder on the path only with PYTHONPATH=.), `python FILE` and `python -c CODE` (the folder on the
    path, as python puts it). Answers as subprocess.run does; for python, `.globals` holds the code's variables."""
    import contextlib
    import io
    import runpy
    import shlex
    import subprocess
    import sys

    import ddmkit.nets.user as user
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)

    def forget_the_folders_modules():
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]

    def run(line: str) -> subprocess.CompletedProcess:
        words = shlex.split(line)
        here = words[0] == "PYTHONPATH=."
        words = words[here:]
        forget_the_folders_modules()
        monkeypatch.setattr(user, "_USER", {})
        with monkeypatch.context() as m:
            if here or words[0] == "python":
                m.syspath_prepend(str(tmp_path))
            if words[0] == "ddmkit":
                return run_cli(*words[1:])
            assert words[0] == "python", line
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                if words[1] == "-c":
                    exec(words[2], namespace := {"__name__": "__main__"})
                else:
                    namespace = runpy.run_path(words[1], run_name="__main__")
            done = subprocess.CompletedProcess(words, 0, out.getvalue(), "")
            done.globals = namespace
            return done
    yield run
    forget_the_folders_modules()


def said(message: str) -> str:
    """A message as the page prints it, on one line: the text before a closing `(...)`."""
    return " ".join(message.split()).removesuffix("(...)").strip()


def test_own_data_a_vector_file_splits_as_the_page_says_and_without_sample_n_is_refused_as_printed(tmp_path, shell):
    """"## Vectors": the page's config on a file of 5000 rows gives 4000 train and 1000 test rows; without its
    [sample] section the partition stops with the message of "## Checked before training"."""
    import numpy as np

    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "embeddings.npz", x=np.random.default_rng(0).normal(size=(5000, 4)))
    config = code_block(OWN, "## Vectors", "toml")
    assert "[sample]\nn = 500" in config
    (tmp_path / "vectors.toml").write_text(config)
    done = shell("ddmkit partition --config vectors.toml --out runs/vectors --set partition.k=2")
    assert done.returncode == 0, done.stderr
    assert "4000 train / 1000 test samples of shape (4,)" in done.stderr
    (tmp_path / "bare.toml").write_text(config.split("[sample]")[0])
    done = shell("ddmkit partition --config bare.toml --out runs/bare --set partition.k=2")
    printed = said(code_block(OWN, "## Checked before training", ""))
    assert done.returncode == 2 and " ".join(done.stderr.split()).startswith(printed), done.stderr
    assert not (tmp_path / "runs" / "bare").exists()


def test_own_data_an_image_folder_reads_as_configured(tmp_path, shell):
    """"### An image folder": 1000 photos of mixed sizes in two class folders become 800 train and 200 test
    images of (3, 48, 48) with two classes; without the page's kid_subset they are refused, naming it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(1000):
        folder = tmp_path / "photos" / ("cats", "dogs")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(48, 64, 2)
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(folder / f"{i}.png")
    config = code_block(OWN, "### An image folder", "toml")
    (tmp_path / "folder.toml").write_text(config)
    done = shell("ddmkit partition --config folder.toml --out runs/folder --set partition.k=2")
    assert done.returncode == 0, done.stderr
    assert "800 train / 200 test samples of shape (3, 48, 48)" in done.stderr
    assert json.loads((tmp_path / "runs/folder/data/data.json").read_text())["classes"] == ["cats", "dogs"]
    (tmp_path / "bare.toml").write_text(config.split("[evaluate]")[0])
    done = shell("ddmkit partition --config bare.toml --out runs/bare --set partition.k=2")
    assert done.returncode == 2 and "evaluate.kid_subset = 1000 is larger than the 200 test images" in done.stderr


@pytest.mark.slow
def test_images_the_cpu_recipe_runs_as_written_on_a_folder_of_60_images(tmp_path, shell):
    """docs/images.md "Trying it on a CPU": the tiny config on a folder of 60 RGB images of discs, squares and
    stripes in three class folders trains, samples and scores every set (about a minute on 2 CPU cores)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for i in range(60):
        shape = ("circles", "squares", "stripes")[i % 3]
        (tmp_path / "photos" / shape).mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(60, 90, 2))
        image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 120, 3)))
        colour, draw = tuple(int(v) for v in rng.integers(120, 256, 3)), ImageDraw.Draw(image)
        if shape == "stripes":
            for x in range(0, w, 10):
                draw.rectangle([x, 0, x + 4, h], fill=colour)
        else:
            (draw.ellipse if shape == "circles" else draw.rectangle)([10, 10, 50, 50], fill=colour)
        image.save(tmp_path / "photos" / shape / f"{i}.jpg")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    line = code_block(ROOT / "docs" / "images.md", "## Trying it on a CPU", "bash").replace("\\\n", " ")
    done = shell(line)
    assert done.returncode == 0, done.stderr
    assert "48 train / 12 test samples of shape (3, 32, 32)" in done.stderr
    assert (tmp_path / "runs" / "try" / "report.md").exists()


def test_own_data_an_image_array_and_idx_files_read_as_configured(tmp_path, shell):
    """"### An image array" pads 16 x 16 pixels to 32 x 32 and cuts a fifth for the test split; "### IDX files"
    reads the four files of `dir` (here gzipped) with their own split."""
    import numpy as np
    from test_images import write_idx_set

    np.savez(tmp_path / "images.npz", x=np.random.default_rng(0).integers(0, 256, (100, 16, 16), dtype=np.uint8))
    (tmp_path / "array.toml").write_text(code_block(OWN, "### An image array", "toml"))
    done = shell("ddmkit partition --config array.toml --out runs/array --set partition.k=2"
                 " --set evaluate.kid_subset=20")
    assert done.returncode == 0, done.stderr
    assert "80 train / 20 test samples of shape (1, 32, 32)" in done.stderr
    config = code_block(OWN, "### IDX files", "toml")
    assert 'dir = "/data/kmnist"' in config
    write_idx_set(tmp_path / "kmnist", n_train=60, n_test=30, size=28)
    (tmp_path / "idx.toml").write_text(config.replace("/data/kmnist", "kmnist"))
    done = shell("ddmkit partition --config idx.toml --out runs/idx --set partition.k=2 --set evaluate.kid_subset=20")
    assert done.returncode == 0, done.stderr
    assert "60 train / 30 test samples of shape (1, 32, 32)" in done.stderr


def test_own_data_a_dataset_function_partitions_as_written(tmp_path, shell):
    """"## A dataset function": mydata.py and spirals.toml as written; the shell line partitions them, labels and
    `turns` reaching the data."""
    from ddmkit.io import load_tensors

    (tmp_path / "mydata.py").write_text(code_block(OWN, "`mydata.py`:"))
    (tmp_path / "spirals.toml").write_text(code_block(OWN, "`spirals.toml`:", "toml"))
    line, = code_block(OWN, "`spirals.toml`:", "").splitlines()
    done = shell(line + " --set partition.k=2")
    assert done.returncode == 0, done.stderr
    assert "20000 train / 16000 test samples of shape (2,)" in done.stderr
    shard = load_tensors(tmp_path / "runs/spirals/partition/shards/cluster_00.safetensors")
    assert set(shard) >= {"x", "labels"}, set(shard)
    done = shell("ddmkit partition --config spirals.toml --out runs/no-path")  # the folder not on the path
    assert done.returncode == 2 and "no module 'mydata'" in done.stderr and "PYTHONPATH=. ddmkit" in done.stderr


def test_own_data_every_config_of_the_page_is_a_valid_config(tmp_path):
    """Each ```toml block of docs/own-data.md, the [partition] lines for an encoder too, loads as a run config."""
    from ddmkit.config import load_config

    blocks = re.findall(r"^```toml\n(.*?)^```$", prose(OWN), flags=re.S | re.M)
    assert len(blocks) == 9
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.toml").write_text(block)
        load_config(tmp_path / f"{i}.toml")


TINY_MIXTURE = ("expert.train.steps=10", "router.train.steps=10", "sample.n=200", "sample.steps=4",
                "evaluate.chunk=100", "evaluate.study_n=100", "evaluate.missing_experts=false",
                "evaluate.stats_router=false")


@pytest.mark.parametrize("settings", [TINY_MIXTURE, pytest.param((), marks=pytest.mark.slow)],
                         ids=["a-few-steps", "as-written"])
def test_own_data_a_mixture_in_the_config_reports_its_exact_rows_first(tmp_path, shell, settings):
    """"## A Gaussian mixture written in the config": `ddmkit run mixture.toml --out runs/mixture` (a few steps, or
    as written: slow) writes a report whose table starts with the noise floor and the exact DDM's row."""
    (tmp_path / "mixture.toml").write_text(code_block(OWN, "`mixture.toml`:", "toml"))
    line = re.search(r"`(ddmkit run mixture\.toml --out runs/mixture)`", prose(OWN)).group(1)
    done = shell(line + "".join(f" --set {field}" for field in settings))
    assert done.returncode == 0, done.stderr
    table = [row for row in (tmp_path / "runs/mixture/report.md").read_text().splitlines() if row.startswith("| ")]
    rows = [row.split("|")[1].strip() for row in table]
    first = rows.index("strategy") + 1
    exact = re.search(r"starts with the noise floor and `([^`]+)` rows", prose(OWN)).group(1)
    assert rows[first:first + 2] == ["noise floor (true vs true)", exact], rows


def test_own_data_the_tiny_encoder_partitions_the_two_kinds_of_image_apart(tmp_path, shell):
    """"## Partition on a pretrained encoder", "Try it": make_tiny.py and encoder.toml as written, the three shell
    lines, the cluster sizes the page prints, each cluster one kind of image, and the manifest's features."""
    from ddmkit.io import load_tensors

    (tmp_path / "make_tiny.py").write_text(code_block(OWN, "`make_tiny.py`:"))
    (tmp_path / "encoder.toml").write_text(code_block(OWN, "`encoder.toml`:", "toml"))
    lines = code_block(OWN, "`encoder.toml`:", "").splitlines()
    made, partitioned, printed = (shell(line) for line in lines)
    assert made.returncode == 0 and partitioned.returncode == 0, partitioned.stderr
    sizes = re.search(r"prints `cluster sizes \[([\d, ]+)\]` on a CPU", prose(OWN)).group(1).split(", ")
    printed_sizes = re.search(r"cluster sizes \[([\d, ]+)\]", partitioned.stderr).group(1).split(", ")
    on_cpu = not torch.cuda.is_available()  # the encoder runs on the GPU where there is one
    assert printed_sizes == sizes if on_cpu else sorted(printed_sizes) == sorted(sizes), partitioned.stderr
    bright = [float((load_tensors(tmp_path / f"runs/encoder/partition/shards/cluster_0{i}.safetensors")["x"]
                     [:, 0, :, 8:] > 0).float().mean()) for i in (0, 1)]
    assert sorted(bright) == [0.0, 1.0], bright
    features = eval(printed.stdout)
    assert features["kind"] == "encoder" and features["model_type"] == "dinov2" and features["pool"] == "cls"


def test_own_data_your_network_runs_samples_and_is_refused_as_printed(tmp_path, shell):
    """"## Your network": mynets.py and mynets.toml as written (a few steps) run; `ddmkit sample` with the config
    samples and without it prints the page's message; the Python snippet gives (1000, 2) samples; and the velocity
    the page describes, one column too many, stops the run with the page's message and exit 2."""
    nets = code_block(OWN, "`mynets.py`:")
    (tmp_path / "mynets.py").write_text(nets)
    (tmp_path / "mynets.toml").write_text(shrunk(
        code_block(OWN, "`mynets.toml`:", "toml"), ("steps = 500", "steps = 20"), ("n = 2000", "n = 200"),
        ("chunk = 500", "chunk = 100\nstudy_n = 100\nmissing_experts = false\nstats_router = false")))
    line, = code_block(OWN, "`mynets.toml`:", "").splitlines()
    (tmp_path / "as_written.toml").write_text(code_block(OWN, "`mynets.toml`:", "toml"))
    done = shell("PYTHONPATH=. ddmkit partition --config as_written.toml --out runs/checked")
    assert done.returncode == 0, done.stderr  # the page's sizes pass the checks made before training
    done = shell(line)
    assert done.returncode == 0, done.stderr
    with_config, without = code_block(OWN, "refuse without it:", "").splitlines()
    assert shell(with_config + " --n 50").returncode == 0
    done = shell(without)
    printed = said(code_block(OWN, without + "\n```", ""))
    assert done.returncode == 2 and " ".join(done.stderr.split()) == printed, done.stderr

    (tmp_path / "from_python.py").write_text(code_block(OWN, "register\nthe classes before loading"))
    namespace = shell("python from_python.py").globals
    x0, info = namespace["x0"], namespace["info"]
    assert x0.shape == (1000, 2) and bool(torch.isfinite(x0).all()) and info["strategy"] == "top-2"

    (tmp_path / "mynets.py").write_text(shrunk(nets, ("nn.Linear(width, dim))", "nn.Linear(width, dim + 1))"),
                                               ("return self.net(h).view_as(x)", "return self.net(h)")))
    done = shell(line.replace("runs/mine", "runs/wrong"))
    printed = said(code_block(OWN, "last layer of `dim + 1` outputs):", ""))
    assert done.returncode == 2 and " ".join(done.stderr.split()) == printed, done.stderr
    assert not (tmp_path / "runs" / "wrong").exists()


# docs/cli.md "Every command and its options": one section per command, one bullet per argument or option.

def cli_md_sections() -> dict[tuple[str, ...], list[str]]:
    """{command words: the bullets of its section} of docs/cli.md's command reference (a section may be of two
    commands); a bullet is its lines joined."""
    text = prose(ROOT / "docs" / "cli.md").split("## Every command and its options", 1)[1]
    out = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        heading, body = section.split("\n", 1)
        bullets = [" ".join(b.split()) for b in re.findall(r"^- (.*?)(?=^- |^$|\Z)", body, flags=re.M | re.S)]
        for words in re.findall(r"`ddmkit ([a-z -]+)`", heading):
            out[tuple(words.split())] = bullets
    return out


def documented_names(bullet: str) -> list[str]:
    """The arguments and options a bullet is about: those in backquotes before its first ': '."""
    return re.findall(r"`(--[a-z][a-z0-9-]*|[A-Z]+)`", bullet.split(": ", 1)[0])


def cli_parameters(command) -> dict[str, object]:
    """{`--option` or ARGUMENT: its click parameter} of a command, --help left out."""
    return {(p.opts[0] if p.param_type_name == "option" else (p.metavar or p.name.upper())): p
            for p in command.params if p.name != "help"}


def test_every_flag_has_its_no_flag_as_cli_md_says():
    """docs/cli.md says a flag `--X` has its `--no-X` (naming the lone flags, off unless given): `ddmkit text run
    --force` had no --no-force, while every other command's --force has one."""
    import typer

    from ddmkit.cli import app
    from test_cli_conventions import commands

    page = " ".join(prose(ROOT / "docs" / "cli.md").split())
    rule = re.search(r"A flag `--X` has its `--no-X`(?: \(([^)]*)\))?", page)
    assert rule, "docs/cli.md no longer says that a flag --X has its --no-X"
    lone = set(re.findall(r"`(--[a-z][a-z0-9-]*)`", rule.group(1) or ""))
    flags = [(words, p) for words, command in commands(typer.main.get_command(app)) for p in command.params
             if getattr(p, "is_flag", False) and p.name != "help"]
    assert len(flags) > 10
    for words, p in flags:
        name = f"ddmkit {' '.join(words)} {p.opts[0]}"
        if p.opts[0] in lone:
            assert not p.secondary_opts, f"{name}: docs/cli.md calls it a lone flag, but it has {p.secondary_opts}"
        else:
            assert p.secondary_opts == [f"--no-{p.opts[0][2:]}"], f"{name}: a flag without its --no- form"


def test_cli_md_documents_every_command_and_option_of_the_help():
    """Each command of `ddmkit --help` (sub-commands too) has its section in docs/cli.md, which names each of its
    arguments and options and no other, and the default --help shows for each option that has one."""
    import typer

    from ddmkit.cli import app
    from test_cli_conventions import commands

    sections = cli_md_sections()
    real = dict(commands(typer.main.get_command(app)))
    assert set(sections) == set(real), f"sections of no command or commands without one: {set(sections) ^ set(real)}"
    for words, command in real.items():
        params = cli_parameters(command)
        bullets = sections[words]
        named = {name: bullet for bullet in bullets for name in documented_names(bullet)}
        documented_elsewhere = {name for other in real if sections[other] is bullets  # a section of two commands
                                for key, p in cli_parameters(real[other]).items()
                                for name in (key, *getattr(p, "opts", ()))}  # with an option's other names
        assert not set(params) - set(named), f"ddmkit {' '.join(words)}: not in docs/cli.md: {set(params) - set(named)}"
        assert not set(named) - documented_elsewhere, \
            f"ddmkit {' '.join(words)}: docs/cli.md names options it lacks: {set(named) - documented_elsewhere}"
        for name, p in params.items():
            if p.param_type_name != "option" or p.default is None or p.required or p.is_flag:
                continue
            default = p.default if not isinstance(p.default, list) else ", ".join(map(str, p.default))
            assert f"`{default}`" in named[name], f"ddmkit {' '.join(words)} {name}: docs/cli.md lacks its default " \
                                                  f"`{default}`: {named[name]}"


# The benchmark commands a researcher copies to reproduce the speed numbers: each names a script that exists and
# only options its parser accepts (checked without running the benchmark).

BENCHMARKS = ROOT / "benchmarks"
FORWARDS = {"gpu_images.sh training": "training"}  # a driver stage that hands its further options to a script


class Caught(Exception):
    pass


def benchmark_options(script: str, monkeypatch) -> set[str]:
    """The option strings (--x) of benchmarks/SCRIPT.py's argparse parser: the script is imported, and its parser
    is caught where it would parse the command line."""
    def catch(parser, *args, **kwargs):
        raise Caught(parser)

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(Caught) as caught:
        (getattr(module, "parse_args", None) or module.main)()
    parser = caught.value.args[0]
    return {option for action in parser._actions for option in action.option_strings}


def benchmark_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, its --options) of every `python benchmarks/SCRIPT.py ...` command in `text` (and of every driver
    stage in FORWARDS); a line ending in a backslash goes on, a backquoted span may go on to the next line, and a
    command ends at a backquote, a '#', a '|' or the end of its line."""
    text = re.sub(r"\\\\?\n\s*", " ", text)  # a docstring writes the backslash doubled
    text = re.sub(r"`[^`\n]*\n[^`\n]*`", lambda m: " ".join(m.group(0).split()), text)
    stages = "|".join(re.escape(stage) for stage in FORWARDS)
    found = []
    for m in re.finditer(rf"(?:python3? benchmarks/(\w+)\.py|bash benchmarks/({stages}))\b([^`#|\n]*)", text):
        script = m.group(1) or FORWARDS[m.group(2)]
        found.append((script, re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(3))))
    return found


COMMAND_SOURCES = sorted([*PAGES, *BENCHMARKS.glob("*.py"), *BENCHMARKS.glob("*.sh")])


def test_the_benchmark_commands_name_scripts_and_options_that_exist(monkeypatch):
    """Every benchmark command of the pages (docs/performance.md's measured tables, benchmarks/README.md), of the
    scripts' docstrings and of the GPU drivers runs a script that exists with options its parser accepts."""
    commands = [(source, script, flags) for source in COMMAND_SOURCES
                for script, flags in benchmark_commands(source.read_text())]
    assert len(commands) > 25 and {"sampling", "training", "text_seeds"} <= {script for _, script, _ in commands}
    options, wrong = {}, []
    for source, script, flags in commands:
        where = f"{source.relative_to(ROOT)}: benchmarks/{script}.py"
        if not (BENCHMARKS / f"{script}.py").exists():
            wrong.append(f"{where}: no such script")
            continue
        if script not in options:
            options[script] = benchmark_options(script, monkeypatch)
        wrong += [f"{where}: no option {flag}" for flag in flags if flag not in options[script]]
    assert not wrong, "\n".join(wrong)


def test_the_benchmark_command_check_finds_a_stale_script_and_option(monkeypatch):
    text = ("    python benchmarks/sampling.py --ks 8 \\\n        --speed graphs   # --not-this\n"
            "`python benchmarks/gone.py --x` and `bash benchmarks/gpu_images.sh training --mode stacked\n"
            "  --only \"experts, bf16\"` (`--y`)")
    assert benchmark_commands(text) == [("sampling", ["--ks", "--speed"]), ("gone", ["--x"]),
                                        ("training", ["--mode", "--only"])]
    assert {"--quick", "--mode", "--nets", "--compile-mode"} <= benchmark_options("training", monkeypatch)
    assert "--ks" not in benchmark_options("training", monkeypatch)


# The ddmkit commands a researcher copies (code blocks, `inline code`, the config files' comments): each names a
# command of the CLI and options it takes, with values of their kind (strategies and stages as the command checks
# them), and each --set a field of the config; read by the CLI's own parser and checks, nothing run.

COMMAND_PAGES = sorted([*PAGES, *(ROOT / "configs").glob("*.toml")])
SHOWN_REFUSED = {"docs/cli.md": {"expert.train.stepz"}}  # --set fields written to show the error they give


def code_blocks(lines: list[str]) -> list[tuple[str | None, int, int]]:
    """(language, first, end) of each code block of a page's lines, its code being lines[first:end]: fenced
    (```LANG; language "" when none) or indented by four spaces after a blank line (language None)."""
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"```(\w*)$", lines[i])
        if fence:
            end = lines.index("```", i + 1)
            blocks.append((fence.group(1), i + 1, end))
            i = end + 1
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append((None, i, end))
            i = end
        else:
            i += 1
    return blocks


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of a page: each line of its code blocks but Python ones and printed errors (a line
    ending in a backslash goes on), then each `inline span` (on one line; a table's `\\|` read as `|`); of a
    config file, its comments."""
    lines = path.read_text().split("\n")
    if path.suffix == ".toml":
        return [(n, line.split("#", 1)[1]) for n, line in enumerate(lines, 1) if "#" in line]
    found, prose_only = [], list(lines)
    for lang, first, end in code_blocks(lines):
        start, stop = (first, end) if lang is None else (first - 1, end + 1)  # a fenced block with its fences
        prose_only[start:stop] = [""] * (stop - start)
        i = first
        while i < end:
            n, line = i + 1, lines[i]
            while line.endswith("\\") and i + 1 < end:
                i += 1
                line = line[:-1] + " " + lines[i]
            if lang != "python" and not line.strip().startswith(("error:", "warning:")):
                found.append((n, line))
            i += 1
    prose = "\n".join(prose_only)
    for span in re.finditer(r"`([^`]+)`", prose):
        found.append((prose.count("\n", 0, span.start()) + 1, " ".join(span.group(1).replace("\\|", "|").split())))
    return found


def is_placeholder(word: str) -> bool:
    """Whether a word stands for a value of the reader's: RUN, N, RUN/config.json, FIELD=VALUE, $K, cluster_$i."""
    return "$" in word or bool(re.search(r"(?<![\w-])[A-Z][A-Z0-9_]*(?![\w-])", word))


def ddmkit_commands(code: str) -> list[list[str]]:
    """The words after `ddmkit` of each command in a line of code. A command ends at a '#', '&&', ';', ' | ', a
    parenthesis, a backquote or the line's end; `[--optional parts]` count as written, '...' is left out, and a
    word `a|b` gives one command per alternative. Prose (`ddmkit 0.1.0`, `(ddmkit distill, distill.md)`) is none."""
    found = []
    for m in re.finditer(r"(?<![\w./'\"-])(?<!from |port )ddmkit ([^#;()`]*?)(?=#|&&|;| \| |[()`]|$)", code):
        text = re.sub(r"\[(-[^\[\]]*)\]", r"\1", m.group(1))
        try:
            words = [w for w in shlex.split(text) if w != "..."]
        except ValueError:  # an unclosed quote
            words = [w for w in text.split() if w != "..."]
        if not words or not re.fullmatch(r"-.*|[a-zA-Z][\w-]*", words[0]):
            continue
        found += [list(c) for c in itertools.product(*(word.split("|") for word in words))]
    return found


@functools.cache
def ddmkit_group():
    """The CLI as a click group (built once: each build reads every command's signature)."""
    import typer

    from ddmkit.cli import app
    return typer.main.get_command(app)


def one_of(accepted: tuple[str, ...]):
    """A check of a value among `accepted` (a DDMError naming them)."""
    def check(value: str) -> None:
        if value not in accepted:
            raise DDMError(f"unknown value {value!r}; accepted: {', '.join(accepted)}")
    return check


@functools.cache
def checked_later() -> dict[tuple[str, str], typing.Callable[[str], object]]:
    """{(command, parameter): check} of the values the CLI takes as text and checks when the command runs, each
    check the command's own: routing strategies (sample: its config's sample.strategies, but exact; analyze,
    study misalignment, distill's --teacher: their own checks), stages (the command's accepted ones) and Ray
    addresses (no ray://)."""
    from ddmkit.config import SampleConfig, validate
    from ddmkit.launch.ray_backend import check_address
    from ddmkit.pipeline.analyze import check_strategies
    from ddmkit.pipeline.distill import check_teacher
    from ddmkit.pipeline.misalignment import STUDY_STAGES, strategy_names
    from ddmkit.pipeline.run import STAGES
    from ddmkit.pipeline.sweep import SWEEP_STAGES

    def sampled(name: str) -> None:
        if name.strip() != "exact":
            validate(SampleConfig, {"strategies": [name]}, "--strategy")

    return {("ddmkit sample", "strategy"): sampled, ("ddmkit analyze", "strategy"): lambda n: check_strategies([n]),
            ("ddmkit study misalignment", "strategy"): lambda names: strategy_names([names]),
            ("ddmkit distill", "teacher"): check_teacher, ("ddmkit run", "stages"): one_of(STAGES),
            ("ddmkit sweep", "stages"): one_of(SWEEP_STAGES),
            ("ddmkit study misalignment", "stages"): one_of(STUDY_STAGES),
            ("ddmkit run", "address"): check_address, ("ddmkit launch", "address"): check_address}


def set_strategies(item: str) -> None:
    """A --set FIELD=VALUE of a strategies field (sample.strategies, sample.stats_router_strategies,
    sample.sweep_strategy; a text config's evaluate.strategies) as its config section validates it."""
    from ddmkit.config import SampleConfig, apply_overrides, validate
    from ddmkit.discrete.config import TextEvalConfig

    field = item.partition("=")[0].strip()
    section, _, key = field.partition(".")
    model = {"sample": SampleConfig, "evaluate": TextEvalConfig}.get(section)
    if model is not None and "strateg" in key:
        validate(model, {key: apply_overrides({}, [item])[section][key]}, f"--set {field}")


def check_later(command: str, param: str, value: str) -> None:
    """A DDMError where the command, when it runs, would refuse this value of a parameter its parser took."""
    if param == "set_":
        set_strategies(value)
    elif (command, param) in checked_later():
        checked_later()[command, param](value)


def command_errors(words: list[str]) -> list[str]:
    """What is wrong with `ddmkit WORDS`: a command or option the CLI lacks, a value not of its option's kind
    (checked_later: as the command checks it when it runs; the strategies of a --set), an extra argument. RUN,
    N, $K ... stand for any value; a command may leave out its arguments, and the value of its last option
    (`ddmkit sample --n`)."""
    import typer

    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    command, words, name = ddmkit_group(), list(words), "ddmkit"
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        if is_placeholder(words[0]):  # ddmkit COMMAND --help
            return []
        if words[0] not in command.commands:
            return [f"no command `{name} {words[0]}`"]
        name += " " + words[0]
        command = command.commands[words.pop(0)]
    ctx = command.make_context(name, [], resilient_parsing=True)
    ctx.resilient_parsing = False  # from here on, a wrong word is an error
    params = [p for p in command.get_params(ctx) if not p.is_eager]  # --help, --version: they print, and exit
    takes_a_value = {opt for p in params if p.param_type_name == "option" and not p.is_flag for opt in p.opts}
    if words and words[-1] in takes_a_value:
        words.pop()
    try:
        given, extra, _ = command.make_parser(ctx).parse_args(args=words)
    except usage_error as err:
        return [f"`{name}`: {err.format_message()}"]
    errors = [f"`{name}`: an extra argument {word}" for word in extra if not is_placeholder(word)]
    for p in params:
        values = given.get(p.name)
        for value in values if isinstance(values, list) else [] if values is None else [values]:
            if isinstance(value, str) and is_placeholder(value):
                continue
            try:
                p.process_value(ctx, [value] if p.multiple else value)
                check_later(name, p.name, value)
            except usage_error as err:
                errors.append(f"`{name}`: {err.format_message()}")
            except DDMError as err:
                errors.append(f"`{name}`: {p.opts[0]} {value}: {' '.join(str(err).split())}")
    return errors


def stale_commands(path: Path, root: Path = ROOT) -> list[str]:
    """'PAGE:LINE: what is wrong' for each ddmkit command of a page that the CLI would not take."""
    return [f"{path.relative_to(root)}:{n}: {error}" for n, code in code_lines(path)
            for words in ddmkit_commands(code) for error in command_errors(words)]


def test_the_ddmkit_commands_name_commands_and_options_that_exist():
    """Every `ddmkit ...` of the pages and of the config files' comments is a command of `ddmkit --help` with
    options it takes, each with a value of its kind (a whole number where one goes; a routing strategy or a stage
    the command takes, and strategies a --set sample.strategies=[...] gives) and no extra argument."""
    commands = [words for path in COMMAND_PAGES for _, code in code_lines(path) for words in ddmkit_commands(code)]
    assert len(commands) > 300 and {"sweep", "launch", "study", "text", "theory"} <= {words[0] for words in commands}
    wrong = [line for path in COMMAND_PAGES for line in stale_commands(path)]
    assert not wrong, "\n".join(wrong)


def test_the_ddmkit_command_check_finds_a_stale_command_option_and_value(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `ddmkit sample RUN --speed fast` (`ddmkit sample --n`, `ddmkit 0.1.0`).\n\n"
                    "```bash\n"
                    "ddmkit sweep CONFIG --k 2 \\\n"
                    "  --k 2,4 && ddmkit train-experts SHARD  # ddmkit demo\n"
                    "```\n\n"
                    "    ddmkit run CONFIG [--stages train|evaluate] --seed $S --budget 1\n\n"
                    "```python\nfrom ddmkit import DDM\n```\n"
                    "| `ddmkit sample R --n N extra` |\n")
    assert [words for _, code in code_lines(page) for words in ddmkit_commands(code)] == [
        ["sweep", "CONFIG", "--k", "2", "--k", "2,4"], ["train-experts", "SHARD"], ["demo"],
        ["run", "CONFIG", "--stages", "train", "--seed", "$S", "--budget", "1"],
        ["run", "CONFIG", "--stages", "evaluate", "--seed", "$S", "--budget", "1"],
        ["sample", "RUN", "--speed", "fast"], ["sample", "--n"], ["sample", "R", "--n", "N", "extra"]]
    found = stale_commands(page, tmp_path)
    expected = ["page.md:4: `ddmkit sweep`: Invalid value for '--k'",
                "page.md:4: no command `ddmkit train-experts`",
                *["page.md:8: `ddmkit run`: No such option: --budget"] * 2,
                "page.md:1: `ddmkit sample`: No such option: --speed",
                "page.md:13: `ddmkit sample`: an extra argument extra"]
    assert len(found) == len(expected) and all(map(str.startswith, found, expected)), found


def test_the_ddmkit_command_check_finds_a_stale_strategy_stage_and_address(tmp_path):
    """Values the CLI takes as text and checks when the command runs (checked_later), each as its command reads
    them; every command with a --strategy, --teacher, --stages or --address has its check."""
    page = tmp_path / "page.md"
    page.write_text("    ddmkit sample RUN --strategy exact --strategy monolith --strategy top-3x \\\n"
                    "      --strategy gated-2@30\n"
                    "    ddmkit analyze RUN --strategy gated-2@30 --strategy STRATEGY --strategy nucleus-2\n"
                    "    ddmkit study misalignment C --strategy full,top-1 --strategy full,swich --stages evaluate\n"
                    "    ddmkit distill RUN --teacher oracle\n"
                    "    ddmkit run C --stages evaluation --set 'sample.strategies=[\"monolith\", \"tpo-1\"]'\n"
                    "    ddmkit sweep C --stages report --set 'sample.stats_router_strategies=[]' "
                    "--set 'sample.sweep_strategy=top-1' --set sample.n=10\n"
                    "    ddmkit text run C --set 'evaluate.strategies=[\"oracle\"]'\n"
                    "    ddmkit launch RUN --backend ray --address ray://head:10001\n"
                    "    ddmkit run C --backend ray --address head:6379 && ddmkit launch RUN --address auto\n")
    found = stale_commands(page, tmp_path)
    expected = ["page.md:1: `ddmkit sample`: --strategy top-3x: --strategy: invalid configuration strategies: "
                "strategy 'top-3x' is not a name of the form top-K",
                "page.md:1: `ddmkit sample`: --strategy gated-2@30: --strategy: invalid configuration strategies: "
                "strategy 'gated-2@30' compares the experts' velocities, which only the analysis sampler gives",
                "page.md:3: `ddmkit analyze`: --strategy nucleus-2: --strategy: strategy 'nucleus-2': P must be in",
                "page.md:4: `ddmkit study misalignment`: --strategy full,swich: --strategy: unknown routing strategy "
                "'swich'; did you mean 'switch'?",
                "page.md:4: `ddmkit study misalignment`: --stages evaluate: unknown value 'evaluate'; accepted: all, "
                "train, report",
                "page.md:5: `ddmkit distill`: --teacher oracle: --teacher oracle: this strategy depends on the whole",
                "page.md:6: `ddmkit run`: --stages evaluation: unknown value 'evaluation'; accepted: all, train, "
                "evaluate",
                "page.md:6: `ddmkit run`: --set sample.strategies=[\"monolith\", \"tpo-1\"]: --set sample.strategies: "
                "invalid configuration strategies: unknown routing strategy 'tpo-1'; did you mean 'top-1'?",
                "page.md:8: `ddmkit text run`: --set evaluate.strategies=[\"oracle\"]: --set evaluate.strategies: "
                "invalid configuration strategies: strategy 'oracle' needs continuous-data state",
                "page.md:9: `ddmkit launch`: --address ray://head:10001: --address ray://head:10001: Ray Client"]
    assert len(found) == len(expected) and all(map(str.startswith, found, expected)), "\n".join(found)
    from test_cli_conventions import commands
    options = {(" ".join(("ddmkit", *words)), p.name) for words, command in commands(ddmkit_group())
               for p in command.params if p.name in ("strategy", "teacher", "stages", "address")}
    assert options == set(checked_later()), options ^ set(checked_later())


def set_fields(code: str) -> list[str]:
    """The field of each `--set FIELD=VALUE` in a line of code (none for a placeholder: FIELD, expert.FIELD)."""
    return [field for field in re.findall(r"--set[ =]+['\"]?([\w.]+)=", code) if not is_placeholder(field)]


def config_field(field: str) -> bool:
    """Whether a dotted --set field (expert.train.steps) is one of a run config or of a text config; below a
    field that is a table of any names (expert.net.kwargs, data.params), any name is."""
    from ddmkit.config import RunConfig
    from ddmkit.discrete.config import TextRunConfig

    def at(model, keys: list[str]) -> bool:
        field = model.model_fields.get(keys[0])
        if field is None:
            return False
        kind = field.annotation
        models = [a for a in (kind, *typing.get_args(kind)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if models and len(keys) > 1:
            return at(models[0], keys[1:])
        return len(keys) == 1 or typing.get_origin(kind) is dict or kind is dict

    return any(at(model, field.split(".")) for model in (RunConfig, TextRunConfig))


def test_every_set_of_the_pages_names_a_config_field():
    """Every `--set FIELD=VALUE` of the pages (in a ddmkit command or alone) names a field of a run config or of a
    text config, but those written to show the error (SHOWN_REFUSED), which the check refuses."""
    sets = [(str(path.relative_to(ROOT)), n, field) for path in COMMAND_PAGES for n, code in code_lines(path)
            for field in set_fields(code)]
    assert len(sets) > 30 and {"corpus.max_docs", "expert.train.parallel", "sample.strategies"} <= {f for *_, f in sets}
    for where, shown in SHOWN_REFUSED.items():
        assert shown <= {field for page, _, field in sets if page == where}, f"{where} no longer shows {shown}"
        assert not any(config_field(field) for field in shown)
    wrong = [f"{where}:{n}: --set {field}: no such field of a run config or a text config"
             for where, n, field in sets if not config_field(field) and field not in SHOWN_REFUSED.get(where, ())]
    assert not wrong, "\n".join(wrong)


def test_the_set_check_finds_a_field_no_config_has():
    assert set_fields("ddmkit run C --set expert.train.steps=3 --set 'sample.strategies=[\"full\"]' --set A=B "
                      "--set expert.FIELD=VALUE") == ["expert.train.steps", "sample.strategies"]
    assert all(map(config_field, ["expert.train.steps", "corpus.max_docs", "expert.net.kwargs.width",
                                  "data.params.path", "latent.encode_batch", "expert.net"]))
    assert not any(map(config_field, ["expert.train.stepz", "expert.train.steps.x", "corpus.nope", "nope.k"]))
