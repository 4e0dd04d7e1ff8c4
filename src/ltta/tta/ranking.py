"""Differentiable ranking losses for the loss predictor (rows = images, columns = candidates).

The public code (kakaobrain/learning-loss-for-tta ``train.py`` with ``sodeep/sodeep.py``
``SpearmanLoss``) trains the predictor with SoDeep (Engilberge et al., CVPR 2019): a GRU
"sorter" pre-trained on synthetic sequences maps scores to approximate ranks, and the loss is the
MSE between those ranks and the exact ranks of the target, entries whose squared error is at most
``t_easy = 0.05`` masked out. The sorter's trained weights are not published (``conf.py`` points
at a private path), so here a closed-form soft rank stands in for it: the pairwise-sigmoid rank

    rank_i = 1 + sum_{j != i} sigmoid((s_i - s_j) / t),

which is smooth in the scores, O(C^2) per row (C = 12 or 24 candidates: negligible), and equals
the exact rank (ties averaged, as ``scipy.stats.rankdata``) as t -> 0. Two objectives use it:

- :func:`spearman_loss`: ``1 - rho``, rho the Pearson correlation between the soft ranks of the
  prediction and the exact ranks of the target (so ``1 - Spearman's rho`` as t -> 0);
- :func:`sodeep_style_rank_mse`: the public code's objective with the soft rank as the sorter.
"""

from __future__ import annotations

import torch


def _check_scores(s: torch.Tensor, name: str) -> None:
    if s.dim() != 2:
        raise ValueError(f"{name} must be a matrix [rows, candidates], got shape {tuple(s.shape)}")
    if s.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 candidates per row to rank, got {s.shape[1]}")


def soft_rank(s: torch.Tensor, temperature: float) -> torch.Tensor:
    """Ascending soft ranks in [1, C] of each row of ``s`` [R,C] (1 = smallest), differentiable.

    ``sigmoid(0) = 1/2`` makes tied entries share the average of their ranks, as exact ranking
    with ties averaged does, so ``soft_rank(s, t) -> exact_rank(s)`` as ``t -> 0``.
    """
    _check_scores(s, "scores")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    diff = (s.unsqueeze(-1) - s.unsqueeze(-2)) / temperature  # [R,C,C]: s_i - s_j
    # Sum over all j (j = i adds sigmoid(0) = 1/2), then shift: 1 + sum_{j != i}.
    return torch.sigmoid(diff).sum(-1) + 0.5


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


def spearman_loss(pred_scores: torch.Tensor, target_scores: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``1 - mean_rows rho(soft_rank(pred), exact_rank(target))``; scores ranked in the same direction.

    Rows whose target is constant (every candidate equally good) carry no ranking information
    and are left out of the mean; if all are, the loss is 0 (with a zero gradient). With
    ``temperature -> 0`` the value is exactly ``1 - `` the mean Spearman rho.
    """
    _check_shapes(pred_scores, target_scores)
    r_pred = soft_rank(pred_scores, temperature)
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
    temperature: float = 0.01,
    t_easy: float = 0.05,
    l1_weight: float = 0.0,
) -> torch.Tensor:
    """The public code's SpearmanLoss with a soft rank in place of SoDeep's learned sorter.

    ``pred_scores`` is the predictor's softmax and ``target_scores`` ``softmin(losses / tau)``
    (train.py); both are put on SoDeep's normalised descending rank scale, the squared error
    per entry is zeroed where it is at most ``t_easy`` (``mask_easy``), and the mean is taken
    over all entries, masked ones included (sodeep.py). ``l1_weight`` is SoDeep's ``lbd``
    (0 in the public code). Exact target ranks average ties, where ``get_rank``'s argsort breaks
    them arbitrarily. Softmax outputs lie in (0, 1), so the temperature is on that scale.
    """
    _check_shapes(pred_scores, target_scores)
    r_pred = normalized_descending_rank(soft_rank(pred_scores, temperature))
    r_tgt = normalized_descending_rank(exact_rank(target_scores.detach())).to(r_pred.dtype)
    err = (r_pred - r_tgt).pow(2)
    err = err * (err > t_easy).to(err.dtype)
    loss = err.mean()
    if l1_weight:
        loss = loss + l1_weight * (pred_scores - target_scores.detach()).abs().mean()
    return loss
