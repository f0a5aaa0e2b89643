"""Sample-quality metrics: distances between sample sets, and scores under a known mixture."""
from ddmkit.metrics.distances import mmd_rbf, w2_exact, w2_sliced
from ddmkit.metrics.mixture import mode_coverage, nll, off_manifold_rate

__all__ = ["mmd_rbf", "mode_coverage", "nll", "off_manifold_rate", "w2_exact", "w2_sliced"]
