"""The image stages of a run: class-conditional sampling with classifier-free
guidance inside each expert, FID/KID per strategy, PNG grids, a report.

    stage_sample_images(cfg, run)     # RUN/samples/*.safetensors + info.json
    stage_evaluate_images(cfg, run)   # RUN/metrics.json, RUN/report.md, RUN/plots/*.png

    python -m ddmkit.pipeline.images train CONFIG --out RUN      # data, partition, experts, monolith, router
    python -m ddmkit.pipeline.images evaluate CONFIG --out RUN   # sampling, FID/KID, report

Every strategy and the monolith start from the same noise and the same class
labels (drawn uniformly with sample.seed) and take the same solver steps.
Guidance: each expert computes v = v(x, t, none) + g (v(x, t, y) - v(x, t, none))
(converted to velocity first, whatever it predicts) before the router mixes
the experts, as in Paris; g = 1 is plain conditional sampling.
"""
from __future__ import annotations


import time
from pathlib import Path

import numpy as np
import torch

from ddmkit.config import RunConfig
from ddmkit.data.partition import load_partition, read_shard
from ddmkit.errors import DDMError
from ddmkit.flow.path import to_velocity
from ddmkit.io import load_tensors, read_json, save_tensors, write_json
from ddmkit.nets import from_pretrained
from ddmkit.pipeline.ddm import DDM, expert_dir, label_prior, nearest_cluster_fn, router_field
from ddmkit.pipeline.report import markdown_table
from ddmkit.pipeline.sampling import config_options, sample_ddm, sample_single, start_noise
from ddmkit.registry import shard_files
from ddmkit.sample.graphs import with_network



# ---------------------------------------------------------------- fields

