"""The ``folder`` source: a user's image folder, ``<class>/*.png`` or ``train/<class>`` and ``test/<class>``.

What is read and what is refused (modes, hidden files, sub-folders, broken symlinks) is listed in
:mod:`ltta.data.sources`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ltta.data.sources import SOURCES, RawDataset, SourceArgs, holdout

if TYPE_CHECKING:
    from PIL import Image as PILImage

# The extensions torchvision's ImageFolder reads; other files (.DS_Store, Thumbs.db, notes) are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


SPLIT_NAMES = ("train", "test", "val", "valid", "validation")


def _visible(p: Path) -> bool:
    """Hidden entries (.DS_Store, AppleDouble ``._x.png``, .ipynb_checkpoints) and ``__MACOSX`` are never data."""
    return not p.name.startswith(".") and p.name != "__MACOSX"


def _class_dirs(base: Path) -> list[str]:
    """Class names are the sub-folder names, sorted (hidden folders and __MACOSX skipped; symlinks followed)."""
    return sorted(p.name for p in base.iterdir() if p.is_dir() and _visible(p))


def _nested_folder_error(sub: Path) -> ValueError:
    """Sub-folders are refused, not searched: a train/ or val/ folder read as a class would train on nonsense."""
    cls_dir = sub.parent
    if cls_dir.name.lower() in SPLIT_NAMES:
        root = cls_dir.parent
        return ValueError(
            f"{root} has {cls_dir.name}/ holding class folders but not both train/ and test/: give "
            f"{root}/train/<class>/ and {root}/test/<class>/ (rename a val/ folder to test/), or put the class folders in {root}"
        )
    return ValueError(
        f"{sub} is a folder inside class folder {cls_dir}: sub-folders are not read; move their images up into {cls_dir}"
    )


def _image_files(cls_dir: Path) -> list[Path]:
    """The image files directly in one class folder, sorted; other files are skipped, sub-folders refused."""
    files, skipped = [], []
    for f in sorted(cls_dir.iterdir()):
        if not _visible(f):
            continue
        if f.is_dir():
            raise _nested_folder_error(f)
        (files if f.suffix.lower() in IMAGE_SUFFIXES else skipped).append(f)
    if not files:
        seen = f" (skipped {[f.name for f in skipped[:5]]})" if skipped else ""
        raise ValueError(
            f"class folder {cls_dir} has no images{seen}; add {'/'.join(IMAGE_SUFFIXES)} files or remove the folder"
        )
    return files


def _to_rgb(im: PILImage.Image, f: Path) -> PILImage.Image:
    """8-bit RGB: alpha dropped, grey and palette expanded; 16-bit grey keeps its high byte (``convert`` clips it to white)."""
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        high = np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(high.astype(np.uint8)).convert("RGB")
    if im.mode in ("I", "F"):
        raise ValueError(f"{f}: mode {im.mode} (32-bit integer or float pixels) has no fixed range; save it as an 8- or 16-bit image")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"{f}: mode {im.mode} cannot be converted to RGB ({exc}); save it as an 8-bit RGB or grey image") from None


def _read_image(f: Path, size: int) -> np.ndarray:
    """One image file -> uint8 [size,size,3] (stretched, bilinear); a broken or unreadable file names itself."""
    from PIL import Image

    if f.is_symlink() and not f.exists():
        raise ValueError(f"{f} is a broken symlink (to {os.readlink(f)}); fix or remove it")
    try:
        with Image.open(f) as im:
            im.load()
    except Image.DecompressionBombError as exc:  # Pillow's own safety limit, not an OSError
        raise ValueError(
            f"{f} is refused by Pillow's decompression-bomb limit ({exc}); if the image is genuine, downscale "
            f"it (or raise PIL.Image.MAX_IMAGE_PIXELS in your own code), otherwise remove it"
        ) from None
    except MemoryError:
        raise ValueError(f"{f}: decoding it ran out of memory; downscale the image or remove it") from None
    except Exception as exc:  # noqa: BLE001 (a decoder fails in many ways: OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"{f} is not a readable image ({type(exc).__name__}: {exc}); fix or remove it") from None
    return np.asarray(_to_rgb(im, f).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _read_folder(base: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every class's images, labelled by position in ``classes``; all folders are listed before any decoding."""
    files = [_image_files(base / cls) for cls in classes]
    x = np.stack([_read_image(f, size) for fs in files for f in fs])
    y = np.concatenate([np.full(len(fs), label, dtype=np.int64) for label, fs in enumerate(files)])
    return x, y


@SOURCES.register("folder")
def _folder(a: SourceArgs) -> RawDataset:
    """``path/<class>/*.png`` (or ``path/train/<class>`` and ``path/test/<class>``), classes sorted by name.

    Every class folder must hold images directly (sub-folders are refused, hidden and non-image files
    skipped), and with train/ and test/ both must have the same class folders.
    """
    if a.path is None or not a.path.is_dir():
        raise FileNotFoundError(f"data.path {a.path} is not a folder: point it at <folder>/<class>/*.png")
    split = (a.path / "train").is_dir() and (a.path / "test").is_dir()
    base = a.path / "train" if split else a.path
    classes = _class_dirs(base)
    if not classes:
        raise ValueError(f"{base} has no class folders: expected {base}/<class>/*.png")
    if not split:
        return holdout(*_read_folder(base, classes, a.image_size), classes, "folder", a)
    test_classes = _class_dirs(a.path / "test")
    if test_classes != classes:
        only_train, only_test = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise ValueError(
            f"{a.path}/test has class folders {test_classes} but {base} has {classes} "
            f"(only in train: {only_train}, only in test: {only_test}); give both the same class folders"
        )
    x, y = _read_folder(base, classes, a.image_size)
    x_te, y_te = _read_folder(a.path / "test", classes, a.image_size)
    return RawDataset(x, y, x_te, y_te, classes, "folder")
