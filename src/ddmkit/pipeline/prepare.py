"""The run folder's configuration: create RUN/ for a config, or reuse it for the same run.

RUN/config.json holds the resolved configuration, its digest and the SHA-256 of each section
that made the data and networks (config_record). A folder that holds a different run (other
data, partition or training) is refused unless force=True; when only [sample] or [evaluate]
changed, the trained networks are kept and what sampling and scoring wrote is removed, to be
drawn again. A config.json whose trained sections were edited by hand since it was written is
refused by every command that reads it (check_trained_unchanged).

Nothing is written before the run is checked: for a new run, prepare_run_dir loads the data
and computes the partition in memory (every check of the data and partition settings: unknown
data.params, non-finite data, k larger than the data, empty clusters, a user feature function
that fails, a network that cannot be built; and, in pipeline.checks, every size, split and
sample count the later stages need and the labels class-conditional networks need, for new and resumed runs alike) and only then writes
config.json, RUN/data and RUN/partition. A bad config leaves the folder as it was (a folder this call created is removed
again).

One process at a time writes a run folder: prepare_run_dir and every training stage hold
RUN/.lock (run_lock in pipeline.stages, ddmkit.io.folder_lock) and a second writer is refused,
naming the holder's process id; a lock left by a process that died is taken over. Temporary files
and folders left by a killed writer are removed here.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Callable

from ddmkit.config import RunConfig, config_differences, validate
from ddmkit.data.arrays import content_hash
from ddmkit.data.source import source_files, source_fingerprint
from ddmkit.errors import DDMError
from ddmkit.evaluation.fid import checked_weights_path
from ddmkit.io import STAGING, entries, read_json, remove, remove_stale_staging, write_json
from ddmkit.latent.autoencoder import check_pretrained, network_data_shape
from ddmkit.ddm.load import component_groups, records_truth
from ddmkit.layout import RunFolder, check_run_exists, enclosing_run
from ddmkit.pipeline.checks import (check_clusters, check_devices, check_labels, check_run_plan, check_sample_memory,
                                    few_test_images, unused_attention, unused_partition_settings, untrained_classes)
from ddmkit.train.jobs import EXECUTION
from ddmkit.pipeline.stages import (check_network_arguments, check_networks, load_data, load_split, plan_partition,
                                    read_data_info, register_user_features, register_user_networks, run_lock,
                                    write_data, write_partition)

Log = Callable[[str], None]
TRAINED = ("data", "partition", "expert", "router", "monolith", "latent")  # the config sections the networks depend on
# how a run's jobs run, not what they make: each job's EXECUTION, and how many images the autoencoder encodes
# or decodes at once (latent.encode_batch) and the feature encoder embeds at once (partition.encoder_batch)
RUN_EXECUTION = (*EXECUTION, "encode_batch", "encoder_batch")


def listed(differs: list[str]) -> str:
    """Config differences as a message shows them: the first six, joined by '; ', then ' ...' if more."""
    return "; ".join(differs[:6]) + (" ..." if len(differs) > 6 else "")


def differences_text(made: RunConfig, asked: RunConfig) -> str:
    """What differs between a run's config and the one asked in what it trains, the fields named."""
    return f"its config.json differs in {listed(trained_differences(made, asked))}"


def trained_differences(made: RunConfig, asked: RunConfig) -> list[str]:
    """The fields of the sections that made the run's data and networks (TRAINED) in which `asked` differs
    from `made`, less how jobs run (device, threads, logging: train.jobs.EXECUTION). Compared as Python values:
    JSON has no inf or nan (a data.params value of inf read as null, the same as a key left out)."""
    old, new = made.model_dump(), asked.model_dump()
    return [d for name in TRAINED for d in config_differences({name: old.get(name)}, {name: new.get(name)})
            if d.split(" ", 1)[0].rsplit(".", 1)[-1] not in RUN_EXECUTION]


