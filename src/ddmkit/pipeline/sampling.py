"""The sampling stage: draw a run's sample sets, each into RUN/samples/NAME.safetensors, with its
expert calls, router calls and wall time in RUN/samples/info.json.

The same for every kind of continuous data: all sets start from the same noise x_1 (the first n
rows of one draw of sample.n rows, fixed by sample.seed, drawn at once on the CPU's generator: the
same whatever the device or chunk size) and, for class-conditional experts, the same class labels
(uniform over the classes, fixed by sample.seed; stored as "y" beside the samples "x" in each set's
file, so a set drawn with another n or seed keeps its own). Image sets
are sampled under bfloat16 autocast on a GPU and stored clamped to [-1, 1]. A latent run samples
latents and stores them decoded (images). info.json records what each set was drawn with (drawn_with).
"""
from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictFloat, StrictInt

from ddmkit.config import RunConfig, validate
from ddmkit.ddm import DDM, exact_ddm, load_ddm, sample_ddm, sample_single, start_noise
from ddmkit.ddm.load import latent_codec, monolith_field
from ddmkit.registry import model_data_shape, read_registry
from ddmkit.ddm.sampling import config_options
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors_hashed, read_json, save_tensors, sha256_file, write_json
from ddmkit.layout import RunFolder
from ddmkit.pipeline.samplesets import STATISTICS, SampleSet, SetKind, sample_options
from ddmkit.routing import parse_strategy, redraws_each_evaluation
from ddmkit.routing.strategies import Nearest, Oracle
from ddmkit.progress import track

Log = Callable[[str], None]


def sample_labels(num_classes: int, n: int, seed: int, device) -> torch.Tensor | None:
    """Class labels for conditional sampling: uniform over the classes, fixed by seed (None: unlabelled)."""
    if not num_classes:
        return None
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed + 7)).to(device)


def sampling_autocast(images: bool, device) -> str | None:
    """The autocast dtype a set's networks run under: bfloat16 for images on a GPU, else None (no autocast)."""
    return "bfloat16" if images and torch.device(device).type == "cuda" else None


def device_name(device) -> str:
    """The device a set records it was drawn on: the GPU's name on CUDA, else the device's type ("cpu")."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _ddm(run, sample_set: SampleSet, device, ddms: dict) -> DDM:
    """The DDM a set is drawn from, loaded once per (kind, guidance, router) into `ddms`."""
    key = (sample_set.kind, sample_set.guidance, sample_set.router)
    if key not in ddms:
        ddms[key] = exact_ddm(run) if sample_set.kind == SetKind.EXACT else \
            load_ddm(run, device, guidance=sample_set.guidance, router=sample_set.router)
    return ddms[key]


def routed_by(sample_set: SampleSet, meta: dict) -> str:
    """What a set's DDM routed by, as info.json records it: "none" (the monolith), "exact posterior"
    (the exact DDM of a mixture), else the router the DDM loaded ("learned"; a grown run: "statistics")."""
    if sample_set.kind == SetKind.MONOLITH:
        return "none"
    if sample_set.kind == SetKind.EXACT:
        return "exact posterior"
    return meta.get("router", sample_set.router)


def draw_set(cfg: RunConfig, run, sample_set: SampleSet, images: bool, device,
             ddms: dict) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(samples, their class labels or None, info) of one set; `ddms` keeps the DDMs loaded for earlier sets."""
    s = cfg.sample
    autocast = sampling_autocast(images, device)
    if sample_set.kind == SetKind.MONOLITH:
        field = monolith_field(run, device, sample_set.guidance)
        shape, classes, meta = model_data_shape(run), field.output.num_classes, {}
        codec = latent_codec(run, device)  # loaded with the monolith, as the DDM loads its own
    else:
        ddm = _ddm(run, sample_set, device, ddms)
        shape, classes, meta, codec = ddm.data_shape, ddm.num_classes, ddm.meta, ddm.codec
    x1 = start_noise(s.n, shape, s.seed)[:sample_set.n].to(device)  # the set's rows of the run's noise
    y = sample_labels(classes, s.n, s.seed, device)
    y = None if y is None else y[:sample_set.n]
    cond = None if y is None else {"y": y}
    if sample_set.kind == SetKind.MONOLITH:
        x0, info = sample_single(field, shape, sample_set.n, s.steps, s.solver, s.seed, device, sample_set.name,
                                 x1=x1, cond=cond, out=x1, **config_options(s, False, autocast))
    else:
        x0, info = sample_ddm(ddm, sample_set.strategy, sample_set.n, s.steps, s.solver, s.seed, device, x1=x1,
                              cond=cond, out=x1, **config_options(s, True, autocast))  # samples over the noise
    x0 = x0.cpu()  # (a latent run's images are decoded chunk by chunk into the host's memory)
    if codec is not None:  # a latent run: samples are decoded into images
        x0 = codec.decode(x0)
    info.pop("expert_rows", None)
    info.update(strategy=sample_set.name, guidance=sample_set.guidance, router=routed_by(sample_set, meta),
                missing_experts=meta.get("missing_experts", []))
    if images:
        x0 = x0.float().clamp(-1, 1)
    return x0, None if y is None else y.cpu(), info


