"""Velocity networks and routers (built-in, or the user's own class named "package.module:Class");
build from specs, save/load as folders; a network's output as a field."""
from ddmkit.nets.dit import DiT
from ddmkit.nets.field import NetworkField, RouterOutput, VelocityOutput, router_probabilities
from ddmkit.nets.mlp import RouterMLP, VelocityMLP, timestep_embedding
from ddmkit.nets.folders import (ARCHITECTURES, build_model, build_seeded, check_builds, check_identity,
                                  from_pretrained, save_pretrained)
from ddmkit.nets.router_cnn import RouterCNN
from ddmkit.nets.unet import UNet
from ddmkit.nets.user import RouterNet, VelocityNet, use_network, use_networks, user_networks

__all__ = ["ARCHITECTURES", "DiT", "NetworkField", "RouterCNN", "RouterMLP", "RouterNet", "RouterOutput", "UNet",
           "VelocityMLP", "VelocityNet", "VelocityOutput", "build_model", "build_seeded", "check_builds",
           "check_identity", "from_pretrained", "router_probabilities", "save_pretrained", "timestep_embedding", "use_network",
           "use_networks", "user_networks"]
