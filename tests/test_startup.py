"""A command starts without the heavy libraries it may never use: scikit-learn (clustering), scipy.stats
(intervals, correlations), matplotlib (plots) and POT (exact W2) are imported where they are used, so
`ddmkit --help`, `ddmkit sample` or `ddmkit train-expert` do not pay seconds for them at start-up."""
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).parents[1] / "src")
HEAVY = ("sklearn", "scipy.stats", "matplotlib", "ot")
# what the commands that train, sample and score import before they start working
COMMAND_MODULES = ("ddmkit.cli", "ddmkit.pipeline.run", "ddmkit.pipeline.text", "ddmkit.pipeline.images",
                   "ddmkit.pipeline.vectors", "ddmkit.pipeline.stages", "ddmkit.pipeline.sweep",
                   "ddmkit.pipeline.analyze", "ddmkit.train.jobs", "ddmkit.data.partition")


def loaded_after_importing(modules) -> list[str]:
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(' '.join(h for h in {HEAVY!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC},
                         check=True)
    return out.stdout.split()


def test_commands_start_without_the_heavy_libraries():
    assert loaded_after_importing(COMMAND_MODULES) == []


def test_the_check_sees_a_heavy_import():
    assert loaded_after_importing(("sklearn.cluster",)) == ["sklearn", "scipy.stats"]
