"""The DDM: K expert fields, a router, the cluster prior.

    ddm = DDM.from_pretrained("runs/ring")          # a run folder: partition/, experts/, router/
    ddm = ddm.to("cuda")
    x0, info = ddm.sample(strategy="top-2", n=1000, steps=50, solver="euler", seed=0)
    x0, info = ddm.sample(strategy="top-1", n=64, labels=y, guidance=2.0)   # class-conditional experts

A latent DDM (a run with an autoencoder) routes and integrates in latent space: data_shape is
the latents' shape, and `sample` decodes the result with `codec` into images.

Every field is a callable (x (B, *shape), t (B,), **cond) -> tensor: experts
return velocities in ddmkit's time convention (ddmkit.conventions; networks
predicting epsilon or x0 are converted at load), the
router returns probabilities (B, K). Learned fields are NetworkFields
(ddmkit.nets.field); the exact DDM of a Gaussian mixture has plain functions.

Missing experts: `restrict(present)` keeps only some experts; the router's
probabilities are masked to them and renormalised,
w_k = r_k 1[k present] / sum_j r_j 1[j present], the cluster prior likewise, and
nearest-cluster routing picks among them only.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ddmkit.accel import Accelerated, SpeedOptions, accelerate
import ddmkit.ddm.load as load
from ddmkit.ddm.sampling import checked_arguments, checked_cond, checked_device, checked_guidance, sample_ddm
from ddmkit.errors import DDMError
from ddmkit.layout import check_given
from ddmkit.latent.autoencoder import LatentCodec
from ddmkit.nets.field import NetworkField, VelocityOutput
from ddmkit.routing import Strategy

Field = Callable[..., torch.Tensor]


@dataclass
class DDM:
    """K expert velocity fields, a router over them and the cluster prior: load one with
    DDM.from_pretrained(run), move it with .to(device), draw samples with .sample(strategy, n, steps)."""

    experts: list[Field]
    router: Field
    prior: torch.Tensor  # (K,) cluster proportions
    data_shape: tuple[int, ...]
    nearest: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> nearest cluster centroid (B,)
    meta: dict = field(default_factory=dict)
    label_prior: torch.Tensor | None = None  # (C, K) p(cluster | class label), for labelled data
    router_conditional: bool = False  # the router takes the class label: router(x, t, y=...)
    router_classes: int = 0  # a label-conditional router's number of classes (0: not known)
    router_capturable: bool = True  # False: the router reads values on the host (no CUDA graphs)
    num_classes: int = 0  # class-conditional experts: labels 0 .. num_classes - 1
    device: torch.device = torch.device("cpu")
    codec: LatentCodec | None = None  # latent runs: the autoencoder; experts and router act on its latents
    accelerated: dict = field(default_factory=dict, repr=False, compare=False)  # SpeedOptions -> networks
    guided: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # scale -> with_guidance

    def __post_init__(self) -> None:
        """Checks of a DDM built by hand (a run's is built right): one prior entry per expert."""
        if not isinstance(self.experts, list) or not self.experts:
            raise DDMError(f"DDM: experts must be a non-empty list of fields (got {type(self.experts).__name__})")
        if not isinstance(self.prior, torch.Tensor):
            try:
                self.prior = torch.as_tensor(self.prior, dtype=torch.get_default_dtype())
            except (TypeError, ValueError, RuntimeError):
                raise DDMError(f"DDM: prior must be K cluster proportions (got {type(self.prior).__name__})") from None
        if tuple(self.prior.shape) != (len(self.experts),) or not self.prior.is_floating_point():
            raise DDMError(f"DDM: prior must hold one proportion per expert, ({len(self.experts)},) floats (got "
                           f"{self.prior.dtype} {tuple(self.prior.shape)})")
        self.data_shape = tuple(self.data_shape)

    @property
    def k(self) -> int:
        return len(self.experts)

    @classmethod
    def from_pretrained(cls, run: str | Path, device: str | torch.device = "cpu", exclude=(),
                        allow_missing: bool = True, guidance: float = 1.0, router: str = "learned") -> "DDM":
        """The learned DDM of a run folder (partition/, experts/, router/), as load_ddm reads it.

        device: cpu, cuda, cuda:N, mps or auto; exclude: experts to leave out (one index or a list,
        0 .. K - 1); allow_missing=False refuses a run whose expert folders are not all there;
        guidance: classifier-free guidance inside class-conditional experts; router: "learned" or
        "statistics" (the statistics-only router, from the islands' published statistics; "stats" too).
        A run grown with add-expert --router stats has no learned router: "learned" routes it by the
        statistics too (the DDM's repr says router='statistics')."""
        return load_ddm(run, device, exclude, allow_missing, guidance, router)

    def __repr__(self) -> str:
        labels = f"class-conditional, {self.num_classes} classes" if self.num_classes else "unconditional"
        router = self.meta.get("router") or self.meta.get("kind", "custom")
        missing = f", missing experts {self.meta['missing_experts']}" if self.meta.get("missing_experts") else ""
        return (f"DDM(K={self.k}, data_shape={tuple(self.data_shape)}, router={router!r}, device={str(self.device)!r}, "
                f"{labels}{missing})")

    def to(self, device: str | torch.device) -> "DDM":
        """Move every network and tensor to `device` (in place: cpu, cuda, cuda:N, mps or auto, see
        checked_device) and sample there by default."""
        device = checked_device(device, "DDM.to")
        for f in [*self.experts, self.router]:
            if isinstance(f, NetworkField):
                f.network.to(device)
            elif isinstance(f, torch.nn.Module):  # a network of the user's, called as a field
                f.to(device)
        self.prior = self.prior.to(device)
        if self.codec is not None:
            self.codec.to(device)
        if self.label_prior is not None:
            self.label_prior = self.label_prior.to(device)
        self.device = device
        self.accelerated.clear()
        return self

    def with_guidance(self, guidance: float) -> "DDM":
        """The same DDM with classifier-free guidance `guidance` (0 .. 1000; 1 for unconditional
        experts) inside each class-conditional expert."""
        guidance = checked_guidance(guidance, "DDM.with_guidance", self.num_classes)

        def guided(f):
            if isinstance(f, NetworkField) and isinstance(f.output, VelocityOutput):
                return dataclasses.replace(f, output=dataclasses.replace(f.output, guidance=guidance))
            return f

        return dataclasses.replace(self, experts=[guided(f) for f in self.experts], accelerated={})

    def at_guidance(self, guidance: float) -> "DDM":
        """with_guidance(guidance), kept while the DDM holds the same experts and router: the networks it
        prepares (CUDA graphs) serve every later sample(guidance=...) at that scale, as networks() keeps
        the DDM's own."""
        members = (tuple(map(id, self.experts)), id(self.router))
        for stale in [key for key in self.guided if key[1] != members]:
            del self.guided[stale]
        key = (guidance, members)
        if key not in self.guided:
            self.guided[key] = self.with_guidance(guidance)
        return self.guided[key]

    def with_router(self, router: Field, kind: str, conditional: bool = False, capturable: bool = True,
                    classes: int = 0) -> "DDM":
        """The same experts routed by another router (classes: a label-conditional one's, 0 if not known)."""
        return dataclasses.replace(self, router=router, meta={**self.meta, "router": kind},
                                   router_conditional=conditional, router_capturable=capturable,
                                   router_classes=classes, accelerated={})

    def restrict(self, present: int | list[int], nearest: Callable | None = None) -> "DDM":
        """The DDM with only the experts `present` (indices 0 .. K - 1): router and prior masked and
        renormalised, the nearest-cluster map limited to them (present_nearest; or `nearest`, a map
        x -> (B,) cluster index that answers only present clusters)."""
        present = load.expert_indices(present, self.k, "restrict: present")
        if not present:
            raise DDMError("no expert is present: at least one expert folder is needed to sample")
        mask = torch.zeros(self.k, dtype=torch.bool)
        mask[present] = True
        missing = [c for c in range(self.k) if not mask[c]]
        prior = self.prior.cpu() * mask
        experts = [e if mask[c] else absent_expert for c, e in enumerate(self.experts)]
        label = self.label_prior
        if label is not None:
            label = label.cpu() * mask
            label = torch.where(label.sum(1, keepdim=True) > 0, label, mask.float())
            label = (label / label.sum(1, keepdim=True)).to(self.device)
        meta = {**self.meta, "missing_experts": missing, "present_experts": present}
        return dataclasses.replace(self, experts=experts, router=masked_router(self.router, mask),
                                   prior=(prior / prior.sum()).to(self.device),
                                   nearest=nearest or present_nearest(self.nearest, mask),
                                   meta=meta, label_prior=label, accelerated={})

    def networks(self, speed: SpeedOptions, device) -> Accelerated:
        """The experts and router as sampling calls them (ddmkit.accel.accelerate), kept per speed
        options, so CUDA graphs captured in one sampling call serve the next, as long as the DDM holds
        the same experts and router (ddm.experts[k] = f or ddm.router = g in place prepares them anew)."""
        members = (tuple(map(id, self.experts)), id(self.router))  # the kept calls hold them: ids not reused
        for stale in [key for key in self.accelerated if key[2] != members]:
            del self.accelerated[stale]
        key = (speed, str(device), members)
        if key not in self.accelerated:
            self.accelerated[key] = accelerate(self.experts, self.router, speed, device, self.router_capturable)
        return self.accelerated[key]

    def sample(self, strategy: str | Strategy = "top-2", n: int | None = None, steps: int = 50, solver: str = "euler",
               seed: int = 0, labels=None, guidance: float | None = None, decode: bool = True,
               x1: torch.Tensor | None = None, batch_size: int | None = None, router_every: int = 1,
               speed: SpeedOptions = SpeedOptions(), callback=None, out: torch.Tensor | None = None, **unknown):
        """(samples (n, *data_shape), info): routed sampling from x_1 ~ N(0, I) fixed by `seed`, on the
        DDM's device (move it with .to(device)). strategy: a routing strategy's name ('top-2'; the forms
        of ddmkit.routing.STRATEGIES) or a ddmkit.routing.Strategy object (one of your own, unnamed).

        n: the number of samples (default len(x1) when x1 is given, else 1000). The same seed and n give
        the same noise; n rows are not always the first rows of a larger draw
        (start_noise): take the first rows of a larger draw to reproduce a subset, as the pipeline does.
        labels (n,): class labels for class-conditional experts, p(cluster | label) or a label-conditional
        router, ints 0 .. num_classes - 1, or num_classes for "no label" (a tensor, list or numpy array of
        ints); guidance: classifier-free guidance scale inside each expert (None: as loaded); a latent DDM
        returns decoded images (decode=False: the latents, of shape data_shape; decode is True or False); images
        come as integrated (and decoded), not clamped: the pipeline clamps them to [-1, 1] before it saves and
        scores them (x0.clamp(-1, 1) does the same here; docs/images.md#from-python saves them as PNGs). x1: the
        starting noise, a float32 torch tensor (n, *data_shape), moved to the DDM's device; batch_size,
        router_every, speed, callback and out (x1 on the DDM's device: the samples written over it) as in
        ddmkit.ddm.sampling.sample_ddm. Bad arguments are DDMErrors naming them."""
        if unknown:
            raise DDMError(unknown_argument(next(iter(unknown)), self.device))
        if n is None:
            n = len(x1) if isinstance(x1, torch.Tensor) and x1.dim() > 0 else 1000
        for name, value in (("steps", steps), ("solver", solver), ("seed", seed)):
            if value is None:  # None would mean "not given", i.e. the default: seed=None is seed 0, not a new draw
                raise DDMError(f"DDM.sample: {name}: None; give a value, or leave it out for its default"
                               + (" (0): other noise needs another seed, e.g. seed=1" if name == "seed" else ""))
        if not isinstance(decode, bool):  # "no" would be true: a latent DDM's images, not its latents
            raise DDMError(f"DDM.sample: decode: {decode!r}; pass True (a latent DDM's samples decoded to images) or "
                           "False (its latents); a DDM of vectors or images has nothing to decode and takes either")
        checked = checked_arguments("DDM.sample", n, seed, steps, solver, batch_size, router_every, callback)
        ddm = self if guidance is None else self.at_guidance(checked_guidance(guidance, "DDM.sample",
                                                                              self.num_classes))
        cond = checked_cond(self, None if labels is None else {"y": labels}, checked.n, self.device, "DDM.sample")
        if isinstance(x1, torch.Tensor):  # the rows start where the networks are (checked by sample_ddm)
            x1 = x1.to(self.device)
        x0, info = sample_ddm(ddm, strategy, checked.n, checked.steps, checked.solver, checked.seed, self.device,
                              x1=x1, callback=callback, router_every=checked.router_every, cond=cond,
                              batch_size=checked.batch_size, speed=speed, out=out)
        if decode and self.codec is not None:
            x0 = self.codec.decode(x0)
        return x0, info


def unknown_argument(name: str, device) -> str:
    """What DDM.sample says of a keyword it does not take."""
    if name == "device":
        return f"DDM.sample: device: a DDM samples on its own device ({device}); move the DDM with .to(device) first"
    if name == "cond":
        return "DDM.sample: cond: pass class labels as labels=... (cond is sample_ddm's)"
    accepted = [p for p in inspect.signature(DDM.sample).parameters if p not in ("self", "unknown")]
    return f"DDM.sample: unknown argument {name!r}; accepted: {', '.join(accepted)}"


def present_nearest(nearest: Callable | None, present: torch.Tensor) -> Callable | None:
    """`nearest` limited to the present clusters (a (K,) bool mask): a partition's map
    (load.NearestCluster) picks among them; a map of your own is checked, and a row it sends to a removed
    expert is a DDMError (pass restrict(present, nearest=...) instead)."""
    if nearest is None:
        return None
    if isinstance(nearest, load.NearestCluster):
        return nearest.among(present)

    def checked(x: torch.Tensor) -> torch.Tensor:
        c = nearest(x)
        if not bool(present.to(c.device)[c].all()):
            removed = sorted(set(c[~present.to(c.device)[c]].tolist()))
            raise DDMError(f"restrict: this DDM's nearest-cluster function sent rows to removed experts {removed}; "
                           "pass restrict(present, nearest=f) with an f that answers only present clusters")
        return c

    return checked


def absent_expert(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """Stand-in for a missing expert: its router weight is 0, so a dense combiner that still
    evaluates it adds 0 * 0."""
    return torch.zeros_like(x)


def masked_router(router: Field, present: torch.Tensor) -> Field:
    """r_k 1[k present] / sum_j r_j 1[j present]; uniform over the present experts where the router
    gives them no mass at all (a row of NaN stays NaN, and one of negative mass negative, for sampling's
    probe of the router to see). A mass too small for float32's normal numbers (a statistics-only router far
    from the present islands) is divided as it is: its row still sums to 1."""

    masks = {}  # (device, dtype) -> the mask there, copied once (no copy while a CUDA graph is captured)

    def f(x, t, **cond):
        p = router(x, t, **cond)
        if (p.device, p.dtype) not in masks:
            masks[p.device, p.dtype] = present.to(p.device, p.dtype)
        m = masks[p.device, p.dtype]
        p = p * m
        total = p.sum(1, keepdim=True)
        return torch.where(total == 0, m / m.sum(), p / torch.where(total > 0, total, torch.ones_like(total)))

    return f


def load_ddm(run: str | Path, device: str | torch.device = "cpu", exclude=(), allow_missing: bool = True,
             guidance: float = 1.0, router: str = "learned") -> DDM:
    """The learned DDM of a run folder (partition/, experts/, router/), for vectors, images and any
    data shape alike.

    Experts whose folder is missing, and those in `exclude`, are left out (see DDM.restrict;
    allow_missing=False refuses instead). When RUN/registry.json exists every file is checked against
    it before any network is built. guidance: classifier-free guidance inside class-conditional
    experts (0 .. 1000; 1 for unconditional experts). router="statistics" routes by the islands'
    published statistics (no raw data). device: cpu, cuda, cuda:N, mps or auto (checked_device);
    exclude: one expert index or a list of them, 0 .. K - 1."""
    device = checked_device(device, "load_ddm")
    guidance = checked_guidance(guidance, "load_ddm")  # a number in bounds before the folder is read
    checked_run(run, "load_ddm")
    if not isinstance(allow_missing, bool):  # "no" would be true: missing experts left out, not refused
        raise DDMError(f"load_ddm: allow_missing: {allow_missing!r}; pass True or False")
    run = Path(run).expanduser() if isinstance(run, (str, Path)) else run  # "~/runs/fm", as a shell would read it
    parts, absent = load.learned_parts(run, device, exclude, allow_missing, guidance, router)
    parts["experts"] = [absent_expert if e is None else e for e in parts["experts"]]
    ddm = DDM(**parts)
    checked_guidance(guidance, "load_ddm", ddm.num_classes)
    if not absent:
        return ddm
    return ddm.restrict([c for c in range(ddm.k) if c not in absent])


def exact_ddm(run: str | Path) -> DDM:
    """The exact DDM of a run on a Gaussian mixture: exact cluster velocities and the exact posterior
    (ddmkit.ddm.load.exact_parts)."""
    return DDM(**load.exact_parts(checked_run(run, "exact_ddm")))


def checked_run(run, where: str):
    """`run` if it is a path (a str or os.PathLike); None (an unset variable) or a number is a DDMError naming
    `run`, not a TypeError from deep in the loading."""
    if not isinstance(run, (str, os.PathLike)):
        raise DDMError(f"{where}: run: {run!r} ({type(run).__name__}) is not a folder; pass the path of a run "
                       "folder, e.g. 'runs/ring'")
    check_given(run, f"{where}: run")
    return run
