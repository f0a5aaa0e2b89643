"""The run folder: every path ddmkit reads or writes in it, named here once.

    RUN/config.json               the resolved configuration and its digest
    RUN/data/                     train/test splits, data.json (+ truth.safetensors for mixtures)
    RUN/partition/                manifest.json, partition.safetensors, shards/cluster_XX.safetensors
    RUN/autoencoder/              latent runs: the autoencoder (diffusers AutoencoderKL folder)
    RUN/latents/cluster_XX.safetensors   latent runs: each shard encoded; the networks train on these
    RUN/experts/expert_XX/        one model folder per expert (trained in isolation)
    RUN/monolith/, RUN/router/    model folders: config.json + model.safetensors + train_log.jsonl
    RUN/registry.json             SHA-256 of every model folder, checked on load
    RUN/grow.json                 experts added or replaced later (ddmkit add-expert / replace-expert)
    RUN/samples/NAME.safetensors  one sample set per name (x, and y: its labels), samples/info.json (calls, wall time)
    RUN/eval/                     cached evaluation features and per-set scores
    RUN/students/                 distilled students (ddmkit distill): dense/, few-step-S-GRID/, report.md + .json
    RUN/report.md, metrics.json, plots/, analysis/

Text runs (byte-level tokens) have the same folders (monolith/ is their centralized model, with
the experts' total compute), byte streams in the shards, no data/, and report.json beside report.md.

    run = RunFolder("runs/ring")
    run.expert(3)                 # runs/ring/experts/expert_03
    run.sample_set("top-2 @ cfg 2")   # runs/ring/samples/top-2___cfg_2.safetensors
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ddmkit.errors import DDMError


def safe_name(name: str) -> str:
    """A sample set's name as a file stem: letters, digits and '-._' kept, anything else '_'."""
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in name)


MODEL_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors")  # ddmkit's or transformers', diffusers'


def check_given(root, what: str = "the run folder") -> None:
    """A DDMError when the folder `root` is given as empty or blank text: Path('') is '.', the current folder,
    never the one meant (an unset variable, a missing argument)."""
    if isinstance(root, str) and not root.strip():
        said = "empty" if root == "" else f"only whitespace ({root!r})"
        raise DDMError(f"{what} is {said}: give its path ('.' for the current folder)")


MAKE_RUN = {"partition": "ddmkit partition --config CONFIG --out {root}", "trained": "ddmkit run CONFIG --out {root}"}


def check_run_exists(root: str | Path, needs: str = "partition") -> None:
    """A DDMError when the run folder `root` is not a folder (no such folder, or a file), or is one model
    folder (config.json + weights, no partition/: an expert, a diffusers autoencoder) rather than a run.
    `needs` says what the command needs of the run, and so how a missing one is made (MAKE_RUN): "partition"
    (training an expert or the router) or "trained" (its networks: growing, distilling, analyzing it)."""
    check_given(root)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DDMError(f"{root} is a file, not a run folder; give the folder a `ddmkit run` wrote")
    if not root.is_dir():
        raise DDMError(f"{root} is not a run folder (no such folder); give the folder a `ddmkit run` wrote (or make "
                       f"one with `{MAKE_RUN[needs].format(root=root)}`)")
    weights = next((name for name in MODEL_WEIGHTS if (root / name).is_file()), None)
    if weights is not None and (root / "config.json").is_file() and not (root / "partition").exists():
        above = enclosing_run(root)
        give = f"pass the run folder that holds it: {above}" if above else "give the folder a `ddmkit run` wrote"
        raise DDMError(f"{root} is a model folder (config.json + {weights}), not a run folder; {give}")


def is_run_folder(path: str | Path) -> bool:
    """Whether `path` holds a run: a config.json and a partition/."""
    return (Path(path) / "config.json").is_file() and (Path(path) / "partition").is_dir()


def enclosing_run(path: str | Path) -> Path | None:
    """The run folder `path` lies inside (RUN/partition, RUN/experts/expert_00 -> RUN), or None: the first
    folder above it that is_run_folder."""
    return next((above for above in Path(path).resolve().parents if is_run_folder(above)), None)


