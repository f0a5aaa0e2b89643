"""Training: the one loop (fit) for experts, monolith and routers, and the jobs built on it."""
from ddmkit.train.jobs import monolith_config, train_expert, train_monolith, train_router
from ddmkit.train.loop import EMA, fit
from ddmkit.train.stacked import StackedExperts
from ddmkit.train.streamed import StreamedExperts

__all__ = ["EMA", "StackedExperts", "StreamedExperts", "fit", "monolith_config", "train_expert", "train_monolith",
           "train_router"]
