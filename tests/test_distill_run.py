"""`ddmkit distill RUN` (ddmkit.pipeline.distill, ddmkit.train.distill) on a tiny ring-of-Gaussians run:
the dense student's target is the routed velocity, a student of the exact DDM approaches the exact field,
the few-step student's grid is the one --grid names (and the Lambda grid has known answers), the CLI
writes the report, and bad options exit 2 with nothing written."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddmkit.config import TrainConfig, config_differences, load_config
from ddmkit.ddm import exact_ddm, load_ddm, start_noise
from ddmkit.errors import DDMError
from ddmkit.io import read_json
from ddmkit.layout import RunFolder
from ddmkit.pipeline.distill import (TRAJECTORY_SEED, distill_run, field_distances, lambda_grid, sample_on_grid,
                                     make_dense, make_few_step, plan_distill, student_field)
from ddmkit.pipeline.run import run_pipeline
from ddmkit.sample import time_grid
from ddmkit.pipeline.stages import load_split
from ddmkit.train.distill import teacher_velocity, train_dense_student
from conftest import raising_after

TINY = Path(__file__).parent / "configs" / "tiny.toml"
SMALL = {"steps": 40, "trajectories": 128}  # students trained in a second


@pytest.fixture
def clis(cli):
    """(exit code, stderr on one line) of `ddmkit ARGS` for each ARGS, one after another (each takes the run's
    lock), run in this process (conftest's run_cli, torch on one thread as OMP_NUM_THREADS=1 did)."""
    return lambda calls: [(done.returncode, " ".join(done.stderr.split())) for done in (cli(*args) for args in calls)]


def hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The tiny config's train stages: 4 experts, router and monolith on ring8 (exact truth)."""
    run = tmp_path_factory.mktemp("distill") / "tiny"
    run_pipeline(load_config(TINY), run, log=lambda m: None, stages="train")
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_target_is_the_routed_velocity(trained):
    """full: sum_k r_k v_k from the experts and router called directly; top-2: the two largest r_k,
    renormalised."""
    ddm = load_ddm(trained)
    x, t = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 2, torch.rand(64)
    with torch.no_grad():
        r = ddm.router(x, t)
        v = torch.stack([e(x, t) for e in ddm.experts], 1)  # (B, K, 2)
        full = (r[:, :, None] * v).sum(1)
        top = torch.zeros_like(r).scatter(1, r.topk(2, 1).indices, r.topk(2, 1).values)
        top2 = (top[:, :, None] * v).sum(1) / top.sum(1, keepdim=True)
        assert torch.allclose(teacher_velocity(ddm, "full")(x, t), full, atol=1e-6)
        assert torch.allclose(teacher_velocity(ddm, "top-2")(x, t), top2, atol=1e-6)
        assert not torch.allclose(full, top2, atol=1e-3)  # the two strategies differ here


def test_student_of_the_exact_ddm_approaches_the_exact_velocity(trained, tmp_path):
    """A dense student regressing the exact DDM's full field: its mean squared distance to that field
    falls with training and ends far below the field's own size."""
    exact = teacher_velocity(exact_ddm(trained), "full")
    data, test = load_split(trained, "train").x, load_split(trained, "test").x[:1000]
    net = {"arch": "mlp", "kwargs": {"data_shape": [2], "width": 64, "depth": 2}}
    errors = []
    for steps in (20, 400):
        cfg = TrainConfig(steps=steps, batch_size=128, lr=3e-3, warmup=10, ema_decay=0.9, device="cpu", log_every=10**6)
        train_dense_student(data, None, exact, net, cfg, tmp_path / f"s{steps}")
        field, _ = student_field(tmp_path / f"s{steps}")
        errors.append(field_distances({"s": lambda xt, t, y, g, f=field: f(xt, t)}, exact, test, None)["s"]["mean"])
    scale = field_distances({"0": lambda xt, t, y, g: torch.zeros_like(xt)}, exact, test, None)["0"]["mean"]
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.1 * scale, (errors, scale)


def test_lambda_grid_known_answers():
    """L(t) constant: Lambda is linear in t, the grid uniform. v = x / (t + a): L = 1 / (t + a),
    Lambda(t) = log((t + a) / a), so t_i = a ((1 + a) / a)^((S - i) / S) - a."""
    x1 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lambda_grid(lambda x, t: 2.0 * x, x1, 4), time_grid(4), atol=1e-6)
    a, s = 0.05, 4
    grid = lambda_grid(lambda x, t: x / (t[:, None] + a), x1, s, points=401)
    i = torch.arange(s + 1, dtype=torch.float64)
    expected = a * ((1 + a) / a) ** ((s - i) / s) - a
    assert torch.allclose(grid.double(), expected, atol=2e-3), (grid, expected)


