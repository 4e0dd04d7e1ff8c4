"""Wide Residual Networks (Zagoruyko & Komodakis, BMVC 2016) for 32x32 inputs.

Follows the PyTorch WRN that AugMix trains (google-research/augmix:
third_party/WideResNet_pytorch/wideresnet.py, from xternalz/WideResNet-pytorch), which is the
paper's WRN-40-2 of the AugMix and Learning-Loss-for-TTA CIFAR tables:
- pre-activation basic blocks (BN-ReLU-conv3x3, BN-ReLU-[dropout]-conv3x3), depth = 6n + 4;
- stage widths 16, 16k, 32k, 64k; strides 1, 2, 2; bias-free convolutions;
- where a block changes width, the pre-activated input feeds both the residual branch and a 1x1
  projection shortcut; elsewhere the shortcut is the raw input (identity);
- final BN-ReLU, global average pool, linear; He-normal (fan_out) init.
Fast AutoAugment's own WRN (kakaobrain/fast-autoaugment: FastAutoAugment/networks/wideresnet.py)
differs in small ways (conv biases, stride on the second conv, default init); we follow AugMix's,
whose parameter count matches the paper's (WRN-40-2: 2.2M, WRN-28-10: 36.5M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltta.models.layers import CIFAR_MEAN, CIFAR_STD, Normalize, init_kaiming
from ltta.models.registry import MODELS


class WideBasicBlock(nn.Module):
    """Pre-activation block; ``projects`` when the width changes (then the shortcut is 1x1 conv)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.projects = c_in != c_out
        self.shortcut = (
            nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, padding=0, bias=False) if self.projects else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # As in the reference: the projection sees the pre-activated input, the identity the raw one.
        skip = self.shortcut(pre) if self.shortcut is not None else x
        return skip + out


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR-sized images; input float [N,3,H,W] in [0,1]."""

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 2,
        num_classes: int = 10,
        dropout: float = 0.0,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(n, widths[0], widths[1], 1, dropout)
        self.block2 = self._stage(n, widths[1], widths[2], 2, dropout)
        self.block3 = self._stage(n, widths[2], widths[3], 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_kaiming(self)

    @staticmethod
    def _stage(n: int, c_in: int, c_out: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            *[WideBasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout) for i in range(n)]
        )

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map the classifier pools [N,C,h,w] (after the final BN-ReLU): the trunk that
        training-only heads (Auxiliary Training, :mod:`ltta.models.auxiliary`) share."""
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        return F.relu(self.bn(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Global average pool (the reference's avg_pool2d(8) at 32x32), any input size.
        return self.fc(F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1))


@MODELS.register("wrn")
def wrn(
    depth: int = 40,
    widen_factor: int = 2,
    num_classes: int = 10,
    dropout: float = 0.0,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> WideResNet:
    """Any WRN-depth-widen_factor."""
    return WideResNet(depth, widen_factor, num_classes, dropout, mean, std)


@MODELS.register("wrn_40_2")
def wrn_40_2(
    num_classes: int = 10,
    dropout: float = 0.0,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> WideResNet:
    """WRN-40-2: the architecture of the paper's CIFAR tables (AugMix trains it with dropout 0)."""
    return WideResNet(40, 2, num_classes, dropout, mean, std)


@MODELS.register("wrn_28_10")
def wrn_28_10(
    num_classes: int = 10,
    dropout: float = 0.0,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> WideResNet:
    """WRN-28-10 (36.5M parameters)."""
    return WideResNet(28, 10, num_classes, dropout, mean, std)
