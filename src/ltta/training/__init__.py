"""The target classifier's trainer and its modes (the loss predictor's trainer is in :mod:`ltta.predictor`).

- :mod:`~ltta.training.target`: the one training loop (``train_classifier``), which knows no mode;
- :mod:`~ltta.training.config`: ``TrainConfig``, the settings of a run, checked when made;
- :mod:`~ltta.training.mode` and :mod:`~ltta.training.modes`: what a training mode is, and the
  modes (standard, augmix, policy, auxiliary), one module each;
- :mod:`~ltta.training.preparation`, :mod:`~ltta.training.corruption_mixing`: how a batch is
  augmented before the mode sees it; :mod:`~ltta.training.augmix`: the AugMix augmentation;
- :mod:`~ltta.training.distributed`: the same loop under ``torchrun``.

Importing this package registers the training modes, which ``TrainConfig`` checks its ``mode``
against (the trainer imports :mod:`ltta.training.modes`).
"""

from ltta.checkpoint import CheckpointMismatchError
from ltta.models.inference import evaluate_classifier, predict_proba
from ltta.training.config import TrainConfig
from ltta.training.preparation import TRAIN_AUGMENTATIONS
from ltta.training.target import train_classifier, warmup_cosine_factor

__all__ = [
    "TRAIN_AUGMENTATIONS",
    "CheckpointMismatchError",
    "TrainConfig",
    "evaluate_classifier",
    "predict_proba",
    "train_classifier",
    "warmup_cosine_factor",
]