def trained_sha256(config: dict) -> dict[str, str]:
    """The SHA-256 of each section of a run's config, as config.json holds it, that made its data and networks
    (TRAINED), less how the jobs run (RUN_EXECUTION, at any depth): config.json records them (config_record),
    so that a section edited by hand since is found (check_trained_unchanged)."""
    return {name: hashlib.sha256(json.dumps(_without(config.get(name), RUN_EXECUTION), sort_keys=True).encode())
            .hexdigest() for name in TRAINED}


def _without(obj, names: tuple[str, ...]):
    """obj (JSON) without the keys `names`, at any depth."""
    if isinstance(obj, dict):
        return {key: _without(value, names) for key, value in obj.items() if key not in names}
    if isinstance(obj, list):
        return [_without(value, names) for value in obj]
    return obj


def config_record(cfg: RunConfig) -> dict:
    """What RUN/config.json holds: the resolved configuration, its digest and the SHA-256 of its trained
    sections (trained_sha256, of the configuration as the file holds it once read back)."""
    config = cfg.model_dump()
    as_read = json.loads(json.dumps(config, default=str))
    return {"digest": cfg.digest(), "trained_sha256": trained_sha256(as_read), "config": config}


def edited_sections(saved: dict) -> list[str]:
    """The trained sections of a run's config.json (`saved`, as read) that no longer have the SHA-256 it records
    (edited by hand since it was written); none for a config.json of an earlier ddmkit, which records none."""
    recorded = saved.get("trained_sha256")
    if recorded is None:
        return []
    recorded = recorded if isinstance(recorded, dict) else {}
    return [name for name, sha in trained_sha256(saved["config"]).items() if recorded.get(name) != sha]


def check_trained_unchanged(path: Path, saved: dict, fix: str) -> None:
    """A run's config.json (`saved`, as read from `path`) whose trained sections still have the SHA-256 it
    records, else a DDMError naming the sections and ending with `fix`: the run's data and networks were made
    with those settings as they were. [sample] and [evaluate], and how the jobs run, may change. A config.json
    of an earlier ddmkit records none: nothing to check."""
    changed = edited_sections(saved)
    if changed:
        raise edited_error(path, changed, fix)


def edited_error(path: Path, changed: list[str], fix: str) -> DDMError:
    """The error of check_trained_unchanged: the config.json at `path` has its `changed` sections edited."""
    sections = ", ".join(f"[{name}]" for name in changed)
    return DDMError(f"{path}: its {sections} settings were changed after the run was made (they no longer have "
                    "the SHA-256 it records in trained_sha256), but the run's data and networks were made with "
                    "them as they were, so they would be described, sampled and scored under settings they were "
                    f"not made with. Put the settings back (copy config.json back from another copy of the run); "
                    f"{fix}")


def edited_config_fix(folder: RunFolder) -> str:
    """How to run an edited config.json's settings: in a run of their own."""
    return (f"to train with the new settings, make a run of them in another folder: `ddmkit run "
            f"{shlex.quote(str(folder.config))} --out NEW_RUN`")


def check_config_file(path: Path) -> None:
    """A run's config.json given as a command's config file (`ddmkit train-expert --config RUN/config.json`, as
    SLURM tasks run it) is checked as run_config checks it (check_trained_unchanged), before any work: an expert
    trained under edited settings would be refused by every later command of the run. A TOML, or a JSON file that
    records no SHA-256 of its sections (no run's, or an earlier ddmkit's), is not checked here."""
    if path.suffix != ".json" or not path.is_file():
        return
    raw = read_json(path)
    if not (isinstance(raw, dict) and isinstance(raw.get("config"), dict)):
        return
    changed = edited_sections(raw)
    if not changed:
        return
    expert = ("to train this expert with other [expert] settings, keep config.json as the run made it and give "
              "them as --set (e.g. --set expert.train.steps=N); " if "expert" in changed else "")
    raise edited_error(path, changed, f"{expert}to train with the new settings, make a run of them in another "
                                      f"folder: `ddmkit run {shlex.quote(str(path))} --out NEW_RUN`")


