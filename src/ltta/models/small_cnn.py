"""A small, fast convolutional classifier: the offline default's target (digits at 32x32, on CPU)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ltta.models.layers import CIFAR_MEAN, CIFAR_STD, Normalize, init_kaiming
from ltta.models.registry import MODELS


def _conv_bn_relu_pool(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks (width, 2x, 4x channels), global average pool, linear.

    Sized so that a few epochs over ~1,400 32x32 images take seconds on two CPU cores, yet deep
    enough (three poolings) that crops, flips and corruptions change its predictions the way they
    change a real CIFAR network's.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"small_cnn width must be >= 1, got {width}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            _conv_bn_relu_pool(3, width),
            _conv_bn_relu_pool(width, 2 * width),
            _conv_bn_relu_pool(2 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        init_kaiming(self)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map the classifier pools [N,4*width,h,w]: the trunk that training-only heads
        (Auxiliary Training, :mod:`ltta.models.auxiliary`) share."""
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.feature_map(x)).flatten(1))


@MODELS.register("small_cnn")
def small_cnn(
    num_classes: int = 10,
    width: int = 16,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, width=width, mean=mean, std=std)
