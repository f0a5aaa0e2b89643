"""Training: the one loop (fit) for experts, monolith and routers, and the jobs built on it."""
from ddmkit.train.jobs import monolith_config, train_expert, train_monolith, train_router
from ddmkit.train.loop import EMA, fit
from ddmkit.train.stacked import StackedExperts

__all__ = ["EMA", "StackedExperts", "StreamedExperts", "fit", "monolith_config", "train_expert", "train_monolith",
           "train_router"]


def __getattr__(name: str):
    """StreamedExperts, imported when first asked for (its module imports torch._dynamo: a second's work)."""
    if name == "StreamedExperts":
        from ddmkit.train.streamed import StreamedExperts
        return StreamedExperts
    raise AttributeError(f"module 'ddmkit.train' has no attribute {name!r}")
