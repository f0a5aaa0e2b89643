"""The evaluation stage of a vector run: every sample set against held-out data beside the noise
floor (W2, sliced W2, MMD; NLL, mode coverage and off-manifold rate under a Gaussian-mixture
truth), router accuracy and calibration per noise level, the missing-expert and statistics-only
router studies, plots and report.md.
"""
from __future__ import annotations

import json
from typing import Callable

from ddmkit.config import RunConfig
from ddmkit.ddm import exact_ddm, load_ddm
from ddmkit.ddm.load import has_default_router, island_stats_router, load_truth, nearest_cluster_fn
from ddmkit.errors import DDMError
from ddmkit.evaluation.plots import plot_router_accuracy, plot_samples
from ddmkit.evaluation.routers import router_report
from ddmkit.evaluation.sets import FLOOR, evaluate_all
from ddmkit.evaluation.studies import (STATS_STRATEGIES, missing_expert_study, stats_router_study, stats_row_order,
                                      study_size)
from ddmkit.conventions import __version__
from ddmkit.io import read_json, write_bytes_atomic, write_json
from ddmkit.layout import RunFolder
from ddmkit.pipeline.models import (models_section, partition_k, seconds_sentence, training_seconds,
                                   write_training_plot)
from ddmkit.pipeline.samplesets import planned_sets, sample_options
from ddmkit.pipeline.sampling import drawn_on, load_sets, networks_hash, read_info, sampling_sentence
from ddmkit.pipeline.stages import load_split, read_data_info
from ddmkit.registry import load_partition_checked, read_manifest, read_registry
from ddmkit.tables import fmt, markdown_table

Log = Callable[[str], None]


COLUMNS = [("W2", "w2"), ("W2/floor", "w2_over_floor"), ("sliced W2", "sliced_w2"), ("MMD", "mmd"),
           ("NLL", "nll"), ("modes hit", "modes_hit"), ("mode KL", "mode_kl"), ("off-manifold", "off_manifold"),
           ("expert calls/sample", "expert_calls_per_sample"), ("wall time (s)", "wall_time")]


def stage_evaluate(cfg: RunConfig, run, log: Log = print) -> dict:
    """Metrics for every sampled set, router accuracy per t, the studies, plots, report.md."""
    folder = RunFolder(run)
    if not folder.sample_info.exists():
        trained = folder.manifest.exists() and any((folder.expert(c) / "model.safetensors").exists()
                                                   for c in range(read_manifest(folder.partition)["k"]))
        if not trained:
            raise DDMError(f"{folder.root}: no samples yet, and no expert is trained: train the networks first "
                           f"(`ddmkit run CONFIG --out {folder.root}`), then `ddmkit sample {folder.root}`")
        drawn = sorted(p.name for p in folder.samples.glob("*.safetensors")) if folder.samples.is_dir() else []
        if drawn:  # sets without the record of how they were drawn: scored as what, is unknown
            raise DDMError(f"{folder.root}: {folder.sample_info} is missing, the record of how the sets in "
                           f"{folder.samples} ({', '.join(drawn[:4])}{', ...' if len(drawn) > 4 else ''}) were drawn; "
                           f"draw them again with `ddmkit sample {folder.root} --strategy NAME` (or delete them)")
        raise DDMError(f"{folder.root}: no samples yet; run `ddmkit sample {folder.root}` first")
    infos = read_info(folder)
    names = [s.name for s in planned_sets(cfg, load_truth(run) is not None) if folder.sample_set(s.name).exists()]
    names += [n for n in infos if n not in names and folder.sample_set(n).exists()]  # sets drawn by `ddmkit sample`
    samples = {n: tensors["x"] for n, tensors in load_sets(run, names).items()}  # each file read once, checked
    test = load_split(run, "test")
    truth = test.truth
    result = evaluate_all(samples, infos, test.x, truth, cfg.evaluate.chunk, sample_options)
    for name, row in result["rows"].items():
        row.update(drawn_on(infos.get(name, {})))  # the device and autocast dtype it was drawn with

    manifest, ptensors = load_partition_checked(folder.partition)
    n_eval = min(len(test.x), 4000)
    xs = test.x[:n_eval]
    labels = nearest_cluster_fn(manifest, ptensors)(xs)
    learned = has_default_router(run)  # no: the sets were routed by the islands' statistics (no router trained)
    routers = {"learned router": load_ddm(run).router} if learned else {}
    if cfg.evaluate.stats_router or not learned:
        routers["statistics-only router"] = island_stats_router(run)[0]
    if truth is not None:
        try:
            routers["exact posterior"] = exact_ddm(run).router
        except DDMError:
            pass
    rep = router_report(routers, xs, labels)
    result["router"] = rep

    key = studies_key(cfg, run)
    before = earlier_studies(folder, key)
    drawn: dict = {}  # the learned router's study rows with every expert, drawn once for both studies
    if cfg.evaluate.missing_experts and learned:  # the studies compare with the learned router's sets
        result["missing_experts"] = before.get("missing_experts") or missing_expert_study(cfg, run, test.x, truth,
                                                                                          drawn=drawn)
    if cfg.evaluate.stats_router and learned:
        result["stats_router"] = before.get("stats_router") or stats_router_study(cfg, run, test.x, truth,
                                                                                  drawn=drawn)
    if before and set(before) & set(result):
        log(f"studies: {', '.join(sorted(set(before) & set(result)))} kept from {folder.metrics} (the same networks, "
            "data and settings)")
    result["studies_key"] = key
    result["config"] = cfg.model_dump()

    plot_samples(samples, test.x, truth, folder.plots / "samples.png",
                 {n: f"W2/floor {result['rows'][n]['w2_over_floor']:.2f}" for n in names})
    plot_router_accuracy(rep, folder.plots / "router_accuracy.png")
    training = write_training_plot(run)  # plots/training.png; the report's lines on it
    write_json(folder.metrics, result)
    write_bytes_atomic(folder.report, render_report(cfg, run, result, training).encode())
    log(f"report: {folder.report}")
    return result


