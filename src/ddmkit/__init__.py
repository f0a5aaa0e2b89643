"""ddmkit: Decentralized Diffusion Models.

    from ddmkit import DDM
    ddm = DDM.from_pretrained("runs/ring")             # a run folder: partition/, experts/, router/
    x0, info = ddm.sample(strategy="top-2", n=1000, steps=50, seed=0)

Time convention: the one of ddmkit.conventions (t = 0 data, t = 1 noise).

The public API: DDM (from_pretrained, to, sample), load_ddm (DDM.from_pretrained's loader) and
exact_ddm (the exact DDM of a Gaussian-mixture run), sample_ddm and sample_single (routed and
single-field sampling), start_noise (the starting noise of a seed), SpeedOptions (GPU speed options),
load_config and RunConfig (the TOML run configuration), run_pipeline (every stage of a run),
GaussianMixture (exact truth), STRATEGIES and parse_strategy (routing strategies), DDMError (bad input),
TIME_CONVENTION and __version__.
"""
from ddmkit.conventions import TIME_CONVENTION, __version__
from ddmkit.errors import DDMError

# The rest loads on first use, so `import ddmkit.cli` (and `ddmkit --help`) stays quick.
_PUBLIC = {
    "DDM": "ddmkit.ddm", "exact_ddm": "ddmkit.ddm", "load_ddm": "ddmkit.ddm", "sample_ddm": "ddmkit.ddm",
    "sample_single": "ddmkit.ddm", "start_noise": "ddmkit.ddm", "SpeedOptions": "ddmkit.accel",
    "RunConfig": "ddmkit.config", "load_config": "ddmkit.config", "run_pipeline": "ddmkit.pipeline.run",
    "STRATEGIES": "ddmkit.routing", "parse_strategy": "ddmkit.routing", "GaussianMixture": "ddmkit.truth",
}
__all__ = ["DDMError", "TIME_CONVENTION", "__version__", *_PUBLIC]


def __getattr__(name: str):
    """A public name, or a submodule (ddmkit.ddm, ddmkit.routing, ...), imported on first use."""
    import importlib
    import importlib.util

    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'ddmkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the public ones that load on first use (so dir() and completion list them)."""
    return sorted({*globals(), *_PUBLIC})
