"""The evaluation stage of an image run: FID and KID of every sample set against the test split
(the train-images floor first), sample grids, one row of example images per cluster, report.md.

Sets can be scored as soon as they are drawn (pass `scorer` as the sampling stage's on_sample),
so a long evaluation keeps every finished score when interrupted.
"""
from __future__ import annotations

from typing import Callable

import torch

from ddmkit.config import RunConfig
from ddmkit.ddm.load import latent_codec
from ddmkit.evaluation.images import SetScorer, cluster_grid, save_png
from ddmkit.io import read_json, write_bytes_atomic, write_json
from ddmkit.layout import RunFolder, safe_name
from ddmkit.pipeline.models import (models_section, partition_k, seconds_sentence, training_seconds,
                                   write_training_plot)
from ddmkit.pipeline.samplesets import STATISTICS, planned_sets
from ddmkit.pipeline.sampling import drawn_on, read_info, sampling_sentence
from ddmkit.routing.strategies import number
from ddmkit.progress import track
from ddmkit.tables import markdown_table

Log = Callable[[str], None]
FLOOR = "train images (floor)"
RECONSTRUCTIONS = "autoencoder reconstructions (latent floor)"


def scorer_for(cfg: RunConfig, run, log: Log = print, device="cpu") -> SetScorer:
    """The FID/KID scorer of a run's [evaluate] section (test features computed once, cached)."""
    return SetScorer(run, cfg.evaluate.fid_features, cfg.evaluate.kid_subset, cfg.sample.n, log, device)


def stage_evaluate(cfg: RunConfig, run, log: Log = print, device="cpu", scorer: SetScorer | None = None) -> dict:
    """Scores of every drawn set, the report and its plots."""
    folder = RunFolder(run)
    scorer = scorer or scorer_for(cfg, run, log, device)
    recorded = read_info(folder)
    infos = {name: {**{k: v for k, v in info.items() if k != "drawn_with"}, **drawn_on(info)}
             for name, info in recorded.items()}
    rows = {FLOOR: scorer.floor()}
    if folder.is_latent:
        rows[RECONSTRUCTIONS] = scorer.reconstruction_floor(latent_codec(run, device))
    sets = planned_sets(cfg, has_truth=False)
    planned = {s.name for s in sets}
    for s in track(sets, "scoring", lambda s: s.name):
        if not folder.sample_set(s.name).exists():
            continue
        if (s.router == STATISTICS and s.n < cfg.sample.n and folder.sample_set(s.strategy).exists()
                and first_rows_alike(recorded, s.strategy, s.name, s.n)):
            # the learned router's set on the same first n noises and labels, for a like-for-like FID
            calls = infos.get(s.strategy, {}).get("expert_calls_per_sample", "-")
            rows[f"{s.strategy} (learned router, first {s.n})"] = {**scorer(s.strategy, s.n), "n": s.n,
                                                                   "expert_calls_per_sample": calls,
                                                                   "subset_of": s.strategy}
        scored = scorer(s.name)  # its own count: `ddmkit sample --n` may have drawn it again with another
        rows[s.name] = {**scored, **infos.get(s.name, {}), "n": scored["n"]}
    for name, info in infos.items():  # sets drawn by `ddmkit sample` beyond the config's
        if name not in planned and folder.sample_set(name).exists():
            scored = scorer(name)
            rows[name] = {**scored, **info, "n": scored["n"]}
    save_png(cluster_grid(run), folder.plots / "clusters.png")
    manifest = read_json(folder.manifest)
    result = {"rows": rows, "features": scorer.kind, "reference_seconds": scorer.ref_seconds,
              "n_test": len(scorer.f_test), "cluster_counts": manifest["counts"], "config": cfg.model_dump(),
              "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
              "train_seconds": training_seconds(run)}
    training = write_training_plot(run)  # plots/training.png; the report's lines on it
    write_json(folder.metrics, result)
    write_bytes_atomic(folder.report, render_report(cfg, run, result, training).encode())
    log(f"report: {folder.report}")
    return result


