"""Job scripts for schedulers: a SLURM job array with one task per expert.

    ddmkit launch RUN --emit slurm            # writes RUN/launch/train_experts.slurm
    sbatch RUN/launch/train_experts.slurm

Task i runs `ddmkit train-expert` on shard i with the run's own config.json
(and the `--set` overrides given, written into its command line) and
--resume, so a pre-empted or failed task re-submitted with
`sbatch --array=i ...` continues from its last checkpoint. The array holds
the experts not trained yet. The command is this Python's `python -m ddmkit`
(its absolute path), so the nodes need no ddmkit on their PATH. The run folder
and that Python must be on a file system the nodes share. An expert of your own
network class is named on each task's line (--set expert.net.arch=...), so the
task imports it: its module must be importable on the nodes (PYTHONPATH).
"""
from __future__ import annotations

import contextlib
import re
import shlex
import sys
from pathlib import Path

from ddmkit.config import RunConfig, apply_overrides, validate
from ddmkit.discrete.config import is_text_run
from ddmkit.errors import DDMError, counted
from ddmkit.io import read_json, write_bytes_atomic
from ddmkit.layout import RunFolder
from ddmkit.nets.user import is_user_network
from ddmkit.registry import checked_model_shards, load_partition_checked
from ddmkit.train.distributed import check_batch

_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:,=+/@%-]*")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")  # a long option's name, without its dashes
# sbatch's forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]], or no limit
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE")
# a number and its unit, in either case and optionally followed by B (16G, 16gb); a bare number (megabytes to
# sbatch) only as 0, a node's memory
_MEM = re.compile(r"([0-9]+)(?:([KMGTkmgt])[Bb]?)?")
SBATCH_SECONDS = 2**31 - 1  # sbatch counts a time limit in seconds in a 32-bit int: a longer one wraps round
SBATCH_MEGABYTES = 2**63 - 1  # and --mem, its number and its megabytes, in a 64-bit one
_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}  # megabytes per unit
DEFAULT_CPUS = 4  # --cpus-per-task of a task when --cpus is left out
HEAD = "#!/bin/bash\n#SBATCH --job-name=ddmkit-experts\n"  # how every script ddmkit writes begins


def _time_in_range(time: str) -> bool:
    """Hours below 24 after a day count, minutes and seconds below 60 after a larger unit (5-99 is no time)."""
    if time in ("UNLIMITED", "INFINITE"):
        return True
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        return parts[0] < 24 and all(p < 60 for p in parts[1:])
    return all(p < 60 for p in parts[1:])  # M, M:S, H:M:S: the first field may be any size