def test_lambda_grid_calls_the_field_with_times_like_the_states():
    """The times are tabulated on the CPU in float64; every call of the field (the Euler trajectory and
    the Jacobians along it) must get t on x's device and in x's dtype (on a GPU: cuda states, CPU times)."""
    calls = []

    def field(x, t):
        calls.append((t.device, t.dtype) == (x.device, x.dtype))
        return -x * (1 + t[:, None])

    lambda_grid(field, torch.randn(8, 3, dtype=torch.float64), 4, points=5)
    assert len(calls) > 4 and all(calls)


def test_few_step_grid_is_what_grid_says(trained, tmp_path):
    """uniform: t_i = 1 - i / S exactly; lambda: the Lambda grid of the dense student from the trajectories'
    first 256 noises, not uniform; both students start from the dense one and record their settings."""
    run = copy_of(trained, tmp_path)
    grids = {}
    for grid in ("uniform", "lambda"):
        plan = plan_distill(run, "top-2", few_step=3, grid=grid, **SMALL)
        make_dense(plan, log=lambda m: None)
        make_few_step(plan, log=lambda m: None)
        config = read_json(RunFolder(run).few_step_student(3, grid) / "config.json")
        assert config["segments"] == 3 and config["distill"]["grid"] == grid and config["distill"]["segments"] == 3
        grids[grid] = torch.tensor(config["grid"])
    assert torch.equal(grids["uniform"], time_grid(3))
    dense, _ = student_field(RunFolder(run).dense_student)
    x1 = start_noise(SMALL["trajectories"], (2,), plan.train.seed + TRAJECTORY_SEED)
    assert torch.allclose(grids["lambda"], lambda_grid(lambda x, t: dense(x, t), x1, 3), atol=1e-6)
    assert (grids["lambda"] - time_grid(3)).abs().max() > 0.02


def test_a_path_that_is_no_student_names_the_students_there(trained, tmp_path):
    """RUN/students itself, or a student's name cut short, was told "config.json is missing; copy the whole
    model folder again": there was nothing to copy."""
    students = RunFolder(copy_of(trained, tmp_path)).students
    for name in ("dense", "few-step-4-lambda"):  # model folders as students: only their place is read here
        shutil.copytree(trained / "experts" / "expert_00", students / name)
    field, _ = student_field(students / "dense")
    assert field(torch.zeros(3, 2), torch.full((3,), 0.5)).shape == (3, 2)
    for given in (students, students / "few-step-4"):
        with pytest.raises(DDMError) as err:
            student_field(given)
        assert str(err.value) == (f"{given} is not a student's model folder; give one of the students in {students}: "
                                  "dense, few-step-4-lambda")


def test_cli_writes_students_and_report(trained, tmp_path, clis):
    """`ddmkit distill` exits 0 and writes the students and a report with every row; `ddmkit theory
    distill` is still there."""
    run = copy_of(trained, tmp_path)
    (code, err), (theory, _) = clis([("distill", run, "--teacher", "top-2", "--steps", 40, "--few-step", 2,
                                      "--grid", "uniform", "--trajectories", 128),
                                     ("theory", "distill", "--help")])
    assert code == 0, err
    assert theory == 0
    folder = RunFolder(run)
    dense, few = (read_json(p / "config.json")["distill"] for p in (folder.dense_student,
                                                                     folder.few_step_student(2, "uniform")))
    assert dense["teacher"] == "top-2" and few["dense"] == dense and few["segments"] == 2
    report, result = folder.students_report.read_text(), read_json(folder.students_metrics)
    rows = result["scores"]["rows"]
    for name, calls in (("exact DDM (full), 8 euler steps", 32), ("teacher top-2, 8 euler steps", 16),
                        ("dense student, 8 euler steps", 8), ("monolith, 8 euler steps", 8),
                        ("few-step student, S = 2, uniform grid", 2), ("teacher top-2, 2 euler steps", 4),
                        ("dense student, 2 euler steps", 2), ("monolith, 2 euler steps", 2)):
        assert rows[name]["expert_calls_per_sample"] == calls, name
        assert f"| {name} |" in report
        assert rows[name]["w2"] > 0 and rows[name]["nll"] is not None
    assert set(result["field"]["to_exact"]) == {"teacher top-2", "dense student", "monolith"}
    assert "## Distance to the exact field" in report
    # the dense student is closer to its teacher's field than the monolith is
    assert result["field"]["to_teacher"]["dense student"]["mean"] < result["field"]["to_teacher"]["monolith"]["mean"]


