"""The ``npz`` source: a user's ``.npz`` (x_train, y_train[, x_test, y_test]), read without unpickling.

The conversions (image layouts, pixel ranges, label kinds) are listed in :mod:`ltta.data.sources`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ltta.data.sources import SOURCES, RawDataset, SourceArgs, holdout, resize, to_uint8_nhwc


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays the source reads (other keys are never loaded), without ever unpickling."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not an .npz archive (a .npy, a pickle, a truncated copy?); "
            f"save one with numpy.savez(path, x_train=..., y_train=...)"
        )
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in (k for k in NPZ_KEYS if k in z.files):
                try:
                    arrays[key] = z[key]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc) and "Object arrays" not in str(exc):
                        raise ValueError(f"{path}: {key} could not be read ({exc}); save the file again") from None
                    raise ValueError(
                        f"{path}: {key} is an object array, which is not loaded (unpickling runs code); "
                        f"store images as one numeric array of equal-sized images and labels as numbers or strings"
                    ) from None
            found = sorted(z.files)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable .npz ({exc}); save it with numpy.savez(x_train=..., y_train=...)") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks {missing} (has {found}); it needs x_train, y_train[, x_test, y_test]")
    if ("x_test" in arrays) != ("y_test" in arrays):
        has, lacks = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise ValueError(f"{path}: has {has} but not {lacks}; give both x_test and y_test, or neither (for a stratified hold-out)")
    return arrays


def _from_one_hot(y: np.ndarray, what: str) -> np.ndarray:
    """One-hot rows [N,C] -> column indices; soft or multi-label rows are refused, not argmaxed."""
    numeric = np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.bool_)
    ok = ((y == 0) | (y == 1)).all(1) & ((y == 1).sum(1) == 1) if numeric else np.zeros(len(y), bool)
    bad = np.flatnonzero(~ok)
    if len(bad):
        raise ValueError(
            f"{what} has shape {y.shape} but row {bad[0]} ({y[bad[0]].tolist()[:10]}) is not one-hot (a single 1, else 0); "
            f"soft or multi-label targets are not supported: give one class per image, shape [{len(y)}]"
        )
    return y.argmax(1).astype(np.int64)


def _label_values(y: np.ndarray, what: str, n: int, images: str) -> np.ndarray:
    """A label array -> one value per image: int64 for numbers, str for strings (the dtype says which)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] > 1:
        y = _from_one_hot(y, what)
    if y.ndim != 1:
        raise ValueError(f"{what} must be labels of shape [{n}] or one-hot [{n}, C], got {y.dtype} {y.shape}")
    if len(y) != n:
        raise ValueError(f"{what} has {len(y)} labels but {images} has {n} images; give exactly one label per image")
    if y.dtype.kind == "S":
        try:
            return np.char.decode(y, "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} holds bytes that are not UTF-8 ({exc}); save the labels as str or int") from None
    if y.dtype.kind == "U":
        return y
    if np.issubdtype(y.dtype, np.bool_):
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):  # floats too: they may be regression targets, not classes
        raise ValueError(
            f"{what} must be integer labels of shape [{n}] (one per image) or strings, got {y.dtype} {y.shape}; "
            f"if these are class indices, save them with .astype(np.int64)"
        )
    if y.min() < 0:
        raise ValueError(f"{what} has negative labels (min {y.min()}), often a mark for unlabelled images; drop those images")
    return y.astype(np.int64)


def _encode_labels(path: Path, *ys: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Sorted distinct label values over all splits -> class names, and each split as indices into them."""
    if len({y.dtype.kind for y in ys}) > 1:
        raise ValueError(f"{path}: y_train and y_test hold different kinds of labels (numbers and strings); use one kind")
    values = np.unique(np.concatenate(ys))  # sorted: numerically for numbers, by code point for strings
    return [str(v) for v in values], [np.searchsorted(values, y).astype(np.int64) for y in ys]


@SOURCES.register("npz")
def _npz(a: SourceArgs) -> RawDataset:
    """A user's ``.npz`` with ``x_train, y_train`` and optionally ``x_test, y_test`` (conversions: :mod:`ltta.data.sources` docstring)."""
    if a.path is None or not a.path.is_file():
        raise FileNotFoundError(f"data.path {a.path} is not a file: point it at an .npz with x_train, y_train[, x_test, y_test]")
    arrays = _read_npz(a.path)
    splits = ("train", "test") if "x_test" in arrays else ("train",)
    xs, ys = [], []
    for split in splits:
        x = to_uint8_nhwc(arrays[f"x_{split}"], f"{a.path}: x_{split}")
        ys.append(_label_values(arrays[f"y_{split}"], f"{a.path}: y_{split}", len(x), f"x_{split}"))
        xs.append(resize(x, a.image_size))
    classes, ys = _encode_labels(a.path, *ys)
    if len(splits) == 1:
        return holdout(xs[0], ys[0], classes, "npz", a)
    return RawDataset(xs[0], ys[0], xs[1], ys[1], classes, "npz")
