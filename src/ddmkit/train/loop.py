"""The one training loop, used for experts, the monolith and routers.

    ema_model, history = fit(model, batch_loss, cfg)

`batch_loss(model, step, generator) -> (loss, {name: value})` draws its own
batch with the generator, so a run is fully determined by cfg.seed (its values,
averaged and logged, are numbers or tensors; tensors are read only at a log row,
and under cfg.cuda_graph a number would stay the captured step's). The loop
does AdamW, linear warm-up then cosine (or constant) learning rate, gradient
clipping by global norm, and an exponential moving average of the weights
(EMA, with the usual warm-up
min(decay, (1 + n) / (10 + n)), no host sync per step); it logs JSON lines every cfg.log_every steps:
the step, the learning rate that step used, the seconds since the start, and the loss and grad_norm
(and batch_loss's values; concurrent experts' each expert's norm as grad_norm_K, clip_gradients) averaged
over the steps since the previous row.

With `checkpoint=PATH` and cfg.checkpoint_every = N > 0 it writes the whole
state (weights, optimizer, EMA, RNG states, step) to PATH atomically every N
steps; `resume=True` restores PATH if it exists and continues bit-for-bit, so
a killed job ends with the same weights as one that never stopped. A checkpoint
of other settings (`settings`: cfg, and for an expert its network, path,
prediction and label dropout), network, job or training data (`data`) is
refused (DDMError); how the job runs (device, threads, logging, checkpoint
cadence, DDP or FSDP) may change. A value that a checkpoint of earlier ddmkit did
not sum (e.g. stacked experts' grad_norm_K) is left out of the row that checkpoint
falls in: its mean would hold only the steps after it.

With cfg.tensorboard the same log rows also go to TensorBoard event files in
tensorboard/ beside log_path (in the model folder): one scalar per logged value
("loss", "lr", "grad_norm", ...) at its step; a resumed job writes the rows
before its checkpoint again, so the folder holds the whole curve.

`dist` (ddmkit.train.distributed) makes it one process of a data-parallel job:
the network is DDP-wrapped or sharded by FSDP (cfg.parallel), logged values are
averaged over the processes at each log row and checkpoint, and only rank 0
writes checkpoints. Under FSDP the EMA is sharded as the model is, every process
gathers the whole state for a checkpoint (rank 0 writes it), and the returned
EMA model is whole. The default, LOCAL, changes nothing.

With cfg.cuda_graph on CUDA (one process) the step, from batch_loss through the EMA, runs eagerly
GRAPH_WARMUP times and is then captured as one CUDA graph that every later step replays
(ddmkit.accel.step_graph says what batch_loss may then do). AdamW is then fused and capturable, reading its
rate from a tensor that the scheduler fills between replays, and the EMA computes its weight on the
device; a resumed job captures again after its own eager steps, and eager steps and replays give the same
bits, so it still ends as one that never stopped.

Before each step the loop looks at this thread's stop flag (ddmkit.train.stop) and
raises KeyboardInterrupt when it is set: a job stopped by a signal or by another
thread ends there even when the KeyboardInterrupt raised into it was lost.
"""
from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ddmkit.accel.step_graph import GRAPH_WARMUP, capture_step
from ddmkit.config import TrainConfig, resolve_device
from ddmkit.errors import DDMError
from ddmkit.progress import progress_bar
import ddmkit.train.checkpoint as ckpt
from ddmkit.train.distributed import LOCAL, Distributed, full_tensor, is_shard, shard_like, unshard
from ddmkit.train.stop import check_stop

BatchLoss = Callable[[nn.Module, int, torch.Generator], tuple[torch.Tensor, dict]]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        span = max(cfg.steps - cfg.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup, span) / span))
    return f


class EMA(nn.Module):
    """Exponential moving average of a model's parameters and buffers.

    decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update (n = 0, 1, ...): the warm-up
    lets the average forget the initial weights; with a fixed 0.999 a 2000-step run keeps
    0.999^2000 = 13.5% of the random initial weights in the EMA, which shows as speckle noise
    in samples. The update is one foreach lerp with a Python scalar weight: no host sync (under FSDP
    two: the plain tensors, then the shards). With weight_on_device (a step that a CUDA graph replays, where a
    Python number would stay the one captured) the weight 1 - decay_n is computed on the device from
    n_averaged, and the update is ema += w (model - ema) in three foreach calls.
    The state_dict matches torch's AveragedModel ("module.*", "n_averaged"), so checkpoints
    keep their format."""

    def __init__(self, model: nn.Module, decay: float, weight_on_device: bool = False):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = decay
        self.weight_on_device = weight_on_device
        device = next(model.parameters()).device
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self._n = 0  # host copy of n_averaged
        self._lists = None

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._lists is None or self._lists[0] is not model:
            mine = list(self.module.parameters()) + list(self.module.buffers())
            theirs = list(model.parameters()) + list(model.buffers())
            floats = [(a.detach(), b.detach()) for a, b in zip(mine, theirs) if a.is_floating_point()]
            others = [(a.detach(), b.detach()) for a, b in zip(mine, theirs) if not a.is_floating_point()]
            kinds = [[(a, b) for a, b in floats if is_shard(a) == shard] for shard in (False, True)]  # FSDP's apart
            self._lists = (model, [([a for a, _ in kind], [b for _, b in kind]) for kind in kinds if kind], others)
        _, groups, others = self._lists
        for ema_t, model_t in groups:  # plain tensors, then DTensors (one foreach call takes one kind)
            if self.weight_on_device:  # decay_at(n) computed on the device: a replay reads n, not a captured number
                n = self.n_averaged.double()
                diffs = torch._foreach_sub(model_t, ema_t)
                torch._foreach_mul_(diffs, (1.0 - torch.clamp((1 + n) / (10 + n), max=self.decay)).float())
                torch._foreach_add_(ema_t, diffs)
            else:
                torch._foreach_lerp_(ema_t, model_t, 1.0 - self.decay_at(self._n))
        for a, b in others:
            a.copy_(b)
        self.n_averaged.add_(1)
        self._n += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._n = int(self.n_averaged)
        return out


