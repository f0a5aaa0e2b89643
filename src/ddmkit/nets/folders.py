"""Build networks from a JSON-able spec, and save / load them as plain folders.

A model folder holds `config.json` (the spec under "arch"/"kwargs", plus what
the model is: role, data shape, time convention, prediction type) and
`model.safetensors`. `from_pretrained(folder)` returns (model, config); it loads
only weights of the network's own dtypes, every one finite.

An architecture is a built-in name (ARCHITECTURES) or the user's own class as
"package.module:Class", registered in this process by ddmkit.nets.user.use_network
(never imported because a model folder names it).
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ddmkit.conventions import TIME_CONVENTION, __version__, check_time_convention
from ddmkit.errors import DDMError, with_fix
from ddmkit.io import check_finite_tensors, load_tensors, read_json, read_metadata, save_tensors, write_json
from ddmkit.nets.dit import DiT
from ddmkit.nets.mlp import RouterMLP, VelocityMLP
from ddmkit.nets.router_cnn import RouterCNN
from ddmkit.nets.transformer import BidirectionalTransformer, CausalTransformer
from ddmkit.nets.unet import UNet
from ddmkit.nets.user import check_loaded, is_user_network, user_network

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": VelocityMLP, "router_mlp": RouterMLP, "unet": UNet, "dit": DiT, "router_cnn": RouterCNN,
    "causal_transformer": CausalTransformer, "bidirectional_transformer": BidirectionalTransformer}


def network_class(arch: str, field: str = "expert.net.arch") -> Callable[..., nn.Module]:
    """The class of a built-in architecture, or the registered user class "package.module:Class" (`field`:
    the config field that names it, for the message when it is not registered)."""
    if is_user_network(arch):
        return user_network(arch, field)
    if arch not in ARCHITECTURES:
        raise DDMError(f"arch: unknown architecture {arch!r}; accepted: {', '.join(sorted(ARCHITECTURES))}, or "
                       "your own torch.nn.Module as 'package.module:Class'")
    return ARCHITECTURES[arch]


def keyword_names(cls: type) -> list[str] | None:
    """The names cls(...) takes as keywords; None when it takes any name (**kwargs) or its signature cannot
    be read."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def did_you_mean(name: str, names: list[str]) -> str:
    """"; did you mean 'width'?" for the name of `names` nearest to a misspelt one; "" when none is near."""
    near = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def check_argument_names(arch: str, kwargs: dict, where: str, given: tuple[str, ...] = ("data_shape",)) -> None:
    """Every name of a network's kwargs (the config's `where`.kwargs) one that arch's class takes, checked
    from the config alone, before any data are read: a DDMError naming the field (expert.net.kwargs.widht)
    and the nearest accepted name. `given`: the arguments ddmkit passes itself. A class that takes **kwargs,
    or whose signature cannot be read, is checked when it is built (check_builds)."""
    try:
        names = keyword_names(network_class(arch, f"{where}.arch"))
    except DDMError as e:
        raise DDMError(f"{where}: {e}") from None
    if names is None:
        return
    accepted = [name for name in names if name not in given]
    for key in kwargs:
        if key not in names:
            raise DDMError(f"{where}.kwargs.{key}: {arch!r} takes no argument {key!r}{did_you_mean(key, accepted)} "
                           f"(accepted: {', '.join(accepted) or 'none besides ' + ' and '.join(given)})")
    check_argument_types(network_class(arch, f"{where}.arch"), kwargs, where)
    if not is_user_network(arch):
        check_argument_sizes(kwargs, where)


NET_SIZE = 2**16  # the largest whole number an argument of a built-in network takes (a width, depth, channel count)


def check_argument_sizes(kwargs: dict, where: str) -> None:
    """Every whole number of a built-in network's kwargs (in a list too: unet's channels) at most NET_SIZE: a
    wider or deeper network is no run, and building it to check it (check_builds) would take hours or fail in
    torch."""
    for key, value in kwargs.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and v > NET_SIZE for v in numbers):
            what = "whole numbers" if numbers is value else "a whole number"
            raise DDMError(f"{where}.kwargs.{key} = {value}: give {what} of at most {NET_SIZE}")


SCALARS = {int: "a whole number", float: "a number", bool: "true or false"}


def check_argument_types(cls: type, kwargs: dict, where: str) -> None:
    """Each of kwargs whose argument cls annotates as int, float or bool of that type (an int for a float too): a
    DDMError naming the field otherwise (`width = "64"` was a TypeError of torch.empty). Nothing is checked
    where an annotation cannot be read or is of another type."""
    try:
        params = inspect.signature(cls, eval_str=True).parameters
    except Exception:  # noqa: BLE001 - a user's annotation that does not evaluate: its constructor will say
        return
    for key, value in kwargs.items():
        kind = params[key].annotation if key in params else None
        if kind not in SCALARS:
            continue
        fits = isinstance(value, bool) if kind is bool else \
            isinstance(value, int) and not isinstance(value, bool) if kind is int else \
            isinstance(value, (int, float)) and not isinstance(value, bool)
        if not fits:
            text = " (unquoted in TOML and --set)" if isinstance(value, str) else ""
            raise DDMError(f"{where}.kwargs.{key} = {value!r}: give {SCALARS[kind]}{text}")


