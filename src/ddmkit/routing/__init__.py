"""Routing: strategies (one table), the sparse combiner, the statistics-only router."""
from ddmkit.routing.combine import (CallCounter, apply_plan, combine, combine_dense, make_plan, plan_selection,
                                    routed_velocity)
from ddmkit.routing.strategies import ExpertProbe, RoutingState, Strategy, redraws_each_evaluation
from ddmkit.routing.table import STRATEGIES, STRATEGY_FORMS, StrategyForm, parse_strategy

__all__ = ["STRATEGIES", "STRATEGY_FORMS", "CallCounter", "ExpertProbe", "RoutingState", "Strategy", "StrategyForm",
           "apply_plan", "combine", "combine_dense", "make_plan", "parse_strategy", "plan_selection",
           "redraws_each_evaluation", "routed_velocity"]
