"""The Ray backend: one Ray task per expert (`pip install ddmkit[ray]`).

A task gets the bytes of its shard (and of the checkpoint a killed job left,
if any) and streams back the bytes of each checkpoint it writes, then those
of the expert folder (every file, tensorboard/'s too), so it runs on any
node of a cluster without a shared
file system; the driver writes each checkpoint beside the expert folder and
the folder itself atomically, then removes the checkpoint. A job killed here
(or a task lost with its node) so continues from its last checkpoint the next
time it is launched, on any backend. Inside the task it is the same pure
`train_expert` as everywhere else, on config.train.threads CPU threads (the
task asks Ray for as many CPUs), so the result is byte-identical to the
inline backend for the same seeds.

    run_ray(jobs, cfg.expert)                          # a local Ray on this machine
    run_ray(jobs, cfg.expert, address="auto")          # the cluster this node belongs to
    run_ray(jobs, cfg.expert, address="head:6379")     # a cluster's GCS address

Ray Client (an address ray://HOST:10001) is refused (check_address): it cannot run streaming tasks.

Each task asks for one GPU when the cluster has GPUs, none otherwise.

A job stopped here (Ctrl-C, SIGTERM, a failed expert) stops its tasks so that each removes its temporary
folder (a copy of its shard) on its node: stop_tasks.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from ddmkit.config import ExpertConfig
from ddmkit.errors import DDMError
from ddmkit.io import staging_dir, write_bytes_atomic
from ddmkit.nets import use_networks, user_networks
from ddmkit.train.jobs import check_expert_folder, checkpoint_path, train_expert
from ddmkit.train.stop import signals_held, stop_scope

STOP_GRACE = 10.0  # seconds a stopped task has to end (stop its training, remove its folder) before it is killed


def import_ray():
    try:
        import ray
    except ImportError:
        raise DDMError("backend 'ray' needs Ray: pip install 'ddmkit[ray]' (or pip install ray)") from None
    return ray


def _stamp(path: Path):
    """What changes when a checkpoint is replaced (it is renamed into place: a new inode); None: absent."""
    try:
        s = path.stat()
    except FileNotFoundError:
        return None
    return s.st_ino, s.st_mtime_ns, s.st_size


def new_checkpoints(job: Future, path: Path, poll: float) -> Iterator[bytes]:
    """The bytes of every new checkpoint at `path`, looked at every `poll` seconds while `job` runs."""
    seen = _stamp(path)
    while not job.done():
        wait([job], timeout=poll)
        stamp = _stamp(path)
        if stamp is None or stamp == seen:
            continue
        seen = stamp
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # the job ended and removed it meanwhile
            continue
        yield data


def train_from_bytes(shard_name: str, shard_bytes: bytes, config_dump: dict, out_name: str = "expert",
                     checkpoint: bytes | None = None, networks: tuple = (),
                     poll: float = 1.0) -> Iterator[tuple[str, object]]:
    """What a Ray task runs: in a private temporary folder, train the expert on the shard's bytes
    (continuing from `checkpoint`, a checkpoint's bytes, when given); yield ("checkpoint", bytes) for
    each checkpoint it writes, then ("expert", {path: bytes}) of every file of the expert folder, its
    sub-folders' too (tensorboard/), by path inside the folder ("tensorboard/events..."). Its errors name
    the driver's paths `shard_name` and `out_name`, not the temporary copies. The training runs in a thread
    of its own, in a stop scope (ddmkit.train.stop) whose flag is set when the task ends early (ray.cancel
    raises KeyboardInterrupt here, or only sets the flag while Ray sends an item on: _Cancel): the thread stops
    at its next step, and the folder is removed before the task ends."""
    use_networks(networks)  # the user's network classes the driver registered (their package must be installed)
    config = ExpertConfig.model_validate(config_dump)
    stop = threading.Event()
    with cancelled_inside(stop) as cancel, tempfile.TemporaryDirectory(prefix="ddmkit-expert-") as tmp:
        shard, out = Path(tmp) / Path(shard_name).name, Path(tmp) / "expert"
        shard.write_bytes(shard_bytes)
        if checkpoint is not None:
            checkpoint_path(out).write_bytes(checkpoint)
        with ThreadPoolExecutor(1) as thread:
            job = thread.submit(_train_in_scope, stop, shard, config, out, resume=checkpoint is not None)
            try:
                for data in new_checkpoints(job, checkpoint_path(out), poll):
                    with cancel.outside():
                        yield "checkpoint", data
                job.result()
            except DDMError as e:
                raise DDMError(str(e).replace(str(shard), shard_name).replace(str(out), out_name)) from None
            finally:  # cancelled (KeyboardInterrupt) or closed: the thread must end before the folder goes
                stop.set()
        with cancel.outside():
            yield "expert", {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                             if p.is_file()}


class _Cancel:
    """Where a Ray task's cancel (ray.cancel: Ray's _thread.interrupt_main(), a KeyboardInterrupt in the task's
    main thread) is raised: in the task's generator. Ray sends each item on between two steps of the generator,
    and a KeyboardInterrupt raised there, outside it, left the generator suspended at its yield with its
    temporary folder, removed only once the generator was collected (the driver, done waiting for the task,
    shut its worker down first). Outside the generator the cancel only sets the stop flag: the training stops
    at its next step, and the generator, resumed, raises its KeyboardInterrupt (job.result()) and removes the
    folder. One that comes once the task stops (the flag set: its folder is being removed) is not raised: it
    would cut the removal short."""

    def __init__(self, stop: threading.Event):
        self.stop, self.inside = stop, True

    def handler(self, signum, frame) -> None:
        stopping = self.stop.is_set()
        self.stop.set()
        if self.inside and not stopping:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """The block (a yield: Ray's code runs meanwhile) outside the generator."""
        self.inside = False
        try:
            yield
        finally:
            self.inside = True


@contextlib.contextmanager
def cancelled_inside(stop: threading.Event) -> Iterator[_Cancel]:
    """A _Cancel as the SIGINT handler (what _thread.interrupt_main calls) during the block, in the main thread
    (a Ray worker runs its tasks there; elsewhere no handler can be set: Ray's cancel stays as Ray raises it)."""
    cancel = _Cancel(stop)
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    before = signal.signal(signal.SIGINT, cancel.handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if before is None else before)


def _train_in_scope(stop: threading.Event, *args, **kwargs) -> Path:
    """train_expert(*args, **kwargs) in this thread, stopped at its next step once `stop` is set."""
    with stop_scope(stop):
        return train_expert(*args, **kwargs)


def write_folder(out_dir: Path, files: dict[str, bytes]) -> Path:
    """Write a returned expert folder atomically (replacing an expert's folder, never one holding other
    files: check_expert_folder), then remove its checkpoint; each file's path inside the folder must be
    relative, of plain names ("tensorboard/events...", no "..")."""
    check_expert_folder(out_dir)  # again: files can have come while the task trained
    with staging_dir(out_dir) as tmp:
        for name, data in files.items():
            parts = name.split("/")
            if any(part in ("", ".", "..") or part != Path(part).name for part in parts):
                raise DDMError(f"ray task returned a file path {name!r} that is not a relative path of plain names")
            write_bytes_atomic(tmp.joinpath(*parts), data)
    checkpoint_path(out_dir).unlink(missing_ok=True)
    return out_dir


def _last_line(error: BaseException) -> str:
    """The last line of an error's message (a Ray client's holds the server's whole traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else type(error).__name__


TOKEN_FIX = ("set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, or in a file named by "
             "RAY_AUTH_TOKEN_PATH or at ~/.ray/auth_token (`ray get-auth-token` on the head node prints it), then "
             "run the command again")


def auth_failure(error: BaseException) -> str | None:
    """What Ray said when the cluster's token authentication refused ray.init (its AuthenticationError, or a
    last line naming auth or a token, e.g. 'InvalidAuthToken: ...', in the error or its causes), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        said = _last_line(getattr(error, "message", None) or error)  # an AuthenticationError's str adds Ray's help
        if type(error).__name__ == "AuthenticationError" or "auth" in said.lower() or "token" in said.lower():
            return said
        error = error.__cause__ or error.__context__
    return None


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """(the cluster ray.init connects to, how the user gave it): --address, else the RAY_ADDRESS variable, which
    Ray reads for no address and for auto (inside a Ray job it is set); None: a local Ray that ddmkit starts."""
    variable = os.environ.get("RAY_ADDRESS", "").strip()
    if variable and address in (None, "auto"):
        return variable, f"RAY_ADDRESS={variable}"
    return address, f"--address {address}"


