"""The frozen target's own view of an image: its pooled penultimate features and its logits, one pass.

A separate loss predictor (the paper's) must learn from scratch what the target already computes:
whether the image is noisy, blurred, dark, which classes it hesitates between. The classifiers here
all end in ``fc(avg_pool(feature_map(x)))`` (:mod:`ltta.models`), so one target pass yields both the
features a small head can rank the candidates from (:mod:`ltta.models.feature_head`) and the
identity view's prediction, which a TTA method then need not compute again. The outputs are
bitwise those of ``target(x)``: the same layers in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltta.models.inference import batched_logits, eval_mode


class PooledFeatures(nn.Module):
    """``x -> [N, D + K]``: the target's pooled feature map (D) and its logits (K), side by side."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        if not (callable(getattr(target, "feature_map", None)) and isinstance(getattr(target, "fc", None), nn.Linear)):
            raise ValueError(
                f"{type(target).__name__} has no feature_map() and fc: the feature-reading predictor needs a "
                "classifier that ends in fc(avg_pool(feature_map(x))) (every ltta.models classifier does)"
            )
        self.target = target

    @property
    def dims(self) -> tuple[int, int]:
        """(feature width D, classes K)."""
        fc: nn.Linear = self.target.fc  # type: ignore[assignment]
        return fc.in_features, fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = F.adaptive_avg_pool2d(self.target.feature_map(x), 1).flatten(1)
        return torch.cat([feats, self.target.fc(feats)], dim=1)


@torch.no_grad()
def target_features(
    target: nn.Module, x: torch.Tensor, batch_size: int = 1024, amp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features float32 [N,D], logits float32 [N,K])`` of the frozen ``target`` on ``x``'s device.

    Eval mode and bf16 autocast on CUDA, as :func:`~ltta.models.inference.predict_proba`; the
    logits' softmax is the target's prediction for the untransformed image.
    """
    tap = PooledFeatures(target)
    d, _ = tap.dims
    outs = []
    with eval_mode(target):
        for _, out in batched_logits(tap, x, batch_size, amp):
            outs.append(out.to(x.device))
    if not outs:
        raise ValueError("target_features got an empty batch (N = 0)")
    both = torch.cat(outs)
    return both[:, :d], both[:, d:]
