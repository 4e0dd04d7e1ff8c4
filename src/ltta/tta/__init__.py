"""Test-time augmentation: candidate transforms, the loss predictor's data and ranking losses, TTA methods.

- :mod:`~ltta.tta.candidates`: the public code's 12 actions x {no flip, flip}, ``build_candidates``
- :mod:`~ltta.tta.loss_dataset`: the predictor's deformed inputs and per-candidate target losses
- :mod:`~ltta.tta.ranking`: the rankers (pairwise sigmoid, Blondel et al.'s soft rank, a SoDeep
  sorter), Spearman loss, the SoDeep-style rank MSE
- :mod:`~ltta.tta.sodeep`: SoDeep's sorter networks, their synthetic training, a cache of trained ones
- :mod:`~ltta.tta.scoring`: running the predictor, the flip ensemble of its scores
- :mod:`~ltta.tta.methods`: ``TTA_METHODS`` and ``build_method``, the method base class, the
  fixed baselines (none, flip, crops, random, policy)
- :mod:`~ltta.tta.learned`: the learned choice (learned, prior, oracle), ``SELECTIONS``, how
  ``learned`` picks its k views, and ``flops_per_image``, the predictor's cost
- :mod:`~ltta.tta.target_features`, :mod:`~ltta.tta.learned_features`: the choice made from the
  target's own features (``feat_pick``); :mod:`~ltta.tta.abstain`: the ``abstain``
  selection and its validated margin; :mod:`~ltta.tta.listwise`: the ``listwise`` objective
- :mod:`~ltta.tta.gps`: greedy policy search (``gps``), with :mod:`~ltta.tta.temperature`;
  :mod:`~ltta.tta.aggregation`: learned aggregation (``agg_aug``, ``agg_class``);
  :mod:`~ltta.tta.bn_adapt`, :mod:`~ltta.tta.tent`: test-time adaptation baselines
"""

from ltta.tta.candidates import (
    ACTIONS,
    PAPER_ACTIONS,
    Action,
    ActionFamily,
    Candidate,
    apply_candidate,
    build_candidates,
    identity_index,
    mirror_permutation,
    parse_candidate,
)
from ltta.tta.loss_dataset import candidate_losses, copies_per_image, predictor_training_inputs
from ltta.tta.methods import TTA_METHODS, MethodContext, TTAMethod, build_method
from ltta.tta.learned import SELECTIONS, flops_per_image  # registers learned, prior, oracle right after the baselines
from ltta.tta import aggregation, bn_adapt, gps, learned_features, tent  # register their methods (after the registry exists)
from ltta.tta.ranking import (
    RANKERS,
    build_ranker,
    exact_rank,
    pairwise_sigmoid_rank,
    soft_rank,
    sodeep_style_rank_mse,
    spearman_loss,
    spearman_rho,
)
from ltta.tta.scoring import flip_ensemble_probs, predictor_scores

__all__ = [
    "ACTIONS",
    "PAPER_ACTIONS",
    "RANKERS",
    "SELECTIONS",
    "TTA_METHODS",
    "Action",
    "ActionFamily",
    "Candidate",
    "MethodContext",
    "TTAMethod",
    "apply_candidate",
    "build_candidates",
    "build_method",
    "build_ranker",
    "candidate_losses",
    "copies_per_image",
    "exact_rank",
    "flip_ensemble_probs",
    "aggregation",
    "bn_adapt",
    "gps",
    "learned_features",
    "flops_per_image",
    "identity_index",
    "mirror_permutation",
    "pairwise_sigmoid_rank",
    "parse_candidate",
    "predictor_scores",
    "predictor_training_inputs",
    "soft_rank",
    "sodeep_style_rank_mse",
    "spearman_loss",
    "spearman_rho",
    "tent",
]