def _seconds(time: str) -> int:
    """The seconds of a time limit in one of sbatch's forms (not UNLIMITED): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days or len(parts) == 3:
        hours, minutes, seconds = parts + [0] * (3 - len(parts))
        return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
    return parts[0] * 60 + (parts[1] if len(parts) > 1 else 0)


def _too_large(mem: str) -> bool:
    """Whether a --mem value of _MEM's form (16G and 16gb: 16384 megabytes) holds a number, or megabytes, past what
    sbatch counts."""
    number, unit = _MEM.fullmatch(mem).groups()
    return int(number) > SBATCH_MEGABYTES or int(number) * _MB[(unit or "M").upper()] > SBATCH_MEGABYTES


def check_resources(time: str, cpus: int, gpus: int, mem: str, partition: str | None = None) -> None:
    """Refuse values sbatch would refuse (a DDMError naming the option and its accepted forms); an empty or blank
    --time, --mem or --partition is named with its default (None: the option left out)."""
    for option, value, default in (("--time", time, "24:00:00"), ("--mem", mem, "16G"),
                                   ("--partition", partition, "the cluster's default partition")):
        if value is not None and not value.strip():
            raise DDMError(f"{option} {value!r} is empty: leave {option} out to use {default}, or give a value "
                           f"(e.g. {option} {'gpu' if option == '--partition' else default})")
    if partition is not None and not _SAFE_VALUE.fullmatch(partition):
        raise DDMError(f"--partition {partition!r}: give the name of one of the cluster's partitions (letters, digits "
                       "and _.:,=+/@%-), or leave --partition out to use the cluster's default partition")
    if not _TIME.fullmatch(time) or not _time_in_range(time):
        raise DDMError(f"--time {time!r}: give sbatch's forms: minutes, HH:MM:SS, D-HH or D-HH:MM:SS (e.g. 24:00:00)")
    if time not in ("UNLIMITED", "INFINITE") and _seconds(time) > SBATCH_SECONDS:
        raise DDMError(f"--time {time!r}: longer than sbatch counts (68 years); give a time limit such as 24:00:00 "
                       "or 7-0, or UNLIMITED for none")
    if not _MEM.fullmatch(mem):
        raise DDMError(f"--mem {mem!r}: give a number with its unit, K, M, G or T (e.g. 16G or 16GB)")
    if _too_large(mem):
        raise DDMError(f"--mem {mem!r}: more than sbatch counts (2**63 megabytes); give a node's memory or less, "
                       "e.g. 16G")
    if mem.isdigit() and int(mem) > 0:  # sbatch's default unit: --mem 16 would give each task 16 MB
        raise DDMError(f"--mem {mem!r}: sbatch reads a number without a unit as megabytes ({mem} MB); give the unit: "
                       f"--mem {mem}G for gigabytes, or --mem {mem}M if megabytes are meant")
    if not 1 <= cpus <= 4096:
        raise DDMError(f"--cpus {cpus}: give 1 .. 4096 CPUs per task")
    if not 0 <= gpus <= 64:
        raise DDMError(f"--gpus {gpus}: give 0 .. 64 GPUs per task (one task trains one expert)")


def _directive(name: str, value: str | None = None) -> str:
    """One #SBATCH line, --NAME=VALUE, or --NAME for an option without a value (e.g. requeue: sbatch
    refuses --requeue=); names and values are restricted to a safe alphabet (a directive is not
    shell-quoted)."""
    if not _NAME.fullmatch(name):
        raise DDMError(f"slurm option {name!r}: give sbatch's long option name, e.g. requeue or mail-type")
    if value is None:
        return f"#SBATCH --{name}"
    if not _SAFE_VALUE.fullmatch(value):
        raise DDMError(f"slurm option {name}={value!r}: only letters, digits and _.:,=+/@%- are accepted")
    return f"#SBATCH --{name}={value}"


def array_ranges(indices: list[int]) -> str:
    """SLURM's --array value for sorted task indices: runs of consecutive ones as ranges ("0-2,5,7-8")."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def slurm_script(run: Path, k: int, ddmkit_cmd: str | None = None, time: str = "24:00:00", cpus: int = DEFAULT_CPUS,
                 gpus: int = 1, mem: str = "16G", partition: str | None = None, extra: list[str] = (),
                 experts: list[int] | None = None, overrides: list[str] = ()) -> str:
    """The text of a job-array script training `experts` (default all, 0 .. k-1) of `run` (on the
    partition's shards, or in a latent run on their latents) with `ddmkit_cmd` (default: this
    Python's `python -m ddmkit`), each task's config the run's config.json with `overrides`
    (`--set FIELD=VALUE` items, e.g. expert.train.checkpoint_every=100); `extra` holds more #SBATCH
    options, NAME=VALUE or NAME alone (e.g. ["mail-type=END", "requeue"])."""
    shards = "latents" if RunFolder(run).is_latent else "partition/shards"
    if k < 1:
        raise DDMError(f"the run has k = {k} shards; run `ddmkit partition` first")
    experts = sorted(experts) if experts is not None else list(range(k))
    if not experts or not all(0 <= e < k for e in experts):
        raise DDMError(f"slurm: experts {experts} are not a non-empty list of 0 .. {k - 1}")
    ddmkit_cmd = ddmkit_cmd or f"{shlex.quote(sys.executable)} -m ddmkit"
    check_resources(time, cpus, gpus, mem, partition)
    run = Path(run).resolve()
    q = shlex.quote
    lines = [*HEAD.splitlines(), _directive("array", array_ranges(experts)),
             _directive("time", time), _directive("cpus-per-task", str(cpus)), _directive("mem", mem),
             _directive("output", "ddmkit-expert-%A_%a.out")]  # in the submit folder: paths here are not quoted
    if gpus:
        lines.append(_directive("gres", f"gpu:{gpus}"))
    if partition:
        lines.append(_directive("partition", partition))
    lines += [_directive(*e.split("=", 1)) for e in extra]  # "requeue", "mail-type=END"
    lines += ["", "set -euo pipefail",
              f"RUN={q(str(run))}",
              'I=$(printf "%02d" "$SLURM_ARRAY_TASK_ID")',
              f"{ddmkit_cmd} train-expert \"$RUN/{shards}/cluster_$I.safetensors\" \\",
              '    --out "$RUN/experts/expert_$I" --config "$RUN/config.json" --resume'
              + (f" --nproc {gpus}" if gpus > 1 else "")  # one task = one expert = its GPUs (DDP or FSDP)
              + "".join(f" --set {q(item)}" for item in overrides), ""]
    return "\n".join(lines)


