"""The FID floor row (training images against the test split) is measured at a sample set's count: with fewer
training images than the sets, FID's finite-sample bias lifts it, and a perfect sampler would beat it."""
import torch

from ddmkit.evaluation.images import reference_features
from ddmkit.io import save_tensors


def test_the_floor_scores_as_many_training_images_as_a_sample_set(tmp_path):
    save_tensors(tmp_path / "data" / "train.safetensors", {"x": torch.randn(50, 1, 4, 4)})
    save_tensors(tmp_path / "data" / "test.safetensors", {"x": torch.randn(10, 1, 4, 4)})
    seen = []

    def extractor(images):
        seen.append(len(images))
        return images.flatten(1)

    f_test, f_train, _ = reference_features(tmp_path, extractor, "pixels", 30, log=lambda _: None)
    assert (len(f_test), len(f_train)) == (10, 30)  # it scored min(n, test images) = 10 training images
    assert seen == [10, 30]
    f_test2, f_train, _ = reference_features(tmp_path, extractor, "pixels", 30, log=lambda _: None)
    assert seen == [10, 30] and torch.equal(f_test2, f_test)  # from the cache
    _, f_train, _ = reference_features(tmp_path, extractor, "pixels", 100, log=lambda _: None)
    assert len(f_train) == 50 and seen == [10, 30, 50]  # all of them; the test features kept
    reference_features(tmp_path, extractor, "pixels", 100, log=lambda _: None)
    assert seen == [10, 30, 50]
