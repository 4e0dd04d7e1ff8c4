"""Abstaining selection: keep the image as it is unless the predictor expects a clear gain.

Top-k TTA replaces the identity view by k chosen views on every image, so a predictor that is
unsure still pays k passes and, on clean images, often loses accuracy (on the CIFAR dev sample the
learned top-3's clean error is 0.7 to 2 points above no TTA's). This selection abstains: an image
keeps identity alone (one view) unless the predicted gain of the best candidate over identity,
``log score[best] - log score[identity]``, exceeds a margin; then it gets the usual top-k. The
scores are the predictor's softmax outputs, trained to rank like ``softmin(losses / tau)``, so the
gain is a predicted loss difference in units of tau.

The margin is chosen on held-out rows with known losses (the loss dataset's valid_loss part) by
:func:`choose_margin`: the margin minimising the mean loss of the pick (best candidate above the
margin, identity below it) over those rows, the larger margin on ties. Because "always identity"
is among the margins tried, the chosen rule's validation loss is never above identity's: any loss
it adds on clean images is bounded by what it gains on the same validation rows.

It generalises kakaobrain/learning-loss-for-tta ``eval_l2t.py``'s ``th`` (identity when the best
score is below ``th`` times identity's, a ratio on the softmax, never tuned there: 0) in two ways:
the margin is chosen on validation data, and abstaining costs one view instead of k. Selective
prediction with a threshold fit on held-out data is the standard recipe (Geifman & El-Yaniv,
*Selective Classification for Deep Neural Networks*, NeurIPS 2017); here what is abstained from is
the augmentation, not the prediction.
"""

from __future__ import annotations

import math

import torch


def predicted_gain(scores: torch.Tensor, identity: int) -> torch.Tensor:
    """``log score[best] - log score[identity]`` per image [N] (>= 0), scores [N,C] positive (softmax outputs)."""
    if identity < 0:
        raise ValueError("an abstaining selection keeps identity: the candidate set needs the 'identity' candidate")
    logs = scores.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return logs.max(1).values - logs[:, identity]


def select_abstain(scores: torch.Tensor, k: int, identity: int, margin: float) -> torch.Tensor:
    """[N,k]: the top-k where :func:`predicted_gain` exceeds ``margin``, else ``[identity, -1, ...]`` (one view)."""
    if not margin >= 0.0:
        raise ValueError(f"the abstention margin must be >= 0 (a predicted loss gain in units of tau), got {margin}")
    gain = predicted_gain(scores, identity)
    top = scores.topk(k, dim=1).indices
    keep = torch.full_like(top, -1)
    keep[:, 0] = identity
    return torch.where((gain > margin)[:, None], top, keep)


def choose_margin(scores: torch.Tensor, losses: torch.Tensor, identity: int) -> dict[str, float]:
    """The margin for :func:`select_abstain` from held-out ``scores`` and true ``losses`` [N,C].

    Over the margins that change a decision (0 and every row's predicted gain), the one whose
    rule (best candidate where the gain exceeds it, identity elsewhere) has the lowest mean loss;
    on a tie, the largest (fewest augmented images). Returns ``margin``, ``valid_loss`` (the rule's
    mean loss), ``identity_loss``, ``topk_loss`` (margin 0: the best candidate always) and
    ``augmented`` (the share of rows above the margin). One sort; no loop over margins.
    """
    if scores.shape != losses.shape or scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores {tuple(scores.shape)} and losses {tuple(losses.shape)} must both be [N,C], N > 0")
    gain = predicted_gain(scores, identity)
    losses = losses.float()
    pick = losses.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    ident = losses[:, identity]
    order = torch.sort(gain, descending=True, stable=True).indices
    g, delta = gain[order], (pick - ident)[order]
    # Augmenting the j rows with the largest gains: loss = identity's + sum of their deltas. A margin
    # m augments exactly the rows with gain > m, so only j at the end of a run of equal gains is a rule.
    n = g.shape[0]
    cum = torch.cat([delta.new_zeros(1), delta.double().cumsum(0)])  # cum[j]: the first j rows augmented
    valid_j = torch.ones(n + 1, dtype=torch.bool)
    valid_j[1:n] = g[1:] < g[:-1]  # j rows augmented needs row j-1's gain above row j's
    cost = torch.where(valid_j, cum, torch.full_like(cum, math.inf))
    best = int(torch.nonzero(cost == cost.min()).min())  # the fewest augmented rows among the best
    # Augment the rows with gain > g[best], i.e. the first `best`; all of them: half the smallest gain.
    margin = float(g[best]) if best < n else float(g[-1]) / 2.0
    base = float(ident.mean())
    return {
        "margin": margin,
        "valid_loss": base + float(cost[best]) / n,
        "identity_loss": base,
        "topk_loss": float(pick.mean()),
        "augmented": best / n,
    }
