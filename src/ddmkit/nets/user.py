"""Your own network class, named in the config as "package.module:Class".

    [expert.net]
    arch = "mynets:Velocity"        # any torch.nn.Module subclass
    kwargs = {width = 64}

ddmkit builds and calls it exactly as its own architectures (VelocityNet, RouterNet below), saves it
as a model folder (config.json + model.safetensors) and loads it back.

User code is imported only by a name from the config the user runs, never because a file names it:
`use_network` imports and registers the class in this process (the pipeline and the CLI do so from
the config they are given), and building an architecture that a model folder's config.json names
looks it up here. Where it was not registered, that is a DDMError saying how to register it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from typing import Protocol

import torch
from torch import nn

from ddmkit.errors import DDMError
from ddmkit.user_code import import_named, what_it_is

_USER: dict[str, type[nn.Module]] = {}  # user network classes registered in this process, by name


class VelocityNet(Protocol):
    """What ddmkit needs of an expert or monolith network (its own MLP, UNet and DiT are ones).

    Built as Class(data_shape=[...], **net.kwargs) (the data shape as a list, e.g. [2] or [1, 28, 28]).
    forward(x, t, y=None) -> (B, *data_shape):
        x (B, *data_shape) float, the noisy sample x_t = (1 - t) x_0 + t eps;
        t (B,) float in [0, 1], t = 0 data, t = 1 noise (ddmkit.conventions);
        y (B,) long class labels, passed (as y=...) only when net.kwargs hold num_classes = C;
            y = C means "no label" (classifier-free guidance).
    It returns what expert.prediction names: the velocity v = eps - x_0 (default), eps or x_0."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


class RouterNet(Protocol):
    """What ddmkit needs of a router network (its own router_mlp and router_cnn are ones).

    Built as Class(data_shape=[...], num_experts=K, **net.kwargs).
    forward(x, t, y=None) -> logits (B, K) over the K clusters (ddmkit applies the softmax):
        x and t as for VelocityNet; y (B,) long class labels, passed (as the third argument) only
        when net.kwargs hold num_classes = C, y = C meaning "no label"."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


def is_user_network(arch: str) -> bool:
    """Whether an architecture name names user code ("package.module:Class") rather than a built-in."""
    return ":" in arch


def class_name(cls: type) -> str:
    """The "package.module:Class" name of a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def use_network(name: str | type[nn.Module], cls: type[nn.Module] | None = None,
                field: str = "net.arch") -> type[nn.Module]:
    """Register a network class for this process and return it:

        use_network("mynets:Velocity")               # imported by name
        use_network("mynets:Velocity", Velocity)     # the class given (nothing imported)
        use_network(Velocity)                        # the class, under its own "module:Class" name

    Call it only with a name from the config you run, never with one read from a run folder. `field`
    names the setting in the errors (e.g. "expert.net.arch")."""
    if isinstance(name, type):
        name, cls = class_name(name), name
    if cls is None and name in _USER:  # registered before, e.g. with the class given: nothing imported
        return _USER[name]
    if cls is None:
        module, _, attr = name.partition(":")
        if not module or not attr:
            raise DDMError(f"{field}: {name!r} is not a built-in architecture or 'package.module:Class'")
        cls = import_named(name, field)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise DDMError(f"{field}: {name!r} is {what_it_is(cls)}, not a torch.nn.Module subclass; name your network's "
                       "class (docs/own-data.md#your-network)")
    _USER[name] = cls
    return cls


def user_networks() -> tuple[str, ...]:
    """The names registered in this process (what a launch backend passes on to its worker processes)."""
    return tuple(_USER)


