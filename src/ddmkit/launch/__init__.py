"""Where expert jobs run: inline, a local process pool, Ray, or a SLURM job array.

All of them call the one pure function `ddmkit.train.jobs.train_expert`.
"""
from ddmkit.launch.backends import (BACKENDS, ExpertJob, check_backend, check_concurrent_backend, check_launch,
                                   run_jobs)
from ddmkit.launch.slurm import check_emit, slurm_script, write_slurm_script

__all__ = ["BACKENDS", "ExpertJob", "check_backend", "check_concurrent_backend", "check_launch", "check_emit",
           "run_jobs", "slurm_script", "write_slurm_script"]
