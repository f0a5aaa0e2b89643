"""The distillation jobs: a DDM's routed velocity into one dense network, and a few-step student.

    target = teacher_velocity(ddm, "top-2")          # v_teacher(x_t, t, y): the routed field, as sampled
    train_dense_student(x, labels, target, net, cfg, "RUN/students/dense")
    states = teacher_states(target, x1, grid, substeps=13)      # the teacher's trajectories at the grid times
    train_few_step_student(states, grid, None, net, cfg, "RUN/students/few-step-4-lambda", init=dense.state_dict())

Dense student (one network, `net` = {"arch", "kwargs"} of an expert or of the monolith):

    min_theta E_{x, t, eps} |f_theta(x_t, t) - v_teacher(x_t, t)|^2,    x_t = (1 - t) x + t eps,

x from the run's shards, t ~ U(0, 1), eps ~ N(0, I): the linear path the experts were trained on.
v_teacher = sum_k w_k(x_t, t) v_k(x_t, t) with w the teacher strategy's weights of the router's
probabilities, so the minimiser is v_teacher itself (for a random strategy such as switch, the mean
of its draws: E[v_switch] = sum_k r_k v_k, the full mixture). Class-conditional experts get the rows'
labels (a share `label_dropout` replaced by 'no label', whose teacher is the experts' unconditional field).

Few-step student on a grid 1 = t_0 > t_1 > ... > t_S = 0 (a flow map, as in ddmkit.theory.students, but
one network for all segments): segment i maps x to

    F_i(x) = x + (t_{i+1} - t_i) f_theta(x, t_i),

trained on the teacher's trajectories, min E_{i, x_1} |F_i(x(t_i)) - x(t_{i+1})|^2, from the dense student's
weights (where f_theta = v_teacher, F_i is the Euler step). Sampling is Euler with f_theta on the grid: S
network calls. Both jobs use the one training loop (ddmkit.train.loop.fit) and write model folders
(config.json + model.safetensors + train_log.jsonl) that load as velocity networks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ddmkit.config import TrainConfig, refuse_cuda_graph, resolve_device
from ddmkit.ddm.sampling import PROBE_ROWS, probe_router, start_noise
from ddmkit.flow.path import noise
from ddmkit.io import staging_dir
from ddmkit.nets import build_seeded, save_pretrained
from ddmkit.routing import RoutingState, parse_strategy, routed_velocity
from ddmkit.sample import get_solver
from ddmkit.train.jobs import checkpoint_path, drop_labels
from ddmkit.train.loop import fit

# target(x_t (B, *shape), t (B,), y (B,) or None, generator) -> the teacher's velocity (B, *shape)
Target = Callable[..., torch.Tensor]
# why a dense student's step cannot be one CUDA graph (train.cuda_graph): its teacher target syncs with the host
DENSE_STUDENT_SYNC = ("its teacher's routing waits for the host at every step: a sparse strategy plans the experts' "
                      "calls from the routed weights, and the statistics-only routers copy their statistics to "
                      "the GPU or group rows by label")


def teacher_velocity(ddm, strategy: str) -> Target:
    """The routed velocity of a DDM (ddmkit.ddm.DDM) under one strategy: route, combine, as sample_ddm does at
    every step. Random strategies draw from `generator` (on x's device). The router is probed first on noise
    of its own, as sample_ddm probes it (ddmkit.ddm.sampling.probe_router)."""
    strat = parse_strategy(strategy)
    probe_router(ddm, start_noise(PROBE_ROWS, ddm.data_shape, 0, ddm.device))

    def target(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        cond = None if y is None else {"y": y}
        state = RoutingState(generator=generator, prior=ddm.prior, nearest=ddm.nearest)
        field = routed_velocity(ddm.experts, ddm.router, strat, state, cond=cond,
                                router_cond=cond if ddm.router_conditional else None)
        return field(x, t)

    return target


def _call(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """A velocity network's output, with the labels of a class-conditional one."""
    return model(x, t) if y is None else model(x, t, y=y)


def _save(out_dir, model, net: dict, history: list[dict], extra: dict) -> None:
    """The model folder of a student: the network spec, prediction "velocity", the training and `extra`."""
    save_pretrained(out_dir, model, {"role": "student", "arch": net["arch"], "kwargs": net["kwargs"],
                                     "data_shape": list(net["kwargs"].get("data_shape", [])),
                                     "prediction": "velocity", "final_loss": history[-1]["loss"], **extra})


def train_dense_student(x: torch.Tensor, labels: torch.Tensor | None, target: Target, net: dict, cfg: TrainConfig,
                        out_dir: str | Path, extra: dict | None = None, label_dropout: float = 0.0,
                        description: str = "dense student", teacher: dict | None = None,
                        data: list[str] | None = None) -> Path:
    """Regress a network of spec `net` ({"arch", "kwargs"}) on the teacher's velocity at x_t on the linear
    path from the rows x (see the module docstring); write a model folder. `labels` (class labels) only
    for class-conditional networks (kwargs num_classes > 0). With cfg.bf16 on CUDA the student trains under
    bfloat16 autocast and the teacher's target is still float32.

    Checkpoints as for experts, continued when the job runs again, and only with `teacher`, what identifies
    the target function (ddmkit distill: the strategy and the SHA-256 of the experts' and router's weights),
    which the checkpoint's fingerprint holds with `data` (the rows: e.g. each shard's SHA-256): a checkpoint
    of another teacher or other rows is refused, never continued. Without `teacher` the job neither writes
    nor continues one (it could not tell one teacher's from another's). cfg.cuda_graph is refused: the
    teacher's routing waits for the host (DENSE_STUDENT_SYNC)."""
    refuse_cuda_graph(cfg, "train_dense_student: cfg.cuda_graph", "the dense student", DENSE_STUDENT_SYNC)
    device = resolve_device(cfg.device)
    classes = int(net["kwargs"].get("num_classes", 0))
    model = build_seeded(net["arch"], cfg.seed, **net["kwargs"])
    x = x.float().to(device)
    y_all = labels.long().to(device) if classes else None

    def batch_loss(m, step, gen):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen, device=device)
        x0 = x[idx]
        t = torch.rand(len(x0), generator=gen, device=device)
        xt = noise(x0, t, torch.randn(x0.shape, generator=gen, device=device))
        y = None if y_all is None else drop_labels(y_all[idx], label_dropout, classes, gen)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the target in float32, as sampled
            v = target(xt, t, y, gen).float()
        return F.mse_loss(_call(m, xt, t, y).float(), v), {}  # the student under fit's autocast (train.bf16)

    checkpoint = None if teacher is None else checkpoint_path(out_dir)
    with staging_dir(out_dir) as tmp:
        ema, history = fit(model, batch_loss, cfg, tmp / "train_log.jsonl", description, device, checkpoint,
                           resume=True, data=data, settings={"net": net, "teacher": teacher,
                                                             "label_dropout": label_dropout if classes else None})
        _save(tmp, ema, net, history, {"train": cfg.model_dump(), **(extra or {})})
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return Path(out_dir)


