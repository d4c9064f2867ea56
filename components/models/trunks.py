"""Feature trunks. Each returns a list of feature maps and reports their channels and strides.

The ResNets use torchvision's module names (conv1, bn1, layer1..layer4, downsample.0/1), so an
ImageNet state_dict saved from torchvision loads into them from a local file (no hub download).
Dilation replaces the last strides to reach output stride 8 or 16, as in DeepLab.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # Stride on the 3x3 conv (ResNet v1.5), as torchvision does.
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk returning the outputs of layer1..layer4 (strides 4, 8, then 16/32 or dilated)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], output_stride: int):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        # Which of layer3/layer4 trade their stride for dilation.
        dilate = {8: (True, True), 16: (False, True), 32: (False, False)}[output_stride]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._in_ch, self._dilation, stride = 64, 1, 4
        self.layer1 = self._make_layer(block, 64, layers[0], 1, False)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, False)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate[0])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate[1])
        strides = [stride, stride * 2, stride * 4, stride * 8]
        self.channels = [64 * block.expansion, 128 * block.expansion, 256 * block.expansion, 512 * block.expansion]
        self.strides = [min(s, output_stride) for s in strides]

    def _make_layer(self, block, width: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._in_ch != width * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_ch, width * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(width * block.expansion),
            )
        modules = [block(self._in_ch, width, stride, previous_dilation, downsample)]
        self._in_ch = width * block.expansion
        modules += [block(self._in_ch, width, 1, self._dilation, None) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


class TinyTrunk(nn.Module):
    """A few strided convs: the same interface as ResNet at a fraction of the cost (tests, demos)."""

    def __init__(self, output_stride: int, width: int = 16):
        super().__init__()
        chans = [width, width * 2, width * 4, width * 4]
        strides = [4, 8, 16, 32]
        layers, in_ch = [], 3
        for i, (ch, s) in enumerate(zip(chans, strides, strict=True)):
            step = 4 if i == 0 else (2 if s <= output_stride else 1)
            dil = 1 if s <= output_stride else s // output_stride
            layers.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, ch, 3, step, padding=dil, dilation=dil, bias=False),
                    nn.BatchNorm2d(ch),
                    nn.ReLU(inplace=True),
                )
            )
            in_ch = ch
        self.stages = nn.ModuleList(layers)
        self.channels = chans
        self.strides = [min(s, output_stride) for s in strides]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


TRUNKS = {
    "resnet18": lambda output_stride: ResNet(BasicBlock, [2, 2, 2, 2], output_stride),
    "resnet50": lambda output_stride: ResNet(Bottleneck, [3, 4, 6, 3], output_stride),
    "tiny": lambda output_stride: TinyTrunk(output_stride),
}


def load_pretrained_trunk(trunk: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights saved as a torchvision-style state_dict; the classifier (fc.*) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: no such file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"model.pretrained: {path} does not match the trunk: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {sorted(wrong_shape)[:5]}"
        )
    trunk.load_state_dict(state, strict=True)