def check_arguments(arch: str, cls: type, kwargs: dict) -> None:
    """A DDMError naming the accepted arguments when kwargs do not fit cls's signature (a misspelt,
    unknown or missing name); nothing when they fit or the signature cannot be read."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a class without a readable signature: its constructor will say
        return
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        params = signature.parameters
        if "data_shape" in kwargs and "data_shape" not in params \
                and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise DDMError(f"arch {arch!r}: its __init__ takes no data_shape; ddmkit builds every network as "
                           "Class(data_shape=[...], **net.kwargs) (a router with num_experts=K too): add the "
                           "argument (docs/own-data.md#your-network)") from None
        names = [p.name for p in params.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "data_shape"]
        unknown = [key for key in kwargs if key not in params]
        hint = did_you_mean(unknown[0], names) if unknown else ""
        raise DDMError(f"arch {arch!r}: bad arguments {kwargs}: {e}; accepted: "
                       f"{', '.join(names) or 'none besides data_shape'}{hint}") from None


def build_model(arch: str, **kwargs) -> nn.Module:
    cls = network_class(arch, "router.net.arch" if "num_experts" in kwargs else "expert.net.arch")
    check_arguments(arch, cls, kwargs)
    own = is_user_network(arch)
    errors = Exception if own else (TypeError, ValueError, OverflowError, RuntimeError, ZeroDivisionError,
                                    AssertionError)
    try:
        return cls(**kwargs)
    except DDMError:
        raise
    except errors as e:  # torch's own messages run on with its C++ stack: their first line is the reason
        said = (str(e).strip().splitlines() or [""])[0][:300]
        kind = f"{type(e).__name__}: " if own else ""  # the user's own class: which exception its code raised
        raise DDMError(f"arch {arch!r}: bad arguments {kwargs}: {kind}{said}") from None


class _NoFillsOnMeta(TorchFunctionMode):
    """Initialisers (torch.nn.init's functions, Tensor.normal_) called on a meta tensor are skipped: they write
    nothing there, and torch runs normal_'s meta kernel through a Python reference that imports torch._dynamo
    (seconds, once a process), so that building a network with an nn.Embedding (class labels) on the meta
    device cost a command seconds at its start."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.normal_ or getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs.get("tensor")  # (torch passes an initialiser's arguments by name)
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Networks built in the body are on the meta device: their tensors' shapes and dtypes, no memory."""
    with torch.device("meta"), _NoFillsOnMeta():
        yield


def check_builds(arch: str, kwargs: dict, where: str) -> nn.Module:
    """arch(**kwargs) built on the meta device (no memory), as a check before any work: a network that
    cannot be built is a DDMError that opens with `where` (the setting that names it)."""
    try:
        with on_meta():
            return build_model(arch, **kwargs)
    except DDMError as e:
        raise DDMError(f"{where}: {e}") from None


def build_seeded(arch: str, seed: int, **kwargs) -> nn.Module:
    """build_model with its initial weights fixed by `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, **kwargs)


# what a model folder's config.json says the weights are (a run's expert: role, cluster and the SHA-256 of
# the shard it trained on), written into model.safetensors as well, so that weights copied into another
# folder are told apart from the folder's own (check_identity)
IDENTITY = ("role", "cluster", "shard_sha256")


def save_pretrained(folder: str | Path, model: nn.Module, config: dict) -> None:
    """Write config.json (with ddmkit version and time convention) and model.safetensors, whose metadata
    repeats the config's IDENTITY fields."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"ddmkit_version": __version__, "time_convention": TIME_CONVENTION, **config}
    save_tensors(folder / "model.safetensors", model.state_dict(), identity(config))
    write_json(folder / "config.json", config)


def identity(config: dict) -> dict:
    """The IDENTITY fields of a model folder's config."""
    return {key: config[key] for key in IDENTITY if key in config}


def check_identity(folder: str | Path, config: dict, fix: str | None = None) -> None:
    """The IDENTITY fields model.safetensors records (weights written by save_pretrained; older files
    record none) must be those of its config.json: else the weights of another model folder were copied in.
    A DDMError ends with `fix` where given (else: copy the folder again)."""
    weights = Path(folder) / "model.safetensors"
    recorded = read_metadata(weights, fix or "train or copy the model folder again")
    differ = [f"{key} {recorded[key]!r} (config.json: {config[key]!r})" for key in IDENTITY
              if key in recorded and key in config and recorded[key] != config[key]]
    if differ:
        raise DDMError(with_fix(f"{weights} is not the weights of its config.json: they were written for "
                                f"{', '.join(differ)}; one of the two was copied from another model folder, or edited",
                                fix or "Copy whole model folders (config.json with its model.safetensors)"))


def from_pretrained(folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise DDMError(f"{folder / 'config.json'}: expected a JSON object; this is not a ddmkit model folder")
    for key in ("arch", "kwargs"):
        if key not in config:
            raise DDMError(f"{folder / 'config.json'}: missing field {key!r}; this is not a ddmkit model folder")
    check_time_convention(config.get("time_convention", TIME_CONVENTION), folder)
    if not isinstance(config["kwargs"], dict) or not isinstance(config["arch"], str):
        raise DDMError(f"{folder / 'config.json'}: 'arch' must be a name and 'kwargs' a table")
    model = build_model(config["arch"], **config["kwargs"])
    path = folder / "model.safetensors"
    state = load_tensors(path)
    own = model.state_dict()
    for name, t in state.items():
        if name in own and t.dtype != own[name].dtype:
            raise DDMError(f"{path}: tensor {name!r} is {t.dtype} but the network's is {own[name].dtype}; ddmkit "
                           "loads weights of the network's own dtype only: re-train or re-export them")
    check_finite_tensors(state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DDMError(f"{path} does not match its config.json ({str(e)[:300]})") from None
    model.eval()
    if is_user_network(config["arch"]):
        check_loaded(model, config["arch"], config["kwargs"], folder)
    return model.to(map_location), config
