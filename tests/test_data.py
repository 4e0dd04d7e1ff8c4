"""Data sources (digits, CIFAR through the real download path on 127.0.0.1, .npz, folder), splits, validation."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ltta.data import (
    DataValidationError,
    download_file,
    load_source,
    loss_predictor_split,
    subsample_stratified,
    validate_splits,
)


def test_digits_is_offline_real_and_deterministic(tmp_path: Path) -> None:
    a = load_source("digits", root=tmp_path)
    b = load_source("digits", root=tmp_path)
    assert a.x_train.shape == (1437, 32, 32, 3) and a.x_test.shape == (360, 32, 32, 3)
    assert a.x_train.dtype == np.uint8 and a.y_train.dtype == np.int64
    assert a.classes == [str(i) for i in range(10)] and set(a.y_test) == set(range(10))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.max() == 255 and a.x_train.min() == 0


def _cifar_archive(kind: str, rng: np.random.Generator) -> tuple[bytes, dict[str, np.ndarray]]:
    """A tiny archive in the official python-version format (pickled dict batches in a tar.gz)."""
    folder, label_key = ("cifar-10-batches-py", b"labels") if kind == "cifar10" else ("cifar-100-python", b"fine_labels")
    n_classes = 10 if kind == "cifar10" else 100
    files = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 6} if kind == "cifar10" else {"train": 20, "test": 6}
    buf, packed = io.BytesIO(), {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, obj: dict) -> None:
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name, n in files.items():
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = rng.integers(0, n_classes, n).tolist()
            add(name, {b"data": x, label_key: y})
            split = "test" if "test" in name else "train"
            packed[f"{split}_x"].append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            packed[f"{split}_y"].append(np.asarray(y))
        meta_name, names_key = ("batches.meta", b"label_names") if kind == "cifar10" else ("meta", b"fine_label_names")
        add(meta_name, {names_key: [f"c{i}".encode() for i in range(n_classes)]})
    return buf.getvalue(), {k: np.concatenate(v) for k, v in packed.items()}


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support, like the CIFAR host, and counts the requests."""

    requests: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        type(self).requests.append(rng or "full")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    _RangeHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_download_resume_and_parse(kind: str, served: tuple[str, Path], tmp_path: Path) -> None:
    base, www = served
    data, packed = _cifar_archive(kind, np.random.default_rng(0))
    name = "cifar-10-python.tar.gz" if kind == "cifar10" else "cifar-100-python.tar.gz"
    (www / name).write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    root = tmp_path / "raw"
    root.mkdir()
    (root / (name + ".part")).write_bytes(data[:100])  # an interrupted earlier download
    ds = load_source(kind, root=root, url=f"{base}/{name}", md5=md5)
    assert _RangeHandler.requests == ["bytes=100-"], "the download did not resume"
    np.testing.assert_array_equal(ds.x_train, packed["train_x"])
    np.testing.assert_array_equal(ds.y_train, packed["train_y"])
    np.testing.assert_array_equal(ds.x_test, packed["test_x"])
    assert ds.x_train.shape[1:] == (32, 32, 3) and len(ds.classes) == (10 if kind == "cifar10" else 100)
    # A second load uses the verified archive: no new request.
    load_source(kind, root=root, url=f"{base}/{name}", md5=md5)
    assert len(_RangeHandler.requests) == 1


def test_checksum_mismatch_deletes_and_explains(served: tuple[str, Path], tmp_path: Path) -> None:
    base, www = served
    (www / "f.bin").write_bytes(b"corrupted bytes")
    with pytest.raises(ValueError, match="checksum mismatch.*expected md5 0+"):
        download_file(f"{base}/f.bin", tmp_path / "f.bin", "0" * 32, progress=False)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_unreachable_url_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="data.url"):
        download_file("http://127.0.0.1:9/none.tar.gz", tmp_path / "x.tar.gz", "0" * 32, progress=False, timeout=2)


def test_npz_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 3, 16, 16)).astype(np.float32)  # NCHW floats in [0,1], another size
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    ds = load_source("npz", root=tmp_path, path=tmp_path / "d.npz", test_fraction=0.25)
    assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (10, 32, 32, 3) and ds.x_train.dtype == np.uint8
    np.savez(tmp_path / "bad.npz", x_train=x)
    with pytest.raises(ValueError, match="lacks \\['y_train'\\]"):
        load_source("npz", root=tmp_path, path=tmp_path / "bad.npz")


def test_folder_source(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    ds = load_source("folder", root=tmp_path, path=tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.x_train.shape == (8, 32, 32, 3) and list(ds.y_test) == [0, 0, 1, 1]


def test_paper_split_is_stratified_and_deterministic() -> None:
    y = np.repeat(np.arange(10), 50)
    tr, va = loss_predictor_split(y)
    assert len(va) == 100 and len(tr) == 400 and not set(tr) & set(va)
    assert np.bincount(y[va]).tolist() == [10] * 10
    np.testing.assert_array_equal(tr, loss_predictor_split(y)[0])
    idx = subsample_stratified(y, 100, seed=0)
    assert np.bincount(y[idx]).tolist() == [10] * 10


@pytest.fixture(scope="module")
def digits_splits() -> dict:
    ds = load_source("digits", root=Path("."))
    tr, va = loss_predictor_split(ds.y_train)
    return {"train_loss": (ds.x_train[tr], ds.y_train[tr]), "valid_loss": (ds.x_train[va], ds.y_train[va]), "test": (ds.x_test, ds.y_test)}


def test_validation_passes_on_good_splits_and_catches_bad_ones(digits_splits: dict, tmp_path: Path) -> None:
    pairs = [("train_loss", "valid_loss"), ("train_loss", "test")]
    report = validate_splits(digits_splits, 10, tmp_path / "ok.json", disjoint=pairs)
    assert report["success"] and (tmp_path / "ok.json").exists()

    x_te, y_te = digits_splits["test"]
    leaked = dict(digits_splits, test=(np.concatenate([x_te, digits_splits["train_loss"][0][:1]]), np.concatenate([y_te, [0]])))
    with pytest.raises(DataValidationError, match="train_loss\\|test: expect_column_values_to_be_unique") as err:
        validate_splits(leaked, 10, tmp_path / "leak.json", disjoint=pairs)
    assert str(tmp_path / "leak.json") in str(err.value)

    bad_label = dict(digits_splits, test=(x_te, np.where(np.arange(len(y_te)) == 0, 11, y_te)))
    with pytest.raises(DataValidationError, match="label"):
        validate_splits(bad_label, 10, tmp_path / "label.json")

    bad_dtype = dict(digits_splits, test=(x_te.astype(np.float32), y_te))
    with pytest.raises(DataValidationError, match="dtype"):
        validate_splits(bad_dtype, 10, tmp_path / "dtype.json")