def guided_field(model: torch.nn.Module, config: dict, scale: float = 1.0):
    """(x, t, y=None) -> velocity. Class-conditional nets with y given and scale != 1
    evaluate the labelled and the 'no label' branch in one batch and mix them."""
    prediction = config.get("prediction", "velocity")
    null = config["kwargs"].get("num_classes", 0)

    @torch.no_grad()
    def f(x, t, y=None):
        if not null or y is None:
            return to_velocity(model(x, t), prediction, x, t).float()
        if scale == 1.0:
            return to_velocity(model(x, t, y), prediction, x, t).float()
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
        v_cond, v_none = to_velocity(out.float(), prediction, torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_none + scale * (v_cond - v_none)

    return with_network(f, model, lambda other: guided_field(other, config, scale), ("guided", prediction, null, scale))


def check_shape(folder: Path, config: dict, data_shape: tuple) -> None:
    if tuple(config.get("data_shape", ())) != tuple(data_shape):
        raise DDMError(f"{folder} was trained on images of shape {tuple(config.get('data_shape', ()))} but this run's "
                       f"data are {tuple(data_shape)}; retrain it at this resolution (or pad the data to match)")


def data_shape_of(run: Path) -> tuple:
    return tuple(read_json(run / "data" / "data.json")["data_shape"])


def shard_label_counts(run: Path, classes: int) -> torch.Tensor:
    """(C, K): how many images of each class each island holds (what the islands publish for
    p(cluster | label))."""
    labels = [load_tensors(path, ["labels"])["labels"] for path in shard_files(run)]
    return torch.stack([torch.bincount(y.long(), minlength=classes)[:classes] for y in labels], dim=1)


def image_stats_router(run: Path, classes: int, rank: int | None = None, device="cpu"):
    """The statistics-only router of a run's islands: label-conditional when the data have labels
    (each island's statistics are computed from its shard alone, on `device`)."""
    from ddmkit.routing.stats_router import class_stats_router, island_class_statistics, island_statistics, stats_router

    shards = [(x.to(device), y.to(device) if y is not None else None)
              for x, y, _ in (read_shard(path) for path in shard_files(run))]
    marginal = [island_statistics(x, rank) for x, _ in shards]
    if not classes:
        return stats_router(marginal), False
    per_class = [island_class_statistics(x, y, classes, rank) for x, y in shards]
    return class_stats_router(per_class, marginal), True


def load_image_ddm(run: Path, device="cpu", guidance: float = 1.0, router_kind: str = "learned") -> DDM:
    """The image DDM of a run: guided experts, the learned router (label-conditional when it was
    trained with labels) or router_kind="statistics" for the statistics-only router, and
    p(cluster | label) for the oracle."""
    manifest, ptensors = load_partition(run / "partition")
    shape = data_shape_of(run)
    experts = []
    for c in range(manifest["k"]):
        model, cfg = from_pretrained(expert_dir(run, c), device)
        check_shape(expert_dir(run, c), cfg, shape)
        experts.append(guided_field(model, cfg, guidance))
    router, rcfg = from_pretrained(run / "router", device)
    check_shape(run / "router", rcfg, shape)
    if rcfg.get("k") != manifest["k"]:
        raise DDMError(f"{run}: the router routes over {rcfg.get('k')} clusters but the partition has {manifest['k']}")
    prior = torch.tensor(manifest["counts"], dtype=torch.float32)
    classes = read_json(expert_dir(run, 0) / "config.json")["kwargs"].get("num_classes", 0)
    labels = label_prior(shard_label_counts(run, classes)).to(device) if classes else None
    if router_kind == "statistics":
        route, conditional = image_stats_router(run, classes, device=device)
    else:
        conditional = bool(rcfg["kwargs"].get("num_classes", 0))
        route = router_field(router, conditional)
    return DDM(experts, route, (prior / prior.sum()).to(device), shape,
               nearest_cluster_fn(manifest, {k: v.to(device) for k, v in ptensors.items()}),
               {"kind": "learned", "router": router_kind}, labels, conditional)


def load_image_monolith(run: Path, device="cpu", guidance: float = 1.0):
    model, cfg = from_pretrained(run / "monolith", device)
    check_shape(run / "monolith", cfg, data_shape_of(run))
    return guided_field(model, cfg, guidance)


def is_conditional(run: Path) -> bool:
    return bool(read_json(expert_dir(run, 0) / "config.json")["kwargs"].get("num_classes", 0))


def sample_labels(run: Path, n: int, seed: int, device) -> torch.Tensor | None:
    """Class labels for conditional sampling: uniform over the classes, fixed by seed."""
    if not is_conditional(run):
        return None
    classes = read_json(expert_dir(run, 0) / "config.json")["kwargs"]["num_classes"]
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed + 7)).to(device)


# ---------------------------------------------------------------- sampling stage

def sample_name(strategy: str, guidance: float, default: float) -> str:
    return strategy if guidance == default else f"{strategy} @ cfg {guidance:g}"


def sample_path(run: Path, name: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in name)
    return run / "samples" / f"{safe}.safetensors"


STATS = "statistics"


def stats_name(strategy: str) -> str:
    return f"{strategy} (statistics-only router)"


def planned_samples(cfg: RunConfig) -> list[tuple[str, str, float, str]]:
    """(name, strategy, guidance, router) for every sample set of the run; router is
    "learned" or "statistics" (the statistics-only router)."""
    s = cfg.sample
    plan = [(sample_name(name, s.guidance, s.guidance), name, s.guidance, "learned") for name in s.strategies]
    plan += [(stats_name(name), name, s.guidance, STATS) for name in s.stats_router_strategies]
    for g in s.guidance_sweep:
        for name in ("monolith", s.sweep_strategy):
            if g != s.guidance and (name != "monolith" or cfg.monolith.enabled):
                plan.append((sample_name(name, g, s.guidance), name, g, "learned"))
    return [p for p in plan if p[1] != "monolith" or cfg.monolith.enabled]


def set_size(cfg: RunConfig, guidance: float, router: str = "learned") -> int:
    """Samples in a set: sample.n, or sample.sweep_n for the extra guidance scales of the sweep
    and the statistics-only router's sets."""
    s = cfg.sample
    main = guidance == s.guidance and router != STATS
    return s.n if main or not s.sweep_n else min(s.sweep_n, s.n)