def check_outside_runs(out: str | Path, writes: str, example: str) -> None:
    """A DDMError when `out`, a folder that holds run folders of its own (a sweep's cells, a study's runs), is a
    run folder or lies inside one: `writes` says what goes into it, `example` a folder to give instead."""
    above = enclosing_run(out)
    if is_run_folder(out) or above is not None:
        where = "a ddmkit run folder" if is_run_folder(out) else f"inside the run folder {above}"
        raise DDMError(f"--out {out} is {where}; {writes}, so give a folder of its own outside any run, e.g. "
                       f"--out {example}")


STUDIES = {"misalignment": "misalignment study", "sweep": "sweep", "theory-convergence": "theory convergence study",
           "theory-distill": "theory distill study"}  # the studies that write into --out, as named
RECORDS = {"misalignment": "study.json, runs/", "sweep": "sweep.json, cell folders k{K}_b{budget}_s{seed}/",
           "theory-convergence": "report.md, results.json", "theory-distill": "report.md, results.json"}
THEORY_RESULTS = {"theory-convergence": "grid", "theory-distill": "runs"}  # a key of each one's results.json


def study_in(out: str | Path) -> str | None:
    """Whose results the folder `out` holds, by what each study writes there: "misalignment" (a study.json naming
    its conditions, or run folders in runs/), "sweep" (a sweep.json, or cell folders k{K}_b{budget}_s{seed} that
    hold a config.json or metrics.json), a theory study (a results.json with its key, THEORY_RESULTS), "report"
    (a report.md or results.json none of them wrote: a user's); None for a folder of none of them (new, empty,
    or other files)."""
    out = Path(out)
    if "condition_names" in _json_object(out / "study.json"):
        return "misalignment"
    if "cells" in _json_object(out / "sweep.json"):
        return "sweep"
    results = _json_object(out / "results.json")
    theory = next((study for study, key in THEORY_RESULTS.items() if key in results), None)
    if theory is not None:
        return theory
    if (out / "report.md").exists() or (out / "results.json").exists():
        return "report"
    if any(is_run_folder(p) for p in (out / "runs").glob("*")):
        return "misalignment"
    if any((p / "config.json").is_file() or (p / "metrics.json").is_file() for p in out.glob("k*_b*_s*")):
        return "sweep"
    return None


