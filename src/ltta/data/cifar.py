"""The CIFAR-10/100 sources: the official archives (or a mirror), checked and extracted safely, read without unpickling code.

Archives and MD5s are those of Krizhevsky's CIFAR pages (python version); a member outside the
CIFAR folder, a link or a device refuses the archive whole, and a batch may name only the globals
an array of bytes needs.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltta.data.download import check_members, download_file
from ltta.data.sources import SOURCES, RawDataset, SourceArgs, resize


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
                check_members(tar.getmembers(), archive, spec.folder, fix="point data.url at the official archive")
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
    return RawDataset(resize(x_tr, a.image_size), y_tr, resize(x_te, a.image_size), y_te, classes, name)


SOURCES.add("cifar10", lambda a: _cifar("cifar10", a))
SOURCES.add("cifar100", lambda a: _cifar("cifar100", a))
