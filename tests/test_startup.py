"""A command starts without the heavy libraries it may never use: scikit-learn (clustering), scipy.stats
(intervals, correlations), matplotlib (plots) and POT (exact W2) are imported where they are used, so
`ddmkit --help`, `ddmkit sample` or `ddmkit train-expert` do not pay seconds for them at start-up."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def faults_of_freeing_and_allocating(keep: bool, env: dict | None = None) -> int:
    """Page faults of allocating and freeing two 4 MB arrays 50 times, in a fresh process, after
    ddmkit.__main__.keep_freed_memory (keep) or not."""
    code = ("import resource, numpy as np\n"
            + ("from ddmkit.__main__ import keep_freed_memory\nkeep_freed_memory()\n" if keep else "")
            + "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(50):\n    a, b = np.ones(1 << 20, np.float32), np.ones(1 << 20, np.float32)\n    del a, b\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**clean, "PYTHONPATH": SRC, **(env or {})})
    return int(out.stdout)


def on_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no os.confstr, no such name, or no value
        return False


@pytest.mark.skipif(not on_glibc(), reason="glibc's malloc only")
def test_the_command_keeps_the_memory_it_frees_for_its_next_allocations():
    """glibc hands freed blocks of a few MB back to the system, and they are page-faulted in again at the next
    allocation; the command's start (keep_freed_memory) has it keep them: the arrays' pages fault in once."""
    pages = 2 * (4 << 20) // 4096
    assert faults_of_freeing_and_allocating(keep=True) < 2 * pages < 10 * pages < faults_of_freeing_and_allocating(
        keep=False)


@pytest.mark.skipif(not on_glibc(), reason="glibc's malloc only")
def test_the_processes_the_command_starts_keep_freed_memory_too_and_a_users_setting_stays(monkeypatch):
    """keep_freed_memory puts its settings in the environment, so that the processes the command starts (spawned
    pool workers, distributed ranks) start with them: such a process faults its arrays in once too. A setting
    the user made is left as it is."""
    from ddmkit.__main__ import MALLOC_SETTINGS, keep_freed_memory

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "131072"
    keep_freed_memory()
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20) and os.environ["MALLOC_TRIM_THRESHOLD_"] == "131072"
    started = {variable: os.environ[variable] for variable, _, value in MALLOC_SETTINGS}
    started["MALLOC_TRIM_THRESHOLD_"] = str(256 << 20)
    pages = 2 * (4 << 20) // 4096
    assert faults_of_freeing_and_allocating(keep=False, env=started) < 2 * pages
