"""A listwise objective for the loss predictor that cares about the top of the ranking.

Top-k TTA uses only the k best-scored candidates, yet a Spearman-type objective (the paper's)
weighs a swap among the worst candidates as much as one among the best. ListNet's top-one
cross-entropy (Cao, Qin, Liu, Tsai, Li, *Learning to Rank: From Pairwise Approach to Listwise
Approach*, ICML 2007, section 4) compares the two "probability that candidate c is ranked first"
distributions instead: the target's is ``softmin(losses / tau)``, the prediction's
``softmax(scores)``. A candidate far down the list has a target probability near zero and so
almost no weight, and as ``tau -> 0`` the loss becomes the cross-entropy against the oracle's
choice (the candidate with the lowest loss), the "softmin cross-entropy against the oracle" of
issue 22. The same ``tau`` as the paper's SoDeep objective sets the target (its ``softmin(losses
/ tau)``); on the dev sample's tables the candidates' losses differ by a few hundredths, so a
``tau`` of about 0.1 is needed for the target to be far from uniform.
"""

from __future__ import annotations

import torch


def softmin_cross_entropy(scores: torch.Tensor, losses: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over rows of ``-sum_c softmin(losses / tau)_c * log_softmax(scores)_c`` (scores higher = better).

    ``scores`` and ``losses`` are [R,C]; ``tau > 0``. Its minimum over ``scores`` is the entropy of
    the target distribution, reached when ``softmax(scores)`` equals it.
    """
    if scores.shape != losses.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and losses {tuple(losses.shape)} must both be [R,C]")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    target = torch.softmax(-losses.float() / tau, dim=1)
    return -(target * torch.log_softmax(scores.float(), dim=1)).sum(1).mean()
