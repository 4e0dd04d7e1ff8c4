"""Data sources by name: the embedded default (digits), CIFAR-10/100, a user's .npz or image folder.

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

import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ltta.data.download import download_file
from ltta.data.splits import stratified_holdout
from ltta.registry import Registry

if TYPE_CHECKING:
    from PIL import Image as PILImage

# The extensions torchvision's ImageFolder reads; other files (.DS_Store, Thumbs.db, notes) are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
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


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC at ``size`` (bilinear); a no-op at the right size."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    t = torch.as_tensor(x).permute(0, 3, 1, 2).float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size)
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _holdout(x: np.ndarray, y: np.ndarray, classes: list[str], name: str, a: SourceArgs) -> RawDataset:
    """A stratified test split for sources that ship none (digits, a user's data without a test part)."""
    counts = np.bincount(y, minlength=len(classes))
    if (counts < 2).any():
        rare = [classes[i] for i in np.flatnonzero(counts < 2)]
        raise ValueError(
            f"{name}: classes {rare} have fewer than 2 images, too few for a stratified test split; "
            f"add images, drop those classes, or provide a test split"
        )
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
    x = _resize(x, a.image_size)
    return _holdout(x, d.target.astype(np.int64), [str(c) for c in d.target_names], "digits", a)


@dataclass(frozen=True)
class CifarSpec:
    """Where an official CIFAR archive lives and how its pickled batches are laid out."""

    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# Official archives of Krizhevsky's CIFAR pages (python version) and their published MD5s.
CIFAR = {
    "cifar10": CifarSpec(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels",
        "batches.meta", b"label_names",
    ),
    "cifar100": CifarSpec(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python", ("train",), ("test",), b"fine_labels", "meta", b"fine_label_names",
    ),
}


# What an official CIFAR batch may name when unpickled (numpy's array reconstruction, Python 2's
# bytes codec): a pickle naming anything else is refused before it can run (see _BatchUnpickler).
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles; a crafted one in a mirror's archive would run its code when
    loaded, so only the globals an array of bytes needs are resolved."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR batch holds (a crafted pickle?)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """One pickled CIFAR batch (a dict with bytes keys, as the official archives hold)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the extracted archive; delete {path.parent} and rerun")
    try:
        with open(path, "rb") as fh:
            obj = _BatchUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a readable CIFAR batch ({exc}); delete {path.parent} and its archive, and rerun") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict; delete {path.parent} and rerun")
    return obj


def _cifar_batches(folder: Path, files: tuple[str, ...], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batches; rows of ``data`` are 3072 bytes, channel-major (R plane, G, B), each 32x32 row-major."""
    xs, ys = [], []
    for f in files:
        d = _unpickle(folder / f)
        if b"data" not in d or label_key not in d:
            raise ValueError(f"{folder / f} lacks b'data' or {label_key!r} (has {sorted(d)}); it is not an official CIFAR batch")
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(
                f"{folder / f}: expected b'data' uint8 [N,3072] and {len(data)} labels, got {data.dtype} {data.shape} "
                f"and {len(labels)} labels; delete {folder} and its archive, and rerun"
            )
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _cifar_url(spec: CifarSpec, url: str | None) -> str:
    """``url`` may name the archive itself or a base folder (a mirror) that holds the official file name."""
    if not url:
        return spec.url
    if url.endswith((".tar.gz", ".tgz")):
        return url
    return url.rstrip("/") + "/" + spec.archive


def _check_members(tar: tarfile.TarFile, archive: Path, folder: str) -> None:
    """Refuse an archive holding anything but files and folders under ``folder/``.

    The official archives hold nothing else; a member with an absolute path, a ``..``, a link or a
    device is a crafted (or foreign) archive, refused whole before anything is written (the
    extraction's ``filter="data"`` would still keep such members inside the target folder).
    """
    bad = []
    for m in tar.getmembers():
        parts = PurePosixPath(m.name).parts
        if (m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] != folder
                or not (m.isfile() or m.isdir())):
            bad.append(m.name + (f" -> {m.linkname}" if m.issym() or m.islnk() else ""))
    if bad:
        raise ValueError(
            f"{archive} holds {len(bad)} member(s) outside {folder}/ or that are links or devices "
            f"({', '.join(map(repr, bad[:3]))}): refusing to extract it (nothing was written); delete it and point "
            f"data.url at the official archive"
        )


def _extract(archive: Path, root: Path, spec: CifarSpec) -> Path:
    """Extract ``archive`` into ``root/<folder>`` atomically, checking that every expected file came out."""
    folder = root / spec.folder
    needed = spec.train_files + spec.test_files + (spec.meta_file,)
    if folder.is_dir() and all((folder / f).is_file() for f in needed):
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                _check_members(tar, archive, spec.folder)
                tar.extractall(tmp, filter="data")  # 'data' refuses absolute paths, links out, devices
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{archive} could not be extracted ({exc}); delete it and rerun to download again") from None
        missing = [f for f in needed if not (tmp / spec.folder / f).is_file()]
        if missing:
            raise ValueError(
                f"{archive} lacks {spec.folder}/{{{', '.join(missing)}}}: it is not the official python-version archive; "
                f"delete it and rerun, or point data.url at the official one"
            )
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier extraction
        os.replace(tmp / spec.folder, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cifar(name: str, a: SourceArgs) -> RawDataset:
    spec = CIFAR[name]
    a.root.mkdir(parents=True, exist_ok=True)
    archive = download_file(_cifar_url(spec, a.url), a.root / spec.archive, a.md5 or spec.md5)
    folder = _extract(archive, a.root, spec)
    x_tr, y_tr = _cifar_batches(folder, spec.train_files, spec.label_key)
    x_te, y_te = _cifar_batches(folder, spec.test_files, spec.label_key)
    meta = _unpickle(folder / spec.meta_file)
    if spec.names_key not in meta:
        raise ValueError(f"{folder / spec.meta_file} lacks {spec.names_key!r}; it is not the official CIFAR meta file")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec.names_key]]
    return RawDataset(_resize(x_tr, a.image_size), y_tr, _resize(x_te, a.image_size), y_te, classes, name)


SOURCES.add("cifar10", lambda a: _cifar("cifar10", a))
SOURCES.add("cifar100", lambda a: _cifar("cifar100", a))


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
    """A user's ``.npz`` with ``x_train, y_train`` and optionally ``x_test, y_test`` (module docstring: conversions)."""
    if a.path is None or not a.path.is_file():
        raise FileNotFoundError(f"data.path {a.path} is not a file: point it at an .npz with x_train, y_train[, x_test, y_test]")
    arrays = _read_npz(a.path)
    splits = ("train", "test") if "x_test" in arrays else ("train",)
    xs, ys = [], []
    for split in splits:
        x = to_uint8_nhwc(arrays[f"x_{split}"], f"{a.path}: x_{split}")
        ys.append(_label_values(arrays[f"y_{split}"], f"{a.path}: y_{split}", len(x), f"x_{split}"))
        xs.append(_resize(x, a.image_size))
    classes, ys = _encode_labels(a.path, *ys)
    if len(splits) == 1:
        return _holdout(xs[0], ys[0], classes, "npz", a)
    return RawDataset(xs[0], ys[0], xs[1], ys[1], classes, "npz")


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
    except (OSError, ValueError, SyntaxError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{f} is not a readable image ({exc}); fix or remove it") from None
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
        return _holdout(*_read_folder(base, classes, a.image_size), classes, "folder", a)
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