def check_same_training(run: str | Path, cfg: RunConfig, options: str = "--set / --config") -> None:
    """A command that trains the networks a run lacks (`ddmkit launch`) trains them as RUN/config.json says:
    cfg (its --set, --config and --device applied) may change how the jobs run (train.jobs.EXECUTION: device,
    threads, checkpoint_every, log_every, tensorboard, parallel), nothing else of the trained sections, or
    the run's networks would differ from its config.json (a DDMError naming the fields, after `options`, the
    command's options that could have changed them)."""
    folder = RunFolder(run)
    if not folder.config.exists():
        return
    differs = trained_differences(run_config(run), cfg)
    if differs:
        raise DDMError(f"{options}: {folder.root} was made with other training settings: its config.json "
                       f"differs in {listed(differs)}. Its networks train as config.json says: change only how the "
                       f"jobs run ({', '.join(RUN_EXECUTION)}), or make a run with these settings in another folder "
                       "(`ddmkit run CONFIG --out OTHER --set ...`)")


def recorded_kind(folder: RunFolder):
    """The `kind` field of a run folder's recorded config (a text run's "text_ar" or "text_dfm"), or None."""
    try:
        saved = read_json(folder.config)
    except DDMError:
        return None
    config = saved.get("config") if isinstance(saved, dict) else None
    return config.get("kind") if isinstance(config, dict) else None


def written_by_ddmkit(folder: RunFolder) -> bool:
    """Whether the folder holds a run ddmkit wrote: a config.json with a run's digest and config (any kind of
    run), or, beside a config.json that cannot be read (a damaged run), the partition or data ddmkit writes."""
    if not folder.config.is_file():
        return False
    try:
        saved = read_json(folder.config)
    except DDMError:
        saved = None
    if isinstance(saved, dict) and isinstance(saved.get("config"), dict) and "digest" in saved:
        return True
    return folder.manifest.is_file() or folder.data_info.is_file()


def check_replaceable(folder: RunFolder) -> None:
    """A folder a new run may be written into: new, empty (its lock and a killed writer's temporary files
    aside) or a run ddmkit wrote. --force replaces such a run, never a folder of other files."""
    held = sorted(p.name for p in entries(folder.root, but=folder.lock) if not STAGING.match(p.name))
    if held and not written_by_ddmkit(folder):
        names = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise DDMError(f"{folder.root} is not a ddmkit run folder and is not empty (it holds {names}); ddmkit writes "
                       "a run into a new or empty folder, and --force replaces only a run it wrote, never other "
                       "files: choose another --out")


def remove_run_leftovers(folder: RunFolder, log: Log = print) -> None:
    """remove_leftovers in a run folder, or in one that holds nothing else (a run killed before its
    config.json was written); a folder that is not a run keeps its own hidden .tmp files."""
    if folder.config.exists() or all(STAGING.match(p.name) for p in entries(folder.root, but=folder.lock)):
        remove_leftovers(folder.root, log)


def check_run_target(folder: RunFolder, cfg: RunConfig, force: bool) -> None:
    """The refusals of a run of `cfg` written into `folder` (a folder of other files, another run without
    `force`, a config.json edited by hand), before anything is written: for a command that writes several
    run folders and checks them all before the first."""
    _action(folder, cfg, force)


def _action(folder: RunFolder, cfg: RunConfig, force: bool) -> str:
    """What to do with the folder: "new", "same" (resume; how the jobs run may differ: train.jobs.EXECUTION),
    "derived" (only [sample]/[evaluate] changed too) or "replace" (force, another run or a config.json edited
    by hand); refusals are DDMErrors."""
    if folder.config.exists():
        try:
            saved = read_json(folder.config)
            old = validate(RunConfig, saved.get("config"), str(folder.config))
        except (DDMError, AttributeError) as e:
            check_replaceable(folder)  # a config.json of another program's: no run at all
            if force:
                return "replace"
            kind = recorded_kind(folder)
            if isinstance(kind, str):  # a text run (ddmkit.pipeline.text): another kind of run, not a damaged one
                raise DDMError(f"{folder.root} holds a run of another kind ({kind!r}: a text run); choose another "
                               "--out folder or pass --force to replace it") from None
            raise DDMError(f"{folder.root} holds a config.json that ddmkit cannot read ({str(e)[:300]}); choose "
                           "another --out folder or pass --force to replace the run") from None
        edited = edited_sections(saved)
        if edited and force:
            return "replace"  # edited by hand: its data and networks are not those of its settings
        if edited:
            raise edited_error(folder.config, edited, f"{edited_config_fix(folder)}, or pass --force to replace this "
                               "one")
        if old.digest() == cfg.digest():
            return "same"
        if not trained_differences(old, cfg):  # how jobs run (device, threads, logging, ...) may change
            made, asked = old.model_dump(), cfg.model_dump()
            return "same" if all(made[name] == asked[name] for name in ("sample", "evaluate")) else "derived"
        if not force:
            raise DDMError(f"{folder.root} already holds a different run: {differences_text(old, cfg)}; choose "
                           "another --out folder or pass --force to replace it")
        return "replace"
    check_replaceable(folder)
    return "new"