def test_students_trained_now_and_scored_later(trained, tmp_path, monkeypatch, clis):
    """--no-report trains the students without sampling or scoring, and without needing the scorer (on a
    GPU machine that has no FID weights yet); the same command later writes the report and retrains
    nothing."""
    import ddmkit.pipeline.distill as distill

    run = copy_of(trained, tmp_path)
    (code, err), = clis([("distill", run, "--teacher", "top-2", "--steps", 40, "--no-report")])
    assert code == 0, err
    folder = RunFolder(run)
    weights = folder.dense_student / "model.safetensors"
    assert weights.exists() and not folder.students_report.exists() and not folder.students_metrics.exists()
    before = weights.stat().st_mtime_ns
    (code, err), = clis([("distill", run, "--teacher", "top-2", "--steps", 40)])
    assert code == 0, err
    assert folder.students_report.exists() and weights.stat().st_mtime_ns == before
    messages = []  # a few-step student trained with --no-report: the report lacking it goes (it stayed, silently)
    distill_run(run, "top-2", steps=40, few_step=2, trajectories=16, report=False, log=messages.append)
    assert not folder.students_report.exists() and not folder.students_metrics.exists()
    assert f"distill: removed {folder.students_report} (it lacks few-step-2-lambda)" in messages, messages

    def no_scorer(plan):
        raise DDMError("no FID weights here")

    monkeypatch.setattr(distill, "check_evaluation", no_scorer)
    assert plan_distill(run, "top-2", steps=40, report=False).teacher == "top-2"
    with pytest.raises(DDMError, match="no FID weights"):
        plan_distill(run, "top-2", steps=40)


def test_a_call_stopped_while_sampling_leaves_no_report_lacking_its_student(trained, tmp_path, monkeypatch):
    """Ctrl-C after a few-step student was trained, while the report's samples are drawn: the report of the
    students before (dense alone) is removed, not left behind silently lacking the new student."""
    import ddmkit.pipeline.distill as distill

    run = copy_of(trained, tmp_path)
    distill_run(run, "top-2", steps=40, log=lambda m: None)
    folder = RunFolder(run)
    assert folder.students_report.exists()
    monkeypatch.setattr(distill, "draw_sets", raising_after(distill.draw_sets, 0, KeyboardInterrupt("Ctrl-C")))
    with pytest.raises(KeyboardInterrupt):
        distill_run(run, "top-2", steps=40, few_step=2, trajectories=16, log=lambda m: None)
    assert (folder.few_step_student(2, "lambda") / "model.safetensors").exists()
    assert not folder.students_report.exists() and not folder.students_metrics.exists()


def test_bad_options_exit_2_and_write_nothing(trained, tmp_path, clis):
    run = copy_of(trained, tmp_path)
    before = hashes(run)
    calls = [("--teacher", "oracle"), ("--teacher", "top-0"), ("--few-step", 0), ("--few-step", 33),
             ("--grid", "cosine"), ("--arch", "unet"), ("--steps", 0)]
    results = clis([("distill", run, *c) for c in calls[:3]] + [("distill", run, "--grid", "uniform")])
    for c, (code, err) in zip(calls, results):
        assert code == 2, (c, err)
        assert c[0] in err, (c, err)  # the message names the option
    assert results[3][0] == 2 and "--grid: settings of the few-step student; give --few-step S" in results[3][1]
    for c in calls[3:]:
        with pytest.raises(DDMError, match=c[0]):
            distill_run(run, **{c[0][2:].replace("-", "_"): c[1]}, log=lambda m: None)
    with pytest.raises(DDMError, match=r"^--device cuda:63, but this machine has \d+ CUDA device\(s\); give --device "
                                       r"cpu"):  # it offered the config's train.device: distill takes no config
        distill_run(run, device="cuda:63", log=lambda m: None)
    assert hashes(run) == before and not RunFolder(run).students.exists()


def test_a_file_where_the_students_go_is_named_with_and_without_force(trained, tmp_path, clis):
    """--force removed RUN/students as a folder: a file there ended in 'Not a directory' without a fix."""
    run = copy_of(trained, tmp_path)
    RunFolder(run).students.write_text("notes")
    before = hashes(run)
    for code, err in clis([("distill", run, "--no-report"), ("distill", run, "--no-report", "--force")]):
        assert (code, err) == (2, f"error: {run}/students is a file, not a folder; move it away (or write to "
                                  "another folder)")
    assert hashes(run) == before


def test_the_counts_of_distill_state_their_range_on_the_command_line(tmp_path, clis):
    """`--few-step x` said only 'give a whole number': every count of `ddmkit distill` states its range when
    refused, in one line (exit 2), before any run folder is read; the ranges are the library's."""
    from ddmkit import cli
    from ddmkit.config import MAX_SEED, ROWS
    from ddmkit.pipeline import distill

    assert (cli.FEW_STEPS_MAX, cli.TRAJECTORIES_MAX, cli.TEACHER_STEPS_MAX, cli.COUNT_MAX, cli.SEED_MAX) == (
        distill.FEW_STEPS[1], distill.MAX_TRAJECTORIES, distill.MAX_TEACHER_STEPS, ROWS, MAX_SEED)
    calls = [("--few-step", "x", "from 1 to 32"), ("--few-step", "33", "from 1 to 32"),
             ("--trajectories", "1", "from 2 to 10000000"), ("--teacher-steps", "0", "from 1 to 1000000"),
             ("--steps", "0", "from 1 to 1000000000"), ("--seed", "-1", "from 0 to")]
    results = clis([("distill", tmp_path / "no-run", option, value) for option, value, _ in calls])
    for (option, value, span), (code, err) in zip(calls, results):
        assert code == 2 and err.startswith(f"error: {option} {value}: give a whole number, {span}"), (option, err)


