"""ResNet-18 and pre-activation ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool).

Layout of the widely used CIFAR ResNets (kuangliu/pytorch-cifar: models/resnet.py,
models/preact_resnet.py): four stages of two basic blocks, widths 64-128-256-512, strides
1-2-2-2, 1x1-conv projection shortcuts where shape changes, global average pool, linear.
- ``resnet18``: post-activation blocks (He et al., CVPR 2016), projection = conv1x1 + BN.
- ``preact_resnet18``: pre-activation blocks (He et al., "Identity Mappings", ECCV 2016), the
  projection applied to the pre-activated input, plus the paper's final BN-ReLU before pooling
  (kuangliu's version omits it; the paper and fb.resnet.torch's preresnet have it).
Init as torchvision's ResNet (torchvision/models/resnet.py): He-normal fan_out, BN (1, 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltta.models.layers import CIFAR_MEAN, CIFAR_STD, Normalize, init_kaiming
from ltta.models.registry import MODELS

_WIDTHS = (64, 128, 256, 512)
_STRIDES = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus the shortcut (a 1x1 conv of the pre-activation if needed)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class CifarResNet(nn.Module):
    """ResNet with the CIFAR stem; ``preact`` selects the block family and the stem/head it needs."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        preact: bool = False,
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
    ) -> None:
        super().__init__()
        block = PreActBlock if preact else BasicBlock
        self.preact = preact
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        # Post-activation nets normalise the stem output; pre-activation nets do it in the first block.
        self.bn1: nn.Module = nn.Identity() if preact else nn.BatchNorm2d(64)
        stages = []
        c_in = 64
        for n, width, stride in zip(blocks_per_stage, _WIDTHS, _STRIDES, strict=True):
            stages.append(nn.Sequential(*[block(c_in if i == 0 else width, width, stride if i == 0 else 1) for i in range(n)]))
            c_in = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn_final: nn.Module = nn.BatchNorm2d(c_in) if preact else nn.Identity()
        self.fc = nn.Linear(c_in, num_classes)
        init_kaiming(self)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map the classifier pools [N,512,h,w]: the trunk that training-only heads
        (Auxiliary Training, :mod:`ltta.models.auxiliary`) share."""
        out = self.conv1(self.normalize(x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn_final(out))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1))


@MODELS.register("resnet18")
def resnet18(
    num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD
) -> CifarResNet:
    """ResNet-18, CIFAR stem (11.2M parameters for 10 classes)."""
    return CifarResNet((2, 2, 2, 2), preact=False, num_classes=num_classes, mean=mean, std=std)


@MODELS.register("preact_resnet18")
def preact_resnet18(
    num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD
) -> CifarResNet:
    """Pre-activation ResNet-18, CIFAR stem."""
    return CifarResNet((2, 2, 2, 2), preact=True, num_classes=num_classes, mean=mean, std=std)
