"""Learned aggregation of test-time views: weights over the candidates' logits (no trunk).

Shanmugam, Blalock, Balakrishnan, Guttag, *Better Aggregation in Test-Time Augmentation* (ICCV
2021); public code divyashan/test-time-augmentation, ``tta_agg_models.py``. Two aggregators of the
target's logits under A views, ``z`` [N, A, K], each divided by a temperature T first:

- ``agg_aug`` (the paper's AugTTA; ``TTAPartialRegression`` there): one weight per view, w >= 0,
  used normalised to sum to 1: ``sum_a (w_a / sum_b w_b) z_a / T``.
- ``agg_class`` (ClassTTA; ``TTARegression``): one weight per view and class, w >= 0, unnormalised:
  ``sum_a w_{a,k} z_{a,k} / T``.

Both start from the plain mean (every weight 1/A). Non-negativity is kept by the trainer, which
clamps after each step as the reference does (:func:`ltta.tta.aggregation.fit_aggregator`).
Inputs are ``[N, A, K]`` logits; outputs are aggregated logits [N, K].
"""

from __future__ import annotations

import torch
from torch import nn

from ltta.models.registry import MODELS


class _ViewWeights(nn.Module):
    """Shared checks and the temperature buffer; subclasses say how weights combine the views."""

    def __init__(self, views: int, classes: int, temperature: float, shape: tuple[int, ...]) -> None:
        super().__init__()
        if views < 1 or classes < 2:
            raise ValueError(f"an aggregator needs views >= 1 and classes >= 2, got {views} and {classes}")
        if not temperature > 0:
            raise ValueError(f"the aggregator's temperature must be > 0, got {temperature}")
        self.views, self.classes = views, classes
        self.weight = nn.Parameter(torch.full(shape, 1.0 / views))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def _check(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 or z.shape[1:] != (self.views, self.classes):
            raise ValueError(f"the aggregator takes logits [N, {self.views} views, {self.classes} classes], "
                             f"got {tuple(z.shape)}")
        return z.float() / self.temperature


@MODELS.register("agg_aug")
class AugmentationWeights(_ViewWeights):
    """AugTTA: one non-negative weight per view, normalised to sum to 1."""

    def __init__(self, views: int, classes: int, temperature: float = 1.0) -> None:
        super().__init__(views, classes, temperature, (views,))

    def weights(self) -> torch.Tensor:
        """The normalised weights [A] (sum 1) the aggregation uses."""
        w = self.weight.clamp_min(0)
        return w / w.sum().clamp_min(torch.finfo(w.dtype).tiny)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nak,a->nk", self._check(z), self.weights())


@MODELS.register("agg_class")
class ClassWeights(_ViewWeights):
    """ClassTTA: one non-negative weight per view and class, not normalised (as the reference)."""

    def __init__(self, views: int, classes: int, temperature: float = 1.0) -> None:
        super().__init__(views, classes, temperature, (views, classes))

    def weights(self) -> torch.Tensor:
        """The weights [A, K] the aggregation uses."""
        return self.weight.clamp_min(0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self._check(z) * self.weights()).sum(1)
