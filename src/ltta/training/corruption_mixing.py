"""The corruption-mixing studies: benchmark corruptions mixed into the training images.

The studies ``augmix_plus`` ("AugMix+": AugMix with the benchmark's corruptions in training) and
``blur_train`` (the blurs in training; conf/study/) set ``TrainConfig.corruptions`` and
``corruption_p``: per image, with probability ``corruption_p``, one of the named corruptions at a
severity uniform in 1..5, drawn as the loss predictor's inputs are
(:func:`ltta.corruptions.random_corruptions`). This is a preparation step, not a training mode: it
composes with every mode (AugMix+ is mode ``augmix`` with it), so it runs first in the trainer's
batch preparation (:mod:`ltta.training.preparation`) whatever the mode.
"""

from __future__ import annotations

import torch

from ltta.corruptions import random_corruptions
from ltta.training.preparation import Augment


def corruption_augment(names: tuple[str, ...], p: float) -> Augment | None:
    """The benchmark corruptions as a batched training augmentation (None when off)."""
    if not names or p <= 0:
        return None

    def corrupt(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_corruptions(xb, generator, p, names)

    return corrupt
