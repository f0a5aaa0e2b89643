"""The pipeline as stages over one run folder. Each stage reads what the
previous one wrote and skips itself when its output is already there, so a
run resumes after an interruption and single stages can run on other machines.

    RUN/config.json             the resolved configuration (guards against mixing runs; a new
                                [sample] or [evaluate] section keeps the networks, redraws the rest)
    RUN/data/                   train/test splits (+ truth.safetensors for mixtures)
    RUN/partition/              manifest.json, partition.safetensors, shards/
    RUN/experts/expert_XX/      one folder per expert (trained in isolation)
    RUN/monolith/               the FLOP-matched baseline
    RUN/router/                 the learned router
    RUN/registry.json           SHA-256 of every model folder (ddmkit.registry), checked on load
    RUN/samples/NAME.safetensors + samples/info.json
    RUN/report.md, metrics.json, plots/
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable


from ddmkit.config import RunConfig, json_digest
from ddmkit.data import load_dataset
from ddmkit.data.images import is_image_shape
from ddmkit.data.partition import load_partition, partition_data
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors, read_json, save_tensors, write_json
from ddmkit.pipeline.ddm import exact_ddm, expert_dir, load_ddm, load_monolith, load_truth
from ddmkit.pipeline.evaluate import FLOOR, evaluate_all
from ddmkit.pipeline.jobs import train_monolith, train_router
from ddmkit.pipeline.report import markdown_table, plot_router_accuracy, plot_samples
from ddmkit.pipeline.router_eval import router_report
from ddmkit.pipeline.sampling import config_options, sample_ddm, sample_single
from ddmkit.train.loop import resolve_device

Log = Callable[[str], None]
EXACT = "exact (full, exact experts + router)"


TRAINED = ("data", "partition", "expert", "router", "monolith")  # the config sections the networks depend on
DERIVED = ("samples", "eval", "analysis", "plots", "report.md", "metrics.json")  # what sampling and scoring write


def trained_digest(config: dict) -> str:
    """Hash of the config sections that decide the data, the partition and the trained networks."""
    return json_digest({name: config.get(name) for name in TRAINED})


def prepare_run_dir(out: str | Path, cfg: RunConfig, force: bool = False, log: Log = print) -> Path:
    """Create RUN/ (or reuse it for the same configuration). When only [sample] or [evaluate]
    changed, the data, partition and networks are kept and what sampling and scoring wrote is
    removed, to be drawn again. A folder holding a different run (other data, partition or
    training) is refused unless force=True, which empties it first."""
    run = Path(out)
    saved = run / "config.json"
    if saved.exists():
        old = read_json(saved)
        new = cfg.model_dump()
        if old.get("digest") != cfg.digest():
            if "config" in old and trained_digest(old["config"]) == trained_digest(new):
                changed = [name for name in ("sample", "evaluate") if old["config"].get(name) != new[name]]
                log(f"{run}: the {' and '.join(changed)} settings changed; the trained networks are kept, "
                    "samples and scores are drawn again")
                for name in DERIVED:
                    path = run / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            elif not force:
                raise DDMError(f"{run} already holds a different run (its config.json differs in the data, "
                               "partition or training); choose another --out folder or pass --force to replace it")
            else:
                shutil.rmtree(run)
    elif run.exists() and any(run.iterdir()) and not force:
        raise DDMError(f"{run} exists and is not a ddmkit run folder; choose another --out or pass --force")
    run.mkdir(parents=True, exist_ok=True)
    write_json(saved, {"digest": cfg.digest(), "config": cfg.model_dump()})
    return run


def run_config(run: str | Path) -> RunConfig:
    from ddmkit.config import validate

    return validate(RunConfig, read_json(Path(run) / "config.json").get("config", {}), f"{run}/config.json")


def stage_data(cfg: RunConfig, run: Path, log: Log = print) -> None:
    if (run / "data" / "train.safetensors").exists():
        return
    d = cfg.data
    train, test = load_dataset(d.name, d.n_train, d.n_test, d.seed, **d.params)
    for split, data in (("train", train), ("test", test)):
        tensors = {"x": data.x}
        if data.labels is not None:
            tensors["labels"] = data.labels
        save_tensors(run / "data" / f"{split}.safetensors", tensors)
    if train.truth is not None:
        t = train.truth
        save_tensors(run / "data" / "truth.safetensors",
                     {"weights": t.weights, "means": t.means, "eigvals": t.eigvals, "eigvecs": t.eigvecs})
    write_json(run / "data" / "data.json", {"name": d.name, "n_train": len(train), "n_test": len(test),
                                            "data_shape": list(train.data_shape), "exact_truth": train.truth is not None})
    log(f"data: {d.name}, {len(train)} train / {len(test)} test samples of shape {train.data_shape}")


def load_split(run: Path, split: str):
    from ddmkit.data.datasets import ArrayData

    t = load_tensors(run / "data" / f"{split}.safetensors")
    name = read_json(run / "data" / "data.json")["name"]
    return ArrayData(name, t["x"], t.get("labels"), load_truth(run))


def stage_partition(cfg: RunConfig, run: Path, log: Log = print) -> None:
    if (run / "partition" / "manifest.json").exists():
        return
    p = cfg.partition
    m = partition_data(load_split(run, "train"), p.k, run / "partition", p.features, p.pca_dim, p.balanced, p.seed)
    log(f"partition: k={m['k']}, cluster sizes {m['counts']}")


def shard_paths(run: Path) -> list[Path]:
    """Shard files in cluster order (manifest validated, paths kept inside the run)."""
    from ddmkit.registry import shard_files

    return shard_files(run)


def stage_experts(cfg: RunConfig, run: Path, log: Log = print, backend: str = "inline", workers: int | None = None,
                  address: str | None = None) -> None:
    """Train the experts not yet written, with a launch backend (ddmkit.launch);
    a job that left a checkpoint continues from it."""
    from ddmkit.launch import ExpertJob, run_jobs

    jobs = [ExpertJob(k, shard, expert_dir(run, k)) for k, shard in enumerate(shard_paths(run))
            if not (expert_dir(run, k) / "model.safetensors").exists()]
    start = time.perf_counter()
    if jobs and cfg.expert.concurrent:  # all in one stacked network on this device, each on its own shard
        from ddmkit.pipeline.concurrent import train_experts_concurrently

        train_experts_concurrently([j.shard for j in jobs], cfg.expert, [j.out_dir for j in jobs], log)
        backend = "concurrent"
    else:
        run_jobs(jobs, cfg.expert, backend, workers, address, resume=True, log=log)
    if jobs:
        log(f"experts: {len(jobs)} trained in {time.perf_counter() - start:.1f}s ({backend} backend)")


def stage_registry(cfg: RunConfig, run: Path, log: Log = print) -> None:
    """Write RUN/registry.json for the model folders present."""
    from ddmkit.registry import write_registry

    reg = write_registry(run)
    log(f"registry: {len(reg['models'])} model folders hashed into {run / 'registry.json'}")


def stage_monolith(cfg: RunConfig, run: Path, log: Log = print) -> None:
    if not cfg.monolith.enabled or (run / "monolith" / "model.safetensors").exists():
        return
    start = time.perf_counter()
    train_monolith(shard_paths(run), cfg.expert, run / "monolith", cfg.monolith.match)
    log(f"monolith: trained in {time.perf_counter() - start:.1f}s (same steps x batch as all experts)")


def stage_router(cfg: RunConfig, run: Path, log: Log = print) -> None:
    if (run / "router" / "model.safetensors").exists():
        return
    start = time.perf_counter()
    train_router(shard_paths(run), cfg.router, run / "router")
    log(f"router: trained in {time.perf_counter() - start:.1f}s")


def sample_file(run: Path, name: str) -> Path:
    return run / "samples" / (name.replace("@", "_at_").replace(" ", "_").replace("(", "").replace(")", "")
                              .replace(",", "").replace("+", "and") + ".safetensors")


def sample_one(cfg: RunConfig, run: Path, name: str, device="cpu", ddm=None) -> dict:
    """Sample one strategy (or 'monolith', or EXACT) and write it; returns its info."""
    s = cfg.sample
    if name == "monolith":
        shape = tuple(read_json(run / "data" / "data.json")["data_shape"])
        x0, info = sample_single(load_monolith(run, device), shape, s.n, s.steps, s.solver, s.seed, device,
                                 **config_options(s, routed=False))
    elif name == EXACT:
        x0, info = sample_ddm(exact_ddm(run), "full", s.n, s.steps, s.solver, s.seed, device, **config_options(s))
        info["strategy"] = EXACT
    else:
        ddm = ddm or load_ddm(run, device)
        x0, info = sample_ddm(ddm, name, s.n, s.steps, s.solver, s.seed, device, **config_options(s))
        info["missing_experts"] = ddm.meta.get("missing_experts", [])
    save_tensors(sample_file(run, name), {"x": x0}, {"strategy": name, "missing_experts": info.get("missing_experts", [])})
    info_path = run / "samples" / "info.json"
    infos = read_json(info_path) if info_path.exists() else {}
    infos[name] = {k: v for k, v in info.items() if k != "expert_rows"}
    write_json(info_path, infos)
    return info


def strategies_to_sample(cfg: RunConfig, run: Path) -> list[str]:
    names = [s for s in cfg.sample.strategies if s != "monolith" or cfg.monolith.enabled]
    if load_truth(run) is not None:
        names = [EXACT] + names
    return names


def stage_sample(cfg: RunConfig, run: Path, log: Log = print, device="cpu") -> None:
    ddm = None
    for name in strategies_to_sample(cfg, run):
        if sample_file(run, name).exists():
            continue
        if ddm is None and name not in ("monolith", EXACT):
            ddm = load_ddm(run, device)
        info = sample_one(cfg, run, name, device, ddm)
        log(f"sample {name}: {info['expert_calls_per_sample']:.1f} expert calls/sample, {info['wall_time']:.2f}s")


COLUMNS = [("W2", "w2"), ("W2/floor", "w2_over_floor"), ("sliced W2", "sliced_w2"), ("MMD", "mmd"),
           ("NLL", "nll"), ("modes hit", "modes_hit"), ("mode KL", "mode_kl"), ("off-manifold", "off_manifold"),
           ("expert calls/sample", "expert_calls_per_sample"), ("wall time (s)", "wall_time")]


def stage_evaluate(cfg: RunConfig, run: Path, log: Log = print) -> dict:
    """Metrics for every sampled strategy, router accuracy per t, plots, report.md."""
    infos = read_json(run / "samples" / "info.json")
    names = [n for n in strategies_to_sample(cfg, run) if sample_file(run, n).exists()]
    samples = {n: load_tensors(sample_file(run, n))["x"] for n in names}
    test = load_split(run, "test")
    truth = test.truth
    result = evaluate_all(samples, infos, test.x, truth, cfg.evaluate.chunk)

    manifest, ptensors = load_partition(run / "partition")
    from ddmkit.pipeline.ddm import nearest_cluster_fn

    n_eval = min(len(test.x), 4000)
    xs = test.x[:n_eval]
    labels = nearest_cluster_fn(manifest, ptensors)(xs)
    routers = {"learned router": load_ddm(run).router}
    if cfg.evaluate.stats_router:
        from ddmkit.pipeline.resilience import run_island_statistics
        from ddmkit.routing.stats_router import stats_router

        routers["statistics-only router"] = stats_router(run_island_statistics(run))
    if truth is not None:
        try:
            routers["exact posterior"] = exact_ddm(run).router
        except DDMError:
            pass
    rep = router_report(routers, xs, labels)
    result["router"] = rep
    from ddmkit.pipeline.resilience import missing_expert_study, stats_router_study

    if cfg.evaluate.missing_experts:
        result["missing_experts"] = missing_expert_study(cfg, run, test.x, truth)
    if cfg.evaluate.stats_router:
        result["stats_router"] = stats_router_study(cfg, run, test.x, truth)
    result["config"] = cfg.model_dump()

    plots = run / "plots"
    plot_samples(samples, test.x, truth, plots / "samples.png",
                 {n: f"W2/floor {result['rows'][n]['w2_over_floor']:.2f}" for n in names})
    plot_router_accuracy(rep, plots / "router_accuracy.png")
    write_json(run / "metrics.json", result)
    (run / "report.md").write_text(render_report(cfg, run, result))
    log(f"report: {run / 'report.md'}")
    return result


def render_report(cfg: RunConfig, run: Path, result: dict) -> str:
    floor = result["floor"]
    rows = [[FLOOR] + [floor.get(key) for _, key in COLUMNS[:1]] + [1.0] + [floor.get(key) for _, key in COLUMNS[2:8]]
            + ["-", "-"]]
    for name, r in result["rows"].items():
        rows.append([name] + [r.get(key) for _, key in COLUMNS])
    rep = result["router"]
    router_rows = [[f"{t:.2f}"] + [f"{rep[n]['accuracy'][i]:.3f} / {rep[n]['ece'][i]:.3f}" for n in rep if n != "t"]
                   for i, t in enumerate(rep["t"])]
    return _main_report(cfg, result, rows, rep, router_rows) + _fault_sections(result)


def _fault_sections(result: dict) -> str:
    """Report sections for the missing-expert study and the statistics-only router."""
    from ddmkit.pipeline.resilience import STATS_STRATEGIES

    out = ""
    cols = [("W2/floor", "w2_over_floor"), ("NLL", "nll"), ("modes hit", "modes_hit"), ("mode KL", "mode_kl"),
            ("expert calls/sample", "expert_calls_per_sample")]
    if "missing_experts" in result:
        rows = [[r["removed"], str(r["experts_removed"])] + [r.get(key) for _, key in cols]
                for r in result["missing_experts"]]
        strategy = result["missing_experts"][0]["strategy"]
        out += f"""
