"""``feat_pick``: the learned choice made from the target's own features, nearly free.

Issue 22's first variant. One target pass on the image yields its pooled penultimate features,
its logits and so the identity view's prediction (:mod:`ltta.tta.target_features`); a small head
trained on the loss dataset (:mod:`ltta.models.feature_head`) turns features and logits into one
score per candidate, and a selection from :data:`~ltta.tta.learned.SELECTIONS` (``topk``,
``abstain``, ``eval_l2t``) picks the views. Where identity is picked its prediction is the one the
feature pass already made, so no view is rendered twice.

Cost, exact per image: the feature pass (1) + the views made besides identity (data-dependent:
from k-1 to k under ``topk``, 0 where ``abstain`` keeps identity; measured on the last
``predict``) + the head's FLOPs over the target's. Unlike ``learned`` there is no flip ensemble of
the scores: the flipped image's features would cost a second target pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ltta.tta.learned import SELECTIONS, flops_per_image
from ltta.tta.methods import TTA_METHODS, MethodContext, TTAMethod, check_k_within_candidates
from ltta.models.inference import eval_mode, model_device
from ltta.predictor.scoring import predictor_scores
from ltta.tta.target_features import PooledFeatures, target_features


def head_flops(head: nn.Module, inputs: int) -> int:
    """FLOPs of the head on one row of ``inputs`` values (eval mode)."""
    x = torch.zeros(2, inputs, 1, 1, device=model_device(head))  # 2 rows: batch norm needs no more in eval
    with eval_mode(head), torch.no_grad(), FlopCounterMode(display=False) as counter:
        head(x)
    return int(counter.get_total_flops()) // 2


@TTA_METHODS.register("feat_pick")
class LearnedFeaturesTTA(TTAMethod):
    """k candidates per image from a feature head's scores on the target's own features (see the module)."""

    name = "feat_pick"

    family = "learned"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        head = ctx.predictor
        if head is None:
            raise ValueError("method 'feat_pick' needs predictor= (a feature_head trained on this target's features)")
        d, classes = PooledFeatures(ctx.target).dims
        if (getattr(head, "features", None), getattr(head, "classes", None)) != (d, classes):
            raise ValueError(
                f"method 'feat_pick' needs a feature_head for this target ({d} features, {classes} classes), "
                f"got {type(head).__name__} with {getattr(head, 'features', '?')} features and "
                f"{getattr(head, 'classes', '?')} classes; train it with `ltta train-predictor` on this target"
            )
        if getattr(head, "num_outputs", None) != len(ctx.candidates):
            raise ValueError(f"the feature head scores {getattr(head, 'num_outputs', '?')} candidates, "
                             f"but {len(ctx.candidates)} are given; use the list it was trained on")
        check_k_within_candidates(ctx)
        if not ctx.threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {ctx.threshold}")
        self.select = SELECTIONS.get(ctx.selection)
        self.select(torch.full((1, len(ctx.candidates)), 1.0 / len(ctx.candidates)), ctx.k, self.identity_index, ctx.threshold)
        if self.identity_index < 0:
            raise ValueError("method 'feat_pick' reuses the identity view: the candidates need 'identity'")
        self.head_cost = head_flops(head, d + classes) / max(flops_per_image(ctx.target, ctx.image_size), 1)

    @property
    def forward_passes(self) -> float:
        """The feature pass + the views made besides identity (last predict; k before any) + the head."""
        views = self.mean_views()
        return 1.0 + (self.ctx.k if views is None else views) + self.head_cost

    def scores_and_identity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax of the head's scores [N,C], the identity view's softmax [N,K]) from one target pass."""
        feats, logits = target_features(self.ctx.target, x, self.ctx.batch_size, self.ctx.amp)
        raw = predictor_scores(self.ctx.predictor, torch.cat([feats, logits], 1)[:, :, None, None], self.ctx.batch_size)
        return raw.softmax(1), logits.softmax(1)

    def selection(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen candidate indices [N,k] (-1: no view), in the order they were picked."""
        scores, _ = self.scores_and_identity(x)
        return self.select(scores, self.ctx.k, self.identity_index, self.ctx.threshold).to(x.device)

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        scores, identity_probs = self.scores_and_identity(x)
        sel = self.select(scores, self.ctx.k, self.identity_index, self.ctx.threshold).to(x.device)
        return self._average_selected(x, sel, identity_probs=identity_probs)
