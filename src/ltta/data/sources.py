"""Data sources by name: the embedded default (digits), CIFAR-10/100, a user's .npz or image folder.

Every source returns uint8 images [N,H,W,3] at ``image_size`` and int64 labels, with a test split
(the official one where the dataset has one, else a stratified hold-out).
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ltta.data.download import download_file
from ltta.data.splits import stratified_holdout
from ltta.registry import Registry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


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


def to_uint8_nhwc(x: np.ndarray, what: str) -> np.ndarray:
    """Accept NHWC/NCHW (1 or 3 channels) or NHW grayscale, uint8 or float in [0,1] / [0,255]."""
    x = np.asarray(x)
    if len(x) == 0:
        raise ValueError(f"{what}: no images (shape {x.shape})")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images [N,H,W,C], [N,C,H,W] or [N,H,W], got shape {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: images need 1 or 3 channels, got shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{what}: images must be numeric, got dtype {x.dtype}")
        xf = x.astype(np.float64)
        if not np.isfinite(xf).all():
            raise ValueError(f"{what}: images contain NaN or inf")
        scale = 255.0 if xf.max() <= 1.0 else 1.0
        if xf.min() < 0 or xf.max() * scale > 255.0:
            raise ValueError(f"{what}: pixel values must lie in [0,1] or [0,255], got [{xf.min()}, {xf.max()}]")
        x = np.round(xf * scale).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


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


def _unpickle(path: Path) -> dict:
    """One pickled CIFAR batch (a dict with bytes keys, as the official archives hold)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the extracted archive; delete {path.parent} and rerun")
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="bytes")
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


@SOURCES.register("npz")
def _npz(a: SourceArgs) -> RawDataset:
    """A user's ``.npz`` with ``x_train, y_train`` and optionally ``x_test, y_test``."""
    if a.path is None or not a.path.is_file():
        raise FileNotFoundError(f"data.path {a.path} is not a file: point it at an .npz with x_train, y_train[, x_test, y_test]")
    try:
        with np.load(a.path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled objects), EOFError ...
        raise ValueError(f"{a.path} is not a readable .npz ({exc}); save it with numpy.savez(x_train=..., y_train=...)") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise ValueError(f"{a.path} lacks {missing} (has {sorted(arrays)}); it needs x_train, y_train[, x_test, y_test]")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{a.path}: give both x_test and y_test, or neither")

    def labels(key: str, n: int) -> np.ndarray:
        y = arrays[key]
        if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{a.path}: {key} must be integer labels of shape [{n}] (one per image), got {y.dtype} {y.shape}")
        if n and y.min() < 0:
            raise ValueError(f"{a.path}: {key} has negative labels (min {y.min()}); labels must be 0..num_classes-1")
        return y.astype(np.int64)

    x_tr = _resize(to_uint8_nhwc(arrays["x_train"], f"{a.path}: x_train"), a.image_size)
    y_tr = labels("y_train", len(x_tr))
    if "x_test" not in arrays:
        classes = [str(c) for c in range(int(y_tr.max()) + 1)]
        return _holdout(x_tr, y_tr, classes, "npz", a)
    x_te = _resize(to_uint8_nhwc(arrays["x_test"], f"{a.path}: x_test"), a.image_size)
    y_te = labels("y_test", len(x_te))
    classes = [str(c) for c in range(int(max(y_tr.max(), y_te.max())) + 1)]
    return RawDataset(x_tr, y_tr, x_te, y_te, classes, "npz")


def _read_folder(root: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()) if (root / cls).is_dir() else []:
            if f.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(f) as im:
                        xs.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8))
                except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
                    raise ValueError(f"{f} is not a readable image ({exc}); fix or remove it") from None
                ys.append(label)
    if not xs:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}/<class>/")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _class_dirs(base: Path) -> list[str]:
    """Class names are the sub-folder names, sorted (hidden folders such as .ipynb_checkpoints skipped)."""
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


@SOURCES.register("folder")
def _folder(a: SourceArgs) -> RawDataset:
    """``path/<class>/*.png`` (or ``path/train/<class>`` and ``path/test/<class>``), classes sorted by name."""
    if a.path is None or not a.path.is_dir():
        raise FileNotFoundError(f"data.path {a.path} is not a folder: point it at <folder>/<class>/*.png")
    split = (a.path / "train").is_dir() and (a.path / "test").is_dir()
    base = a.path / "train" if split else a.path
    classes = _class_dirs(base)
    if not classes:
        raise ValueError(f"{base} has no class folders: expected {base}/<class>/*.png")
    x, y = _read_folder(base, classes, a.image_size)
    if not split:
        return _holdout(x, y, classes, "folder", a)
    test_classes = _class_dirs(a.path / "test")
    if test_classes != classes:
        raise ValueError(
            f"{a.path}/test has class folders {test_classes} but {base} has {classes}; give both the same class folders"
        )
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
