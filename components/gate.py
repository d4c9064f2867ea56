"""The registry's promotion rule: a candidate becomes champion only within the GFLOPs budget and
beyond the noise of the val images (a paired bootstrap of the mIoU difference over the images, from
each model's per-image confusion matrices, components.significance). Pure functions: the register
stage fetches the models' numbers and applies what these decide.
"""

from __future__ import annotations

import numpy as np

from components.significance import paired_bootstrap


def decide(candidate: dict, champion: dict | None, min_delta: float, max_gflops: float | None,
           noise: dict | None = None) -> tuple[bool, str]:
    """(promote?, reason) for a candidate {version, miou, gflops} against the champion (or None).
    `noise` is the paired bootstrap of candidate minus champion over the val images (noise_bound);
    None only for a champion registered without its per-image matrices, and the reason says so."""
    if max_gflops is not None and candidate["gflops"] > max_gflops:
        return False, f"{candidate['gflops']:.2f} GFLOPs exceeds register.max_gflops = {max_gflops}"
    if champion is None:
        return True, "no champion yet"
    if champion["version"] == candidate["version"]:
        return False, "this version is already the champion"
    versus = f"mIoU {candidate['miou']:.4f} against champion v{champion['version']} ({champion['miou']:.4f})"
    if noise is None:
        unbounded = f"; v{champion['version']} has no per-image evaluation, so no noise bound: mean mIoU only"
        if candidate["miou"] > champion["miou"] + min_delta:
            return True, f"{versus}: better by more than {min_delta}{unbounded}"
        return False, f"{versus}: not better by more than {min_delta}{unbounded}"
    low, high = noise["ci95"]
    evidence = (f"{versus}: difference {noise['difference']:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}] "
                f"over {noise['images']} val images")
    if low > min_delta:
        return True, f"{evidence}, above min_delta = {min_delta}"
    noise_note = " (within the noise of the val images)" if low <= 0 < noise["difference"] else ""
    return False, f"{evidence}, not above min_delta = {min_delta}{noise_note}"


def noise_bound(candidate: np.ndarray, champion: np.ndarray, rounds: int) -> dict:
    """The paired bootstrap over val images of mIoU(candidate) - mIoU(champion), from each model's
    per-image confusion matrices (images, C, C) on the same images in the same order."""
    if candidate.shape != champion.shape:
        raise ValueError(f"the champion was evaluated on {champion.shape[0]} val images of {champion.shape[1]} "
                         f"classes, this candidate on {candidate.shape[0]} of {candidate.shape[1]}: not the same "
                         "val set, so their mIoU cannot be compared: register this model under another "
                         "register.model_name")
    result = paired_bootstrap(candidate[None], champion[None], rounds=rounds)
    return {**result, "images": int(candidate.shape[0])}
