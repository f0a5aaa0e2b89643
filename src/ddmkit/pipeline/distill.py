"""`ddmkit distill RUN`: a trained DDM distilled into one dense network and into a few-step student.

    distill_run("runs/ring", teacher="top-2")                               # RUN/students/dense + the report
    distill_run("runs/ring", teacher="top-2", few_step=4, grid="lambda")    # + RUN/students/few-step-4-lambda

Sampling a DDM calls the router and one or more experts at every step. The students need neither
(ddmkit.train.distill holds both jobs and their formulas):

    RUN/students/dense/               one network of an expert's architecture (--arch expert) or the
                                      monolith's (--arch monolith), regressing the teacher's routed
                                      velocity v_teacher(x_t, t) = sum_k w_k v_k on the linear path from the
                                      run's shards; samples like the monolith, one call per evaluation
    RUN/students/few-step-S-GRID/     the dense student fine-tuned into a flow map on an S-step grid from
                                      the teacher's trajectories; samples in S calls (Euler on its grid)
    RUN/students/report.md, .json     every student beside the teacher and the monolith at equal sampling
                                      cost, and each field's distance to the exact and to the teacher's field

The grid: "uniform" (t_i = 1 - i / S) or "lambda" (equal steps of Lambda(t) = integral_0^t L, L(t) the
mean spectral norm of the dense student's Jacobian along its own trajectories; ddmkit.theory.stability):
the Lambda grid spends its steps where the flow is stiff. Every model folder records how it was made
(config.json "distill"); a second call reuses the students made the same way and refuses others (--force
removes RUN/students first). Everything is checked before any training; the run's lock is held throughout.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddmkit.analysis.stability import jacobian_norms
from ddmkit.config import (GIVEN_DEVICE_FIX, MAX_SEED, ROWS, RunConfig, TrainConfig, config_differences, device_name,
                           resolve_device)
from ddmkit.conventions import __version__
from ddmkit.data.partition import read_shard
from ddmkit.ddm import DDM, exact_ddm, load_ddm, sample_ddm, sample_single, start_noise
from ddmkit.ddm.load import has_default_router, load_truth, monolith_field, velocity_field
from ddmkit.ddm.sampling import network_of
from ddmkit.errors import DDMError
from ddmkit.evaluation.fid import feature_extractor, fid_kid
from ddmkit.evaluation.sets import FLOOR, evaluate_all, reference_sets
from ddmkit.flow.path import noise
from ddmkit.io import check_folder_target, read_json, remove_stale_staging, sha256_file, write_bytes_atomic, write_json
from ddmkit.train.threads import job_threads
from ddmkit.layout import RunFolder, check_run_exists, is_run_folder
from ddmkit.nets import check_builds
from ddmkit.pipeline.images import scorer_for
from ddmkit.pipeline.prepare import run_config
from ddmkit.pipeline.run import is_image_run
from ddmkit.pipeline.samplesets import calls_every_expert, full_routing_note
from ddmkit.pipeline.sampling import sample_labels
from ddmkit.pipeline.stages import load_split, run_lock
from ddmkit.pipeline.text import is_text_run
from ddmkit.registry import check_model_folder, load_model, model_shards
from ddmkit.routing import depends_on_the_state_alone, parse_strategy
from ddmkit.routing.table import canonical_name
from ddmkit.sample import sample_euler, time_grid
from ddmkit.tables import markdown_table
from ddmkit.theory.stability import cumulative_lambda, lambda_uniform_grid
from ddmkit.train.distill import teacher_states, teacher_velocity, train_dense_student, train_few_step_student
from ddmkit.train.jobs import shard_hashes

Log = Callable[[str], None]
ARCHS = ("expert", "monolith")
GRIDS = ("uniform", "lambda")
FEW_STEPS = (1, 32)  # the segments S a few-step student may have
MAX_TRAJECTORIES = 10**7
MAX_TEACHER_STEPS = 10**6  # solver steps of one teacher trajectory
TRAJECTORIES = 4096  # teacher trajectories a few-step student learns from, unless told
TRAJECTORY_SEED = 1_000_003  # added to the training seed: the trajectories' noise is never the report's
FIELD_TIMES = tuple((j + 0.5) / 10 for j in range(10))  # midpoints of ten equal bins of t ~ U(0, 1)
FIELD_ROWS = {"vectors": 2000, "images": 256}  # held-out rows of the field distances
# not a recipe: where and how verbosely a student trained; and cuda_graph, off for every student (plan_distill)
UNSPECIFIED = ("device", "threads", "log_every", "checkpoint_every", "tensorboard", "parallel", "cuda_graph")


# ----- the options, checked before anything is trained ----------------------------------------
def check_teacher(strategy: str) -> str:
    """The teacher strategy, if it defines a field of (x_t, t): every strategy but oracle and nearest
    (which remember a trajectory) and gated-K@A (which needs the analysis sampler)."""
    try:
        strat = parse_strategy(strategy)
    except DDMError as e:
        raise DDMError(f"--teacher: {e}") from None
    if not depends_on_the_state_alone(strat):
        raise DDMError(f"--teacher {strategy}: this strategy depends on the whole trajectory (or on the analysis "
                       "sampler), not only on (x_t, t), so there is no field to regress; use full, top-K, "
                       "threshold-P, sample-K, nucleus-P, switch, adaptive-P or adaptive-ent-H (e.g. --teacher top-2)")
    return canonical_name(strategy)  # top-02 is the teacher top-2


def _choice(option: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise DDMError(f"--{option}: unknown value {value!r}; accepted: {', '.join(accepted)}")


def _count(option: str, value, lo: int, hi: int) -> int:
    """The count as an int (a NumPy integer too), else a DDMError naming the option and its range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # "5", 2.5, True: not a count at all
        raise DDMError(f"--{option}: {value!r} is not a whole number ({type(value).__name__}); give an integer in "
                       f"{lo} .. {hi}")
    if not lo <= value <= hi:
        raise DDMError(f"--{option}: {int(value)} is out of range; give an integer in {lo} .. {hi}")
    return int(value)


