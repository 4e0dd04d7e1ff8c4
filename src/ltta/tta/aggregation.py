"""Learned aggregation TTA (Shanmugam et al., ICCV 2021): every candidate view, weighted, not averaged.

The aggregators themselves are in :mod:`ltta.models.aggregator` (``agg_aug``: one weight per
view; ``agg_class``: one per view and class). Here: the target's logits under every candidate
(:func:`candidate_logits`), the fit on the validation split (:func:`fit_aggregator`), and the two
TTA methods of the same names.

The fit follows divyashan/test-time-augmentation ``tta_train.py`` (``train_tta_lr``): cross-entropy
of the aggregated logits, SGD (lr 0.01, momentum 0.9, weight decay 1e-4) over batches of 1,000
validation images in order, weights clamped at 0 after every step, from the plain mean (1/A). Its
temperature is fitted first on the identity view's logits (the reference passes one in); without
identity among the candidates, on the mean of the views' logits. Deviation: the reference fits on
a held-out validation split of clean images; here on the loss dataset's ``valid_loss`` images,
corrupted as the loss predictor's validation inputs are (see :mod:`ltta.tta.gps` for why).
A method costs one target pass per candidate (A), as scoring every view must.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltta.models import build_model
from ltta.models.inference import batched_logits, eval_mode
from ltta.tta.candidates import Candidate, apply_candidate
from ltta.tta.methods import TTA_METHODS, MethodContext, TTAMethod
from ltta.tta.temperature import fit_temperature

AGGREGATORS = ("agg_aug", "agg_class")


@torch.no_grad()
def candidate_logits(target: nn.Module, x: torch.Tensor, candidates: Sequence[Candidate], batch_size: int = 512,
                     amp: bool = True) -> torch.Tensor:
    """The target's logits float32 [N, A, K] under each candidate view of ``x`` (on ``x``'s device)."""
    per_view = []
    with eval_mode(target):
        for cand in candidates:
            view = apply_candidate(x, cand)
            per_view.append(torch.cat([z.to(x.device) for _, z in batched_logits(target, view, batch_size, amp)]))
    if not per_view:
        raise ValueError("candidate_logits needs at least one candidate")
    return torch.stack(per_view, dim=1)


def aggregator_temperature(z: torch.Tensor, y: torch.Tensor, identity: int) -> float:
    """The temperature the aggregator divides by: fitted on the identity view's logits (or the views' mean)."""
    base = z[:, identity] if identity >= 0 else z.mean(1)
    return float(fit_temperature(base, y))


def fit_aggregator(
    z: torch.Tensor, y: torch.Tensor, kind: str, temperature: float, *, epochs: int = 30, lr: float = 0.01,
    batch_size: int = 1000, momentum: float = 0.9, weight_decay: float = 1e-4,
) -> tuple[nn.Module, list[float]]:
    """Train aggregator ``kind`` on logits ``z`` [N,A,K] and labels ``y`` [N]; returns it and the mean loss per epoch.

    Deterministic: full-batch order, no sampling. A NaN loss (logits that overflow) stops with the fix.
    """
    if kind not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {kind!r}; known: {', '.join(AGGREGATORS)}")
    if z.dim() != 3 or z.shape[0] != y.shape[0]:
        raise ValueError(f"fit_aggregator takes logits [N,A,K] and labels [N], got {tuple(z.shape)} and {tuple(y.shape)}")
    model = build_model(kind, views=z.shape[1], classes=z.shape[2], temperature=temperature).to(z.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    yd = y.to(z.device).long()
    curve = []
    for epoch in range(epochs):
        total = 0.0
        for start in range(0, z.shape[0], batch_size):
            loss = F.cross_entropy(model(z[start : start + batch_size]), yd[start : start + batch_size])
            if not torch.isfinite(loss):
                raise ValueError(f"the {kind} aggregator's loss is {float(loss)} at epoch {epoch}: the target's logits "
                                 "overflow or the temperature is degenerate; check the target (dvc repro train_target)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.weight.clamp_(min=0.0)
            total += float(loss.detach()) * min(batch_size, z.shape[0] - start)
        curve.append(total / z.shape[0])
    return model.eval(), curve


class _AggregationTTA(TTAMethod):
    """Every candidate view through the target; the aggregator's weighted logits, softmaxed."""

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        agg = ctx.predictor
        if agg is None or getattr(agg, "views", None) != len(ctx.candidates):
            raise ValueError(
                f"method {self.name!r} needs predictor= an aggregator over the {len(ctx.candidates)} candidates "
                "(models/aggregation_*.pt from the fit_aggregation stage)"
            )
        self.aggregator = agg.eval()

    @property
    def forward_passes(self) -> float:
        return float(len(self.ctx.candidates))

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        z = candidate_logits(self.ctx.target, x, self.ctx.candidates, self.ctx.batch_size, self.ctx.amp)
        return self.aggregator(z.to(self.aggregator.temperature.device)).softmax(1)


@TTA_METHODS.register("agg_aug")
class AugWeightsTTA(_AggregationTTA):
    """Shanmugam et al.'s AugTTA: one learned weight per view."""

    name = "agg_aug"

    family = "fitted"

    merges_views = False


@TTA_METHODS.register("agg_class")
class ClassWeightsTTA(_AggregationTTA):
    """Shanmugam et al.'s ClassTTA: one learned weight per view and class."""

    name = "agg_class"

    family = "fitted"

    merges_views = False
