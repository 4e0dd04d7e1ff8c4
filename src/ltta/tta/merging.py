"""How a method's views are merged into one prediction: ``MERGES``, over the views' softmaxes.

The paper (and kakaobrain/learning-loss-for-tta ``eval_l2t.py``) averages the target's softmax
over the chosen views: ``mean``, the default everywhere in the pipeline. The others are the merge
modes users know from ttach (qubvel/ttach ``base.py`` ``Merger``), applied to the softmaxes and
renormalised so every mode returns class probabilities (errors, NLL and ECE stay comparable):

- ``gmean``: the geometric mean, ``exp(mean log p)``: a view that rules a class out vetoes it;
- ``max``: the per-class maximum over the views: the most confident view wins;
- ``tsharpen``: the mean of ``p ** 0.5`` (ttach's "tsharpen", its power 0.5): flattens each view
  before averaging, so one over-confident view weighs less.

Views are always combined view by view in their given order (:func:`sum_in_order`), so a result
does not depend on how the views were batched, and on CUDA is the same on every run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ltta.registry import Registry

#: name -> merge of per-view probabilities [V,N,K] into [N,K]
MERGES: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("merge mode")
TINY = 1e-12  # log floor for gmean: a zero probability in one view becomes a vote near zero, not NaN


def sum_in_order(per_view: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis of [V,N,K], view by view as a running sum would."""
    acc = per_view[0]
    for v in range(1, per_view.shape[0]):
        acc = acc + per_view[v]
    return acc


def _normalised(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(dim=-1, keepdim=True)


MERGES.add("mean", lambda per_view: sum_in_order(per_view) / per_view.shape[0])
MERGES.add("gmean", lambda per_view: _normalised(torch.exp(sum_in_order(per_view.clamp_min(TINY).log()) / per_view.shape[0])))
MERGES.add("max", lambda per_view: _normalised(per_view.amax(dim=0)))
MERGES.add("tsharpen", lambda per_view: _normalised(sum_in_order(per_view.sqrt()) / per_view.shape[0]))


def merge(per_view: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Merge per-view probabilities [V,N,K] into [N,K] by ``mode`` (a name in :data:`MERGES`)."""
    if per_view.dim() != 3 or per_view.shape[0] < 1:
        raise ValueError(f"expected per-view probabilities [V>=1,N,K], got shape {tuple(per_view.shape)}")
    return MERGES.get(mode)(per_view)
