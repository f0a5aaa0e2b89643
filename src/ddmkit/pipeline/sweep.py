"""Quality per unit of training compute: a DDM and its FLOP-matched monolith over budgets, K and seeds.

    sweep(cfg, "runs/sweep", ks=[2, 4, 8], budgets=[0.25, 0.5, 1, 2], seeds=[0, 1, 2])

Every cell is an ordinary run folder, OUT/k{K}_b{budget}_s{seed}, made by run_pipeline (so a sweep
resumes like `ddmkit run`: finished cells and stages are skipped). Budgets are in units of the
config's total training compute, K_ref x steps x batch with K_ref = partition.k: at budget b every
K trains each expert for round(b x steps) steps at batch round(batch x K_ref / K) (scale="batch", the
default: the global batch split over the experts, every K the same steps, as in the DDM paper), or
round(b x steps x K_ref / K) steps at the config's batch (scale="steps"), so all K and the
FLOP-matched monolith see the same number of samples.
The monolith is one network per budget and seed, trained in the cells of K_ref (else of the first K;
or of the K given as `monolith`, for a grid split into parts run one by one) and compared with every
K: the config's own monolith, trained once instead of once per K. The data are the same in every cell and the partition
the same for every K: they are made once per OUT folder (also for a grid run in parts by several
commands) and copied (hard links), as are the image reference features and, in latent space, the
autoencoder (trained once for the grid; not part of the compared compute).
Training seeds: each seed at the smallest and the largest budget, the first seed elsewhere
(all_seeds=True: every seed everywhere).

The report (OUT/sweep.md, sweep.json, plots/sweep.png) gives the quality metric (FID for images,
W2 / noise floor for vectors: lower is better; images also KID) of the monolith and of each K's
strategies against training compute, the mean over seeds with a 95% t-interval, and the compute at
which the best DDM reaches the monolith's quality at the largest budget. Compute is counted in FLOPs
(ddmkit.train.flops): a DDM's is its experts' and its router's (the router trains the config's steps
at every budget), the monolith's its own.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from ddmkit.config import MAX_SEED, MONOLITH, ROWS, RunConfig, config_differences, validate
from ddmkit.data.synthetic import MIXTURES
from ddmkit.errors import DDMError
from ddmkit.evaluation.plots import plot_sweep
from ddmkit.io import (STAGING, check_folder_target, entries, read_json, removing_new_empty_folders,
                       write_bytes_atomic, write_json)
from ddmkit.launch import check_launch
from ddmkit.layout import RunFolder, check_outside_runs, check_own_study
from ddmkit.pipeline.checks import check_devices
from ddmkit.pipeline.images import FLOOR, RECONSTRUCTIONS
from ddmkit.pipeline.prepare import (TRAINED, check_partition, check_run_target, config_record, listed, run_config,
                                     trained_differences)
from ddmkit.pipeline.run import STAGES, run_pipeline, untrained_parts
from ddmkit.pipeline.samplesets import calls_every_expert
from ddmkit.pipeline.stages import check_network_arguments, load_data, plan_partition, register_user_networks
from ddmkit.tables import markdown_table
from ddmkit.theory.report import t_interval
from ddmkit.train.flops import per_sample_flops, training_flops
from ddmkit.train.jobs import monolith_config

Log = Callable[[str], None]
SWEEP_STAGES = (*STAGES, "report")  # report: from the cells' metrics.json alone (cells scored elsewhere)
# how a K's experts take its share of a budget (more steps, or a larger batch), as the report says it
SCALE_TEXT = {"batch": "every K's experts train the same steps, at a batch scaled by K_ref / K",
              "steps": "each K's experts take it as steps at the config's batch (fewer experts, more steps)"}
SCALES = tuple(SCALE_TEXT)


def monolith_k(cfg: RunConfig, ks: list[int], chosen: int | None = None) -> int:
    """The K whose cells train the grid's monolith: `chosen` if given (a part of a larger grid run on its
    own: its cells are then those of the whole grid, with or without the monolith), else the config's
    partition.k if the grid has it (the config's own FLOP-matched monolith), else the first K."""
    if chosen is not None:
        if chosen < 1:
            raise DDMError(f"--monolith-k {chosen}: give the K of the whole grid whose cells train the monolith "
                           f"(at least 1; e.g. --monolith-k {cfg.partition.k}, the config's partition.k)")
        if chosen > cfg.data.n_train:
            raise DDMError(f"--monolith-k {chosen} is larger than data.n_train ({cfg.data.n_train}); give the K of "
                           "the whole grid whose cells train the monolith")
        return chosen
    return cfg.partition.k if cfg.partition.k in ks else ks[0]


def no_monolith_note(ks: list[int], mono_k: int) -> str:
    """The note of a grid none of whose cells has K = mono_k (--monolith-k): no cell trains the monolith, and
    the report has no monolith lines."""
    present = ", ".join(map(str, sorted(set(ks))))
    return (f"sweep: note: --monolith-k {mono_k}: no cell of this grid has K = {mono_k} (its K: {present}), so "
            "none trains the FLOP-matched monolith and the report has no monolith lines nor compute ratio. That is "
            f"right for a part of a larger grid whose K = {mono_k} cells run elsewhere (report the whole grid with "
            f"--stages report over every part's cells); otherwise leave --monolith-k out, give one of {present}, "
            f"or add --k {mono_k}")


def cell_config(cfg: RunConfig, k: int, budget: float, seed: int, monolith: bool = True,
                scale: str = "batch") -> RunConfig:
    """The config of one cell: K clusters, each expert's steps and batch (scale="batch": budget x the
    config's steps at K_ref / K x its batch) or steps (scale="steps") set so that the total compute
    is budget x the config's, every training seed (experts, router) from `seed`; the FLOP-matched
    monolith trained and sampled only when `monolith` (one K's cells train it for the whole grid). A cell
    draws and scores only what the sweep's report reads: its strategies (no guidance sweep, no sets of the
    statistics-only router, no missing-expert or statistics-only router studies)."""
    raw = cfg.model_dump()
    train, k_ref = cfg.expert.train, cfg.partition.k
    raw["partition"]["k"] = k
    if scale == "batch":
        raw["expert"]["train"]["steps"] = max(1, round(budget * train.steps))
        raw["expert"]["train"]["batch_size"] = max(1, round(train.batch_size * k_ref / k))
    else:
        raw["expert"]["train"]["steps"] = max(1, round(budget * train.steps * k_ref / k))
    raw["expert"]["train"]["seed"] = seed
    raw["router"]["train"]["seed"] = seed + 1
    raw["monolith"]["enabled"] = monolith
    strategies = cell_strategies(cfg.sample.strategies, k)
    raw["sample"]["strategies"] = [MONOLITH, *strategies] if monolith else strategies
    leave_out_extras(raw)
    return validate(RunConfig, raw, f"sweep cell k={k} budget={budget:g} seed={seed}")


def leave_out_extras(raw: dict) -> dict:
    """A config (model_dump) without the sets and studies the sweep's report does not read: no guidance sweep,
    no sets of the statistics-only router, no missing-expert or statistics-only router studies."""
    raw["sample"].update(guidance_sweep=[], stats_router_strategies=[])
    raw["evaluate"].update(missing_experts=False, stats_router=False)
    return raw


def routes_like_full(name: str, k: int, strategies: list[str]) -> bool:
    """Whether a strategy of a K = k DDM is full routing under another name, sampled already as "full":
    top-n or sample-n with n >= k (every expert, weights r)."""
    return name != "full" and "full" in strategies and calls_every_expert(name, k)


def cell_strategies(strategies: list[str], k: int) -> list[str]:
    """The sample.strategies a K = k cell samples (the monolith apart): each once (routes_like_full)."""
    return [name for name in strategies if name != MONOLITH and not routes_like_full(name, k, strategies)]


def cells(ks: list[int], budgets: list[float], seeds: list[int], all_seeds: bool = False) -> list[tuple]:
    """(k, budget, seed) of every cell: every seed at the smallest and largest budget, the first elsewhere."""
    ends = {min(budgets), max(budgets)}
    return [(k, b, s) for k in ks for b in budgets for s in seeds if all_seeds or b in ends or s == seeds[0]]


def cell_dir(out: Path, k: int, budget: float, seed: int, scale: str = "batch", k_ref: int = 0) -> Path:
    """OUT/k{K}_b{budget}_s{seed}; with scale="steps", "_steps" is added for every K but K_ref (its cell
    differs from the "batch" cell of the same K, budget and seed; K_ref's is the same cell in both), so
    both kinds of cell can live in one OUT and share K_ref's."""
    suffix = "_steps" if scale == "steps" and k != k_ref else ""
    return out / f"k{k}_b{budget:g}_s{seed}{suffix}"


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a finished file or folder as hard links (files are never written in place), atomically."""
    if dst.exists() or not src.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.linking")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=_link)
    else:
        _link(src, tmp)
    os.replace(tmp, dst)


def _link(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def seed_cell(folder: RunFolder, cfg: RunConfig, first: RunFolder, same_k: RunFolder | None) -> None:
    """A new cell with the data, image reference features and autoencoder (latent runs: one autoencoder
    for the whole grid, outside the compared compute) of the first cell, and the partition (and its
    latents) of a cell of the same K, as hard links, and its config.json (the record prepare_run_dir keeps),
    so its run resumes after the partition stage."""
    _link_tree(first.data, folder.data)
    for ref in first.eval.glob("reference_*.safetensors"):
        _link_tree(ref, folder.eval / ref.name)
    _link_tree(first.autoencoder, folder.autoencoder)
    if same_k is not None:
        _link_tree(same_k.data, folder.data)  # when the first cell has no data (an autoencoder brought alone)
        _link_tree(same_k.partition, folder.partition)
        _link_tree(same_k.latents, folder.latents)
    write_json(folder.config, config_record(cfg))


SHARED = ("data", "latent", "evaluate")  # the config sections whose outputs every cell of a grid shares


def cell_in_folder(out: Path, cell_cfg: RunConfig, sections: tuple[str, ...], has: str) -> RunFolder | None:
    """A cell already in OUT (made by an earlier command, e.g. another part of the grid) whose config has
    cell_cfg's `sections` and whose folder holds `has` (a RunFolder attribute): the cell whose outputs a
    new cell shares, so that the grid's data, reference features and autoencoder are made once per
    OUT folder, whichever command made its first cell. Sections are compared as result_differences
    compares them (how jobs ran left out), after validating the recorded config (a setting ddmkit gained
    since takes its default, as when a run resumes), so a cell brought from an earlier ddmkit version is
    still found; a config.json ddmkit cannot read is passed by."""
    for config in sorted(out.glob("k*_b*_s*/config.json")):
        folder = RunFolder(config.parent)
        if getattr(folder, has).exists():
            try:
                recorded = run_config(folder.root)
            except DDMError:
                continue
            if not any(d.split(".", 1)[0] in sections for d in result_differences(recorded, cell_cfg)):
                return folder
    return None


def result_differences(made: RunConfig, asked: RunConfig) -> list[str]:
    """The fields in which `asked` differs from `made` in what a cell trains, samples or scores, as `ddmkit
    run` compares a run folder's config: every section, less how jobs run (device, threads, logging:
    train.jobs.EXECUTION, as prepare.trained_differences leaves them out). A cell scored with the sets and
    studies its report does not read (leave_out_extras; a sweep before cells left them out) holds its rows too."""
    old, new = leave_out_extras(made.model_dump(mode="json")), asked.model_dump(mode="json")
    scored = [name for name in new if name not in TRAINED]  # [sample] and [evaluate]
    return trained_differences(made, asked) + config_differences({name: old[name] for name in scored},
                                                                 {name: new[name] for name in scored})


def check_grid(cfg: RunConfig, ks: list[int], budgets: list[float], seeds: list[int], scale: str = "batch") -> None:
    """Refuse a grid that cannot run, or whose points are not what they are called, before any training:
    a repeated value, a budget at which an expert would train no step (or two budgets the same steps),
    a K at which the batch split would leave no row."""
    if not ks or not budgets or not seeds:
        raise DDMError("sweep: give at least one --k, one --budget and one --seed")
    bad_k = [k for k in ks if k < 1]
    if bad_k:
        raise DDMError(f"--k {bad_k[0]}: give a whole number of clusters, at least 1 (e.g. --k 2)")
    bad_budget = [b for b in budgets if not (b > 0 and math.isfinite(b))]
    if bad_budget:
        raise DDMError(f"--budget {bad_budget[0]:g}: give a positive number, the share of the config's training "
                       "compute (e.g. --budget 1)")
    bad_seeds = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if bad_seeds:
        raise DDMError(f"--seed {bad_seeds[0]}: a seed is a whole number from 0 to 2**63 - 1 (as "
                       "expert.train.seed); give seeds in that range, e.g. --seed 0")
    for option, values in (("--k", ks), ("--budget", budgets), ("--seed", seeds)):
        if len(set(values)) < len(values):
            raise DDMError(f"{option}: {sorted(v for v in set(values) if values.count(v) > 1)} given twice; give "
                           "each value once")
    if max(ks) > cfg.data.n_train:
        raise DDMError(f"sweep: --k {max(ks)} is larger than data.n_train ({cfg.data.n_train}); lower --k")
    train, k_ref = cfg.expert.train, cfg.partition.k
    for k in ks:
        if scale == "batch" and round(train.batch_size * k_ref / k) < 1:
            raise DDMError(f"--k {k}: the batch split over K experts (expert.train.batch_size {train.batch_size} x "
                           f"K_ref {k_ref} / K) leaves no row per expert; lower --k or use --scale steps")
        per_budget = train.steps * (1 if scale == "batch" else k_ref / k)  # an expert's steps at budget 1
        huge = [b for b in budgets if not b * per_budget <= ROWS]  # inf too: round() of it raised OverflowError
        if huge:
            raise DDMError(f"--budget {huge[0]:g}: each expert of K={k} would train {huge[0]:g} x {per_budget:g} "
                           f"steps, more than expert.train.steps takes ({ROWS:,}); give a smaller budget")
        steps = {b: round(b * per_budget) for b in budgets}
        if min(steps.values()) < 1:
            b = min(steps, key=steps.get)
            raise DDMError(f"--budget {b:g}: each expert of K={k} would train {b:g} x {per_budget:g} steps, which "
                           f"rounds to 0; give budgets of at least {1 / per_budget:.3g} (one step), or raise "
                           "expert.train.steps")
        same = [b for b in budgets if list(steps.values()).count(steps[b]) > 1]
        if same:
            raise DDMError(f"--budget {' and '.join(f'{b:g}' for b in same)}: each expert of K={k} trains "
                           f"{steps[same[0]]} steps at each, the same training; give budgets further apart")


def check_sweep_config(cfg: RunConfig) -> None:
    """What a sweep sets itself is not taken from the config: the monolith is the curve's baseline (trained
    whatever monolith.enabled says), and the DDM needs a strategy besides the monolith to be measured."""
    if not cfg.monolith.enabled:
        raise DDMError("monolith.enabled = false: a sweep trains the FLOP-matched monolith, the baseline of its "
                       "curves, in the cells of one K (--monolith-k); leave monolith.enabled out")
    if not [s for s in cfg.sample.strategies if s != MONOLITH]:
        raise DDMError(f"sample.strategies = {cfg.sample.strategies}: a sweep measures the DDM with at least one "
                       "routing strategy besides the monolith; add one, e.g. --set "
                       "'sample.strategies=[\"monolith\", \"full\", \"top-1\"]'")


def short_trainings(cfg: RunConfig, ks: list[int], budgets: list[float], mono_k: int,
                    scale: str = "batch") -> list[str]:
    """The (K, budget) whose experts, or the monolith, train fewer steps than their learning-rate warm-up
    (expert.train.warmup): their learning rate never reaches its peak and never decays, so such a
    point measures a network stopped while warming up. One line per point, in words."""
    lines = []
    for k in ks:
        for b in budgets:
            cell = cell_config(cfg, k, b, 0, k == mono_k, scale)
            train = cell.expert.train
            nets = [("each expert", train.steps)]
            if k == mono_k and cell.monolith.enabled:
                nets.append(("the monolith", monolith_config(cell.expert, k, cell.monolith.match).train.steps))
            lines += [f"K={k} budget {b:g}: {who} trains {steps} step{'' if steps == 1 else 's'}, fewer than its "
                      f"{train.warmup}-step learning-rate warm-up" for who, steps in nets if steps < train.warmup]
    return lines


def read_metrics(folder: RunFolder) -> dict:
    """A cell's metrics.json as a sweep reads it: its config as a RunConfig (a setting added to ddmkit since
    takes its default, as when a run folder is resumed) and rows that each hold a score (FID or W2 / floor);
    a file of another shape is a DDMError naming it (cells' files are copied between machines by hand)."""
    fix = "delete it to score the cell again (the same command), or copy that cell's own metrics.json back"
    try:
        metrics = read_json(folder.metrics)
    except DDMError:  # its own advice names the command that wrote it: this one, which refuses it
        raise DDMError(f"{folder.metrics} is not valid JSON (cut short?); {fix}") from None
    rows = metrics.get("rows") if isinstance(metrics, dict) else None
    if not isinstance(rows, dict) or not isinstance(metrics.get("config"), dict) or \
            not all(isinstance(r, dict) and ("fid" in r or "w2_over_floor" in r) for r in rows.values()):
        raise DDMError(f"{folder.metrics} is not the metrics.json of a scored ddmkit run (a JSON object with "
                       f"'config' and 'rows', each row a score); {fix}")
    return {**metrics, "config": validate(RunConfig, metrics["config"], str(folder.metrics), "config in metrics.json")}


def scored_rows(folder: RunFolder, cell_cfg: RunConfig) -> dict | None:
    """A cell's result rows from its metrics.json, if it was scored with this config (else None): the same
    training, sampling and scoring settings, however the jobs ran (result_differences)."""
    if not folder.metrics.exists():
        return None
    metrics = read_metrics(folder)
    return None if result_differences(metrics["config"], cell_cfg) else metrics["rows"]


def holds_only_metrics(folder: RunFolder) -> bool:
    """A cell folder that holds its metrics.json and nothing else (its lock and temporary files aside): a cell
    scored on another machine, its metrics.json brought back for the report."""
    held = [p.name for p in entries(folder.root, but=folder.lock) if not STAGING.match(p.name)]
    return held == [folder.metrics.name]


def check_brought_back(out: Path, grid: list[tuple], kept: list[dict | None], force: bool) -> None:
    """Before any cell writes: a cell to train or score (kept: None) that holds only a metrics.json has no
    networks to score again (--force) or was scored with another config, and is no run folder to replace;
    named, with what works: its scores kept, or its folder removed so that it is trained and scored here."""
    only = [(c, folder) for (_, c, folder), rows in zip(grid, kept) if rows is None and holds_only_metrics(folder)]
    if not only:
        return
    names = ", ".join(folder.root.name for _, folder in only)
    remove = f"remove those cell folders (`rm -r {only[0][1].root}`, ...) to train and score them here"
    if force:
        raise DDMError(f"--force: cells {names} in {out} hold only their metrics.json (scored elsewhere), with no "
                       f"trained networks to score again; leave --force out to keep their scores, or {remove}")
    cell_cfg, folder = only[0]
    differs = result_differences(read_metrics(folder)["config"], cell_cfg)
    raise DDMError(f"cells {names} in {out} hold only a metrics.json made with another config; {folder.root.name} "
                   f"differs in {'; '.join(differs[:6]) or 'its config'}: give the config, the --set options, "
                   f"--monolith-k and the --scale they were made with, or {remove} with this config")


def new_partitions(out: Path, grid: list[tuple], kept: list[dict | None]) -> dict[int, RunConfig]:
    """K -> the config of its first cell to run, for every K of the cells to run (kept: None) whose
    partition no cell in OUT holds yet: the partitions this command makes."""
    first: dict[int, RunConfig] = {}
    for ((k, _, _), cell_cfg, _), rows in zip(grid, kept):
        if rows is None:
            first.setdefault(k, cell_cfg)
    return {k: c for k, c in first.items() if cell_in_folder(out, c, (*SHARED, "partition"), "partition") is None}


def check_grid_data(cfg: RunConfig, partitions: dict[int, RunConfig], backend: str, workers: int | None,
                    mono_k: int) -> None:
    """Before any cell writes, what the config alone does not show: the backend's options, and every new K's
    partition (partitions: new_partitions), computed in memory and checked as that K's first cell will check
    it (on data of a Gaussian mixture of M components, no K above M; clusters that training and scoring can
    use), so that a K that cannot be partitioned fails the grid before the cells of the other K train. The
    cells make their partitions again, a small cost next to their training."""
    check_launch(backend, workers, concurrent=cfg.expert.concurrent)
    if not partitions and cfg.data.name not in MIXTURES:
        return
    train = load_data(next(iter(partitions.values()), cfg))[0]
    for option, k in (("--k", max(partitions, default=0)), ("--monolith-k", mono_k)):
        if cfg.data.name in MIXTURES and k > train.truth.k:
            raise DDMError(f"{option} {k}: {cfg.data.name} is a mixture of {train.truth.k} Gaussians, so a "
                           f"partition into more clusters leaves some owning none of them (a run refuses that); give "
                           f"{option} {train.truth.k} or lower")
    for k, cell_cfg in partitions.items():
        try:
            check_partition(cell_cfg, train, plan_partition(cell_cfg, train), log=lambda _: None)  # warned by the cell
        except DDMError as e:
            raise DDMError(f"--k {k} (the partition.k of its cells): {e}") from None


CELL_NAME = re.compile(r"k(\d+)_b([0-9.e+-]+)_s(\d+)(_steps)?")  # cell_dir's names: K, budget, seed, scale


def check_other_cells(out: Path, cfg: RunConfig, grid: list[tuple]) -> None:
    """Before any work: every cell in OUT outside this grid (the same sweep's other K, budgets, seeds or --scale)
    is the cell this config makes under that name, in what it trains (its [sample] and [evaluate] may differ:
    such a cell is scored again when a grid holds it). A cell trained otherwise (other data, networks or
    training) belongs to another sweep, which this one cannot continue: a DDMError naming it and what differs.
    The grid's own cells are checked by check_run_target (--force replaces them)."""
    ours = {folder.root.name for _, _, folder in grid}
    for config in sorted(out.glob("k*_b*_s*/config.json")):
        name, match = config.parent.name, CELL_NAME.fullmatch(config.parent.name)
        if name in ours or match is None:
            continue
        try:
            made = run_config(config.parent)
            k, budget, seed, scale = int(match[1]), float(match[2]), int(match[3]), "steps" if match[4] else "batch"
            differs = trained_differences(made, cell_config(cfg, k, budget, seed, made.monolith.enabled, scale))
        except (DDMError, ValueError):  # a cell ddmkit cannot read, or no cell of this config: left as it is
            continue
        if differs:
            raise DDMError(f"--out {out} holds the cells of another sweep: {name} was made with other settings than "
                           f"this config makes it with ({listed(differs)}); to continue that sweep give the config "
                           "and --set options it was made with, or give this one another --out (--force replaces "
                           "only the cells of this grid)")


def check_same_monolith(folder: RunFolder, cell_cfg: RunConfig) -> None:
    """A cell made by a grid whose monolith trains at another K differs in monolith.enabled alone: name
    --monolith-k, not --force (which would train the cell again)."""
    if not folder.config.exists():
        return
    differs = trained_differences(run_config(folder.root), cell_cfg)  # new [sample] settings: scored again
    if differs and all(d.startswith("monolith.enabled") for d in differs):
        raise DDMError(f"{folder.root} was made by a grid whose monolith trains at another K (monolith.enabled "
                       f"differs): give --monolith-k the K whose cells train the monolith, as the grid's other "
                       "parts did")


def grid_cells(cfg: RunConfig, out: Path, todo: list[tuple], mono_k: int,
               scale: str) -> list[tuple[tuple[int, float, int], RunConfig, RunFolder]]:
    """Each cell of the grid, ((k, budget, seed), its config, its run folder): every config validated,
    and every cell's path checked to be a folder where one exists, before any work."""
    cells = [((k, b, s), cell_config(cfg, k, b, s, k == mono_k, scale),
              RunFolder(cell_dir(out, k, b, s, scale, cfg.partition.k))) for k, b, s in todo]
    for _, _, folder in cells:
        if folder.root.exists() and not folder.root.is_dir():
            raise DDMError(f"{folder.root} is a file, but the sweep writes that cell's run folder there; move it "
                           "away or delete it")
    return cells


def scored_cells(grid: list[tuple], out: Path, partial: bool = False) -> tuple[list[dict], list[str]]:
    """The results of cells scored before, read from OUT/CELL/metrics.json alone (e.g. cells scored on other
    machines, their metrics.json brought back), and the names of the grid's cells that have none. Every
    cell must have one, made with its config; with partial, cells without one are left out (named)."""
    results, missing, other = [], [], []
    for (k, b, s), cell_cfg, folder in grid:
        rows = scored_rows(folder, cell_cfg)
        if rows is None:
            (other if folder.metrics.exists() else missing).append(folder.root.name)
        else:
            results.append({"k": k, "budget": b, "seed": s, "rows": rows})
    if other:
        first = next(c for _, c, folder in grid if folder.root.name == other[0])
        made = read_metrics(RunFolder(out / other[0]))["config"]
        differs = result_differences(made, first)
        hint = (" (monolith.enabled differs: give --monolith-k the K whose cells trained the monolith)"
                if any(d.startswith("monolith.enabled") for d in differs) else "")
        raise DDMError(f"--stages report: the metrics.json of cells {', '.join(other)} in {out} were made with "
                       f"another config; {other[0]} differs in {'; '.join(differs[:6]) or 'its config'}{hint}; give "
                       "the config, the --set options, --monolith-k and the --scale they were made with")
    if missing and (not partial or not results):
        fix = ("" if partial else "; or add --partial for a report of the scored cells alone (the others "
               "named in it)")
        other_scale = [name.removesuffix("_steps") if name.endswith("_steps") else f"{name}_steps" for name in missing]
        there = [name for name in other_scale if (out / name / "metrics.json").exists()]
        if there:
            fix += (f". Cells of the other --scale are there ({', '.join(there[:3])}): give the --scale the grid "
                    "was made with")
        raise DDMError(f"--stages report: cells {', '.join(missing)} have no {out}/CELL/metrics.json; score them "
                       f"with --stages evaluate (or all), or copy each cell's metrics.json there{fix}")
    return results, missing


def data_shape(cfg: RunConfig, grid: list[tuple]) -> tuple[int, ...]:
    """One sample's shape: from the data of a cell that has it, else from the data the config names."""
    for _, _, folder in grid:
        if folder.data_info.exists():
            return tuple(read_json(folder.data_info)["data_shape"])
    return tuple(load_data(cfg)[0].data_shape)


def grid_flops(cfg: RunConfig, ks: list[int], budgets: list[float], mono_k: int, shape: tuple[int, ...],
               scale: str = "batch") -> dict[str, dict[str, dict[float, float]]]:
    """Training FLOPs per budget: {"compute": {"monolith" | "K=k": {budget: FLOPs}}, "router": {"K=k":
    {budget: the router's part}}}; the monolith is the one trained in the cells of mono_k."""
    register_user_networks(cfg)
    per_sample = {k: per_sample_flops(cell_config(cfg, k, 1.0, 0), shape) for k in {*ks, mono_k}}  # once per K
    compute: dict[str, dict[float, float]] = {MONOLITH: {}}
    router: dict[str, dict[float, float]] = {}
    for b in budgets:
        mono_cfg = cell_config(cfg, mono_k, b, 0, scale=scale)
        compute[MONOLITH][b] = training_flops(mono_cfg, per_sample[mono_k])["monolith"]
        for k in ks:
            flops = training_flops(cell_config(cfg, k, b, 0, scale=scale), per_sample[k])
            compute.setdefault(f"K={k}", {})[b] = flops["ddm"]
            router.setdefault(f"K={k}", {})[b] = flops["router"]
    return {"compute": compute, "router": router}


def write_report(cfg: RunConfig, results: list[dict], out: Path, ks: list[int], budgets: list[float],
                 strategies: list[str], mono_k: int, shape: tuple[int, ...], log: Log,
                 missing: list[str] = (), scale: str = "batch") -> dict:
    """OUT/sweep.json, sweep.md, plots/sweep.png (each K's best strategy) and plots/sweep_strategies.png (a
    panel per K, every strategy) from the cells' results (missing: the grid's cells
    left out, named in the report); returns the report's data."""
    flops = grid_flops(cfg, ks, budgets, mono_k, shape, scale)
    report = {**summarize(results, ks, budgets, strategies, flops["compute"]), "monolith_k": mono_k,
              "scale": scale, "missing": list(missing),
              "short_trainings": short_trainings(cfg, ks, budgets, mono_k, scale),
              "router_flops": {key: {f"{b:g}": v for b, v in per.items()} for key, per in flops["router"].items()}}
    write_json(out / "sweep.json", report)
    floors = {name: v["lo"] for name, v in report["floors"].items()}
    plot_sweep({"each K's best strategy": curves(report)}, report["metric"], out / "plots" / "sweep.png", floors)
    per_k = {f"K={k}": curves(report, k) for k in ks if k in report["best"]}
    if per_k:
        plot_sweep(per_k, report["metric"], out / "plots" / "sweep_strategies.png", floors)
    write_bytes_atomic(out / "sweep.md", render(report).encode())
    log(f"sweep report: {out / 'sweep.md'}")
    return report


def curves(report: dict, k: int | None = None) -> dict[str, list[tuple[float, float, float, float]]]:
    """A plot's curves, as (training FLOPs, mean, lo, hi): the monolith and each K's best series, or
    (given k) the monolith and every strategy of that K."""
    if k is None:
        keys = [MONOLITH] + [report["best"][kk] for kk in report["ks"] if kk in report["best"]]
    else:
        keys = [MONOLITH] + [key for key in report["table"] if key.startswith(f"K={k} ")]
    return {key: [(report["compute"][compute_group(key)][b], p["mean"], p["lo"], p["hi"])
                  for b, p in report["table"][key].items()] for key in keys if key in report["table"]}


def sweep(cfg: RunConfig, out: str | Path, ks: list[int], budgets: list[float], seeds: list[int],
          all_seeds: bool = False, force: bool = False, log: Log = print, backend: str = "inline",
          workers: int | None = None, stages: str = "all", monolith: int | None = None,
          partial: bool = False, scale: str = "batch") -> dict | None:
    """Run every cell (skipping what is done) and write the report; returns the report's data.
    monolith: the K whose cells train the monolith (default: monolith_k's choice), for a grid split
    into parts run one by one (on several machines or sessions): every part gives the whole grid's K.
    stages = "train" trains every cell and writes no report (None); "evaluate" scores cells trained
    before (a GPU session can train the grid and a later one score it); "report" trains and scores
    nothing: the report from every cell's metrics.json (cells scored on several machines); with partial,
    from the cells that have one (a grid still being measured), naming the others. scale: how each K's
    experts take a budget (SCALES; cell_config)."""
    check_grid(cfg, ks, budgets, seeds, scale)
    check_sweep_config(cfg)
    if stages not in SWEEP_STAGES:
        raise DDMError(f"--stages: unknown value {stages!r}; accepted: {', '.join(SWEEP_STAGES)}")
    if scale not in SCALES:
        raise DDMError(f"--scale: unknown value {scale!r}; accepted: {', '.join(SCALES)}")
    if partial and stages != "report":
        raise DDMError(f"--partial: only with --stages report (got --stages {stages}); score the missing cells, "
                       "then report with --stages report --partial")
    out = check_folder_target(Path(out), "--out")  # --out FILE: named before any work
    check_outside_runs(out, "a sweep writes one run folder per cell into --out", "runs/sweep")
    check_own_study(out, "sweep")  # not a misalignment study's folder, nor a report.md no sweep wrote
    todo = cells(ks, budgets, seeds, all_seeds)
    mono_k = monolith_k(cfg, ks, monolith)
    if mono_k not in ks:
        log(no_monolith_note(ks, mono_k))
    grid = grid_cells(cfg, out, todo, mono_k, scale)
    check_other_cells(out, cfg, grid)
    strategies = [s for s in cfg.sample.strategies if s != MONOLITH]
    others = [] if all_seeds else [c for c in cells(ks, budgets, seeds, all_seeds=True) if c not in todo]
    beyond = [folder.name for folder in (cell_dir(out, *c, scale, cfg.partition.k) for c in others)
              if (folder / "metrics.json").exists()]
    if beyond and stages != "train":
        log(f"sweep: {'cells' if len(beyond) > 1 else 'cell'} {', '.join(beyond)} "
            f"{'are' if len(beyond) > 1 else 'is'} scored but left out: a seed other than the first counts "
            "only at the smallest and largest budget; add --all-seeds to report every seed at every budget")
    if stages == "report":
        results, missing = scored_cells(grid, out, partial)
        return write_report(cfg, results, out, ks, budgets, strategies, mono_k, data_shape(cfg, grid), log,
                            missing, scale)
    short = short_trainings(cfg, ks, budgets, mono_k, scale)
    if short:
        batch = "" if scale == "batch" else ", or use --scale batch (every K trains the config's steps x budget)"
        log(f"sweep: warning: {'; '.join(short)}. Such points measure networks stopped while warming up; "
            f"for a fair curve lower the warm-up (--set expert.train.warmup=N) or raise the budget{batch}")
    # a cell whose metrics.json was made with its config is finished: kept, neither retrained nor rescored
    kept = [None if force else scored_rows(folder, c) for _, c, folder in grid]
    if stages == "evaluate":  # every untrained cell named before any is scored (a cell's run_pipeline refuses only
        #                        its own, when its turn comes, and offers `ddmkit run` for that one folder)
        untrained = [folder.root.name for (_, c, folder), rows in zip(grid, kept)
                     if rows is None and untrained_parts(c, folder.root)]
        if untrained:
            raise DDMError(f"--stages evaluate: cells {', '.join(untrained)} in {out} are not trained; train them "
                           "first with the same command and --stages train (or --stages all)")
    check_brought_back(out, grid, kept, force)
    for (_, c, folder), rows in zip(grid, kept):  # before any cell trains: a cell folder of other files, or of a
        if rows is None:                           # run trained otherwise (without --force), is refused
            check_same_monolith(folder, c)
            check_run_target(folder, c, force)
    check_devices(cfg)
    check_network_arguments(cfg)
    check_grid_data(cfg, new_partitions(out, grid, kept), backend, workers, mono_k)
    with removing_new_empty_folders(out):  # a first cell that failed its checks leaves no folder, nor a parent
        results = run_cells(cfg, out, grid, kept, force, log, backend, workers, stages)
    if stages == "train":
        trained = sum(rows is None for rows in kept)
        log(f"sweep: {trained} cells trained, {len(grid) - trained} already scored; the same command with "
            "--stages evaluate (or all) scores them")
        return None
    return write_report(cfg, results, out, ks, budgets, strategies, mono_k, data_shape(cfg, grid), log,
                        scale=scale)


def run_cells(cfg: RunConfig, out: Path, grid: list[tuple], kept: list[dict | None], force: bool, log: Log,
              backend: str, workers: int | None, stages: str) -> list[dict]:
    """Run the grid's cells in order (kept: a cell's rows if it was scored before, else None; such cells are
    kept as they are), a new cell sharing the data, reference features and autoencoder of a cell that holds
    them and the partition of a cell of its K; returns every scored cell's results."""
    out.mkdir(parents=True, exist_ok=True)
    # the cell whose data (reference features, autoencoder) the others share, and K -> the cell whose partition
    # the others of that K share: cells that hold them (a kept cell may hold only its metrics.json)
    shared = "autoencoder" if cfg.latent.enabled else "data"
    first: RunFolder | None = None
    partitions: dict[int, RunFolder] = {}
    results = []
    for i, (((k, b, s), cell_cfg, folder), rows) in enumerate(zip(grid, kept)):
        log(f"sweep cell {i + 1}/{len(grid)}: k={k}, budget {b:g}, seed {s}")
        if rows is not None:
            log(f"scored before ({folder.metrics}): kept")
        else:
            check_same_monolith(folder, cell_cfg)
            if not folder.config.exists():
                first = first or cell_in_folder(out, cell_cfg, SHARED, shared)
                same_k = partitions.get(k) or cell_in_folder(out, cell_cfg, (*SHARED, "partition"), "partition")
                if first is not None:
                    seed_cell(folder, cell_cfg, first, same_k)
            result = run_pipeline(cell_cfg, folder.root, force, log, backend, workers, stages=stages)
            rows = None if result is None else result["rows"]
        if getattr(folder, shared).exists() and (first is None or not first.data.exists()):
            first = folder  # a cell that holds the data too is the better source
        if folder.partition.exists():
            partitions.setdefault(k, folder)
        if rows is not None:
            results.append({"k": k, "budget": b, "seed": s, "rows": rows})
    return results


FLOORS = (FLOOR, RECONSTRUCTIONS)  # image cells' reference rows: no sample set scores below them


def metric_of(row: dict) -> tuple[str, float]:
    """The quality metric of a result row (lower is better): FID for images, W2 / floor for vectors."""
    if "fid" in row:
        return "FID", float(row["fid"])
    return "W2 / noise floor", float(row["w2_over_floor"])


def kid_of(row: dict) -> float | None:
    """An image row's KID x 1e3 (the report's second table); None for vectors."""
    return 1e3 * float(row["kid"]) if "kid" in row else None


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (lo = hi = the mean for one seed)."""
    t = t_interval(values)
    lo, hi = (t["ci_low"], t["ci_high"]) if t["n"] > 1 else (t["mean"], t["mean"])
    return {"mean": t["mean"], "lo": lo, "hi": hi, "n": t["n"]}


def compute_group(series: str) -> str:
    """The key of a series' training compute: "monolith", or "K=k" for every strategy of a K's DDM."""
    return series if series == MONOLITH else series.split(" ")[0]


def summarize(results: list[dict], ks: list[int], budgets: list[float], strategies: list[str],
              compute: dict[str, dict[float, float]]) -> dict:
    """Per (series, budget): the metric's mean and interval over seeds; per K, the compute ratio: the
    training FLOPs (compute["K=k"][budget]) at which its best series reaches the monolith's final
    quality, over the monolith's FLOPs at the largest budget (compute["monolith"][largest])."""
    name = metric_of(next(iter(results[0]["rows"].values())))[0]
    series: dict[str, dict[float, list[float]]] = {}
    kids: dict[str, dict[float, list[float]]] = {}
    floors: dict[str, list[float]] = {}
    for r in results:
        for row_name, row in r["rows"].items():
            if row_name in FLOORS:
                floors.setdefault(row_name, []).append(metric_of(row)[1])
                continue
            if row_name == MONOLITH:
                key = MONOLITH
            elif row_name in strategies:
                key = f"K={r['k']} {row_name}"
            else:
                continue
            series.setdefault(key, {}).setdefault(r["budget"], []).append(metric_of(row)[1])
            kid = kid_of(row)
            if kid is not None:
                kids.setdefault(key, {}).setdefault(r["budget"], []).append(kid)
    order = [MONOLITH] + [f"K={k} {name}" for k in ks for name in strategies]  # the same order from any source

    def summary(values: dict) -> dict:
        return {key: {b: interval(v) for b, v in sorted(values[key].items())} for key in order if key in values}

    def as_text(per_series: dict) -> dict:  # JSON keys: the budgets as written
        return {key: {f"{b:g}": v for b, v in per.items()} for key, per in per_series.items()}

    table, kid_table = summary(series), summary(kids)
    best = {}
    for k in ks:
        rows = {key: per for key, per in table.items() if key.startswith(f"K={k} ")}
        if rows:
            best[k] = min(rows, key=lambda key: min(p["mean"] for p in rows[key].values()))
    mono = table.get(MONOLITH, {})
    advantage = {k: {b: p["mean"] / mono[b]["mean"] for b, p in table[key].items() if b in mono and mono[b]["mean"]}
                 for k, key in best.items()}  # each K's best / the monolith at the same budget
    target = mono[max(mono)]["mean"] if mono else math.nan
    ratio, smallest = {}, {}
    unscored = {k: [b for b in sorted(budgets) if b not in table[key]] for k, key in best.items()}  # partial reports
    if mono:
        unit = compute[MONOLITH][max(mono)]  # the monolith's training FLOPs at the largest budget
        for k, key in best.items():
            points = [(compute[compute_group(key)][b], p["mean"]) for b, p in table[key].items()]
            reached = reach(points, target)
            ratio[k] = None if reached is None else reached / unit
            smallest[k] = min(c for c, _ in points) / unit
    return {"metric": name, "budgets": sorted(budgets), "ks": ks, "strategies": strategies,
            "table": as_text(table), "kid_table": as_text(kid_table), "compute": as_text(compute),
            "best": best, "monolith_final": target, "monolith_budget": max(mono) if mono else None,
            "compute_ratio": ratio, "compute_smallest": smallest, "unscored": unscored,
            "floors": {name: {"lo": min(floors[name]), "hi": max(floors[name])} for name in FLOORS if name in floors},
            "advantage": {k: {f"{b:g}": v for b, v in per.items()} for k, per in advantage.items()},
            "cells": results}


def reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The compute at which a series of (compute, mean) points reaches `target` (interpolated linearly
    in log compute between points; the first point's compute if it is already there; None if never)."""
    points = sorted(points)
    if not points or math.isnan(target):
        return None
    if points[0][1] <= target:
        return points[0][0]
    for (c0, m0), (c1, m1) in zip(points, points[1:]):
        if m1 <= target:
            frac = (m0 - target) / (m0 - m1) if m0 != m1 else 1.0
            return math.exp(math.log(c0) + frac * (math.log(c1) - math.log(c0)))
    return None


def ratio_text(ratio: float | None, smallest: float, unscored: list[float] = ()) -> str:
    """A compute ratio in words: "never" when no budget reaches the target, or "not by budget b" when
    some budgets of the series are not scored yet (a partial report); "<= r x" when the series'
    smallest budget already reaches it (the ratio is then an upper bound)."""
    if ratio is None:
        return "never" if not unscored else f"not yet (budgets {', '.join(f'{b:g}' for b in unscored)} not scored)"
    scored = " scored" if unscored else ""
    return f"<= {ratio:.3g}x (already at the smallest{scored} budget)" if ratio == smallest else f"{ratio:.3g}x"


def render(report: dict) -> str:
    budgets = [f"{b:g}" for b in report["budgets"]]

    def cell(p: dict | None) -> str:
        if p is None:
            return "-"
        return f"{p['mean']:.4g}" if p["n"] < 2 else f"{p['mean']:.4g} [{p['lo']:.4g}, {p['hi']:.4g}] (n={p['n']})"

    def table(per_series: dict) -> str:
        rows = [[key] + [cell(per.get(b)) for b in budgets] for key, per in per_series.items()]
        return markdown_table(["series"] + [f"budget {b}" for b in budgets], rows)

    kid = "" if not report.get("kid_table") else f"""
KID x 1e3 (lower is better) of the same samples:

{table(report["kid_table"])}
"""
    ratios = [[f"K={k}", report["best"][k], ratio_text(r, report["compute_smallest"][k], report["unscored"][k])]
              for k, r in report["compute_ratio"].items()]
    return f"""# ddmkit sweep: quality against training compute

{report['metric']} (lower is better) of the FLOP-matched monolith and of each K's routing strategies.
Budgets are in units of the config's total training samples: at one budget every K's experts together
and the monolith see the same number;
{SCALE_TEXT[report.get("scale", "steps")]}.
A cell is the mean over training seeds with a 95% t-interval and n, the number of seeds, where there is
more than one.
{missing_text(report)}{short_text(report)}
{table(report["table"])}
{full_aliases(report)}{floors_text(report)}{kid}
Training compute in FLOPs (forward and backward, counted by PyTorch's FlopCounterMode): a DDM's experts
and router (the router's share in parentheses; it trains the same steps at every budget), the
monolith's own:

{compute_table(report, budgets)}

![sweep](plots/sweep.png)

Every strategy of each K: [plots/sweep_strategies.png](plots/sweep_strategies.png).

## The DDM against the monolith at each budget

{advantage_text(report, budgets)}

## Compute at which the DDM reaches the monolith

{reach_text(report, ratios)}
"""


def missing_text(report: dict) -> str:
    """A note naming the grid's cells left out of a partial report (not scored yet), or nothing."""
    missing = report.get("missing") or []
    return "" if not missing else (f"\nA partial report: {len(missing)} cells of the grid are not scored yet and "
                                   f"left out ({', '.join(missing)}); a \"-\" marks a budget with none.\n")


def short_text(report: dict) -> str:
    """A note naming the grid's points whose networks stop before their warm-up ends, or nothing."""
    short = report.get("short_trainings") or []
    return "" if not short else ("\nStopped while warming up (the learning rate never reached its peak): "
                                 f"{'; '.join(short)}.\n")


def floors_text(report: dict) -> str:
    """A note giving the cells' floors (image cells: the training images' own FID, and in latent space
    the autoencoder's reconstructions'), which no sample set can beat, or nothing."""
    floors = report.get("floors") or {}
    if not floors:
        return ""

    def value(v: dict) -> str:  # one number where the range rounds to one (11.33, not "11.33 to 11.33")
        lo, hi = f"{v['lo']:.4g}", f"{v['hi']:.4g}"
        return lo if lo == hi else f"{lo} to {hi}"
    listed = "; ".join(f"{name} {value(v)}" for name, v in floors.items())
    return (f"\nFloors, which no sample set can beat ({report['metric']} of the training images themselves, and "
            f"in latent space of their\nautoencoder reconstructions, against the same reference): {listed}. "
            "Grey lines in the plots.\n")


def full_aliases(report: dict) -> str:
    """A note naming the strategies that route like full at some K (not sampled again), or nothing."""
    strategies = report["strategies"]
    same = [f"K={k} {name}" for k in report["ks"] for name in strategies if routes_like_full(name, k, strategies)]
    return "" if not same else (f"\n{', '.join(same)}: the same as full routing at that K (every expert, weights "
                                "r); not sampled again, see the full row.\n")


def advantage_text(report: dict, budgets: list[str]) -> str:
    """Each K's best strategy over the monolith at the same budget, per budget (the DDM's advantage and
    how it moves with budget and K), or why there is none (no monolith cells)."""
    rows = [[f"K={k}", report["best"][k]] + [f"{per[b]:.3g}" if b in per else "-" for b in budgets]
            for k, per in report["advantage"].items() if per]
    if not rows:
        return "No budget has both the monolith and a DDM scored."
    return (f"{report['metric']} of each K's best strategy over the monolith's at the same budget (below 1: the "
            f"DDM is better;\na falling row: its advantage grows with compute):\n\n"
            + markdown_table(["K", "best strategy"] + [f"budget {b}" for b in budgets], rows))


def compute_table(report: dict, budgets: list[str]) -> str:
    """Training FLOPs per compute group and budget, with the router's share for a DDM."""
    rows = []
    for key, per in report["compute"].items():
        router = report["router_flops"].get(key, {})
        rows.append([key if key == MONOLITH else f"{key} (experts + router)"] + [
            f"{per[b]:.3g}" + (f" ({router[b] / per[b]:.1%})" if b in router else "") for b in budgets])
    return markdown_table(["compute"] + [f"budget {b}" for b in budgets], rows)


def reach_text(report: dict, ratios: list[list[str]]) -> str:
    """The compute-ratio section's body: the table, or why there is none (cells not scored yet in a
    partial report, or a grid without monolith cells)."""
    if not report["compute_ratio"] and report.get("missing"):
        return ("None yet: this partial report has no monolith cell or no DDM cell scored; the compute ratio "
                "comes with them.")
    if not report["compute_ratio"]:
        return (f"This grid has no monolith cells: the monolith is trained in the cells of K = "
                f"{report['monolith_k']} (--monolith-k), and this grid's K are "
                f"{', '.join(map(str, report['ks']))}. Report a grid that includes them (`--stages report` over "
                "every part's cells) for the compute ratio.")
    final, budget = report["monolith_final"], report["monolith_budget"]
    return f"""The monolith's {report['metric']} at its largest budget ({budget:g}) is {final:.4g}; the training FLOPs
(experts + router) at which each K's best strategy reaches it, interpolated in log compute, as a
fraction of the monolith's FLOPs at that budget:

{markdown_table(["K", "best strategy", "compute ratio"], ratios)}"""
