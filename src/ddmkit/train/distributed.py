"""One training job on several processes (one per GPU): data parallel with torch.distributed (DDP or FSDP).

    run(fn, nproc, device, *args)     # fn(*args, dist=...) as one job of nproc processes
    dist.rows(batch_size)             # this process's rows of the global batch
    dist.wrap(model, parallel)        # DDP or FSDP: gradients averaged over the processes in backward()
    dist.mean(metrics)                # logged values averaged over the processes
    full_state(module), load_full_state(module, state)   # whole tensors, as one process has them

Every process draws the same whole batch (data, t, noise) from the same seeded
generator (cheap) and computes the loss on its own equal slice of rows; DDP
averages the gradients, and the mean of equal slices' means is the whole
batch's mean, so a step is the step of one process on the whole batch, up to
float rounding. Only rank 0 writes files.

With parallel = "fsdp" (torch's FSDP2, `fully_shard`) each process keeps only
its shard of every parameter, gradient and optimizer moment (DTensors); a block
(each element of an nn.ModuleList) is gathered whole for its forward and
backward, then freed. The state functions here gather the shards into whole
tensors (a collective: every process calls them) and split whole tensors into
shards, so checkpoints and model folders hold what one process would; for a
network that is not sharded they are state_dict() and load_state_dict().

The processes come from torchrun (or any launcher that sets RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and LOCAL_RANK) or are spawned here, nproc on this
machine. gloo on the CPU, nccl on CUDA (process i on GPU LOCAL_RANK = i).
Spawned processes meet through a file in a scratch folder of $TMPDIR
(ddmkit.io.scratch_dir: a killed command's is removed by the next one), stop
on SIGINT or SIGTERM as on Ctrl-C (rank 0 removes its staging folder, the last
checkpoint stays), and die with the process that spawned them (die_with_parent).
`LOCAL` is the plain single process: every method is the identity, so the
one-process path runs exactly the code it ran without this module.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from ddmkit.errors import DDMError, counted
from ddmkit.io import scratch_dir, write_bytes_atomic
from ddmkit.train.stop import request_stop, stop_requested, stop_scope

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
JOIN_TIMEOUT = 600.0  # seconds a process started by a launcher waits for the job's other processes
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOPPED = 130  # the exit status of a spawned process stopped by SIGINT or SIGTERM
FAILED = 1  # the exit status of a spawned process whose fn raised a DDMError (its message: ErrorFiles)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in its job: rank of world, and its device (None: the job's own setting)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the job's files (rank 0)."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice | None:
        """This process's rows of a global batch (None: all of them, one process)."""
        if self.world == 1:
            return None
        check_batch(batch_size, self.world)
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def wrap(self, model: nn.Module, parallel: str = "ddp") -> nn.Module:
        """The model DDP-wrapped (same parameters; backward averages gradients), or sharded in place by FSDP
        (parallel = "fsdp": its parameters become DTensor shards), or itself alone (one process)."""
        if self.world == 1:
            return model
        if parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in blocks(model):
                fully_shard(block, mesh=mesh)
            return fully_shard(model, mesh=mesh)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def mean(self, values: dict) -> dict:
        """{name: value} averaged over the processes (tensors stay tensors of their dtype, floats floats)."""
        if self.world == 1 or not values:
            return values
        names = list(values)  # the same order everywhere: every process runs the same code
        buf = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(self.device).reshape(())
                           for k in names])
        tdist.all_reduce(buf)
        buf /= self.world
        return {k: buf[i].to(values[k].dtype) if torch.is_tensor(values[k]) else float(buf[i])
                for i, k in enumerate(names)}

    def note(self) -> dict:
        """What a model folder's config.json records of the job ({} for one process)."""
        return {} if self.world == 1 else {"processes": self.world}


LOCAL = Distributed()


def blocks(model: nn.Module) -> list[nn.Module]:
    """What FSDP gathers one at a time, innermost first: each element of an nn.ModuleList that holds parameters
    (the blocks of a DiT or UNet). FSDP gathers a block when it is called, so a network that reads its blocks'
    parameters without calling them (ddmkit's mlp: flat_parameters) is sharded as one whole."""
    if hasattr(model, "flat_parameters"):
        return []
    lists = [m for m in reversed(list(model.modules())) if isinstance(m, nn.ModuleList)]
    return [b for lst in lists for b in lst
            if not isinstance(b, (nn.ModuleList, nn.ModuleDict)) and next(b.parameters(), None) is not None]


