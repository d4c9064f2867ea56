"""The shared single-scale network f: trunk -> decoder -> segmentation head and attention head.

It returns tensors only (never a loss): class logits p and a sigmoid attention map a, both at the
resolution of the image it was given, plus the decoder features (the explicit method's attention
module reads them). The same output type in training and inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from components.models.decoders import Decoder


class SegmentationHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))


class AttentionHead(nn.Module):
    """conv3x3(in->C)-BN-ReLU-conv3x3(C->C)-BN-ReLU-conv1x1(C->1)-sigmoid (Tao et al. 2020)."""

    def __init__(self, in_channels: int, channels: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


@dataclass
class SegmenterOutput:
    logits: torch.Tensor  # (N, C, H, W) at the input's resolution
    attention: torch.Tensor | None  # (N, 1, H, W) in [0, 1], or None without an attention head
    features: torch.Tensor  # (N, F, H/r, W/r) decoder features


class Segmenter(nn.Module):
    def __init__(self, trunk: nn.Module, decoder: Decoder, num_classes: int, attention_channels: int | None):
        super().__init__()
        self.trunk = trunk
        self.decoder = decoder
        self.seg_head = SegmentationHead(decoder.out_channels, num_classes)
        self.attn_head = AttentionHead(decoder.out_channels, attention_channels) if attention_channels else None

    def forward(self, image: torch.Tensor, with_attention: bool = True) -> SegmenterOutput:
        """`with_attention=False` skips the attention head (its map would be unused, e.g. at the
        top scale of hierarchical fusion)."""
        size = image.shape[-2:]
        features = self.decoder(self.trunk(image))
        logits = F.interpolate(self.seg_head(features), size=size, mode="bilinear", align_corners=False)
        attention = None
        if self.attn_head is not None and with_attention:
            attention = F.interpolate(self.attn_head(features), size=size, mode="bilinear", align_corners=False)
        return SegmenterOutput(logits=logits, attention=attention, features=features)
