"""The DDM object and routed sampling.

    from ddmkit import DDM
    ddm = DDM.from_pretrained("runs/ring").to("cuda")
    x0, info = ddm.sample(strategy="top-2", n=1000, steps=50)
"""
from ddmkit.ddm.load import monolith_field, nearest_cluster_fn
from ddmkit.ddm.model import DDM, exact_ddm, load_ddm
from ddmkit.ddm.sampling import sample_ddm, sample_single, start_noise

__all__ = ["DDM", "exact_ddm", "load_ddm", "monolith_field", "nearest_cluster_fn", "sample_ddm", "sample_single",
           "start_noise"]