def summary_writer():
    """TensorBoard's SummaryWriter class (train.tensorboard = true), or a DDMError saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DDMError("train.tensorboard = true needs the tensorboard package: pip install 'ddmkit[tensorboard]' "
                       "(or pip install tensorboard), or set tensorboard = false") from None
    return SummaryWriter


def tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter writing to `folder` (train.tensorboard = true)."""
    return summary_writer()(log_dir=str(folder))


def write_row(log, board, row: dict) -> None:
    """One log row to the JSON-lines file and to TensorBoard (each when open)."""
    if log:
        log.write(json.dumps(row) + "\n")
    if board is not None:
        for name, value in row.items():
            if name != "step":
                board.add_scalar(name, value, row["step"])


def clip_gradients(model: nn.Module, max_norm: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip by global norm, or by the model's own rule when it has one (stacked and streamed experts clip each
    expert by its own norm, so none depends on another). Returns the norm before clipping, a plain tensor (under
    FSDP the shards' norm is a DTensor: gathered; concurrent experts: the largest), and the norms to log beside
    it: concurrent experts' each, {"grad_norm_0": ..., "grad_norm_1": ...}; none otherwise."""
    if hasattr(model, "clip_grad_norms_"):  # ddmkit.train.stacked and ddmkit.train.streamed
        norms = model.clip_grad_norms_(max_norm)
        return norms.max(), {f"grad_norm_{k}": norm for k, norm in enumerate(norms)}
    if hasattr(model, "clip_grad_norm_"):
        return model.clip_grad_norm_(max_norm), {}
    return full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)), {}


def job_fingerprint(model: nn.Module, cfg: TrainConfig, description: str = "training", data: list[str] | None = None,
                    settings: dict | None = None) -> dict:
    """The fingerprint fit records in the checkpoints of a job (its arguments of the same names) and compares on
    resuming; a job's model built on the meta device gives the same."""
    return ckpt.fingerprint({**(settings or {}), "train": cfg.model_dump()}, model, description, data)



def compile_mode(cfg: TrainConfig, graphed: bool) -> str:
    """torch.compile's mode for cfg.compile_mode: under train.cuda_graph the whole step is already one graph, so
    'max-autotune' keeps its kernel tuning and leaves out the CUDA graphs it would capture inside ours."""
    return "max-autotune-no-cudagraphs" if graphed and cfg.compile_mode == "max-autotune" else cfg.compile_mode

