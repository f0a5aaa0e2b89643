"""Data sets (synthetic with known truth, arrays; images and text extend LOADERS)."""
from ddmkit.data.arrays import ArrayData, check_finite, content_hash
from ddmkit.data.datasets import dataset_names, load_dataset, takes_test_fraction
from ddmkit.data.partition import load_partition, partition_data, read_shard

__all__ = ["ArrayData", "check_finite", "content_hash", "dataset_names", "load_dataset", "load_partition",
           "partition_data", "read_shard", "takes_test_fraction"]
