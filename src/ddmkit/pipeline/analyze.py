"""`ddmkit analyze RUN_DIR`: every diagnostic over a set of strategies, from one recorded pass each.

Per strategy: one recorded trajectory of n samples (N steps), one with 2N steps (Delta_refine),
one from perturbed noise (amplification); Jacobians on a row subset at up to max_steps steps;
all K experts at every recorded step (alignment, disagreement, and the alignment of a reference
x0* that uses neither the router nor the experts: the exact posterior mean E[x0 | x_t] on Gaussian
mixtures, else the monolith's x_t - t v_monolith(x_t) when the run has one). Once: every expert on
held-out data at a grid of t, routed vs not routed per strategy and, independent of strategies, on
its own cluster vs the others. Writes OUT/analysis.md, analysis.json and plots/ (OUT = RUN/analysis),
holding the run's lock (a second writer on the run folder is refused).

Each strategy's result is kept as soon as it is measured (OUT/strategies/NAME.json and .safetensors,
keyed by the SHA-256 of the networks it loads, the settings and the reference), so an analysis that is stopped resumes
with the next strategy, and a later call with other strategies measures only the new ones.

Everything runs on one device (`device`, default the run's expert.train.device): the networks, the
noise, the held-out rows, the generators, the Jacobian probes and the partition's centroids; the
results come back to the CPU for the statistics and the report.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ddmkit.analysis.alignment import (EXACT_KEYS, Reference, exact_reference, heldout_errors, trajectory_alignment,
                                       velocity_reference)
from ddmkit.analysis.quality import (across_strategies, paired_difference, per_sample_quality, spearman, spearman_ci,
                                     verdict)
from ddmkit.analysis.report import plot_disagreement, plot_expert_error, plot_lipschitz, plot_quality_scatter, render
from ddmkit.analysis.stability import amplification, data_scale, local_lipschitz, refinement_gap
from ddmkit.analysis.trace import trace_strategy
from ddmkit.config import MAX_SEED, MONOLITH, ROWS, check_count, json_digest
from ddmkit.conventions import __version__
from ddmkit.data import takes_test_fraction
from ddmkit.data.partition import feature_map, load_partition
from ddmkit.ddm import DDM, exact_ddm, load_ddm, start_noise
from ddmkit.ddm.load import has_default_router, monolith_field
from ddmkit.errors import DDMError
from ddmkit.evaluation.distances import w2_exact
from ddmkit.io import (check_folder_target, load_tensors, nan_as_null, read_json, save_tensors, sha256_file,
                       write_bytes_atomic, write_json)
from ddmkit.layout import RunFolder, check_run_exists, enclosing_run, is_run_folder, safe_name
from ddmkit.pipeline.checks import available_memory, checked_device, size_text
from ddmkit.pipeline.prepare import remove_leftovers, run_config
from ddmkit.pipeline.samplesets import calls_every_expert, full_routing_note
from ddmkit.pipeline.stages import load_split, read_data_info, run_lock
from ddmkit.progress import progress_bar
from ddmkit.routing import parse_strategy
from ddmkit.routing.strategies import Threshold, TopK
from ddmkit.train.threads import job_threads

BANDS = [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01)]
REFERENCE_NAMES = {"exact": "exact posterior mean", "monolith": "the monolith's estimate"}
FIXED = ["full", "top-1", "top-2", "sample-2", "switch", "oracle", "nearest"]
ALIGNED = ["adaptive-0.9", "adaptive-ent-0.5", "gated-2@30"]
MAX_W2 = 1000  # exact W2 on at most this many points
MIN_ROWS = 10  # the fewest test rows in each of the W2 reference, the W2 floor's partner and the held-out errors
TRACE_SOLVER = "rk4"  # what the diagnostics trace for a run that samples with the adaptive solver (no fixed steps)
PARTS = 5  # the progress bar's steps per strategy: the recorded pass, Jacobians, amplification, 2N pass, alignment


def default_strategies(cfg) -> list[str]:
    """full, top-1, top-2, sample-2, the run's threshold (or threshold-0.05), switch, oracle, nearest,
    and the alignment-based adaptive-0.9, adaptive-ent-0.5, gated-2@30."""
    threshold = next((s for s in cfg.sample.strategies if s != MONOLITH and isinstance(parse_strategy(s), Threshold)),
                     "threshold-0.05")
    return FIXED[:4] + [threshold] + FIXED[4:] + ALIGNED


def check_strategies(names: Sequence[str]) -> dict:
    """{name: strategy} of the names given, each under the strategy's own name (' top-2' and 'top-02' are
    'top-2': measured once)."""
    out = {}
    for name in names:
        try:
            strategy = parse_strategy(name)
        except DDMError as e:
            raise DDMError(f"--strategy: {e}") from None
        out[strategy.name] = strategy
    if not out:
        raise DDMError("--strategy: give at least one routing strategy, e.g. top-2")
    return out


def check_seed(seed) -> None:
    """--seed: None (the run's sample.seed) or a whole number 0 .. 2**63 - 1, as sample.seed."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise DDMError(f"--seed = {seed!r}: must be a whole number from 0 to 2**63 - 1 (as sample.seed); "
                       "leave it out to use the run's")


