"""The learned choice of views: ``learned``, its ``prior`` ablation, the ``oracle`` bound, ``SELECTIONS``.

These methods average the target's softmax over k of the C candidates chosen per image (or, for
``prior``, once for all images), through :meth:`~ltta.tta.methods.TTAMethod._average_selected`.
``learned`` scores every candidate with the loss predictor on the image and its flip, as
kakaobrain/learning-loss-for-tta ``eval_l2t.py`` ``AugmentorLearned`` does, and a selection from
:data:`SELECTIONS` turns the scores into k views. ``prior`` takes the same k candidates for
every image; the ``oracle`` needs every candidate's loss, so it runs all C.

A loss predictor run counts as its FLOPs over the target's (both measured with
``torch.utils.flop_counter.FlopCounterMode`` on one image, :func:`flops_per_image`), so
``learned`` with k views costs ``k + 2 * ratio`` (the image and its flip).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ltta.models.inference import eval_mode, model_device
from ltta.registry import Registry
from ltta.tta.abstain import select_abstain
from ltta.tta.methods import TTA_METHODS, MethodContext, TTAMethod, check_k_within_candidates
from ltta.predictor.scoring import flip_ensemble_probs


#: FLOPs by model and image size: counting traces a whole forward pass, so each model is counted once.
_FLOPS_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[int, int]] = weakref.WeakKeyDictionary()


def flops_per_image(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass on one ``image_size`` x ``image_size`` RGB image (eval mode).

    Cached per model object and size (FLOPs depend on the architecture, not on the weights).
    """
    cached = _FLOPS_CACHE.setdefault(model, {})
    if image_size not in cached:
        x = torch.zeros(1, 3, image_size, image_size, device=model_device(model))
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        cached[image_size] = int(counter.get_total_flops())
    return cached[image_size]


def select_topk(scores: torch.Tensor, k: int, identity: int, threshold: float) -> torch.Tensor:
    """The k highest-scored candidates [N,k], best first: k distinct views, as the paper describes top-k."""
    if threshold:
        raise ValueError("selection 'topk' has no identity threshold; use selection 'eval_l2t' for threshold > 0")
    return scores.topk(k, dim=1).indices


def select_eval_l2t(scores: torch.Tensor, k: int, identity: int, threshold: float) -> torch.Tensor:
    """kakaobrain/learning-loss-for-tta ``eval_l2t.py`` ``AugmentorLearned``: k greedy picks [N,k].

    Each pick is the highest remaining score; it becomes identity when its score is below
    ``threshold`` times identity's (``th``, 0 in the public code by default). A picked candidate
    other than identity is removed from the pool, but identity never is: once identity is picked
    (as the best remaining candidate, or by the fallback) every later pick is identity again. Views
    are averaged with equal weight, so identity first picked at place j (from 1) counts k - j + 1
    times. It differs from :func:`select_topk` only when identity would be picked before the k-th
    place. Vectorised over images; a loop over the k picks.
    """
    if identity < 0:
        raise ValueError("selection 'eval_l2t' falls back to identity: the candidate set needs the 'identity' candidate")
    pool = scores.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    picks = []
    for _ in range(k):
        best_score, best = pool.max(dim=1)
        pick = torch.where(best_score < threshold * pool[:, identity], torch.full_like(best, identity), best)
        removed = pick != identity
        pool[rows[removed], pick[removed]] = 0.0  # the public code zeroes the picked softmax entry
        picks.append(pick)
    return torch.stack(picks, dim=1)


#: How ``learned`` turns the predictor's flip-ensembled scores [N,C] into k candidates per image:
#: ``fn(scores, k, identity column, threshold) -> indices [N,k]``.
SELECTIONS: Registry[Callable[[torch.Tensor, int, int, float], torch.Tensor]] = Registry("learned selection")
SELECTIONS.add("topk", select_topk)
SELECTIONS.add("eval_l2t", select_eval_l2t)
SELECTIONS.add("abstain", select_abstain)  # ltta.tta.abstain: identity alone below a validated margin


