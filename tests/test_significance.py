"""The paired bootstrap behind the ablation table's significance column and the registry gate's
noise bound, on known differences."""

import numpy as np
import pytest

from components.significance import miou_of, paired_bootstrap
from pipeline.register import decide, noise_bound


def per_image_matrices(rng, accuracy, seeds=3, images=20, classes=4, pixels=300):
    """Confusion matrices of a predictor right with probability `accuracy` per pixel."""
    out = np.zeros((seeds, images, classes, classes), np.int64)
    for s in range(seeds):
        for i in range(images):
            truth = rng.integers(0, classes, pixels)
            guess = np.where(rng.random(pixels) < accuracy, truth, rng.integers(0, classes, pixels))
            np.add.at(out[s, i], (truth, guess), 1)
    return out


def uniform_image_matrices(mious: list[float], classes: int = 19) -> np.ndarray:
    """Per-image confusion matrices (images, C, C) where image i scores mious[i] in every class:
    a diagonal `hit` and, off it, errors spread evenly (IoU = hit / (hit + 2 (C - 1) miss))."""
    hit = 10**6
    matrices = []
    for miou in mious:
        miss = round(hit * (1 - miou) / (2 * miou * (classes - 1)))
        errors = np.full((classes, classes), miss, dtype=np.int64)
        matrices.append(errors + np.eye(classes, dtype=np.int64) * (hit - miss))
    return np.stack(matrices)


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


def test_the_gate_promotes_beyond_the_noise_of_the_val_images_only():
    """24 val images, min_delta 0 (the default): a candidate better on 3 images and slightly worse on
    the rest is better on the mean, but inside the noise, and stays a challenger; one better on
    every image is promoted. The interval is in the reason."""
    champion_version = {"version": "1", "miou": 0.5, "gflops": 1.0}
    champion = uniform_image_matrices([0.5] * 24)
    lucky = noise_bound(uniform_image_matrices([0.9] * 3 + [0.48] * 21), champion, rounds=2000)
    assert lucky["difference"] > 0 and lucky["ci95"][0] < 0 < lucky["ci95"][1] and lucky["images"] == 24
    candidate = {"version": "2", "miou": 0.5 + lucky["difference"], "gflops": 1.0}
    promote, reason = decide(candidate, champion_version, 0.0, None, lucky)
    assert not promote and "within the noise of the val images" in reason and "over 24 val images" in reason
    assert decide(candidate, champion_version, 0.0, None)[0]  # the mean alone would have promoted it

    steady = noise_bound(uniform_image_matrices([0.55] * 24), champion, rounds=2000)
    promote, reason = decide({**candidate, "miou": 0.55}, champion_version, 0.0, None, steady)
    assert promote and steady["ci95"][0] > 0.04 and "95% interval [+0.05" in reason
    assert not decide({**candidate, "miou": 0.55}, champion_version, 0.06, None, steady)[0]  # min_delta above it


def test_the_gate_refuses_evaluations_of_different_val_sets():
    with pytest.raises(ValueError, match="evaluated on 24 val images of 19 classes, this candidate on 20"):
        noise_bound(uniform_image_matrices([0.5] * 20), uniform_image_matrices([0.5] * 24), rounds=100)
