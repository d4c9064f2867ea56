"""Pure functions that fuse per-scale predictions. No parameters; everything is combined as logits.

Inputs are dicts from scale (float) to tensors at that scale's resolution: logits (N, C, Hs, Ws)
and, for hierarchical, attention (N, 1, Hs, Ws) in [0, 1]. Every result is at the resolution of the
1.0 entry. Resizing is bilinear with align_corners=False.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _base_size(logits: dict[float, Tensor]) -> torch.Size:
    if 1.0 not in logits:
        raise ValueError(f"scale 1.0 is required (the output is at its resolution), got scales {sorted(logits)}")
    return logits[1.0].shape[-2:]


def hierarchical_fuse(logits: dict[float, Tensor], attn: dict[float, Tensor]) -> Tensor:
    """Hierarchical multi-scale attention (Tao, Sapra, Catanzaro 2020).

    Scales are visited from the highest down; the top scale's attention is unused::

        pred = p_top
        for s in the remaining scales, descending:
            if s >= 1.0: pred = a_s * p_s + (1 - a_s) * resize(pred, size of p_s)
            else:        pred = resize(a_s * p_s, size of pred) + (1 - resize(a_s, size of pred)) * pred

    With two scales (0.5, 1.0) this is the training rule
    ``out = up(a_0.5 * p_0.5) + (1 - up(a_0.5)) * p_1.0``. Returns (N, C, H1, W1).
    Raises ValueError when 1.0 is missing or the attention does not cover the same scales (the top
    scale's may be left out: it is never read).
    """
    scales = sorted(logits, reverse=True)
    if not set(scales[1:]) <= set(attn) <= set(scales):
        raise ValueError(f"logits and attention must have the same scales (the top one's attention may be "
                         f"left out), got {sorted(logits)} and {sorted(attn)}")
    _base_size(logits)
    pred = logits[scales[0]]
    for s in scales[1:]:
        p, a = logits[s], attn[s]
        if s >= 1.0:
            pred = a * p + (1 - a) * resize(pred, p.shape[-2:])
        else:
            size = pred.shape[-2:]
            pred = resize(a * p, size) + (1 - resize(a, size)) * pred
    return pred


def hierarchical_weights(attn: dict[float, Tensor], scales: list[float], size: tuple[int, int] | torch.Size
                         ) -> dict[float, Tensor]:
    """The effective weight of every scale at each pixel of hierarchical fusion, on the grid `size`
    (the fused output's): unrolling the recursion of hierarchical_fuse gives

        fused = sum over s of w_s * p_s,   w_s = a_s * prod over s' < s of (1 - a_s'),   a_top = 1

    so the weights sum to 1 at every pixel (exactly, for any maps). A raw map a_s says how much scale
    s is trusted *relative to the scales above it*; w_s is its share of the final prediction. The
    top scale has no map of its own: its share is what every lower scale left to it.
    """
    ordered = sorted(scales)  # ascending: each scale's weight carries the (1 - a) of those below it
    weights, remaining = {}, None  # remaining: prod of (1 - a_s') over the scales handled so far
    for s in ordered[:-1]:
        a = resize(attn[s].float(), size)
        weights[s] = a if remaining is None else a * remaining
        remaining = (1 - a) if remaining is None else remaining * (1 - a)
    if remaining is not None:  # the top scale: what every lower scale left to it
        weights[ordered[-1]] = remaining
    return weights


def avg_fuse(logits: dict[float, Tensor]) -> Tensor:
    """Mean over scales of every p_s resized to the 1.0 resolution."""
    size = _base_size(logits)
    if len(logits) == 1:  # trained at 1.0 alone: nothing to pool
        return logits[1.0]
    return torch.stack([resize(p, size) for p in logits.values()]).mean(dim=0)


def max_fuse(logits: dict[float, Tensor]) -> Tensor:
    """Elementwise maximum over scales of every p_s resized to the 1.0 resolution."""
    size = _base_size(logits)
    if len(logits) == 1:
        return logits[1.0]
    return torch.stack([resize(p, size) for p in logits.values()]).amax(dim=0)


def explicit_weights(scores: Tensor) -> Tensor:
    """Softmax over the scale axis (dim 1) of the (N, S, H, W) attention scores: weights w_s."""
    return torch.softmax(scores, dim=1)


def explicit_fuse(logits: dict[float, Tensor], scores: Tensor) -> Tensor:
    """Attention to scale (Chen et al. 2016): ``sum_s w_s * up(p_s)`` with ``w = softmax_s(scores)``.

    `scores` is (N, S, H, W); channel i belongs to the i-th scale in ascending order, and it is
    resized to the 1.0 resolution before the softmax.
    """
    size = _base_size(logits)
    scales = sorted(logits)
    if scores.shape[1] != len(scales):
        raise ValueError(f"scores have {scores.shape[1]} channels for {len(scales)} scales {scales}")
    weights = explicit_weights(resize(scores, size))
    fused = weights[:, :1] * resize(logits[scales[0]], size)
    for i, s in enumerate(scales[1:], start=1):
        fused = fused + weights[:, i : i + 1] * resize(logits[s], size)
    return fused