def lambda_grid(field: Callable, x1: torch.Tensor, segments: int, points: int = 41, iters: int = 4) -> torch.Tensor:
    """The S-segment grid of equal steps of Lambda(t) = integral_0^t L(u) du, with L(t) the mean spectral
    norm of dv/dx of `field` (x, t) -> v along its Euler trajectories from x1, tabulated at `points` times
    (dense near the data end, where L changes fastest): exact in up to 2 iters + 1 dimensions, else by
    `iters` power iterations (ddmkit.analysis.stability.jacobian_norms); then
    ddmkit.theory.stability.lambda_uniform_grid."""
    times = torch.linspace(1.0, 0.0, points, dtype=torch.float64) ** 2
    states: list[torch.Tensor] = []
    final = sample_euler(field, x1, times.float(), callback=lambda info: states.append(info["x"]))
    states.append(final)
    lipschitz = torch.tensor([float(jacobian_norms(lambda x, t=t: field(x, t.to(x).expand(len(x))), s,
                                                   iters)["top"].mean()) for s, t in zip(states, times)])
    grid = lambda_uniform_grid(times, cumulative_lambda(times, lipschitz), segments).float()
    if not bool((grid[:-1] > grid[1:]).all()):
        raise DDMError(f"--grid lambda: the measured L(t) gives no {segments}-segment grid (Lambda {lipschitz.tolist()}"
                       "); use --grid uniform")
    return grid


@dataclass
class Plan:
    """Everything distill_run does, decided and checked before the first write."""

    folder: RunFolder
    cfg: RunConfig
    ddm: DDM  # the teacher's networks
    teacher: str
    source: str  # "expert" or "monolith": whose network the students have
    net: dict  # {"arch", "kwargs"}
    train: TrainConfig
    few_step: int | None
    grid: str
    trajectories: int
    teacher_steps: int
    device: torch.device
    images: bool
    dense_spec: dict

    @property
    def guidance(self) -> float:
        """Classifier-free guidance of the sampled rows and of the few-step student's teacher trajectories:
        the run's sample.guidance for class-conditional experts, else 1."""
        return self.cfg.sample.guidance if self.ddm.num_classes else 1.0

    def guided_teacher(self) -> DDM:
        return self.ddm if self.guidance == 1.0 else self.ddm.with_guidance(self.guidance)

    @property
    def substeps(self) -> int:
        """Solver steps of the teacher per segment of a few-step student: ceil(teacher_steps / S)."""
        return max(1, math.ceil(self.teacher_steps / self.few_step))

    def few_step_spec(self) -> dict:
        return {"dense": self.dense_spec, "segments": self.few_step, "grid": self.grid,
                "trajectories": self.trajectories, "teacher_steps": self.teacher_steps,
                "teacher_steps_used": self.substeps * self.few_step,
                "solver": self.cfg.sample.solver, "guidance": self.guidance}


def recipe(train: TrainConfig) -> dict:
    """The training settings that make a student (not where or how verbosely it trained)."""
    return {k: v for k, v in train.model_dump().items() if k not in UNSPECIFIED}


def teacher_parts(folder: RunFolder, ddm: DDM) -> list[str]:
    """The SHA-256 of every expert's weights, then the router's (or the router's kind)."""
    router = folder.router / "model.safetensors"
    return [*(sha256_file(folder.expert(c) / "model.safetensors") for c in range(ddm.k)),
            sha256_file(router) if router.exists() else str(ddm.meta.get("router"))]


def teacher_sha256(parts: list[str]) -> str:
    """One SHA-256 over the weights of every expert and of the router (or the router's kind): over their
    teacher_parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
    return h.hexdigest()


def other_teacher(made: dict, plan: "Plan") -> str:
    """Why a student's recorded teacher (teacher_sha256) is not this run's: made by another run's teacher (none of
    its experts and router is one of this run's), or this run's teacher changed since (some are); a student of
    earlier ddmkit recorded no teacher_parts: either."""
    recorded = made.get("teacher_parts")
    if not isinstance(recorded, list):
        return ("the teacher: its experts and router are not those the students were distilled from (this run's "
                "changed since, by add-expert, replace-expert or a job trained again, or the students are another "
                "run's)")
    if not set(recorded) & set(plan.dense_spec["teacher_parts"]):
        return ("the teacher: the students were distilled from another run's teacher (none of its experts and "
                "router is one of this run's: copied from another run?)")
    return ("the teacher: this run's experts or router changed since the students were distilled (add-expert, "
            "replace-expert or a job trained again)")


def student_net(folder: RunFolder, source: str) -> dict:
    """{"arch", "kwargs"} of an expert's model folder (expert 0) or of the monolith's, built on the meta device."""
    path = folder.expert(0) if source == "expert" else folder.monolith
    if not (path / "model.safetensors").exists():
        raise DDMError(f"--arch {source}: {path} has no model.safetensors; train the monolith with `ddmkit "
                       f"train-monolith {folder.root}`, or use --arch expert")
    config = read_json(path / "config.json")
    net = {"arch": config["arch"], "kwargs": dict(config["kwargs"])}
    check_builds(net["arch"], net["kwargs"], f"--arch {source}")
    return net


def student_folders(folder: RunFolder) -> list[Path]:
    """The students' folders in RUN/students, whole or not: dense first, then the few-step students by S and
    grid."""
    if not folder.students.is_dir():
        return []
    named = [(re.fullmatch(r"few-step-(\d+)-(uniform|lambda)", p.name), p) for p in folder.students.iterdir()]
    few = [p for _, p in sorted((int(m.group(1)), p) for m, p in named if m)]
    return [p for p in [folder.dense_student, *few] if p.is_dir()]


def existing_students(folder: RunFolder) -> list[Path]:
    """The model folders in RUN/students (those with a config.json), in student_folders' order."""
    return [p for p in student_folders(folder) if (p / "config.json").exists()]


