"""Evaluation: metrics (W2, MMD, NLL under the truth, FID/KID), scored sample sets beside the noise
floor, router accuracy per noise level, the missing-expert and statistics-router studies, plots."""
from ddmkit.evaluation.distances import mmd_rbf, w2_exact, w2_sliced
from ddmkit.evaluation.mixture import mode_coverage, nll, off_manifold_rate
from ddmkit.evaluation.routers import router_report

__all__ = ["mmd_rbf", "mode_coverage", "nll", "off_manifold_rate", "router_report", "w2_exact", "w2_sliced"]
