"""The linear path (t = 0 data, t = 1 noise), parameterisation conversions and losses."""
from ddmkit.flow.losses import flow_matching_loss, router_loss
from ddmkit.flow.path import PREDICTIONS, noise, target_for, to_velocity, x0_from_velocity

__all__ = ["PREDICTIONS", "flow_matching_loss", "noise", "router_loss", "target_for", "to_velocity",
           "x0_from_velocity"]
