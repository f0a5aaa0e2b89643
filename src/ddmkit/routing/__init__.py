"""Routing: strategies (one table), the sparse combiner, the statistics-only router."""
from ddmkit.routing.combine import CallCounter, combine, combine_dense, routed_velocity
from ddmkit.routing.strategies import RoutingState, Strategy
from ddmkit.routing.table import STRATEGIES, STRATEGY_FORMS, parse_strategy

__all__ = ["STRATEGIES", "STRATEGY_FORMS", "CallCounter", "RoutingState", "Strategy", "combine", "combine_dense",
           "parse_strategy", "routed_velocity"]