SAMPLES_FIX = "delete it (the sets are drawn again by `ddmkit sample RUN --strategy NAME` or `ddmkit run`)"


class SetInfo(BaseModel):
    """One set's entry in RUN/samples/info.json: what the report reads of it is typed, the rest kept."""
    model_config = ConfigDict(extra="allow")
    expert_calls_per_sample: StrictFloat | None = None
    wall_time: StrictFloat | None = None
    router_calls: StrictFloat | None = None
    velocity_evaluations: StrictFloat | None = None
    missing_experts: list[StrictInt] = []
    drawn_with: dict[str, Any] | None = None  # the settings and networks it was drawn with (drawn_with())
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # of the set's file (sets drawn before: none)


class SampleInfo(RootModel[dict[str, SetInfo]]):
    """RUN/samples/info.json: each set's name and its SetInfo."""


def read_info(folder: RunFolder) -> dict:
    """RUN/samples/info.json (what each set was drawn with), checked by its schema (SampleInfo: a damaged entry
    is a DDMError naming it, and what to do), as read; {} before the first set."""
    if not folder.sample_info.exists():
        return {}
    infos = read_json(folder.sample_info, SAMPLES_FIX)
    try:
        validate(SampleInfo, infos, str(folder.sample_info), "record of the sample sets")
    except DDMError as e:
        raise DDMError(f"{e}\n  to go on: {SAMPLES_FIX}") from None
    return infos


def chunked_differently(sample_set: SampleSet, solver: str) -> bool:
    """Whether a set's samples depend on sample.batch_size: the adaptive solver (its step control measures the
    error of a whole chunk) and strategies that draw experts (sample-K, nucleus, switch at every evaluation;
    oracle and nearest on their first: on a GPU a generator's draws depend on how many are drawn at once).
    Other sets are the same to rounding."""
    if sample_set.kind == SetKind.MONOLITH:
        return solver == "adaptive"
    strategy = parse_strategy(sample_set.strategy)
    return solver == "adaptive" or redraws_each_evaluation(strategy) or isinstance(strategy, (Oracle, Nearest))


def network_roles(sample_set: SampleSet) -> list[str]:
    """The registry roles of the networks a set is drawn by: the monolith's; the experts and the router for a
    DDM set (the experts alone when routed by the islands' statistics); none for the exact DDM of a mixture."""
    if sample_set.kind == SetKind.MONOLITH:
        return ["monolith"]
    if sample_set.kind == SetKind.EXACT:
        return []
    return ["expert"] if sample_set.router == STATISTICS else ["expert", "router"]


