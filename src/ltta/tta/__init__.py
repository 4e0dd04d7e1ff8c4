"""Test-time augmentation: the candidate views and the test-time methods, one module per family.

This room answers "what does the classifier see at test time, and how are its outputs combined".
How the loss predictor that ``learned`` and ``feat_pick`` consult is trained lives next door, in
:mod:`ltta.predictor`; its networks live in :mod:`ltta.models`.

- :mod:`~ltta.tta.candidates`: the public code's 12 actions x {no flip, flip}, ``build_candidates``
  (the one module of this room the predictor room reads: what a candidate is)
- :mod:`~ltta.tta.methods`: ``TTA_METHODS`` and ``build_method``, the method base class, the
  fixed baselines (none, flip, crops, random, policy)
- :mod:`~ltta.tta.learned`: the learned choice (learned, prior, oracle), ``SELECTIONS``, how
  ``learned`` picks its k views, and ``flops_per_image``, the predictor's cost;
  :mod:`~ltta.tta.abstain`: the ``abstain`` selection and its validated margin
- :mod:`~ltta.tta.target_features`, :mod:`~ltta.tta.learned_features`: the choice made from the
  target's own features (``feat_pick``)
- :mod:`~ltta.tta.gps`: greedy policy search (``gps``), with :mod:`~ltta.tta.temperature`;
  :mod:`~ltta.tta.aggregation`: learned aggregation (``agg_aug``, ``agg_class``)
- :mod:`~ltta.tta.bn_adapt`, :mod:`~ltta.tta.tent`: test-time adaptation baselines
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
from ltta.tta.methods import FAMILIES, TTA_METHODS, MethodContext, TTAMethod, build_method
from ltta.tta.learned import SELECTIONS, flops_per_image  # registers learned, prior, oracle right after the baselines
from ltta.tta import aggregation, bn_adapt, gps, learned_features, tent  # register their methods (after the registry exists)

__all__ = [
    "ACTIONS",
    "FAMILIES",
    "PAPER_ACTIONS",
    "SELECTIONS",
    "TTA_METHODS",
    "Action",
    "ActionFamily",
    "Candidate",
    "MethodContext",
    "TTAMethod",
    "aggregation",
    "apply_candidate",
    "bn_adapt",
    "build_candidates",
    "build_method",
    "flops_per_image",
    "gps",
    "identity_index",
    "learned_features",
    "mirror_permutation",
    "parse_candidate",
    "tent",
]