def studies_key(cfg: RunConfig, run) -> dict | None:
    """What the studies' rows depend on: the experts and router (networks_hash), the data, the [sample]
    settings they draw with, [evaluate] and ddmkit's version; None for a run not registered (its networks
    are not identified), whose studies are drawn every time."""
    folder = RunFolder(run)
    if not folder.registry.exists():
        return None
    drawn_by = {"strategies", "stats_router_strategies", "guidance_sweep", "sweep_strategy", "sweep_n"}
    present = [path.parent.name for path in sorted(folder.experts.glob("expert_*/model.safetensors"))]
    networks = networks_hash(read_registry(folder.root), ["expert", "router"])
    return {"networks": networks, "experts_present": present, "data": read_data_info(folder),
            "sample": cfg.sample.model_dump(exclude=drawn_by), "evaluate": cfg.evaluate.model_dump(),
            "ddmkit_version": __version__}


def earlier_studies(folder: RunFolder, key: dict | None) -> dict:
    """The studies of the last evaluation (RUN/metrics.json) when they were measured with this key: drawing
    them again would give the same rows (they take most of an evaluation's time)."""
    if key is None or not folder.metrics.exists():
        return {}
    try:
        earlier = read_json(folder.metrics)
    except DDMError:  # a damaged metrics.json: measured again, and rewritten
        return {}
    if not isinstance(earlier, dict) or earlier.get("studies_key") != json.loads(json.dumps(key)):
        return {}
    return {name: earlier[name] for name in ("missing_experts", "stats_router") if name in earlier}


def render_report(cfg: RunConfig, run, result: dict, training: str = "") -> str:
    """report.md; `training`: its lines on the training plot (write_training_plot)."""
    floor = result["floor"]
    rows = [[FLOOR, w2_text(floor), 1.0] + [floor.get(key) for _, key in COLUMNS[2:8]]
            + ["-", "-"]]
    for name, r in result["rows"].items():
        rows.append([name, w2_text(r)] + [r.get(key) for _, key in COLUMNS[1:]])
    rep = result["router"]
    router_rows = [[f"{t:.2f}"] + [f"{rep[n]['accuracy'][i]:.3f} / {rep[n]['ece'][i]:.3f}" for n in rep if n != "t"]
                   for i, t in enumerate(rep["t"])]
    return _main_report(cfg, run, result, rows, rep, router_rows, training) + _fault_sections(cfg, result)


def w2_text(row: dict) -> str | float | None:
    """A row's W2 as the report shows it: with its standard error over the pairs where there are several."""
    if row.get("w2_sem") is None or row.get("w2") is None:
        return row.get("w2")
    return f"{fmt(row['w2'])} ± {fmt(row['w2_sem'], 2)}"


def pairs_sentence(result: dict) -> str:
    """How W2 was measured, and a warning where one pair leaves it without an error bar."""
    pairs, chunk = result["pairs"], result["chunk"]
    said = f"W2 and sliced W2 averaged over {pairs} pair(s) of {chunk} points, MMD on the first pair."
    if pairs == 1:
        said += (" **One pair only**: W2 has no error bar, and a W2/floor below 1 is chance (the floor is one "
                 "draw too); draw more samples per set (sample.n, or `ddmkit sample --n`) or lower evaluate.chunk "
                 "for several pairs.")
    return said


