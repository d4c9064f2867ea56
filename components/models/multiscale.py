"""One wrapper that runs a Segmenter at several scales and fuses, for all five methods.

- single: p_1.0 only.
- avgpool / maxpool: trained at 1.0; at inference any set containing 1.0, fused by mean / max.
- explicit (Chen et al. 2016): a fixed scale set at train and eval; an attention module reads the
  per-scale decoder features (resized to the 1.0 grid) and outputs one score map per scale.
- hierarchical (Tao et al. 2020): attention between adjacent scales, so any set containing 1.0
  works at inference, including sets never seen in training.

The output type is the same in training and inference; losses live outside (components.losses).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from components.methods import eval_scales_problem
from components.models import fusion
from components.models.segmenter import Segmenter, SegmenterOutput
from components.scales import scaled_size


@dataclass
class MultiScaleOutput:
    fused: torch.Tensor  # (N, C, H1, W1) logits at the 1.0 resolution
    logits: dict[float, torch.Tensor] = field(default_factory=dict)  # per-scale logits
    # Per-scale attention: sigmoid maps (hierarchical) or softmax weights on the 1.0 grid (explicit).
    attention: dict[float, torch.Tensor] = field(default_factory=dict)

    def scale_weights(self) -> dict[float, torch.Tensor]:
        """Each scale's share of the fused prediction at each pixel, (N, 1, H1, W1) on the 1.0 grid and
        summing to 1 over the scales: what attention reports and pictures show. Explicit attention
        gives these weights directly; hierarchical maps are relative to the scales above and are
        unrolled (fusion.hierarchical_weights). Empty for methods without attention."""
        if not self.attention:
            return {}
        if set(self.attention) == set(self.logits):  # explicit: softmax over the scales already
            return dict(self.attention)
        return fusion.hierarchical_weights(self.attention, sorted(self.logits), self.fused.shape[-2:])


class ExplicitScaleAttention(nn.Module):
    """Reads concatenated per-scale features and scores each scale at each pixel (Chen et al. 2016)."""

    def __init__(self, feature_channels: int, num_scales: int, channels: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(feature_channels * num_scales, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_scales, 1),
        )

    def forward(self, stacked_features: torch.Tensor) -> torch.Tensor:
        return self.net(stacked_features)


class MultiScaleSegmenter(nn.Module):
    def __init__(self, segmenter: Segmenter, method: str, train_scales: list[float], attention_channels: int = 256):
        super().__init__()
        self.segmenter = segmenter
        self.method = method
        self.train_scales = sorted(train_scales)
        self.explicit_attention: ExplicitScaleAttention | None = None
        if method == "explicit":
            self.explicit_attention = ExplicitScaleAttention(
                segmenter.decoder.out_channels, len(self.train_scales), attention_channels
            )

    def check_scales(self, scales: list[float]) -> list[float]:
        scales = sorted(float(s) for s in scales)
        if len(set(scales)) != len(scales) or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"scale set {scales}: scales must be positive, finite and distinct")
        why = eval_scales_problem(self.method, self.train_scales, scales)
        if why:
            raise ValueError(f"scale set {scales}: {why}")
        return scales

    def images_at(self, images: torch.Tensor | dict[float, torch.Tensor], scales: list[float]):
        """The image at each scale: taken from a given pyramid when present, else resized from 1.0."""
        if isinstance(images, dict):
            if 1.0 not in images:
                raise ValueError(f"an image pyramid needs its 1.0 level, got {sorted(images)}")
            base = images[1.0]
        else:
            base, images = images, {}
        size = (base.shape[-2], base.shape[-1])
        return {s: images[s] if s in images else fusion.resize(base, scaled_size(size, s)) for s in scales}

    def attention_needed(self, scale: float, scale_sets: list[list[float]]) -> bool:
        """Hierarchical fusion never reads the attention of a set's top scale: the head runs at a
        scale only where some set (sorted, as check_scales gives them) holds a scale above it."""
        if self.method != "hierarchical":
            return True
        return any(scale in scales and scale != scales[-1] for scales in scale_sets)

    def forward(
        self, images: torch.Tensor | dict[float, torch.Tensor], scales: list[float] | None = None
    ) -> MultiScaleOutput:
        (output,) = self.forward_sets(images, [self.train_scales if scales is None else scales])
        return output

    def forward_sets(
        self, images: torch.Tensor | dict[float, torch.Tensor], scale_sets: list[list[float]]
    ) -> list[MultiScaleOutput]:
        """The output at each of `scale_sets`, running the segmenter once per distinct scale: a
        scale's logits, attention and features are the same in every set that holds it; only the
        fusion differs. (Evaluating [1.0], [0.5, 1.0] and [0.5, 1.0, 2.0] costs one pass at each of
        0.5, 1.0 and 2.0, not six passes.)"""
        sets = [self.check_scales(scales) for scales in scale_sets]
        per_scale = dict(self.scale_passes(images, sets))
        return [self.fuse(per_scale, scales) for scales in sets]

    def scale_passes(self, images: torch.Tensor | dict[float, torch.Tensor],
                     sets: list[list[float]]) -> Iterator[tuple[float, SegmenterOutput]]:
        """The segmenter's pass at each distinct scale of `sets` (checked, sorted), one at a time
        (evaluation times each)."""
        distinct = sorted({s for scales in sets for s in scales})
        for scale, image in self.images_at(images, distinct).items():
            yield scale, self.segmenter(image, with_attention=self.attention_needed(scale, sets))

    def fuse(self, per_scale: dict[float, SegmenterOutput], scales: list[float]) -> MultiScaleOutput:
        """The method's fusion of the segmenter's outputs at `scales` (a set check_scales accepted;
        `per_scale` may hold more scales than the set)."""
        logits = {s: per_scale[s].logits for s in scales}
        if self.method == "single":
            return MultiScaleOutput(fused=logits[1.0], logits=logits)
        if self.method == "avgpool":
            return MultiScaleOutput(fused=fusion.avg_fuse(logits), logits=logits)
        if self.method == "maxpool":
            return MultiScaleOutput(fused=fusion.max_fuse(logits), logits=logits)
        if self.method == "hierarchical":
            maps: dict[float, torch.Tensor] = {}
            for s in scales[:-1]:  # the top scale's map is never read
                scale_map = per_scale[s].attention
                if scale_map is not None:  # (a missing one: hierarchical_fuse names it)
                    maps[s] = scale_map
            return MultiScaleOutput(fused=fusion.hierarchical_fuse(logits, maps), logits=logits, attention=maps)
        # explicit: features of every scale on the 1.0 feature grid, concatenated in ascending order.
        grid = per_scale[1.0].features.shape[-2:]
        stacked = torch.cat([fusion.resize(per_scale[s].features, grid) for s in scales], dim=1)
        assert self.explicit_attention is not None  # built in __init__ for the explicit method
        scores = self.explicit_attention(stacked)
        weights = fusion.explicit_weights(fusion.resize(scores, logits[1.0].shape[-2:]))
        attention = {s: weights[:, i : i + 1] for i, s in enumerate(scales)}
        return MultiScaleOutput(fused=fusion.explicit_fuse(logits, scores), logits=logits, attention=attention)
