"""Data sources by name, and what they share: the registry, the conversion helpers, the digits source.

The embedded default (digits) and ``load_source`` live here; CIFAR-10/100 in :mod:`~ltta.data.cifar`,
a user's .npz in :mod:`~ltta.data.npz_source`, an image folder in :mod:`~ltta.data.image_folder`
(each registers itself in ``SOURCES``; ``ltta.data`` imports them in registration order).

Every source returns uint8 images [N,H,W,3] at ``image_size`` and int64 labels, with a test split
(the official one where the dataset has one, else a stratified hold-out). Images of another size or
aspect ratio are stretched to ``image_size`` x ``image_size`` (bilinear), as the folder source always did.

A user's data is converted where the meaning is unambiguous and refused, naming the file or array
and the fix, where it is not (a wrong guess would train silently on garbage):

- npz images: [N,H,W,C] or [N,C,H,W] with C = 1 (grey, replicated), 3 (RGB) or 4 (RGBA, alpha
  dropped as PIL's ``convert("RGB")`` does for the folder source and torchvision's ImageFolder);
  [N,H,W] is grey. A shape that reads both ways (a side of 1, 3 or 4 pixels) is refused. Integers
  are 0..255 (all 0 or 1 is refused); floats are [0,1] when they peak at most at 1 and [0,255] when they peak at
  ``FLOAT_255_MIN_PEAK`` or more; a peak in between, negatives, NaN or inf are refused.
- npz labels: integers, strings, booleans, a column [N,1] or one-hot rows [N,C] (argmax; soft rows
  are refused); float labels are refused (they may be regression targets), as are negative ones
  (often "unlabelled"). The distinct values over both splits, sorted, are the classes: ``{3, 7, 9}``
  become indices 0, 1, 2 named "3", "7", "9"; one-hot column k is named "k".
- folder images: any mode PIL reads (grey, palette, RGBA with alpha dropped, CMYK) as RGB; 16-bit
  grey keeps its high byte. Hidden and non-image files are skipped; sub-folders, empty class
  folders, broken symlinks and unreadable images are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ltta.data.splits import check_splittable, stratified_holdout
from ltta.registry import Registry

CHANNELS = (1, 3, 4)  # grey, RGB, RGBA
# Float images peaking in (1, FLOAT_255_MIN_PEAK) are refused: too bright for [0,1] (bar a resize
# overshoot), too dark for [0,255] (no real photo set peaks below 10 of 255).
FLOAT_255_MIN_PEAK = 10.0


@dataclass
class RawDataset:
    """A loaded dataset: uint8 images [N,H,W,3], int64 labels [N] in 0..len(classes)-1."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    name: str


@dataclass(frozen=True)
class SourceArgs:
    """The arguments of ``load_source``, handed to every registered source (each uses the ones it needs)."""

    root: Path
    path: Path | None
    url: str | None
    md5: str | None
    image_size: int
    test_fraction: float
    seed: int


SOURCES: Registry[Callable[[SourceArgs], RawDataset]] = Registry("data source")


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC at ``size`` (bilinear); a no-op at the right size."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    t = torch.as_tensor(x).permute(0, 3, 1, 2).float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size)
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def holdout(x: np.ndarray, y: np.ndarray, classes: list[str], name: str, a: SourceArgs) -> RawDataset:
    """A stratified test split for sources that ship none (digits, a user's data without a test part)."""
    check_splittable(y, classes, a.test_fraction, what=name, kept="train", held_out="test",
                     fix="add images or provide a test split", fraction_key="data.test_fraction")  # fmt: skip
    tr, te = stratified_holdout(y, a.test_fraction, a.seed)
    return RawDataset(x[tr], y[tr], x[te], y[te], classes, name)


