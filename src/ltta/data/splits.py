"""The paper's splits, made deterministically from the labels.

scikit-learn is imported inside the functions: it takes about 2 s to import, and most stages that
import :mod:`ltta.data` never split.
"""

from __future__ import annotations

import numpy as np


def loss_predictor_split(y: np.ndarray, valid_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_loss, valid_loss) indices into the training set.

    kakaobrain/learning-loss-for-tta (dataloader.py) takes the first split of
    ``StratifiedShuffleSplit(n_splits=5, test_size=0.2, random_state=0)``; so do we.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
    from sklearn.model_selection import StratifiedShuffleSplit

    sss = StratifiedShuffleSplit(n_splits=5, test_size=valid_fraction, random_state=seed)
    train_idx, valid_idx = next(sss.split(np.zeros(len(y)), y))
    return np.sort(train_idx), np.sort(valid_idx)


def subsample_stratified(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices keeping the class proportions (as FAA's reduced CIFAR-10), sorted."""
    if n >= len(y):
        return np.arange(len(y))
    if n < len(np.unique(y)):
        raise ValueError(f"cannot keep every class with {n} images ({len(np.unique(y))} classes); raise the cap")
    from sklearn.model_selection import StratifiedShuffleSplit

    sss = StratifiedShuffleSplit(n_splits=1, train_size=n, random_state=seed)
    idx, _ = next(sss.split(np.zeros(len(y)), y))
    return np.sort(idx)


def stratified_holdout(y: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices for sources without an official test split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.model_selection import StratifiedShuffleSplit

    sss = StratifiedShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train_idx, test_idx = next(sss.split(np.zeros(len(y)), y))
    return np.sort(train_idx), np.sort(test_idx)
