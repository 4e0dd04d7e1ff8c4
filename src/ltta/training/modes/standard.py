"""Mode ``standard``: cross-entropy on the prepared batch (the CIFAR recipe of AugMix's and FAA's code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltta.training.config import TrainConfig
from ltta.training.mode import Forward, TrainMode


def cross_entropy_loss(
    forward: Forward, xb: torch.Tensor, yb: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (with ``cfg.label_smoothing``) of the batch's logits; the logits are the clean ones."""
    logits = forward(xb)
    return F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing), logits


MODE = TrainMode(cross_entropy_loss)