def _to_nhwc(x: np.ndarray, what: str) -> np.ndarray:
    """[N,H,W] grey, [N,H,W,C] or [N,C,H,W] -> [N,H,W,C]; refuses a shape that reads both ways."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images [N,H,W,C], [N,C,H,W] or [N,H,W], got shape {x.shape}")
    first, last = x.shape[1] in CHANNELS, x.shape[-1] in CHANNELS
    if first and last:
        raise ValueError(
            f"{what}: shape {x.shape} reads as [N,H,W,C] and as [N,C,H,W] (a side of 1, 3 or 4 pixels either way); "
            f"store images larger than 4x4 pixels, in [N,H,W,C] layout"
        )
    if first:
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] not in CHANNELS:
        raise ValueError(
            f"{what}: images need 1 (grey), 3 (RGB) or 4 (RGBA) channels in [N,H,W,C] or [N,C,H,W], got shape {x.shape}"
        )
    return x


def _float_scale(x: np.ndarray, what: str) -> float:
    """255 for floats in [0,1], 1 for floats in [0,255]; refuses a range that is neither or both."""
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: images contain {int((~np.isfinite(x)).sum())} NaN or inf values; fix or drop those images")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0:
        raise ValueError(
            f"{what}: pixel values must lie in [0,1] or [0,255], got [{lo}, {hi}]; "
            f"undo any normalisation (x * std + mean) and clip to that range"
        )
    if hi <= 1.0:
        return 255.0
    if hi < FLOAT_255_MIN_PEAK:
        raise ValueError(
            f"{what}: float pixel values peak at {hi}, which is neither [0,1] (max 1) nor [0,255] "
            f"(max at least {FLOAT_255_MIN_PEAK:g}); clip to [0,1], or save uint8 images"
        )
    if hi > 255.0:
        raise ValueError(f"{what}: pixel values must lie in [0,1] or [0,255], got [{lo}, {hi}]; rescale, or save uint8 images")
    return 1.0


def _to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """Integers 0..255 as they are, floats by ``_float_scale``; anything else is refused."""
    if np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            hint = "; for 16-bit images keep the high byte (x >> 8)" if hi <= 65535 and lo >= 0 else ""
            raise ValueError(f"{what}: integer pixel values must lie in 0..255, got {lo}..{hi}{hint}")
        if hi <= 1:
            raise ValueError(f"{what}: every pixel is 0 or 1; for binary images save 0 and 255 (x * 255) as uint8")
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: images must be uint8, another integer type or float, got dtype {x.dtype}")
    scale = _float_scale(x, what)
    return np.rint(x.astype(np.float64) * scale).astype(np.uint8)


def to_uint8_nhwc(x: np.ndarray, what: str) -> np.ndarray:
    """A user's image array -> uint8 RGB [N,H,W,3], by the rules in the module docstring."""
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"{what}: expected images [N,H,W,C], [N,C,H,W] or [N,H,W], got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{what}: no images (shape {x.shape}); save at least one image per class")
    x = _to_uint8(_to_nhwc(x, what), what)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x[..., :3])


@SOURCES.register("digits")
def _digits(a: SourceArgs) -> RawDataset:
    """scikit-learn's 8x8 digits (1,797 real scans, offline), scaled to 0..255, resized, as RGB."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None].repeat(3, axis=-1)
    x = resize(x, a.image_size)
    return holdout(x, d.target.astype(np.int64), [str(c) for c in d.target_names], "digits", a)


def load_source(
    name: str,
    *,
    root: Path,
    path: Path | None = None,
    url: str | None = None,
    md5: str | None = None,
    image_size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> RawDataset:
    """Load a registered source as uint8 NHWC RGB images at ``image_size`` with int64 labels.

    ``root`` holds downloads (CIFAR); ``path`` is the user's file or folder (npz, folder); ``url``
    replaces the official address (a full archive URL or a mirror's base folder); ``md5`` replaces
    the official checksum (for a mirror serving another archive, and for tests). ``test_fraction``
    and ``seed`` make the stratified test split of sources that have no official one.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    args = SourceArgs(Path(root), Path(path) if path else None, url, md5, image_size, test_fraction, seed)
    return SOURCES.get(name)(args)
