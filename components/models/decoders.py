"""Decoders, one per family: DeepLabV3+ (ASPP + skip), PSPNet (pyramid pooling), FCN, U-Net.

Each takes the trunk's reported channels and strides, returns one feature map, and reports its
`out_channels` and `stride`, so the heads are wired by numbers the parts announce.
Pooled branches (1x1 spatial) carry no BatchNorm: with one image per worker it would be undefined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1, norm: bool = True) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class Decoder(nn.Module):
    """What every decoder announces: the channels of the feature map it returns and its stride."""

    out_channels: int
    stride: int


class ASPP(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_ch, out_ch, 1)])
        self.branches.extend(conv_bn_relu(in_ch, out_ch, 3, dilation=r) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_ch, out_ch, 1, norm=False))
        self.project = conv_bn_relu(out_ch * (len(rates) + 2), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Plus(Decoder):
    """ASPP on the deepest features, fused with the stride-4 features (Chen et al. 2018)."""

    def __init__(self, channels: list[int], strides: list[int], out_channels: int):
        super().__init__()
        # Atrous rates scale with the resolution of the deepest features.
        rates = (12, 24, 36) if strides[-1] <= 8 else (6, 12, 18)
        self.aspp = ASPP(channels[-1], out_channels, rates)
        self.low_level = conv_bn_relu(channels[0], 48, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(out_channels + 48, out_channels), conv_bn_relu(out_channels, out_channels)
        )
        self.out_channels, self.stride = out_channels, strides[0]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        low = self.low_level(feats[0])
        high = resize_to(self.aspp(feats[-1]), low)
        return self.fuse(torch.cat([high, low], dim=1))


class PSPNet(Decoder):
    """Pyramid pooling over bins 1, 2, 3, 6 of the deepest features (Zhao et al. 2017)."""

    def __init__(self, channels: list[int], strides: list[int], out_channels: int, bins=(1, 2, 3, 6)):
        super().__init__()
        in_ch = channels[-1]
        branch_ch = max(in_ch // len(bins), 8)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_ch, branch_ch, 1, norm=False)) for b in bins
        )
        self.bottleneck = conv_bn_relu(in_ch + branch_ch * len(bins), out_channels)
        self.out_channels, self.stride = out_channels, strides[-1]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        pooled = [resize_to(stage(x), x) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class FCN(Decoder):
    """A plain convolutional head on the deepest features (Long et al. 2015, dilated trunk)."""

    def __init__(self, channels: list[int], strides: list[int], out_channels: int):
        super().__init__()
        self.head = nn.Sequential(conv_bn_relu(channels[-1], out_channels), conv_bn_relu(out_channels, out_channels))
        self.out_channels, self.stride = out_channels, strides[-1]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.head(feats[-1])


class UNet(Decoder):
    """Encoder-decoder: upsample step by step, concatenating each shallower trunk stage (Ronneberger 2015)."""

    def __init__(self, channels: list[int], strides: list[int], out_channels: int):
        super().__init__()
        self.center = conv_bn_relu(channels[-1], out_channels)
        self.up_blocks = nn.ModuleList(
            nn.Sequential(conv_bn_relu(out_channels + skip_ch, out_channels), conv_bn_relu(out_channels, out_channels))
            for skip_ch in reversed(channels[:-1])
        )
        self.out_channels, self.stride = out_channels, strides[0]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.center(feats[-1])
        for block, skip in zip(self.up_blocks, reversed(feats[:-1]), strict=True):
            x = block(torch.cat([resize_to(x, skip), skip], dim=1))
        return x


DECODERS = {"deeplabv3plus": DeepLabV3Plus, "pspnet": PSPNet, "fcn": FCN, "unet": UNet}
