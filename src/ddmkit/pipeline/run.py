"""One pipeline for every kind of data: the stages of a run, chosen by what the run holds.

    run_pipeline(cfg, "runs/ring")                 # every stage; each skips what is already done
    run_pipeline(cfg, "runs/fm", stages="train")   # data, partition, experts, monolith, router, registry
    sample_run("runs/fm", ["top-2"])               # the sampling stage for some sets
    evaluate_run("runs/fm")                        # the evaluation stage and report

Vectors and images share the training and sampling stages; their evaluation differs (W2 and
the exact truth's scores against FID and KID). Text runs (ddmkit.pipeline.text) have stages of
their own over the same run folder.
"""
from __future__ import annotations

import contextlib
import ctypes
import shlex
import threading
import time
from pathlib import Path
from typing import Callable

from ddmkit.config import RunConfig, checked_config, run_device
from ddmkit.data.images import is_image_shape
from ddmkit.ddm.load import check_some_expert, load_truth, recorded_router
from ddmkit.errors import DDMError
from ddmkit.launch.backends import check_launch, cuda_count
from ddmkit.layout import RunFolder
import ddmkit.pipeline.images as images
import ddmkit.pipeline.vectors as vectors
from ddmkit.pipeline.prepare import listed, prepare_run_dir, remove_leftovers, run_config, run_lock, trained_differences
from ddmkit.pipeline.samplesets import (STATISTICS, SampleSet, SetKind, calls_every_expert, full_routing_note,
                                        named_set, planned_sets, sample_options, statistics_set)
from ddmkit.pipeline.sampling import changed_error, changed_sets, read_info, stage_sample, stale_sets
from ddmkit.pipeline.stages import TRAINING_STAGES, read_data_info, stage_experts, stage_monolith, stage_router
from ddmkit.registry import check_registered, read_manifest
from ddmkit.train.stop import stop_scope

Log = Callable[[str], None]
STAGES = ("all", "train", "evaluate")


def is_image_run(run) -> bool:
    folder = RunFolder(run)
    if not folder.data_info.exists():
        if folder.manifest.exists():  # e.g. a site sent the experts and the partition, without the data's rows
            raise DDMError(f"{folder.root}: no data/data.json (the data's shape and kind, no rows), which sampling "
                           "needs beside the partition; copy it from the run that made the partition "
                           "(RUN/data/data.json)")
        raise DDMError(f"{folder.root}: no data yet (data/data.json); run `ddmkit partition --out {folder.root} "
                       "--config CONFIG` or `ddmkit run CONFIG --out RUN` first")
    return is_image_shape(read_data_info(folder)["data_shape"])


def evaluate_stage(cfg: RunConfig, run, log: Log = print, device="cpu", scorer=None) -> dict:
    """The evaluation stage of the run's kind of data (holding the run's lock). cfg may change how sets are
    scored ([sample], [evaluate]), not what the run is: other data, partition or networks are refused."""
    with run_lock(run):
        if RunFolder(run).config.exists():
            differs = trained_differences(run_config(run), cfg)
            if differs:
                raise DDMError(f"{RunFolder(run).root} was made with other settings: its config.json differs in "
                               f"{listed(differs)}. Evaluating scores "
                               "the samples of that run: change only [sample] or [evaluate] settings (or run the "
                               "other config in another --out folder)")
            remove_leftovers(run, log)
        stale = stale_sets(run)
        if stale:
            root = RunFolder(run).root
            again = "; ".join(f"`ddmkit sample {shlex.quote(str(root))} {sample_options(name)}`" for name in stale)
            names = ", ".join(repr(name) for name in stale)
            raise DDMError(f"sample sets {names} were drawn by networks that have changed since (retrained, "
                           f"replaced or added: {RunFolder(run).registry.name} records others now), so their scores "
                           f"would not be this DDM's; draw them again with {again}, or delete their files from "
                           f"{RunFolder(run).samples}")
        if is_image_run(run):  # every set checked before any is scored (vector sets: as they are loaded, at once)
            changed = changed_sets(run)
            if changed:
                raise changed_error(run, changed)
            return images.stage_evaluate(cfg, run, log, device, scorer)
        return vectors.stage_evaluate(cfg, run, log)


