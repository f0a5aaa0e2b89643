"""ddmkit: Decentralized Diffusion Models.

    from ddmkit import DDM
    ddm = DDM.from_pretrained("runs/ring")             # a run folder: partition/, experts/, router/
    x0, info = ddm.sample(strategy="top-2", n=1000, steps=50, seed=0)

Time convention (one for the whole code base): t in [0, 1], t = 0 is data,
t = 1 is noise, x_t = (1 - t) x + t eps, velocity target v = eps - x,
sampling integrates dx/dt = v from t = 1 down to t = 0.

The public API: DDM (from_pretrained, to, sample), sample_ddm and sample_single (routed and
single-field sampling), SpeedOptions (GPU speed options), load_config and RunConfig (the TOML
run configuration), run_pipeline (every stage of a run), GaussianMixture (exact truth),
STRATEGIES and parse_strategy (routing strategies), DDMError (bad input).
"""
from ddmkit.accel import SpeedOptions
from ddmkit.config import RunConfig, load_config
from ddmkit.conventions import TIME_CONVENTION, __version__
from ddmkit.ddm import DDM, exact_ddm, load_ddm, sample_ddm, sample_single, start_noise
from ddmkit.errors import DDMError
from ddmkit.pipeline.run import run_pipeline
from ddmkit.routing import STRATEGIES, parse_strategy
from ddmkit.truth import GaussianMixture

__all__ = ["DDM", "DDMError", "GaussianMixture", "RunConfig", "STRATEGIES", "SpeedOptions", "TIME_CONVENTION",
           "__version__", "exact_ddm", "load_config", "load_ddm", "parse_strategy", "run_pipeline", "sample_ddm",
           "sample_single", "start_noise"]