@torch.no_grad()
def teacher_states(target: Target, x1: torch.Tensor, grid: torch.Tensor, substeps: int, solver: str = "euler",
                   labels: torch.Tensor | None = None, batch_size: int = 4096, seed: int = 0) -> torch.Tensor:
    """The teacher's trajectories from x1 (n, *shape) at the times of `grid` (decreasing, 1 -> 0):
    (S + 1, n, *shape), each segment integrated with `substeps` steps of `solver`, batch_size rows at once."""
    gen = torch.Generator(device=x1.device).manual_seed(seed)
    step = get_solver(solver)
    out = []
    for lo in range(0, len(x1), batch_size):
        x = x1[lo:lo + batch_size]
        y = None if labels is None else labels[lo:lo + batch_size]
        field = (lambda xx, tt, y=y: target(xx, tt, y, gen))
        states = [x]
        for t0, t1 in zip(grid[:-1], grid[1:]):
            x = step(field, x, torch.linspace(float(t0), float(t1), substeps + 1, dtype=grid.dtype, device=x.device))
            states.append(x)
        out.append(torch.stack(states))
    return torch.cat(out, dim=1)


def train_few_step_student(states: torch.Tensor, grid: torch.Tensor, labels: torch.Tensor | None, net: dict,
                           cfg: TrainConfig, out_dir: str | Path, init: dict | None = None, extra: dict | None = None,
                           description: str = "few-step student") -> Path:
    """Fit one network f to every segment of `grid` on teacher states (S + 1, n, *shape):
    F_i(x) = x + (t_{i+1} - t_i) f(x, t_i) against x(t_{i+1}); start from the weights `init` (the dense
    student's); write a model folder whose config.json records the grid ("grid", "segments")."""
    device = resolve_device(cfg.device)
    model = build_seeded(net["arch"], cfg.seed, **net["kwargs"])
    if init is not None:
        model.load_state_dict(init)
    states, grid = states.float().to(device), grid.float().to(device)
    segments, n = len(grid) - 1, states.shape[1]
    y_all = None if labels is None else labels.long().to(device)

    def batch_loss(m, step, gen):
        i = torch.randint(0, segments, (cfg.batch_size,), generator=gen, device=device)
        j = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=device)
        x, t, h = states[i, j], grid[i], (grid[i + 1] - grid[i]).reshape(-1, *[1] * (states.dim() - 2))
        y = None if y_all is None else y_all[j]
        return F.mse_loss(x + h * _call(m, x, t, y).float(), states[i + 1, j]), {}

    with staging_dir(out_dir) as tmp:
        ema, history = fit(model, batch_loss, cfg, tmp / "train_log.jsonl", description, device)
        _save(tmp, ema, net, history, {"train": cfg.model_dump(), "segments": segments, "grid": grid.tolist(),
                                       **(extra or {})})
    return Path(out_dir)


__all__ = ["teacher_states", "teacher_velocity", "train_dense_student", "train_few_step_student"]
