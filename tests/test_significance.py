"""The paired bootstrap behind the ablation table's significance column and the registry gate's
noise bound, on known differences."""

import numpy as np
import pytest

from components.gate import decide, noise_bound
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


def test_a_method_row_and_its_table_line_from_hand_computed_seeds():
    """Two seeds at mIoU 0.5 and 0.7: mean 0.6, sample std 0.1414; a method with the baseline's own
    matrices differs from it by exactly 0 (interval [0, 0], p 1); the first row has no comparison."""
    from components.method_table import COLUMNS, method_row, table_lines

    seeds = [{"seed": s, "method": "hierarchical", "fusion": "hierarchical", "train_scales": [0.5, 1.0],
              "eval_scales": [0.5, 1.0, 2.0], "train_flops_vs_single": 1.25, "activation_mb": 12.5,
              "eval_gflops": 3.0, "epochs": 4, "miou": m, "thin_miou": m / 2, "large_miou": m,
              "minibatch_seconds": 0.2, "peak_rss_mb": 800.0} for s, m in ((0, 0.5), (1, 0.7))]
    matrices = per_image_matrices(np.random.default_rng(0), 0.8, seeds=2, images=5)
    alone = method_row(seeds, matrices, None, rounds=200, thin=None)
    assert alone["miou"]["mean"] == pytest.approx(0.6) and alone["miou"]["std"] == pytest.approx(0.2 / 2**0.5)
    assert alone["seeds"] == [0, 1] and "vs_single" not in alone
    versus = method_row(seeds, matrices, matrices, rounds=200, thin=[0, 1])
    assert versus["vs_single"]["difference"] == 0 and versus["vs_single"]["ci95"] == [0.0, 0.0]
    assert versus["vs_single"]["p_value"] == 1.0 and versus["thin_vs_single"]["difference"] == 0
    header, rule, first, second = table_lines([alone, versus], rounds=200)
    assert header == "| " + " | ".join(COLUMNS) + " |" and rule.count("---|") == len(COLUMNS)
    assert first == ("| hierarchical | 0.5, 1 | 0.5, 1, 2 | 0.6000 ± 0.1414 | 0.3000 ± 0.0707 | 0.6000 ± 0.1414 | "
                     "— | — | 1.25x | 0.200 | 800 | 12.5 |")
    assert "| +0.0000 [+0.0000, +0.0000] | 1.000 |" in second
