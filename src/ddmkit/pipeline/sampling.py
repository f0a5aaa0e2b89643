"""The sampling stage: draw a run's sample sets, each into RUN/samples/NAME.safetensors, with its
expert calls, router calls and wall time in RUN/samples/info.json.

The same for every kind of continuous data: all sets start from the same noise x_1 (the first n
rows of one draw fixed by sample.seed) and, for class-conditional experts, the same class labels
(uniform over the classes, fixed by sample.seed; stored as "y" beside the samples "x" in each set's
file, so a set drawn with another n or seed keeps its own). Image sets
are sampled under bfloat16 autocast on a GPU and stored clamped to [-1, 1]. A latent run samples
latents and stores them decoded (images).
"""
from __future__ import annotations

from typing import Callable

import torch

from ddmkit.config import RunConfig
from ddmkit.ddm import DDM, exact_ddm, load_ddm, sample_ddm, sample_single, start_noise
from ddmkit.ddm.load import latent_codec, monolith_field
from ddmkit.registry import model_data_shape
from ddmkit.ddm.sampling import config_options
from ddmkit.io import read_json, save_tensors, sha256_file, write_json
from ddmkit.layout import RunFolder
from ddmkit.pipeline.samplesets import SampleSet, SetKind
from ddmkit.routing import parse_strategy, redraws_each_evaluation
from ddmkit.progress import track

Log = Callable[[str], None]


def sample_labels(num_classes: int, n: int, seed: int, device) -> torch.Tensor | None:
    """Class labels for conditional sampling: uniform over the classes, fixed by seed (None: unlabelled)."""
    if not num_classes:
        return None
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed + 7)).to(device)


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
    autocast = "bfloat16" if images and torch.device(device).type == "cuda" else None
    if sample_set.kind == SetKind.MONOLITH:
        field = monolith_field(run, device, sample_set.guidance)
        shape, classes, meta = model_data_shape(run), field.output.num_classes, {}
        codec = latent_codec(run, device)  # loaded with the monolith, as the DDM loads its own
    else:
        ddm = _ddm(run, sample_set, device, ddms)
        shape, classes, meta, codec = ddm.data_shape, ddm.num_classes, ddm.meta, ddm.codec
    x1 = start_noise(s.n, shape, s.seed, device)[:sample_set.n]
    y = sample_labels(classes, s.n, s.seed, device)
    y = None if y is None else y[:sample_set.n]
    cond = None if y is None else {"y": y}
    if sample_set.kind == SetKind.MONOLITH:
        x0, info = sample_single(field, shape, sample_set.n, s.steps, s.solver, s.seed, device, sample_set.name,
                                 x1=x1, cond=cond, **config_options(s, False, autocast))
    else:
        x0, info = sample_ddm(ddm, sample_set.strategy, sample_set.n, s.steps, s.solver, s.seed, device, x1=x1,
                              cond=cond, **config_options(s, True, autocast))
    if codec is not None:  # a latent run: samples are decoded into images
        x0 = codec.decode(x0)
    info.pop("expert_rows", None)
    info.update(strategy=sample_set.name, guidance=sample_set.guidance, router=routed_by(sample_set, meta),
                missing_experts=meta.get("missing_experts", []))
    if images:
        x0 = x0.float().clamp(-1, 1)
    return x0.cpu(), None if y is None else y.cpu(), info


SAMPLES_FIX = "delete it (the sets are drawn again by `ddmkit sample RUN --strategy NAME` or `ddmkit run`)"


def read_info(folder: RunFolder) -> dict:
    """RUN/samples/info.json (what each set was drawn with), {} before the first set."""
    return read_json(folder.sample_info, SAMPLES_FIX) if folder.sample_info.exists() else {}


def chunked_differently(sample_set: SampleSet, solver: str) -> bool:
    """Whether a set's samples depend on sample.batch_size: the adaptive solver (its step control measures the
    error of a whole chunk) and strategies that draw experts at every evaluation (sample-K, nucleus, switch:
    their draws come from one generator, chunk after chunk). Other sets are the same to rounding."""
    random = sample_set.kind != SetKind.MONOLITH and redraws_each_evaluation(parse_strategy(sample_set.strategy))
    return solver == "adaptive" or random


def drawn_with(cfg: RunConfig, sample_set: SampleSet, networks: str | None) -> dict:
    """What a set's samples depend on besides its name: the sampling settings and the networks (`networks`:
    the registry's hash, which a retrained or restored expert changes; None before a run is registered).
    steps is None for the adaptive solver (it chooses its own); batch_size is there where it changes the
    samples (chunked_differently)."""
    s = cfg.sample
    made = {"n": sample_set.n, "steps": None if s.solver == "adaptive" else s.steps, "solver": s.solver,
            "seed": s.seed, "guidance": sample_set.guidance, "router_every": s.router_every, "registry": networks}
    return {**made, "batch_size": s.batch_size} if chunked_differently(sample_set, s.solver) else made