def first_rows_alike(recorded: dict, learned: str, stats: str, n: int) -> bool:
    """Whether the learned router's set `learned` holds the first n rows of the same noise and labels, drawn the
    same way, as the statistics-only router's set `stats` (samples/info.json's drawn_with): else (`ddmkit sample
    --n 4` drew it again) its first n rows are no like-for-like comparison. Sets of an earlier ddmkit, which
    record no drawn_with, are taken as alike."""
    mine, theirs = (recorded.get(name, {}).get("drawn_with") for name in (learned, stats))
    if not mine or not theirs:
        return True
    same = ("noise_n", "seed", "solver", "steps", "guidance", "router_every", "batch_size")
    return mine.get("n", 0) >= n and all(mine.get(key) == theirs.get(key) for key in same)


def table_rows(result: dict, guidance: float) -> list[list]:
    """The samples table's rows; a set drawn at a guidance other than `guidance` (the report's) is named
    with its own ('top-2 @ cfg 3', as the guidance sweep names its sets). FID / monolith only for a set of
    the monolith's sample count (FID depends on it: other_counts)."""
    rows = []
    mono = result["rows"].get("monolith", {}).get("fid")
    mono_n = result["rows"].get("monolith", {}).get("n")
    for name, r in result["rows"].items():
        rel = r["fid"] / mono if mono and r.get("n") == mono_n else None
        own = r.get("guidance", guidance)
        if own != guidance and not name.endswith(f" @ cfg {number(own)}"):
            name = f"{name} @ cfg {number(own)}"
        rows.append([name, r.get("n", "-"), r["fid"], rel, r["kid"] * 1e3, r.get("expert_calls_per_sample", "-"),
                     r.get("wall_time", "-"), r.get("fid_seconds", "-")])
    return rows


def other_counts(result: dict) -> str:
    """A sentence naming the sets of another sample count than the monolith's ('' when none): their FID is
    not comparable with it (FID falls as n grows), so their FID / monolith is left out."""
    mono_n = result["rows"].get("monolith", {}).get("n")
    others = [f"{name} ({r['n']})" for name, r in result["rows"].items()
              if mono_n is not None and r.get("n") not in (None, mono_n) and name not in (FLOOR, RECONSTRUCTIONS)]
    return ("" if not others else f"\nFID depends on the number of samples (it falls as n grows): {', '.join(others)} "
            f"hold another count than the monolith's {mono_n}, so their FID / monolith is left out; compare sets of "
            "one n.\n")


def render_report(cfg: RunConfig, run, result: dict, training: str = "") -> str:
    """report.md; `training`: its lines on the training plot (write_training_plot)."""
    d, p, s = cfg.data, cfg.partition, cfg.sample
    table = markdown_table(["samples", "n", "FID", "FID / monolith", "KID x 1e3", "expert calls/sample", "sampling (s)",
                            "FID time (s)"], table_rows(result, s.guidance))
    grids = "\n".join(f"![{n}](plots/samples_{safe_name(n)}.png)" for n, r in result["rows"].items()
                      if n not in (FLOOR, RECONSTRUCTIONS) and "subset_of" not in r)
    source = cfg.latent.pretrained or "an autoencoder trained by ddmkit"
    drawn = [n for n, r in result["rows"].items() if n not in (FLOOR, RECONSTRUCTIONS) and "subset_of" not in r]
    latent = "" if RECONSTRUCTIONS not in result["rows"] else (
        f"\nLatent DDM: experts, router and monolith work on the latents of {source}; samples are decoded. The "
        "second row is the same training images encoded and decoded: the floor of any latent sampler.\n\n"
        "![reconstructions](plots/reconstructions.png)\n")
    return f"""# ddmkit image run report

Data: `{d.name}` {d.params} ({result['n_test']} test images as the FID reference). Partition: {partition_k(run, cfg)},
features = {p.features}, cluster sizes {result['cluster_counts']}. Monolith: the experts' network with K x
{"the steps" if cfg.monolith.match == "steps" else "the batch, the same steps"} (FLOP-matched). Sampling:
{sampling_sentence(cfg, run, drawn, "images")}; class labels fixed by each set's seed (the same for sets of one
seed), guidance {s.guidance} unless a row names another ('@ cfg G').
Features: {result['features']} on {result['device']}; test features took {result['reference_seconds']:.1f}s.
{seconds_sentence(result['train_seconds'])}

{models_section(run, cfg, training)}
## Samples

The first row is {result['rows'][FLOOR]['n']} training images against the test set: the floor.
{latent}
{table}
{other_counts(result)}
Cluster examples (one row per cluster):

![clusters](plots/clusters.png)

{grids}
"""