def train_stages(cfg: RunConfig, run, log: Log = print, backend: str = "inline", workers: int | None = None,
                 address: str | None = None) -> None:
    """The training stages in order (run holds the run's lock). With the processes backend on CPU the
    monolith and the router, which need neither the experts nor each other, train in a thread of this
    process while the pool trains the experts: the cores are busy throughout, and every network's
    bytes are the same as in order (each job keeps its own seed and thread count)."""
    beside_pool = backend == "processes" and not cfg.expert.concurrent and cuda_count() == 0
    check_registered(run)  # a registered file changed since is refused, not registered again
    for stage in TRAINING_STAGES:
        if stage is stage_experts:
            with in_thread(lambda: (stage_monolith(cfg, run, log), stage_router(cfg, run, log)), beside_pool):
                stage(cfg, run, log, backend, workers, address)
        else:
            stage(cfg, run, log)  # the monolith and the router skip themselves once written


@contextlib.contextmanager
def in_thread(work: Callable[[], object], enabled: bool = True):
    """Run work() in a thread while the body runs (or nothing when not enabled); on leaving, wait for it
    and raise its error, if any. An error in the body (Ctrl-C, a failed job) stops work() first: a
    KeyboardInterrupt is raised in the thread (interrupt) and the thread's stop flag is set (work() runs in
    a stop scope of its own, ddmkit.train.stop: the flag stops that thread alone, not this one, which is
    raising the error), so that the training loop raises it again at its next step should the first be
    lost (in a __del__, say). The thread ends as an interrupted job does (its staging folder removed, its
    last checkpoint kept), and is waited for, so that no thread is left inside torch when the process
    exits (that aborts it)."""
    if not enabled:
        yield
        return
    errors: list[BaseException] = []
    stop = threading.Event()

    def body():
        try:
            with stop_scope(stop):
                work()
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)
    thread = threading.Thread(target=body, name="ddmkit-beside-pool", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        interrupt(thread)  # before the flag: raised after it, it could land in the cleanup the loop's raise started
        stop.set()
        thread.join()
        raise
    thread.join()
    if errors:
        raise errors[0]


def interrupt(thread: threading.Thread) -> None:
    """Raise KeyboardInterrupt in `thread` at its next Python instruction (nothing once it has ended). It can be
    lost (Python drops an exception raised in a __del__ or a weakref callback): in_thread sets the thread's
    stop flag too."""
    if thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))


def sample_and_evaluate(cfg: RunConfig, run, log: Log = print, device="cpu") -> dict:
    """Draw every planned set, then score them (image sets are scored as soon as each is drawn)."""
    image_run = is_image_run(run)
    sets = planned_sets(cfg, load_truth(run) is not None)
    note_full_routing(sets, read_manifest(RunFolder(run).partition)["k"], log)
    scorer = images.scorer_for(cfg, run, log, device) if image_run else None
    stage_sample(cfg, run, sets, image_run, log, device, on_sample=scorer)
    return evaluate_stage(cfg, run, log, device, scorer)


def untrained_parts(cfg: RunConfig, run) -> list[str]:
    """The networks the evaluation stages need that the run folder lacks (all of them before a partition)."""
    folder = RunFolder(run)
    if not folder.manifest.exists():
        return ["partition", "experts", "router"] + (["monolith"] if cfg.monolith.enabled else [])
    nets = [folder.expert(c) for c in range(read_manifest(folder.partition)["k"])]
    nets += [] if recorded_router(run) == "statistics" else [folder.router]  # grown with --router stats: none
    nets += [folder.monolith] if cfg.monolith.enabled else []
    return [str(n.relative_to(folder.root)) for n in nets if not (n / "model.safetensors").exists()]


