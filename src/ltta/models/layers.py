"""Pieces shared by every architecture: input normalisation inside the model, and weight init.

Normalisation lives in the network (a buffer layer at its start) so that everything outside it
(training augmentation, corruptions, Fast AutoAugment ops, TTA views) works on images in [0,1],
and a saved model carries the statistics it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Per-channel CIFAR statistics as used by Fast AutoAugment (kakaobrain/fast-autoaugment:
# FastAutoAugment/data.py, ``_CIFAR_MEAN, _CIFAR_STD``); AugMix uses 0.5/0.5 instead
# (google-research/augmix: cifar.py), which a caller can pass as ``mean``/``std``.
CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics stored as (saved) buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape:
            raise ValueError(
                f"mean and std must be flat sequences of the same length (one value per channel); "
                f"got {len(mean_t)} and {len(std_t)} values"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive in every channel, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def init_kaiming(module: nn.Module) -> None:
    """He-normal (fan_out, ReLU) convolutions, BN at (1, 0), zero linear biases.

    The init of the WRN code AugMix ships (google-research/augmix:
    third_party/WideResNet_pytorch/wideresnet.py) and of torchvision's ResNets
    (torchvision/models/resnet.py); linear weights keep PyTorch's default.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
