"""Routing: strategies (one table), the sparse combiner, the statistics-only router."""
from ddmkit.routing.combine import (CallCounter, apply_plan, combine, combine_dense, make_plan, plan_selection,
                                    routed_velocity)
from ddmkit.routing.strategies import ExpertProbe, RoutingState, Strategy, redraws_each_evaluation
from ddmkit.routing.stats_router import class_stats_router, island_class_statistics, island_statistics
from ddmkit.routing.table import (STRATEGIES, StrategyForm, depends_on_the_state_alone, parse_strategy,
                                  strategy_forms)

__all__ = ["STRATEGIES", "CallCounter", "ExpertProbe", "RoutingState", "Strategy", "StrategyForm", "apply_plan",
           "class_stats_router", "combine", "combine_dense", "depends_on_the_state_alone", "island_class_statistics",
           "island_statistics", "make_plan", "parse_strategy", "plan_selection", "redraws_each_evaluation",
           "routed_velocity", "strategy_forms"]
