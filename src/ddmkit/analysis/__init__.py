"""Stability and expert-data alignment diagnostics of a DDM (`ddmkit analyze` runs them on a run
folder: ddmkit.pipeline.analyze).

Modules: trace (recorded trajectories), stability (L_eff, amplification, Delta_refine), alignment
(cluster distance of x0_hat and of a reference x0*, the exact posterior mean or the monolith's estimate;
per-expert error, disagreement), quality (per-sample quality, rank correlations with intervals), report
(plots and analysis.md).
"""
