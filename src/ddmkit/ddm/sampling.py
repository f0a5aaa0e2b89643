"""Routed sampling: one strategy, one solver, the same starting noise for every strategy.

    x0, info = sample_ddm(ddm, "top-2", n=1000, steps=50, solver="euler", seed=0)
    x0, info = sample_single(monolith, data_shape, n=1000, steps=50)     # one velocity field

info holds the expert evaluations per sample, router calls, wall time and
the number of velocity evaluations. GPU speed (CUDA graphs, streams, padding,
autocast) is applied at one point, through `speed` (ddmkit.accel.SpeedOptions).
"""
from __future__ import annotations

import numbers
import time

import torch

from ddmkit.accel import SpeedOptions, accelerate_field, autocast
from ddmkit.config import SampleConfig, resolve_device, validate
from ddmkit.errors import DDMError
from ddmkit.routing import (CallCounter, RoutingState, Strategy, parse_strategy, redraws_each_evaluation,
                            routed_velocity)
from ddmkit.routing.combine import check_router_output
from ddmkit.sample import get_solver, time_grid

COUNTS = ("n", "steps", "seed", "batch_size", "router_every")
PROBE_ROWS = 4  # rows of the starting noise the router is probed on, once per sample call
PROBE_TIMES = (1.0, 0.5, 0.1)


def start_noise(n: int, data_shape, seed: int, device="cpu") -> torch.Tensor:
    """x_1 ~ N(0, I) (n, *data_shape), the same for a given seed whatever the strategy.

    The same seed and n give the same noise, but n rows are not always the first n rows of a larger
    draw (torch.randn's values depend on its size): take the first rows of a larger draw to reproduce
    a subset, as the pipeline does (start_noise(N, ...)[:n])."""
    checked = checked_arguments("start_noise", n=n, seed=seed)
    shape = checked_shape(data_shape, "start_noise")
    device = checked_device(device, "start_noise")
    return torch.randn(checked.n, *shape, generator=torch.Generator().manual_seed(checked.seed)).to(device)


def whole(value, name: str) -> int:
    """value as an int, or a DDMError naming `name` (floats, strings and bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DDMError(f"{name}: {value!r} ({type(value).__name__}) is not an integer; pass an int")
    return int(value)


def checked_device(device, caller: str) -> torch.device:
    """`device` (cpu, cuda, cuda:N, mps, or auto: cuda when there is one, else cpu) as a torch.device of
    this machine, or a DDMError naming the caller and the argument (config.resolve_device)."""
    return resolve_device(device, f"{caller}: device: {device!r}",
                          "pass device='cpu', or 'auto' (cuda when there is one)")


def checked_arguments(caller: str, n, seed, steps=None, solver=None, batch_size=None, router_every=None,
                      callback=None) -> SampleConfig:
    """The sampling arguments given (None: not given) with the bounds `ddmkit sample` has
    (config.SampleConfig; counts are ints), or a DDMError opening with `caller` and naming the argument.
    A callback sees whole trajectories, so it needs batch_size None or >= n."""
    given = {"n": n, "seed": seed, "steps": steps, "solver": solver, "batch_size": batch_size,
             "router_every": router_every}
    given = {key: whole(value, f"{caller}: {key}") if key in COUNTS else value
             for key, value in given.items() if value is not None}
    checked = validate(SampleConfig, {**given, "strategies": []}, caller, "arguments")  # the config's list aside
    if callback is not None and not callable(callback):
        raise DDMError(f"{caller}: callback: {type(callback).__name__} is not callable; pass a function of one "
                       "argument, a dict with i, t, t_next, x and v of each step (or None)")
    if callback is not None and checked.batch_size is not None and checked.batch_size < checked.n:
        raise DDMError(f"{caller}: callback: a callback sees whole trajectories, so it needs all {checked.n} rows "
                       f"in one batch; got batch_size={checked.batch_size}: pass batch_size=None")
    return checked


def checked_speed(speed, caller: str) -> None:
    """speed must be a SpeedOptions, or a DDMError naming the caller."""
    if not isinstance(speed, SpeedOptions):
        raise DDMError(f"{caller}: speed: {type(speed).__name__} is not a SpeedOptions; pass "
                       "ddmkit.SpeedOptions(...), e.g. speed=SpeedOptions(cuda_graphs=True)")


def checked_guidance(guidance, caller: str, num_classes: int | None = None) -> float:
    """`guidance` as a float from 0 to 1000 (the bounds of `ddmkit sample`), and 1 unless the experts are
    class-conditional (num_classes > 0; None: not known yet), or a DDMError naming the caller."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise DDMError(f"{caller}: guidance: {guidance!r} is not a number; pass a float from 0 to 1000")
    guidance = validate(SampleConfig, {"guidance": guidance}, caller, "arguments").guidance
    if num_classes == 0 and guidance != 1.0:
        raise DDMError(f"{caller}: guidance: {guidance:g}; classifier-free guidance would need class-conditional "
                       "experts (num_classes > 0), and this DDM's are unconditional: leave guidance at 1")
    return guidance


