"""The `ddmkit` command line: thin; it parses and calls the library.

Every command exits 0 on success, 2 with one clear message on bad input
(DDMError), and never leaves half-written files (writes are atomic).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import shlex
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import List, Optional, get_args

import typer
from rich.console import Console
from rich.markup import escape

from ddmkit.errors import DDMError, shortened
from ddmkit.routing.table import SAMPLED_STRATEGY_FORMS, STRATEGY_FORMS

FIELD_STRATEGY_FORMS = ", ".join(form for form in STRATEGY_FORMS.split(", ")
                                 if form not in ("oracle", "nearest", "gated-K@A"))  # a field of (x_t, t)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decentralized Diffusion Models: partition, train experts in isolation, route, sample, evaluate.")
console = Console(stderr=True)


class Interrupted(Exception):
    """Ctrl-C in a command that says what it kept and how to continue (main prints it and exits 130)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit or preemption, `kill`): the command stops as on Ctrl-C (checkpoints
    kept, staging folders removed, the run's lock released); main says so and exits 143."""


_sigterm_received = False  # set by _raise_terminated: a library that turns the Terminated it raised into a plain
# KeyboardInterrupt (Ray's ray.wait does) leaves no Terminated to find, but the stop was still SIGTERM's


def _raise_terminated(signum, frame) -> None:
    global _sigterm_received
    _sigterm_received = True
    raise Terminated


def by_sigterm(exc: BaseException) -> bool:
    """Whether `exc` was raised on the way out of a SIGTERM (a Terminated among its causes and contexts, or
    any stop after this command's SIGTERM handler ran)."""
    if _sigterm_received:
        return True
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Terminated):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def stopped(text: str, exc: BaseException) -> None:
    """Say what a stopped command kept and exit: 130 after Ctrl-C, 143 after SIGTERM. Of the processes a
    launcher started (torchrun: RANK set), process 0 alone says it."""
    said = os.environ.get("RANK", "0") == "0"
    if by_sigterm(exc):
        if said:
            log("stopped by SIGTERM (a scheduler's time limit or preemption, or kill)"
                + text.removeprefix("interrupted"))
        sys.exit(143)
    if said:
        log(text)
    sys.exit(130)


def interrupted_text(argv: list[str]) -> str:
    """What a command stopped by Ctrl-C says when it has nothing more specific to say."""
    if argv[1:2] == ["add-expert"]:  # its changes land together at the end (ddmkit.pipeline.grow)
        return "interrupted: the run is as it was before add-expert (nothing added); run the same command to add the data"
    if argv[1:2] == ["theory"]:  # a study in memory, written at its end (ddmkit.theory.report)
        return "interrupted: nothing was written; run the same command to start the study again"
    if argv[1:2] == ["train-expert"]:  # before training began (train_expert_cmd says what training kept)
        return "interrupted: nothing was trained; run the same command to train the expert"
    return "interrupted: what is finished is kept; run the same command to continue"


def log(msg: str) -> None:
    """A progress line on stderr, printed as it is (no rich markup: '[sample]' or 'ddmkit[ray]' stay)."""
    console.print(msg, highlight=False, soft_wrap=True, markup=False)