def check_students_load(folder: RunFolder) -> None:
    """Every student folder in RUN/students is a model folder that loads (its config.json and the header of its
    model.safetensors checked, registry.check_model_folder): a damaged one is one DDMError naming the folder, what
    is wrong (check_model_folder's message) and --force, which distills it again, as its fix in place of the model
    folder's own (without the check, a student whose weights are there counts as made, and is kept)."""
    fix = f"Pass --force to remove {folder.students} (every student in it) and distill again"
    for path in student_folders(folder):
        try:
            check_model_folder(path, fix)
        except DDMError as e:
            raise DDMError(f"{path} is a damaged student: {e}") from None


def canonical_teacher(spec: dict) -> dict:
    """A student's recorded spec with its teacher by its one name (earlier ddmkit recorded it as typed:
    sample-2@1 is the teacher sample-2)."""
    try:
        return {**spec, "teacher": canonical_name(spec["teacher"])}
    except (KeyError, TypeError, DDMError):  # not recorded, or not a strategy name: compared as it is
        return spec


def check_existing(plan: Plan) -> None:
    """Every student already in RUN/students must come from this teacher and training (else --force)."""
    for path in existing_students(plan.folder):
        made = read_json(path / "config.json").get("distill", {})
        dense = canonical_teacher(made.get("dense", made))
        teacher = ("teacher_sha256", "teacher_parts")  # named as what they mean: the teacher's weights differ
        diff = config_differences({k: v for k, v in dense.items() if k not in teacher},
                                  {k: v for k, v in plan.dense_spec.items() if k not in teacher})
        if dense.get("teacher_sha256") != plan.dense_spec["teacher_sha256"]:
            diff.append(other_teacher(dense, plan))
        if path.name != "dense" and not diff and plan.few_step is not None \
                and path == plan.folder.few_step_student(plan.few_step, plan.grid):
            diff = config_differences(made, {key: v for key, v in plan.few_step_spec().items()
                                              if key not in ("dense", "teacher_steps_used")})  # derived
        if diff:
            asked_few_step = plan.few_step is not None and path == plan.folder.few_step_student(plan.few_step,
                                                                                                 plan.grid)
            reuse = made_with(made, plan, asked_few_step)
            raise DDMError(f"{path} was distilled differently: {'; '.join(diff)}. Pass --force to remove "
                           f"{plan.folder.students} (every student in it) and distill again{reuse}")


# a student's recorded setting -> the option of `ddmkit distill` that asks for it
OPTIONS = {"teacher": "--teacher", "arch": "--arch", "train.steps": "--steps", "train.seed": "--seed",
           "trajectories": "--trajectories", "teacher_steps": "--teacher-steps"}


def made_with(made: dict, plan: Plan, few_step: bool) -> str:
    """', or give the options they were made with to reuse them: --steps 20' when every setting in which a
    student `made` (its config.json's "distill") differs from this call's is one an option sets, the teacher's
    weights the same (few_step: it is the few-step student asked for, whose own settings count too); else ''."""
    had, asked = canonical_teacher(made.get("dense", made)), dict(plan.dense_spec)
    if few_step:
        had = {**had, **made}
        asked.update({k: v for k, v in plan.few_step_spec().items() if k not in ("dense", "teacher_steps_used")})
    had, asked = _flat(had), _flat(asked)
    differ = [key for key, value in asked.items() if had.get(key) != value and key != "teacher_parts"
              and not (key.startswith("net.") and had.get("arch") != asked["arch"])]  # --arch gives the net
    if not differ or any(key not in OPTIONS or had.get(key) is None for key in differ):
        return ""  # teacher_sha256 (other weights), the network, the run's lr or solver: no option asks for them
    given = " ".join(f"{OPTIONS[key]} {shlex.quote(str(had[key]))}" for key in differ)
    return f", or give the options they were made with to reuse them: {given}"