def checked_shape(data_shape, caller: str) -> tuple[int, ...]:
    """data_shape (a tuple, list or torch.Size of positive ints) as a tuple, or a DDMError naming the caller."""
    ok = isinstance(data_shape, (tuple, list, torch.Size)) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in data_shape)
    if not ok:
        raise DDMError(f"{caller}: data_shape: {data_shape!r} is not a shape; pass a tuple of positive ints, e.g. "
                       "(2,) for vectors of 2 numbers")
    return tuple(int(d) for d in data_shape)


def routing_generator(seed: int, device) -> torch.Generator:
    """The generator of the strategies' draws when sampling with `seed` (the noise takes seed itself):
    seeded with seed + 1, so the same seed gives the same routing."""
    return torch.Generator(device=device).manual_seed(seed + 1)


def checked_cond(ddm, cond, n: int, device, caller: str) -> dict[str, torch.Tensor] | None:
    """cond as the experts and router get it: None, or {"y": class labels (n,)} for a DDM that reads labels
    (class-conditional experts, p(cluster | label) or a label-conditional router), checked by
    checked_class_labels where the DDM knows its classes; else a DDMError naming the caller."""
    if cond is not None and (not isinstance(cond, dict) or set(cond) - {"y"}):
        what = sorted(map(str, cond)) if isinstance(cond, dict) else type(cond).__name__
        raise DDMError(f"{caller}: cond: {what}; accepted: None or {{'y': class labels (n,)}}")
    if not cond:
        return None
    if not (ddm.num_classes or ddm.label_prior is not None or ddm.router_conditional):
        raise DDMError(f"{caller}: labels need class-conditional experts (num_classes > 0), p(cluster | label) "
                       "(label_prior) or a label-conditional router; this DDM has none: leave the labels out")
    classes = len(ddm.label_prior) if ddm.label_prior is not None else ddm.num_classes or ddm.router_classes
    return {"y": checked_class_labels(cond["y"], n, classes or None, device, caller)}


def start_rows(n: int, data_shape, seed: int, device="cpu", x1: torch.Tensor | None = None,
               caller: str = "sample_ddm") -> torch.Tensor:
    """The rows sampling starts from: x1 when given, checked (a finite float32 torch tensor of shape
    (n, *data_shape)), where they are; else start_noise on `device` (checked_device, naming `caller`)."""
    if x1 is None:
        return start_noise(n, data_shape, seed, checked_device(device, caller))
    want = (n, *data_shape)
    if not isinstance(x1, torch.Tensor) or x1.dtype != torch.float32 or tuple(x1.shape) != want:
        got = f"{x1.dtype} {tuple(x1.shape)}" if isinstance(x1, torch.Tensor) else type(x1).__name__
        raise DDMError(f"x1: the starting noise must be a float32 torch tensor of shape {want} (n rows of "
                       f"data_shape); got {got}; pass torch.as_tensor(x1, dtype=torch.float32) with n = len(x1)")
    # finite iff its min and max are (a NaN propagates to both): no copy of the rows, where isfinite(x1) on a
    # GPU held 1.5x their bytes besides them (measured: |x1| in float32, then its masks)
    if not bool(torch.isfinite(torch.stack(torch.aminmax(x1))).all()):
        raise DDMError("x1: the starting noise holds NaN or infinite values; every sample would be NaN (draw it "
                       "with ddmkit.start_noise or torch.randn)")
    return x1