def main_is_a_file() -> bool:
    """Whether spawned worker processes run this process's main module again: a script file or a
    `python -m` module, not a notebook, an interactive session, `python -c` or a script read from stdin."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or (path is not None and os.path.isfile(path))


def names_only_here(spawned: bool = True) -> list[str]:
    """The registered names a worker process could not import by name: their module part is neither a
    module importlib finds nor a main script the workers run again (use_network("custom:Name", cls)
    names no module; a class of a notebook is "__main__:Name" with no file behind it). spawned: the
    workers are processes spawned from this one, which run its main script again (Ray's do not)."""
    def importable(module: str) -> bool:
        if module in ("__main__", "__mp_main__"):
            return spawned and main_is_a_file()
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that does not exist
            return False

    return [name for name in _USER if not importable(name.partition(":")[0])]


def check_workers_import(what: str, workers: str, spawned: bool, fallback: str) -> None:
    """A DDMError, before anything starts, when `workers` (processes of `what`, spawned from this one or
    Ray's) could not import a registered network class by name (names_only_here); `fallback`: the way to run
    without them."""
    here = names_only_here(spawned=spawned)
    if not here:
        return
    module = here[0].partition(":")[0]
    if module not in ("__main__", "__mp_main__"):
        why = f"no module {module!r} to import"
    elif spawned:
        why = "defined in a notebook, an interactive session, `python -c` or stdin, which the workers cannot run"
    else:
        why = "a class of the main script, which Ray's workers do not run"
    where = ("a module or script file the workers can import (e.g. mynets.py beside the notebook)" if spawned
             else "a module installed where Ray's workers run (or on their PYTHONPATH)")
    raise DDMError(f"{what}: the network class registered as {here[0]!r} can be used in this process only ({why}), "
                   f"and {workers} import the classes by name; register it under its own name, "
                   f"ddmkit.nets.use_network(TheClass), from {where}, or {fallback}")


def use_networks(names: tuple[str, ...] | list[str]) -> None:
    """use_network for each name: in a worker process, the names its parent process had registered."""
    for name in names:
        use_network(name)


def user_network(name: str, field: str = "expert.net.arch") -> type[nn.Module]:
    """The registered class `name`, or a DDMError saying how to provide it (`field`: the config field
    that names it, for the --set of the message)."""
    if name not in _USER:
        raise DDMError(f"the network class {name!r} is not registered in this process: ddmkit imports your code "
                       "only from the config you run, never because a run or model folder names it. Pass the "
                       f"config that names it (--config CONFIG, with expert.net.arch or router.net.arch = {name!r}), "
                       f"or, where the command takes --set (sample, evaluate, train-expert, ...), name it with --set "
                       f"{field}={name}; from Python call ddmkit.nets.use_network({name!r}) first")
    return _USER[name]


def _forward(model: nn.Module, rows: int, data_shape: list[int], num_experts: int | None, num_classes: int,
             grad: bool) -> torch.Tensor:
    """The network's output for `rows` rows of randn x, t in (0, 1) and labels (the no-label token among them),
    called as ddmkit calls it (num_experts given: a router); gradients on as in training, off as in sampling."""
    x = torch.randn(rows, *data_shape, generator=torch.Generator().manual_seed(rows - 2))
    t = torch.linspace(0.25, 0.75, rows)
    y = torch.linspace(0, num_classes, rows).round().long() if num_classes else None
    with torch.set_grad_enabled(grad):
        return model(x, t) if y is None else model(x, t, y) if num_experts is not None else model(x, t, y=y)


def looks_like_probabilities(out: torch.Tensor) -> bool:
    """Whether a router's output (B, K), K >= 2, holds rows in [0, 1] that each sum to 1 (within 1e-4)."""
    if out.shape[-1] < 2 or not out.is_floating_point():
        return False
    out = out.detach().float()
    return bool(((out >= 0) & (out <= 1)).all() and ((out.sum(-1) - 1).abs() <= 1e-4).all())


def check_output(model: nn.Module, where: str, data_shape: list[int], num_experts: int | None = None,
                 num_classes: int = 0) -> None:
    """A forward of two rows on the CPU, called as ddmkit calls the network (num_experts given: a router),
    then one of three rows with gradients on, as training calls it; a DDMError naming the config field
    `where` when either fails, returns another shape than (B, *data_shape) for an expert, (B, K) for a
    router, or values that are not finite, or when the output carries no gradient to train on."""
    router = num_experts is not None
    call = f"forward(x, t{', y' if num_classes and router else ', y=y' if num_classes else ''})"

    def shape(rows: int) -> tuple:
        return (rows, num_experts) if router else (rows, *data_shape)

    def got(out) -> tuple | str:
        return tuple(out.shape) if torch.is_tensor(out) else type(out).__name__

    try:
        out = _forward(model, 2, data_shape, num_experts, num_classes, grad=False)
    except Exception as e:
        raise DDMError(f"{where}: {call} raised {type(e).__name__} ({str(e)[:300]}) with x of shape "
                       f"{(2, *data_shape)} and t of shape (2,); docs/own-data.md#your-network shows how ddmkit "
                       "builds and calls your class") from None
    if got(out) != shape(2):
        what = f"logits (B, K = {num_experts})" if router else "a tensor shaped like x, (B, *data_shape)"
        raise DDMError(f"{where}: {call} returned {got(out)} for x of shape {(2, *data_shape)}; expected {shape(2)}: "
                       f"{what}")
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise DDMError(f"{where}: {call} returned NaN or infinite values for finite x (randn) and t in (0, 1); "
                       "training it would give NaN weights: check its forward")
    if router and looks_like_probabilities(out):
        warnings.warn(f"{where}: {call} returns what look like probabilities (each row in [0, 1], summing to 1); "
                      "ddmkit applies softmax to the router's output: return logits (drop the final softmax)",
                      UserWarning)
    try:  # a network that works for two rows only, or under no gradient, stopped training with a traceback
        out = _forward(model, 3, data_shape, num_experts, num_classes, grad=True)
    except Exception as e:
        raise DDMError(f"{where}: {call} works for 2 rows but raised {type(e).__name__} ({str(e)[:300]}) for 3; "
                       "a network must take any batch size") from None
    if got(out) != shape(3):
        raise DDMError(f"{where}: {call} returned {got(out)} for x of shape {(3, *data_shape)}; expected {shape(3)} "
                       "(it is right for 2 rows): a network must take any batch size")
    if not out.requires_grad:
        raise DDMError(f"{where}: {call} returns a tensor that carries no gradient (a forward under torch.no_grad(), "
                       "or a detached output), so there is nothing to train: check its forward")


def check_loaded(model: nn.Module, arch: str, kwargs: dict, folder) -> None:
    """A user's network just loaded from model folder `folder` (built from its config.json `kwargs`), called once on
    two rows on the CPU as sampling calls it (eval mode, no gradient, the global RNG kept): an error, or an output of
    another shape than (B, *data_shape) for an expert, (B, K) for a router, is a DDMError naming the folder, the
    class and what it was given. The class passed these checks when the folder was trained (check_output), so its
    code has changed since; without this, torch's own error surfaced from inside the sampler."""
    data_shape = list(kwargs.get("data_shape") or [])
    num_experts, num_classes = kwargs.get("num_experts"), kwargs.get("num_classes") or 0
    changed = (f"the class is not as it was when {folder} was trained (its code changed since?): restore it, or "
               "train the run again in a new --out folder")
    try:
        with torch.random.fork_rng():
            out = _forward(model, 2, data_shape, num_experts, num_classes, grad=False)
    except Exception as e:
        raise DDMError(f"{folder}: the network class {arch!r} raised {type(e).__name__} ({str(e)[:300]}) on x of "
                       f"shape {(2, *data_shape)} (its data_shape {data_shape}) and t of shape (2,); {changed}") from e
    want = (2, num_experts) if num_experts is not None else (2, *data_shape)
    if not torch.is_tensor(out) or tuple(out.shape) != want:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise DDMError(f"{folder}: the network class {arch!r} returned {got} for x of shape {(2, *data_shape)}; "
                       f"expected {want}; {changed}")