def test_few_step_settings_without_few_step_are_refused_by_the_library_too(tmp_path):
    """distill_run(run, trajectories=5) without few_step trained no few-step student and said nothing, though
    `ddmkit distill --trajectories 5` without --few-step is refused; it is now, before the run is read."""
    no_run = tmp_path / "no-run"
    for kwargs, said in (({"trajectories": 5}, "trajectories=5"), ({"teacher_steps": 8}, "teacher_steps=8")):
        with pytest.raises(DDMError, match=rf"^{said}: settings of the few-step student; give few_step=S too"):
            distill_run(no_run, **kwargs)
    with pytest.raises(DDMError, match="is not a run folder"):  # with few_step: the options pass, the run is read
        distill_run(no_run, few_step=2, trajectories=5, teacher_steps=8)
    assert not no_run.exists()


def test_a_word_that_is_no_device_is_refused_in_the_words_of_every_other_command(tmp_path):
    """distill checked --device with a copy of the rule of its own words ("--device: 'gpu'; accepted: cpu, ..."),
    before the run is read."""
    with pytest.raises(DDMError, match=r"^--device: 'gpu' is not a device; accepted: auto, cpu, cuda, cuda:N or mps$"):
        plan_distill(tmp_path / "no-run", device="gpu")


def test_untrained_run_and_other_students_are_refused(trained, tmp_path):
    """A run without an expert is refused with the command that trains it; a second distillation of
    another teacher is refused (before any training) until --force."""
    run = copy_of(trained, tmp_path)
    for inside in (RunFolder(run).expert(1), RunFolder(run).router):  # it said "no partition" and a failing command
        with pytest.raises(DDMError, match=rf"{inside} is a model folder \(config.json \+ model.safetensors\), not a "
                                           rf"run folder; pass the run folder that holds it: {run}$"):
            distill_run(inside, log=lambda m: None)
    shutil.rmtree(RunFolder(run).expert(1))
    with pytest.raises(DDMError, match=r"not trained yet.*--stages train"):
        distill_run(run, log=lambda m: None)
    assert not RunFolder(run).students.exists()
    shutil.copytree(RunFolder(trained).expert(1), RunFolder(run).expert(1))
    shutil.move(RunFolder(run).router, tmp_path / "router")  # the message offered a --router distill lacks
    with pytest.raises(DDMError, match=r"no router .*distill distills the DDM as it routes: train its router first"):
        distill_run(run, log=lambda m: None)
    shutil.move(tmp_path / "router", RunFolder(run).router)
    plan = plan_distill(run, "top-2", **SMALL)
    make_dense(plan, log=lambda m: None)
    before = hashes(run)
    with pytest.raises(DDMError, match=r"teacher \('top-2', asked 'top-1'\).*--force"):
        distill_run(run, teacher="top-1", steps=SMALL["steps"], log=lambda m: None)
    assert config_differences({"teacher": "top-2", "train": {"steps": 20, "lr": 1e-3}},
                       {"teacher": "top-2", "train": {"steps": 40, "lr": 1e-3}}) == ["train.steps (20, asked 40)"]
    assert hashes(run) == before
    dense_config = RunFolder(run).dense_student / "config.json"  # the teacher as earlier ddmkit recorded it: typed
    recorded = json.loads(dense_config.read_text())
    recorded["distill"]["teacher"] = "top-02"
    dense_config.write_text(json.dumps(recorded))
    plan_distill(run, "top-2", **SMALL)  # the same teacher: not refused (it asked for --force)
    plan = plan_distill(run, "top-1", force=True, **SMALL)  # --force: the checks pass, RUN/students is replaced
    assert plan.dense_spec["teacher"] == "top-1"


def test_the_image_report_table_is_the_one_in_the_docs():
    """The table of docs/distill.md is what render_report writes from the stored scores (KID x 1e3 as in the
    run's report: it wrote raw KID under "KID", 1000 times smaller than the docs' column). A number of the page
    is the stored score at the page's rounding (tests/test_doc_results.py), so it may differ from the report's
    rounded cell by half a unit of each: 0.0347499 is 0.03475 in the report and 0.0347 on the page."""
    from ddmkit.pipeline.distill import render_report

    root = Path(__file__).parents[1]
    report = render_report(read_json(root / "docs" / "results" / "fashion_mnist_distill_report.json")).splitlines()
    doc = (root / "docs" / "distill.md").read_text().splitlines()
    start = doc.index("| samples | network calls/sample | router calls/sample | FID | KID x 1e3 | to teacher's samples |")
    table = doc[start:doc.index("", start)]
    assert len(table) == 10 and table[0] in report
    written = {cells[0]: cells for cells in (line.strip("|").split(" | ") for line in report if line.startswith("| "))}
    for line in table[2:]:  # each number as the docs round it
        cells = line.strip("|").split(" | ")
        for doc_cell, cell in zip(cells, written[cells[0]], strict=True):
            if doc_cell.strip().lstrip("-").replace(".", "", 1).isdigit():
                half_units = [0.5 * 10.0 ** -len(text.strip().partition(".")[2]) for text in (doc_cell, cell)]
                assert abs(float(cell) - float(doc_cell)) <= sum(half_units) + 1e-12, (line, cell)
            else:
                assert cell.strip() == doc_cell.strip(), line