def router_values_problem(probs: torch.Tensor) -> str | None:
    """What is wrong with a router's probabilities (B, K) as values, or None: finite, >= 0, each row summing to
    1 within its dtype's rounding (1e-3 for float32; float16 and bfloat16 rows are rounded coarser)."""
    p = probs.detach().double()
    if p.isnan().any():
        return "NaN"
    if p.isinf().any():
        return "infinite values"
    if (p < 0).any():
        return f"negative values (as low as {p.min().item():.3g})"
    off = (p.sum(1) - 1).abs()
    if off.max() > max(1e-3, 4 * torch.finfo(probs.dtype).eps):
        return f"a row summing to {p.sum(1)[off.argmax()].item():.4g} (not 1)"
    return None


def probe_router(ddm, x1: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
                 speed: SpeedOptions = SpeedOptions()) -> None:
    """The router once on the first rows of the starting noise at a few times (PROBE_TIMES), before any step:
    probabilities (B, K) (routing.combine.check_router_output) with values router_values_problem accepts; else
    a DDMError naming the router. The sampler's own routings are not read (a host sync at every step); this
    reads a few rows once, with the global RNG kept (a router that draws does not change the samples).
    ddm: a DDM, or any object with its router and k (and meta, router_conditional where it has them)."""
    x = x1[:PROBE_ROWS]
    conditional = cond and getattr(ddm, "router_conditional", False)
    router_cond = {name: c[:PROBE_ROWS] for name, c in cond.items()} if conditional else {}
    meta = getattr(ddm, "meta", {})
    kind = meta.get("router") or meta.get("kind", "custom")
    gpu = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=gpu), autocast(speed, x.device):
        for t in PROBE_TIMES:
            probs = ddm.router(x, torch.full((len(x),), t, device=x.device), **router_cond)
            check_router_output(probs, x, ddm.k)
            problem = router_values_problem(probs)
            if problem is not None:
                raise DDMError(f"the router ({kind!r}) returned, on the starting noise at t = {t:g}, {problem}; "
                               "a router returns probabilities (B, K): finite, >= 0, rows summing to 1. Check its "
                               "last layer (a softmax over the experts), or retrain a run's router with `ddmkit "
                               "train-router RUN`")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def sample_field(velocity, x1: torch.Tensor, steps: int, solver: str, callback=None) -> torch.Tensor:
    ts = time_grid(steps, dtype=torch.float32).to(x1.device)
    return get_solver(solver)(velocity, x1, ts, callback=callback)


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    """Row ranges of at most batch_size rows covering n (one range when batch_size is None)."""
    size = n if batch_size is None else batch_size
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def samples_in_place_of(x1: torch.Tensor, ours: bool, out: torch.Tensor | None, caller: str) -> torch.Tensor:
    """Where the chunks' samples are written: into `out` when the caller gives it (checked: a float32 tensor
    of x1's shape on its device; x1 itself is allowed), over the noise when no one else holds it (drawn
    here, no callback), else a new tensor. A chunk's rows are integrated, then replaced by their samples,
    so writing over the noise holds n rows of data on the device however many chunks there are, not 2n."""
    if out is None:
        return x1 if ours else torch.empty_like(x1)
    if not isinstance(out, torch.Tensor) or out.dtype != x1.dtype or out.shape != x1.shape \
            or out.device != x1.device:
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else \
            type(out).__name__
        raise DDMError(f"{caller}: out: {got}, but the samples are {x1.dtype} {tuple(x1.shape)} on {x1.device}; "
                       "pass out=x1 (the samples replace the noise) or torch.empty_like(x1)")
    return out


def _rows(cond: dict[str, torch.Tensor] | None, rows: slice) -> dict[str, torch.Tensor] | None:
    return None if cond is None else {name: c[rows] for name, c in cond.items()}


def checked_class_labels(labels, n: int, classes: int | None, device, caller: str = "sample_ddm") -> torch.Tensor:
    """`labels` as a long tensor (n,) on `device`: ints 0 .. classes - 1, or classes ("no label"); any
    ints >= 0 where classes is None (a router of the user's, whose classes the DDM does not know); a list
    or numpy array of ints is converted. Else a DDMError naming the caller and labels."""
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        y = None
    if y is None or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        what = type(labels).__name__ if y is None else f"{type(labels).__name__} of {y.dtype}"
        raise DDMError(f"{caller}: labels: a {what}, not integer class labels; pass ints (a tensor, list or "
                       "numpy array of ints)")
    if tuple(y.shape) != (n,):
        raise DDMError(f"{caller}: labels: shape {tuple(y.shape)}, but n = {n}; pass one label per sample, "
                       f"shape ({n},)")
    if classes is None:
        bad = y[y < 0].unique().tolist()
        if bad:
            raise DDMError(f"{caller}: labels {bad[:10]} are negative; class labels are ints >= 0")
        return y.long().to(device)
    bad = y[(y < 0) | (y > classes)].unique().tolist()
    if bad:
        raise DDMError(f"{caller}: labels {bad[:10]} are not class labels of these experts; accepted: 0 .. "
                       f"{classes - 1}, or {classes} for 'no label'")
    return y.long().to(device)


