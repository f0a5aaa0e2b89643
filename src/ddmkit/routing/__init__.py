"""Routing strategies and the sparse combiner."""
from ddmkit.routing.combine import CallCounter, combine, combine_dense, routed_velocity
from ddmkit.routing.strategies import STRATEGY_FORMS, RoutingState, parse_strategy, register_strategy

__all__ = ["STRATEGY_FORMS", "CallCounter", "RoutingState", "combine", "combine_dense", "parse_strategy",
           "register_strategy", "routed_velocity"]
