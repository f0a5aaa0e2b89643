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


# one network of each built-in architecture, class-conditional where it can be (an nn.Embedding)
NETWORKS = [("mlp", {"data_shape": [2]}), ("router_mlp", {"data_shape": [2], "num_experts": 3}),
            ("unet", {"data_shape": [1, 16, 16], "channels": [8, 16], "num_classes": 10}),
            ("dit", {"data_shape": [4, 8, 8], "patch": 2, "width": 32, "depth": 2, "heads": 2, "num_classes": 10}),
            ("router_cnn", {"data_shape": [1, 16, 16], "num_experts": 3, "channels": [8, 16], "num_classes": 10}),
            ("causal_transformer", {"seq_len": 8, "out_dim": 5, "width": 16, "heads": 2}),
            ("bidirectional_transformer", {"seq_len": 8, "out_dim": 5, "width": 16, "heads": 2})]


def test_checking_that_a_network_builds_does_not_import_torchs_compiler():
    """A command checks its networks on the meta device before any work (check_builds, a model folder's check);
    nn.init.normal_ (an nn.Embedding's) and the DiT's positions ran torch's meta kernels, which import
    torch._dynamo: seconds at the start of every command of a class-conditional or DiT run."""
    code = ("import sys\nfrom ddmkit.nets.folders import check_builds\n"
            f"for arch, kwargs in {NETWORKS!r}:\n"
            "    check_builds(arch, kwargs, 'expert.net')\n"
            "    print(arch, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}, check=True)
    assert out.stdout.split() == [word for arch, _ in NETWORKS for word in (arch, "False")]
