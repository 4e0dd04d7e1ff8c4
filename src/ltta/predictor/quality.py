"""How well a loss predictor ranks the candidates: against the true losses, the oracle and the prior.

The measures :func:`ltta.predictor.trainer.train_predictor` reports each epoch on the validation
set, which the train_predictor stage writes as metrics and the benchmarks compare rankers by.
The public code (kakaobrain/learning-loss-for-tta ``train.py``) logs the loss under the
predictor's choice, under identity and under the oracle's choice, and a random ranking's as a
baseline; here the rank correlation is Spearman's, and the input-independent prior
(:func:`prior_scores`) is the bar a predictor that reads the image has to clear.
"""

from __future__ import annotations

import torch
from torch import nn

from ltta.predictor.ranking import spearman_rho
from ltta.predictor.scoring import predictor_scores


def check_loss_table(x: torch.Tensor, losses: torch.Tensor, name: str) -> None:
    """Images [N,...] and their losses [N,C>=2], finite: what ranking needs (``name`` says whose)."""
    if x.dim() != 4:
        raise ValueError(f"{name}: images must be [N,3,H,W], got {tuple(x.shape)}")
    if losses.dim() != 2 or losses.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: losses must be [N,C] with N = {x.shape[0]} images, got {tuple(losses.shape)}")
    if losses.shape[1] < 2:
        raise ValueError(f"{name}: need at least 2 candidates to rank, got {losses.shape[1]}")
    if not bool(torch.isfinite(losses).all()):
        raise ValueError(
            f"{name}: losses contain NaN/inf; rebuild the loss dataset (the target produced non-finite outputs)"
        )


@torch.no_grad()
def ranking_quality(
    scores: torch.Tensor,
    losses: torch.Tensor,
    *,
    correct: torch.Tensor | None = None,
    identity_index: int = 0,
    prior: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """How well ``scores`` [N,C] (higher = predicted better) rank the candidates against the true ``losses`` [N,C].

    - ``spearman_rho``: mean over images of Spearman's rho between scores and ``-losses`` (images
      whose losses are all equal are left out); ``random_rho``: the same for uniform random scores
      (seeded; its expectation is 0);
    - ``top1_agreement``: the top-1 hit rate against the oracle, the fraction of images whose
      top-scored candidate has the lowest loss (ties in the loss count as a hit);
      ``random_top1_agreement``: its expectation for a uniformly random pick (1/C without ties);
    - ``chosen_loss`` / ``identity_loss`` / ``oracle_loss`` / ``random_loss``: mean loss of the
      top-scored candidate, of identity, of the best candidate, of a uniformly random candidate
      (expectation); with ``correct`` [N,C] also the matching ``*_error`` rates;
    - with ``prior`` [C] (one input-independent score per candidate, e.g. minus the mean training
      loss of each: :func:`prior_scores`): ``prior_rho``, ``prior_top1_agreement``, ``prior_loss``
      (and ``prior_error``), the same measures for that fixed ranking. A predictor only helps
      beyond it if it reads the image; one that merely learned which candidates are good on
      average matches the prior, not the oracle.
    """
    if scores.dim() != 2 or scores.shape != losses.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and losses {tuple(losses.shape)} must both be [N,C]")
    if not 0 <= identity_index < losses.shape[1]:
        raise ValueError(f"identity_index {identity_index} is outside the {losses.shape[1]} candidates")
    losses = losses.float()
    scores = scores.to(losses.device)
    chosen = scores.argmax(1)
    best = losses.min(1, keepdim=True).values
    at_best = losses <= best
    gen = torch.Generator(device=losses.device).manual_seed(seed)
    rand_scores = torch.rand(losses.shape, generator=gen, device=losses.device)
    out = {
        "spearman_rho": float(spearman_rho(scores, -losses).nanmean()),
        "random_rho": float(spearman_rho(rand_scores, -losses).nanmean()),
        "top1_agreement": float(at_best.gather(1, chosen[:, None]).float().mean()),
        "random_top1_agreement": float(at_best.float().mean()),
        "chosen_loss": float(losses.gather(1, chosen[:, None]).mean()),
        "identity_loss": float(losses[:, identity_index].mean()),
        "oracle_loss": float(best.mean()),
        "random_loss": float(losses.mean()),
    }
    prior_index = None  # the prior's top candidate, the same for every image
    if prior is not None:
        if prior.shape != (losses.shape[1],):
            raise ValueError(f"prior must hold one score per candidate ({losses.shape[1]}), got {tuple(prior.shape)}")
        prior_index = int(prior.argmax())
        out["prior_rho"] = float(spearman_rho(prior.to(losses.device, losses.dtype).expand_as(losses), -losses).nanmean())
        out["prior_top1_agreement"] = float(at_best[:, prior_index].float().mean())
        out["prior_loss"] = float(losses[:, prior_index].mean())
    if correct is not None:
        if correct.shape != losses.shape:
            raise ValueError(f"correct {tuple(correct.shape)} must match losses {tuple(losses.shape)}")
        wrong = 1.0 - correct.to(losses.device).float()
        out["chosen_error"] = float(wrong.gather(1, chosen[:, None]).mean())
        out["identity_error"] = float(wrong[:, identity_index].mean())
        out["oracle_error"] = float(wrong.gather(1, losses.argmin(1, keepdim=True)).mean())
        out["random_error"] = float(wrong.mean())
        if prior_index is not None:
            out["prior_error"] = float(wrong[:, prior_index].mean())
    return out


def prior_scores(losses: torch.Tensor) -> torch.Tensor:
    """The input-independent ranking a predictor should beat: minus each candidate's mean loss over
    ``losses`` [N,C] (the training table), i.e. "always prefer what is best on average"."""
    return -losses.float().mean(0)


@torch.no_grad()
def predictor_quality(
    predictor: nn.Module,
    x: torch.Tensor,
    losses: torch.Tensor,
    *,
    correct: torch.Tensor | None = None,
    identity_index: int = 0,
    prior: torch.Tensor | None = None,
    batch_size: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`ranking_quality` of the predictor's scores on the images ``x`` with true ``losses`` [N,C]."""
    check_loss_table(x, losses, "predictor_quality")
    scores = predictor_scores(predictor, x, batch_size).to(losses.device)
    if scores.shape != losses.shape:
        raise ValueError(f"the predictor gives {tuple(scores.shape)} scores for losses of shape {tuple(losses.shape)}")
    return ranking_quality(scores, losses, correct=correct, identity_index=identity_index, prior=prior, seed=seed)
