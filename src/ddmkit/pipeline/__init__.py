"""The run folder's stages: data, partition, experts, monolith, router, registry, sampling,
evaluation, analysis; the same pipeline for every kind of data (ddmkit.pipeline.run)."""