## Missing experts

Sampling ({strategy}) with 0, 1, 2, ... experts removed in a fixed random order, the router's probabilities
renormalised over the experts still present (what `load_ddm` does when expert folders are missing).

{markdown_table(["removed", "experts removed"] + [c for c, _ in cols], rows)}
"""
    if "stats_router" in result:
        rows = [[name] + [r.get(key) for _, key in cols] for name, r in result["stats_router"]["rows"].items()]
        out += f"""
## Statistics-only router

The router built only from each island's count, mean and covariance (the Gaussian posterior under the noised
cluster Gaussians, `ddmkit.routing.stats_router`) against the learned router, same experts, strategies
{", ".join(STATS_STRATEGIES)}. Its accuracy per noise level is in the router table above.

{markdown_table(["strategy (router)"] + [c for c, _ in cols], rows)}
"""
    return out


def _main_report(cfg: RunConfig, result: dict, rows: list, rep: dict, router_rows: list) -> str:
    from ddmkit.pipeline.jobs import monolith_config

    d, p, s = cfg.data, cfg.partition, cfg.sample
    mono = monolith_config(cfg.expert, p.k, cfg.monolith.match).train
    return f"""# ddmkit run report

Data: `{d.name}` ({d.n_train} train, {d.n_test} test). Partition: k = {p.k}, features = {p.features},
balanced = {p.balanced}. Experts: {cfg.expert.net.arch} {cfg.expert.net.kwargs}, {cfg.expert.train.steps} steps x
batch {cfg.expert.train.batch_size} each; monolith: the same network, {mono.steps} steps x batch
{mono.batch_size} (FLOP-matched). Sampling: {s.n} samples, {s.solver}, {s.steps} steps, the same noise
(seed {s.seed}) for every strategy.