def check_emit(emit: str, unused: dict) -> None:
    """Refuse a scheduler other than slurm, and the launch options given (a value that is not None,
    e.g. {"--workers": 2}) that a script does not use."""
    if emit != "slurm":
        raise DDMError(f"--emit: unknown scheduler {emit!r}; accepted: slurm")
    given = [name for name, value in unused.items() if value is not None]
    if given:
        raise DDMError(f"{', '.join(given)}: not used with --emit slurm (its tasks train with the run's config.json "
                       "on the nodes SLURM gives them); leave them out, and give expert settings as --set, e.g. "
                       "--set expert.train.device=cuda")


def check_overrides(run: Path, overrides: list[str]) -> RunConfig | None:
    """Refuse --set items a task would not use (fields outside expert.*) or that make the run's config invalid;
    returns the config the tasks train with (None for a run folder without config.json)."""
    others = [item for item in overrides if not item.strip().startswith("expert.")]
    if others:
        raise DDMError(f"--set {others[0]!r}: a SLURM task trains one expert and reads only expert.* fields (e.g. "
                       "--set expert.train.checkpoint_every=100); set the others where they are used")
    if not RunFolder(run).config.exists():
        return None
    if is_text_run(run):  # its tasks read the text config; the command line refused --set on it
        return None
    raw = read_json(RunFolder(run).config)  # the run's resolved config, which the tasks read
    table = raw.get("config", {}) if isinstance(raw, dict) else raw
    return validate(RunConfig, apply_overrides(table, list(overrides)), f"{RunFolder(run).config} with --set")


def text_run_gpus(run: Path, gpus: int | None) -> int:
    """The GPUs per task of a text run's script: none (text experts train on the CPU); a request for some is
    refused."""
    if gpus:
        raise DDMError(f"--gpus {gpus}: {run} is a text run, whose experts train on the CPU; leave --gpus out "
                       "(its tasks hold no GPU) or give --gpus 0")
    return 0


def task_overrides(cfg: RunConfig | None, overrides: list[str], gpus: int) -> list[str]:
    """The --set items of every task: `overrides`, and the expert's own network class named again
    (expert.net.arch) so that a task imports it, as `ddmkit train-expert` imports user code only from
    what its command line or TOML names (the nodes must find its module: PYTHONPATH). A batch that
    does not split over the task's `gpus` processes, or a CUDA graph of one process's step where a task has
    several, is refused here, before any task queues."""
    if cfg is None:
        return list(overrides)
    batch, device = cfg.expert.train.batch_size, cfg.expert.train.device
    if gpus > 1:  # a task trains on one process per GPU
        fits = max(d for d in range(1, gpus + 1) if batch % d == 0)
        check_batch(batch, gpus, "expert.train.batch_size", given=f"--gpus {gpus}",
                    fix=f"--gpus dividing it (one process per GPU of a task), e.g. --gpus {fits} (the batch is a "
                        "setting of what the experts train, kept as the run has it)")
    if gpus and device == "cpu":
        raise DDMError(f"--gpus {gpus}: the run's expert.train.device is 'cpu', so every task would hold {gpus} GPU(s) "
                       "and train on the CPU; add --set expert.train.device=auto (or cuda), or give --gpus 0")
    if not gpus and device.startswith("cuda"):
        raise DDMError(f"--gpus 0: the run's expert.train.device is {device!r}, which a task without a GPU cannot "
                       "use; add --set expert.train.device=cpu (or auto), or give --gpus 1")
    if gpus > 1 and cfg.expert.train.cuda_graph:  # every task would be refused on its node (check_graph_processes)
        raise DDMError(f"--gpus {gpus}: the run's expert.train.cuda_graph is true, which captures one process's "
                       f"whole training step, and a task of {gpus} GPUs trains its expert on {gpus} processes, which "
                       "exchange their gradients inside it; give --gpus 1 (cuda_graph is a setting of what the "
                       "experts train, kept as the run has it)")
    named = any(item.partition("=")[0].strip() in ("expert.net", "expert.net.arch") for item in overrides)
    if is_user_network(cfg.expert.net.arch) and not named:
        return [*overrides, f"expert.net.arch={cfg.expert.net.arch}"]
    return list(overrides)