def study_sentence(cfg: RunConfig) -> str:
    """How the studies' rows are drawn and scored: the config's [sample] settings at evaluate.study_n
    samples (at most sample.n), W2/floor against a floor measured at that size; the main sets can
    have been drawn otherwise (`ddmkit sample --steps ...`)."""
    s, n = cfg.sample, study_size(cfg)
    chunk = min(cfg.evaluate.chunk, n)
    count = ("evaluate.study_n" if n == cfg.evaluate.study_n else
             f"sample.n, as it is below evaluate.study_n = {cfg.evaluate.study_n},")
    steps = "" if s.solver == "adaptive" else f", {s.steps} steps"
    return (f"Each row: {n} samples, {s.solver}{steps}, seed {s.seed}, from the config's [sample] section ({count} "
            f"sets the count); W2/floor over {n // chunk} pair(s) of {chunk} points, against a floor measured at "
            "that size.")


def _fault_sections(cfg: RunConfig, result: dict) -> str:
    """Report sections for the missing-expert study and the statistics-only router."""
    out = ""
    cols = [("W2/floor", "w2_over_floor"), ("NLL", "nll"), ("modes hit", "modes_hit"), ("mode KL", "mode_kl"),
            ("expert calls/sample", "expert_calls_per_sample")]
    if "missing_experts" in result:
        rows = [[r["removed"], str(r["experts_removed"])] + [r.get(key) for _, key in cols]
                for r in result["missing_experts"]]
        strategy = result["missing_experts"][0]["strategy"]
        absent = result["missing_experts"][0].get("already_missing")
        absent = f" Experts {absent} are missing from this run (no folder): every row lacks them." if absent else ""
        out += f"""
## Missing experts

Sampling ({strategy}) with 0, 1, 2, ... experts removed in a fixed random order, the router's probabilities
renormalised over the experts still present (what `load_ddm` does when expert folders are missing).{absent}
{study_sentence(cfg)}

{markdown_table(["removed", "experts removed"] + [c for c, _ in cols], rows)}
"""
    if "stats_router" in result:
        study = result["stats_router"]["rows"]  # kept from a metrics.json: its keys sorted, drawn in another order
        rows = [[name] + [study[name].get(key) for _, key in cols] for name in stats_row_order(study)]
        out += f"""
## Statistics-only router

The router built only from each island's count, mean and covariance (the Gaussian posterior under the noised
cluster Gaussians, `ddmkit.routing.stats_router`) against the learned router, same experts, strategies
{", ".join(STATS_STRATEGIES)}. Its accuracy per noise level is in the router table above. {study_sentence(cfg)}

{markdown_table(["strategy (router)"] + [c for c, _ in cols], rows)}
"""
    return out


def _main_report(cfg: RunConfig, run, result: dict, rows: list, rep: dict, router_rows: list,
                 training: str = "") -> str:
    d, p = cfg.data, cfg.partition
    made = read_json(RunFolder(run).data_info)  # the rows the run has (the config's counts can be "all" or at most)
    return f"""# ddmkit run report

Data: `{d.name}` ({made['n_train']} train, {made['n_test']} test). Partition: {partition_k(run, cfg)}, features = {p.features},
balanced = {p.balanced}. Sampling: {sampling_sentence(cfg, run, list(result["rows"]))}.
{pairs_sentence(result)}
{seconds_sentence(training_seconds(run))}

{models_section(run, cfg, training)}

## Samples per strategy

W2 is the exact 2-Wasserstein distance between {result['chunk']}-point sets, averaged over {result['pairs']}
independent pairs (a chunk of the samples against its own held-out set), ± its standard error where there are
several pairs; the first row is the same measurement with held-out data in place of samples: what samples of
the true distribution score on average at this size, so W2/floor near 1 is as good as a sampler gets (a set
can fall below 1 by chance, by about its W2 error over the floor). Sliced W2 is the root mean squared 1-D W2
over 256 random directions, averaged over the same pairs; MMD the unbiased squared maximum mean discrepancy
with a Gaussian kernel whose width is the median distance within the pair's points (so it is near 0, can be
slightly negative, and its width differs from row to row), on the first pair only.
NLL, mode coverage and off-manifold rate are under the true mixture ('-' without one): each sample counts for
its most probable component however far from it, a mode is hit when it gets a tenth of its expected count,
mode KL is KL(share of samples per mode, counts + 0.5 | mixture weights), and a sample is off-manifold when it
is outside the 0.999 quantile of every component (Mahalanobis distance), so samples off every mode still hit
modes. Expert calls count network evaluations per sample over the whole trajectory (of the monolith for its
row).

{markdown_table(["strategy"] + [c for c, _ in COLUMNS], rows)}

![samples](plots/samples.png)

## Router

Accuracy / expected calibration error per noise level, on held-out data labelled by its nearest partition
centroid.

{markdown_table(["t"] + [n for n in rep if n != "t"], router_rows)}

![router accuracy](plots/router_accuracy.png)
"""