def stage_sample_images(cfg: RunConfig, run: Path, log=print, device="cpu", on_sample=None) -> None:
    """on_sample(name) is called after each set is written (e.g. to evaluate it at once)."""
    s = cfg.sample
    shape = data_shape_of(run)
    x1_all = start_noise(s.n, shape, s.seed, device)
    y_all = sample_labels(run, s.n, s.seed, device)
    autocast = "bfloat16" if torch.device(device).type == "cuda" else None
    info_path = run / "samples" / "info.json"
    ddms: dict[tuple, DDM] = {}
    for name, strategy, g, router in planned_samples(cfg):
        if sample_path(run, name).exists():
            continue
        n = set_size(cfg, g, router)  # the first n of the same noise and labels
        x1, y = x1_all[:n], (y_all[:n] if y_all is not None else None)
        cond = {"y": y} if y is not None else None
        if strategy == "monolith":
            field = load_image_monolith(run, device, g)
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast is not None):
                x0, info = sample_single(field, shape, n, s.steps, s.solver, s.seed, device, name, x1=x1.clone(),
                                         cond=cond, **config_options(s, routed=False))
            info["expert_calls_per_sample"] = info["velocity_evaluations"]
        else:
            ddm = ddms.get((g, router)) or ddms.setdefault((g, router), load_image_ddm(run, device, g, router))
            x0, info = sample_ddm(ddm, strategy, n, s.steps, s.solver, s.seed, device, x1=x1.clone(),
                                  autocast=autocast, cond=cond, **config_options(s))
        info.update(strategy=strategy, guidance=g, router=router)
        info.pop("expert_rows", None)
        save_tensors(sample_path(run, name), {"x": x0.float().clamp(-1, 1).cpu()})
        infos = read_json(info_path) if info_path.exists() else {}
        infos[name] = info
        write_json(info_path, infos)
        log(f"sample {name}: {info['expert_calls_per_sample']:.1f} expert calls/sample, {info['wall_time']:.2f}s")
        if on_sample is not None:
            on_sample(name)
    if y_all is not None:
        save_tensors(run / "samples" / "labels.safetensors", {"y": y_all.cpu()})


# ---------------------------------------------------------------- grids

def image_grid(x: torch.Tensor, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad[, 3]) grid."""
    x = x[: rows * cols].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr


def save_png(arr: np.ndarray, path: Path, scale: int = 2) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def cluster_grid(run: Path, per_cluster: int = 12) -> np.ndarray:
    """One row of example images per cluster (the first images of each shard)."""
    manifest, _ = load_partition(run / "partition")
    rows = [read_shard(run / "partition" / sh["path"])[0][:per_cluster] for sh in manifest["shards"]]
    rows = [torch.cat([r, torch.full((per_cluster - len(r), *r.shape[1:]), 1.0)]) for r in rows]
    return image_grid(torch.cat(rows), len(rows), per_cluster)


# ---------------------------------------------------------------- evaluation stage

def reference_features(run: Path, extractor, kind: str, n: int, log=print) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Features of the test split (cached in RUN/eval/), features of as many
    training images, and the seconds the test features took."""
    cache = run / "eval" / f"reference_{kind}.safetensors"
    if cache.exists():
        t = load_tensors(cache)
        return t["test"], t["train"], float(t["seconds"])
    test = load_tensors(run / "data" / "test.safetensors")["x"]
    train = load_tensors(run / "data" / "train.safetensors")["x"]
    start = time.perf_counter()
    f_test = extractor(test)
    seconds = time.perf_counter() - start
    f_train = extractor(train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:min(n, len(test))]])
    save_tensors(cache, {"test": f_test, "train": f_train, "seconds": torch.tensor(seconds)})
    log(f"reference features: {len(f_test)} test images in {seconds:.1f}s")
    return f_test, f_train, seconds


