"""What a run's networks are, read from each model folder's own config.json.

A run can be assembled from experts trained elsewhere, with other settings than the run's
config. Reports describe the networks from their folders, one row per model, and flag every
expert whose architecture or training differs from the run's [expert] section, and a monolith that
did not train on as many samples as the experts together (not their FLOP-matched baseline).

    rows, notes = describe_models(run, cfg)
"""
from __future__ import annotations

from pathlib import Path

from ddmkit.config import RunConfig
from ddmkit.ddm.load import recorded_router
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


def models_section(run, cfg: RunConfig) -> str:
    """The report's section on the networks, from their folders."""
    rows, notes = describe_models(run, cfg)
    table = markdown_table(["model", "network", "prediction", "steps", "batch", "lr", "seed",
                            "differs from the config"], rows)
    warning = "".join(f"\n**Warning:** {note}.\n" for note in notes)
    return f"## Networks\n\nAs recorded in each model folder's config.json.\n\n{table}\n{warning}"
