"""How the trainer turns a chunk of training images into the batch a mode sees, batched on the device.

FAA's order (kakaobrain/fast-autoaugment FastAutoAugment/data.py): the benchmark corruptions of
the corruption-mixing studies (:mod:`ltta.training.corruption_mixing`, on the whole 32x32 image, as
the loss predictor's inputs are corrupted before any deformation) -> the caller's extra
augmentation (a searched policy) -> ``TrainConfig.augment`` (pad-4 crop + flip) -> FAA's cutout.
Every step draws per image from the trainer's generator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ltta.models.layers import Normalize
from ltta.registry import Registry
from ltta.transforms.functional import random_crop_flip

#: ``fn(x [B,3,H,W] in [0,1], generator) -> x``: one batched augmentation step.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _no_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


#: Batched training augmentations by name: ``fn(x [B,3,H,W] in [0,1], generator) -> x``.
TRAIN_AUGMENTATIONS: Registry[Augment] = Registry("training augmentation")
TRAIN_AUGMENTATIONS.add("none", _no_augment)
# Pad-4 random crop then random flip: the standard CIFAR augmentation of AugMix and FAA.
TRAIN_AUGMENTATIONS.add("standard", random_crop_flip)


def cutout_default(
    x: torch.Tensor, generator: torch.Generator, length: int, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """FAA's training cutout (``CutoutDefault`` in kakaobrain/fast-autoaugment FastAutoAugment/data.py,
    itself DARTS' ``Cutout``): per image an integer centre (row, then column) uniform over the
    image, and the rows/columns ``[centre - length//2, centre + length//2)`` clipped to the
    image set to ``fill`` (a scalar or [1,C,1,1]).

    The reference multiplies the *normalised* image by the mask, i.e. paints 0 after
    normalisation: the normalisation mean in [0,1] units, which is what the trainer passes as
    ``fill`` (the model's :class:`~ltta.models.layers.Normalize` mean). This is not FAA's
    ``CutoutAbs`` op (:func:`ltta.transforms.functional.cutout`: grey fill, inclusive corners).
    """
    if length <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n,), device=x.device, generator=generator)
    half = length // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_y = (rows[None, :] >= (cy - half).clamp(0, h)[:, None]) & (rows[None, :] < (cy + half).clamp(0, h)[:, None])
    in_x = (cols[None, :] >= (cx - half).clamp(0, w)[:, None]) & (cols[None, :] < (cx + half).clamp(0, w)[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # [N,1,H,W]
    fill_t = fill.to(device=x.device, dtype=x.dtype) if isinstance(fill, torch.Tensor) else fill
    return torch.where(mask, fill_t, x)


def cutout_fill(model: nn.Module) -> torch.Tensor | float:
    """Zero after the model's input normalisation, in [0,1] units: its Normalize mean ([1,C,1,1]),
    or 0 for a model that normalises nothing (FAA's CutoutDefault masks the normalised image)."""
    for module in model.modules():
        if isinstance(module, Normalize):
            return module.mean.detach().clone()
    return 0.0


def batch_preparation(
    extra_augment: Augment | None,
    augment: Augment,
    cutout: int,
    fill: torch.Tensor | float,
    corrupt: Augment | None = None,
) -> Augment:
    """The steps of the module docstring as one batched augmentation (None and 0 skip a step)."""

    def prepare(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if corrupt is not None:
            xb = corrupt(xb, generator)
        if extra_augment is not None:
            xb = extra_augment(xb, generator)
        xb = augment(xb, generator)
        if cutout > 0:
            xb = cutout_default(xb, generator, cutout, fill)
        return xb

    return prepare
