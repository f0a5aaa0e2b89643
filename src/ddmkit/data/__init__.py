"""Data sets (synthetic with known truth, arrays; images and text extend LOADERS)."""
from ddmkit.data.arrays import ArrayData, check_finite, content_hash
from ddmkit.data.datasets import dataset_names, load_dataset, takes_test_fraction

__all__ = ["ArrayData", "check_finite", "content_hash", "dataset_names", "load_dataset", "takes_test_fraction"]