SHOWN = ("n", "solver", "steps", "seed", "router_every", "guidance", "batch_size")  # what a report states of a set
DEFAULT_SHOWN = {"router_every": 1, "guidance": 1.0, "batch_size": None}  # said only where a set differs


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
    of DEFAULT_SHOWN that differ ('router every 5 evaluations', 'guidance 2', 'in chunks of 64')."""
    steps = "" if g["solver"] == "adaptive" or g["steps"] is None else f", {g['steps']} steps"
    extra = [f"router every {g['router_every']} evaluations" if g.get("router_every") not in (None, 1) else "",
             f"guidance {g['guidance']:g}" if g.get("guidance") not in (None, 1.0) else "",
             f"in chunks of {g['batch_size']}" if g.get("batch_size") is not None else ""]
    return f"{g['n']} {unit}, {g['solver']}{steps}, {seed.format(g['seed'])}" + "".join(f", {e}" for e in extra if e)


def sampling_sentence(cfg: RunConfig, run, names: list[str], unit: str = "samples") -> str:
    """What a report says of how its sets were drawn, from what each set records (not from cfg, which can
    have changed since)."""
    groups = drawn_groups(cfg, run, names)
    if len(groups) <= 1:
        g = groups[0][0] if groups else {**cfg.sample.model_dump(), "n": cfg.sample.n, "batch_size": None}
        return settings_text(g, unit, "the same noise (seed {}) for every set")
    parts = [f"{', '.join(members)}: {settings_text(g, unit)}" for g, members in groups]
    return "the sets were drawn with different settings (" + "; ".join(parts) + ")"


def stale_sets(run) -> list[str]:
    """The drawn sets of a run whose networks have changed since: the registry hash a set records
    (drawn_with.registry) differs from RUN/registry.json's now (a retrained, replaced or added expert, a
    router trained after sampling with the statistics-only one). A set drawn before the run was registered
    records none and is not told apart."""
    folder = RunFolder(run)
    if not folder.registry.exists():
        return []
    now = sha256_file(folder.registry)
    return [name for name, info in read_info(folder).items() if folder.sample_set(name).exists()
            and (made := (info.get("drawn_with") or {}).get("registry")) is not None and made != now]


def replaced_text(before: dict, now: dict) -> str:
    """What differs between the settings a set was drawn with and those it is drawn with now, e.g.
    'n 500 -> 10, steps 50 -> 8' ('other networks' for the registry)."""
    parts = ["other networks" if key == "registry" else f"{key} {before.get(key)} -> {now.get(key)}"
             for key in dict.fromkeys([*now, *before]) if before.get(key) != now.get(key)]
    return ", ".join(parts)


def stage_sample(cfg: RunConfig, run, sets: list[SampleSet], images: bool, log: Log = print, device="cpu",
                 on_sample: Callable[[str], object] | None = None, redraw: bool = False) -> None:
    """Draw every set not yet drawn, or drawn with other settings or networks (all of them with
    redraw=True); on_sample(name) is called after each set is written (e.g. to score it at once)."""
    folder = RunFolder(run)
    networks = sha256_file(folder.registry) if folder.registry.exists() else None
    ddms: dict = {}
    for sample_set in track(sets, "sampling", lambda s: s.name):
        path = folder.sample_set(sample_set.name)
        infos = read_info(folder)
        made_with = drawn_with(cfg, sample_set, networks)
        before = infos.get(sample_set.name, {}).get("drawn_with")
        if path.exists() and before == made_with and not redraw:
            continue  # a set whose info a kill lost, or drawn by other settings or networks, is drawn again
        if path.exists() and isinstance(before, dict) and before != made_with:
            log(f"sample {sample_set.name}: replaces the set drawn before ({replaced_text(before, made_with)})")
        x0, y, info = draw_set(cfg, run, sample_set, images, device, ddms)
        info["drawn_with"] = made_with
        tensors = {"x": x0} if y is None else {"x": x0, "y": y}
        save_tensors(path, tensors, {"strategy": sample_set.name, "missing_experts": info["missing_experts"]})
        infos[sample_set.name] = info
        write_json(folder.sample_info, infos)
        log(f"sample {sample_set.name}: {info['expert_calls_per_sample']:.1f} expert calls/sample, "
            f"{info['wall_time']:.2f}s")
        if on_sample is not None:
            on_sample(sample_set.name)