def _json_object(path: Path) -> dict:
    """A JSON file's object; {} where the file is missing, does not read or holds no object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_own_study(out: str | Path, study: str) -> None:
    """--out of a study (STUDIES), before any work: new, or holding that study's own results (which it continues
    or replaces), not another study's (study_in) nor a report.md (or results.json) that none of them wrote: a
    DDMError naming what the folder holds, and a folder to give instead."""
    out, name = Path(out), STUDIES[study]
    found = study_in(out)
    if found in (None, study):
        return
    file = "report.md" if (out / "report.md").exists() else "results.json"
    what = (f"a {file} that no {name} wrote (another study's or your own)" if found == "report" else
            f"a {STUDIES[found]}'s results ({RECORDS[found]})")
    example = out.parent / (study if out.name != study else f"{study}_2")
    raise DDMError(f"--out {out} holds {what}; give the {name} a folder of its own, e.g. --out {example}")


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (nothing is created or read here)."""

    root: Path

    def __init__(self, root: str | Path):
        check_given(root)
        object.__setattr__(self, "root", Path(root))

    # the run
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    # data
    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        """data/train.safetensors or data/test.safetensors."""
        return self.data / f"{name}.safetensors"

    @property
    def data_info(self) -> Path:
        return self.data / "data.json"

    @property
    def truth(self) -> Path:
        return self.data / "truth.safetensors"

    # partition
    @property
    def partition(self) -> Path:
        return self.root / "partition"

    @property
    def manifest(self) -> Path:
        return self.partition / "manifest.json"

    # latent runs
    @property
    def autoencoder(self) -> Path:
        return self.root / "autoencoder"

    @property
    def latents(self) -> Path:
        return self.root / "latents"

    def latent_shard(self, k: int) -> Path:
        return self.latents / f"cluster_{k:02d}.safetensors"

    @property
    def training_shards(self) -> Path:
        """The folder of the shards the experts train on: latents/ in a latent run, else partition/shards/."""
        return self.latents if self.is_latent else self.partition / "shards"

    def training_shard(self, k: int) -> Path:
        """The shard expert k trains on (in training_shards)."""
        return self.training_shards / f"cluster_{k:02d}.safetensors"

    @property
    def latent_info(self) -> Path:
        return self.latents / "latents.json"

    @property
    def is_latent(self) -> bool:
        """A latent run: its autoencoder is written (the networks train on its latents)."""
        return self.latent_info.exists()

    # model folders
    def expert(self, k: int) -> Path:
        return self.root / "experts" / f"expert_{k:02d}"

    @property
    def experts(self) -> Path:
        return self.root / "experts"

    def misnamed_experts(self, missing: list[int]) -> str:
        """For the experts `missing`: "; FOLDER looks like expert C's folder, misnamed: ..." for each folder of
        RUN/experts named like one of theirs but not as ddmkit names it (expert_1, expert-01, Expert_01 for
        experts/expert_01), saying where it goes; "" when there is none. Messages about missing experts add it
        (missing_expert_hints)."""
        if not self.experts.is_dir():
            return ""
        hints = ""
        for path in sorted(self.experts.iterdir()):
            like = re.fullmatch(r"expert[_-]?(\d+)", path.name, flags=re.IGNORECASE)
            cluster = int(like[1]) if like else None
            if cluster in missing and path != self.expert(cluster) and path.is_dir():
                target = self.expert(cluster)
                hints += f"; {path} looks like expert {cluster}'s folder, misnamed: " + (
                    f"put its files in {target}" if target.exists() else f"rename it to {target}")
        return hints

    def unfinished_experts(self, missing: list[int]) -> str:
        """For the experts `missing`: "; FOLDER holds config.json but no model.safetensors: ..." for each whose
        folder is there with its config.json but without weights (training stopped before it wrote them, or they
        were removed), naming the commands that train it again; "" when there is none."""
        hints = ""
        for cluster in missing:
            folder = self.expert(cluster)
            if (folder / "config.json").is_file() and not (folder / "model.safetensors").exists():
                shard, q = self.training_shard(cluster), shlex.quote
                hints += (f"; {folder} holds config.json but no model.safetensors: an unfinished or damaged expert "
                          f"(its training stopped before writing its weights, or they were removed); train it again "
                          f"with `ddmkit launch {q(str(self.root))}` (it trains the run's missing experts) or `ddmkit "
                          f"train-expert {q(str(shard))} --config {q(str(self.config))} --out {q(str(folder))}`")
        return hints

    def missing_expert_hints(self, missing: list[int]) -> str:
        """What every message about the missing experts `missing` adds: their folders that are misnamed
        (misnamed_experts), then those unfinished (unfinished_experts); "" when there is neither."""
        return self.misnamed_experts(missing) + self.unfinished_experts(missing)

    @property
    def router(self) -> Path:
        return self.root / "router"

    @property
    def monolith(self) -> Path:
        return self.root / "monolith"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def grow(self) -> Path:
        """grow.json: the experts added or replaced after training (ddmkit.pipeline.grow) and the router kind."""
        return self.root / "grow.json"

    # samples and scores
    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def sample_set(self, name: str) -> Path:
        return self.samples / f"{safe_name(name)}.safetensors"

    @property
    def sample_info(self) -> Path:
        return self.samples / "info.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    # students distilled from the trained DDM (ddmkit.pipeline.distill)
    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def dense_student(self) -> Path:
        """students/dense: one network regressing the DDM's routed velocity."""
        return self.students / "dense"

    def few_step_student(self, segments: int, grid: str) -> Path:
        """students/few-step-S-GRID: a student sampling in S steps on the 'uniform' or 'lambda' grid."""
        return self.students / f"few-step-{segments}-{grid}"

    @property
    def students_report(self) -> Path:
        return self.students / "report.md"

    @property
    def students_metrics(self) -> Path:
        return self.students / "report.json"

    # what sampling and scoring write: removed when only [sample] or [evaluate] change
    @property
    def derived(self) -> list[Path]:
        return [self.samples, self.eval, self.analysis, self.plots, self.report, self.metrics]


def remake_partition(folder: RunFolder) -> str:
    """How a run's partition (its manifest, partition.safetensors and shards) is made again, to the same bytes, as
    a fix to name: one text for a file of it that is missing or damaged."""
    if folder.grow.exists():  # grown: the config alone makes the partition the run had before add-expert
        return f"copy the run's partition/ folder back whole ({folder.grow.name}: add-expert changed the partition)"
    return (f"make the partition again: remove {folder.partition} and run `ddmkit partition --config "
            f"{folder.config} --out {folder.root}` (the run's own config makes the same shards, byte for byte, so "
            "its experts stay valid)")