def run_pipeline(cfg: RunConfig | str | Path, out: str | Path, force: bool = False, log: Log = print,
                 backend: str = "inline", workers: int | None = None, address: str | None = None,
                 stages: str = "all") -> dict | None:
    """The stages in order, each skipped when already done; experts train on the launch `backend`
    (inline, processes, ray). stages: "train" (up to the registry), "evaluate" (sampling, scores,
    report: needs the trained networks) or "all". cfg: a RunConfig (checked again here, so fields set
    after it was made are checked too) or a config file's path or built-in name."""
    cfg = checked_config(cfg)
    if stages not in STAGES:
        raise DDMError(f"--stages: unknown value {stages!r}; accepted: {', '.join(STAGES)}")
    check_launch(backend, workers, address, cfg.expert.concurrent)  # before the run folder is made
    missing = untrained_parts(cfg, out) if stages == "evaluate" else []
    if missing == ["monolith"]:  # e.g. experts trained on islands, a router, no baseline
        grown = RunFolder(out).grow.exists()  # its monolith would train on the grown data, not the original
        train = "" if grown else f"train it with `ddmkit train-monolith {out}`, or "
        raise DDMError(f"--stages evaluate: {out} has no monolith (monolith.enabled = true); {train}sample and "
                       f"score the DDM alone with `ddmkit sample {out}`, then `ddmkit evaluate {out}`")
    if missing:
        raise DDMError(f"--stages evaluate: {out} is not trained (no {', '.join(missing)}); train it first with "
                       f"`ddmkit run CONFIG --out {out} --stages train` (or --stages all)")
    with run_lock(out):  # one writer per run folder: a second run on it is refused
        run = prepare_run_dir(out, cfg, force, log, evaluates=stages != "train")
        device = run_device(cfg)
        start = time.perf_counter()
        result = None
        if stages in ("train", "all"):
            train_stages(cfg, run, log, backend, workers, address)
            log(f"train stages: {time.perf_counter() - start:.1f}s")
        if stages in ("evaluate", "all"):
            begin = time.perf_counter()
            result = sample_and_evaluate(cfg, run, log, device)
            log(f"evaluate stages: {time.perf_counter() - begin:.1f}s")
        log(f"done in {time.perf_counter() - start:.1f}s")
    return result


def sampling_router(router: str) -> str:
    """The router a sampling command names: learned or statistics (stats, add-expert's spelling of it, too);
    anything else, '' included, a DDMError naming --router and the accepted values."""
    name = STATISTICS if router == "stats" else router
    if name not in ("learned", STATISTICS):
        raise DDMError(f"--router: unknown {router!r}; accepted: learned, statistics (or stats), or leave --router "
                       "out for the run's router")
    return name


def note_full_routing(sets: list[SampleSet], k: int, log: Log) -> None:
    """A note, once per strategy, for each set whose top-n or sample-n calls every expert of a DDM of k experts."""
    for name in dict.fromkeys(s.strategy for s in sets if s.kind == SetKind.DDM):
        if calls_every_expert(name, k):
            log(f"note: {full_routing_note(name, k)}")


def sample_run(run, names: list[str], cfg: RunConfig | None = None, log: Log = print, device=None,
               router: str = "learned") -> list[dict]:
    """Draw the named sets (routing strategies, 'monolith', 'exact') with the run's [sample] settings
    (or cfg's), again when they were drawn before; returns their infos. router = "statistics" routes
    the strategies by the islands' statistics (sets "NAME (statistics-only router)"; no learned router
    needed). Holds the run's lock."""
    router = sampling_router(router)
    with run_lock(run):
        folder = RunFolder(run)
        if cfg is not None and not folder.config.exists() and folder.manifest.exists():
            saved = cfg  # a run that lost its config.json, given its settings back by --config (as evaluate is)
        else:
            saved = run_config(run)  # the folder must hold a run, whatever cfg says
        differs = trained_differences(saved, cfg) if cfg is not None else []
        if differs:
            raise DDMError(f"{RunFolder(run).root} was made with other settings: its config.json differs in "
                           f"{listed(differs)}. Sampling draws from that run's networks: change only [sample] "
                           "settings (or run the other config in another --out folder)")
        remove_leftovers(run, log)
        cfg = cfg or saved
        device = device or run_device(cfg)
        one_set = statistics_set if router == STATISTICS else named_set
        sets: list[SampleSet] = []
        for name in names:  # a name given twice is drawn once
            one = one_set(name, cfg.sample.n, cfg.sample.guidance)
            sets += [one] if one.name not in {s.name for s in sets} else []
        if folder.manifest.exists():
            k = read_manifest(folder.partition)["k"]
            if any(s.kind == SetKind.DDM for s in sets):
                check_some_expert(folder, k)  # a run of its partition alone is refused before the notes
            note_full_routing(sets, k, log)
        stage_sample(cfg, run, sets, is_image_run(run), log, device, redraw=True)
        infos = read_info(folder)
        if RunFolder(run).report.exists():
            log(f"note: {RunFolder(run).report} and metrics.json still score the sets as they were; "
                f"`ddmkit evaluate {RunFolder(run).root}` scores these")
    return [infos[s.name] for s in sets]


def evaluate_run(run, log: Log = print, device=None) -> dict:
    """Score every set drawn so far and write the report."""
    cfg = run_config(run)
    return evaluate_stage(cfg, run, log, device or run_device(cfg))
