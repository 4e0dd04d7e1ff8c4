"""What a training mode is (:class:`TrainMode`), the network call it gets (:class:`Forward`), and
the registry the trainer looks modes up in (:data:`TRAIN_MODES`).

The trainer (:func:`ltta.training.target.train_classifier`) knows no mode by name: it prepares each
chunk of images, asks the mode for its extra views, and hands each batch to the mode's loss. The
modes themselves live in :mod:`ltta.training.modes`, one module each, registered there; importing
:mod:`ltta.training` registers them.

The config a mode reads is a :class:`~ltta.training.config.TrainConfig`. It is typed ``Any`` here
because TrainConfig checks its ``mode`` against this registry: naming it here would make the two
modules import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ltta.models.inference import autocast
from ltta.registry import Registry


class Forward:
    """``forward(images) -> float32 logits``: the network under autocast, in the training memory format.

    A mode that needs more than logits reads ``model`` (the module being trained, not its
    ``torch.compile`` wrapper: e.g. its auxiliary heads) and ``epoch`` (1-based, for schedules).
    """

    def __init__(self, net: nn.Module, epoch: int, amp: bool, memory_format: torch.memory_format) -> None:
        self.net = net
        inner = getattr(net, "_orig_mod", net)  # under torch.compile
        self.model: nn.Module = inner.module if isinstance(inner, DistributedDataParallel) else inner
        self.epoch = epoch
        self.amp = amp
        self.memory_format = memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(images.device, self.amp):
            return self.net(images.contiguous(memory_format=self.memory_format)).float()


#: ``(forward, prepared images, labels, cfg, generator) -> (loss, logits of the clean images)``.
ModeLoss = Callable[[Forward, torch.Tensor, torch.Tensor, Any, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _no_keys(cfg: Any) -> None:
    """A mode without keys of its own has nothing to check."""


@dataclass(frozen=True)
class TrainMode:
    """How one prepared batch (after extra_augment -> crop/flip -> cutout) becomes the SGD loss.

    ``loss(forward, xb, yb, cfg, generator)`` returns ``(loss, logits of the clean batch)``; the
    clean logits give the training error. A mode with ``views`` trains on several views of each
    image: ``views(x, cfg, generator)`` makes them for a whole chunk of prepared images at once
    ([N,V,C,H,W]), and the loss then gets ``xb`` as [B,1+V,C,H,W] (the clean image first).
    ``check(cfg)`` validates the mode's own config keys (raising through
    :func:`ltta.training.config.require`); every registered mode's check runs on every config.
    """

    loss: ModeLoss
    needs_extra_augment: bool = False  # the mode is defined by the caller's extra augmentation
    allows_cutout: bool = True
    # Training-only modules around the classifier (Auxiliary Training's heads): ``attach(model, cfg)``
    # returns the module to train, whose plain forward is the classifier's; ``detach(trainee)`` drops
    # them once training ends, leaving the caller's model trained in place. None: train it as it is.
    attach: Callable[[nn.Module, Any], nn.Module] | None = None
    detach: Callable[[nn.Module], None] | None = None
    views: Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor] | None = None
    check: Callable[[Any], None] = _no_keys


#: Training modes by name (TrainConfig.mode), filled by :mod:`ltta.training.modes`.
TRAIN_MODES: Registry[TrainMode] = Registry("training mode")