@TTA_METHODS.register("learned")
class LearnedTTA(TTAMethod):
    """The paper's method: k candidates per image from the flip-ensembled predictor scores.

    eval_l2t.py ``AugmentorLearned`` scores the image and its flip and averages the two softmaxes;
    the target's softmax over the k chosen views is averaged. ``ctx.selection`` picks the k: by
    default ``topk``, the k highest scores (distinct views, as the paper states it); ``eval_l2t``
    follows the public script exactly (:func:`select_eval_l2t`: identity, once picked, fills
    the remaining places, and ``ctx.threshold`` its fallback to identity).
    """

    name = "learned"

    family = "learned"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if ctx.predictor is None:
            raise ValueError("method 'learned' needs predictor= (a trained loss predictor)")
        check_k_within_candidates(ctx)
        self.select = SELECTIONS.get(ctx.selection)
        if not ctx.threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0 (a multiple of identity's score), got {ctx.threshold}")
        self.select(torch.zeros(1, len(ctx.candidates)), ctx.k, self.identity_index, ctx.threshold)  # bad settings fail here
        target_flops = flops_per_image(ctx.target, ctx.image_size)
        self.predictor_cost = flops_per_image(ctx.predictor, ctx.image_size) / max(target_flops, 1)

    @property
    def forward_passes(self) -> float:
        """k views (fewer where the selection abstains: the views the last predict() made) + the
        predictor on the image and its flip."""
        views = self.mean_views()
        return (self.ctx.k if views is None else views) + 2.0 * self.predictor_cost

    def selection(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen candidate indices [N,k], in the order they were picked."""
        scores = flip_ensemble_probs(self.ctx.predictor, x, self.ctx.candidates, self.ctx.batch_size)
        return self.select(scores, self.ctx.k, self.identity_index, self.ctx.threshold).to(x.device)

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self._average_selected(x, self.selection(x))

    @torch.no_grad()
    def predict_with_selection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict(x)`` and the candidates it averaged [N,k] (best first), one predictor run per
        chunk: what the served model (:mod:`ltta.serving`) answers."""
        probs, chosen = [], []
        for xc, _ in self._chunks(x, None):
            sel = self.selection(xc)
            probs.append(self._average_selected(xc, sel).float().to(x.device))
            chosen.append(sel.to(x.device))
        return torch.cat(probs), torch.cat(chosen)


@TTA_METHODS.register("prior")
class PriorTTA(TTAMethod):
    """Ablation of ``learned``: the same k candidates for every image, those with the lowest mean
    loss over the predictor's training table (:func:`ltta.predictor.quality.prior_scores`).

    Not in the paper; it answers whether the predictor's gain comes from reading the image or
    only from knowing which candidates help on average (on corrupted inputs, e.g. autocontrast).
    It costs k passes and no predictor run.
    """

    name = "prior"

    family = "learned"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if ctx.prior is None:
            raise ValueError(
                "method 'prior' needs prior= (one score per candidate: minus its mean training loss, "
                "saved in the predictor file by `ltta train-predictor`)"
            )
        if ctx.prior.shape != (len(ctx.candidates),):
            raise ValueError(f"prior has shape {tuple(ctx.prior.shape)}, expected one score per candidate ({len(ctx.candidates)})")
        check_k_within_candidates(ctx)
        self.chosen = ctx.prior.float().topk(ctx.k).indices.to(ctx.device)  # best first

    @property
    def chosen_names(self) -> list[str]:
        """The k candidates every image gets, best first (for reports)."""
        return [self.ctx.candidates[int(i)].name for i in self.chosen]

    @property
    def forward_passes(self) -> float:
        return float(self.ctx.k)

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self._average_selected(x, self.chosen.expand(x.shape[0], -1))


@TTA_METHODS.register("oracle")
class OracleTTA(TTAMethod):
    """Upper bound: per image the k candidates with the lowest true loss (needs the labels)."""

    name = "oracle"

    family = "oracle"
    needs_labels = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        check_k_within_candidates(ctx)  # at build time, not after the first chunk's work

    @property
    def forward_passes(self) -> float:
        return float(len(self.ctx.candidates))

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None
        probs = self._all_candidate_probs(x)  # [N,C,K]
        yd = y.to(probs.device).long()
        p_true = probs.gather(2, yd[:, None, None].expand(-1, probs.shape[1], 1)).squeeze(2)  # [N,C]
        loss = -torch.log(p_true.clamp_min(torch.finfo(torch.float32).tiny))
        best = loss.topk(self.ctx.k, dim=1, largest=False).indices  # [N,k]
        return probs.gather(1, best[:, :, None].expand(-1, -1, probs.shape[2])).mean(1)