def task_notes(cfg: RunConfig, cpus: int | None = None, gpus: int | None = None) -> list[str]:
    """What a written script's tasks will do that its writer may not expect: no checkpoint to resume from, or
    more CPU cores held (--cpus) than their processes' threads use (--nproc N with --gpus N > 1), or each expert
    trained alone where the run's config trains them together (expert.concurrent)."""
    notes = []
    if cfg.expert.concurrent:
        notes.append("expert.concurrent is true, but each task trains its expert alone (`ddmkit train-expert`), "
                     "not the K experts in one job as `ddmkit run` and `ddmkit launch RUN` do: the experts' weights "
                     "differ from that job's; to train them together, run `ddmkit launch RUN` on one GPU node")
    if cfg.expert.train.checkpoint_every == 0:
        notes.append("expert.train.checkpoint_every is 0, so a task stopped by SLURM (preempted, or past --time) "
                     "trains again from step 0; to continue from its last checkpoint, emit with --set "
                     "expert.train.checkpoint_every=N")
    cores, processes = DEFAULT_CPUS if cpus is None else cpus, max(1 if gpus is None else gpus, 1)
    used = cfg.expert.train.threads * processes
    held = f"each task holds {counted(cores, 'CPU core')} (--cpus)"
    if used < cores:
        notes.append(f"{held} and trains on {processes} x expert.train.threads "
                     f"= {used}; give --cpus {used}, or emit with --set expert.train.threads={cores // processes} "
                     "(other thread counts can change the weights' last bits)")
    elif used > cores:
        notes.append(f"{held} for {processes} x expert.train.threads = {used} "
                     f"threads, which then share cores and slow each other; give --cpus {used}")
    return notes


def check_script_path(run: Path, path: Path) -> None:
    """Refuse a script path that would replace a file ddmkit did not write as a script: one inside the run
    folder other than in RUN/launch/ (the run's config, weights or shards), and an existing file that does
    not begin as ddmkit's scripts do (HEAD: a user's file, or anything else)."""
    where, root = Path(path).resolve(), Path(run).resolve()  # through symbolic links
    if where.is_relative_to(root) and not where.is_relative_to(root / "launch"):
        raise DDMError(f"--script {path}: inside the run folder {run}, whose files it would replace; give a path in "
                       f"{Path(run) / 'launch'} (e.g. the default, {Path(run) / 'launch' / 'train_experts.slurm'}) "
                       "or outside the run")
    if not where.exists() or where.is_dir():  # a new file, or a folder: refused where it is written
        return
    ours = False
    if where.is_file():  # not a FIFO or a device, which a read would wait on
        with contextlib.suppress(OSError), where.open("rb") as f:  # an unreadable file is not ours
            ours = f.read(len(HEAD)) == HEAD.encode()
    if not ours:
        raise DDMError(f"--script {path}: the file exists and is not a script ddmkit wrote (those begin with the "
                       f"lines {HEAD.splitlines()[0]} and {HEAD.splitlines()[1]}), so it would be lost; give a new "
                       "path, or move that file elsewhere")


def write_slurm_script(run: Path, path: Path | None = None, overrides: list[str] = (),
                       experts: list[int] | None = None, **options) -> Path | None:
    """Write the script for the experts not trained yet (default RUN/launch/train_experts.slurm), of those in
    `experts` when given, its tasks trained with the run's config and `overrides` (expert.* --set items);
    None, and nothing written, when every expert asked for is trained. An existing file at `path` is
    replaced only if it is a script ddmkit wrote, and inside the run only RUN/launch/ is written
    (check_script_path)."""
    run = Path(run)
    path = Path(path) if path else run / "launch" / "train_experts.slurm"
    check_script_path(run, path)
    if is_text_run(run):
        options["gpus"] = text_run_gpus(run, options.get("gpus"))
    overrides = task_overrides(check_overrides(run, overrides), overrides, options.get("gpus", 1))
    manifest, _ = load_partition_checked(run / "partition")
    folder = RunFolder(run)
    latent = folder.config.exists() and (read_json(folder.config).get("config", {}).get("latent") or {}).get("enabled")
    if latent and not folder.is_latent:
        raise DDMError(f"{run} is a latent run whose shards are not encoded yet; encode them first with "
                       f"`ddmkit partition --config CONFIG --out {run}` (it trains or copies the autoencoder)")
    k = manifest["k"]
    outside = [e for e in experts or [] if not 0 <= e < k]
    if outside:
        raise DDMError(f"--expert {outside[0]}: the run has experts 0 .. {k - 1}")
    missing = [c for c in range(k) if not (folder.expert(c) / "model.safetensors").exists()
               and (experts is None or c in experts)]
    if not missing:
        return None
    shards = folder.training_shards
    absent = [c for c in missing if not folder.training_shard(c).is_file()]
    if absent:
        here = [c for c in missing if c not in absent]
        fix = (f"give --expert for the shards here ({' '.join(f'--expert {c}' for c in here)})" if here else
               "copy the shards in first")
        raise DDMError(f"{shards} lacks the shards of clusters {', '.join(map(str, absent))}, whose tasks would fail; "
                       f"{fix}")
    checked_model_shards(run, missing)  # a shard changed or cut short since it was written: its task would fail
    write_bytes_atomic(path, slurm_script(run, manifest["k"], experts=missing, overrides=overrides, **options).encode())
    path.chmod(0o755)
    return path
