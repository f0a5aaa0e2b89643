"""Velocity networks and routers; build from specs, save/load as folders."""
from ddmkit.nets.mlp import RouterMLP, VelocityMLP, timestep_embedding
from ddmkit.nets.registry import ARCHITECTURES, build_model, build_seeded, from_pretrained, save_pretrained

__all__ = ["ARCHITECTURES", "RouterMLP", "VelocityMLP", "build_model", "build_seeded", "from_pretrained", "save_pretrained",
           "timestep_embedding"]