def _version(value: bool) -> None:
    if value:
        from ddmkit.conventions import __version__

        typer.echo(f"ddmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="print ddmkit's version and exit")):
    pass


SEED_MAX = 2**63 - 1  # ddmkit.config.MAX_SEED (that module is not imported to show --help)
COUNT_MAX = 10**9  # ddmkit.config.ROWS: the most steps a count of the config may ask for
K_MAX = 100_000  # the most clusters partition.k takes
FEW_STEPS_MAX = 32  # ddmkit.pipeline.distill.FEW_STEPS: the most segments a few-step student may have
TRAJECTORIES_MAX = 10**7  # ddmkit.pipeline.distill.MAX_TRAJECTORIES
TEACHER_STEPS_MAX = 10**6  # ddmkit.pipeline.distill.MAX_TEACHER_STEPS
# The seed of theory convergence / distill and text exactness, with the studies' offsets added (seed + 1, ...,
# seed + 100_003 * (d + 1) + 1000 * j + 7919 * i in convergence, seed + r for distill's students), goes to
# torch's manual_seed, which takes any value below 2**64 (10**20 was a traceback), and to
# np.random.default_rng, which takes any size: this bound is a conservative one well inside torch's, no
# library's own limit.
THEORY_SEED_MAX = 2**32 - 1 - 64
STUDY_SEEDS_MAX = 1000  # study misalignment trains every condition once per seed: more is no study that ends
STUDENT_SEEDS_MAX = 1000  # theory distill trains every student once per seed: more is no study that ends
WORKERS_HELP = ("parallel expert jobs (processes, local ray; default: one per job, at most one per GPU, or per CPU "
                "core without GPUs)")
BOOT_MAX = 100_000  # ddmkit.pipeline.misalignment.BOOT_MAX: bootstrap resamples of the study's intervals
RAY_ADDRESS_HELP = ("ray cluster address: auto (the cluster of this node) or HOST:6379 (its GCS address); not "
                    "a ray:// address, as Ray Client cannot stream the checkpoints back (default: a local Ray "
                    "that ddmkit starts)")


PATH_ARGUMENTS = {  # a path argument or option: what to give in its place
    "RUN": "give the run folder (the --out of `ddmkit run` or `ddmkit partition`, e.g. runs/demo), or . for the "
           "current folder",
    "SHARD": "give one shard file, e.g. RUN/partition/shards/cluster_00.safetensors (a latent run's: "
             "RUN/latents/cluster_00.safetensors)",
    "FOLDER": "give the model folder (config.json and model.safetensors) of the expert that is to replace expert "
              "K, e.g. RUN/experts/expert_03 of another run, or a `ddmkit train-expert --out` folder",
    "CONFIG": "give {what}, e.g. {example}",  # each command's, by config_argument
    "--out": "give the {what} to write, e.g. --out {example}",  # each command's, by out_option
    "--config": "give a TOML file or a built-in name, e.g. --config demo, or leave --config out",
    "--data": "give a data set name or a .npy/.npz file, e.g. --data ring8",
    "--script": "give the file for --emit to write, e.g. --script train_experts.slurm, or leave --script out "
                "(RUN/launch/train_experts.slurm)",
}


def _given_path(name: str, text: str, read=Path, **said):
    """The path argument or option `name` of PATH_ARGUMENTS as typed, read by `read` (Path; str for --data, a name
    or a path): an empty one is refused here, as Path('') is '.', the current folder, and so is one of whitespace
    only (a legal name, but never the one meant); `said` fills in PATH_ARGUMENTS[name]."""
    if not str(text).strip():
        what = "empty" if str(text) == "" else f"only whitespace ({str(text)!r})"
        raise DDMError(f"{name} is {what}: {PATH_ARGUMENTS[name].format(**said)}")
    return read(text)


def path_argument(name: str, help: str):
    """The path argument `name` of PATH_ARGUMENTS (an empty or blank one refused by _given_path)."""
    return typer.Argument(..., metavar=name, help=help, parser=lambda text: _given_path(name, text))


def config_argument(help: str, what: str = "a TOML config or a built-in name", example: str = "demo"):
    """The CONFIG argument of a command (run, sweep, text run, study misalignment), --help naming it config as
    before; an empty or blank one is refused by _given_path, naming the `what` to give and `example`."""
    return typer.Argument(..., help=help, parser=lambda text: _given_path("CONFIG", text, what=what,
                                                                          example=example))


def path_option(option: str, default, help: str, read=Path, **said):
    """A path option of a command (--out, --config, --script, --data), its default and help as given; an empty or
    blank value is refused by _given_path, `said` filling in PATH_ARGUMENTS[option]. --help shows a Path as
    <path>, as it shows a path option that typer reads itself."""
    return typer.Option(default, option, help=help, metavar="<path>" if read is Path else None,
                        parser=lambda text: _given_path(option, text, read, **said))


def out_option(default, help: str, what: str = "folder", example: Optional[str] = None):
    """The --out option of a command, its default (a Path, None, or ... when required) and help as given; an empty
    or blank value is refused by _given_path, naming the `what` to give and `example` (else the default) as a value
    that works."""
    return path_option("--out", default, help, what=what, example=example or f"{default} (the default)")


def config_option(help: str):
    """The --config option of a command (a TOML file, a built-in name or a run's config.json; default None)."""
    return path_option("--config", None, help)


def run_argument(help: str):
    """The RUN argument of a command that reads a run folder."""
    return path_argument("RUN", help)


DEVICE = typer.Option(None, "--device", help="where networks train and sample: cpu, cuda, cuda:N, mps or auto; "
                      "sets every train.device of the config (default: the config's)")
SET = typer.Option(None, "--set", metavar="FIELD=VALUE", help="set one config field, repeatable: --set "
                   "expert.train.steps=300 --set 'sample.strategies=[\"top-1\",\"full\"]' (VALUE: a TOML "
                   "value, else text)")
ANY_SET = typer.Option(None, "--set", metavar="FIELD=VALUE", help="set one config field, repeatable: --set "
                       "expert.train.steps=300 --set 'sample.strategies=[\"top-1\",\"full\"]' (VALUE: a TOML "
                       "value, else text; a text config's strategies are evaluate.strategies)")
TEXT_SET = typer.Option(None, "--set", metavar="FIELD=VALUE", help="set one field of the text config, repeatable: "
                        "--set expert.train.steps=300 --set 'evaluate.strategies=[\"top-1\",\"full\"]' (VALUE: a "
                        "TOML value, else text)")
CONFIG = "TOML config (or a built-in name, e.g. demo); it also names your own network classes"
OWN_NETWORKS = config_option("the TOML the run was made with, to import the network classes "
                             "of your own it names (nothing else of it is used)")


def _refuse_text(path: Path, command: str) -> None:
    """A text config or run given to a command of vector and image runs: one line saying so."""
    from ddmkit.pipeline.text import refuse_text

    refuse_text(path, command)


def _config(config: Optional[Path], run: Optional[Path] = None, overrides: Optional[List[str]] = None,
            device: Optional[str] = None, check_device: bool = True, sample: Optional[dict] = None):
    """A command's run configuration: the file `config` (a TOML, a built-in name or a run's config.json),
    else RUN/config.json, else the defaults; then every --set and --device applied, and validated.
    check_device=False: a --device this machine lacks is not refused (a stage that uses no device).
    sample: [sample] fields the command sets itself, in place of the config's before --set is validated.
    The user's network classes it names are imported when the TOML or a --set names them, never
    because a config.json names them (ddmkit.nets.use_network)."""
    from ddmkit.config import RunConfig, apply_overrides, builtin_config, device_overrides, load_config, validate
    from ddmkit.nets import use_network
    from ddmkit.data.features import is_user_function, use_features
    from ddmkit.nets.user import is_user_network
    from ddmkit.pipeline.checks import checked_device
    from ddmkit.pipeline.prepare import run_config

    path = None
    if config is not None:
        path = config if config.exists() or config.suffix else builtin_config(str(config))
        base = load_config(path)
    elif run is not None:
        base = run_config(run)  # no such folder, not a run, a run without its config.json: said there
    else:
        base = RunConfig()
    items, dump = list(overrides or []), base.model_dump()
    dump["sample"].update(sample or {})
    if device is not None:
        items += device_overrides(dump, device)
        if check_device:
            checked_device(device)  # before any work: a device this machine lacks is refused here
    given = " / ".join(name for name, value in (("--set", overrides), ("--device", device)) if value)
    source = given if path is None else f"{config} with {given}"  # as the user named them
    cfg = validate(RunConfig, apply_overrides(dump, items), source) if items else base
    own_file = path is not None and path.suffix != ".json"  # the user's TOML, not a run folder's config.json
    typed = {item.partition("=")[0].strip() for item in overrides or []}
    for name, net in (("expert", cfg.expert.net), ("router", cfg.router.net)):
        if is_user_network(net.arch) and (own_file or typed & {f"{name}.net", f"{name}.net.arch"}):
            use_network(net.arch, field=f"{name}.net.arch")
    if is_user_function(cfg.partition.features) and (own_file or "partition.features" in typed):
        use_features(cfg.partition.features)  # nearest routing and analyze apply it to x0_hat
    return cfg


@app.command()
def partition(out: Path = out_option(..., "run folder to create (RUN/data, RUN/partition; latent runs also "
                                     "RUN/autoencoder, RUN/latents)", "run folder", "runs/demo"),
              config: Optional[Path] = config_option(f"{CONFIG} (default: the built-in defaults)"),
              data: Optional[str] = path_option("--data", None, "data set name or .npy/.npz path (overrides "
                                                "config)", read=str),
              k: Optional[int] = typer.Option(None, min=1, max=K_MAX, help="number of clusters (overrides config)"),
              seed: Optional[int] = typer.Option(None, help="one seed for every stage, as `ddmkit run --seed` "
                                                 "(overrides config; RUN/config.json records it for the jobs)"),
              force: bool = typer.Option(False, help="replace a folder that holds a different run"),
              set_: Optional[List[str]] = ANY_SET):
    """Load the data, cluster it into K shards, write shards and a manifest (text configs: the corpus)."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.prepare import prepare_run_dir
    from ddmkit.pipeline.stages import stage_autoencoder, stage_data, stage_partition
    from ddmkit.registry import checked_data_files, checked_model_shards, read_manifest

    if config is not None and _text_kind(config):
        from ddmkit.pipeline.text import partition_text_run

        if data is not None or k is not None:
            raise DDMError("--data and --k: set corpus.source and partition.k in the text config (or with --set)")
        partition_text_run(config, out, force, seed, log, list(set_ or []))
        return
    cfg = _config(config, None, set_).with_seed(seed).model_dump()
    if data is not None:
        cfg["data"]["name"] = data
    if k is not None:
        cfg["partition"]["k"] = k
    cfg = validate(RunConfig, cfg, "options")
    made = RunFolder(out).manifest.exists() and (not cfg.latent.enabled or RunFolder(out).latent_info.exists())
    run = prepare_run_dir(out, cfg, force, log)
    stage_data(cfg, run, log)
    stage_partition(cfg, run, log)
    stage_autoencoder(cfg, run, log)  # latent runs: the shared autoencoder, and every shard encoded
    if made and not force:
        checked_model_shards(run)  # a shard lost or changed since is named, with its fix, not "nothing to do"
        checked_data_files(run)  # as is a data split changed since
        counts = read_manifest(RunFolder(run).partition)["counts"]
        log(f"partition: {run} holds this partition already (k={len(counts)}, cluster sizes {counts}); nothing to do")


def _with_train_seed(section, seed: Optional[int]):
    """An [expert] or [router] section with its training seed replaced (unchanged when seed is None)."""
    if seed is None:
        return section
    return section.model_copy(update={"train": section.train.model_copy(update={"seed": seed})})


@app.command("train-expert")
def train_expert_cmd(shard: Path = path_argument("SHARD", "one shard file, e.g. "
                                                 "RUN/partition/shards/cluster_03.safetensors (a latent run's: "
                                                 "RUN/latents/cluster_03.safetensors)"),
                     out: Path = out_option(..., "expert folder to write (new, empty or an expert's: it is "
                                            "replaced; a folder holding anything else is refused)", "expert folder",
                                            "runs/demo/experts/expert_03"),
                     config: Optional[Path] = config_option("TOML config (or a built-in name, e.g. demo, or "
                                                            "a run's config.json) whose [expert] section is used; it "
                                                            "also names your own network classes (default: the "
                                                            "built-in defaults)"),
                     seed: Optional[int] = typer.Option(None, min=0, max=SEED_MAX, help="training seed (overrides config)"),
                     checkpoint_every: Optional[int] = typer.Option(None, min=0, max=COUNT_MAX, help="write a "
                                                                    "checkpoint every N steps (0: none; overrides "
                                                                    "config)"),
                     resume: bool = typer.Option(False, help="continue from OUT.checkpoint.safetensors if a killed run left one"),
                     force: bool = typer.Option(False, help="replace an expert in OUT trained with other settings "
                                                "(or train the same one again)"),
                     nproc: int = typer.Option(1, "--nproc", min=1, help="processes (one per GPU with CUDA) on this machine "
                                               "for this one expert, data parallel; the batch size stays the global one. "
                                               "Under torchrun leave it out"),
                     device: Optional[str] = DEVICE,
                     set_: Optional[List[str]] = SET):
    """Train one expert on one shard, in isolation: it reads that file and nothing else."""
    from ddmkit.config import ExpertConfig, validate
    from ddmkit.train.jobs import train_expert_once

    if config is not None and (_text_kind(config) or _text_run(config.parent)):
        from ddmkit.pipeline.text import read_text_config, train_text_expert

        if nproc != 1:
            raise DDMError(f"--nproc {nproc}: text experts train in one process, on the text config's `threads` CPU "
                           "threads; leave --nproc out (and raise `threads` in the text config for more)")
        _text_device(device)
        given = [name for name, value in (("--seed", seed), ("--checkpoint-every", checkpoint_every),
                                          ("--set", set_ or None)) if value is not None]
        if given:
            raise DDMError(f"{', '.join(given)}: text experts take their settings from the text config (seed + "
                           "cluster) and train without checkpoints; leave them out, and set them in the text config "
                           "(`ddmkit run TEXT_CONFIG --set ...` when making the run)")
        if resume:  # SLURM scripts pass it to every task
            log("note: text experts write no checkpoints, so --resume has nothing to continue: this job trains from "
                "the start")
        from ddmkit.io import sha256_file
        from ddmkit.train.jobs import check_expert_folder

        check_expert_folder(out, "--out")  # the folder is replaced: one of the user's files is refused, as below
        weights = out / "model.safetensors"
        before = sha256_file(weights) if weights.is_file() else None
        try:
            train_text_expert(shard, read_text_config(config), out, given=True)
        except KeyboardInterrupt:
            raise Interrupted("interrupted: nothing was written (text experts write no checkpoints); run the same "
                              "command to train it from the start") from None
        if before is not None and sha256_file(weights) == before:
            log(f"{out}: this expert is trained already (the same settings and shard); nothing to do")
        else:
            log(f"expert written to {out}")
        return
    from ddmkit.nets.folders import check_argument_sizes
    from ddmkit.nets.user import is_user_network
    from ddmkit.pipeline.prepare import check_config_file
    from ddmkit.pipeline.stages import check_expert_fits
    from ddmkit.registry import check_shard_for_slot, check_shard_space

    run_cfg = _config(config, None, set_, device)
    if config is not None:
        check_config_file(config)  # a run's config.json edited since the run was made: refused before training
    check_shard_space(shard, run_cfg.latent.enabled)
    check_shard_for_slot(shard, out)  # another run's shard, or another cluster's, into a run's expert slot
    check_expert_fits(run_cfg, shard)  # a UNet's levels or a DiT's patch against the shard's (latent) sides
    cfg = run_cfg.expert
    if not is_user_network(cfg.net.arch):  # a depth of 10**20 was built, layer by layer, for ever
        check_argument_sizes(cfg.net.kwargs, "expert.net")
    upd = {k: v for k, v in (("seed", seed), ("checkpoint_every", checkpoint_every)) if v is not None}
    cfg = validate(ExpertConfig, {**cfg.model_dump(), "train": {**cfg.train.model_dump(), **upd}}, "options")
    try:
        trained = train_expert_once(shard, cfg, out, nproc, resume=resume, force=force, log=log)
    except KeyboardInterrupt:
        raise Interrupted(expert_interrupted_text(out, cfg.train.checkpoint_every)) from None
    if trained:
        log(f"expert written to {out}")


def expert_interrupted_text(out: Path, checkpoint_every: int) -> str:
    """What train-expert stopped while training says: --resume only where a checkpoint is there to continue,
    and how to write checkpoints only where checkpoint_every (the steps between two) is 0, none."""
    from ddmkit.train.jobs import checkpoint_path

    if checkpoint_path(out).is_file():
        return "interrupted: its last checkpoint is kept; run the same command with --resume to continue from it"
    hint = ": --checkpoint-every N writes one every N steps" if checkpoint_every == 0 else ""
    return (f"interrupted: nothing was written (no checkpoint yet{hint}); run the same command to train the expert "
            "from the start")


@app.command("train-router")
def train_router_cmd(run: Path = run_argument("run folder with partition/"),
                     config: Optional[Path] = config_option(f"{CONFIG} (default: the run's)"),
                     seed: Optional[int] = typer.Option(None, min=0, max=SEED_MAX, help="training seed: the run's "
                                                        "router.train.seed; another is refused, as any other "
                                                        "training setting"),
                     device: Optional[str] = DEVICE,
                     set_: Optional[List[str]] = SET):
    """Train the router p(cluster | x_t, t) on noised shard data (text runs: on windows of the shards)."""
    from ddmkit.ddm.load import run_folder
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.prepare import check_same_training
    from ddmkit.pipeline.stages import run_lock, stage_router

    if _text_run(run):
        from ddmkit.pipeline.text import train_text_router

        _no_text_overrides(run, config, seed, device, set_)
        train_text_router(run, log)
        return
    run_folder(run)  # a run folder that exists (its lock would make it)
    cfg = _config(config, run, set_, device)
    cfg = cfg.model_copy(update={"router": _with_train_seed(cfg.router, seed)})
    # --seed / --set / --config may change how the job runs, not what it trains (the seed is a trained setting)
    check_same_training(run, cfg, _training_options(seed, config, set_))
    with run_lock(run):  # a writer holding the run refuses this command first
        if (RunFolder(run).router / "model.safetensors").exists():
            log(f"router: {run / 'router'} is trained already; remove that folder to train it again")
            return
        _keeping_registered(cfg, run, lambda: stage_router(cfg, run, log))


def _training_options(seed: Optional[int] = None, config: Optional[Path] = None, set_: Optional[list] = None) -> str:
    """The options given to train-router / train-monolith / launch that could have changed a trained setting, for
    its error: those given alone ("--seed", "--seed / --set"); "--set / --config" where none was (the run's own
    config.json then, which differs from itself in nothing)."""
    given = [name for name, value in (("--seed", seed), ("--set", set_), ("--config", config)) if value]
    return " / ".join(given or ["--set", "--config"])


def _keeping_registered(cfg, run: Path, train) -> None:
    """train() on a run; a registered run stays registered: its registry checked first (a file changed
    since is refused), then rewritten with what train() made."""
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.stages import stage_registry
    from ddmkit.registry import check_registered

    registered = RunFolder(run).registry.exists()
    if registered:
        check_registered(run)
    train()
    if registered:
        stage_registry(cfg, run, log)


@app.command("train-monolith")
def train_monolith_cmd(run: Path = run_argument("run folder with partition/"),
                       config: Optional[Path] = config_option(f"{CONFIG} (default: the run's)"),
                       seed: Optional[int] = typer.Option(None, min=0, max=SEED_MAX, help="training seed: the run's "
                                                          "expert.train.seed; another is refused, as any other "
                                                          "training setting"),
                       device: Optional[str] = DEVICE,
                       set_: Optional[List[str]] = SET):
    """Train the FLOP-matched monolith baseline on all shards (text runs: the centralized model), also in a
    run whose config has monolith.enabled = false (that setting is for `ddmkit run`)."""
    from ddmkit.ddm.load import run_folder
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.prepare import check_same_training
    from ddmkit.pipeline.stages import run_lock, stage_monolith

    if _text_run(run):
        from ddmkit.pipeline.text import train_text_monolith

        _no_text_overrides(run, config, seed, device, set_)
        train_text_monolith(run, log)
        return
    run_folder(run)  # a run folder that exists (its lock would make it)
    cfg = _config(config, run, set_, device)
    cfg = cfg.model_copy(update={"expert": _with_train_seed(cfg.expert, seed)})  # the monolith's seed
    # --seed / --set / --config may change how the job runs, not what it trains (the seed is a trained setting)
    check_same_training(run, cfg, _training_options(seed, config, set_))
    monolith = RunFolder(run).monolith
    if (monolith / "model.safetensors").exists():
        log(f"monolith: {monolith} is trained already; remove that folder to train it again")
        return
    asked = {"monolith": cfg.monolith.model_copy(update={"enabled": True})}
    with run_lock(run):
        _keeping_registered(cfg, run, lambda: stage_monolith(cfg.model_copy(update=asked), run, log))


@app.command()
def sample(run: Path = run_argument("run folder with experts/ and router/ (any kind of data)"),
           strategy: List[str] = typer.Option(["top-2"], help=f"what to sample, repeatable: a routing strategy "
                                              f"({SAMPLED_STRATEGY_FORMS}), 'monolith', or 'exact' "
                                              "(Gaussian mixtures)"),
           n: Optional[int] = typer.Option(None, min=1, help="number of samples (default: the config's sample.n)"),
           steps: Optional[int] = typer.Option(None, min=1, help="solver steps (default: the config's sample.steps; "
                                               "the adaptive solver chooses its own)"),
           solver: Optional[str] = typer.Option(None, help="euler, heun, midpoint, rk4 or adaptive (default: the "
                                                "config's sample.solver)"),
           seed: Optional[int] = typer.Option(None, min=0, max=SEED_MAX, help="noise seed (default: the config's sample.seed)"),
           guidance: Optional[float] = typer.Option(None, help="classifier-free guidance inside each "
                                                    "class-conditional expert (images with labels; default: "
                                                    "the config's sample.guidance)"),
           router_every: Optional[int] = typer.Option(None, min=1, help="call the router every m velocity evaluations "
                                                      "and reuse its routing in between (a heun or midpoint step is 2 "
                                                      "evaluations, rk4 4; 1: every evaluation; default: the "
                                                      "config's)"),
           router: Optional[str] = typer.Option(None, help="learned (RUN/router) or statistics: route by the "
                                                "islands' published cluster statistics, no router trained (sets "
                                                "named 'NAME (statistics-only router)'); default: the run's router "
                                                "(a run grown with `add-expert --router stats`: its statistics)"),
           batch_size: Optional[int] = typer.Option(None, min=1, help="integrate the samples in chunks of this many rows "
                                                    "(default: the config's sample.batch_size)"),
           cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                                      help="on a GPU, replay the networks from CUDA graphs (pays at "
                                                      "batches up to a few thousand rows; ignored on the CPU; "
                                                      "default: the config's, off)"),
           cuda_streams: Optional[bool] = typer.Option(None, "--cuda-streams/--no-cuda-streams",
                                                       help="on a GPU, run a step's experts on concurrent CUDA "
                                                       "streams (with --cuda-graphs, a set of graphs per expert; "
                                                       "ignored on the CPU; default: the config's, on)"),
           config: Optional[Path] = config_option(f"{CONFIG} (default: the run's)"),
           device: Optional[str] = DEVICE,
           set_: Optional[List[str]] = SET):
    """Sample with routing strategies; writes RUN/samples/NAME.safetensors (text runs: RUN/samples/text.json, and
    their raw bytes, base64, in RUN/samples/text_bytes.json)."""
    from ddmkit.config import RunConfig, SampleConfig, validate
    from ddmkit.config_messages import fix_as_option

    if router is not None:
        from ddmkit.pipeline.run import sampling_router

        sampling_router(router)  # before the run is read; '' too (it was taken for the default)
    if _text_run(run):
        from ddmkit.pipeline.text import sample_text

        _no_text_overrides(run, config, None, device, set_)
        if router not in (None, "learned"):
            raise DDMError(f"--router {router}: a text run samples with each router of its config's router.kinds "
                           "(sets named 'bayes / ...', 'learned / ...'); leave --router out")
        _not_for_text({"--solver": solver, "--guidance": guidance, "--router-every": router_every,
                       "--batch-size": batch_size, "--cuda-graphs": cuda_graphs, "--cuda-streams": cuda_streams},
                      "byte-level models sample on the CPU without an ODE solver, guidance or batching")
        from ddmkit.discrete.config import TextSampleConfig

        _check_sample_counts(TextSampleConfig, {"n": n, "steps": steps})
        sample_text(run, strategy, n=n, seed=seed, log=log, steps=steps)
        return
    from ddmkit.pipeline.run import sample_run
    from ddmkit.pipeline.samplesets import EXACT

    _check_sample_counts(SampleConfig, {"n": n, "steps": steps, "batch_size": batch_size,
                                        "router_every": router_every})
    _check_guidance(SampleConfig, guidance)
    if router == "learned":
        _check_learned_router(run)
    not_drawn = {"stats_router_strategies": [], "guidance_sweep": []}  # sets `ddmkit run` draws, this command not
    cfg = _config(config, run, set_, device, sample={"strategies": [], **not_drawn})  # the sets: checked below
    upd = {k: v for k, v in (("n", n), ("steps", steps), ("solver", solver), ("seed", seed), ("guidance", guidance),
                             ("router_every", router_every), ("batch_size", batch_size),
                             ("cuda_graphs", cuda_graphs), ("cuda_streams", cuda_streams)) if v is not None}
    upd["strategies"] = [name for name in strategy if name.strip() not in ("exact", EXACT)]  # the names a config checks
    try:  # with the sets this command draws, not the config's
        cfg = validate(RunConfig, {**cfg.model_dump(), "sample": {**cfg.sample.model_dump(), **not_drawn, **upd}},
                       "options")
    except DDMError as e:  # the config's sample.* fields, in the words of this command's options
        said = str(e).replace("options: invalid configuration", "invalid option")
        for key, value in upd.items():  # the fields given as options, named as the options
            option = f"--{'strategy' if key == 'strategies' else key.replace('_', '-')}"
            said = said.replace(f"sample: {key} = {value!r}", f"{option} {value}")  # the section's: --solver adaptive
            # a value that works, given as this option (give --solver euler), not as --set sample.solver=euler
            said = fix_as_option(said, f"sample.{key}", option)
            # the field's name alone (use euler ... or leave them out of --strategy), not a value typed ('sample.nope')
            said = re.sub(rf"(?<![\w.'\"])sample\.{key}(?![\w.])", option, said)
        lines = said.splitlines()
        raise DDMError(lines[1].strip() if len(lines) == 2 else said) from None  # one bad value: one line
    if guidance is not None and guidance != 1.0 and not cfg.expert.net.kwargs.get("num_classes"):
        raise DDMError(f"--guidance {guidance:g}: classifier-free guidance needs class-conditional experts "
                       "(expert.net.kwargs.num_classes); this run's are unconditional, so every scale draws the same "
                       "samples: leave --guidance out (or give 1)")
    _check_sample_memory(run, cfg.sample.n)
    router = "learned" if router is None else router
    sample_run(run, list(strategy), cfg, log, router=router)  # logs each set's calls and seconds


def _check_guidance(section, guidance: float | None) -> None:
    """--guidance within the range of the section's guidance field, refused in one line with the range and a value
    that works (pydantic's "Input should be greater than or equal to 0" gave neither)."""
    bounds = {key: getattr(m, key) for m in section.model_fields["guidance"].metadata for key in ("ge", "le")
              if hasattr(m, key)}
    if guidance is not None and not bounds["ge"] <= guidance <= bounds["le"]:  # nan and inf too
        raise DDMError(f"--guidance: {guidance:g} is outside {bounds['ge']:g} to {bounds['le']:g}; give a scale from "
                       f"{bounds['ge']:g} to {bounds['le']:g} (1: no guidance, the default; e.g. --guidance 2)")


def _check_sample_counts(section, counts: dict) -> None:
    """Each count given to `ddmkit sample` within its config field's bound, refused in the words of `ddmkit analyze`
    ("--n = N: must be at most 1,000,000,000"), not pydantic's ("Input should be less than or equal to ...")."""
    from ddmkit.config import check_count, upper_bound

    for key, value in counts.items():  # section: the config section (pydantic model) of the fields
        if value is not None:
            check_count(f"--{key.replace('_', '-')}", value, 1, upper_bound(section, key))


@app.command()
def evaluate(run: Path = run_argument("run folder with samples/ (any kind of data)"),
             config: Optional[Path] = config_option(f"{CONFIG} (default: the run's)"),
             device: Optional[str] = DEVICE,
             set_: Optional[List[str]] = SET):
    """Scores of every sampled set (W2 and the truth's scores, or FID/KID for images, or bits per byte
    for text), router accuracy, plots and report.md."""
    if _text_run(run):
        from ddmkit.pipeline.text import evaluate_text

        _no_text_overrides(run, config, None, device, set_)
        evaluate_text(run, log=log)
        return
    from ddmkit.pipeline.run import evaluate_stage
    from ddmkit.config import run_device

    cfg = _config(config, run, set_, device)
    evaluate_stage(cfg, run, log, run_device(cfg))


@app.command()
def analyze(run: Path = run_argument("trained run folder (experts/, router/, partition/)"),
            out: Optional[Path] = out_option(None, "output folder (default RUN/analysis)", "folder",
                                             "runs/demo/analysis"),
            strategy: Optional[List[str]] = typer.Option(None, help="routing strategy, repeatable (default: full, "
                                                         "top-1, top-2, sample-2, the run's threshold-P (else "
                                                         "threshold-0.05), switch, oracle, nearest, adaptive-0.9, "
                                                         "adaptive-ent-0.5, gated-2@30)"),
            n: Optional[int] = typer.Option(None, help="trajectories per strategy (default 1000; the time grows "
                                            "with it, so a smaller --n is quicker; text runs: held-out windows "
                                            "per cluster, default the run's)"),
            seed: Optional[int] = typer.Option(None, help="noise seed (default: the run's)"),
            max_steps: Optional[int] = typer.Option(None, help="steps at which Jacobians are measured (default 20)"),
            jvp_rows: Optional[int] = typer.Option(None, help="trajectories on which Jacobians are measured "
                                                   "(default 128)"),
            device: Optional[str] = typer.Option(None, "--device", help="where the networks and every tensor of "
                                                 "the analysis live: cpu, cuda, cuda:N, mps or auto (default: "
                                                 "the run's expert.train.device)"),
            config: Optional[Path] = config_option("the TOML the run was made with, to import the "
                                                   "network classes of your own it names (the settings are the "
                                                   "run's; --device picks where it runs)")):
    """Stability vs expert-data alignment diagnostics; writes analysis.md, analysis.json, plots/
    (text runs: each expert's bits per byte on every cluster, and the router's weight on the true one)."""
    if _text_run(run):
        from ddmkit.pipeline.text import analyze_text

        _no_text_overrides(run, config, None, device)
        _not_for_text({"--max-steps": max_steps, "--jvp-rows": jvp_rows},
                      "it measures no Jacobians; it takes --strategy, --n (held-out windows per cluster) and --seed")
        analyze_text(run, out, log=log, strategies=strategy, n=n, seed=seed)
        return
    from ddmkit.pipeline.analyze import analyze_run

    if config is not None:
        _config(config)  # registers the config's own network classes

    defaults = {"n": 1000, "max_steps": 20, "jvp_rows": 128}
    given = {name: value for name, value in (("n", n), ("max_steps", max_steps), ("jvp_rows", jvp_rows))
             if value is not None}
    analyze_run(run, out, strategy, seed=seed, device=device, log=log, **{**defaults, **given})


@app.command()
def run(config: Path = config_argument("TOML config, or a built-in name (demo)"),
        out: Optional[Path] = out_option(None, "run folder (default runs/run; a text config: runs/<config "
                                         "name>, as `ddmkit text run`)", "run folder", "runs/demo"),
        seed: Optional[int] = typer.Option(None, help="one seed for every stage (overrides config)"),
        force: bool = typer.Option(False, help="replace a folder that holds a different run"),
        backend: str = typer.Option("inline", help="where experts train: inline, processes or ray"),
        workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
        address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
        stages: str = typer.Option("all", help="train (data, partition, experts, monolith, router, registry), "
                                   "evaluate (sampling, scores, report: needs the trained networks) or all"),
        device: Optional[str] = DEVICE,
        set_: Optional[List[str]] = ANY_SET):
    """Every stage: data, partition, experts, monolith, router, sampling, evaluation, report.

    A TOML with `kind = "text_ar"` or `"text_dfm"` runs the text pipeline (see `ddmkit text --help`)."""
    from ddmkit.launch import check_backend
    from ddmkit.pipeline.run import run_pipeline

    if _text_kind(config):
        from ddmkit.pipeline.text import run_text

        _text_device(device)
        given = [name for name, value, default in (("--backend", backend, "inline"), ("--workers", workers, None),
                                                    ("--address", address, None), ("--stages", stages, "all"))
                 if value != default]
        if given:
            raise DDMError(f"{', '.join(given)}: a text run trains on the CPU, inline, every stage in one command; "
                           "leave them out (one expert per node: `ddmkit launch RUN --emit slurm`)")
        run_text(config, out, force, seed, log=log, overrides=list(set_ or []))
        return
    check_backend(backend)
    try:
        run_pipeline(_config(config, None, set_, device).with_seed(seed), out or Path("runs/run"), force, log,
                     backend, workers, address, stages)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: what is finished is kept; run the same command to continue (a training job "
                          "that left a checkpoint continues from it)") from None


@app.command()
def sweep(config: Path = config_argument("TOML config, or a built-in name (demo)"),
          out: Path = out_option(Path("runs/sweep"), "folder of the sweep's run folders and report"),
          k: List[int] = typer.Option(..., "--k", help="number of clusters, repeatable (e.g. --k 2 --k 4 --k 8)"),
          budget: List[float] = typer.Option(..., "--budget", help="training compute in units of the config's "
                                             "(K_ref x steps x batch), repeatable (e.g. --budget 0.25 --budget 1)"),
          seed: List[int] = typer.Option([0], "--seed", help="training seeds, repeatable: each at the smallest and "
                                         "largest budget, the first elsewhere"),
          all_seeds: bool = typer.Option(False, help="every seed at every budget"),
          monolith_k: Optional[int] = typer.Option(None, "--monolith-k", help="the K whose cells train the "
                                                   "FLOP-matched monolith (default: the config's partition.k if "
                                                   "in --k, else the first --k); give it when a grid is run in "
                                                   "parts, e.g. --monolith-k 8 with --k 16 alone"),
          force: bool = typer.Option(False, help="score finished cells again (their trained networks are kept) and "
                                     "replace cell folders that hold different runs"),
          stages: str = typer.Option("all", help="train (every cell, no report), evaluate (score cells trained "
                                     "before, write the report), all, or report (only the report, from every "
                                     "cell's metrics.json: cells scored on other machines; it uses no device: "
                                     "it takes a --device this machine lacks)"),
          partial: bool = typer.Option(False, help="with --stages report: report the cells scored so far, "
                                       "naming the others (a grid still being measured)"),
          scale: str = typer.Option("batch", help="how each K's experts take a budget: batch (budget x steps "
                                    "at batch x K_ref / K: every K trains the same steps, the global batch "
                                    "split over the experts, as in the DDM paper) or steps (round(budget x "
                                    "steps x K_ref / K) steps at the config's batch)"),
          backend: str = typer.Option("inline", help="where experts train: inline, processes or ray"),
          workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
          device: Optional[str] = DEVICE,
          set_: Optional[List[str]] = SET):
    """Quality against training compute: a DDM per K and its FLOP-matched monolith at several budgets and
    seeds, one run folder per cell (resumable), and OUT/sweep.md with a table, a plot and the compute at
    which the best DDM reaches the monolith's final quality."""
    _refuse_text(config, "sweep")
    from ddmkit.launch import check_backend
    from ddmkit.pipeline.sweep import ratio_text, sweep as run_sweep

    check_backend(backend)
    cfg = _config(config, None, set_, device, check_device=stages != "report")  # the report uses no device
    report = run_sweep(cfg, out, list(k), list(budget), list(seed), all_seeds, force,
                       log, backend, workers, stages, monolith_k, partial, scale)
    if report is None:
        return
    for kk, ratio in report["compute_ratio"].items():
        log(f"K={kk}: compute at which its best, {report['best'][kk]}, reaches the monolith's final "
            f"{report['metric']}: "
            f"{ratio_text(ratio, report['compute_smallest'][kk], report['unscored'][kk])}")


@app.command()
def launch(run_dir: Path = run_argument("run folder with partition/"),
           backend: str = typer.Option("inline", help="inline, processes or ray"),
           workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
           address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
           emit: Optional[str] = typer.Option(None, help="write a scheduler script instead of training: slurm (default: train here)"),
           script: Optional[Path] = path_option("--script", None, "where --emit writes (default "
                                                "RUN/launch/train_experts.slurm)"),
           time: Optional[str] = typer.Option(None, help="slurm --time per expert (default 24:00:00)"),
           cpus: Optional[int] = typer.Option(None, help="slurm --cpus-per-task (default 4)"),
           gpus: Optional[int] = typer.Option(None, help="slurm GPUs per expert (0: none; default 1)"),
           mem: Optional[str] = typer.Option(None, help="slurm --mem, with its unit (default 16G)"),
           partition_name: Optional[str] = typer.Option(None, "--partition", help="slurm partition (default: the cluster's)"),
           expert: Optional[List[int]] = typer.Option(None, "--expert", help="slurm: a task for this expert only "
                                                      "(repeat for several: --expert 0 --expert 1, e.g. the shards one "
                                                      "organisation trains; default: every expert not trained yet)"),
           config: Optional[Path] = config_option(f"{CONFIG} (default: the run's; not with --emit)"),
           device: Optional[str] = DEVICE,
           set_: Optional[List[str]] = SET):
    """Train the run's missing experts on a backend, or emit a SLURM job array (one task per expert; the
    --set expert.* fields given, of how the jobs run, are written into its tasks' command lines)."""
    from ddmkit.launch import check_concurrent_backend, check_launch
    from ddmkit.pipeline.prepare import check_same_training
    from ddmkit.pipeline.stages import run_lock, stage_autoencoder, stage_experts, stage_registry
    from ddmkit.registry import check_registered

    slurm = {"time": time, "cpus": cpus, "gpus": gpus, "mem": mem, "partition": partition_name}
    if emit is not None:
        from ddmkit.launch import check_emit, write_slurm_script
        from ddmkit.launch.slurm import DEFAULT_CPUS, check_resources, task_notes

        check_emit(emit, {"--backend": None if backend == "inline" else backend, "--workers": workers,
                          "--address": address, "--config": config, "--device": device})
        check_resources("24:00:00" if time is None else time, DEFAULT_CPUS if cpus is None else cpus,
                        1 if gpus is None else gpus, "16G" if mem is None else mem,
                        partition_name)  # before anything, also when every expert is trained
        if _text_run(run_dir):
            _no_text_overrides(run_dir, None, None, None, set_)
        else:
            experts = [item for item in set_ or [] if item.strip().startswith("expert.")]  # the others: below
            task_cfg = _config(None, run_dir, experts)
            check_same_training(run_dir, task_cfg, _training_options(set_=experts))  # as launch: how tasks run
        with run_lock(run_dir):
            path = write_slurm_script(run_dir, script, set_ or [], expert or None,
                                      **{k: v for k, v in slurm.items() if v is not None})
        if path is None:
            which = f"the experts asked ({', '.join(map(str, sorted(set(expert))))}) of" if expert else "the experts of"
            log(f"{which} {run_dir} are all trained; no script written (remove an expert's folder to train it "
                "again)")
        else:
            log(f"wrote {path} (the experts not trained yet); submit it with: sbatch {shlex.quote(str(path))}")
            if shutil.which("sbatch") is None:
                log("note: sbatch is not on this machine's PATH; submit the script on a node of the cluster that "
                    f"sees {run_dir.resolve()} and {sys.executable} at these paths (the script names them)")
            for note in [] if _text_run(run_dir) else task_notes(task_cfg, cpus, gpus):
                log(f"note: {note}")
        return
    asked = {**slurm, "script": script, "expert": expert}
    given = [f"--{name}" for name, value in asked.items() if value not in (None, [])]
    if given:
        raise DDMError(f"{', '.join(given)}: options of the SLURM script; add --emit slurm, or leave them out")
    check_launch(backend, workers, address)
    if _text_run(run_dir):
        from ddmkit.pipeline.text import train_text_experts
        from ddmkit.registry import write_registry

        _no_text_overrides(run_dir, config, None, device, set_)
        if backend != "inline":
            raise DDMError(f"--backend {backend}: text experts train inline, or one per node with "
                           "`ddmkit launch RUN --emit slurm`; use --backend inline")
        with run_lock(run_dir):
            check_registered(run_dir)
            train_text_experts(run_dir, log)
            write_registry(run_dir)
        return
    cfg = _config(config, run_dir, set_, device)
    # --set / --config may change how the jobs run, not what they train
    check_same_training(run_dir, cfg, _training_options(None, config, set_))
    check_concurrent_backend(cfg.expert.concurrent, backend, workers, address)
    check_registered(run_dir)  # a registered file changed since is refused, not registered again
    try:
        stage_autoencoder(cfg, run_dir, log)  # latent runs: encode the shards first (once)
        stage_experts(cfg, run_dir, log, backend, workers, address)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: the finished experts are kept; run the same command to train the others (a "
                          "job that left a checkpoint continues from it)") from None
    stage_registry(cfg, run_dir, log)


@app.command()
def register(run_dir: Path = run_argument("run folder with partition/, experts/, router/"),
             config: Optional[Path] = OWN_NETWORKS):
    """Write RUN/registry.json: SHA-256 of every model folder, shard hashes, version, time convention."""
    from ddmkit.ddm.load import check_loadable, run_folder
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.prepare import run_config
    from ddmkit.pipeline.stages import run_lock
    from ddmkit.registry import checked_model_shards, model_shards, write_registry

    run_folder(run_dir)  # a run folder that exists (its lock would make it)
    if not (run_dir / "partition").is_dir():
        run_config(run_dir)  # a folder of other files, or one inside a run, is named as such
    if config is not None:
        _config(config)  # registers the config's own network classes
    saved = None if _text_run(run_dir) else run_config(run_dir)  # read, and checked, before anything is written
    with run_lock(run_dir):
        check_loadable(run_dir)  # a folder the DDM could not load is refused here, not when it samples
        # a shard changed since it was written is named as verify names it (not "experts of another partition");
        # a run without its shards (the experts gathered, the data kept on the islands) is registered
        checked_model_shards(run_dir, [c for c, path in enumerate(model_shards(run_dir)) if path.exists()])
        reg = write_registry(run_dir)
    log(f"registry: {len(reg['models'])} model folders recorded in {run_dir / 'registry.json'}")
    if saved is not None:  # experts trained otherwise than the run's [expert] section, as the report notes them
        from ddmkit.pipeline.models import describe_models

        for note in describe_models(run_dir, saved)[1]:
            if note.startswith("expert "):
                log(f"note: {note}")
    listed = {m["cluster"] for m in reg["models"] if m["role"] == "expert"}
    missing = [c for c in range(reg["k"]) if c not in listed]
    if missing:
        log(f"registry: experts {missing} of {reg['k']} are missing (no experts/expert_XX/model.safetensors"
            f"{RunFolder(run_dir).missing_expert_hints(missing)}): the DDM samples without them; train or copy them, "
            "then `ddmkit register` again")
        if (run_dir / "experts" / "model.safetensors").exists():  # `cp -r FOLDER/ RUN/experts` copied the files
            log(f"note: {run_dir / 'experts'} holds a model.safetensors itself: an expert's files go in its own "
                f"folder, {run_dir / 'experts' / 'expert_XX'} (e.g. cp -r FOLDER {run_dir / 'experts' / 'expert_02'})")


@app.command()
def verify(run_dir: Path = run_argument("run folder with registry.json"),
           allow_missing: bool = typer.Option(False, help="accept experts that are missing (a DDM sampled without "
                                              "them: docs/distributed.md)")):
    """Check every model folder against RUN/registry.json, every shard against the partition, every data file
    against data/data.json and RUN/config.json's trained settings against the SHA-256 it records.

    Exit status 2 on a mismatch or a missing expert."""
    from ddmkit.ddm.load import check_loadable
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.prepare import run_config
    from ddmkit.registry import verify_registry

    res = verify_registry(run_dir, shards=True)
    if (run_dir / "config.json").exists() and not _text_run(run_dir):
        run_config(run_dir)  # its trained settings are those the run was made with (not edited since)
    check_loadable(run_dir)  # verified files, read as the DDM will read them
    hints = RunFolder(run_dir).missing_expert_hints(res["missing"])
    if res["missing"] and not allow_missing:
        raise DDMError(f"{run_dir}: experts {res['missing']} are missing (no experts/expert_XX/model.safetensors"
                       f"{hints}); train or copy them again, or pass --allow-missing to accept the DDM without them")
    log(f"verified {len(res['verified'])} model folders"
        + (f"; missing experts {res['missing']}{hints}" if res["missing"] else ""))


@app.command()
def demo(out: Path = out_option(Path("demo_out"), "output folder"),
         seed: Optional[int] = typer.Option(None, help="one seed for every stage (default: the config's)"),
         backend: str = typer.Option("processes", help="where experts train: inline, processes or ray"),
         workers: Optional[int] = typer.Option(None, help="parallel expert jobs (default: one per CPU core)"),
         force: bool = typer.Option(False, help="replace a folder that holds a different run"),
         device: Optional[str] = DEVICE,
         set_: Optional[List[str]] = SET):
    """The built-in ring-of-8 run, end to end on a CPU in a few minutes; writes report.md."""
    from ddmkit.config import builtin_config
    from ddmkit.launch import check_backend
    from ddmkit.pipeline.run import run_pipeline

    check_backend(backend)
    cfg = _config(builtin_config("demo"), None, set_, device).with_seed(seed)
    result = run_pipeline(cfg, out, force, log, backend, workers)
    _print_summary(result)
    console.print(f"[bold green]demo finished[/]: open {escape(str(out / 'report.md'))}", highlight=False, soft_wrap=True)


def _print_summary(result: dict) -> None:
    from rich.table import Table

    table = Table(title="samples per strategy")
    for col in ("strategy", "W2/floor", "NLL", "modes hit", "expert calls/sample", "wall (s)"):
        table.add_column(col)
    for name, r in result["rows"].items():
        table.add_row(name, f"{r['w2_over_floor']:.2f}", f"{r.get('nll', float('nan')):.3f}",
                      f"{r.get('modes_hit', float('nan')):.2f}", f"{r.get('expert_calls_per_sample', 0):.1f}",
                      f"{r.get('wall_time', 0):.2f}")
    Console().print(table)


def _text_kind(config: Path) -> bool:
    """Whether a config file declares a text pipeline (top-level `kind = "text_..."`)."""
    from ddmkit.discrete.config import is_text_config

    return is_text_config(config)


def _text_device(device: Optional[str]) -> None:
    """--device for a text run: left out, cpu or auto (text runs train and sample on the CPU)."""
    if device not in (None, "cpu", "auto"):
        raise DDMError(f"--device {device}: text runs train and sample on the CPU; leave --device out (or give cpu)")


def _no_text_overrides(run: Path, config: Optional[Path], seed: Optional[int], device: Optional[str] = None,
                       overrides: Optional[List[str]] = None) -> None:
    """Refuse --config, --seed and --set on a text run (its settings are its config.json), naming the commands
    that change them: `ddmkit run` of that config.json with --set, into the run (sample and evaluate settings:
    the models are kept) or into a new folder (the settings of what it trains)."""
    _text_device(device)
    given = [name for name, value in (("--config", config), ("--seed", seed), ("--set", overrides or None))
             if value is not None]
    if given:
        saved = run / "config.json"
        raise DDMError(f"{', '.join(given)}: a trained text run keeps the text config it was made with ({saved}); "
                       f"to change its sample or evaluate settings, run `ddmkit run {saved} --out {run} --set "
                       f"FIELD=VALUE` (the trained models are kept); for other settings make a new run: "
                       f"`ddmkit run {saved} --out NEW_RUN --set FIELD=VALUE`")


def _not_for_text(options: dict, why: str) -> None:
    """Refuse the options given (a value other than their default None: --no-cuda-streams too) that a
    text run has no use for."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise DDMError(f"{', '.join(given)}: not used by a text run ({why}); leave them out")


def _text_run(run: Path) -> bool:
    """Whether a run folder holds a text run. One whose config.json cannot be read is taken for a vector or image
    run (the command then reads it through run_config, whose error names the fix), unless its partition is of
    text: then that error is a text run's (ddmkit.discrete.config.is_text_run)."""
    from ddmkit.discrete.config import text_partition
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.text import is_text_run

    try:
        return is_text_run(run)
    except DDMError:
        if text_partition(RunFolder(run)):
            raise
        return False


def _check_sample_memory(run: Path, n: int) -> None:
    """pipeline.checks.check_sample_memory of --n on the run's data (RUN/data/data.json): a DDMError naming --n
    and an --n that fits, when a set's noise and samples alone outgrow this machine's available memory."""
    from ddmkit.layout import RunFolder
    from ddmkit.pipeline.checks import check_sample_memory
    from ddmkit.pipeline.stages import read_data_info

    folder = RunFolder(run)
    try:
        shape = read_data_info(folder)["data_shape"] if folder.data_info.exists() else None
    except DDMError:  # a damaged data.json: named, with its fix, where the run is loaded
        return
    if shape is not None:
        check_sample_memory(n, shape, "--n", "give --n {n} or less")


def _check_learned_router(run: Path) -> None:
    """`--router learned` given on a run that has no learned router and routes by the islands' statistics
    (grown with `add-expert --router stats`): refused, rather than routed by the statistics."""
    from ddmkit.ddm.load import recorded_router
    from ddmkit.layout import RunFolder

    folder = RunFolder(run)
    if folder.root.is_dir() and not (folder.router / "model.safetensors").exists() \
            and recorded_router(run) == "statistics":
        raise DDMError(f"--router learned: {folder.root} has no learned router (grown with `ddmkit add-expert "
                       f"--router stats`, it routes by the islands' statistics); train one with `ddmkit train-router "
                       f"{folder.root}`, or leave --router out")


# ----- growing a trained run: add-expert, replace-expert (ddmkit.pipeline.grow) -----


@app.command("add-expert")
def add_expert_cmd(run_dir: Path = run_argument("trained run folder (vectors or images)"),
                   data: str = path_option("--data", ..., "the new island's data: a data set name or a .npy/.npz "
                                           "path, of the run's data shape", read=str),
                   params: Optional[str] = typer.Option(None, "--params", help="the data set's params as a JSON "
                                                        "object, as data.params in a config, e.g. '{\"key\": \"x\"}' "
                                                        "(default: none, the data set's own defaults, not the run's)"),
                   mode: str = typer.Option("new-cluster", help="new-cluster: the data become cluster K with an "
                                            "expert of its own; nearest: each row joins its nearest cluster, and "
                                            "those experts are retrained"),
                   router: str = typer.Option("retrain", help="retrain: the router over all shards; stats: the "
                                              "statistics-only router (nothing trained)"),
                   device: Optional[str] = typer.Option(None, "--device", help="where the new experts and the "
                                                        "router train: cpu, cuda, cuda:N, mps or auto (default: the "
                                                        "run's train.device)"),
                   config: Optional[Path] = OWN_NETWORKS):
    """Add a new island's data to a trained run: its expert trains on them alone, then only the router is
    retrained (or the statistics-only router is used). Samples and scores are drawn again later."""
    import json

    from ddmkit.pipeline.grow import add_expert, holds_out_the_runs_share

    _refuse_text(run_dir, "add-expert")
    if config is not None:
        _config(config)  # registers the config's own network classes

    try:
        table = json.loads(params) if params is not None else {}
    except ValueError as e:
        raise DDMError(f"--params: not valid JSON ({e}); write an object, e.g. --params '{{\"key\": \"x\"}}'") from None
    if not isinstance(table, dict):
        raise DDMError(f"--params: expected a JSON object, got {type(table).__name__}; e.g. --params '{{\"key\": \"x\"}}'")
    try:
        with _warnings_as_data_options():
            event = add_expert(run_dir, {"name": data, "params": table}, mode, router, log, device)
    except DDMError as e:  # the library names the [data] table's fields; this command's user gave options
        raise DDMError(_with_file(_as_data_options(str(e)), data, table)) from None
    from ddmkit.layout import RunFolder

    run = shlex.quote(str(run_dir))  # a command to paste: a path with spaces stays one argument
    score = (f"`ddmkit run {shlex.quote(str(run_dir / 'config.json'))} --out {run} --stages evaluate`"
             if (RunFolder(run_dir).monolith / "model.safetensors").exists()
             else f"`ddmkit sample {run}`, then `ddmkit evaluate {run}`")  # no monolith to compare with
    held = event["test_rows"]  # a file gave rows to both splits: "200 rows added" of 400 puzzled
    share = " (the run's share held out)" if holds_out_the_runs_share(data, table) else ""
    rows = f"{event['rows']} training rows" + (f" and {held} test rows{share}" if held else "")
    log(f"add-expert: {rows} added to {run_dir} (grow.json entry {event['n']}); sample and score with {score}")


_VALUE = r"(?:\"[^\"]*\"|'[^']*'|-?[\w.]+)"  # a setting's value in a message: a quoted text, a number, a word
_SETTING = rf"data\.(?:name|params\.\w+) = {_VALUE}"
_SETTINGS = re.compile(rf"{_SETTING}(?:(?:, | and | with ){_SETTING}| \({_SETTING}\))*")  # settings given together
_CONFIG_OR_SET = re.compile(r"name it in the config \(\[data\] params = \{ (\w+) = \"([^\"]*)\" \}\) or on the command "
                            r"line \(--set data\.params\.\w+=[^)]*\)")


def _as_data_options(message: str) -> str:
    """A message about the [data] table in add-expert's words: settings to give (data.name = "X" and
    data.params.KEY = V) become the options that give them (--data X --params '{"KEY": V}'), a --set or a
    config's [data] table --params; any other data.name is --data, data.params.KEY the key KEY of --params."""
    message = _CONFIG_OR_SET.sub(lambda m: "give it with " + _data_options({f"data.params.{m[1]}": f'"{m[2]}"'}),
                                 message)
    message = _SETTINGS.sub(lambda m: _data_options(dict(re.findall(rf"(data\.\S+) = ({_VALUE})", m[0]))), message)
    message = re.sub(r"\bdata\.params\.(\w+)", r"--params key '\1'", message)
    return message.replace("data.name", "--data").replace("data.params", "--params")


def _with_file(message: str, data: str, table: dict) -> str:
    """The message with its placeholder "FILE" (in --params '{"path": "FILE"}') the island's file: --data's, or
    the path in --params of an image loader, where it is one (and needs no other shell quoting)."""
    path = table.get("path") if data in ("image_array", "image_folder") else data
    if not isinstance(path, str) or "'" in path or not Path(path).expanduser().exists():
        return message
    import json

    if data == "image_folder":  # the fix names the array loader; a folder is read by its own
        message = message.replace("--data image_array --params '{\"path\": \"FILE\"", "--data image_folder --params "
                                  "'{\"path\": \"FILE\"")
    return message.replace('"FILE"', json.dumps(path))


def _data_options(settings: dict) -> str:
    """add-expert's options for the [data] settings {"data.name": '"X"', "data.params.KEY": "V"}, as a message
    writes them: --data X --params '{"KEY": V}' (a quoted V a JSON text, a number a number)."""
    import json

    def value(text: str):
        if text[:1] in "'\"":
            return text[1:-1]
        try:
            return json.loads(text)  # a number, true/false
        except ValueError:
            return text
    given = {name: value(text) for name, text in settings.items()}
    table = {name.split(".", 2)[2]: v for name, v in given.items() if name.startswith("data.params.")}
    options = [f"--data {shlex.quote(str(given['data.name']))}"] if "data.name" in given else []
    return " ".join(options + ([f"--params {shlex.quote(json.dumps(table))}"] if table else []))


@contextlib.contextmanager
def _warnings_as_data_options():
    """Warnings shown while add-expert runs say --data and --params where the library names data.name and
    data.params (_as_data_options), as its errors do; each is shown when raised, as any warning."""
    with warnings.catch_warnings():  # puts the showwarning in use before back on leaving
        shown = warnings.showwarning

        def reworded(message, category, filename, lineno, file=None, line=None):
            text = _as_data_options(str(message))
            try:
                message = category(text)  # a warning still, of its own category (a record keeps both)
            except Exception:  # a category that takes other arguments
                message = text
            shown(message, category, filename, lineno, file, line)
        warnings.showwarning = reworded
        yield


@app.command("replace-expert", context_settings={"ignore_unknown_options": True})  # K = -1 reaches the check
def replace_expert_cmd(run_dir: Path = run_argument("trained run folder (vectors or images)"),
                       k: str = typer.Argument(..., metavar="K", help="the expert to replace, 0 .. K-1 (a whole "
                                               "number)"),
                       folder: Path = path_argument("FOLDER", "a model folder (config.json + model.safetensors) of "
                                                    "an expert trained elsewhere"),
                       config: Optional[Path] = OWN_NETWORKS):
    """Replace expert K of a trained run by a copy of another expert's model folder; the registry is rewritten."""
    from ddmkit.pipeline.grow import replace_expert

    _refuse_text(run_dir, "replace-expert")
    if config is not None:
        _config(config)  # registers the config's own network classes
    event = replace_expert(run_dir, _expert_number(k, run_dir, folder), folder, log)
    if event is not None:
        log(f"replace-expert: grow.json entry {event['n']}; `ddmkit verify {shlex.quote(str(run_dir))}` checks the "
            "registry")


def _expert_number(k: str, run_dir: Path, folder: Path) -> int:
    """replace-expert's K as the whole number it must be (one out of the run's range is refused by replace_expert,
    which reads the run); anything else is refused in one line, as a whole-number option is (one_line_ranges),
    naming the run's experts where its partition manifest can be read, and a command that works."""
    from ddmkit.io import read_json
    from ddmkit.layout import RunFolder

    number = _whole_number(k)
    if number is not None:
        return number
    try:
        experts = f"one of this run's experts 0 .. {int(read_json(RunFolder(run_dir).manifest)['k']) - 1}"
    except (DDMError, KeyError, TypeError, ValueError):  # no run, or not one with a readable partition
        experts = "the index of an expert of RUN, from 0"
    example = " ".join(shlex.quote(str(a)) for a in ("ddmkit", "replace-expert", run_dir, 0, folder))
    raise DDMError(f"K {k}: give a whole number, {experts} (e.g. `{example}`)")


theory_app = typer.Typer(help="Theory studies on exact Gaussian-mixture truth: convergence and distillation.",
                         no_args_is_help=True)
text_app = typer.Typer(help="Decentralized text generation: autoregressive and discrete flow matching experts.",
                       no_args_is_help=True)
app.add_typer(theory_app, name="theory")
app.add_typer(text_app, name="text")
QUICK = typer.Option(False, "--quick", help="A small version that runs in under a minute (what the tests run).")


def _check_theory_out(out: Path, study: str) -> None:
    """--out of a theory study, before it runs: a folder of its own, where it replaces only its own report
    (not a run folder or one inside a run, not another study's, not a report.md of someone else's:
    layout.check_own_study)."""
    from ddmkit.io import check_folder_target
    from ddmkit.layout import check_own_study, enclosing_run, is_run_folder

    check_folder_target(out, "--out")
    if is_run_folder(out) or enclosing_run(out) is not None:
        raise DDMError(f"--out {out}: a ddmkit run folder or a folder inside one, whose report.md the study would "
                       f"replace; give a folder of its own, e.g. --out theory-{study}")
    check_own_study(out, f"theory-{study}")


@theory_app.command()
def convergence(quick: bool = QUICK,
                out: Path = out_option(Path("theory-convergence"), "Folder for the report."),
                seed: int = typer.Option(0, "--seed", min=0, max=THEORY_SEED_MAX,
                                         help="Random seed; the same seed gives the same numbers.")):
    """W2 and pathwise convergence of routed Euler/Heun samplers with full, top-k and switching routing."""
    from ddmkit.io import removing_new_empty_folders
    from ddmkit.theory.convergence import ConvergenceSettings, run_convergence

    settings = ConvergenceSettings.quick(seed) if quick else ConvergenceSettings(seed=seed)
    _check_theory_out(out, "convergence")
    with removing_new_empty_folders(out):  # Ctrl-C leaves no empty folder
        run_convergence(settings, out, log=log)
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'} and plots")


@theory_app.command()
def distill(quick: bool = QUICK,
            out: Path = out_option(Path("theory-distill"), "Folder for the report."),
            seed: int = typer.Option(0, "--seed", min=0, max=THEORY_SEED_MAX,
                                         help="Random seed; the same seed gives the same numbers."),
            seeds: int = typer.Option(1, "--seeds", min=1, max=STUDENT_SEEDS_MAX,
                                      help="Student seeds (SEED, SEED+1, ...): each trains one "
                                      "student per grid on the same teacher data; with 2 or more the Lambda-grid "
                                      "gains get a 95% t-interval over them. Time grows in proportion.")):
    """L(t), Lambda(t) and student flow maps on uniform and Lambda-uniform grids (linear and OU paths)."""
    from dataclasses import replace

    from ddmkit.io import removing_new_empty_folders
    from ddmkit.theory.distill import DistillSettings, run_distill

    settings = replace(DistillSettings.quick(seed) if quick else DistillSettings(seed=seed), seeds=seeds)
    _check_theory_out(out, "distill")
    with removing_new_empty_folders(out):  # Ctrl-C leaves no empty folder
        run_distill(settings, out, log=log)
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'} and plots")


@text_app.command("run")
def text_run(config: Path = config_argument("TOML with kind = 'text_ar' or 'text_dfm'",
                                            what="a text config (a TOML with kind = 'text_ar' or 'text_dfm')",
                                            example="configs/text_ar.toml"),
             out: Optional[Path] = out_option(None, "output folder (default runs/<config name>)", "run folder",
                                              "runs/text"),
             force: bool = typer.Option(False, "--force/--no-force", help="replace what the output folder holds (once "
                                        "the config's checks pass)"),
             seed: Optional[int] = typer.Option(None, "--seed", help="override every seed of the config"),
             device: Optional[str] = typer.Option(None, "--device", help="cpu or auto (text runs train and sample "
                                                  "on the CPU)"),
             set_: Optional[List[str]] = TEXT_SET):
    """Partition a corpus, train experts, centralized model and router, evaluate, write the report
    (the same as `ddmkit run CONFIG`)."""
    from rich.table import Table

    from ddmkit.pipeline.text import run_text

    _text_device(device)
    report = run_text(config, out, force, seed, log=log, overrides=list(set_ or []))
    table = Table("model", "held-out bits per byte")
    for name, row in report["bits_per_byte"].items():
        table.add_row(name, f"{row['all']:.3f}")
    Console().print(table)


@text_app.command()
def exactness(k: int = typer.Option(3, min=1, max=256, help="number of Markov chains (clusters)"),
              vocab: int = typer.Option(4, min=2, help="symbols per chain"),
              length: int = typer.Option(6, min=1, max=20, help="sequence length enumerated (vocab**length "
                                         "sequences: at most 2e6, so at most 20 symbols)"),
              seed: int = typer.Option(0, min=0, max=THEORY_SEED_MAX, help="seed of the random chains"),
              out: Optional[Path] = out_option(None, "also write the rows as JSON to this file", "JSON file",
                                               "exactness.json")):
    """Exact experts + exact posterior reproduce the global next-token law; KL against router error."""
    from rich.table import Table

    from ddmkit.discrete.markov import MarkovMixture, exactness_rows
    from ddmkit.io import write_json

    if vocab ** length > 2_000_000:
        raise DDMError(f"--vocab {vocab} --length {length}: {vocab ** length} sequences to enumerate; "
                       "keep vocab**length <= 2e6")
    if k * vocab ** length > 20_000_000:
        raise DDMError(f"--k {k} --vocab {vocab} --length {length}: {k * vocab ** length} chain-sequence "
                       "probabilities to hold; keep k * vocab**length <= 2e7")
    if out is not None and out.is_dir():
        raise DDMError(f"--out {out} is a folder; give the path of a JSON file to write, e.g. {out / 'exactness.json'}")
    blocking = next((p for p in (out.parents if out is not None else []) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DDMError(f"--out {out}: {blocking} is a file, not a folder; give a path in a folder")
    rows = exactness_rows(MarkovMixture.random(k, vocab, seed), length)
    table = Table("router eps", "max KL(global||decentralized)", "mean KL", "mean KL(P||r)", "mean TV(P, r)")
    for r in rows:
        table.add_row(f"{r['router_eps']:g}", f"{r['kl_max']:.3g}", f"{r['kl_mean']:.3g}",
                      f"{r['router_kl_mean']:.3g}", f"{r['router_tv_mean']:.3g}")
    Console().print(table)
    if out:
        write_json(out, {"k": k, "vocab": vocab, "length": length, "seed": seed, "rows": rows})


# ----- controlled studies over many trained runs: ddmkit study misalignment (ddmkit.pipeline.misalignment) -----
study_app = typer.Typer(help="Controlled studies over many trained runs (Gaussian mixtures with exact truth, "
                        "or images).",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("misalignment")
def study_misalignment_cmd(
        config: Path = config_argument(f"{CONFIG}; its data must be a Gaussian mixture (ring8, grid25, gmm32, "
                                       "mixture) or images (fashion_mnist, idx, image_folder, image_array)"),
        out: Path = out_option(Path("runs/misalignment"), "folder of the study's run folders, measurements and "
                               "report.md"),
        seeds: int = typer.Option(3, "--seeds", min=1, max=STUDY_SEEDS_MAX, help="training seeds 0 .. N-1 (experts "
                                  "seed, router seed + 1)"),
        conditions: Optional[List[str]] = typer.Option(None, "--conditions", "--condition", help="conditions, "
                                                       "repeatable or comma-separated: disjoint, overlap-S, "
                                                       "undertrained-F, random, with +exact (mixtures only), "
                                                       "+tempered-T, +uniform-A, +permuted-A (default: disjoint, "
                                                       "overlap-0.25, undertrained-0.1, random, tempered-3, "
                                                       "uniform-0.5, permuted-0.5, and on mixtures exact, "
                                                       "exact+tempered-3)"),
        strategy: Optional[List[str]] = typer.Option(None, "--strategy", help=f"routing strategies, repeatable "
                                                     f"({SAMPLED_STRATEGY_FORMS}; default: full, top-1, top-2, "
                                                     "sample-2)"),
        n: int = typer.Option(1000, "--n", min=2, max=COUNT_MAX, help="trajectories per strategy (mixtures: and "
                              "held-out rows for W2; images: the samples scored by FID and KID)"),
        n_boot: int = typer.Option(200, "--n-boot", min=10, max=BOOT_MAX, help="bootstrap resamples of the samples"),
        w2_boot: int = typer.Option(50, "--w2-boot", min=2, max=BOOT_MAX, help="bootstrap resamples for W2 (each an "
                                    "exact W2)"),
        stability_rows: int = typer.Option(256, "--stability-rows", min=1, max=COUNT_MAX, help="images: the first "
                                           "trajectories on which amplification and Delta_refine are measured"),
        device: Optional[str] = typer.Option(None, "--device", help="where the measurements run: cpu, cuda, cuda:N, "
                                             "mps or auto (default: the config's expert.train.device; training "
                                             "runs where the config says; --stages train and report measure "
                                             "nothing: they take a device this machine lacks)"),
        force: bool = typer.Option(False, help="train again run folders that hold another config"),
        stages: str = typer.Option("all", help="all (train what is missing, measure, report), train (train "
                                   "every run the conditions need; measure nothing, e.g. without the FID weights) "
                                   "or report (train and measure nothing: report the kept measurements, naming "
                                   "the missing ones)"),
        set_: Optional[List[str]] = SET):
    """Expert-data misalignment conditions x routing strategies x training seeds: stability (L_eff,
    amplification, Delta_refine) against quality (W2, NLL; images: FID, KID) with intervals; writes
    OUT/report.md."""
    from ddmkit.pipeline.misalignment import study_misalignment

    _refuse_text(config, "study misalignment")
    report = study_misalignment(_config(config, None, set_), out, list(range(seeds)), conditions, strategy, n=n,
                                n_boot=n_boot, w2_boot=w2_boot, force=force, log=log, device=device,
                                stability_rows=stability_rows, stages=stages)
    if report is None:
        return
    for name, c in report["conditions"].items():
        log(f"{name}: {c['verdict']}")


# ----- distilling a trained DDM into one network and a few-step student (ddmkit.pipeline.distill) -----
@app.command("distill")
def distill_run_cmd(
        run_dir: Path = run_argument("trained run folder (vectors or images)"),
        teacher: str = typer.Option("top-2", "--teacher", help=f"the routing strategy whose field is distilled "
                                    f"({FIELD_STRATEGY_FORMS}; oracle, nearest and gated-K@A need a "
                                    "trajectory or the analysis sampler: no field of (x_t, t))"),
        arch: str = typer.Option("expert", "--arch", help="the students' network: expert (an expert's "
                                 "architecture) or monolith (the monolith's)"),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, max=COUNT_MAX, help="training steps of each "
                                            "student (default: the run's expert.train.steps)"),
        few_step: Optional[int] = typer.Option(None, "--few-step", metavar="S", min=1, max=FEW_STEPS_MAX,
                                               help="also distill a student that samples in S steps"),
        grid: Optional[str] = typer.Option(None, "--grid", help="the few-step student's time grid: uniform (t_i = "
                                           "1 - i/S) or lambda (equal steps of the integrated Lipschitz constant: "
                                           "short steps where the flow is stiff; the default)"),
        trajectories: Optional[int] = typer.Option(None, "--trajectories", min=2, max=TRAJECTORIES_MAX,
                                                   help="teacher trajectories the few-step student trains on "
                                                   "(default 4096)"),
        teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", min=1, max=TEACHER_STEPS_MAX,
                                                    help="solver steps of each teacher trajectory (default: the "
                                                    "run's sample.steps)"),
        seed: Optional[int] = typer.Option(None, "--seed", min=0, max=SEED_MAX, help="the students' training seed "
                                           "(default: the expert's)"),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps or auto (default: "
                                             "the run's expert.train.device)"),
        force: bool = typer.Option(False, "--force/--no-force", help="remove RUN/students first (students of another "
                                   "teacher or training are refused otherwise)"),
        report: bool = typer.Option(True, "--report/--no-report", help="--no-report: train the students only "
                                    "(no sampling or scoring; the same command without it later reuses them "
                                    "and writes the report)")):
    """Distill a trained DDM into one dense network (RUN/students/dense) and, with --few-step S, a student
    that samples in S steps; writes RUN/students/report.md beside the teacher and the monolith."""
    from ddmkit.pipeline.distill import distill_run

    few_step_only = [name for name, value in (("--grid", grid), ("--trajectories", trajectories),
                                              ("--teacher-steps", teacher_steps)) if value is not None]
    if few_step is None and few_step_only:
        raise DDMError(f"{', '.join(few_step_only)}: settings of the few-step student; give --few-step S too")
    distill_run(run_dir, teacher, arch, steps, few_step, grid or "lambda", trajectories, teacher_steps, seed, device,
                force, log, report)


def plain_help(command) -> None:
    """Escape the help texts of a click command and its sub-commands for rich, which renders them as markup:
    '[expert]' or 'sample-K[@T]' would be read as style tags and vanish from --help. A sub-command's line in
    its group's list is its help's first paragraph on one line, wrapped to the panel (Typer keeps the
    docstring's line breaks there, so a docstring line longer than the panel left one word on a line)."""
    command.help = escape(command.help) if command.help else command.help
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)
        if sub.help and not sub.short_help:
            sub.short_help = " ".join(inspect.cleandoc(sub.help).split("\n\n")[0].split())


def one_line_ranges(command) -> None:
    """A whole-number option with a range (min= or max= on typer.Option) of a click command and its sub-commands
    refuses a value out of it, or not a whole number, as ddmkit refuses any option: one line naming the option
    and a value that works (`error: --steps 0: give a whole number, at least 1 (e.g. --steps 1)`, exit 2),
    not Typer's framed usage error; any other number option refuses a value that is not a number in one line
    too (_a_number); a repeatable number option given '2,4' says to repeat it (_one_per_option)."""
    for param in command.params:
        kind, low, high = _number_option(param)
        if kind is int and (low is not None or high is not None):
            param.process_value = _in_range(param, param.process_value, low, high)
        elif kind is not None:
            param.process_value = _a_number(param, param.process_value, kind)
        if getattr(param, "multiple", False) and kind is not None:
            param.process_value = _one_per_option(param, param.process_value)
    for sub in getattr(command, "commands", {}).values():
        one_line_ranges(sub)


def _number_option(param) -> tuple[type | None, int | float | None, int | float | None]:
    """(int or float, low, high) of a number option of the command line, its range where it has one (None: open),
    or (None, None, None) for any other parameter. Typer from 0.28 keeps these on the parameter itself (its
    annotation and min / max); earlier versions on click's type of it (IntRange, FloatParamType, ...), from click
    or from the copy of click that Typer carries, hence the classes matched by name."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return _number_type(descriptor.annotation), getattr(param, "min", None), getattr(param, "max", None)
    kind = getattr(param, "type", None)
    classes = {c.__name__ for c in type(kind).__mro__}
    number = int if "IntParamType" in classes else float if "FloatParamType" in classes else None
    if number is None:
        return None, None, None
    return number, getattr(kind, "min", None), getattr(kind, "max", None)


def _number_type(annotation):
    """int or float for an option of whole numbers or numbers (int, Optional[int], List[float], ...), else None
    (a --set value, List[str], is text)."""
    if annotation in (int, float):
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    return _number_type(args[0]) if len(args) == 1 else None


def _a_number(param, process, kind):
    """param.process_value of a number option without a range, a value that is not a number of its kind ('two',
    '2.5' for a whole number, '') refused first in one line naming the option (one_line_ranges); it was Typer's
    framed 'Invalid value' box."""
    option = max(param.opts, key=len)
    default = param.default[0] if isinstance(param.default, (list, tuple)) and param.default else param.default
    example = f" (e.g. {option} {default})" if isinstance(default, (int, float)) and not isinstance(default, bool) \
        else ""

    def checked(ctx, value):
        items = value if getattr(param, "multiple", False) else [value]
        for item in items or ():
            if item is not None and not isinstance(item, bool) and _number(item, kind) is None:
                said = "a whole number" if kind is int else "a number"
                raise DDMError(f"{option} {_shown(item)}: give {said}{example}")
        return process(ctx, value)
    return checked


def _number(value, kind) -> int | float | None:
    """The whole number (kind int, _whole_number) or number (float: '0.25', '1e-3', 'inf') a command-line value
    spells, else None."""
    if kind is int:
        return _whole_number(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _shown(value) -> str:
    """A command-line value as it would be typed: '' for an empty one, quotes around one with spaces."""
    return shlex.quote(str(value))


def _one_per_option(param, process):
    """param.process_value of a repeatable number option, a comma-separated value ('--k 2,4') refused first in one
    line that says to repeat the option (one_line_ranges); it was a framed 'Invalid value' without the fix."""
    option = max(param.opts, key=len)

    def checked(ctx, value):
        for item in value or ():
            parts = [part.strip() for part in str(item).split(",")]
            if len(parts) > 1 and all(parts):
                raise DDMError(f"{option} {item}: one value per {option}; repeat the option for more: "
                               + " ".join(f"{option} {part}" for part in parts))
        return process(ctx, value)
    return checked


def _in_range(param, process, low: int | None, high: int | None):
    """param.process_value, the given value checked against the option's range [low, high] first
    (one_line_ranges)."""
    option = max(param.opts, key=len)

    def checked(ctx, value):
        if value is not None and not isinstance(value, bool):
            number = _whole_number(value)
            if number is None or (low is not None and number < low) or (high is not None and number > high):
                works = param.default if isinstance(param.default, int) else low if low is not None else high
                span = (f"from {low} to {high}" if low is not None and high is not None else
                        f"at least {low}" if low is not None else f"at most {high}")
                raise DDMError(f"{option} {_shown(value)}: give a whole number, {span} (e.g. {option} {works})")
        return process(ctx, value)
    return checked


def _whole_number(value) -> int | None:
    """The whole number a command-line value spells ('3', ' -1 '), else None ('two', '1.5')."""
    try:
        return int(str(value).strip())
    except ValueError:
        return None


REQUIRED_EXAMPLES = {  # a whole command line per command with required parameters (one_line_missing)
    "partition": "--config demo --out runs/demo",
    "train-expert": "runs/demo/partition/shards/cluster_00.safetensors --config runs/demo/config.json "
                    "--out runs/demo/experts/expert_00",
    "train-router": "runs/demo",
    "train-monolith": "runs/demo",
    "sample": "runs/demo",
    "evaluate": "runs/demo",
    "analyze": "runs/demo",
    "run": "demo --out runs/demo",
    "sweep": "demo --out runs/sweep --k 2 --k 4 --budget 1",
    "launch": "runs/demo",
    "register": "runs/demo",
    "verify": "runs/demo",
    "add-expert": "runs/demo --data new_island.npy",
    "replace-expert": "runs/demo 0 elsewhere/expert",
    "distill": "runs/demo",
    "text run": "configs/text_ar.toml",
    "study misalignment": "demo --out runs/misalignment",
}


def one_line_missing(command, path: tuple[str, ...] = ()) -> None:
    """A required argument or option of a click command and its sub-commands that was not given is refused in one
    line naming it, what it is (its help) and a whole command that works (`error: ddmkit sample: missing RUN (run
    folder ...); e.g. ddmkit sample runs/demo`, exit 2), not Typer's framed usage error. Run before plain_help:
    the help is read as written, not escaped for rich."""
    for param in command.params:
        if param.required:
            param.process_value = _given(param, param.process_value, path)
    for name, sub in getattr(command, "commands", {}).items():
        one_line_missing(sub, (*path, name))


def _given(param, process, path: tuple[str, ...]):
    """param.process_value, click's MissingParameter for param turned into a DDMError (one_line_missing)."""
    name = max(param.opts, key=len) if param.param_type_name == "option" else param.name.upper()
    what = " ".join(str(getattr(param, "help", None) or "").split())
    said = " ".join(("ddmkit", *path))
    example = REQUIRED_EXAMPLES.get(" ".join(path))

    def checked(ctx, value):
        try:
            return process(ctx, value)
        except Exception as e:
            if "MissingParameter" not in {c.__name__ for c in type(e).__mro__} or getattr(e, "param", param) \
                    is not param:
                raise
            raise DDMError(f"{said}: missing {name}{f' ({what})' if what else ''}"
                           f"{f'; e.g. {said} {example}' if example else f'; see {said} --help'}") from None
    return checked


HELP_WIDTH = 120  # --help into a pipe or file (rich would take 80 columns and cut the option names short)


def run_app() -> None:
    """The ddmkit command line, its help texts escaped for rich (plain_help)."""
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        from typer import rich_utils

        rich_utils.MAX_WIDTH = rich_utils.MAX_WIDTH or HELP_WIDTH
    command = typer.main.get_command(app)
    one_line_missing(command)
    plain_help(command)
    one_line_ranges(command)
    command()


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command line prints it: one 'warning: ...' line, not Python's file, line and
    source (formatwarning only shapes the printed text: recorded warnings stay as they are)."""
    return f"warning: {message}\n"


def show_warnings_as_lines() -> None:
    """Warnings print as one 'warning: ...' line each; a SyntaxWarning (Python 3.12 compiling a library's
    source with, say, an invalid escape in a docstring) says nothing about the user's run and is not shown."""
    warnings.formatwarning = format_warning
    warnings.filterwarnings("ignore", category=SyntaxWarning, append=True)  # after -W options: those still win


def say_error(text: str) -> None:
    """One `error: TEXT` line on stderr, a very long value in it shortened (a 3000-character option value is not
    echoed whole: ddmkit.errors.shortened)."""
    console.print(f"[bold red]error:[/] {escape(shortened(text))}", highlight=False, soft_wrap=True)


def say_job_error(text: str) -> None:
    """say_error for the error that ends this command, once for a job of several processes that a launcher
    started (torchrun: each process runs this command, and one error all of them raise is said by process 0
    alone; one of another process is said with its rank: ddmkit.train.distributed.say_error_once)."""
    if "RANK" not in os.environ or os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        say_error(text)
        return
    from ddmkit.train.distributed import say_error_once  # torch: imported only by a launcher's processes

    say_error_once(text, say_error)


def out_of_memory(e: BaseException) -> bool:
    """Whether e says memory ran out: a MemoryError, torch's OutOfMemoryError (CUDA), or the RuntimeError of
    torch's CPU allocator (not imported here: the command line starts without torch)."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(e))


def main() -> None:
    global _sigterm_received
    _sigterm_received = False
    show_warnings_as_lines()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not where a caller (a pool worker) set its own
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        run_app()
    except DDMError as e:
        say_job_error(str(e))
        sys.exit(2)
    except Interrupted as e:
        stopped(str(e), e)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM before typer runs the command (while it imports)
        stopped(interrupted_text(sys.argv), e)
    except SystemExit as e:
        if e.code == 130:  # Ctrl-C or SIGTERM in any other command (typer's exit status for KeyboardInterrupt)
            stopped(interrupted_text(sys.argv), e)
        raise
    except ConnectionError as e:  # a network peer (e.g. a Ray cluster) refused or failed, not the file system
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]  # a Ray client's holds a whole traceback
        say_job_error(f"a connection failed: {last}; check the server's address (e.g. --address) and that it runs, "
                      "then run the command again")
        sys.exit(2)
    except OSError as e:  # the file system refused: permissions, a full disk, a folder where a file belongs
        where = f": {e.filename}" if e.filename else ""
        say_job_error(f"{e.strerror or e}{where}; check that path (its permissions, the free space of its disk) and "
                      "run the command again")
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        tried = re.search(r"tried to allocate [\d.]+ ?\w+", str(e), re.IGNORECASE)
        say_job_error(f"out of memory{f' ({tried.group(0)})' if tried else ''}; ask for less at once (a smaller --n or "
                      "--batch-size, or a smaller batch_size in the config), or run it where there is more memory")
        sys.exit(2)


if __name__ == "__main__":  # python -m ddmkit.cli, e.g. under torchrun
    main()
