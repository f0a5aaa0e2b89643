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


def test_the_grow_convert_distill_driver_refuses_a_run_name_it_does_not_know(tmp_path):
    """gpu_grow_convert_distill.sh train took any name but fm for vp (`train fm mixed` trained a VP run into
    runs/gcd/mixed); a name its stage does not know is refused before anything runs. A stand-in python3 records
    what would run (the driver, run in a folder of its own, copies no carried files)."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "benchmarks").mkdir()
    for name in ("gpu_setup.sh", "gpu_grow_convert_distill.sh"):
        shutil.copy(root / "benchmarks" / name, tmp_path / "benchmarks" / name)
    (tmp_path / "bin").mkdir()
    python3 = tmp_path / "bin" / "python3"
    python3.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "ran.txt"}\n')
    python3.chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "R": str(tmp_path / "runs"),
           "HOME": str(tmp_path)}

    def driver(*args):
        return subprocess.run(["bash", "benchmarks/gpu_grow_convert_distill.sh", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    for args in (("train", "fm", "mixed"), ("evaluate", "vp", "everything")):
        done = driver(*args)
        assert done.returncode == 2 and f"no run '{args[2]}'" in done.stdout, (done.stdout, done.stderr)
        assert not (tmp_path / "ran.txt").exists()
    done = driver("train", "vp")  # a known name runs (here the stand-in)
    assert done.returncode == 0 and "expert.path.kind=vp" in (tmp_path / "ran.txt").read_text()


def test_training_fit_rows_train_as_fit_does_with_and_without_the_graph(monkeypatch):
    """training.py's "(fit)" rows time fit()'s own step: "eager (fit)" as fit() trains by default (neither
    compiled nor graphed), the "CUDA graph (fit)" rows with train.compile and train.cuda_graph on, so their
    ratio is one of equal work per step (clipping and the EMA in both)."""
    import contextlib

    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    training = importlib.import_module("training")
    args = training.parse_args(["--quick"])
    seen = []

    def fake_fit(model, batch_loss, cfg, device):
        seen.append((cfg.compile, cfg.cuda_graph, cfg.batch_size))
        return model, [{"step": args.warmup, "seconds": 1.0, "loss": 1.0},
                       {"step": args.warmup + args.steps, "seconds": 1.0 + 0.01 * args.steps, "loss": 1.0}]

    monkeypatch.setattr(training, "fit", fake_fit)
    cpu = training.torch.device("cpu")
    eager = training.measure("eager (fit)", 8, args, cpu, contextlib.nullcontext)
    training.measure("compile, CUDA graph (fit)", 8, args, cpu, contextlib.nullcontext)
    assert seen == [(False, False, 8), (True, True, 8)]
    assert eager["ms_per_step"] == pytest.approx(10.0) and eager["samples_per_s"] == pytest.approx(800.0)
