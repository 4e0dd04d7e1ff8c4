"""The stages' inputs, read and checked against each other before any work starts.

A stage trusts nothing it did not write in the same run: a prepared set with a wrong shape,
labels out of range or split indices past the end would otherwise fail deep inside torch with a
message that names neither the file nor the fix (or, worse, train on it silently). Each reader
here names the file, what it should hold and which stage to rerun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltta.io import load_npz, read_json
from ltta.model_io import is_model_uri, load_model_source
from ltta.runtime import to_float_nchw
from ltta.stages.base import Paths

#: The keys of ``data/prepared/meta.json`` that later stages read (prepare_data writes them).
PREPARED_META_KEYS = ("source", "classes", "num_classes", "image_size", "n_test", "mean", "std")
#: The keys of ``data/loss/meta.json`` (build_loss_dataset writes them).
LOSS_META_KEYS = ("candidates", "identity_index")

_REDO_PREPARED = "rerun prepare_data (dvc repro prepare_data)"
_REDO_LOSS = "rerun build_loss_dataset (dvc repro build_loss_dataset)"


def prepared_meta(paths: Paths) -> dict[str, Any]:
    """``data/prepared/meta.json`` with the keys later stages need."""
    return read_json(paths.prepared / "meta.json", required=PREPARED_META_KEYS)


def _check_images(path: Path, x: np.ndarray, image_size: int, redo: str) -> None:
    """uint8 [N,S,S,3], the on-disk layout prepare_data writes."""
    want = f"uint8 [N,{image_size},{image_size},3]"
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"{path}: 'x' must be {want} images (meta.json's image_size), has {x.dtype} {x.shape}; {redo}.")
    if x.shape[0] == 0:
        raise ValueError(f"{path}: 'x' holds no images; {redo}.")


def labelled_images(path: Path, meta: dict[str, Any], redo: str = _REDO_PREPARED) -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 [N,S,S,3], y int64 [N])`` of a prepared ``train.npz`` / ``test.npz`` (or a loss-dataset
    split, with its ``redo``), labels in range."""
    arrays = load_npz(path, required=("x", "y"))
    x, y = arrays["x"], arrays["y"]
    _check_images(path, x, int(meta["image_size"]), redo)
    n_classes = int(meta["num_classes"])
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: 'y' must be integer labels [{x.shape[0]}], has {y.dtype} {y.shape}; {redo}.")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"{path}: labels span [{int(y.min())}, {int(y.max())}] but meta.json has {n_classes} classes "
            f"(labels 0..{n_classes - 1}); {redo}."
        )
    return x, y.astype(np.int64, copy=False)


def validation_split(paths: Paths, meta: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss dataset's valid_loss images (corrupted as the predictor's validation inputs) as float
    NCHW on ``device``, and their labels: the split GPS and the learned aggregation are fitted on."""
    x, y = labelled_images(paths.loss_data / "valid.npz", meta, redo=_REDO_LOSS)
    return to_float_nchw(x, device), torch.as_tensor(y, device=device)


def model_location(source: str, paths: Paths) -> str | Path:
    """A params model source as a stage reads it: an MLflow URI as is, a file under the project root."""
    return source if is_model_uri(source) else paths.root / source


def load_target(source: str, paths: Paths, meta: dict[str, Any], device: torch.device, *,
                copy_to: Path | None = None) -> torch.nn.Module:
    """The target a params model source names (a file under the root or an MLflow URI), checked to be
    trained on the prepared data's classes: what every stage that reads the target starts with."""
    return load_target_file(source, paths, meta, device, copy_to=copy_to)[0]


def load_target_file(source: str, paths: Paths, meta: dict[str, Any], device: torch.device, *,
                     copy_to: Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """:func:`load_target` and the model file's extra (its history, and where a published target came from)."""
    location = model_location(source, paths)
    target, extra = load_model_source(location, device, copy_to=copy_to)
    check_target_classes(location, extra, meta)
    return target, extra


def check_target_classes(path: str | Path, extra: dict[str, Any], meta: dict[str, Any]) -> None:
    """The target in ``path`` was trained on the prepared data's classes (stages run alone can mix runs)."""
    trained = extra.get("classes")
    if trained is not None and list(trained) != list(meta["classes"]):
        raise ValueError(
            f"{path} was trained on {len(trained)} classes {_few(trained)} but data/prepared has "
            f"{len(meta['classes'])} {_few(meta['classes'])}; rerun train_target (dvc repro train_target)."
        )


def _few(names: list[str], shown: int = 12) -> list[str]:
    """The first ``shown`` names (CIFAR-100 has 100: a message needs only enough to tell sets apart)."""
    names = list(names)
    return names if len(names) <= shown else [*names[:shown], "..."]


def split_indices(path: Path, n_train: int) -> dict[str, np.ndarray]:
    """``splits.npz``: the train_loss / valid_loss indices, each 1-D, integer, within the training set."""
    splits = load_npz(path, required=("train_loss", "valid_loss"))
    for name in ("train_loss", "valid_loss"):
        idx = splits[name]
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.size == 0:
            raise ValueError(f"{path}: {name!r} must be non-empty 1-D integer indices, has {idx.dtype} {idx.shape}; {_REDO_PREPARED}.")
        if idx.min() < 0 or idx.max() >= n_train:
            raise ValueError(
                f"{path}: {name!r} indexes [{int(idx.min())}, {int(idx.max())}] but train.npz has {n_train} images; "
                f"{_REDO_PREPARED}."
            )
    return splits


def loss_meta(paths: Paths) -> dict[str, Any]:
    """``data/loss/meta.json``: the candidate names in column order and identity's column."""
    meta = read_json(paths.loss_data / "meta.json", required=LOSS_META_KEYS)
    names, ident = meta["candidates"], meta["identity_index"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{paths.loss_data / 'meta.json'}: 'candidates' must be a list of names; {_REDO_LOSS}.")
    if not isinstance(ident, int) or not 0 <= ident < len(names):
        raise ValueError(f"{paths.loss_data / 'meta.json'}: 'identity_index' {ident!r} is not a column; {_REDO_LOSS}.")
    return meta


def loss_split(path: Path, image_size: int, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """A loss-dataset split: ``(x uint8 [N,S,S,3], losses float [N,C])``, one finite loss per candidate."""
    arrays = load_npz(path, required=("x", "losses"))
    x, losses = arrays["x"], arrays["losses"]
    _check_images(path, x, image_size, _REDO_LOSS)
    if losses.shape != (x.shape[0], n_candidates) or not np.issubdtype(losses.dtype, np.floating):
        raise ValueError(
            f"{path}: 'losses' must be float [{x.shape[0]},{n_candidates}] (one column per candidate of meta.json), "
            f"has {losses.dtype} {losses.shape}; {_REDO_LOSS}."
        )
    if not np.isfinite(losses).all():
        raise ValueError(f"{path}: 'losses' holds NaN or inf values; {_REDO_LOSS} (and check the target).")
    return x, losses
