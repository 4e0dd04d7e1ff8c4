"""The paper's splits, made deterministically from the labels.

scikit-learn is imported inside the functions: it takes about 2 s to import, and most stages that
import :mod:`ltta.data` never split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: A classifier needs two classes, and a stratified split two images of each class (one per side).
MIN_CLASSES = 2
MIN_PER_CLASS = 2


def stratified_sizes(n: int, fraction: float) -> tuple[int, int]:
    """(kept, held out) image counts of a stratified split of ``n`` images, as scikit-learn rounds them
    (the held-out side is ``ceil(fraction * n)``)."""
    held = math.ceil(fraction * n)
    return n - held, held


def min_images_to_split(num_classes: int, fraction: float) -> int:
    """The fewest images whose stratified split leaves at least one image of every class on each side."""
    n = 2 * num_classes
    while min(stratified_sizes(n, fraction)) < num_classes:
        n += 1
    return n


def check_splittable(
    y: np.ndarray, classes: Sequence[str], fraction: float, *, what: str, held_out: str, kept: str, fix: str,
    fraction_key: str,
) -> None:
    """Refuse labels a stratified split (and then a classifier) cannot be made from, before anything is written.

    The message names the minimum (classes, images per class, images in all) and the fix. ``what``
    names the labels' split, ``kept`` / ``held_out`` the two sides, ``fix`` how to get more images,
    ``fraction_key`` the param that sets ``fraction``.
    """
    n_classes = len(classes)
    if n_classes < MIN_CLASSES:
        raise ValueError(
            f"{what}: {n_classes} class ({', '.join(map(str, classes)) or 'none'}); a classifier needs at least "
            f"{MIN_CLASSES} classes: add images of another class"
        )
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes)
    rare = {str(classes[i]): int(counts[i]) for i in np.flatnonzero(counts < MIN_PER_CLASS)}
    if rare:
        listed = ", ".join(f"{c} ({k})" for c, k in list(rare.items())[:10]) + (" ..." if len(rare) > 10 else "")
        raise ValueError(
            f"{what}: the stratified {kept}/{held_out} split needs at least {MIN_PER_CLASS} images of every class; "
            f"{len(rare)} class(es) have fewer: {listed}; {fix}, or drop those classes"
        )
    n_kept, n_held = stratified_sizes(len(y), fraction)
    if min(n_kept, n_held) < n_classes:
        need = min_images_to_split(n_classes, fraction)
        raise ValueError(
            f"{what}: {len(y)} images split {n_kept} {kept} / {n_held} {held_out} at fraction {fraction:g}, but each "
            f"side needs one image of each of the {n_classes} classes: at least {need} images; {fix}, or change {fraction_key}"
        )


def check_prepared_splits(y_train: np.ndarray, y_test: np.ndarray, classes: Sequence[str], valid_fraction: float) -> None:
    """What prepare_data needs of the (capped) data: a train split the paper's train_loss/valid_loss
    split can be cut from, and a test split of at least two images."""
    check_splittable(y_train, classes, valid_fraction, what="the training split", kept="train_loss", held_out="valid_loss",
                     fix="add images or raise data.max_train", fraction_key="data.valid_loss_fraction")  # fmt: skip
    if len(y_test) < MIN_PER_CLASS:
        raise ValueError(
            f"the test split holds {len(y_test)} image(s); errors and calibration need at least {MIN_PER_CLASS} "
            f"(one image of each of the {len(classes)} classes is the useful minimum): add test images or raise data.max_test"
        )


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