def check_kinds(folder: RunFolder, skip: list[Path] = ()) -> None:
    """Every path ddmkit writes in the folder is of the right kind where it exists (a folder where a
    folder goes, a file where a file goes), so a run does not fail at its last stage."""
    dirs = [folder.data, folder.partition, folder.experts, folder.router, folder.monolith, folder.samples,
            folder.eval, folder.plots, folder.analysis]
    files = [folder.config, folder.registry, folder.report, folder.metrics]
    for path in dirs:
        if path not in skip and path.exists() and not path.is_dir():
            raise DDMError(f"{path} is a file, but ddmkit writes a folder there; move it away or delete it (ddmkit "
                           "makes that folder again)")
    for path in files:
        if path not in skip and path.is_dir():
            raise DDMError(f"{path} is a folder, but ddmkit writes a file there; move it away")


def _check_sizes(cfg: RunConfig, folder: RunFolder, data: tuple | None, kept_partition: bool,
                 evaluates: bool = False) -> None:
    """pipeline.checks.check_run_plan on the data in memory (a new run, or a resumed run's data made
    again), or as RUN/data/data.json records them (a resumed run, maybe with new [sample] or [evaluate]
    settings), and pipeline.checks.check_sample_memory of sample.n on its shape, then, when the run keeps its
    partition, on the clusters RUN/partition/manifest.json records. evaluates: the run scores images, whose
    FID Inception weights (evaluate.fid_features = "inception") must be there before anything trains."""
    if data is not None:
        train, test = data
        check_labels(cfg, [train.labels, test.labels])  # first: it names every setting that needs labels at once
        check_run_plan(cfg, len(train), len(test), train.data_shape, train.truth is not None)
        shape = train.data_shape
    else:
        info = read_data_info(folder)
        check_run_plan(cfg, info["n_train"], info["n_test"], tuple(info["data_shape"]), info["exact_truth"])
        shape = tuple(info["data_shape"])
    check_sample_memory(cfg.sample.n, shape)  # the sample stage's noise and samples, before anything trains
    if evaluates and len(shape) == 3 and cfg.evaluate.fid_features == "inception":
        checked_weights_path()  # found missing after training, it left the run unscored
    if kept_partition:
        check_clusters(cfg, read_json(folder.manifest)["counts"], shape)


def lost_data(folder: RunFolder) -> list[Path]:
    """The files of RUN/data/ that a run made before lacks: data.json, the train and test splits, and the
    exact truth where data.json records one."""
    files = [folder.data_info, folder.split("train"), folder.split("test")]
    if records_truth(folder):
        files.append(folder.truth)
    return [path for path in files if not path.exists()]


def note_changed_source(cfg: RunConfig, folder: RunFolder, log: Log) -> None:
    """A note when the files a resumed run's data were loaded from have changed since (data.json's
    source_fingerprint): the run keeps the data it loaded, which the user may not expect."""
    recorded = read_data_info(folder).get("source_fingerprint")
    now = source_fingerprint(cfg.data.name, cfg.data.params)
    if recorded is not None and now is not None and now != recorded:
        named = ", ".join(str(p) for p in source_files(cfg.data.name, cfg.data.params))
        log(f"note: the data files ({named}) have changed since {folder.root} loaded them (files added, removed or "
            f"written again); the run keeps the data it loaded ({folder.data}). To train on them as they are now, "
            "make a new run: `ddmkit run CONFIG --out NEW_RUN`")