def is_shard(value) -> bool:
    """Whether `value` is a DTensor (FSDP's shard of a tensor). torch.distributed.tensor is slow to import and
    is not imported for it: where nothing imported it, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _sharded(tensors) -> bool:
    return any(is_shard(t) for t in tensors)


def full_tensor(value):
    """A DTensor's whole value as a plain tensor (a collective); any other value itself."""
    return value.full_tensor() if is_shard(value) else value


def _shard_like(value: torch.Tensor, ref) -> torch.Tensor:
    """`value` (a whole tensor) split as the DTensor `ref` is (this process's part, no communication);
    `value` itself where `ref` is not a DTensor."""
    if not is_shard(ref):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def full_state(module: nn.Module) -> dict:
    """module.state_dict() with every shard gathered into its whole tensor, on the CPU (a collective under FSDP:
    every process calls it)."""
    state = module.state_dict()
    if not _sharded(state.values()):
        return state
    return {k: full_tensor(v).cpu() if is_shard(v) else v for k, v in state.items()}


def load_full_state(module: nn.Module, state: dict) -> None:
    """module.load_state_dict(state) of whole tensors (full_state's), each split as the module's own is."""
    mine = module.state_dict()
    if not _sharded(mine.values()):
        module.load_state_dict(state)
        return
    module.load_state_dict({k: _shard_like(v, mine.get(k)) for k, v in state.items()})


def shard_like(copy: nn.Module, model: nn.Module) -> None:
    """Shard `copy` (a plain copy of `model`, e.g. its EMA, made before wrap) as FSDP sharded the model: each
    tensor a DTensor placed as the model's; nothing where the model is not sharded."""
    theirs = model.state_dict()
    if _sharded(theirs.values()):
        copy.load_state_dict({k: _shard_like(v, theirs[k]) for k, v in copy.state_dict().items()}, assign=True)


def unshard(module: nn.Module) -> nn.Module:
    """The module with every DTensor replaced by its whole tensor, in place (a collective): a plain network
    again, as one process would have it."""
    state = module.state_dict()
    if _sharded(state.values()):
        module.load_state_dict({k: full_tensor(v) for k, v in state.items()}, assign=True)
    return module


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() (per-parameter state keyed by parameter index) with every shard gathered whole, on the CPU
    (a collective under FSDP)."""
    state = opt.state_dict()
    if not _sharded(p for g in opt.param_groups for p in g["params"]):
        return state
    return {"state": {i: {k: full_tensor(v).cpu() if is_shard(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_full_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """opt.load_state_dict(state) of whole tensors: a state tensor shaped as its parameter is split as the
    parameter is (AdamW's moments; its step count stays whole)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if not _sharded(params):
        opt.load_state_dict(state)
        return
    opt.load_state_dict({**state, "state": {
        i: {k: _shard_like(v, params[i]) if v.shape == params[i].shape else v for k, v in s.items()}
        for i, s in state["state"].items()}})


def check_batch(batch_size: int, world: int, field: str = "train.batch_size", fix: str | None = None,
                given: str | None = None) -> None:
    """A global batch of `batch_size` rows (the config's `field`) splits into `world` equal slices. A batch that
    does not is a DDMError that starts with `given` where given (the processes as the user asked for them: '--nproc
    3') and says to use `fix` (by default, a multiple of world as the batch); one of fewer rows than `world`
    processes (also after `given`) names a count of processes that divides it, its largest divisor at most `world`:
    batch_size itself (not "at most batch_size": a batch of 6 does not split over 5 or 4 either)."""
    if world < 1:
        raise DDMError(f"nproc: must be at least 1 (got {world})")
    if batch_size < world:  # fewer processes, never a batch of `world` rows (it may be a huge one)
        use = f"{batch_size} process{'es' if batch_size > 1 else ''}, or another count that divides {batch_size}"
        raise DDMError(f"{given + ': ' if given else ''}{field} = {batch_size} is fewer rows than the {world} "
                       f"processes, one slice each; use {use} (the batch is the global one, over all processes)")
    if batch_size % world:
        fix = fix or (f"a multiple of {world}, e.g. --set {field}={world * max(1, batch_size // world)} (the batch "
                      "is the global one, over all processes)")
        raise DDMError(f"{given + ': ' if given else ''}{field} = {batch_size} does not split into {world} equal "
                       f"slices, one per process; use {fix}")


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind = name.split(":", 1)[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise DDMError(f"train.device = {name!r}: a job of several processes runs on 'cpu' or 'cuda'")
    if local_rank >= torch.cuda.device_count():
        raise DDMError(f"process {local_rank} of this machine needs GPU {local_rank}, but "
                       f"{torch.cuda.device_count()} are visible; start at most that many processes per machine, "
                       "or train the processes on the CPU (gloo): train.device = \"cpu\" (--device cpu)")
    return torch.device("cuda", local_rank)


def _join(rank: int, world: int, local_rank: int, device_name: str, init_method: str,
          timeout: float | None = None) -> Distributed:
    device = _device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rank:
        os.environ["DDMKIT_QUIET"] = "1"  # one progress bar per job: rank 0's
    wait = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}

    def init() -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is the thread's
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                                 rank=rank, world_size=world, **wait)

    _interruptible(init)
    return Distributed(rank, world, device)


