"""Is one method's mIoU different from another's beyond the noise of seeds and of the val images?

A paired, two-level bootstrap: each round redraws the seed pairs (seed i of both methods trained on
the same sample order) and the val images, with replacement, sums the per-image confusion matrices
of the drawn images, and takes the mean over the drawn seeds of mIoU(method) - mIoU(baseline).
The spread of that difference over the rounds gives a 95% interval and a two-sided p-value.
"""

from __future__ import annotations

import numpy as np


def miou_of(matrices: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
    """mIoU of summed confusion matrices (..., C, C) over `classes` (all by default), ignoring
    classes absent from both truth and prediction (as ConfusionMatrix.miou does)."""
    diagonal = np.diagonal(matrices, axis1=-2, axis2=-1).astype(np.float64)
    union = matrices.sum(-1) + matrices.sum(-2) - diagonal
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, diagonal / union, np.nan)
    if classes is not None:
        iou = iou[..., classes]
    with np.errstate(invalid="ignore"):
        return np.nanmean(iou, axis=-1)


def paired_bootstrap(method: np.ndarray, baseline: np.ndarray, rounds: int = 2000, seed: int = 0,
                     classes: list[int] | None = None) -> dict:
    """`method` and `baseline`: per-image confusion matrices, (seeds, images, C, C), seeds paired.
    `classes` restricts the mIoU to those classes (e.g. the thin group). Returns the observed mean
    difference, its 95% bootstrap interval and the two-sided p-value of 'no difference'."""
    if method.shape[:2] != baseline.shape[:2]:
        raise ValueError(f"paired results need the same seeds and images, got {method.shape[:2]} and "
                         f"{baseline.shape[:2]}")
    seeds, images = method.shape[:2]
    observed = float(np.mean(miou_of(method.sum(1), classes) - miou_of(baseline.sum(1), classes)))
    rng = np.random.default_rng(seed)
    differences = np.empty(rounds)
    for r in range(rounds):
        drawn_seeds = rng.integers(0, seeds, seeds)
        drawn_images = rng.integers(0, images, images)
        a = method[drawn_seeds][:, drawn_images].sum(1)
        b = baseline[drawn_seeds][:, drawn_images].sum(1)
        differences[r] = np.nanmean(miou_of(a, classes) - miou_of(b, classes))
    low, high = (float(q) for q in np.nanquantile(differences, [0.025, 0.975]))
    below, above = float(np.mean(differences <= 0)), float(np.mean(differences >= 0))
    return {"difference": observed, "ci95": [float(low), float(high)],
            "p_value": float(min(1.0, 2 * min(below, above))), "rounds": rounds}
