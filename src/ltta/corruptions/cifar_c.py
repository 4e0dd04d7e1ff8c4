"""The CIFAR-10-C / CIFAR-100-C file layout: write ours, read ours or the official release.

Layout (hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``, save code; zenodo 2535967
and 3555552): one ``<corruption>.npy`` per corruption, uint8 [5N,32,32,3] with severity s in rows
[(s-1)N, sN), and ``labels.npy`` holding the N test labels repeated 5 times (uint8 in the
release).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ltta.corruptions.apply import corrupt_images, derive_seed
from ltta.corruptions.base import CORRUPTIONS
from ltta.corruptions.names import ALL_CORRUPTIONS
from ltta.corruptions.severity import SEVERITIES, check_severity
from ltta.io import open_npy, save_npy

LABELS_FILE = "labels.npy"
N_SEVERITIES = len(SEVERITIES)


def write_corruption_set(
    out_dir: Path,
    images_uint8_nhwc: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    *,
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    batch_size: int = 10000,
) -> list[Path]:
    """Write ``<name>.npy`` for every name and ``labels.npy`` into ``out_dir``, atomically.

    Each (name, severity) cell is seeded by :func:`derive_seed` (seed, name, severity), so a file
    does not depend on which other names are written. Labels are stored as uint8 when they fit
    (as the release does), else int64. Returns the written paths.
    """
    out_dir = Path(out_dir)
    images = np.asarray(images_uint8_nhwc)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}] (one per image), got {labels.shape}")
    if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError("labels must be non-negative integers")
    for name in names:
        CORRUPTIONS.get(name)  # unknown names fail before any work
    n = images.shape[0]
    written: list[Path] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names) * N_SEVERITIES, desc="corruptions", unit="cell")
    for name in names:
        cells = np.empty((N_SEVERITIES * n, *images.shape[1:]), dtype=np.uint8)
        for s in SEVERITIES:
            cells[(s - 1) * n : s * n] = corrupt_images(
                images, name, s, seed=derive_seed(seed, name, s), device=device, batch_size=batch_size
            )
            if bar is not None:
                bar.set_postfix_str(f"{name} s{s}")
                bar.update(1)
        path = out_dir / f"{name}.npy"
        save_npy(path, cells)
        written.append(path)
    if bar is not None:
        bar.close()
    label_dtype = np.uint8 if labels.size == 0 or labels.max() < 256 else np.int64
    path = out_dir / LABELS_FILE
    save_npy(path, np.tile(labels.astype(label_dtype), N_SEVERITIES))
    written.append(path)
    return written


def available_corruptions(directory: Path) -> list[str]:
    """Known corruption names with a ``<name>.npy`` in ``directory``, in the release's order."""
    directory = Path(directory)
    return [name for name in ALL_CORRUPTIONS if (directory / f"{name}.npy").is_file()]