def _interruptible(fn: Callable[[], None]) -> None:
    """fn() in a thread while this one waits for it: a wait for the job's other processes blocks in C++, where
    Ctrl-C and SIGTERM reach Python only when it ends (at its timeout); here they stop the wait at once."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # raised again in the waiting thread
            failure.append(e)

    thread = threading.Thread(target=target, name="ddmkit-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if failure:
        raise failure[0]


def from_env(device_name: str = "auto", timeout: float = JOIN_TIMEOUT) -> Distributed | None:
    """Join the process group of a launcher that set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    (torchrun does); None outside one or with WORLD_SIZE = 1."""
    if not all(k in os.environ for k in ENV) or int(os.environ["WORLD_SIZE"]) == 1:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if rank == 0:
        print(f"joining a job of {world} processes at {where} as process 0, as RANK and WORLD_SIZE say (a launcher's, "
              f"e.g. torchrun's; waiting up to {timeout:.0f} s for the others)", file=sys.stderr, flush=True)
    try:
        return _join(rank, world, int(os.environ.get("LOCAL_RANK", 0)), device_name, "env://", timeout)
    except (RuntimeError, tdist.DistError) as e:  # DistStoreError: the others never came, or no process 0
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise DDMError(f"process {rank} of {world} waited {timeout:.0f} s for the job's other processes at {where} "
                       "and none came. RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set, so ddmkit joins the "
                       "job of a launcher (torchrun, srun); to train in this process alone, unset them: "
                       "env -u RANK -u WORLD_SIZE -u MASTER_ADDR -u MASTER_PORT ddmkit ...") from None


ERROR_WAIT = 5.0  # seconds a process of a launcher's job waits to learn whether process 0 failed as it did


def say_error_once(message: str, say: Callable[[str], None], wait: float = ERROR_WAIT) -> None:
    """say(message) for the error that ends this process of a launcher's job (torchrun: RANK, WORLD_SIZE > 1,
    MASTER_ADDR and MASTER_PORT set), once for the job where all its processes raised the same one (a config
    check): process 0 says its own and leaves it in torchrun's store (its agent's, at MASTER_ADDR:MASTER_PORT);
    another process says nothing where process 0's was the same, and its own prefixed with its rank otherwise
    ("process 1 of 2: ..."), also where no word of process 0 comes within `wait` seconds (or no agent's store
    is there to ask: a launcher other than torchrun). A stop (SIGTERM: the launcher ends the job because a
    process ended) meanwhile ends the wait without a word. Outside a launcher's job: say(message)."""
    if not all(k in os.environ for k in ENV) or int(os.environ["WORLD_SIZE"]) == 1:
        say(message)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # a store that outlives the processes
    key = f"ddmkit-error/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    if rank == 0:
        say(message)  # first: the launcher stops the others (SIGTERM) once one has ended
        if agent:
            with _quiet_failure():
                _launcher_store(wait).set(key, message)
        return
    try:
        same = agent and _same_as_process_0(key, message, wait)
    except KeyboardInterrupt:  # the launcher stops this process: another said why
        return
    if not same:
        say(f"process {rank} of {world}: {message}")


def _launcher_store(timeout: float):
    """A client of the launcher's store at MASTER_ADDR:MASTER_PORT, connected within `timeout` seconds."""
    return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))


