"""The one training loop for experts, monolith and routers."""
from ddmkit.train.loop import fit, resolve_device

__all__ = ["fit", "resolve_device"]