def sample_ddm(ddm, strategy: str | Strategy, n: int, steps: int = 50, solver: str = "euler", seed: int = 0,
               device="cpu", x1: torch.Tensor | None = None, callback=None, router_every: int = 1,
               cond: dict[str, torch.Tensor] | None = None, batch_size: int | None = None,
               speed: SpeedOptions = SpeedOptions(), out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Sample a DDM (ddmkit.ddm.DDM) with one routing strategy from x1 ~ N(0, I) (fixed by seed), or
    from the rows x1 given (a float32 tensor (n, *data_shape); see start_rows). device: where the noise
    is drawn and sampling runs (cpu, cuda, cuda:N, mps or auto); with x1, where x1's rows are.

    router_every = m reuses the routing for m velocity evaluations (1: route every time);
    cond = {"y": class labels (n,)} (or None), passed to the experts (checked_cond); it reaches
    the router too when the DDM's router is label-conditional, and with labels the oracle draws
    each sample's cluster from p(cluster | label) (ddm.label_prior) instead of the cluster sizes
    (the label C = num_classes, "no label", from the cluster sizes);
    batch_size = b integrates the n rows in chunks of at most b rows, one after another, to bound
    memory: the same noise, the same samples to rounding for the deterministic strategies, and
    for the random ones the same law with other draws (one generator, used chunk after chunk);
    speed = how the networks run on a GPU (ddmkit.accel.SpeedOptions: CUDA graphs, streams,
    autocast); the networks are prepared once per DDM and options (DDM.networks);
    out = the tensor the samples are written into (x1 itself may be given: each chunk's noise is read
    before its samples take its place, so the device holds n rows, not 2n; noise drawn here is written
    over without it), returned as the samples.
    A callback sees whole trajectories only, so it needs batch_size None or >= n. Bad arguments are
    DDMErrors naming them (checked_arguments, checked_cond; the device where it is used: start_rows),
    as in DDM.sample."""
    checked = checked_arguments("sample_ddm", n, seed, steps, solver, batch_size, router_every, callback)
    checked_speed(speed, "sample_ddm")
    if isinstance(strategy, str) and strategy.strip() in ("monolith", "exact"):
        raise DDMError(f"strategy {strategy.strip()!r} is not a routing of the DDM's experts: sample the monolith of "
                       "a run with ddmkit.ddm.sample_single(ddmkit.ddm.load.monolith_field(RUN), data_shape, n) (what "
                       "`ddmkit sample RUN --strategy monolith` does), and a mixture's exact DDM with "
                       "`ddmkit sample RUN --strategy exact`")
    if isinstance(strategy, Strategy):  # an object of the user's, used once without a name in STRATEGIES
        strat, strategy = strategy, str(getattr(strategy, "name", type(strategy).__name__))
    else:
        # the name as given, less spaces around it; gated-K@A (the analysis sampler's) refused and not listed
        strat, strategy = parse_strategy(strategy, sampled=True), strategy.strip()
    if checked.solver == "adaptive" and redraws_each_evaluation(strat):
        raise DDMError(f"sample_ddm: solver 'adaptive' with strategy {strategy!r}: it draws its experts anew at every "
                       "evaluation, which the adaptive step-size control cannot settle; use euler, heun, midpoint "
                       "or rk4")
    drawn = x1 is None
    x1 = start_rows(checked.n, ddm.data_shape, checked.seed, device, x1, "sample_ddm")
    samples = samples_in_place_of(x1, drawn and callback is None, out, "sample_ddm")  # (a callback may keep states)
    cond = checked_cond(ddm, cond, checked.n, x1.device, "sample_ddm")
    gen = routing_generator(checked.seed, x1.device)
    prior = ddm.prior
    if ddm.label_prior is not None and cond is not None:
        no_label = ddm.prior.reshape(1, -1).to(ddm.label_prior)  # label C, "no label": the clusters' sizes
        prior = torch.cat([ddm.label_prior, no_label]).to(x1.device)[cond["y"]]  # (n, K) p(cluster | y) per sample
    per_row_prior = prior is not None and prior.dim() == 2
    probe_router(ddm, x1, cond, speed)
    counter = CallCounter(ddm.k)
    nets = ddm.networks(speed, x1.device)
    nfe = []
    _sync(x1.device)
    start = time.perf_counter()
    with autocast(speed, x1.device):
        for rows in _chunks(len(x1), checked.batch_size):
            state = RoutingState(generator=gen, prior=prior[rows] if per_row_prior else prior, nearest=ddm.nearest)
            part_cond = _rows(cond, rows)
            field = routed_velocity(nets.experts, nets.router, strat, state, counter, cond=part_cond,
                                    router_every=checked.router_every,
                                    router_cond=part_cond if ddm.router_conditional else None,
                                    call_experts=nets.call_experts)
            samples[rows] = _integrate_counted(field, x1[rows], checked.steps, checked.solver, callback, nfe)
    _sync(x1.device)
    wall = time.perf_counter() - start
    missing = set(ddm.meta.get("missing_experts", []))  # the dense path calls their zero stand-in: not counted
    rows = [0 if k in missing else r for k, r in enumerate(counter.expert_rows)]
    return samples, {"strategy": strategy, "expert_calls_per_sample": sum(rows) / len(x1),
                              "router_calls": counter.router_calls, "velocity_evaluations": _per_trajectory(nfe),
                              "wall_time": wall, "expert_rows": rows}


def _integrate_counted(field, x1: torch.Tensor, steps: int, solver: str, callback, nfe: list[int]) -> torch.Tensor:
    """One trajectory of the field from x1; appends its number of field evaluations to nfe."""
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return field(x, t)

    x0 = sample_field(counted, x1, steps, solver, callback)
    nfe.append(calls[0])
    return x0


def _per_trajectory(nfe: list[int]) -> int:
    """Velocity evaluations of one trajectory (the chunks' mean: they differ only for the adaptive solver)."""
    return round(sum(nfe) / len(nfe))


def check_field_shape(field, data_shape: tuple[int, ...]) -> None:
    """A network's field (a NetworkField: a loaded monolith or student; or an nn.Module) is sampled with the data
    shape its network was built for: another one is a DDMError naming both (it was torch's shape error from inside the
    network). A field of no known shape (a function) is not checked."""
    built = getattr(network_of(field), "data_shape", None)
    if built is not None and tuple(built) != data_shape:
        raise DDMError(f"sample_single: data_shape {data_shape} is not the shape the field's network was built for, "
                       f"{tuple(built)}; pass data_shape={tuple(built)} (the run's data shape)")


def network_of(field) -> torch.nn.Module | None:
    """The network of a field: the field itself when it is an nn.Module, a NetworkField's network, else None."""
    return field if isinstance(field, torch.nn.Module) else getattr(field, "network", None)


def probe_field_shape(field, x1: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
                      speed: SpeedOptions = SpeedOptions()) -> None:
    """A network of no data_shape attribute (a user's nn.Module, which check_field_shape cannot check) is called
    once on the first row of the starting noise at t = 1 (the first step), with the global RNG kept: an output
    of another shape than its input is a DDMError naming data_shape and the output's shape (it was torch's error
    from inside the solver, or a silent broadcast), and so is an error the network raises on that row (a Linear of
    another width), naming what it was given, with torch's message kept. Fields that are no network (functions)
    are not called."""
    network = network_of(field)
    if not isinstance(network, torch.nn.Module) or getattr(network, "data_shape", None) is not None:
        return
    x = x1[:1].clone()
    row_cond = _rows(cond, slice(0, 1)) or {}
    gpu = [x.device] if x.device.type == "cuda" else []
    training = network.training  # in eval mode: a network left training (BatchNorm) keeps its statistics
    network.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=gpu), autocast(speed, x.device):
            v = field(x, torch.ones(1, dtype=x.dtype, device=x.device), **row_cond)
    except DDMError:
        raise
    except Exception as err:  # torch's own error from inside the network (a Linear of another width)
        raise DDMError(f"sample_single: data_shape {tuple(x.shape[1:])}: the field's network raised on "
                       f"{_probe_inputs(x, row_cond)}: {type(err).__name__}: {err}; pass the data_shape the network "
                       "was built for, and cond={'y': labels} if it takes labels (or fix the network for this "
                       "input)") from err
    finally:
        network.train(training)
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
        raise DDMError(f"sample_single: data_shape {tuple(x.shape[1:])}: the field's network returns {got} for one "
                       f"row of shape {tuple(x.shape)}, but a velocity has its input's shape; pass the data_shape "
                       "the network was built for (or make it return v of x's shape)")


def _probe_inputs(x: torch.Tensor, cond: dict[str, torch.Tensor]) -> str:
    """What the probe gave the network, for its error: x's shape, t, and each conditioning's shape."""
    given = [f"x of shape {tuple(x.shape)}", "t = 1"] + [f"{k} of shape {tuple(c.shape)}" for k, c in cond.items()]
    return ", ".join(given)


def sample_single(field, data_shape, n: int, steps: int = 50, solver: str = "euler", seed: int = 0,
                  device="cpu", name: str = "monolith", x1: torch.Tensor | None = None,
                  cond: dict[str, torch.Tensor] | None = None, batch_size: int | None = None,
                  speed: SpeedOptions = SpeedOptions(),
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Sampling with one velocity field (the monolith): one network call per evaluation, called
    as field(x, t, **cond) with the rows' conditioning (batch_size, speed and out as in sample_ddm).
    With speed.cuda_graphs the field's graphs are captured for this call; to keep them from one call
    to the next, pass accel.accelerate_field(field, speed) once and sample it with the default speed.
    Bad arguments are DDMErrors naming them, as in sample_ddm."""
    checked = checked_arguments("sample_single", n, seed, steps, solver, batch_size)
    checked_speed(speed, "sample_single")
    if not callable(field):
        raise DDMError(f"sample_single: field: {type(field).__name__} is not a velocity field field(x, t); sample a DDM "
                       "with DDM.sample, and a run's monolith with ddmkit.ddm.load.monolith_field(RUN) as the field")
    data_shape = checked_shape(data_shape, "sample_single")
    check_field_shape(field, data_shape)
    if cond is not None and (not isinstance(cond, dict) or not all(
            isinstance(c, torch.Tensor) and len(c) == checked.n for c in cond.values())):
        what = {k: type(c).__name__ for k, c in cond.items()} if isinstance(cond, dict) else type(cond).__name__
        raise DDMError(f"sample_single: cond: {what}; give None or a dict of tensors of n = {checked.n} rows each, "
                       "passed to the field as field(x, t, **cond) (e.g. {'y': labels})")
    drawn = x1 is None
    x1 = start_rows(checked.n, data_shape, checked.seed, device, x1, "sample_single")
    samples = samples_in_place_of(x1, drawn, out, "sample_single")
    probe_field_shape(field, x1, cond, speed)
    field = accelerate_field(field, speed)
    nfe = []
    _sync(x1.device)
    start = time.perf_counter()
    with autocast(speed, x1.device):
        for rows in _chunks(len(x1), checked.batch_size):
            part_cond = _rows(cond, rows) or {}
            samples[rows] = _integrate_counted(lambda x, t, c=part_cond: field(x, t, **c), x1[rows],
                                               checked.steps, checked.solver, None, nfe)
    _sync(x1.device)
    evaluations = _per_trajectory(nfe)
    return samples, {"strategy": name, "expert_calls_per_sample": float(evaluations), "router_calls": 0,
                              "velocity_evaluations": evaluations, "wall_time": time.perf_counter() - start}


def config_options(sample, routed: bool = True, autocast: str | None = None) -> dict:
    """The keyword arguments of sample_ddm (routed) or sample_single that a run's [sample] section
    sets: batch_size, speed (cuda_graphs, cuda_streams, and `autocast`), and router_every for a DDM."""
    speed = SpeedOptions(cuda_graphs=sample.cuda_graphs, cuda_streams=sample.cuda_streams, autocast=autocast)
    options = {"batch_size": sample.batch_size, "speed": speed}
    return {**options, "router_every": sample.router_every} if routed else options