def _same_as_process_0(key: str, message: str, wait: float) -> bool:
    """Whether process 0 left `message` under `key` in the launcher's store within `wait` seconds (looked at
    every 0.1 s, not in one blocking wait: a signal reaches Python between two looks)."""
    deadline = time.monotonic() + wait
    with _quiet_failure():
        store = _launcher_store(wait)
        while time.monotonic() < deadline:
            if store.check([key]):
                return store.get(key).decode() == message
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def _quiet_failure():
    """A store that does not answer (gone, refused, timed out) is no answer: nothing raised."""
    try:
        yield
    except (RuntimeError, OSError, ValueError):  # torch's DistStoreError is a RuntimeError
        pass


def _watch_parent(parent: int) -> None:
    """Send this process SIGTERM once the parent process is gone (reparented: another parent id)."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent(parent: int) -> None:
    """Have this process get SIGTERM when `parent` (its parent's id) dies: on Linux the kernel sends it
    (PR_SET_PDEATHSIG), elsewhere a thread looks every second. A parent gone already ends it at once."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before prctl
            os._exit(1)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _stop_rank(signum, frame) -> None:
    """A spawned process's SIGINT / SIGTERM handler: stop as on Ctrl-C (KeyboardInterrupt: rank 0 removes its
    staging folder, the last checkpoint stays; the stop flag too, for a KeyboardInterrupt Python drops:
    ddmkit.train.stop); signals during that cleanup are ignored, by a handler that does nothing rather than
    SIG_IGN: Ctrl-C to the process group and the command's SIGTERM arrive together, and Python prints a traceback
    ("Signal 15 ignored due to race condition") for a pending signal whose handler became SIG_IGN."""
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    request_stop()
    raise KeyboardInterrupt


def _ignore(signum, frame) -> None:
    """A spawned process's SIGINT / SIGTERM handler once it is stopping: nothing more to do."""


def _exit_now(status: int) -> None:
    """End a spawned process at once with `status`, after flushing what it printed, skipping the interpreter's
    shutdown: gloo's threads can outlive destroy_process_group (DDP holds the group), and one that takes the
    GIL while the interpreter finalizes is unwound by the C++ runtime, which aborts the process ("terminate
    called without an active exception", exit by SIGABRT) after its job had finished."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _worker(local_rank: int, nproc: int, device_name: str, init_method: str, threads: int, errors,
            parent: int, fn: Callable, args: tuple) -> None:
    """Body of a spawned process: stop on SIGINT / SIGTERM and with the parent, join the group, call fn,
    report a DDMError's message to the parent; exit status 0, FAILED (a DDMError) or STOPPED (a signal).
    Any other exception reaches torch's wrapper, which sends the parent its traceback."""
    signal.signal(signal.SIGINT, _stop_rank)  # SIGINT too: a background job's processes inherit it ignored
    signal.signal(signal.SIGTERM, _stop_rank)
    die_with_parent(parent)
    torch.set_num_threads(threads)
    _exit_now(_rank_status(lambda: fn(*args, dist=_join(local_rank, nproc, local_rank, device_name, init_method)),
                           errors))


def _rank_status(job: Callable[[], None], errors) -> int:
    """Run one process's part of the job in a stop scope (fit stops at its next step once _stop_rank set the
    flag, also where the KeyboardInterrupt was lost) and leave the group; its exit status: 0, FAILED (a
    DDMError, its message put in `errors`) or STOPPED. Another exception is raised, unless a stop was asked:
    then it is the collective that the stopped processes left (gloo: the connection closed), a stop too."""
    with stop_scope():
        try:
            job()
            tdist.barrier()  # every process done before any tears the group down (gloo aborts otherwise)
        except DDMError as e:
            errors.put(str(e))
            return FAILED
        except KeyboardInterrupt:
            return STOPPED  # not 0, as torch's wrapper would exit: the parent learns the job did not finish
        except Exception:
            if not stop_requested():
                raise
            return STOPPED
        finally:
            if tdist.is_initialized():
                tdist.destroy_process_group()
    return 0


def _stop(processes: list) -> None:
    """Stop spawned processes as on Ctrl-C (SIGTERM: _stop_rank) and wait for them to exit (30 s, then SIGKILL)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()


class ErrorFiles:
    """Where a spawned process leaves the message of its DDMError for the parent: a file in the job's rendezvous
    folder. Not a multiprocessing queue: its locks are named semaphores that a killed command leaves, and
    Python's resource tracker, which outlives it, said 'There appear to be 2 leaked semaphore objects'."""

    def __init__(self, folder: Path):
        self.folder = folder

    def put(self, message: str) -> None:
        write_bytes_atomic(self.folder / f"error-{os.getpid()}", message.encode())

    def first(self) -> str | None:
        """The message written first, None: none."""
        files = sorted(self.folder.glob("error-*"), key=lambda p: p.stat().st_mtime_ns)
        return files[0].read_text() if files else None


def spawn(fn: Callable, nproc: int, device_name: str, *args) -> None:
    """Call fn(*args, dist=...) in nproc new processes of this machine, one job (process i on GPU i with
    CUDA; the CPU threads split between them, until fn sets its own: train_expert trains on
    train.threads). A DDMError in any of them is raised here. Ctrl-C or SIGTERM here (KeyboardInterrupt) stops
    them and waits for them to clean up; one of them stopped by a signal is a KeyboardInterrupt here."""
    _device(device_name, nproc - 1)  # enough GPUs (with CUDA), checked before starting anything
    threads = max(1, torch.get_num_threads() // nproc)
    with scratch_dir(tempfile.gettempdir(), "ddmkit-ddp") as tmp:
        errors = ErrorFiles(tmp)
        init = (tmp / "store").as_uri()  # a file rendezvous: no port to choose on one machine
        context = mp.start_processes(_worker, (nproc, device_name, init, threads, errors, os.getpid(), fn, args),
                                     nprocs=nproc, join=False, start_method="spawn")
        try:
            while not context.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            message = errors.first()
            if message is not None:
                raise DDMError(message) from None
            if getattr(e, "exit_code", None) == STOPPED:  # a signal reached the processes but not this one
                raise KeyboardInterrupt from None
            raise
        except BaseException:  # Ctrl-C, or SIGTERM where the caller raises on it (ddmkit's command line does)
            _stop(context.processes)
            raise


def check_nproc(nproc: int) -> None:
    """nproc processes asked for: at least 1, and inside a launcher's job (RANK, WORLD_SIZE, ... set) 1 or the
    launcher's number, checked before anything else (before joining its job)."""
    if nproc < 1:
        raise DDMError(f"nproc: must be at least 1 (got {nproc})")
    if all(k in os.environ for k in ENV) and nproc not in (1, int(os.environ["WORLD_SIZE"])):
        raise DDMError(f"--nproc {nproc} inside a launcher that started {os.environ['WORLD_SIZE']} processes "
                       "(WORLD_SIZE); leave --nproc out (the launcher sets the number, e.g. torchrun --nproc-per-node)")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its CPU affinity where the system has one, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def crowded_cpu(nproc: int, threads: int, device_name: str) -> str | None:
    """A warning, in words, when the nproc processes this machine would spawn for one job on the CPU (gloo), each
    on `threads` threads, ask for more threads than it has cores: legal (DDP tried on a laptop), but slow. None
    for one process, a job on CUDA, or the processes of a launcher (torchrun: its own count per node)."""
    kind = device_name.split(":", 1)[0]
    on_cpu = kind == "cpu" or (kind == "auto" and not torch.cuda.is_available())
    cores = cpu_cores()
    if nproc < 2 or not on_cpu or all(k in os.environ for k in ENV) or nproc * threads <= cores:
        return None
    each = f", {counted(threads, 'thread')} each (expert.train.threads)," if threads > 1 else ""
    fits = max(1, cores // threads)
    fix = f"--nproc {fits}" + (" or fewer" if fits > 1 else "")
    if threads > 1 and nproc <= cores:
        fix += f", or --set expert.train.threads={cores // nproc}"
    return (f"--nproc {nproc}: the {nproc} processes{each} share this machine's {counted(cores, 'CPU core')} and "
            f"will be slow; use {fix}, unless the point is to try DDP with gloo")


def run(fn: Callable, nproc: int, device_name: str, *args) -> None:
    """fn(*args, dist=...) as one job: in the processes torchrun started (nproc 1 or their number), else in
    nproc processes spawned on this machine, else (nproc = 1) here, with LOCAL."""
    check_nproc(nproc)
    dist = from_env(device_name)
    if dist is not None:
        try:
            fn(*args, dist=dist)
        finally:
            tdist.destroy_process_group()
    elif nproc > 1:
        spawn(fn, nproc, device_name, *args)
    else:
        fn(*args, dist=LOCAL)


__all__ = ["Distributed", "LOCAL", "blocks", "check_batch", "check_nproc", "cpu_cores", "crowded_cpu",
           "die_with_parent", "from_env", "full_optimizer_state", "full_state", "full_tensor", "is_shard",
           "load_full_optimizer_state", "load_full_state", "run", "say_error_once", "shard_like", "spawn", "unshard"]