def _remade_data(cfg: RunConfig, folder: RunFolder, lost: list[Path], log: Log) -> tuple:
    """A resumed run's data, made again from its config (the same bytes: the data depend on the config
    alone), checked to be the data its partition was made of."""
    names = ", ".join(str(p.relative_to(folder.root)) for p in lost)
    data = load_data(cfg)
    if folder.manifest.exists() and read_json(folder.manifest).get("data_hash") != content_hash(data[0].x):
        raise DDMError(f"{folder.root}: {names} missing, and the data the config makes now are not those "
                       f"{folder.manifest} was made of (its data_hash differs); copy the run's data/ folder back, or "
                       "make the run again in another --out folder")
    log(f"{folder.root}: {names} missing; made again from the config")
    return data


def check_partition(cfg: RunConfig, train, plan, log: Log) -> None:
    """pipeline.checks.check_clusters on a new partition (for a Gaussian mixture, with the clusters
    that own no component); its warnings, those of settings the features ignore and of classes the samples
    draw that no training row holds, are logged."""
    orphans = []
    if train.truth is not None and train.labels is not None:
        groups = component_groups(train.labels, plan.labels, train.truth.k, plan.k)
        orphans = [c for c, g in enumerate(groups) if not g]
    for warning in check_clusters(cfg, plan.counts.tolist(), train.data_shape, orphans) + \
            unused_partition_settings(cfg) + untrained_classes(cfg, train.labels):
        log(f"warning: {warning}")


def remove_leftovers(run: str | Path, log: Log = print) -> None:
    """Remove the temporary files and folders that writers killed mid-write left in the run (those of a live
    writer, or of another machine's, stay: ddmkit.io.remove_stale_staging). Call it holding the run's lock."""
    stale = remove_stale_staging(run)
    if stale:
        log(f"{run}: removed {len(stale)} temporary files or folders left by an interrupted run")