def test_image_run_on_cpu_with_pixel_features(tmp_path):
    """A tiny class-conditional image run (UNet experts, label-conditional router) sampled at guidance 2:
    the students take the labels, the few-step student learns from guided trajectories, and the report
    scores every row by FID / KID on pixel features, on the CPU."""
    from test_images import write_idx_set

    from ddmkit.config import RunConfig, validate

    raw = load_config(Path(__file__).parents[1] / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(write_idx_set(tmp_path / "fm", 160, 48))}
    raw["sample"].update(n=16, steps=2, guidance=2.0)
    run = tmp_path / "run"
    run_pipeline(validate(RunConfig, raw), run, stages="train", log=lambda m: None)
    result = distill_run(run, teacher="top-1", steps=4, few_step=2, grid="uniform", trajectories=16, log=lambda m: None)
    folder = RunFolder(run)
    config = read_json(folder.dense_student / "config.json")
    assert config["arch"] == "unet" and config["kwargs"]["num_classes"] == 10
    assert read_json(folder.few_step_student(2, "uniform") / "config.json")["distill"]["guidance"] == 2.0
    rows = result["scores"]["rows"]
    assert {"teacher top-1, 2 euler steps", "dense student, 2 euler steps", "monolith, 2 euler steps",
            "few-step student, S = 2, uniform grid"} <= set(rows)
    assert all(torch.isfinite(torch.tensor(r["fid"])) for r in rows.values())
    assert result["scores"]["features"] == "pixels"
    report = folder.students_report.read_text()
    assert "to_exact" not in result["field"] and "| few-step student, S = 2, uniform grid |" in report
    assert "guidance 2" in report


def _under_bf16_autocast(monkeypatch):
    """fit() as it runs with train.bf16 on CUDA: every batch_loss inside bfloat16 autocast (here the CPU's)."""
    import ddmkit.train.distill as distill

    real = distill.fit

    def fit(model, batch_loss, *a, **k):
        def autocast_loss(m, step, gen):
            with torch.autocast("cpu", torch.bfloat16):
                return batch_loss(m, step, gen)
        return real(model, autocast_loss, *a, **k)

    monkeypatch.setattr(distill, "fit", fit)


def test_with_bf16_the_dense_students_target_is_float32_and_the_student_autocasts(tmp_path, monkeypatch):
    """The teacher's routed field (and its router's top-k choice near ties) was computed inside fit's bf16
    autocast: a bfloat16 approximation of the field the DDM samples with."""
    _under_bf16_autocast(monkeypatch)
    seen = {"teacher": [], "student": []}
    layer = torch.nn.Linear(2, 2)

    def teacher(xt, t, y, gen):
        seen["teacher"].append((torch.is_autocast_enabled("cpu"), layer(xt).dtype))
        return -xt

    net = {"arch": "mlp", "kwargs": {"data_shape": [2], "width": 8, "depth": 1}}
    cfg = TrainConfig(steps=3, batch_size=8, warmup=1, log_every=3, device="cpu")
    import ddmkit.train.distill as distill
    real_call = distill._call
    monkeypatch.setattr(distill, "_call", lambda m, x, t, y: seen["student"].append(
        torch.is_autocast_enabled("cpu")) or real_call(m, x, t, y))
    train_dense_student(torch.randn(50, 2), None, teacher, net, cfg, tmp_path / "dense")
    assert seen["teacher"] == [(False, torch.float32)] * 3
    assert seen["student"] == [True] * 3


def test_the_dense_student_refuses_cuda_graph_before_it_writes(tmp_path):
    """Its teacher's routing waits for the host at every step, which a captured step cannot; on a GPU the job
    failed at its capture, after its first steps. On the CPU (where nothing is captured) it is refused too."""
    cfg = TrainConfig(steps=3, batch_size=8, warmup=1, log_every=3, checkpoint_every=1, device="cpu",
                      cuda_graph=True)
    net = {"arch": "mlp", "kwargs": {"data_shape": [2], "width": 8, "depth": 1}}
    with pytest.raises(DDMError, match=r"^train_dense_student: cfg\.cuda_graph = true: the dense student does not "
                                       r"support it \(its teacher's routing waits for the host.*\); set it to false$"):
        train_dense_student(torch.randn(50, 2), None, lambda xt, t, y, gen: -xt, net, cfg, tmp_path / "dense",
                            teacher={"id": "A"})
    assert list(tmp_path.iterdir()) == []  # no folder, no checkpoint


