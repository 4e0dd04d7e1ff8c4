"""Differentiable ranking for the loss predictor's objective (rows = images, columns = candidates).

The public code (kakaobrain/learning-loss-for-tta ``train.py`` with ``sodeep/sodeep.py``
``SpearmanLoss``) trains the predictor with SoDeep (Engilberge et al., CVPR 2019): a GRU
"sorter" pre-trained on synthetic sequences maps scores to approximate ranks, and the loss is the
MSE between those ranks and the exact ranks of the target, entries whose squared error is at most
``t_easy = 0.05`` masked out. The sorter's trained weights are not published (``conf.py`` points
at a private path). The objectives here therefore take the ranking as a parameter, a *ranker*:
a function from scores [R,C] to ascending soft ranks on the scale 1..C (1 = smallest). Three are
registered in :data:`RANKERS`, built by :func:`build_ranker`:

- ``pairwise_sigmoid``: ``rank_i = 1 + sum_{j != i} sigmoid((s_i - s_j) / t)``; O(C^2) per row
  (C = 12 or 24: negligible), exact (ties averaged) as t -> 0;
- ``soft_rank``: the fast soft rank of Blondel et al., "Fast Differentiable Sorting and Ranking"
  (ICML 2020; google-research/fast-soft-sort, the algorithm of the ``torchsort`` package): the
  Euclidean projection of ``s / eps`` onto the permutahedron of (C, ..., 1), computed by isotonic
  regression (pool adjacent violators); O(C log C), exact on distinct values once ``eps`` is
  below the smallest gap, and differentiable almost everywhere with a block-averaging Jacobian;
- ``sodeep``: a trained SoDeep sorter (:mod:`ltta.predictor.sodeep`), frozen, as the public code uses it.

And two objectives use a ranker:

- :func:`spearman_loss`: ``1 - rho``, rho the Pearson correlation between the ranker's ranks of
  the prediction and the exact ranks of the target (so ``1 - Spearman's rho`` on exact ranks);
- :func:`sodeep_style_rank_mse`: the public code's objective with the chosen ranker as the sorter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ltta.registry import Registry

#: scores [R,C] -> ascending soft ranks [R,C] on the scale 1..C.
Ranker = Callable[[torch.Tensor], torch.Tensor]


def _check_scores(s: torch.Tensor, name: str) -> None:
    if s.dim() != 2:
        raise ValueError(f"{name} must be a matrix [rows, candidates], got shape {tuple(s.shape)}")
    if s.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 candidates per row to rank, got {s.shape[1]}")


def _check_positive(value: float, name: str) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


# ---------------------------------------------------------------- rankers


def pairwise_sigmoid_rank(s: torch.Tensor, temperature: float) -> torch.Tensor:
    """Ascending soft ranks in [1, C] of each row of ``s`` [R,C] (1 = smallest), differentiable.

    ``sigmoid(0) = 1/2`` makes tied entries share the average of their ranks, as exact ranking
    with ties averaged does, so the result tends to ``exact_rank(s)`` as ``temperature -> 0``.
    """
    _check_scores(s, "scores")
    _check_positive(temperature, "temperature")
    diff = (s.unsqueeze(-1) - s.unsqueeze(-2)) / temperature  # [R,C,C]: s_i - s_j
    # Sum over all j (j = i adds sigmoid(0) = 1/2), then shift: 1 + sum_{j != i}.
    return torch.sigmoid(diff).sum(-1) + 0.5


@torch.no_grad()
def _decreasing_isotonic_blocks(y: torch.Tensor) -> torch.Tensor:
    """Block labels [R,n] (0, 1, ... along each row) of the decreasing isotonic regression of ``y``.

    Pool adjacent violators, batched: every pass merges *all* adjacent blocks whose means violate
    the order at once. That is a valid PAV sequence (a merged block's mean lies between its parts',
    so a chain of violations stays violating while it is pooled pair by pair), and PAV reaches the
    unique solution in any pooling order; each pass removes a block, so at most n - 1 passes.
    """
    rows, n = y.shape
    labels = torch.arange(n, device=y.device).expand(rows, n).contiguous()
    ones = torch.ones_like(y)
    for _ in range(n - 1):
        sums = torch.zeros_like(y).scatter_add_(1, labels, y)
        counts = torch.zeros_like(y).scatter_add_(1, labels, ones)
        mean = (sums / counts.clamp(min=1.0)).gather(1, labels)
        boundary = labels[:, 1:] != labels[:, :-1]
        violated = boundary & (mean[:, :-1] < mean[:, 1:])
        if not bool(violated.any()):
            break
        kept = (boundary & ~violated).long()
        labels = torch.cat([torch.zeros_like(labels[:, :1]), kept.cumsum(1)], 1)
    return labels


def soft_rank(s: torch.Tensor, regularization_strength: float) -> torch.Tensor:
    """Blondel et al.'s L2-regularised soft rank: ascending ranks in [1, C] of each row of ``s``.

    ``r(s) = argmin_{r in P(w)} ||r - s / eps||^2``, ``P(w)`` the permutahedron of
    ``w = (C, C-1, ..., 1)``. With ``z = s / eps`` sorted descending (``z_sorted``), the projection
    is ``z_sorted - v`` put back in the original order, ``v`` the decreasing isotonic regression of
    ``z_sorted - w`` (Blondel et al. 2020, Prop. 3). The blocks are found without gradient; ``v``
    is recomputed from them as block means, so autograd gives the exact Jacobian
    (``I - block averaging``). Ties pool into one block, so tied entries share the average rank;
    as ``eps -> 0`` the result is the exact rank, as ``eps -> inf`` every rank tends to (C + 1) / 2.
    """
    _check_scores(s, "scores")
    _check_positive(regularization_strength, "regularization_strength")
    z = s / regularization_strength
    n = z.shape[1]
    w = torch.arange(n, 0, -1, device=z.device, dtype=z.dtype)
    z_sorted, order = z.sort(1, descending=True)
    y = z_sorted - w
    labels = _decreasing_isotonic_blocks(y.detach())
    sums = torch.zeros_like(y).scatter_add(1, labels, y)
    counts = torch.zeros_like(y).scatter_add(1, labels, torch.ones_like(y))
    v = (sums / counts.clamp(min=1.0)).gather(1, labels)
    return torch.empty_like(y).scatter(1, order, z_sorted - v)


def sorter_rank(sorter: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """Ascending ranks on 1..C from a SoDeep sorter, whose output is the normalised descending rank
    (``(C + 1 - rank) / C``, sodeep/utils.py ``get_rank``): the inverse of
    :func:`normalized_descending_rank`, so the public code's loss on the sorter's scale is unchanged."""
    _check_scores(s, "scores")
    c = s.shape[1]
    return c + 1.0 - c * sorter(s)


#: name -> factory(temperature, sorter) -> Ranker. ``temperature`` is the pairwise sigmoid's
#: temperature or the soft rank's regularisation strength (both on the scale of the ranked scores);
#: the sorter is needed by (and only by) ``sodeep``.
RankerFactory = Callable[[float, nn.Module | None], Ranker]
RANKERS: Registry[RankerFactory] = Registry("ranker")


def _pairwise_sigmoid(temperature: float, sorter: nn.Module | None) -> Ranker:
    _check_positive(temperature, "temperature")
    return lambda s: pairwise_sigmoid_rank(s, temperature)


def _soft_rank(temperature: float, sorter: nn.Module | None) -> Ranker:
    _check_positive(temperature, "regularization strength (rank_temperature)")
    return lambda s: soft_rank(s, temperature)


def _sodeep(temperature: float, sorter: nn.Module | None) -> Ranker:
    if sorter is None:
        raise ValueError(
            "ranker 'sodeep' needs a trained sorter: train one with `ltta train-sorter` "
            "(ltta.predictor.sodeep.ensure_sorter) and pass it, or choose ranker soft_rank / pairwise_sigmoid"
        )
    return lambda s: sorter_rank(sorter, s)


RANKERS.add("pairwise_sigmoid", _pairwise_sigmoid)
RANKERS.add("soft_rank", _soft_rank)
RANKERS.add("sodeep", _sodeep)


def build_ranker(name: str, temperature: float, sorter: nn.Module | None = None) -> Ranker:
    """The ranker registered as ``name`` (see :data:`RANKERS`)."""
    return RANKERS.get(name)(temperature, sorter)


# ---------------------------------------------------------------- exact ranks and rho


def exact_rank(s: torch.Tensor) -> torch.Tensor:
    """Ascending ranks in [1, C] of each row of ``s`` [R,C], ties averaged (scipy's ``rankdata``)."""
    _check_scores(s, "scores")
    d = s.unsqueeze(-1) - s.unsqueeze(-2)
    below = (d > 0).sum(-1).to(torch.float32)
    ties = (d == 0).sum(-1).to(torch.float32)  # includes the entry itself
    return below + (ties + 1.0) / 2.0


def _row_pearson(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlation per row, and a mask of rows where it is defined (both non-constant)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    na = a.pow(2).sum(-1)
    nb = b.pow(2).sum(-1)
    valid = (na > 1e-12) & (nb > 1e-12)
    denom = torch.sqrt(torch.where(valid, na * nb, torch.ones_like(na)))
    return (a * b).sum(-1) / denom, valid


def spearman_rho(pred_scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Exact Spearman rho per row [R] (NaN where either row is constant, as scipy gives)."""
    _check_shapes(pred_scores, target_scores)
    rho, valid = _row_pearson(exact_rank(pred_scores), exact_rank(target_scores))
    return torch.where(valid, rho, torch.full_like(rho, float("nan")))


def _check_shapes(pred: torch.Tensor, target: torch.Tensor) -> None:
    _check_scores(pred, "pred_scores")
    _check_scores(target, "target_scores")
    if pred.shape != target.shape:
        raise ValueError(f"pred_scores {tuple(pred.shape)} and target_scores {tuple(target.shape)} differ in shape")


# ---------------------------------------------------------------- objectives


def spearman_loss(pred_scores: torch.Tensor, target_scores: torch.Tensor, ranker: Ranker) -> torch.Tensor:
    """``1 - mean_rows rho(ranker(pred), exact_rank(target))``; scores ranked in the same direction.

    Rows whose target is constant (every candidate equally good) carry no ranking information
    and are left out of the mean; if all are, the loss is 0 (with a zero gradient). With a ranker
    that gives exact ranks the value is exactly ``1 - `` the mean Spearman rho.
    """
    _check_shapes(pred_scores, target_scores)
    r_pred = ranker(pred_scores)
    r_tgt = exact_rank(target_scores.detach()).to(r_pred.dtype)
    rho, valid = _row_pearson(r_pred, r_tgt)
    # A constant prediction row (soft ranks all equal) has rho 0 but keeps its gradient path.
    tgt_ok = r_tgt.var(-1) > 0
    if not bool(tgt_ok.any()):
        return pred_scores.sum() * 0.0
    rho = torch.where(valid, rho, torch.zeros_like(rho))
    return 1.0 - rho[tgt_ok].mean()


def normalized_descending_rank(ranks_ascending: torch.Tensor) -> torch.Tensor:
    """SoDeep's rank scale (sodeep/utils.py ``get_rank``): largest -> 1/C, smallest -> 1."""
    c = ranks_ascending.shape[-1]
    return (c + 1 - ranks_ascending) / c


def sodeep_style_rank_mse(
    pred_scores: torch.Tensor,
    target_scores: torch.Tensor,
    ranker: Ranker,
    t_easy: float = 0.05,
    l1_weight: float = 0.0,
) -> torch.Tensor:
    """The public code's SpearmanLoss, with ``ranker`` as the sorter.

    ``pred_scores`` is the predictor's softmax and ``target_scores`` ``softmin(losses / tau)``
    (train.py); both are put on SoDeep's normalised descending rank scale, the squared error
    per entry is zeroed where it is at most ``t_easy`` (``mask_easy``), and the mean is taken
    over all entries, masked ones included (sodeep.py). ``l1_weight`` is SoDeep's ``lbd``
    (0 in the public code). Exact target ranks average ties, where ``get_rank``'s argsort breaks
    them arbitrarily. Softmax outputs lie in (0, 1), so a ranker's temperature is on that scale.
    """
    _check_shapes(pred_scores, target_scores)
    r_pred = normalized_descending_rank(ranker(pred_scores))
    r_tgt = normalized_descending_rank(exact_rank(target_scores.detach())).to(r_pred.dtype)
    err = (r_pred - r_tgt).pow(2)
    err = err * (err > t_easy).to(err.dtype)
    loss = err.mean()
    if l1_weight:
        loss = loss + l1_weight * (pred_scores - target_scores.detach()).abs().mean()
    return loss
