"""What a run's networks are, read from each model folder's own config.json.

A run can be assembled from experts trained elsewhere, with other settings than the run's
config. Reports describe the networks from their folders, one row per model, and flag every
expert whose architecture or training differs from the run's [expert] section, and a monolith that
did not train on as many samples as the experts together (not their FLOP-matched baseline). The
training loss of every network, from each folder's train_log.jsonl, is plotted beside the table, and the
logs' seconds give each network's training wall time (the experts': their sum and the longest).

    rows, notes = describe_models(run, cfg)
    training = write_training_plot(run)  # RUN/plots/training.png; the report's lines on it
    seconds_sentence(training_seconds(run))  # "Training wall time: experts 12.3 s in all (the longest 3.4 s), ..."
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

from ddmkit.config import RunConfig
from ddmkit.ddm.load import recorded_router
from ddmkit.evaluation.plots import MONOLITH, plot_training
from ddmkit.layout import RunFolder
from ddmkit.pipeline.prepare import listed
from ddmkit.registry import model_config, read_manifest
from ddmkit.tables import markdown_table
from ddmkit.train.jobs import expert_differences

TRAIN_KEYS = ("steps", "batch_size", "lr", "seed", "ema_decay")


def partition_k(run, cfg: RunConfig) -> str:
    """The report's "k = ..." of the partition: the config's k, and the number of clusters now where
    add-expert grew the run (RUN/grow.json)."""
    folder = RunFolder(run)
    now = read_manifest(folder.partition)["k"] if folder.manifest.exists() else cfg.partition.k
    return f"k = {cfg.partition.k}" if now == cfg.partition.k else \
        f"k = {cfg.partition.k} when made, {now} now (add-expert: grow.json)"


def _prediction(prediction: str, path: dict | None) -> str:
    """The prediction, with the path when it is not the linear one, a VP path with its schedule (so that a
    folder trained on another schedule differs): "v (vp cosine, 1000 steps, time x 0.001)"."""
    if not path or path.get("kind", "linear") == "linear":
        return prediction
    if path["kind"] != "vp":
        return f"{prediction} ({path['kind']})"
    schedule = path.get("schedule", "linear")
    betas = f", betas {path.get('beta_start', 1e-4):g}-{path.get('beta_end', 0.02):g}" if schedule == "linear" else ""
    return (f"{prediction} (vp {schedule}, {path.get('steps', 1000)} steps{betas}, "
            f"time x {path.get('time_scale', 1.0):g})")


def _summary(config: dict) -> dict:
    train = config.get("train") or {}
    return {"arch": config.get("arch"), "kwargs": config.get("kwargs", {}),
            "prediction": _prediction(config.get("prediction") or "-", config.get("path")),
            **{key: train.get(key) for key in TRAIN_KEYS}}


def describe_models(run, cfg: RunConfig) -> tuple[list[list], list[str]]:
    """(table rows: model, arch, prediction, steps, batch, lr, seed, differs; notes naming each expert
    whose folder differs from the run's [expert] section and in what: every setting that decides what is
    trained, compared as train-expert compares an expert folder with its config, expert_differences)."""
    folder = RunFolder(run)
    manifest = read_manifest(folder.partition)
    rows, notes = [], []
    folders = [(f"expert {k}", folder.expert(k)) for k in range(manifest["k"])]
    folders += [("monolith", folder.monolith), ("router", folder.router)]
    for name, path in folders:
        if not (path / "config.json").exists():
            routes_by_statistics = name == "router" and recorded_router(folder.root) == "statistics"
            rows.append([name, "statistics-only (no network: grow.json)" if routes_by_statistics else "missing",
                         "-", "-", "-", "-", "-", "-"])
            continue
        saved = model_config(path)
        got = _summary(saved)
        differs = ""
        if name.startswith("expert"):
            fields = expert_differences(saved, cfg.expert, by="config")
            if fields:
                differs = ", ".join(field.split(" ", 1)[0] for field in fields)
                notes.append(f"{name} differs from the run's [expert] section in {listed(fields)}")
        rows.append([name, f"{got['arch']} {got['kwargs']}", got["prediction"], got["steps"], got["batch_size"],
                     got["lr"], got["seed"], differs or "-"])
    mismatch = compute_mismatch(folder, manifest["k"])
    if mismatch:
        notes.append(mismatch)
    return rows, notes


def training_samples(model: Path) -> int | None:
    """steps x batch of a trained model folder (None when it has none)."""
    if not (model / "config.json").exists():
        return None
    train = model_config(model).get("train") or {}
    steps, batch = train.get("steps"), train.get("batch_size")
    return steps * batch if isinstance(steps, int) and isinstance(batch, int) else None


def compute_mismatch(folder: RunFolder, k: int) -> str | None:
    """A note when the monolith did not train on as many samples as the K experts together (experts
    trained with other settings, the monolith with --set, or experts added since): the monolith is then
    not the FLOP-matched baseline of these experts."""
    experts = [training_samples(folder.expert(c)) for c in range(k)]
    monolith = training_samples(folder.monolith)
    if monolith is None or None in experts or sum(experts) == monolith:
        return None
    return (f"the monolith trained on {monolith:,} samples (steps x batch) and the {k} experts on {sum(experts):,} "
            f"together: it is not their FLOP-matched baseline ({monolith / sum(experts):.2f}x their compute)")


def models_section(run, cfg: RunConfig, training: str = "") -> str:
    """The report's section on the networks, from their folders; `training`: the lines on the training
    plot (write_training_plot)."""
    rows, notes = describe_models(run, cfg)
    table = markdown_table(["model", "network", "prediction", "steps", "batch", "lr", "seed",
                            "differs from the config"], rows)
    warning = "".join(f"\n**Warning:** {note}.\n" for note in notes)
    training = f"\n{training}\n" if training else ""
    return f"## Networks\n\nAs recorded in each model folder's config.json.\n\n{table}\n{warning}{training}"


LOG = "train_log.jsonl"
PANELS = {"experts": "experts and monolith (one loss, the same units)", "router": "router (cross-entropy)",
          "autoencoder": "autoencoder (reconstruction MSE + weighted KL)"}  # plots/training.png's panels, in order


def _log_rows(log: Path) -> Iterator:
    """The rows of a train_log.jsonl as JSON reads them, lines that do not parse skipped."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