def read_corruption(directory: Path, name: str, severity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [M,H,W,3] and labels int64 [M] of one corruption, from our files or the
    official CIFAR-10-C / CIFAR-100-C release (same layout).

    ``severity`` 1..5 returns that level's N rows; ``None`` returns all 5N rows. Only the rows
    asked for are read (memory-mapped files).
    """
    directory = Path(directory)
    path = directory / f"{name}.npy"
    if not path.is_file():
        have = available_corruptions(directory) if directory.is_dir() else []
        raise FileNotFoundError(
            f"{path} does not exist (corruptions present in {directory}: {have or 'none'}); generate it "
            f"with write_corruption_set (the prepare_data stage) or unpack the official CIFAR-10-C/100-C there"
        )
    label_path = directory / LABELS_FILE
    if not label_path.is_file():
        raise FileNotFoundError(f"{label_path} does not exist; every corruption directory needs the labels file")
    redo = "regenerate it (the prepare_data stage) or unpack the official release again"
    images = open_npy(path, redo=redo)
    labels = open_npy(label_path, redo=redo)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path} must hold uint8 [5N,H,W,3] images, has {images.dtype} {images.shape}; regenerate it")
    if images.shape[0] == 0:
        raise ValueError(f"{path} holds no images (an empty corrupted set); {redo}")
    if images.shape[0] % N_SEVERITIES:
        raise ValueError(f"{path} has {images.shape[0]} rows, not a multiple of 5 severities; {redo}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{label_path} has shape {labels.shape} but {path} has {images.shape[0]} images; "
            f"both must come from the same generation run: {redo}"
        )
    if severity is None:
        rows = slice(0, images.shape[0])
    else:
        s = check_severity(severity)
        n = images.shape[0] // N_SEVERITIES
        rows = slice((s - 1) * n, s * n)
    return np.array(images[rows]), np.array(labels[rows], dtype=np.int64)


_REDO_RELEASE = "delete the release folder and rerun to unpack it again"
_NOT_THIS_TEST_SET = ("{path} does not hold this test set's labels in its order: the release corrupts another dataset's "
                      "test images (check data.source against the release), or " + _REDO_RELEASE)


def release_labels(release_dir: Path) -> np.ndarray:
    """The N test labels of a released set, checked to repeat identically in each severity's rows."""
    path = Path(release_dir) / LABELS_FILE
    released = np.asarray(open_npy(path, redo=_REDO_RELEASE))
    if released.ndim != 1 or released.shape[0] == 0 or released.shape[0] % N_SEVERITIES:
        raise ValueError(f"{path} has shape {released.shape}, not [5N]; {_REDO_RELEASE}")
    first = released[: released.shape[0] // N_SEVERITIES]
    if not (released.reshape(N_SEVERITIES, -1) == first).all():
        raise ValueError(f"{path} does not repeat the same N labels in each of the 5 severities; {_REDO_RELEASE}")
    return first


def check_release_matches(release_dir: Path, test_labels: np.ndarray) -> None:
    """The release corrupts this very test set in this order (its labels equal the official test labels):
    checked before anything is written, since another dataset's release would score garbage."""
    if not np.array_equal(release_labels(release_dir), np.asarray(test_labels)):
        raise ValueError(_NOT_THIS_TEST_SET.format(path=Path(release_dir) / LABELS_FILE))


def copy_corruption_set(
    out_dir: Path, release_dir: Path, names: Sequence[str], rows: np.ndarray, labels: np.ndarray
) -> list[Path]:
    """Write ``<name>.npy`` and ``labels.npy`` into ``out_dir`` for the test images ``rows`` of a
    released set (the official CIFAR-10-C / CIFAR-100-C folder), every severity, in the layout above.

    ``rows`` index the release's N test images (a stratified cap keeps the same images in every
    severity and corruption); ``labels`` are those images' labels in our test split. The release's
    labels must equal them: that is the check that the release corrupts this very test set, in
    this order (another dataset's release, or a test set re-ordered, would score garbage).
    """
    out_dir, release_dir = Path(out_dir), Path(release_dir)
    rows = np.asarray(rows, dtype=np.int64)
    written: list[Path] = []
    for name in names:
        CORRUPTIONS.get(name)
    first = release_labels(release_dir)
    n = len(first)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(
            f"the test split has image indices up to {int(rows.max())} but the release in {release_dir} corrupts "
            f"{n} test images; the release belongs to another test set (use corruptions.source=generated)"
        )
    if not np.array_equal(first[rows], labels):
        raise ValueError(_NOT_THIS_TEST_SET.format(path=release_dir / LABELS_FILE))
    for name in names:
        images, _ = read_corruption(release_dir, name)
        if images.shape[0] != N_SEVERITIES * n:
            raise ValueError(f"{release_dir / (name + '.npy')} has {images.shape[0]} rows, not {N_SEVERITIES * n}; {_REDO_RELEASE}")
        path = out_dir / f"{name}.npy"
        save_npy(path, np.concatenate([images[(s - 1) * n + rows] for s in SEVERITIES]))
        written.append(path)
    path = out_dir / LABELS_FILE
    save_npy(path, np.tile(first[rows], N_SEVERITIES))
    written.append(path)
    return written