def test_distill_trains_the_students_of_a_run_whose_experts_took_cuda_graph_eagerly(trained, tmp_path, monkeypatch):
    """The students' training is the run's [expert.train]: with cuda_graph = true there, distill trains them
    without it (the dense student refuses it) and leaves it out of the recipe students are compared by."""
    import ddmkit.pipeline.distill as distill

    run = copy_of(trained, tmp_path)
    real = distill.run_config

    def graphed(root):  # the run as if its experts had trained with cuda_graph = true (ignored on the CPU)
        cfg = real(root)
        return cfg.model_copy(update={"expert": cfg.expert.model_copy(update={
            "train": cfg.expert.train.model_copy(update={"cuda_graph": True})})})

    monkeypatch.setattr(distill, "run_config", graphed)
    plan = plan_distill(run, "top-2", **SMALL)
    assert plan.train.cuda_graph is False and "cuda_graph" not in plan.dense_spec["train"]
    make_dense(plan, log=lambda m: None)
    assert (RunFolder(run).dense_student / "model.safetensors").is_file()


def _killed_after(monkeypatch, n: int, job) -> None:
    """Run job() with its (n + 1)-th student loss raising, as a kill would (its checkpoints stay)."""
    import ddmkit.train.distill as distill

    with monkeypatch.context() as m:
        m.setattr(distill.F, "mse_loss", raising_after(distill.F.mse_loss, n, KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            job()


def test_a_dense_students_checkpoint_is_continued_only_by_its_own_teacher(tmp_path, monkeypatch):
    """The checkpoint recorded the network and training but not the teacher: a job killed with teacher A and run
    again with teacher B continued A's checkpoint, and its student mixed both."""
    from ddmkit.train.jobs import checkpoint_path

    cfg = TrainConfig(steps=40, batch_size=16, warmup=2, log_every=10, checkpoint_every=10, device="cpu")
    net = {"arch": "mlp", "kwargs": {"data_shape": [2], "width": 8, "depth": 1}}
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    teachers = {"A": lambda xt, t, y, gen: -xt, "B": lambda xt, t, y, gen: xt + 3.0}

    def dense(out, name, teacher=True, data=("rows",)):
        return train_dense_student(x, None, teachers[name], net, cfg, tmp_path / out, teacher={"id": name} if teacher
                                   else None, data=list(data))

    reference = dense("reference", "A")
    _killed_after(monkeypatch, 25, lambda: dense("dense", "A"))
    assert checkpoint_path(tmp_path / "dense").exists()
    with pytest.raises(DDMError, match=r"belongs to a different training run: other settings: teacher\.id \('A', "
                                       r"asked 'B'\)\. Delete it"):
        dense("dense", "B")
    with pytest.raises(DDMError, match=r"other training data"):
        dense("dense", "A", data=("other rows",))
    resumed = dense("dense", "A")  # its own teacher continues it, to the bytes of a job that never stopped
    assert (resumed / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert not checkpoint_path(resumed).exists()

    _killed_after(monkeypatch, 25, lambda: dense("anonymous", "A", teacher=False))  # nothing tells teachers apart
    assert not checkpoint_path(tmp_path / "anonymous").exists()


def test_distill_refuses_a_dense_checkpoint_of_a_teacher_changed_since(trained, tmp_path, monkeypatch):
    """ddmkit distill killed mid-way, the router trained again (and registered), distill again: the checkpoint of
    the old teacher is refused, naming its teacher_sha256; before, it was continued silently."""
    import dataclasses

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ddmkit.registry import write_registry
    from ddmkit.train.jobs import checkpoint_path

    run = copy_of(trained, tmp_path)

    def plan():
        made = plan_distill(run, "top-2", **SMALL)
        return dataclasses.replace(made, train=made.train.model_copy(update={"checkpoint_every": 10}))

    _killed_after(monkeypatch, 25, lambda: make_dense(plan(), log=lambda m: None))
    folder = RunFolder(run)
    assert checkpoint_path(folder.dense_student).exists()
    weights = folder.router / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights), meta)
    write_registry(run)
    with pytest.raises(DDMError, match=r"different training run: other settings: teacher\.teacher_sha256"):
        make_dense(plan(), log=lambda m: None)


def test_students_of_another_teacher_are_refused_naming_which_case(trained, tmp_path):
    """Students of another teacher were told "its experts or router changed since", also when they were copied from
    another run: the message says which case it is, by the recorded SHA-256 of each expert and of the router
    (teacher_parts), and --force is still the fix."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ddmkit.registry import write_registry

    run = copy_of(trained, tmp_path)
    folder = RunFolder(run)
    make_dense(plan_distill(run, "top-2", **SMALL), log=lambda m: None)

    def retrain(weights: Path) -> None:  # other weights, registered: as a job trained again
        with safe_open(str(weights), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights), meta)
        write_registry(run)

    retrain(folder.router / "model.safetensors")
    with pytest.raises(DDMError, match=r"distilled differently: the teacher: this run's experts or router changed "
                                       r"since the students were distilled \(add-expert, .*\)\. Pass --force"):
        plan_distill(run, "top-2", **SMALL)
    for c in range(4):  # none of the students' teacher's networks is this run's: another run's students
        retrain(folder.expert(c) / "model.safetensors")
    with pytest.raises(DDMError, match=r"distilled differently: the teacher: the students were distilled from "
                                       r"another run's teacher \(.*copied from another run\?\)\. Pass --force"):
        plan_distill(run, "top-2", **SMALL)
    config = folder.dense_student / "config.json"  # earlier ddmkit recorded no teacher_parts: either case
    recorded = json.loads(config.read_text())
    del recorded["distill"]["teacher_parts"]
    config.write_text(json.dumps(recorded))
    with pytest.raises(DDMError, match=r"the teacher: its experts and router are not those the students were "
                                       r"distilled from \(this run's changed since, .* or the students are another "
                                       r"run's\)\. Pass --force"):
        plan_distill(run, "top-2", **SMALL)
    plan_distill(run, "top-2", force=True, **SMALL)


def test_counts_may_be_numpy_integers(trained):
    """distill_run(run, few_step=np.int64(4)) said '--few-step: np.int64(4) is out of range; give an integer in
    1 .. 32'; the counts are kept as ints, so the students' config.json can record them."""
    plan = plan_distill(trained, "top-2", few_step=np.int64(3), steps=np.int64(40), trajectories=np.int64(128),
                        teacher_steps=np.int64(6), seed=np.int64(1), report=False)
    counts = (plan.few_step, plan.train.steps, plan.trajectories, plan.teacher_steps, plan.train.seed)
    assert counts == (3, 40, 128, 6, 1)
    assert all(type(v) is int for v in (plan.few_step, plan.train.steps, plan.trajectories, plan.teacher_steps))
    json.dumps(plan.few_step_spec())
    with pytest.raises(DDMError, match=r"^--few-step: 33 is out of range; give an integer in 1 \.\. 32$"):
        plan_distill(trained, "top-2", few_step=np.int64(33), report=False)


def test_the_report_of_a_run_without_exact_truth_does_not_claim_one():
    """A run on a data file (no exact mixture) got a report saying 'NLL, mode coverage and off-manifold rate under
    the true mixture' above columns of '-'."""
    from ddmkit.pipeline.distill import render_report

    row = "teacher top-2, 8 euler steps"
    settings = {"run": "run", "ddmkit_version": "0", "k": 2, "teacher": "top-2", "arch": "expert",
                "net": {"arch": "mlp"}, "guidance": 1.0, "n": 10, "seed": 0, "teacher_row": row}
    said = {}
    for truth, floor in (("exact", {"w2": 0.5, "nll": 1.7, "modes_hit": 1.0, "off_manifold": 0.0}),
                         ("none", {"w2": 0.5})):
        scores = {"floor": floor, "rows": {row: {**floor, "expert_calls_per_sample": 16, "router_calls_per_sample": 8,
                                                 "to_teacher_samples": 0.0}}}
        result = {"settings": settings, "scores": scores, "field": {"to_teacher": {}, "times": []}, "students": []}
        said[truth] = " ".join(render_report(result).split())
    assert "NLL, mode coverage and off-manifold rate under the true mixture" in said["exact"]
    assert "true mixture" not in said["none"]
    assert "NLL, mode coverage and off-manifold rate need the exact mixture the data were drawn from; this run's " \
        "data have none (-)" in said["none"]


def test_students_made_with_other_options_name_the_options_that_reuse_them(trained, tmp_path, clis):
    """`ddmkit distill RUN --steps 40` and then `ddmkit distill RUN --few-step 2` was refused with "train.steps
    (40, asked 60). Pass --force ...": a field no option is called, and --force alone, which trains the dense
    student again. The message gives the options that ask for the students as they were made; the command with
    them reuses the dense student. Where no option can (the teacher's weights changed), it offers none."""
    run = copy_of(trained, tmp_path)
    folder = RunFolder(run)
    (code, err), = clis([("distill", run, "--steps", "40", "--no-report")])
    assert code == 0, err
    dense = hashes(folder.dense_student)
    calls = [("distill", run, "--few-step", "2", "--trajectories", "16", "--no-report"),
             ("distill", run, "--teacher", "full", "--seed", "3", "--no-report"),
             ("distill", run, "--arch", "monolith", "--steps", "40", "--no-report")]  # its network differs too
    for (code, err), fix in zip(clis(calls), ("--steps 40", "--teacher top-2 --steps 40 --seed 0", "--arch expert")):
        assert code == 2 and "distilled differently" in err and err.endswith(
            f"distill again, or give the options they were made with to reuse them: {fix}"), err
    (code, err), = clis([(*calls[0], "--steps", "40")])  # the options it gave: the dense student reused
    assert code == 0 and hashes(folder.dense_student) == dense, err
    (code, err), = clis([("distill", run, "--steps", "40", "--few-step", "2", "--no-report")])
    assert code == 2 and err.endswith("reuse them: --trajectories 16"), err
    recorded = json.loads((folder.dense_student / "config.json").read_text())
    recorded["distill"]["arch"] = "monolith"  # as made with --arch monolith of a wider monolith: --arch gives both
    recorded["distill"]["net"]["kwargs"]["width"] += 8
    (folder.dense_student / "config.json").write_text(json.dumps(recorded))
    (code, err), = clis([("distill", run, "--steps", "40", "--no-report")])
    assert code == 2 and "net.kwargs.width" in err and err.endswith("reuse them: --arch monolith"), err
    recorded["distill"]["teacher_sha256"] = "0" * 64  # another teacher: no option asks for it
    (folder.dense_student / "config.json").write_text(json.dumps(recorded))
    (code, err), = clis([("distill", run, "--steps", "30", "--no-report")])
    assert code == 2 and "the teacher:" in err and "reuse them" not in err and err.endswith("distill again"), err


def test_a_count_of_another_type_is_not_called_out_of_range(trained):
    """distill_run(run, steps="5") said "--steps: '5' is out of range; give an integer in 1 .. 1000000000", and
    few_step=2.5 and steps=True the same: the value is no count at all, which the message now says."""
    for kwargs, said in (({"steps": "5"}, "--steps: '5' is not a whole number (str)"),
                         ({"few_step": 2.5}, "--few-step: 2.5 is not a whole number (float)"),
                         ({"trajectories": True}, "--trajectories: True is not a whole number (bool)")):
        with pytest.raises(DDMError) as error:
            plan_distill(trained, "top-2", report=False, **kwargs)
        assert str(error.value).startswith(said) and "out of range" not in str(error.value), error.value


def test_sample_on_grid_takes_the_grid_as_recorded_and_names_noise_of_another_shape(trained, tmp_path):
    """docs/distill.md's sample_on_grid(few, torch.randn(1000, 2), torch.tensor(config["grid"]), None): config["grid"]
    as it is (a list) failed with "AttributeError: 'list' object has no attribute 'to'", noise of another shape
    with torch's "mat1 and mat2 shapes cannot be multiplied", and cond had no default."""
    run = copy_of(trained, tmp_path)
    make_dense(plan_distill(run, "top-2", **SMALL), log=lambda m: None)
    dense, config = student_field(RunFolder(run).dense_student)
    grid = [1.0, 0.6, 0.25, 0.0]
    x1 = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    x0, info = sample_on_grid(dense, x1, grid)
    assert torch.equal(x0, sample_on_grid(dense, x1, torch.tensor(grid), None)[0]) and info["velocity_evaluations"] == 3
    for noise, said in ((torch.randn(50, 3), "x1 is of shape (50, 3)"), (x1.numpy(), "x1 is ndarray")):
        with pytest.raises(DDMError) as error:
            sample_on_grid(dense, noise, grid)
        assert str(error.value) == (f"sample_on_grid: {said}; give the starting noise, a tensor of shape (n, 2), e.g. "
                                    "torch.randn(1000, 2)"), error.value
    with pytest.raises(DDMError, match=r"^sample_on_grid: grid is str; give the student's times"):
        sample_on_grid(dense, x1, "lambda")


def test_student_field_of_a_run_folder_or_a_missing_gpu_says_what_to_give(trained, tmp_path):
    """student_field(RUN) said "RUN/config.json: invalid file, arch: Field required" (the run's config is no
    network's), and device="cuda" on a machine without one failed with torch's AssertionError."""
    run = copy_of(trained, tmp_path)
    with pytest.raises(DDMError) as error:
        student_field(run)
    assert str(error.value) == (f"{run} is a run folder, not a student's model folder; it has no students yet: make "
                                f"them with `ddmkit distill {run}`"), error.value
    make_dense(plan_distill(run, "top-2", **SMALL), log=lambda m: None)
    with pytest.raises(DDMError) as error:
        student_field(run)
    assert str(error.value).endswith(f"give one of its students: {run / 'students' / 'dense'}"), error.value
    with pytest.raises(DDMError, match=r"^device 'cuda:7', but this machine has \d+ CUDA device\(s\); give "
                                       r"device=\"cpu\""):
        student_field(RunFolder(run).dense_student, device="cuda:7")
    assert student_field(RunFolder(run).dense_student, device="cpu")[1]["distill"]["teacher"] == "top-2"
