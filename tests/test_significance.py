"""The paired bootstrap behind the ablation table's significance column, on known differences."""

import numpy as np
import pytest

from components.significance import miou_of, paired_bootstrap


def per_image_matrices(rng, accuracy, seeds=3, images=20, classes=4, pixels=300):
    """Confusion matrices of a predictor right with probability `accuracy` per pixel."""
    out = np.zeros((seeds, images, classes, classes), np.int64)
    for s in range(seeds):
        for i in range(images):
            truth = rng.integers(0, classes, pixels)
            guess = np.where(rng.random(pixels) < accuracy, truth, rng.integers(0, classes, pixels))
            np.add.at(out[s, i], (truth, guess), 1)
    return out


def test_miou_by_hand():
    matrix = np.array([[3, 1], [0, 4]])  # IoU 3/4 and 4/5
    assert miou_of(matrix) == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert miou_of(matrix, classes=[1]) == pytest.approx(4 / 5)  # a group keeps the full union


def test_a_real_difference_is_significant_and_none_is_not():
    rng = np.random.default_rng(0)
    base = per_image_matrices(rng, 0.6)
    better = paired_bootstrap(per_image_matrices(rng, 0.8), base, rounds=500)
    assert better["p_value"] < 0.01 and better["ci95"][0] > 0 and better["difference"] > 0.1
    same = paired_bootstrap(per_image_matrices(rng, 0.6), base, rounds=500)
    assert same["p_value"] > 0.05 and same["ci95"][0] < 0 < same["ci95"][1]


def test_unpaired_results_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same seeds and images"):
        paired_bootstrap(per_image_matrices(rng, 0.6, seeds=2), per_image_matrices(rng, 0.6, seeds=3))
