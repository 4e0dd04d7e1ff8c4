"""A loss predictor that reads the frozen target's own features: a small MLP head, no trunk.

The paper's predictor (:mod:`ltta.models.loss_predictor`) is a separate network that sees only
pixels and must learn from them what the target already knows; on the CIFAR dev sample its
ranking is barely better than the input-independent prior. This head instead takes what one
target pass on the image yields (:mod:`ltta.tta.target_features`): the pooled penultimate
features (D) and the logits (K), the latter as log-probabilities (a softmax is invariant to a
shift of the logits, so the head should be too). The features encode the corruption (noise,
blur, contrast all move them), the log-probabilities the target's confidence.

Architecture: a batch norm without affine parameters on the D + K inputs (the features are
post-ReLU means, the log-probabilities are negative and wide: one scale for both), a hidden layer
with ReLU and dropout, a linear layer to one score per candidate. Its cost is a few kFLOPs, under
0.1% of even the small target's; the pass it reads is one the TTA method makes anyway (it yields
the identity view's prediction), so the head's choice is nearly free.

Inputs are ``[N, D + K]`` or ``[N, D + K, 1, 1]`` (the latter so that the one predictor trainer,
:func:`ltta.predictor.trainer.train_predictor`, which takes image-shaped tensors, trains this
head too, with cutout off). Outputs are scores, higher = lower predicted loss, as the trunk's.
Not in the paper: issue 22's first variant. Reading a frozen classifier's features to predict
something about its own errors is the idea of e.g. Jiang et al., *To Trust Or Not To Trust A
Classifier* (NeurIPS 2018) and Corbière et al., *ConfidNet* (NeurIPS 2019); here the target is
the candidates' loss ranking.
"""

from __future__ import annotations

import torch
from torch import nn

from ltta.models.layers import init_kaiming
from ltta.models.registry import MODELS


class FeatureLossHead(nn.Module):
    """MLP from (target features, target logits) to one score per candidate (see the module docstring)."""

    def __init__(self, features: int, classes: int, num_outputs: int, hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        if features < 1 or classes < 2:
            raise ValueError(f"feature_head needs features >= 1 and classes >= 2, got {features} and {classes}")
        if num_outputs < 2:
            raise ValueError(f"num_outputs must be >= 2 (one score per candidate), got {num_outputs}")
        if hidden < 1:
            raise ValueError(f"feature_head hidden must be >= 1, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.features, self.classes, self.num_outputs = features, classes, num_outputs
        self.norm = nn.BatchNorm1d(features + classes, affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(features + classes, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_outputs)
        )
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.features + self.classes:
            raise ValueError(
                f"feature_head expects {self.features} features + {self.classes} logits per row, got {x.shape[1]} "
                "(it reads the target it was trained on: pass that target's ltta.tta.target_features)"
            )
        feats, logits = x[:, : self.features], x[:, self.features :]
        return self.mlp(self.norm(torch.cat([feats, torch.log_softmax(logits, dim=1)], dim=1)))


@MODELS.register("feature_head")
def feature_head(features: int, classes: int, num_outputs: int = 24, hidden: int = 128, dropout: float = 0.3) -> FeatureLossHead:
    """The target-feature loss predictor (issue 22); ``features`` / ``classes`` from the target's ``fc``."""
    return FeatureLossHead(features, classes, num_outputs, hidden, dropout)