def networks_hash(reg: dict | None, roles: list[str]) -> str | None:
    """SHA-256 over the registry's entries of the networks of these roles (weights, config, published
    statistics; a router not trained yet is an absent entry), the partition and the latents: what a set's
    samples depend on of the run. None before the run is registered (reg None), and for no roles."""
    if not roles or reg is None:
        return None
    models = sorted((m.get("path"), m.get("weights_sha256"), m.get("config_sha256"), m.get("statistics_sha256"))
                    for m in reg.get("models", []) if m.get("role") in roles)
    identity = {"models": models, "partition": reg.get("partition_sha256"), "latents": reg.get("latents_sha256")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def drawn_with(cfg: RunConfig, sample_set: SampleSet, reg: dict | None, device="cpu", images: bool = False) -> dict:
    """What a set's samples depend on besides its name: the sampling settings and the networks it is drawn
    by (networks_hash of its network_roles: a retrained expert changes the DDM's sets, a monolith trained
    later does not). steps is None for the adaptive solver (it chooses its own); batch_size is there where
    it changes the samples (chunked_differently). noise_n: the rows of the noise and label draw whose first
    n start the set (sample.n; a set of sample.sweep_n takes the first rows of it, and torch.randn's rows
    near the end of a draw depend on its size). autocast: the dtype the networks ran under (None: no
    autocast, float32); device: where it was drawn (device_name; not compared by same_drawing)."""
    s, roles = cfg.sample, network_roles(sample_set)
    routed = sample_set.kind != SetKind.MONOLITH and not isinstance(parse_strategy(sample_set.strategy), Oracle)
    made = {"n": sample_set.n, "noise_n": s.n, "steps": None if s.solver == "adaptive" else s.steps,
            "solver": s.solver, "seed": s.seed, "guidance": sample_set.guidance, "roles": roles,
            "networks": networks_hash(reg, roles),
            "router_every": s.router_every if routed else 1,  # the monolith and the oracle (routed once) ignore it
            "autocast": sampling_autocast(images, device), "device": device_name(device)}
    return {**made, "batch_size": s.batch_size} if chunked_differently(sample_set, s.solver) else made


ADDED_LATER = ("noise_n",)  # compared only where a set records it (earlier ddmkit did not)
WHERE_DRAWN = ("device", "autocast")  # recorded, never compared: the machine's, not a setting (the same law)


def same_drawing(before, now: dict, registry_hash: str | None) -> bool:
    """Whether a set recorded as drawn with `before` is the set `now` asks for. A setting one side does not
    record is None there (batch_size, recorded only where it matters); the adaptive solver's steps are not
    compared (it chooses its own), nor where the set was drawn (WHERE_DRAWN: the device, and the autocast
    dtype that follows from it: a GPU's bfloat16 set is kept on a CPU machine, whose float32 set would be
    the same law up to rounding); noise_n only where `before` records it (a set of an earlier ddmkit is
    kept); a record of
    ddmkit before it hashed each set's own networks names the registry file's hash, compared with the
    registry's now."""
    if not isinstance(before, dict):
        return False
    before = dict(before)
    if "networks" not in before and "registry" in before:
        if before.pop("registry") != registry_hash:
            return False
        before.update(roles=now.get("roles"), networks=now.get("networks"))
    ignored = {*WHERE_DRAWN} | {key for key in ADDED_LATER if key not in before}
    if now.get("solver") == "adaptive" == before.get("solver"):
        ignored.add("steps")
    return all(before.get(key) == now.get(key) for key in set(before) | set(now) if key not in ignored)


SHOWN = ("n", "solver", "steps", "seed", "router_every", "guidance", "batch_size", "noise_n", "device",
         "autocast")  # what a report states of a set
DEFAULT_SHOWN = {"router_every": 1, "guidance": 1.0, "batch_size": None,  # said only where a set differs
                 "noise_n": None, "device": None, "autocast": None}  # None: not recorded (earlier ddmkit)


def drawn_groups(cfg: RunConfig, run, names: list[str]) -> list[tuple[dict, list[str]]]:
    """The sets `names` grouped by the settings they were drawn with (RUN/samples/info.json's drawn_with:
    SHOWN; cfg.sample's for a set that records none), in order of first appearance: one group when every set
    was drawn alike."""
    infos, groups = read_info(RunFolder(run)), {}
    for name in names:
        made = infos.get(name, {}).get("drawn_with") or {**cfg.sample.model_dump(), "n": cfg.sample.n,
                                                         "batch_size": None}
        groups.setdefault(tuple(made.get(k, DEFAULT_SHOWN.get(k)) for k in SHOWN), []).append(name)
    return [(dict(zip(SHOWN, key)), members) for key, members in groups.items()]


def settings_text(g: dict, unit: str, seed: str = "seed {}") -> str:
    """One group's settings as the report says them: '2000 samples, euler, 50 steps, seed 0', then those
    of DEFAULT_SHOWN that differ ('router every 5 evaluations', 'guidance 2', 'in chunks of 64', 'the first
    500 rows of a noise draw of 2000') and where it was drawn ('on cpu without autocast', 'on NVIDIA H100
    80GB HBM3 under bfloat16 autocast'; nothing for a set that records no device)."""
    steps = "" if g["solver"] == "adaptive" or g["steps"] is None else f", {g['steps']} steps"
    extra = [f"router every {g['router_every']} evaluations" if g.get("router_every") not in (None, 1) else "",
             f"guidance {g['guidance']:g}" if g.get("guidance") not in (None, 1.0) else "",
             f"in chunks of {g['batch_size']}" if g.get("batch_size") is not None else "",
             f"the first {g['n']} rows of a noise draw of {g['noise_n']}" if g.get("noise_n") not in (None, g["n"])
             else "",
             drawn_where(g)]
    return f"{g['n']} {unit}, {g['solver']}{steps}, {seed.format(g['seed'])}" + "".join(f", {e}" for e in extra if e)


def drawn_where(g: dict) -> str:
    """Where a group of sets was drawn: 'on cpu without autocast', 'on NVIDIA H100 80GB HBM3 under bfloat16
    autocast'; '' for sets that record no device (earlier ddmkit)."""
    if g.get("device") is None:
        return ""
    return f"on {g['device']} " + (f"under {g['autocast']} autocast" if g.get("autocast") else "without autocast")


def sampling_sentence(cfg: RunConfig, run, names: list[str], unit: str = "samples") -> str:
    """What a report says of how its sets were drawn, from what each set records (not from cfg, which can
    have changed since); where sets differ in other settings but were all drawn alike, that is said once."""
    groups = drawn_groups(cfg, run, names)
    if len(groups) <= 1:
        g = groups[0][0] if groups else {**cfg.sample.model_dump(), "n": cfg.sample.n, "batch_size": None}
        return settings_text(g, unit, "the same noise (seed {}) for every set")
    places = {drawn_where(g) for g, _ in groups}
    shared = places.pop() if len(places) == 1 else ""
    if shared:
        groups = [({**g, "device": None}, members) for g, members in groups]
    parts = [f"{', '.join(members)}: {settings_text(g, unit)}" for g, members in groups]
    said = "the sets were drawn with different settings (" + "; ".join(parts) + ")"
    return f"{said}, all {shared}" if shared else said


def stale_sets(run) -> list[str]:
    """The drawn sets of a run whose networks have changed since: the hash of the networks a set records
    (drawn_with.networks, of its roles) differs from theirs now (a retrained, replaced or added expert, a
    router trained after sampling with the statistics-only one; for the monolith's set, the monolith). A set
    drawn before the run was registered records none and is not told apart."""
    folder = RunFolder(run)
    if not folder.registry.exists():
        return []
    registry_hash, reg, stale = sha256_file(folder.registry), read_registry(folder.root), []
    for name, info in read_info(folder).items():
        made = info.get("drawn_with") if isinstance(info, dict) else None
        if not folder.sample_set(name).exists() or not isinstance(made, dict):
            continue
        if "networks" in made:
            if made["networks"] is not None and made["networks"] != networks_hash(reg, made.get("roles") or []):
                stale.append(name)
        elif made.get("registry") is not None and made["registry"] != registry_hash:  # a record of an older ddmkit
            stale.append(name)
    return stale


def drawn_on(info: dict) -> dict:
    """The device and autocast dtype a set's entry of samples/info.json records (for its row of metrics.json);
    {} for a set of an earlier ddmkit, which recorded neither."""
    made = info.get("drawn_with") if isinstance(info, dict) else None
    return {key: made[key] for key in ("device", "autocast") if isinstance(made, dict) and key in made}


def changed_sets(run) -> list[str]:
    """The drawn sets whose file is not the one drawn: its SHA-256 differs from the one samples/info.json
    records (a set copied over another, or edited). A set recorded without one (drawn by earlier ddmkit) is not
    told apart."""
    folder = RunFolder(run)
    return [name for name, info in read_info(folder).items() if info.get("sha256") is not None
            and folder.sample_set(name).exists() and sha256_file(folder.sample_set(name)) != info["sha256"]]


def changed_error(run, names: list[str]) -> DDMError:
    """The error for sets whose file is not the one drawn (changed_sets): each file, and the command that
    draws it again."""
    folder = RunFolder(run)
    again = "; ".join(f"`ddmkit sample {shlex.quote(str(folder.root))} {sample_options(name)}`" for name in names)
    files = ", ".join(str(folder.sample_set(name)) for name in names)
    return DDMError(f"{files}: SHA-256 differs from the one {folder.sample_info} records, so the file is not the set "
                    "drawn under that name (copied from another set, or edited) and its scores would be reported "
                    f"under the wrong name; draw it again with {again}, or copy the set back")


def load_sets(run, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of the sets `names`, each file read once: hashed as it is loaded, and refused when its
    SHA-256 differs from the one samples/info.json records (changed_error naming every such set, once all are
    read; a set recorded without one, drawn by earlier ddmkit, passes)."""
    folder, loaded, digests = RunFolder(run), {}, {}
    for name in names:
        loaded[name], digests[name] = load_tensors_hashed(folder.sample_set(name), SAMPLES_FIX)
    infos = read_info(folder)
    changed = [name for name in names if infos.get(name, {}).get("sha256") not in (None, digests[name])]
    if changed:
        raise changed_error(run, changed)
    return loaded


def replaced_text(before: dict, now: dict) -> str:
    """What differs between the settings a set was drawn with and those it is drawn with now, e.g.
    'n 500 -> 10, steps 50 -> 8' ('other networks' for the networks; the fields an earlier ddmkit did not
    record are left out)."""
    unrecorded = {key for key in (*ADDED_LATER, *WHERE_DRAWN) if key not in before}
    parts = ["other networks" if key in ("networks", "registry") else f"{key} {before.get(key)} -> {now.get(key)}"
             for key in dict.fromkeys([*now, *before])
             if key != "roles" and key not in unrecorded and before.get(key) != now.get(key)]
    return ", ".join(dict.fromkeys(parts)) or "drawn again"


def stage_sample(cfg: RunConfig, run, sets: list[SampleSet], images: bool, log: Log = print, device="cpu",
                 on_sample: Callable[[str], object] | None = None, redraw: bool = False) -> None:
    """Draw every set not yet drawn, or drawn with other settings or networks (all of them with
    redraw=True); on_sample(name) is called after each set is written (e.g. to score it at once)."""
    folder = RunFolder(run)
    registry_hash = sha256_file(folder.registry) if folder.registry.exists() else None
    reg = read_registry(folder.root)
    ddms: dict = {}
    for sample_set in track(sets, "sampling", lambda s: s.name):
        path = folder.sample_set(sample_set.name)
        infos = read_info(folder)
        made_with = drawn_with(cfg, sample_set, reg, device, images)
        before = infos.get(sample_set.name, {}).get("drawn_with")
        same = same_drawing(before, made_with, registry_hash)
        if path.exists() and same and not redraw:
            continue  # a set whose info a kill lost, or drawn by other settings or networks, is drawn again
        x0, y, info = draw_set(cfg, run, sample_set, images, device, ddms)
        if path.exists() and isinstance(before, dict) and not same:  # said once the new set is drawn
            log(f"sample {sample_set.name}: replaces the set drawn before ({replaced_text(before, made_with)})")
        info["drawn_with"] = made_with
        tensors = {"x": x0} if y is None else {"x": x0, "y": y}
        save_tensors(path, tensors, {"strategy": sample_set.name, "missing_experts": info["missing_experts"]})
        info["sha256"] = sha256_file(path)  # evaluate scores this file only (changed_sets)
        infos[sample_set.name] = info
        write_json(folder.sample_info, infos)
        log(f"sample {sample_set.name}: {info['expert_calls_per_sample']:.1f} expert calls/sample, "
            f"{info['wall_time']:.2f}s")
        if on_sample is not None:
            on_sample(sample_set.name)