def prepare_run_dir(out: str | Path, cfg: RunConfig, force: bool = False, log: Log = print,
                    evaluates: bool = False) -> Path:
    """Create RUN/ with its config, data and partition (or reuse it for the same configuration),
    every check done before the first write; returns its path. evaluates: the run goes on to its evaluate stage
    (which needs the FID weights of an image run)."""
    folder = RunFolder(out)
    holder = enclosing_run(folder.root)
    if holder is not None:
        raise DDMError(f"--out {folder.root} is inside the run folder {holder}; give a folder outside any run for a "
                       f"new run (or {holder} itself, to continue that run)")
    check_devices(cfg)
    check_network_arguments(cfg)  # a misspelt net kwarg, before the data are read
    with run_lock(folder.root):
        run = folder.root
        remove_run_leftovers(folder, log)
        action = _action(folder, cfg, force)
        if action in ("same", "derived"):
            check_kinds(folder, folder.derived if action == "derived" else [])
        keep = action in ("same", "derived")
        kept_partition = keep and folder.manifest.exists()
        # every check of the data and partition settings, in memory, before anything is written
        data = plan = train = None
        lost = lost_data(folder) if keep else []
        if lost:  # a file of RUN/data/ deleted since: the data are made again (all of data/ is written again)
            data = _remade_data(cfg, folder, lost, log)
        elif keep:
            note_changed_source(cfg, folder, log)
        if not kept_partition:
            if data is None and not keep:
                data = load_data(cfg)
            train = data[0] if data is not None else load_split(run, "train")
            _check_sizes(cfg, folder, data, kept_partition, evaluates)
            net_shape = network_data_shape(cfg.latent, train.data_shape, cfg.data.name, cfg.data.params)
            check_networks(cfg, net_shape)
            n_test = len(data[1]) if data is not None else read_data_info(folder)["n_test"]
            for warning in unused_attention(cfg, net_shape) + few_test_images(cfg, n_test, train.data_shape):
                log(f"warning: {warning}")
            new_autoencoder = action == "replace" or not folder.autoencoder.exists()  # not the one kept
            if cfg.latent.enabled and cfg.latent.pretrained and new_autoencoder:
                check_pretrained(cfg.latent, log)  # its weights, loaded once before anything is written
            plan = plan_partition(cfg, train)
            check_partition(cfg, train, plan, log)
        else:
            register_user_features(cfg)
            register_user_networks(cfg)
            _check_sizes(cfg, folder, data, kept_partition, evaluates)
        if action == "replace":
            removed = entries(folder.root, but=folder.lock)
            for path in removed:
                remove(path)
            if removed:
                log(f"{run}: --force: removed what it held ({', '.join(sorted(p.name for p in removed))})")
        elif action == "derived":
            old = read_json(folder.config)["config"]
            changed = [name for name in ("sample", "evaluate") if old.get(name) != cfg.model_dump()[name]]
            if changed == ["evaluate"]:  # the sets depend on [sample] and the networks only: kept
                log(f"{run}: the evaluate settings changed; the trained networks and the samples are kept, the "
                    "scores are computed again")
            else:
                log(f"{run}: the {' and '.join(changed) or 'sample'} settings changed; the trained networks are kept, "
                    "samples and scores are drawn again")
            if folder.analysis.exists():  # not redrawn by this run: say it goes, and what makes it again
                log(f"{run}: removed {folder.analysis} (of `ddmkit analyze`, made with the settings before); "
                    f"`ddmkit analyze {shlex.quote(str(run))}` makes it again")
            for path in folder.derived:
                if path != folder.samples or changed != ["evaluate"]:
                    remove(path)
        write_json(folder.config, config_record(cfg))
        if data is not None:
            write_data(cfg, run, *data, log)
        if plan is not None:
            m = write_partition(plan, train, folder.partition)
            log(f"partition: k={m['k']}, cluster sizes {m['counts']}")
    return run


CONFIG_FIX = ("copy it back from another copy of the run. `ddmkit sample`, `evaluate`, `train-router`, "
              "`train-monolith` and `launch` also take those settings from --config CONFIG (the TOML the run was "
              "made with)")


def run_config(run: str | Path) -> RunConfig:
    """The configuration a run folder was made with."""
    folder = RunFolder(run)
    check_run_exists(folder.root)
    if not folder.config.exists():
        above = enclosing_run(folder.root)  # a folder inside a run (RUN/partition, RUN/experts/expert_00)
        if above is not None:
            raise DDMError(f"{folder.root} is a folder inside the run {above}; give the run folder itself: {above}")
        if folder.partition.is_dir():  # a run that lost its config.json: its settings are not the defaults
            raise DDMError(f"{folder.root} has no config.json, the settings the run was made with (its partition is "
                           f"there); {CONFIG_FIX}")
        if entries(folder.root, but=folder.lock):  # a folder of other files (a corpus, a data folder)
            raise DDMError(f"{folder.root} is not a ddmkit run folder (no config.json); give the folder `ddmkit run` "
                           "or `ddmkit partition` wrote")
        raise DDMError(f"{folder.root} is not a ddmkit run folder (no config.json); make one with "
                       f"`ddmkit run CONFIG --out {folder.root}` or `ddmkit partition --out {folder.root}`")
    raw = read_json(folder.config, f"{CONFIG_FIX}, once this one is removed")
    if not (isinstance(raw, dict) and isinstance(raw.get("config"), dict)):  # e.g. a model folder's config.json
        above = enclosing_run(folder.root)
        raise DDMError(f"{folder.root} is not a ddmkit run folder (its config.json is not a run's: no \"config\" "
                       "section)" + (f"; it is a folder inside the run {above}: give the run folder itself: {above}"
                                     if above is not None else "; give the folder `ddmkit run` wrote"))
    cfg = validate(RunConfig, raw["config"], f"{folder.config}")
    check_trained_unchanged(folder.config, raw, edited_config_fix(folder))
    return cfg
