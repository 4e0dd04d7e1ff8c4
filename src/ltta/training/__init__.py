"""Trainers: the target classifier (:mod:`ltta.training.target`)."""

from ltta.training.target import (
    TRAIN_AUGMENTATIONS,
    CheckpointMismatchError,
    TrainConfig,
    evaluate_classifier,
    predict_proba,
    train_classifier,
    warmup_cosine_factor,
)

__all__ = [
    "TRAIN_AUGMENTATIONS",
    "CheckpointMismatchError",
    "TrainConfig",
    "evaluate_classifier",
    "predict_proba",
    "train_classifier",
    "warmup_cosine_factor",
]
