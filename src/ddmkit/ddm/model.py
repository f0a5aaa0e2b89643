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
w_k = r_k 1[k present] / sum_j r_j 1[j present], the cluster prior likewise.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ddmkit.accel import Accelerated, SpeedOptions, accelerate
from ddmkit.config import SampleConfig, resolve_device, validate
import ddmkit.ddm.load as load
from ddmkit.ddm.sampling import checked_class_labels, sample_ddm, whole
from ddmkit.errors import DDMError
from ddmkit.latent.autoencoder import LatentCodec
from ddmkit.nets.field import NetworkField, VelocityOutput

Field = Callable[..., torch.Tensor]


@dataclass
class DDM:
    experts: list[Field]
    router: Field
    prior: torch.Tensor  # (K,) cluster proportions
    data_shape: tuple[int, ...]
    nearest: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> nearest cluster centroid (B,)
    meta: dict = field(default_factory=dict)
    label_prior: torch.Tensor | None = None  # (C, K) p(cluster | class label), for labelled data
    router_conditional: bool = False  # the router takes the class label: router(x, t, y=...)
    router_capturable: bool = True  # False: the router reads values on the host (no CUDA graphs)
    num_classes: int = 0  # class-conditional experts: labels 0 .. num_classes - 1
    device: torch.device = torch.device("cpu")
    codec: LatentCodec | None = None  # latent runs: the autoencoder; experts and router act on its latents
    accelerated: dict = field(default_factory=dict, repr=False, compare=False)  # SpeedOptions -> networks

    @property
    def k(self) -> int:
        return len(self.experts)

    @classmethod
    def from_pretrained(cls, run: str | Path, device: str | torch.device = "cpu", **options) -> "DDM":
        """The learned DDM of a run folder (options: load_ddm's)."""
        return load_ddm(run, device, **options)

    def to(self, device: str | torch.device) -> "DDM":
        """Move every network and tensor to `device` (in place: cpu, cuda, cuda:N, mps or auto, see
        checked_device) and sample there by default."""
        device = checked_device(device)
        for f in [*self.experts, self.router]:
            if isinstance(f, NetworkField):
                f.network.to(device)
        self.prior = self.prior.to(device)
        if self.codec is not None:
            self.codec.to(device)
        if self.label_prior is not None:
            self.label_prior = self.label_prior.to(device)
        self.device = device
        self.accelerated.clear()
        return self

    def with_guidance(self, guidance: float) -> "DDM":
        """The same DDM with classifier-free guidance `guidance` inside each class-conditional expert."""
        def guided(f):
            if isinstance(f, NetworkField) and isinstance(f.output, VelocityOutput):
                return dataclasses.replace(f, output=dataclasses.replace(f.output, guidance=float(guidance)))
            return f

        return dataclasses.replace(self, experts=[guided(f) for f in self.experts], accelerated={})

    def with_router(self, router: Field, kind: str, conditional: bool = False, capturable: bool = True) -> "DDM":
        """The same experts routed by another router."""
        return dataclasses.replace(self, router=router, meta={**self.meta, "router": kind},
                                   router_conditional=conditional, router_capturable=capturable, accelerated={})

    def restrict(self, present: int | list[int], nearest: Callable | None = None) -> "DDM":
        """The DDM with only the experts `present` (indices 0 .. K - 1): router and prior masked and
        renormalised."""
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
                                   prior=(prior / prior.sum()).to(self.device), nearest=nearest or self.nearest,
                                   meta=meta, label_prior=label, accelerated={})

    def networks(self, speed: SpeedOptions, device) -> Accelerated:
        """The experts and router as sampling calls them (ddmkit.accel.accelerate), kept per speed
        options, so CUDA graphs captured in one sampling call serve the next."""
        key = (speed, str(device))
        if key not in self.accelerated:
            self.accelerated[key] = accelerate(self.experts, self.router, speed, device, self.router_capturable)
        return self.accelerated[key]

    def sample(self, strategy: str = "top-2", n: int = 1000, steps: int = 50, solver: str = "euler", seed: int = 0,
               labels: torch.Tensor | None = None, guidance: float | None = None, decode: bool = True, **options):
        """(samples (n, *data_shape), info): routed sampling from x_1 ~ N(0, I) fixed by `seed`.

        labels (n,): class labels for class-conditional experts (and a label-conditional router), ints
        0 .. num_classes - 1, or num_classes for "no label" (a tensor, list or numpy array of ints);
        guidance: classifier-free guidance scale inside each expert (None: as loaded); a latent DDM
        returns decoded images (decode=False: the latents, of shape data_shape).
        options: ddmkit.ddm.sampling.sample_ddm's (router_every, batch_size, speed, x1, callback); x1, the
        starting noise, is a float32 torch tensor (n, *data_shape)."""
        counts = {"n": n, "steps": steps, "seed": seed,
                  **{key: options[key] for key in ("batch_size", "router_every") if options.get(key) is not None}}
        counts = {key: whole(value, f"DDM.sample: {key}") for key, value in counts.items()}
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, numbers.Real)):
            raise DDMError(f"DDM.sample: guidance: {guidance!r} is not a number; pass a float from 0 to 1000, or None")
        checked = validate(SampleConfig, {**counts, "solver": solver, "strategies": [strategy],
                                          **({} if guidance is None else {"guidance": guidance})},
                           "DDM.sample", "arguments")  # the bounds `ddmkit sample` has
        options.update({key: getattr(checked, key) for key in counts if key in options})
        if not self.num_classes and (labels is not None or guidance not in (None, 1.0)):
            raise DDMError("DDM.sample: labels and guidance need class-conditional experts (num_classes > 0); this "
                           "DDM's experts are unconditional: leave them out")
        ddm = self if guidance is None else self.with_guidance(checked.guidance)
        cond = None if labels is None else {"y": checked_class_labels(labels, checked.n, self.num_classes, self.device,
                                                                              "DDM.sample")}
        x0, info = sample_ddm(ddm, strategy, checked.n, checked.steps, checked.solver, checked.seed, self.device,
                              cond=cond, **options)
        if decode and self.codec is not None:
            x0 = self.codec.decode(x0)
        return x0, info


