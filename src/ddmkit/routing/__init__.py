"""Routing strategies and the sparse combiner."""
from ddmkit.routing.combine import CallCounter, combine, combine_dense, routed_velocity
from ddmkit.routing.strategies import STRATEGY_FORMS, RoutingState, parse_strategy, register_strategy

__all__ = ["STRATEGY_FORMS", "CallCounter", "RoutingState", "combine", "combine_dense", "parse_strategy",
           "register_strategy", "routed_velocity"]
from ddmkit.analysis import strategies as _alignment_strategies  # noqa: E402,F401  (registers adaptive-P, adaptive-ent-H, gated-K@A)