def loss_curve(log: Path) -> list[tuple[int, float]]:
    """(step, loss) of each row of a train_log.jsonl, in step order. A resumed job's log (fit rewrites the
    checkpoint's rows, then goes on: its steps continue, its seconds restart) is read as it is; in a log that
    starts over (a step at or below an earlier one: a job run again that appended to its old log) the later
    rows replace the earlier ones from that step on. Lines without a step and a finite loss are skipped."""
    curve: list[tuple[int, float]] = []
    for row in _log_rows(log):
        try:
            step, loss = int(row["step"]), float(row["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        if not math.isfinite(loss):
            continue
        while curve and curve[-1][0] >= step:
            curve.pop()
        curve.append((step, loss))
    return curve


def _networks(folder: RunFolder) -> list[tuple[str, str, Path]]:
    """(panel, name, model folder) of every network a run trains: experts, monolith, router, autoencoder."""
    k = read_manifest(folder.partition)["k"] if folder.manifest.exists() else 0
    experts = [("experts", f"expert {c}", folder.expert(c)) for c in range(k)]
    latent = [("autoencoder", "autoencoder", folder.autoencoder)] if folder.autoencoder.is_dir() else []
    return experts + [("experts", MONOLITH, folder.monolith), ("router", "router", folder.router)] + latent


def _absent(name: str, path: Path, folder: RunFolder) -> str:
    """Why the network `name` at `path` has no curve."""
    if name == "router" and not path.is_dir() and recorded_router(folder.root) == "statistics":
        return "statistics-only: no network"
    if not path.is_dir():
        return "no model folder"
    return f"no {LOG}" if not (path / LOG).is_file() else f"no loss rows in its {LOG}"


def training_curves(run) -> tuple[dict[str, dict[str, list[tuple[int, float]]]], list[str]]:
    """The loss curves of a run's networks by panel title (PANELS; a panel without a curve left out), and
    "NAME (why)" for each network that has none (an expert trained elsewhere may have no log, a router
    built from the islands' statistics is no network)."""
    folder = RunFolder(run)
    panels: dict[str, dict] = {}
    absent = []
    for panel, name, path in _networks(folder):
        try:
            curve = loss_curve(path / LOG) if (path / LOG).is_file() else []
        except OSError:  # unreadable: said, not raised (the report is still written)
            curve = []
        if curve:
            panels.setdefault(PANELS[panel], {})[name] = curve
        else:
            absent.append(f"{name} ({_absent(name, path, folder)})")
    return panels, absent


def write_training_plot(run) -> str:
    """Plot every network's training loss (training_curves) to RUN/plots/training.png and return the report's
    lines on it: the link, what it draws and what it does not (when no network has a log: a line saying so, and
    no plot, an earlier one removed)."""
    panels, absent = training_curves(run)
    path = RunFolder(run).plots / "training.png"
    if not panels:
        path.unlink(missing_ok=True)
        return f"No training curves: no network of this run has a {LOG} (trained elsewhere, or not yet)."
    not_drawn = f"Not drawn: {', '.join(absent)}." if absent else ""
    plot_training(panels, path, not_drawn)
    return (f"![training loss](plots/training.png)\n\nTraining loss against step, from each model folder's {LOG} "
            f"(each point the mean over the steps since the row before, train.log_every). {_panels_said(panels)} "
            f"{not_drawn}").strip()


def log_seconds(log: Path) -> float | None:
    """The training wall time (s) a train_log.jsonl records: its last row's seconds, plus, where they restart (a
    job resumed from a checkpoint rewrites the checkpoint's rows, then counts its seconds anew), the seconds each
    earlier part reached. None: no readable log, or no row with seconds."""
    total, last = 0.0, None
    try:
        rows = list(_log_rows(log))
    except OSError:
        return None
    for row in rows:
        try:
            seconds = float(row["seconds"])
        except (ValueError, KeyError, TypeError):
            continue
        if last is not None and seconds < last:
            total += last
        last = seconds
    return None if last is None else round(total + last, 3)


def _job(folder: Path) -> tuple | None:
    """The stacked job an expert folder was trained in with others (expert.concurrent: each of its experts logs the
    job's seconds), or None for a job of its own."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    together = config.get("trained_concurrently_with") if isinstance(config, dict) else None
    return (together, config.get("train_seconds_all")) if together else None


def expert_seconds(folders: list[Path]) -> dict:
    """The experts' training wall time (s) from the train_log.jsonl of each folder (log_seconds): "each_expert"
    (None without a log), "experts" (the sum over their training jobs: experts trained together in one stacked job,
    expert.concurrent, count once, as that job), "longest_expert" (the longest job: what training them side by side
    would take) and "expert_jobs"; {} when no expert has a log."""
    each = [log_seconds(folder / LOG) for folder in folders]
    jobs: dict = {}
    for c, (folder, seconds) in enumerate(zip(folders, each)):
        if seconds is not None:
            jobs[_job(folder) or c] = seconds
    if not jobs:
        return {}
    return {"experts": round(sum(jobs.values()), 3), "longest_expert": max(jobs.values()), "each_expert": each,
            "expert_jobs": len(jobs)}


def training_seconds(run) -> dict:
    """The training wall time (s) of a run's networks, from their train_log.jsonl: the experts' (expert_seconds)
    and "monolith", "router" and "autoencoder" where they have a log."""
    networks = _networks(RunFolder(run))
    out = expert_seconds([path for _, name, path in networks if name.startswith("expert ")])
    others = {name: log_seconds(path / LOG) for _, name, path in networks if not name.startswith("expert ")}
    return {**out, **{name: seconds for name, seconds in others.items() if seconds is not None}}


def seconds_sentence(seconds: dict) -> str:
    """The report's line on training_seconds: the experts' sum and longest, then each other network's."""
    parts = []
    if "experts" in seconds:
        each, jobs = seconds["each_expert"], seconds["expert_jobs"]
        logged = sum(s is not None for s in each)
        together = "" if jobs == logged else f"; {logged} experts trained in {jobs} job(s), expert.concurrent"
        missing = "" if logged == len(each) else f"; {len(each) - logged} of {len(each)} experts have no {LOG}"
        parts.append(f"experts {seconds['experts']:.1f} s in all (the longest {seconds['longest_expert']:.1f} s"
                     f"{together}{missing})")
    parts += [f"{name} {seconds[name]:.1f} s" for name in (MONOLITH, "router", "autoencoder") if name in seconds]
    return f"Training wall time: {', '.join(parts)}." if parts else f"Training wall time: no network has a {LOG}."


def _panels_said(panels: dict) -> str:
    """What the panels of plots/training.png draw, as the report says it."""
    said = ("The experts (coloured by index) and the monolith (black, dashed) train on one loss and share a panel "
            "(a lower curve is not a better network: an expert's data, one cluster, leaves it a lower floor than the "
            "monolith's, all of them)" if PANELS["experts"] in panels else "")
    own = [text for name, text in (("router", "the router's loss (a cross-entropy)"),
                                   ("autoencoder", "the autoencoder's (reconstruction)")) if PANELS[name] in panels]
    if own:
        text = " and ".join(own) + (" each have a panel of their own" if len(own) > 1 else " has a panel of its own")
        said = f"{said}; {text}" if said else text[0].upper() + text[1:]
    return f"{said}." if said else ""
