"""Velocity networks and routers; build from specs, save/load as folders; a network's output as a field."""
from ddmkit.nets.dit import DiT
from ddmkit.nets.field import NetworkField, RouterOutput, VelocityOutput, router_probabilities
from ddmkit.nets.mlp import RouterMLP, VelocityMLP, timestep_embedding
from ddmkit.nets.registry import ARCHITECTURES, build_model, build_seeded, from_pretrained, save_pretrained
from ddmkit.nets.router_cnn import RouterCNN
from ddmkit.nets.unet import UNet

__all__ = ["ARCHITECTURES", "DiT", "NetworkField", "RouterCNN", "RouterMLP", "RouterOutput", "UNet", "VelocityMLP",
           "VelocityOutput", "build_model", "build_seeded", "from_pretrained", "router_probabilities",
           "save_pretrained", "timestep_embedding"]
