"""The CPU thread count of a training job, one for every backend: `job_threads`.

It lives with the training jobs (ddmkit.train.threads), since `train_expert` runs itself on
config.train.threads threads; it is named here too for the pipeline's stages, which run the
concurrent, monolith and router jobs inside it.
"""
from ddmkit.train.threads import job_threads

__all__ = ["job_threads"]