def note_full_aliases(names: Sequence[str], k: int, log: Callable[[str], None]) -> list[str]:
    """The names measured: a top-n or sample-n that calls every expert of the DDM is full routing, said in the note
    `ddmkit sample` prints, and left out when full is measured too (it would count twice in the
    across-strategy correlations)."""
    kept = []
    for name in names:
        alias = calls_every_expert(name, k)
        if alias:
            log(f"note: {full_routing_note(name, k)}"
                + ("; measured once, as full" if "full" in names else ""))
        if not (alias and "full" in names):
            kept.append(name)
    return kept


def split_rows(count: int, n: int, n_heldout: int,
               fix: str = "make the run again with more test rows") -> dict[str, slice]:
    """Disjoint rows of a test split of `count` rows: the W2 reference ("w2") and the W2 floor's partner
    ("floor"), the first 2 m rows, m = min(n, MAX_W2, count // 3), and the held-out error rows ("heldout"), the
    last of the other rows, at most n_heldout. A DDMError giving `fix` (more_test_rows) when the split is too
    small for MIN_ROWS in each."""
    if count // 3 < MIN_ROWS:
        raise DDMError(f"the run's test split has {count} rows; analyze needs at least {3 * MIN_ROWS} ({MIN_ROWS} each "
                       f"for the W2 reference, the W2 floor and the held-out errors, all disjoint): {fix}")
    m = min(n, MAX_W2, count // 3)
    return {"w2": slice(0, m), "floor": slice(m, 2 * m), "heldout": slice(count - min(n_heldout, count - 2 * m), count)}


def analysis_bytes(n: int, steps: int, dim: int, k: int, reference: bool, itemsize: int = 4) -> int:
    """A lower bound of the bytes analyze holds at once for n trajectories of `steps` steps, data of dim numbers
    and K experts: while one strategy's alignment is measured, its recorded pass ((steps, n, dim) states,
    velocities and previous x0_hat, and the x0_hat the alignment derives from them; (steps, n, K) router
    probabilities and weights; `itemsize` bytes a number, float32), the alignment's (steps, n) float64 measures
    (6, and 5 more with an x0 reference; twice: the per-step rows and the tensors stacked from them) and one step's
    (n, K, K, dim) float64 products for the angles between experts. The networks, their activations, the test
    split, the held-out errors and the other temporaries come on top: on a tiny mixture run (D = 2, K = 4, 8 steps,
    n = 300 000, CPU) the analysis's resident memory grew by about 1.4 times this bound."""
    per_step = (4 * dim + 2 * k) * itemsize + 2 * (11 if reference else 6) * 8
    return n * (steps * per_step + k * k * dim * 8)


def check_memory(n: int, steps: int, dim: int, k: int, reference: bool, device: torch.device) -> None:
    """A DDMError naming --n when even analysis_bytes (a lower bound) is more than the memory available on
    `device` (nothing checked when that cannot be told), with the largest --n whose bound is at most half of
    it (the other half for what the bound leaves out)."""
    free = available_memory(device)
    need = analysis_bytes(n, steps, dim, k, reference)
    if free is None or need <= free:
        return
    fit = free // 2 // analysis_bytes(1, steps, dim, k, reference)
    fix = (f"give --n {fit} or less (by the same count at most half of it, the rest for the networks and "
           "temporaries)" if fit >= 2 else
           "--n 2 would already take more than half of it: free memory, or analyze on a device with more (--device)")
    raise DDMError(f"--n = {n}: the analysis would hold at least {size_text(need)} at once on {device} (the "
                   f"recorded trajectories and their alignment: {steps} steps x {n} trajectories x {dim} numbers, "
                   f"{k} experts), more than the {size_text(free)} available there; {fix}")


def more_test_rows(data: dict, n_test: int, params: dict) -> str:
    """How to make a run whose test split has 3 MIN_ROWS rows, for its data (data.json: name, n_train, n_test;
    the config's data.n_test and data.params): data split from one file or folder takes a test_fraction of
    its rows (data.n_test only caps it), generated data take data.n_test rows."""
    need, total = 3 * MIN_ROWS, data.get("n_train", 0) + data.get("n_test", 0)
    cap = f" --set data.n_test={need}" if n_test < need else ""
    if not takes_test_fraction(str(data.get("name", ""))):
        return f"make the run again with more test rows, e.g. `ddmkit run CONFIG --set data.n_test={max(need, 4000)} " \
               "--out NEW_RUN`"
    if "test_path" in params:
        return (f"give a test file of at least {need} rows as data.params.test_path{' and' + cap if cap else ''}, and "
                "make the run again in a new folder")
    fraction = math.ceil(100 * need / total) / 100
    if fraction > 0.9:
        return (f"the data have {total} rows in all, too few to hold {need} test rows and train on the rest; give "
                "more data")
    test = round(fraction * total)
    return (f"make the run again with a larger test fraction, `ddmkit run CONFIG --set data.params.test_fraction="
            f"{fraction:g}{cap} --out NEW_RUN` (about {test} of the data's {total} rows for the test, {total - test} "
            "to train on)")


def loaded_ddm(run: Path, device: torch.device, log: Callable[[str], None]) -> DDM:
    """load_ddm, its own warnings (no registry.json, missing experts) passed to `log` as notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        ddm = load_ddm(run, device)
    for w in caught:
        if issubclass(w.category, UserWarning):
            log(f"note: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ddm


def network_hashes(run: Path, k: int, reference_info: dict | None) -> dict:
    """SHA-256 of the partition manifest and of the weights and config of every network the analysis loads
    (the K experts, the router, a latent run's autoencoder, the monolith when it is the reference; None for
    one that is not there): what kept results depend on, with or without registry.json."""
    folder = RunFolder(run)
    nets = [folder.expert(c) for c in range(k)] + [folder.router, folder.autoencoder]
    if reference_info is not None and reference_info["kind"] == "monolith":
        nets.append(folder.monolith)
    files = [folder.manifest] + [net / name for net in nets for name in ("model.safetensors", "config.json")]
    return {p.relative_to(run).as_posix(): sha256_file(p) if p.exists() else None for p in files}


def x0_reference(run: Path, truth, device: torch.device) -> tuple[Reference | None, dict | None]:
    """(reference x0* for hit*, rank*, same; its description for analysis.json): the exact posterior mean
    on a Gaussian mixture (truth on `device`), else the monolith's x_t - t v_monolith(x_t) when the run
    has a trained monolith, else (None, None). Neither uses the router or the experts."""
    if truth is not None:
        return exact_reference(truth), {"kind": "exact", "name": REFERENCE_NAMES["exact"]}
    if (RunFolder(run).monolith / "model.safetensors").exists():
        monolith = monolith_field(run, device)
        return velocity_reference(monolith), {"kind": "monolith", "name": REFERENCE_NAMES["monolith"]}
    return None, None


def on_cpu(field):
    """A field evaluated on the CPU (the exact mixture's fields hold CPU tensors), its output on x's device."""
    return lambda x, t: field(x.cpu(), t.cpu()).to(x.device)


def exact_on_cpu(exact: DDM) -> DDM:
    """The exact DDM with its experts and router evaluated on the CPU, callable with tensors on any device."""
    return dataclasses.replace(exact, experts=[on_cpu(e) for e in exact.experts], router=on_cpu(exact.router))


def band_means(t: torch.Tensor, values: torch.Tensor) -> list[float]:
    """Mean of per-step values (steps, B) in each t band."""
    out = []
    for lo, hi in BANDS:
        sel = (t >= lo) & (t < hi)
        out.append(float(values[sel].mean()) if sel.any() else math.nan)
    return out


def analyze_strategy(ddm, name: str, x1, steps: int, solver: str, seed: int, ctx: dict, settings: dict,
                     advance: Callable[..., None] = lambda n=1, **fields: None) -> dict:
    """Every per-strategy diagnostic from one recorded pass (+ the 2N and perturbed passes).
    advance(1, now=...) is called after each of its PARTS parts (a progress bar's)."""
    start = time.perf_counter()
    advance(0, now=f"{name}: recorded pass")
    tr = trace_strategy(ddm, name, x1, steps, solver, seed)
    advance(1, now=f"{name}: Jacobians")
    rows = torch.arange(min(settings["jvp_rows"], len(x1)), device=x1.device)
    lip = local_lipschitz(ddm, tr, rows, settings["max_steps"], seed=seed)
    advance(1, now=f"{name}: amplification")
    amp = amplification(ddm, tr, steps, solver, seed).cpu()
    advance(1, now=f"{name}: {2 * steps}-step pass")
    x0_2n = trace_strategy(ddm, name, x1, 2 * steps, solver, seed, record=False).x0
    dref = refinement_gap(tr.x0, x0_2n, ctx["scale"]).cpu()
    advance(1, now=f"{name}: alignment")
    al = trajectory_alignment(ddm, tr, ctx["features"], ctx["centroids"], reference=ctx["x0_reference"])
    advance(1)
    exact_keys = [k for k in EXACT_KEYS if k in al]
    q = per_sample_quality(tr.x0, ctx["truth"], ctx["reference"], ctx["features"])[0].cpu()
    per_sample = {"q": q, "pair": al["pair"].mean(0), "rank": al["rank"].mean(0), "delta_refine": dref, "amp": amp}
    t = al["t"]
    lt = torch.tensor(lip["t"], dtype=torch.float64)
    summary = {"calls": tr.expert_calls_per_sample, "q": float(q.mean()),
               "w2": w2_exact(tr.x0[:settings["n_w2"]], ctx["w2_reference"]),
               "L_top": float(np.mean(lip["top"])), "L_rand": float(np.mean(lip["rand"])),
               "L_fd": float(np.mean(lip["fd"])), "amp_mean": float(amp.mean()),
               "amp_median": float(np.median(amp.numpy())),
               "delta_refine": float(dref.mean()), "hit": float(al["hit"].mean()), "rank": float(al["rank"].mean()),
               "pair": float(al["pair"].mean()), "mean": float(al["mean"].mean()),
               **{k: float(al[k].mean()) for k in exact_keys}}
    return {
        "summary": summary,
        "lipschitz": lip,
        "by_step": {"t": t.tolist(), **{k: al[k].mean(1).tolist() for k in ["hit", "rank", "pair", "mean",
                                                                             "dist_nearest", "dist_routed"]
                                        + exact_keys}},
        "bands": {"t": [f"[{lo:.2f}, {min(hi, 1):.2f}]" for lo, hi in BANDS],
                  "L_top": band_means(lt, torch.tensor(lip["top"])[:, None]),
                  **{k: band_means(t, al[k]) for k in ["hit", "rank", "pair"] + exact_keys[:2]}},
        "link": {"disagreement": spearman_ci(q, per_sample["pair"], settings["n_boot"], seed, names=("q", "D_pair")),
                 "rank": spearman_ci(q, per_sample["rank"], settings["n_boot"], seed, names=("q", "rank"))},
        "per_sample": per_sample,
        "wall_time": time.perf_counter() - start,
    }


def strategy_key(networks: dict, name: str, settings: dict, reference_info: dict | None) -> str:
    """What one strategy's result depends on: the networks' hashes (network_hashes), the strategy, the settings
    (not the list of other strategies, nor the device: it changes rounding only) and the x0 reference."""
    same = {k: v for k, v in settings.items() if k not in ("strategies", "device")}
    return json_digest({"weights": networks, "strategy": name, "settings": same, "reference": reference_info,
                        "version": __version__})


def strategy_files(out: Path, name: str) -> tuple[Path, Path]:
    """OUT/strategies/NAME.json and NAME.safetensors (NAME: the strategy with '@' and the like as '_')."""
    folder, stem = out / "strategies", safe_name(name)
    return folder / f"{stem}.json", folder / f"{stem}.safetensors"


def kept_strategy(out: Path, name: str, key: str) -> dict | None:
    """The result analyze_strategy returned for this key, if OUT/strategies holds it."""
    meta, tensors = strategy_files(out, name)
    if not meta.exists() or not tensors.exists():
        return None
    try:
        kept = read_json(meta)
        if not isinstance(kept, dict) or kept.get("key") != key or not isinstance(kept.get("result"), dict):
            return None
        return {**kept["result"], "per_sample": load_tensors(tensors)}
    except DDMError:  # a damaged record (not JSON, a truncated tensor file): measured again, and written again
        return None


def keep_strategy(out: Path, name: str, key: str, result: dict) -> None:
    """Write one strategy's result (the tensors first: the JSON, written last, marks it complete)."""
    meta, tensors = strategy_files(out, name)
    meta.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, {k: v.contiguous() for k, v in result["per_sample"].items()})
    write_json(meta, {"key": key, "result": {k: v for k, v in result.items() if k != "per_sample"}})


def compare_to_fixed(per: dict, n_boot: int, seed: int) -> dict:
    """Each non-top-k strategy against every fixed top-k: paired mean difference of q with a CI."""
    fixed = [n for n in per if isinstance(parse_strategy(n), TopK)]
    out = {}
    for name, r in per.items():
        if name in fixed:
            continue
        out[name] = {"calls": r["summary"]["calls"], "vs": {}}
        for base in fixed:
            diff = paired_difference(r["per_sample"]["q"], per[base]["per_sample"]["q"], n_boot, seed)
            word = "better" if diff["hi"] < 0 else "worse" if diff["lo"] > 0 else "no clear difference"
            out[name]["vs"][base] = {**diff, "word": word, "calls_baseline": per[base]["summary"]["calls"],
                                     "w2_minus_baseline": r["summary"]["w2"] - per[base]["summary"]["w2"]}
    return out


def strategy_links(per: dict, n_boot: int, seed: int) -> dict:
    stack = {k: np.stack([r["per_sample"][k].numpy() for r in per.values()]) for k in
             ("q", "delta_refine", "amp", "rank", "pair")}
    link = {f"{k}_vs_q": across_strategies(stack[key], stack["q"], n_boot, seed, names=(name, "q"))
            for k, key, name in (("refine", "delta_refine", "Delta_refine"), ("amp", "amp", "amplification"),
                                 ("rank", "rank", "mean rank"), ("pair", "pair", "D_pair"))}
    ltop = [r["summary"]["L_top"] for r in per.values()]
    qs = [r["summary"]["q"] for r in per.values()]
    w2 = [r["summary"]["w2"] for r in per.values()]
    refine = [r["summary"]["delta_refine"] for r in per.values()]
    link["ltop_vs_q"] = spearman(ltop, qs)
    link["refine_vs_w2"] = spearman(refine, w2)
    link["verdict"] = verdict(link["refine_vs_q"]) if len(per) > 2 else "needs at least 3 strategies"
    return link


def latent_features(features, codec):
    """The partition's feature map of images, applied to latents by decoding them first."""
    return lambda z: features(codec.decode(z))


def heldout_clusters(x: torch.Tensor, labels: torch.Tensor | None, exact, ctx: dict) -> tuple[torch.Tensor, str]:
    """The cluster of every held-out point and the rule used: on a Gaussian mixture the cluster that owns
    the point's true component (the partition's grouping of components, as the exact experts use it),
    otherwise the nearest centroid in the partition's feature space."""
    if exact is not None and labels is not None:
        owner = torch.zeros(sum(len(g) for g in exact.meta["groups"]), dtype=torch.long)
        for c, g in enumerate(exact.meta["groups"]):
            owner[g] = c
        return owner[labels.long()], "the cluster owning the point's mixture component"
    d = torch.cdist(ctx["features"](x).double(), ctx["centroids"].double())
    return d.argmin(1), "the nearest partition centroid in feature space"


def analyze_run(run_dir: str | Path, out: str | Path | None = None, strategies: str | Sequence[str] | None = None,
                n: int = 1000, seed: int | None = None, max_steps: int = 20, jvp_rows: int = 128,
                n_boot: int = 200, n_heldout: int = 2000, threads: int | None = 1,
                device: str | torch.device | None = None, log: Callable[[str], None] = print) -> dict:
    """All diagnostics of a trained run; writes OUT/analysis.md, analysis.json, plots/ and returns the result.
    strategies: one name or several (default: default_strategies).
    threads: torch intra-op threads while it runs (1: small networks on a shared CPU only lose to spinning).
    device: where the networks and every tensor of the analysis live (auto, cpu, cuda, cuda:N, mps;
    default: the run's expert.train.device)."""
    check_run_exists(run_dir, needs="trained")  # said before its lock would make the folder
    with job_threads(threads), run_lock(run_dir):
        return _analyze(run_dir, out, strategies, n, seed, max_steps, jvp_rows, n_boot, n_heldout, device, log)


def _analyze(run_dir, out, strategies, n, seed, max_steps, jvp_rows, n_boot, n_heldout, device, log) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    run = Path(run_dir)
    folder = RunFolder(run)
    if folder.config.exists():
        remove_leftovers(run, log)  # what killed writers left (this command holds the run's lock)
    trained_experts = any(folder.experts.glob("expert_*/model.safetensors"))
    if folder.config.exists() and folder.partition.exists() and not trained_experts:  # e.g. stopped mid-training
        raise DDMError(f"{run} is not trained yet (no experts/expert_XX/model.safetensors); train it first with "
                       f"`ddmkit run {folder.config} --out {run} --stages train`")
    if not folder.config.exists() or not (trained_experts or has_default_router(run)):
        raise DDMError(f"RUN_DIR {run}: not a trained ddmkit run (needs config.json, experts/ and router/, or a "
                       "grown run's statistics router); run `ddmkit run CONFIG --out RUN_DIR` first")
    if not has_default_router(run):  # experts without a router: the one network missing is the router
        raise DDMError(f"RUN_DIR {run}: no router (router/model.safetensors); analyze measures the DDM as it "
                       f"routes: train its router first with `ddmkit train-router {run}`")
    for option, value, least in (("--n", n, 2), ("--jvp-rows", jvp_rows, 1), ("--max-steps", max_steps, 1)):
        check_count(option, value, least, ROWS)
    check_seed(seed)
    cfg = run_config(run)
    device = checked_device(device) if device is not None else checked_device(cfg.expert.train.device, True)
    names = [strategies] if isinstance(strategies, str) else list(strategies or default_strategies(cfg))
    strats = check_strategies(names)
    option = None if out is None else "--out"  # the default RUN/analysis was given by no option
    out = check_folder_target(folder.analysis if out is None else out, option)  # before the long work
    model = next((p for p in (out, *out.resolve().parents) if (p / "model.safetensors").is_file()), None)
    if model is not None:  # the folders copied between machines hold a network alone
        raise DDMError(f"--out {out} is inside the model folder {model}; give another folder (default RUN/analysis)")
    above = enclosing_run(out)  # a folder inside this run (the default RUN/analysis) is the run's own
    if is_run_folder(out) or above not in (None, run.resolve()):
        which = (f"inside the other run folder {above}" if not is_run_folder(out) else
                 "the analyzed run's folder itself" if out.resolve() == run.resolve() else "another run's folder")
        raise DDMError(f"--out {out} is {which}, where the analysis's plots/ and files would mix with that run's "
                       f"own; give a folder of its own (default {folder.analysis})")
    ddm = loaded_ddm(run, device, log)
    names = note_full_aliases(list(strats), ddm.k, log)
    strats = {name: strats[name] for name in names}
    test = load_split(run, "test")
    rows = split_rows(len(test.x), n, n_heldout, more_test_rows(read_data_info(folder), cfg.data.n_test,
                                                                 cfg.data.params))
    has_reference = test.truth is not None or (folder.monolith / "model.safetensors").exists()  # x0_reference's
    check_memory(n, cfg.sample.steps, math.prod(ddm.data_shape), ddm.k, has_reference, device)  # before the noise
    test = dataclasses.replace(test, x=test.x.to(device))
    truth = None if test.truth is None else test.truth.to(device=device)
    manifest, ptensors = load_partition(folder.partition)
    ptensors = {name: v.to(device) for name, v in ptensors.items()}
    s = cfg.sample
    seed = s.seed if seed is None else seed
    x1 = start_noise(max(s.n, n), ddm.data_shape, seed, device)[:n]
    if cfg.expert.net.kwargs.get("num_classes") and cfg.expert.label_dropout == 0:
        log("note: the diagnostics run the class-conditional experts without labels, and expert.label_dropout = 0 "
            "never trained their 'no label' token: its velocities are those of an untrained embedding")
    solver = TRACE_SOLVER if s.solver == "adaptive" else s.solver  # the diagnostics are per step
    if solver != s.solver:
        log(f"note: the run samples with the adaptive solver, which has no fixed steps; the diagnostics trace "
            f"{solver} at sample.steps = {s.steps}")
    settings = {"n": n, "seed": seed, "steps": s.steps, "solver": solver, "max_steps": min(max_steps, s.steps),
                "jvp_rows": min(jvp_rows, n), "n_boot": n_boot, "n_w2": rows["w2"].stop, "strategies": names,
                "device": str(device)}
    features = feature_map(manifest, ptensors)
    if ddm.codec is not None:  # a latent run: diagnostics on latents; the partition's features are of images
        test = dataclasses.replace(test, x=ddm.codec.encode(test.x).to(device))  # encode gives CPU latents
        features = latent_features(features, ddm.codec)
    reference, reference_info = x0_reference(run, truth, device)
    ctx = {"scale": data_scale(test.x), "features": features, "truth": truth, "x0_reference": reference,
           "centroids": ptensors["centroids"], "reference": test.x[:max(n, 2000)], "w2_reference": test.x[rows["w2"]]}
    networks = network_hashes(run, ddm.k, reference_info)
    keys = {name: strategy_key(networks, name, settings, reference_info) for name in names}
    per = {name: kept_strategy(out, name, keys[name]) for name in names}
    for name in names:
        if per[name] is not None:
            log(f"analyze {name}: kept from an earlier call ({out / 'strategies'})")
    todo = [name for name in names if per[name] is None]
    if todo:
        log(f"analyze: {len(todo)} {'strategy' if len(todo) == 1 else 'strategies'} to measure on {n} trajectories "
            f"of {s.steps} steps each; the time grows with --n (and --jvp-rows x --max-steps): a smaller --n"
            f"{' (e.g. --n 200)' if n > 200 else ''} or fewer --strategy is quicker")
    with progress_bar("analyze", total=PARTS * len(todo) + 1) as advance:
        for name in todo:
            per[name] = analyze_strategy(ddm, name, x1, s.steps, solver, seed, ctx, settings, advance)
            keep_strategy(out, name, keys[name], per[name])
            log(f"analyze {name}: {per[name]['wall_time']:.1f}s, q {per[name]['summary']['q']:.4g}, "
                f"Delta_refine {per[name]['summary']['delta_refine']:.4g}")
        advance(0, now="held-out errors")
        exact = None
        if test.truth is not None:
            try:
                exact = exact_on_cpu(exact_ddm(run))
            except DDMError:
                exact = None
        held_x = test.x[rows["heldout"]]
        clusters, rule = heldout_clusters(held_x, None if test.labels is None else test.labels[rows["heldout"]],
                                          exact, ctx)
        held = heldout_errors(ddm, held_x, [0.05 + 0.1 * i for i in range(10)], strats, seed, exact, clusters)
        advance(1)
    held["cluster_rule"] = rule
    for name, r in per.items():
        r["summary"]["err_routed"] = float(np.nanmean(held["routed"][name]))
        nr = [v for v in held["not_routed"][name] if not math.isnan(v)]
        r["summary"]["err_not_routed"] = float(np.mean(nr)) if nr else math.nan
    result = {"run": str(run), "settings": settings, "quality_name": "NLL" if test.truth is not None else "NN distance",
              "x0_reference": reference_info, "missing_experts": ddm.meta.get("missing_experts", []),
              "w2_floor": w2_exact(ctx["w2_reference"], test.x[rows["floor"]]), "strategies": per, "heldout": held,
              "link": strategy_links(per, n_boot, seed), "compare": compare_to_fixed(per, n_boot, seed)}
    plots = out / "plots"
    plot_lipschitz(per, plots / "lipschitz.png")
    plot_expert_error(held, plots / "expert_error.png")
    plot_disagreement(per, plots / "disagreement.png")
    plot_quality_scatter({nm: (r["per_sample"]["pair"], r["per_sample"]["q"]) for nm, r in per.items()},
                         result["quality_name"], plots / "quality_vs_disagreement.png")
    result["wall_time"] = time.perf_counter() - start
    result["cpu_time"] = time.process_time() - cpu
    write_json(out / "analysis.json", nan_as_null({**result, "strategies": {
        nm: {k: v for k, v in r.items() if k != "per_sample"} for nm, r in per.items()}}))  # undefined rho: null
    write_bytes_atomic(out / "analysis.md", render(result).encode())
    log(f"analysis: {out / 'analysis.md'} ({result['wall_time']:.1f}s wall, {result['cpu_time']:.1f}s CPU)")
    return result
