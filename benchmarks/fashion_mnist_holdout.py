"""Fashion-MNIST with one class held out, as data functions for `data.name` and `ddmkit add-expert --data`.

    data.name = "benchmarks.fashion_mnist_holdout:without_class"   # run from the checkout, PYTHONPATH=.
    ddmkit add-expert RUN --data benchmarks.fashion_mnist_holdout:only_class

`without_class`: the training images of every class but `held_out`, and the whole test set (all ten
classes), so that a DDM built without the class is scored against the same reference as one built on
everything. `only_class`: the training images of `held_out` alone and no test rows (the run's test set
already holds that class). Images are padded to 32 x 32 and scaled to [-1, 1], as `fashion_mnist` with
`pad_to = 32` loads them; labels are the ten Fashion-MNIST classes.
"""
from __future__ import annotations

from ddmkit.data import load_dataset


def _splits(dir: str | None):
    """Fashion-MNIST's 60,000 training and 10,000 test images, padded to 32 x 32 (rows in a seeded order)."""
    return load_dataset("fashion_mnist", 60000, 10000, 0, {"pad_to": 32, **({"dir": dir} if dir else {})})


def without_class(held_out: int = 9, dir: str | None = None) -> dict:
    """Training images of the nine other classes; the whole test set."""
    train, test = _splits(dir)
    keep = train.labels != held_out
    return {"train": train.x[keep], "train_labels": train.labels[keep], "test": test.x, "test_labels": test.labels}


def only_class(held_out: int = 9, dir: str | None = None) -> dict:
    """Training images of `held_out` alone; an empty test split."""
    train, _ = _splits(dir)
    keep = train.labels == held_out
    return {"train": train.x[keep], "train_labels": train.labels[keep], "test": train.x[:0],
            "test_labels": train.labels[:0]}
