"""The corruption registry: name (the official CIFAR-10-C file stem) -> batched float function.

Every registered function has the signature
``fn(x: Tensor [N,3,H,W] float in [0,1], severity: int, generator: torch.Generator) -> Tensor``
and returns float images in [0,1] of the same shape on ``x``'s device. All randomness comes from
``generator`` (which must live on ``x``'s device), drawn as tensors for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ltta.registry import Registry

CorruptionFn = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]

CORRUPTIONS: Registry[CorruptionFn] = Registry("corruption")


def check_images(x: torch.Tensor) -> None:
    """Raise if ``x`` is not a float image batch [N,3,H,W]."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"corruptions expect RGB images [N,3,H,W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"corruptions expect float images in [0,1], got dtype {x.dtype}; divide uint8 by 255 first")