## Samples per strategy

W2 is the exact 2-Wasserstein distance between {result['chunk']}-point sets, averaged over {result['pairs']}
independent pairs (a chunk of the samples against its own held-out set); the first row is the same measurement
with held-out data in place of samples: the floor no sampler can beat at this sample size. NLL, mode coverage and off-manifold rate are under the true mixture
(blank without one). Expert calls count network evaluations of experts per sample over the whole trajectory.

{markdown_table(["strategy"] + [c for c, _ in COLUMNS], rows)}

![samples](plots/samples.png)

## Router

Accuracy / expected calibration error per noise level, on held-out data labelled by its nearest partition
centroid.

{markdown_table(["t"] + [n for n in rep if n != "t"], router_rows)}

![router accuracy](plots/router_accuracy.png)
"""


def run_pipeline(cfg: RunConfig, out: str | Path, force: bool = False, log: Log = print, backend: str = "inline",
                 workers: int | None = None, address: str | None = None) -> dict:
    """All stages in order, each skipped when already done; experts train on
    the launch `backend` (inline, processes, ray)."""
    run = prepare_run_dir(out, cfg, force, log)
    device = resolve_device(cfg.expert.train.device)
    start = time.perf_counter()
    stage_data(cfg, run, log)
    stage_partition(cfg, run, log)
    stage_experts(cfg, run, log, backend, workers, address)
    stage_monolith(cfg, run, log)
    stage_router(cfg, run, log)
    stage_registry(cfg, run, log)
    if is_image_shape(read_json(run / "data" / "data.json")["data_shape"]):
        from ddmkit.pipeline.images import stage_evaluate_images, stage_sample_images

        stage_sample_images(cfg, run, log, device)
        result = stage_evaluate_images(cfg, run, log, device)
        log(f"done in {time.perf_counter() - start:.1f}s")
        return result
    stage_sample(cfg, run, log, device)
    result = stage_evaluate(cfg, run, log)
    log(f"done in {time.perf_counter() - start:.1f}s")
    return result


__all__ = ["EXACT", "prepare_run_dir", "run_config", "run_pipeline", "sample_one", "stage_data", "stage_evaluate",
           "stage_experts", "stage_monolith", "stage_partition", "stage_registry", "stage_router", "stage_sample"]