class SetEvaluator:
    """FID/KID of one sample set against the test split, cached in RUN/eval/set_<name>.json
    (so sets can be scored as soon as they are sampled, and a re-run skips them)."""

    def __init__(self, cfg: RunConfig, run: Path, log=print, device="cpu"):
        from ddmkit.metrics.fid import feature_extractor, gaussian_stats

        self.cfg, self.run, self.log = cfg, run, log
        self.kind = cfg.evaluate.fid_features
        self.extractor = feature_extractor(self.kind, device)
        self.f_test, self.f_train, self.ref_seconds = reference_features(run, self.extractor, self.kind, cfg.sample.n, log)
        self.real_stats = gaussian_stats(self.f_test)

    def cache(self, name: str) -> Path:
        return self.run / "eval" / f"set_{sample_path(Path('.'), name).stem}.json"

    def __call__(self, name: str, first: int | None = None) -> dict:
        """Metrics of the set `name` (of its first `first` samples, when given)."""
        from ddmkit.metrics.fid import fid_kid

        path = sample_path(self.run, name)
        cache = self.cache(name if first is None else f"{name}_first{first}")
        if cache.exists() and cache.stat().st_mtime >= path.stat().st_mtime:
            return read_json(cache)
        x = load_tensors(path)["x"][:first]
        start = time.perf_counter()
        feats = self.extractor(x)
        metrics = fid_kid(self.f_test, feats, self.cfg.evaluate.kid_subset, self.real_stats)
        metrics["fid_seconds"] = time.perf_counter() - start
        metrics = {k: float(v) for k, v in metrics.items()}
        if first is None:
            save_png(image_grid(x, 8, 8), self.run / "plots" / f"samples_{path.stem}.png")
        write_json(cache, metrics)
        self.log(f"{name}: FID {metrics['fid']:.2f}, KID {metrics['kid'] * 1e3:.2f}e-3 (n = {len(x)}, "
                 f"{metrics['fid_seconds']:.1f}s)")
        return metrics


def stage_evaluate_images(cfg: RunConfig, run: Path, log=print, device="cpu", evaluator: SetEvaluator | None = None) -> dict:
    from ddmkit.metrics.fid import fid_kid

    ev = evaluator or SetEvaluator(cfg, run, log, device)
    kind, f_test, f_train, ref_seconds = ev.kind, ev.f_test, ev.f_train, ev.ref_seconds
    infos = read_json(run / "samples" / "info.json")
    rows = {"train images (floor)": {**fid_kid(f_test, f_train, cfg.evaluate.kid_subset, ev.real_stats), "n": len(f_train)}}
    plots = run / "plots"
    for name, strategy, g, router in planned_samples(cfg):
        if not sample_path(run, name).exists():
            continue
        n = set_size(cfg, g, router)
        if router == STATS and n < cfg.sample.n and sample_path(run, strategy).exists():
            # the learned router's set on the same first n noises and labels, for a like-for-like FID
            calls = infos.get(strategy, {}).get("expert_calls_per_sample", "-")
            rows[f"{strategy} (learned router, first {n})"] = {**ev(strategy, n), "expert_calls_per_sample": calls,
                                                               "n": n, "subset_of": strategy}
        rows[name] = {**ev(name), **infos.get(name, {}), "n": n}
    save_png(cluster_grid(run), plots / "clusters.png")
    manifest, _ = load_partition(run / "partition")
    result = {"rows": rows, "features": kind, "reference_seconds": ref_seconds, "n_test": len(f_test),
              "cluster_counts": manifest["counts"], "config": cfg.model_dump(),
              "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"}
    result["train_seconds"] = training_seconds(run)
    write_json(run / "metrics.json", result)
    (run / "report.md").write_text(render_image_report(cfg, result))
    log(f"report: {run / 'report.md'}")
    return result