def _flat(spec: dict, prefix: str = "") -> dict:
    """A nested spec as {"train.steps": 20, ...}."""
    out = {}
    for key, value in spec.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_evaluation(plan: Plan) -> None:
    """The report can be made: enough held-out rows (vectors) or a working feature extractor (images)."""
    s, e = plan.cfg.sample, plan.cfg.evaluate
    if plan.images:
        feature_extractor(e.fid_features, plan.device)
        return
    chunk = min(e.chunk, s.n)
    reference_sets(load_split(plan.folder.root, "test").x, chunk, s.n // chunk)


def plan_distill(run, teacher: str = "top-2", arch: str = "expert", steps: int | None = None,
                 few_step: int | None = None, grid: str = "lambda", trajectories: int = TRAJECTORIES,
                 teacher_steps: int | None = None, seed: int | None = None, device: str | None = None,
                 force: bool = False, report: bool = True) -> Plan:
    """Every check of distill_run (options first, then the run; the scorer only when report); nothing is
    written."""
    teacher = check_teacher(teacher)
    _choice("arch", arch, ARCHS)
    _choice("grid", grid, GRIDS)
    if few_step is not None:
        few_step = _count("few-step", few_step, *FEW_STEPS)
    if steps is not None:
        steps = _count("steps", steps, 1, ROWS)
    if teacher_steps is not None:
        teacher_steps = _count("teacher-steps", teacher_steps, 1, MAX_TEACHER_STEPS)
    trajectories = _count("trajectories", trajectories, 2, MAX_TRAJECTORIES)
    if seed is not None:
        seed = _count("seed", seed, 0, MAX_SEED)
    if device is not None:
        device_name(device, f"--device: {device!r}")
    folder = RunFolder(run)
    if is_text_run(folder.root):
        raise DDMError(f"{folder.root} is a text run; `ddmkit distill` distills vector and image runs")
    cfg = run_config(folder.root)
    clusters = read_json(folder.manifest)["k"] if folder.manifest.exists() else 0
    missing = [c for c in range(clusters) if not (folder.expert(c) / "model.safetensors").exists()]
    if not clusters or missing:
        what = f"experts {missing} are missing" if clusters else "it has no partition"
        raise DDMError(f"{folder.root} is not trained yet ({what}); train it first with "
                       f"`ddmkit run {folder.config} --out {folder.root} --stages train`")
    asked = {k: v for k, v in (("steps", steps), ("seed", seed), ("device", device)) if v is not None}
    # the students train eagerly whatever the experts did: a dense student's step cannot be one CUDA graph
    # (ddmkit.train.distill.DENSE_STUDENT_SYNC), and the few-step student trains as it does
    train = cfg.expert.train.model_copy(update={**asked, "cuda_graph": False})
    where = resolve_device(train.device, f"--device {device}" if device is not None else
                           f"the run's expert.train.device {train.device!r}", GIVEN_DEVICE_FIX)
    if not has_default_router(folder.root):  # load_ddm's message offers a --router that distill lacks
        raise DDMError(f"{folder.root}: no router (router/model.safetensors); distill distills the DDM as it "
                       f"routes: train its router first with `ddmkit train-router {folder.root}`")
    ddm = load_ddm(folder.root, where, allow_missing=False)  # the trained experts and router, checked
    net = student_net(folder, arch)
    parts = teacher_parts(folder, ddm)  # each network's weights read once
    dense_spec = {"teacher": teacher, "arch": arch, "net": net, "train": recipe(train),
                  "teacher_sha256": teacher_sha256(parts), "teacher_parts": parts}
    plan = Plan(folder, cfg, ddm, teacher, arch, net, train, few_step, grid, trajectories,
                teacher_steps or cfg.sample.steps, where, is_image_run(folder.root), dense_spec)
    check_folder_target(folder.students)  # a file there: named before --force would try to remove it as a folder
    if not force:
        check_students_load(folder)
        check_existing(plan)
    if report:
        check_evaluation(plan)
    return plan


# ----- training ---------------------------------------------------------------------------------
def shard_rows(run) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every training row the networks saw (the shards, or a latent run's latents) and their labels."""
    parts = [read_shard(path) for path in model_shards(run)]
    labels = [p[1] for p in parts]
    return torch.cat([p[0] for p in parts]), None if any(y is None for y in labels) else torch.cat(labels)


def student_field(path: Path, device="cpu", guidance: float = 1.0):
    """(velocity field, config.json) of a student's model folder (guidance: classifier-free guidance of a
    class-conditional dense student; a few-step student's trajectories already hold theirs)."""
    check_student_path(Path(path))
    device = resolve_device(device, f"device {str(device)!r}", "give device=\"cpu\" (or \"auto\": a GPU when there "
                            "is one)")  # a GPU this machine lacks was torch's AssertionError
    model, config = load_model(path, device)
    return velocity_field(model, config, guidance), config


def check_student_path(path: Path) -> None:
    """A path that is no model folder but a run folder, RUN/students or a misnamed folder in it is refused with
    the students there (load_model said "config.json is missing; copy the whole model folder again", and of a
    run folder that its config.json lacked arch and kwargs)."""
    if is_run_folder(path):
        names = sorted(q.parent.name for q in (path / "students").glob("*/config.json"))
        give = (f"give one of its students: {', '.join(str(path / 'students' / name) for name in names)}"
                if names else f"it has no students yet: make them with `ddmkit distill {path}`")
        raise DDMError(f"{path} is a run folder, not a student's model folder; {give}")
    if (path / "config.json").exists():
        return
    students = path if path.name == "students" else path.parent
    names = sorted(q.parent.name for q in students.glob("*/config.json")) if students.name == "students" else []
    if names:
        raise DDMError(f"{path} is not a student's model folder; give one of the students in {students}: "
                       f"{', '.join(names)}")


def make_dense(plan: Plan, log: Log) -> None:
    """Train RUN/students/dense unless it is there (made the same way: check_existing)."""
    path = plan.folder.dense_student
    if (path / "model.safetensors").exists():
        log(f"distill: {path} is up to date")
        return
    x, labels = shard_rows(plan.folder.root)
    classes = int(plan.net["kwargs"].get("num_classes", 0))
    if classes and labels is None:
        raise DDMError(f"{plan.folder.root}: the experts are class-conditional but the shards have no labels")
    start = time.perf_counter()
    with job_threads(plan.train.threads):
        train_dense_student(x, labels if classes else None, teacher_velocity(plan.ddm, plan.teacher), plan.net,
                            plan.train, path, {"distill": plan.dense_spec},
                            plan.cfg.expert.label_dropout, f"dense student of {plan.teacher}",
                            teacher={k: plan.dense_spec[k] for k in ("teacher", "teacher_sha256")},
                            data=shard_hashes(model_shards(plan.folder.root)))
    log(f"distill: dense student trained on {len(x)} rows in {time.perf_counter() - start:.1f}s")


def make_few_step(plan: Plan, log: Log) -> None:
    """Train RUN/students/few-step-S-GRID from the dense student on teacher trajectories, unless it is there."""
    s, path = plan.few_step, plan.folder.few_step_student(plan.few_step, plan.grid)
    if (path / "model.safetensors").exists():
        log(f"distill: {path} is up to date")
        return
    start = time.perf_counter()
    dense, _ = student_field(plan.folder.dense_student, plan.device, plan.guidance)
    shape, classes = plan.ddm.data_shape, plan.ddm.num_classes
    seed = (plan.train.seed + TRAJECTORY_SEED) % (MAX_SEED + 1)
    x1 = start_noise(plan.trajectories, shape, seed, plan.device)
    y = None if not classes else \
        torch.randint(0, classes, (plan.trajectories,), generator=torch.Generator().manual_seed(seed)).to(plan.device)
    substeps = plan.substeps
    with job_threads(plan.train.threads):
        if plan.grid == "uniform":
            grid = time_grid(s)
        else:
            rows = slice(0, min(256, plan.trajectories))
            grid = lambda_grid(lambda x, t: dense(x, t, **({} if y is None else {"y": y[rows]})), x1[rows], s)
        teacher = teacher_velocity(plan.guided_teacher(), plan.teacher)
        states = teacher_states(teacher, x1, grid.to(plan.device), substeps, plan.cfg.sample.solver, y, seed=seed)
        train_few_step_student(states, grid, y, plan.net, plan.train, path, dense.network.state_dict(),
                               {"distill": plan.few_step_spec()}, f"few-step student (S = {s}, {plan.grid} grid)")
    log(f"distill: few-step student S = {s} ({plan.grid} grid {[round(float(t), 4) for t in grid]}) trained on "
        f"{plan.trajectories} teacher trajectories of {substeps * s} steps in {time.perf_counter() - start:.1f}s")


# ----- evaluation -------------------------------------------------------------------------------
def sample_on_grid(field, x1: torch.Tensor, grid, cond: dict | None = None) -> tuple[torch.Tensor, dict]:
    """A few-step student's samples: Euler with its field on its own grid (S calls per sample): x1 noise of
    shape (n, *data_shape), grid its config.json's "grid" (a list or a tensor), cond {"y": labels} or None."""
    built = getattr(network_of(field), "data_shape", None)
    if not isinstance(x1, torch.Tensor) or built is not None and tuple(x1.shape[1:]) != tuple(built):
        dims = ", ".join(map(str, built)) if built is not None else "*data_shape"
        got = f"of shape {tuple(x1.shape)}" if isinstance(x1, torch.Tensor) else type(x1).__name__
        raise DDMError(f"sample_on_grid: x1 is {got}; give the starting noise, a tensor of shape (n, {dims}), e.g. "
                       f"torch.randn(1000, {dims})")
    if not isinstance(grid, torch.Tensor):
        try:
            grid = torch.as_tensor(grid, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise DDMError(f"sample_on_grid: grid is {type(grid).__name__}; give the student's times, its "
                           "config.json's \"grid\" (a list of numbers from 1 down to 0)") from None
    start = time.perf_counter()
    x0 = sample_euler(lambda x, t: field(x, t, **(cond or {})), x1, grid.to(x1.device))
    s = len(grid) - 1
    return x0, {"expert_calls_per_sample": float(s), "router_calls_per_sample": 0, "velocity_evaluations": s,
                "wall_time": time.perf_counter() - start}


def draw_sets(plan: Plan, students: dict[str, tuple], log: Log) -> dict[str, tuple[torch.Tensor, dict]]:
    """{row name: (samples, info)}: the exact DDM (mixtures), the teacher, the dense student and the monolith
    at the run's [sample] steps and solver, and each few-step student beside the dense student, the monolith
    and the teacher at its own number of steps (Euler), all from the run's sampling noise and labels (and
    at the run's guidance, Plan.guidance)."""
    s, ddm, dev = plan.cfg.sample, plan.guided_teacher(), plan.device
    x1 = start_noise(s.n, ddm.data_shape, s.seed, dev)
    y = sample_labels(ddm.num_classes, s.n, s.seed, dev)
    cond = None if y is None else {"y": y}
    has_monolith = (plan.folder.monolith / "model.safetensors").exists()
    mono = monolith_field(plan.folder.root, dev, plan.guidance) if has_monolith else None
    dense = student_field(plan.folder.dense_student, dev, plan.guidance)[0]
    sets: dict = {}

    def routed(model: DDM, strategy: str, steps: int, solver: str, device, start, labels) -> tuple:
        x0, info = sample_ddm(model, strategy, s.n, steps, solver, s.seed, device, x1=start, cond=labels)
        return x0, {**info, "router_calls_per_sample": info["velocity_evaluations"]}  # one route per evaluation

    def at(steps: int, solver: str, tag: str) -> None:
        sets[f"teacher {plan.teacher}, {tag}"] = routed(ddm, plan.teacher, steps, solver, dev, x1, cond)
        sets[f"dense student, {tag}"] = sample_single(dense, ddm.data_shape, s.n, steps, solver, s.seed, dev,
                                                      x1=x1, cond=cond)
        if mono is not None:
            sets[f"monolith, {tag}"] = sample_single(mono, ddm.data_shape, s.n, steps, solver, s.seed, dev,
                                                     x1=x1, cond=cond)

    if load_truth(plan.folder.root) is not None:
        sets[f"exact DDM (full), {full_cost(plan.cfg)}"] = routed(exact_ddm(plan.folder.root), "full", s.steps,
                                                                      s.solver, "cpu", x1.cpu(), None)
    at(s.steps, s.solver, full_cost(plan.cfg))
    for segments in sorted({c["segments"] for name, (_, c) in students.items() if name != "dense"}):
        for name, (field, config) in students.items():
            if name != "dense" and config["segments"] == segments:
                grid = torch.tensor(config["grid"], dtype=torch.float32)
                sets[f"few-step student, S = {segments}, {config['distill']['grid']} grid"] = \
                    sample_on_grid(field, x1, grid, cond)
        at(segments, "euler", f"{segments} euler steps")
    log(f"distill: {len(sets)} sample sets of {s.n} drawn")
    return sets


def full_cost(cfg: RunConfig) -> str:
    """The tag of the rows sampled as the run samples: "50 euler steps"."""
    return f"{cfg.sample.steps} {cfg.sample.solver} steps"


def teacher_row(plan: Plan) -> str:
    """The name of the teacher's row at the run's sampling steps and solver."""
    return f"teacher {plan.teacher}, {full_cost(plan.cfg)}"


def pathwise(x: torch.Tensor, reference: torch.Tensor) -> float:
    """E |x - reference|^2 / E |reference|^2 over rows drawn from the same noise."""
    x, reference = x.reshape(len(x), -1).double(), reference.reshape(len(x), -1).double()
    return float(((x - reference) ** 2).sum(1).mean() / (reference ** 2).sum(1).mean())


def score_sets(plan: Plan, sets: dict, log: Log) -> dict:
    """{"rows": {name: metrics + calls}, "floor": metrics}: W2, NLL, ... against held-out data (vectors,
    ddmkit.evaluation.sets) or FID / KID against the test split (images, the run's SetScorer), and each
    set's pathwise distance to the teacher's samples from the same noise ("to_teacher_samples")."""
    samples = {name: x.cpu() for name, (x, _) in sets.items()}
    reference = samples[teacher_row(plan)]
    infos = {name: {"router_calls_per_sample": 0, **info, "to_teacher_samples": pathwise(samples[name], reference)}
             for name, (_, info) in sets.items()}
    codec = plan.ddm.codec
    if not plan.images:
        test = load_split(plan.folder.root, "test")
        scores = evaluate_all(samples, infos, test.x, test.truth, plan.cfg.evaluate.chunk)
        for name, row in scores["rows"].items():
            row.update({key: infos[name][key] for key in ("router_calls_per_sample", "to_teacher_samples")})
        return scores
    scorer = scorer_for(plan.cfg, plan.folder.root, log, plan.device)
    rows = {}
    for name, x in samples.items():
        images = (codec.decode(x.to(plan.device)) if codec is not None else x).float().clamp(-1, 1).cpu()
        metrics = fid_kid(scorer.f_test, scorer.extractor(images), scorer.kid_subset, scorer.real_stats)
        rows[name] = {**{k: float(v) for k, v in metrics.items()}, **infos[name]}
    return {"rows": rows, "floor": {k: float(v) for k, v in scorer.floor().items()}, "features": scorer.kind}


@torch.no_grad()
def field_distances(fields: dict[str, Callable], reference: Callable, x: torch.Tensor, y: torch.Tensor | None,
                    times=FIELD_TIMES, seed: int = 0) -> dict:
    """{name: {"mean", "per_t"}}: E |f(x_t, t) - reference(x_t, t)|^2 (summed over dimensions, averaged
    over the rows x) at each t of `times`, x_t = (1 - t) x + t eps on the linear path; "mean" over the
    times (the midpoints of equal bins of U(0, 1): E over t ~ U(0, 1)). Fields are (x, t, y, generator) -> v."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    eps = torch.randn(x.shape, generator=gen, device=x.device)
    per_t: dict[str, list[float]] = {name: [] for name in fields}
    for t in times:
        tt = torch.full((len(x),), float(t), device=x.device)
        xt = noise(x, tt, eps)
        ref = reference(xt, tt, y, gen).float()
        for name, f in fields.items():
            per_t[name].append(float(((f(xt, tt, y, gen).float() - ref) ** 2).reshape(len(x), -1).sum(1).mean()))
    return {name: {"mean": sum(v) / len(v), "per_t": v} for name, v in per_t.items()}


def as_target(field) -> Callable:
    """A velocity field (x, t, **cond) as a target (x, t, y, generator)."""
    return lambda x, t, y=None, generator=None: field(x, t) if y is None else field(x, t, y=y)


def field_section(plan: Plan, students: dict) -> dict:
    """The distances of the teacher's, the dense student's and the monolith's fields to the exact DDM's
    (mixtures: ddmkit.ddm.exact_ddm with full routing) and to the teacher's, at held-out x_t."""
    test = load_split(plan.folder.root, "test")
    n = FIELD_ROWS["images" if plan.images else "vectors"]
    x = test.x[:n].float().to(plan.device)
    if plan.ddm.codec is not None:
        x = plan.ddm.codec.encode(x).to(plan.device)  # encode gives CPU latents
    y = test.labels[:n].long().to(plan.device) if plan.ddm.num_classes and test.labels is not None else None
    teacher = teacher_velocity(plan.ddm, plan.teacher)
    fields = {f"teacher {plan.teacher}": teacher, "dense student": as_target(students["dense"][0])}
    if (plan.folder.monolith / "model.safetensors").exists():
        fields["monolith"] = as_target(monolith_field(plan.folder.root, plan.device))
    out = {"times": list(FIELD_TIMES), "rows": len(x),
           "to_teacher": field_distances({k: f for k, f in fields.items() if f is not teacher}, teacher, x, y)}
    if test.truth is not None:
        on_cpu = teacher_velocity(exact_ddm(plan.folder.root), "full")  # the truth's tensors live on the CPU

        def exact(xt, t, y=None, generator=None):
            return on_cpu(xt.cpu(), t.cpu()).to(xt.device)

        out["to_exact"] = field_distances(fields, exact, x, y)
        out["exact_norm"] = field_distances({"zero": lambda xt, t, y, g: torch.zeros_like(xt)}, exact, x, y)["zero"]
    return out


# ----- the report -------------------------------------------------------------------------------
def students_section(students: dict) -> list[list]:
    rows = []
    for name, (_, config) in students.items():
        made = config["distill"]
        rows.append([name, f"{config['arch']} {config['kwargs']}", config["train"]["steps"],
                     made.get("segments", "-"), made.get("grid", "-"),
                     made.get("trajectories", "-"), config["final_loss"]])
    return rows


def remove_outdated_report(folder: RunFolder, log: Log) -> None:
    """Remove RUN/students/report.md and its JSON when they lack a student now in RUN/students (trained with
    --no-report after the report was written, or by a call stopped while it drew the report's samples): a report
    that silently leaves a student out."""
    if not folder.students_metrics.exists():
        return
    reported = {row[0] for row in read_json(folder.students_metrics).get("students", [])}
    lacking = sorted({"dense" if p.name == "dense" else p.name for p in existing_students(folder)} - reported)
    if lacking:
        for path in (folder.students_report, folder.students_metrics):
            path.unlink(missing_ok=True)
        log(f"distill: removed {folder.students_report} (it lacks {', '.join(lacking)})")


def vector_scores(scores: dict) -> str:
    """What the report's columns of a vector run score: NLL, modes and off-manifold rate only with an exact truth."""
    if scores["floor"].get("nll") is not None:
        return ("W2 against held-out data beside the noise floor; NLL, mode coverage and off-manifold rate under the "
                "true mixture.")
    return ("W2 against held-out data beside the noise floor. NLL, mode coverage and off-manifold rate need the "
            "exact mixture the data were drawn from; this run's data have none (-).")


def render_report(result: dict) -> str:
    p, scores = result["settings"], result["scores"]
    vectors = "features" not in scores
    if vectors:
        cols = [("W2", "w2"), ("W2/floor", "w2_over_floor"), ("NLL", "nll"), ("modes hit", "modes_hit"),
                ("off-manifold", "off_manifold")]
    else:
        cols = [("FID", "fid"), ("KID x 1e3", "kid")]  # KID scaled as in the run's report

    def shown(row: dict, key: str):
        value = row.get(key)
        return value * 1e3 if key == "kid" and value is not None else value

    floor = [FLOOR if vectors else "train images (floor)", "-", "-"] + \
        [shown(scores["floor"], key) if key != "w2_over_floor" else 1.0 for _, key in cols]
    floor.append("-")
    rows = [floor] + [[name, r.get("expert_calls_per_sample"), r.get("router_calls_per_sample")]
                      + [shown(r, key) for _, key in cols] + [r.get("to_teacher_samples")]
                      for name, r in scores["rows"].items()]
    out = ["# Distillation report", "",
           f"Run `{p['run']}`, ddmkit {p['ddmkit_version']}. Teacher: the DDM's {p['k']} experts and "
           f"{'statistics-only ' if p.get('router') == 'statistics' else ''}router with routing `{p['teacher']}`. Students: one network of the {p['arch']}'s architecture "
           f"(`{p['net']['arch']}`), dense (RUN/students/dense) and few-step (RUN/students/few-step-S-GRID)."
           + ("" if p["guidance"] == 1.0 else f" Every row samples at classifier-free guidance {p['guidance']:g} "
              "(the run's sample.guidance): the teacher, the dense student and the monolith apply it at each call, "
              "the few-step students learned it from guided teacher trajectories."),
           "", "## Samples", "",
           f"{p['n']} samples per row from the run's sampling noise (seed {p['seed']}). Network calls count "
           "expert-sized network evaluations per sample over the whole trajectory (a student or the monolith: one "
           "per evaluation; the teacher: the experts its strategy calls); router calls are per sample. "
           + (vector_scores(scores) if vectors else
              f"FID and KID (x 1e3) against the test split ({scores['features']} features).")
           + f" The last column is E |x0 - x0_teacher|^2 / E |x0_teacher|^2 against the row `{p['teacher_row']}` "
           "from the same noise: how far each sampler's samples lie from the teacher's own.",
           "", markdown_table(["samples", "network calls/sample", "router calls/sample"] + [c for c, _ in cols]
                              + ["to teacher's samples"], rows),
           ""]
    field = result["field"]
    names = list(field["to_teacher"])
    if "to_exact" in field:
        exact_names = list(field["to_exact"])
        table = [["mean over t ~ U(0, 1)"] + [field["to_exact"][n]["mean"] for n in exact_names]
                 + [field["exact_norm"]["mean"]]]
        table += [[f"t = {t:g}"] + [field["to_exact"][n]["per_t"][i] for n in exact_names]
                  + [field["exact_norm"]["per_t"][i]] for i, t in enumerate(field["times"])]
        out += ["## Distance to the exact field", "",
                f"E |v(x_t, t) - v_exact(x_t, t)|^2 at x_t = (1 - t) x + t eps, x from {field['rows']} held-out rows, "
                "v_exact the exact DDM's velocity (exact experts, exact posterior, full routing: the mixture's own "
                "velocity); the last column is E |v_exact|^2 for scale.", "",
                markdown_table(["t"] + exact_names + ["E \\|v_exact\\|^2"], table), ""]
    table = [["mean over t ~ U(0, 1)"] + [field["to_teacher"][n]["mean"] for n in names]]
    table += [[f"t = {t:g}"] + [field["to_teacher"][n]["per_t"][i] for n in names]
              for i, t in enumerate(field["times"])]
    out += ["## Distance to the teacher's field", "",
            "E |v(x_t, t) - v_teacher(x_t, t)|^2 on the same points: what distillation left.", "",
            markdown_table(["t"] + names, table), "",
            "## Students", "",
            markdown_table(["student", "network", "training steps", "S", "grid", "trajectories", "final loss"],
                           result["students"]), ""]
    return "\n".join(out)


def distill_run(run, teacher: str = "top-2", arch: str = "expert", steps: int | None = None,
                few_step: int | None = None, grid: str = "lambda", trajectories: int | None = None,
                teacher_steps: int | None = None, seed: int | None = None, device: str | None = None,
                force: bool = False, log: Log = print, report: bool = True) -> dict | None:
    """Distill a trained run's DDM (see the module docstring); returns the report's JSON (None with
    report=False: the students are trained and nothing is sampled or scored; a later call with the same
    options reuses them and writes the report).

    teacher: the routing strategy whose field is distilled; arch: "expert" or "monolith" (the students'
    network); steps: training steps of each student (default: the run's expert.train.steps; batch and
    learning rate are the expert's too); few_step: S, also make a student sampling in S steps (1 .. 32) on
    the "uniform" or "lambda" grid, from `trajectories` teacher trajectories (default TRAJECTORIES) of
    teacher_steps steps (default the run's sample.steps) with the run's sample.solver (both refused without
    few_step, as on the command line); seed: the students' training seed (default the expert's); force: remove
    RUN/students first."""
    given = [f"{name}={value!r}" for name, value in (("trajectories", trajectories), ("teacher_steps", teacher_steps))
             if value is not None]
    if few_step is None and given:
        raise DDMError(f"{', '.join(given)}: settings of the few-step student; give few_step=S too (--few-step S), "
                       "or leave them out")
    trajectories = TRAJECTORIES if trajectories is None else trajectories
    folder = RunFolder(run)
    check_run_exists(folder.root, needs="trained")  # said before its lock would make the folder
    with run_lock(folder.root):
        plan = plan_distill(folder.root, teacher, arch, steps, few_step, grid, trajectories, teacher_steps, seed,
                            device, force, report)
        if calls_every_expert(teacher, plan.ddm.k):
            log(f"note: teacher {full_routing_note(teacher, plan.ddm.k)}")
        if force and folder.students.exists():
            shutil.rmtree(folder.students)
            log(f"distill: removed {folder.students}")
        if folder.students.exists():
            remove_stale_staging(folder.students)
        make_dense(plan, log)
        if few_step is not None:
            make_few_step(plan, log)
        # before sampling: a call stopped there (Ctrl-C) left the report of the students before, silently
        remove_outdated_report(folder, log if not report else lambda msg: None)
        if not report:
            log(f"distill: students in {folder.students}; the same command without --no-report reuses them and "
                "writes the report")
            return None
        students = {("dense" if p.name == "dense" else p.name): student_field(p, plan.device)
                    for p in existing_students(folder)}
        sets = draw_sets(plan, students, log)
        result = {"settings": {"run": str(folder.root), "ddmkit_version": __version__, "teacher": teacher,
                               "arch": arch, "net": plan.net, "k": plan.ddm.k, "n": plan.cfg.sample.n,
                               "seed": plan.cfg.sample.seed, "device": str(plan.device),
                               "teacher_row": teacher_row(plan), "guidance": plan.guidance,
                               "router": plan.ddm.meta.get("router", "learned")},
                  "scores": score_sets(plan, sets, log), "field": field_section(plan, students),
                  "students": students_section(students)}
        write_json(folder.students_metrics, result)
        write_bytes_atomic(folder.students_report, render_report(result).encode())
    log(f"distill: report {folder.students_report}")
    return result