def check_address(address: str | None) -> None:
    """Refuse a Ray Client address (ray://HOST:PORT; Ray takes any SCHEME://... for one), given as --address or
    in RAY_ADDRESS: the client cannot run the streaming tasks that bring each checkpoint back to the driver."""
    cluster, given = cluster_address(address)
    if cluster is not None and "://" in cluster:
        unset = "" if given.startswith("--address") else "unset RAY_ADDRESS and "
        raise DDMError(f"{given}: Ray Client (a ray:// address) cannot run the streaming tasks that bring each "
                       f"checkpoint back to ddmkit; {unset}run ddmkit on a node of the cluster with --address auto "
                       "or HOST:6379 (the cluster's GCS address), or submit the command as a Ray job: ray job "
                       "submit --address http://HOST:8265 -- ddmkit launch RUN --backend ray --address auto")


def check_reachable(address: str, timeout: float = 10.0, given: str = "--address") -> None:
    """A cluster address HOST:PORT where nothing answers is a DDMError within `timeout` seconds: ray.init
    retries such an address for ever. auto is left to Ray. `given`: how the user gave it, as errors name it."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        reason = "no answer within {:g} s".format(timeout) if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise DDMError(f"{given}: cannot connect to Ray at {address}: {reason}; start the cluster (`ray start "
                       f"--head`) or fix {given.partition('=')[0]} (HOST:6379 or auto)") from None


def start_ray(ray, address: str | None, workers: int | None):
    """Connect to `address`, or start a local Ray; returns whether we started it. ray.init sets a SIGTERM
    handler of its own (sys.exit) at its start: a handler the caller had set (the ddmkit command's, which stops
    it as Ctrl-C does) is put back, so a SIGTERM later still keeps the checkpoints and exits as the caller says,
    and a SIGTERM during ray.init (Ray's SystemExit(15)) is the caller's handler's too (stopped_init)."""
    if ray.is_initialized():
        return False
    without_crash_handler_in_c(ray)
    caller = signal.getsignal(signal.SIGTERM)
    try:
        with keeping_sigterm_handler():
            _init_ray(ray, address, workers)
    except (KeyboardInterrupt, SystemExit) as e:
        stopped_init(ray, caller, e)
        raise
    return True


def stopped_init(ray, caller, stop: BaseException) -> None:
    """After Ctrl-C or SIGTERM stopped ray.init: shut down what it had started (stop_ray), then, for Ray's
    SystemExit(15) (a SIGTERM after ray.init set its own handler), call the caller's SIGTERM handler (the ddmkit
    command's raises its Terminated), as a SIGTERM at any other point of the launch does; nothing for another
    SystemExit, or where the caller had no handler of its own (the caller's SystemExit(15) stands)."""
    if isinstance(stop, SystemExit) and stop.code != signal.SIGTERM:
        return
    with contextlib.suppress(Exception):  # a Ray stopped half started: what its shutdown can stop
        stop_ray(ray)
    if isinstance(stop, SystemExit) and callable(caller):
        caller(signal.SIGTERM, None)


def without_crash_handler_in_c(ray) -> None:
    """Keep Ray from installing its C++ crash handler in this process (the driver; Ray's workers keep theirs):
    it takes SIGTERM among other signals, and ray.shutdown() puts the default action back for them all, so a
    SIGTERM in the second or so that shutdown then takes killed the command outright, with no 'stopped by
    SIGTERM' and its locks and staging folders left. A Ray without the setting is left as it is."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and hasattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"):
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


def stop_ray(ray) -> None:
    """ray.shutdown(), then the caller's SIGTERM handler again: Ray's shutdown resets the signal's action in C to
    the default while Python still reports the handler, so a SIGTERM after it (the registry written next, the rest
    of `ddmkit run`) killed the command outright: no 'stopped by SIGTERM', its locks and staging folders left.
    A SIGTERM during the shutdown waits for its end (sigterm_held): raised inside it, it left Ray half stopped."""
    with sigterm_held(), keeping_sigterm_handler():
        ray.shutdown()


@contextlib.contextmanager
def sigterm_held():
    """A SIGTERM that comes during the block (in the main thread) is only noted; once the block has ended, and
    the SIGTERM handler it had is set again, that handler is called (the ddmkit command's raises its Terminated),
    or the signal is sent again when the action was Python's default or ignore."""
    caller, caught = signal.getsignal(signal.SIGTERM), []
    try:
        with signals_held(signal.SIGTERM) as caught:
            yield
    finally:
        if caught and callable(caller):
            caller(signal.SIGTERM, None)
        elif caught:
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def keeping_sigterm_handler():
    """The SIGTERM handler the caller had set (a callable: the ddmkit command's) set again after the block, in the
    main thread, whatever Ray's init or shutdown did to it."""
    caller = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(caller) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, caller)


def _init_ray(ray, address: str | None, workers: int | None) -> None:
    """ray.init: the cluster at `address` or RAY_ADDRESS (cluster_address; checked reachable first), or a local
    Ray of `workers` CPUs."""
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    check_address(address)
    address, given = cluster_address(address)
    given = "--address" if given.startswith("--address") else given
    if address:
        check_reachable(address, given=given)
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # ConnectionError, or Ray's own failure (its last line is shown)
            refused = auth_failure(e)
            if refused is not None:
                raise DDMError(f"{given}: the Ray cluster at {address} requires its authentication token "
                               f"({refused}); {TOKEN_FIX}") from None
            raise DDMError(f"{given}: cannot connect to Ray at {address}: {_last_line(e)}; start the cluster "
                           f"(`ray start --head`) or fix {given.partition('=')[0]} (HOST:6379 or auto)") from None
    else:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ray.init(num_cpus=workers or os.cpu_count() or 1, num_gpus=gpus, **kwargs)


def task_error(ray, error: Exception, job) -> Exception:
    """The error to raise for a failed task: its own DDMError (no remote traceback), a DDMError for a
    task Ray could not run, and any other error (a bug) as Ray gave it."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, DDMError):
        return DDMError(str(cause))
    if isinstance(error, ray.exceptions.RayTaskError):
        return error
    return DDMError(f"expert {job.cluster}: Ray could not run its task ({_last_line(error)}); launch again: it "
                    "continues from the last checkpoint that came back")


def _submit(task, job, config: ExpertConfig, resume: bool):
    """Start one job's task, shipping the checkpoint a killed job left when resuming."""
    ckpt = checkpoint_path(job.out_dir)
    checkpoint = ckpt.read_bytes() if resume and ckpt.exists() else None
    return task.remote(str(job.shard), job.shard.read_bytes(), config.model_dump(), str(job.out_dir), checkpoint,
                       user_networks())


def _receive(ray, ref, job, gpus: int, log) -> None:
    """Write one item a task streamed back: a checkpoint, or the expert folder."""
    try:
        kind, data = ray.get(ref)
    except ray.exceptions.RayError as e:
        raise task_error(ray, e, job) from None
    if kind == "checkpoint":
        write_bytes_atomic(checkpoint_path(job.out_dir), data)
        return
    write_folder(job.out_dir, data)
    log(f"expert {job.cluster}: written to {job.out_dir} (ray task, {gpus} GPU)")


def stop_tasks(ray, generators, grace: float = STOP_GRACE) -> None:
    """Stop running tasks and wait until they have ended. Each is cancelled (a KeyboardInterrupt in the task:
    its training stops at the next step and its temporary folder is removed), and one still running after
    `grace` seconds (stuck outside the training loop), or when this wait is interrupted, is killed with its
    worker process (force), which leaves its folder behind. Cancelling first, rather than cleaning the
    folders of dead workers later from another task, removes each folder on its own node at once, whether
    or not a task runs there again."""
    if not generators:
        return
    ends = {generator.completed(): generator for generator in generators}
    for generator in generators:
        ray.cancel(generator)
    left = list(ends)
    try:
        _, left = ray.wait(left, num_returns=len(left), timeout=grace)
    finally:
        for end in left:
            ray.cancel(ends[end], force=True)


def run_ray(jobs, config: ExpertConfig, address: str | None = None, workers: int | None = None,
            resume: bool = False, log=print) -> list[Path]:
    """Train every job as a Ray task (config.train.threads CPUs each) and write the folders and their
    checkpoints here (resume: each task continues from the checkpoint its job left)."""
    for job in jobs:  # each folder is replaced when its task returns: an expert's, or new (nothing trained yet)
        check_expert_folder(job.out_dir)
    ray = import_ray()
    started = start_ray(ray, address, workers)
    running = {}
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        cpus = min(config.train.threads, max(1, int(ray.cluster_resources().get("CPU", 1))))
        task = ray.remote(train_from_bytes).options(num_cpus=cpus, num_gpus=gpus, max_retries=2,
                                                    num_returns="streaming")
        running = {_submit(task, job, config, resume): job for job in jobs}
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            try:
                ref = next(ready[0])
            except StopIteration:
                running.pop(ready[0])
                continue
            _receive(ray, ref, running[ready[0]], gpus, log)
        return [job.out_dir for job in jobs]
    finally:
        try:
            stop_tasks(ray, list(running))  # an error or Ctrl-C: stop the other tasks, before the local Ray goes
        finally:  # even when a SIGTERM stops that wait
            if started:
                stop_ray(ray)