def training_seconds(run: Path) -> dict:
    """Training wall time per job, from the last row of each train_log.jsonl."""
    import json

    out = {}
    for name, folder in [("experts", expert_dir(run, 0)), ("monolith", run / "monolith"), ("router", run / "router")]:
        log = folder / "train_log.jsonl"
        if log.exists():
            lines = log.read_text().strip().splitlines()
            if lines:
                out[name] = json.loads(lines[-1]).get("seconds")
    return out


def table_rows(result: dict) -> list[list]:
    rows = []
    mono = result["rows"].get("monolith", {}).get("fid")
    for name, r in result["rows"].items():
        rel = r["fid"] / mono if mono else None
        rows.append([name, r.get("n", "-"), r["fid"], rel, r["kid"] * 1e3, r.get("expert_calls_per_sample", "-"),
                     r.get("wall_time", "-"), r.get("fid_seconds", "-")])
    return rows


def render_image_report(cfg: RunConfig, result: dict) -> str:
    d, p, e, s = cfg.data, cfg.partition, cfg.expert, cfg.sample
    mono = "K x the steps" if cfg.monolith.match == "steps" else "K x the batch, the same steps"
    table = markdown_table(["samples", "n", "FID", "FID / monolith", "KID x 1e3", "expert calls/sample", "sampling (s)",
                            "FID time (s)"], table_rows(result))
    grids = "\n".join(f"![{n}](plots/samples_{sample_path(Path('.'), n).stem}.png)" for n, r in result["rows"].items()
                      if n != "train images (floor)" and "subset_of" not in r)
    return f"""# ddmkit image run report

Data: `{d.name}` {d.params} ({result['n_test']} test images as the FID reference). Partition: k = {p.k},
features = {p.features}, cluster sizes {result['cluster_counts']}. Experts: {e.net.arch} {e.net.kwargs},
prediction {e.prediction}, {e.train.steps} steps x batch {e.train.batch_size} each (concurrent: {e.concurrent});
monolith: the same network with {mono} (FLOP-matched). Sampling: {s.n} images, {s.solver}, {s.steps} steps, the
same noise and labels for every row, guidance {s.guidance}. Features: {result['features']} on {result['device']};
test features took {result['reference_seconds']:.1f}s. Training wall time (s): {result['train_seconds']}.

The first row is {result['rows']['train images (floor)']['n']} training images against the test set: the floor.

{table}

Cluster examples (one row per cluster):

![clusters](plots/clusters.png)

{grids}
"""


# ---------------------------------------------------------------- entry points

def run_image_stages(cfg: RunConfig, out: str | Path, stages: str = "all", force: bool = False, log=print) -> dict | None:
    """stages: 'train' (data, partition, experts, monolith, router), 'evaluate'
    (sampling, FID/KID, report) or 'all'. Each stage skips what is already there."""
    from ddmkit.pipeline import run as runmod
    from ddmkit.train.loop import resolve_device

    run = runmod.prepare_run_dir(out, cfg, force, log)
    device = resolve_device(cfg.expert.train.device)
    start = time.perf_counter()
    if stages in ("train", "all"):
        for stage in (runmod.stage_data, runmod.stage_partition, runmod.stage_experts, runmod.stage_monolith,
                      runmod.stage_router, runmod.stage_registry):
            stage(cfg, run, log)
        log(f"train stage: {time.perf_counter() - start:.1f}s")
    if stages in ("evaluate", "all"):
        start = time.perf_counter()
        evaluator = SetEvaluator(cfg, run, log, device)
        stage_sample_images(cfg, run, log, device, on_sample=evaluator)
        result = stage_evaluate_images(cfg, run, log, device, evaluator)
        log(f"evaluate stage: {time.perf_counter() - start:.1f}s")
        return result
    return None


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from ddmkit.config import load_config

    parser = argparse.ArgumentParser(prog="python -m ddmkit.pipeline.images", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["train", "evaluate", "all"])
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        run_image_stages(load_config(args.config), args.out, args.stage, args.force)
    except DDMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
