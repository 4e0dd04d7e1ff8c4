"""The loss predictor: learning to rank the candidate views by the frozen target's loss.

This room answers "how is the paper's loss predictor trained, and how well does it rank". It
holds the predictor's training data (the deformed inputs and each candidate's target loss), the
differentiable rankings and objectives, SoDeep's sorter, running the predictor on images, the
trainer and its quality measures. The candidates it ranks are defined in :mod:`ltta.tta.candidates`
(the only module of :mod:`ltta.tta` read here); the test-time methods that consult the predictor
(``learned``, ``feat_pick``) live in :mod:`ltta.tta`; the networks (``loss_predictor``,
``feature_head``) in :mod:`ltta.models`.

- :mod:`~ltta.predictor.loss_dataset`: the predictor's deformed inputs and per-candidate target losses
- :mod:`~ltta.predictor.ranking`: the rankers (pairwise sigmoid, Blondel et al.'s soft rank, a
  SoDeep sorter), Spearman loss, the SoDeep-style rank MSE; :mod:`~ltta.predictor.listwise`: the
  ``listwise`` objective
- :mod:`~ltta.predictor.sodeep`: SoDeep's sorter networks, their synthetic training, a cache of trained ones
- :mod:`~ltta.predictor.scoring`: running the predictor, the flip ensemble of its scores
- :mod:`~ltta.predictor.trainer`: ``train_predictor`` (objectives, optimisers, EMA, resume)
- :mod:`~ltta.predictor.quality`: how well a predictor ranks, against the oracle and the prior

Import order matters once: the ``learned`` methods that :mod:`ltta.tta` registers on import read
:mod:`ltta.predictor.scoring`, so :mod:`ltta.tta` must be complete before scoring starts. The
first import below (``loss_dataset``, which reads the candidates) brings it in whole; a first
import that reached scoring before the candidates would meet a half-made module.
``tests/test_imports.py`` imports every module first in a fresh interpreter and fails on that.
"""

from ltta.predictor.loss_dataset import candidate_losses, copies_per_image, predictor_training_inputs
from ltta.predictor.quality import predictor_quality, prior_scores, ranking_quality
from ltta.predictor.ranking import (
    RANKERS,
    build_ranker,
    exact_rank,
    pairwise_sigmoid_rank,
    soft_rank,
    sodeep_style_rank_mse,
    spearman_loss,
    spearman_rho,
)
from ltta.predictor.scoring import flip_ensemble_probs, predictor_scores
from ltta.predictor.trainer import OBJECTIVES, OPTIMIZERS, PredictorConfig, train_predictor

__all__ = [
    "OBJECTIVES",
    "OPTIMIZERS",
    "RANKERS",
    "PredictorConfig",
    "build_ranker",
    "candidate_losses",
    "copies_per_image",
    "exact_rank",
    "flip_ensemble_probs",
    "pairwise_sigmoid_rank",
    "predictor_quality",
    "predictor_scores",
    "predictor_training_inputs",
    "prior_scores",
    "ranking_quality",
    "soft_rank",
    "sodeep_style_rank_mse",
    "spearman_loss",
    "spearman_rho",
    "train_predictor",
]