def fit(model: nn.Module, batch_loss: BatchLoss, cfg: TrainConfig, log_path: str | Path | None = None,
        description: str = "training", device: torch.device | None = None,
        checkpoint: str | Path | None = None, resume: bool = False,
        dist: Distributed = LOCAL, data: list[str] | None = None,
        settings: dict | None = None, resumed: Callable[[], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train `model` in place; return its EMA copy (eval mode) and the log rows. The checkpoint's fingerprint
    holds cfg, `settings`, the rest of what decides what is trained as a config section's table (e.g. an
    expert's net, path, prediction and label_dropout), and `data`, the training data (e.g. each shard's
    SHA-256): resuming with other settings or on other data is refused. A stop asked of this thread's stop
    scope (ddmkit.train.stop) raises KeyboardInterrupt before the next step. resumed() is called once a
    checkpoint was accepted and restored (e.g. to say that the job continues from it)."""
    device = device or resolve_device(cfg.device)
    graphed = cfg.cuda_graph and device.type == "cuda"  # the step as one CUDA graph (ignored off CUDA: CPU, MPS)
    if graphed and dist.world > 1:
        raise DDMError("train.cuda_graph captures one process's whole step, and a job of several processes "
                       "exchanges gradients inside it: set cuda_graph = false, or train with one process")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay, weight_on_device=graphed)  # copied before wrap: FSDP's cannot be copied
    net = dist.wrap(model, cfg.parallel)  # DDP or FSDP over the job's processes; the model itself for one
    shard_like(ema.module, model)  # FSDP: the EMA sharded as the model (nothing otherwise)
    if cfg.compile and device.type == "cuda":  # the same parameters, compiled
        net = torch.compile(net, mode=compile_mode(cfg, graphed))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(cfg.lr, device=device) if graphed else cfg.lr,
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda", capturable=graphed)
    if graphed:
        opt.param_groups[0]["initial_lr"] = cfg.lr  # the schedule's base a number: filling the rate needs no sync
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    history: list[dict] = []
    running: dict[str, float] = {}
    first = 0
    fp = job_fingerprint(model, cfg, description, data, settings)
    summed: set[str] = set()  # the values whose sums a checkpoint written between two rows holds
    if resume and checkpoint is not None and Path(checkpoint).exists():
        first, history, running = ckpt.load_checkpoint(checkpoint, model=model, ema=ema, opt=opt, sched=sched,
                                                       generator=generator, fp=fp, device=device)
        summed = set(running)
        if graphed:  # a checkpoint holds the rate as a number: the graph's optimizer reads it from a tensor
            opt.param_groups[0]["lr"] = torch.tensor(float(opt.param_groups[0]["lr"]), device=device)
        if resumed is not None:
            resumed()
    board = tensorboard_writer(Path(log_path).parent / "tensorboard") if log_path and cfg.tensorboard else None
    log = open(log_path, "w") if log_path else None
    for row in history if log else ():
        write_row(log, board, row)

    def train_step(step: int) -> dict:
        """One step on gradients that are None; the values to log, as tensors (no host sync). Captured
        (train.cuda_graph), every replay repeats the capture's `step`: batch_loss must not depend on it."""
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda",
                            cache_enabled=not graphed):  # a graph cannot keep autocast's cache past its capture
            loss, metrics = batch_loss(net, step, generator)
        loss.backward()
        grad_norm, part_norms = clip_gradients(model, cfg.grad_clip)
        opt.step()
        ema.update_parameters(model)
        return {"loss": loss.detach(), "grad_norm": grad_norm, **metrics, **part_norms}

    rate = lr_lambda(cfg)  # the schedule's factor at a step (LambdaLR's own; its get_last_lr() may be a tensor)
    replay = None  # train.cuda_graph: the step captured after GRAPH_WARMUP eager ones (ddmkit.accel.step_graph)
    stream = torch.cuda.Stream(device) if graphed else None  # eager steps, capture and replays: one stream
    on_stream = torch.cuda.stream(stream) if graphed else nullcontext()
    if graphed:
        stream.wait_stream(torch.cuda.current_stream(device))
    start = time.perf_counter()
    try:
        with progress_bar(description, cfg.steps) as advance, on_stream:
            advance(first)
            for step in range(first, cfg.steps):
                check_stop()  # a stop whose KeyboardInterrupt was lost (in a __del__, say) ends the job here
                if replay is None:  # an eager step, or the capture: gradients None (a replay writes them anew)
                    opt.zero_grad(set_to_none=True)
                    if graphed and step == first + GRAPH_WARMUP:  # captured, not run: the replay below runs it
                        replay = capture_step(lambda: train_step(step), generator, stream)
                values = replay() if replay is not None else train_step(step)
                lr = cfg.lr * rate(step)  # the rate this step used (sched.step() sets the next step's)
                sched.step()
                for name, value in values.items():
                    value = value.detach().float() if torch.is_tensor(value) else value  # no host sync per step
                    running[name] = running.get(name, 0.0) + value
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    running = dist.mean(running)
                    n = step + 1 - (history[-1]["step"] if history else 0)
                    means = {k: float(v) / n for k, v in running.items() if not summed or k in summed}
                    row = {"step": step + 1, "lr": lr,  # seconds after the means: float() waited for the GPU
                           "seconds": round(time.perf_counter() - start, 3), **means}
                    running, summed = {}, set()
                    if not math.isfinite(row["loss"]):  # every process sees the same mean: all stop
                        raise DDMError(f"{description}: the loss is {row['loss']} at step {step + 1}: training "
                                       "diverged (no model folder was written). Lower train.lr, keep train.grad_clip, or check "
                                       "the data for extreme values")
                    history.append(row)
                    write_row(log, board, row)
                    advance(0, loss=row["loss"])
                advance(1)
                if checkpoint is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    running = dist.mean(running)  # the job's sums: rank 0's checkpoint resumes every process
                    state = ckpt.training_state(model, ema, opt)  # every process: gathering FSDP's shards
                    if dist.is_main:
                        ckpt.save_checkpoint(checkpoint, step=step + 1, **state, sched=sched, generator=generator,
                                             history=history, running=running, fp=fp)
    finally:
        if graphed:
            torch.cuda.current_stream(device).wait_stream(stream)
        if log:
            log.close()
        if board is not None:
            board.close()
    ema_model = unshard(ema.module)  # FSDP: every process gathers the whole EMA; the module itself otherwise
    ema_model.eval()
    return ema_model, history