def checked_device(device: str | torch.device) -> torch.device:
    """`device` (cpu, cuda, cuda:N, mps, or auto: cuda when there is one, else cpu) as a torch.device of
    this machine, or a DDMError naming the argument (config.resolve_device)."""
    return resolve_device(device, f"device: {device!r}", "pass device='cpu', or 'auto' (cuda when there is one)")


def absent_expert(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """Stand-in for a missing expert: its router weight is 0, so a dense combiner that still
    evaluates it adds 0 * 0."""
    return torch.zeros_like(x)


def masked_router(router: Field, present: torch.Tensor) -> Field:
    """r_k 1[k present] / sum_j r_j 1[j present]; uniform over the present experts where the router
    gives them no mass at all."""

    def f(x, t, **cond):
        p = router(x, t, **cond)
        m = present.to(p.device, p.dtype)
        p = p * m
        total = p.sum(1, keepdim=True)
        return torch.where(total > 0, p / total.clamp_min(1e-30), m / m.sum())

    return f


def load_ddm(run: str | Path, device: str | torch.device = "cpu", exclude=(), allow_missing: bool = True,
             guidance: float = 1.0, router: str = "learned") -> DDM:
    """The learned DDM of a run folder (partition/, experts/, router/), for vectors, images and any
    data shape alike.

    Experts whose folder is missing, and those in `exclude`, are left out (see DDM.restrict;
    allow_missing=False refuses instead). When RUN/registry.json exists every file is checked against
    it before any network is built. guidance: classifier-free guidance inside class-conditional
    experts. router="statistics" routes by the islands' published statistics (no raw data). device: cpu,
    cuda, cuda:N, mps or auto (checked_device); exclude: one expert index or a list of them, 0 .. K - 1."""
    device = checked_device(device)
    parts, absent = load.learned_parts(run, device, exclude, allow_missing, guidance, router)
    nearest = parts.pop("restrict_nearest", None)
    parts["experts"] = [absent_expert if e is None else e for e in parts["experts"]]
    ddm = DDM(**parts)
    if not absent:
        return ddm
    return ddm.restrict([c for c in range(ddm.k) if c not in absent], nearest)


def exact_ddm(run: str | Path) -> DDM:
    """The exact DDM of a run on a Gaussian mixture: exact cluster velocities and the exact posterior
    (ddmkit.ddm.load.exact_parts)."""
    return DDM(**load.exact_parts(run))
