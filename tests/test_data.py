"""Data sources (digits, CIFAR through the real download path on 127.0.0.1, .npz, folder), splits, validation."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
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

from tests.served import RangeHandler


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


@pytest.mark.parametrize(("kind", "url_form"), [("cifar10", "full"), ("cifar100", "base")])
def test_cifar_download_resume_and_parse(kind: str, url_form: str, served: tuple[str, Path], tmp_path: Path) -> None:
    base, www = served
    data, packed = _cifar_archive(kind, np.random.default_rng(0))
    name = "cifar-10-python.tar.gz" if kind == "cifar10" else "cifar-100-python.tar.gz"
    (www / name).write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    url = f"{base}/{name}" if url_form == "full" else f"{base}/"  # a full archive URL or a mirror's folder
    root = tmp_path / "raw"
    root.mkdir()
    (root / (name + ".part")).write_bytes(data[:100])  # an interrupted earlier download
    ds = load_source(kind, root=root, url=url, md5=md5)
    assert RangeHandler.requests == ["bytes=100-"], "the download did not resume"
    assert (root / name).read_bytes() == data and not (root / (name + ".part")).exists()
    np.testing.assert_array_equal(ds.x_train, packed["train_x"])
    np.testing.assert_array_equal(ds.y_train, packed["train_y"])
    np.testing.assert_array_equal(ds.x_test, packed["test_x"])
    np.testing.assert_array_equal(ds.y_test, packed["test_y"])
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.name == kind
    n_classes = 10 if kind == "cifar10" else 100
    assert ds.classes == [f"c{i}" for i in range(n_classes)]
    # A second load uses the verified archive and the extracted batches: no new request.
    again = load_source(kind, root=root, url=url, md5=md5, image_size=16)
    assert len(RangeHandler.requests) == 1 and again.x_train.shape == (len(packed["train_y"]), 16, 16, 3)


def test_download_restarts_when_range_is_ignored(served: tuple[str, Path], tmp_path: Path) -> None:
    base, www = served
    payload = bytes(range(256)) * 40
    (www / "f.bin").write_bytes(payload)
    RangeHandler.honour_range = False
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes from another file")
    out = download_file(f"{base}/f.bin", tmp_path / "f.bin", hashlib.md5(payload).hexdigest(), progress=False, chunk_size=1000)
    assert out.read_bytes() == payload and RangeHandler.requests == ["bytes=29-"]


def test_existing_file_is_checked_not_refetched(served: tuple[str, Path], tmp_path: Path) -> None:
    base, www = served
    (tmp_path / "f.bin").write_bytes(b"placed by hand")
    download_file(f"{base}/f.bin", tmp_path / "f.bin", hashlib.md5(b"placed by hand").hexdigest(), progress=False)
    assert RangeHandler.requests == []
    with pytest.raises(ValueError, match="exists but its md5 is .* delete it"):
        download_file(f"{base}/f.bin", tmp_path / "f.bin", "0" * 32, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == b"placed by hand", "a hand-placed file must never be deleted"


def test_checksum_mismatch_deletes_and_explains(served: tuple[str, Path], tmp_path: Path) -> None:
    base, www = served
    (www / "f.bin").write_bytes(b"corrupted bytes")
    url = f"{base}/f.bin"
    got = hashlib.md5(b"corrupted bytes").hexdigest()
    with pytest.raises(ValueError, match=f"checksum mismatch for {url}: expected md5 0{{32}}, got {got}.*Rerun"):
        download_file(url, tmp_path / "f.bin", "0" * 32, progress=False)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_unreachable_url_names_the_fix(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/none.tar.gz"
    with pytest.raises(RuntimeError, match=f"{url}.*data.url.*place it at"):
        download_file(url, tmp_path / "x.tar.gz", "0" * 32, progress=False, timeout=2)


def test_corrupted_or_foreign_archive_is_a_clear_error(served: tuple[str, Path], tmp_path: Path) -> None:
    base, www = served
    junk = b"this is not a gzip file" * 10
    (www / "cifar-10-python.tar.gz").write_bytes(junk)
    with pytest.raises(ValueError, match="could not be extracted.*delete it"):
        load_source("cifar10", root=tmp_path / "a", url=f"{base}/", md5=hashlib.md5(junk).hexdigest())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:  # a tar.gz without the batches
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        tar.addfile(info, io.BytesIO(b""))
    (www / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="lacks cifar-10-batches-py/.*data_batch_1.*not the official"):
        load_source("cifar10", root=tmp_path / "b", url=f"{base}/", md5=hashlib.md5(buf.getvalue()).hexdigest())
    assert not (tmp_path / "b" / "cifar-10-batches-py").exists(), "a failed extraction must leave nothing half-done"


def test_npz_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 3, 16, 16)).astype(np.float32)  # NCHW floats in [0,1], another size
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    ds = load_source("npz", root=tmp_path, path=tmp_path / "d.npz", test_fraction=0.25)
    assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (10, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert sorted(np.bincount(ds.y_test).tolist()) == [2, 2, 3, 3]  # stratified: 2.5 per class rounds to 2 or 3
    assert ds.classes == ["0", "1", "2", "3"]
    # Grayscale NHW uint8 with its own test split, at the native size: kept bit for bit, replicated to RGB.
    g = rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x_train=g[:8], y_train=np.arange(8) % 2, x_test=g[8:], y_test=np.arange(4) % 3)
    gs = load_source("npz", root=tmp_path, path=tmp_path / "g.npz")
    np.testing.assert_array_equal(gs.x_test[..., 1], g[8:])
    assert gs.classes == ["0", "1", "2"] and gs.y_train.dtype == np.int64
    # Floats in [0,255] NHWC are rounded, not rescaled.
    np.savez(tmp_path / "f.npz", x_train=g[..., None].astype(np.float64).repeat(3, -1), y_train=np.arange(12) % 2)
    fs = load_source("npz", root=tmp_path, path=tmp_path / "f.npz", test_fraction=0.5)
    assert sorted(map(bytes, np.concatenate([fs.x_train, fs.x_test])[..., 2])) == sorted(map(bytes, g))

    np.savez(tmp_path / "bad.npz", x_train=x)
    with pytest.raises(ValueError, match="lacks \\['y_train'\\]"):
        load_source("npz", root=tmp_path, path=tmp_path / "bad.npz")
    np.savez(tmp_path / "float_y.npz", x_train=x, y_train=y.astype(np.float32))
    with pytest.raises(ValueError, match="y_train must be integer labels of shape \\[40\\]"):
        load_source("npz", root=tmp_path, path=tmp_path / "float_y.npz")
    np.savez(tmp_path / "range.npz", x_train=x * 300, y_train=y)
    with pytest.raises(ValueError, match="x_train: pixel values must lie in"):
        load_source("npz", root=tmp_path, path=tmp_path / "range.npz")
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_source("npz", root=tmp_path, path=tmp_path / "missing.npz")


def _write_images(folder: Path, classes: tuple[str, ...], n: int, rng: np.random.Generator) -> None:
    from PIL import Image

    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")


def test_folder_source(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    _write_images(tmp_path / "split" / "train", ("dog", "cat"), 4, rng)
    _write_images(tmp_path / "split" / "test", ("dog", "cat"), 2, rng)
    ds = load_source("folder", root=tmp_path, path=tmp_path / "split")
    assert ds.classes == ["cat", "dog"] and ds.x_train.shape == (8, 32, 32, 3) and list(ds.y_test) == [0, 0, 1, 1]
    with Image.open(tmp_path / "split" / "test" / "cat" / "0.png") as im:
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(ds.x_test[0], expected)

    _write_images(tmp_path / "flat", ("a", "b", "c"), 5, rng)  # no train/test folders: stratified hold-out
    flat = load_source("folder", root=tmp_path, path=tmp_path / "flat", test_fraction=0.4, image_size=8)
    assert flat.x_test.shape == (6, 8, 8, 3) and np.bincount(flat.y_test).tolist() == [2, 2, 2]

    _write_images(tmp_path / "split" / "test", ("eel",), 1, rng)
    with pytest.raises(ValueError, match="test has class folders \\['cat', 'dog', 'eel'\\]"):
        load_source("folder", root=tmp_path, path=tmp_path / "split")


def test_npz_converts_unambiguous_layouts_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (6, 8, 8, 4), dtype=np.uint8)
    labels = np.array(["dog", "cat", "eel"] * 2)
    # RGBA in both layouts (alpha dropped); string labels become sorted class names.
    for name, x in (("nhwc", rgba), ("nchw", rgba.transpose(0, 3, 1, 2))):
        np.savez(tmp_path / f"{name}.npz", x_train=x, y_train=labels, x_test=x[:3], y_test=labels[:3].astype(bytes))
        ds = load_source("npz", root=tmp_path, path=tmp_path / f"{name}.npz", image_size=8)
        np.testing.assert_array_equal(ds.x_train, rgba[..., :3])
        assert ds.classes == ["cat", "dog", "eel"] and ds.y_train.tolist() == [1, 0, 2, 1, 0, 2] and ds.y_test.tolist() == [1, 0, 2]
    # Sparse label values keep their names; one-hot rows and a [N,1] column are read as class indices.
    x = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    sparse = np.array([3, 7, 9, 9, 7, 3])
    for y in (sparse, sparse[:, None], np.eye(10, dtype=np.float32)[sparse]):
        np.savez(tmp_path / "y.npz", x_train=x, y_train=y, x_test=x, y_test=sparse)
        ds = load_source("npz", root=tmp_path, path=tmp_path / "y.npz", image_size=8)
        assert ds.classes == ["3", "7", "9"] and ds.y_train.tolist() == [0, 1, 2, 2, 1, 0] == ds.y_test.tolist()
        np.testing.assert_array_equal(ds.x_train, x.repeat(3, -1))
    np.savez(tmp_path / "h.npz", x_train=x, y_train=sparse, meta=np.array([{"note": 1}], dtype=object))
    assert load_source("npz", root=tmp_path, path=tmp_path / "h.npz", image_size=8, test_fraction=0.5).classes == ["3", "7", "9"]


_X = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
_Y = np.arange(6) % 2


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x_train": _X.reshape(6, 3, 8, 8)[:, :, :, :3]}, "reads as \\[N,H,W,C\\] and as \\[N,C,H,W\\]"),
        ({"x_train": _X / 255 * 1.05}, "peak at 1.05.* neither \\[0,1\\].*clip to \\[0,1\\]"),
        ({"x_train": (_X > 128).astype(np.int64)}, "every pixel is 0 or 1.*x \\* 255"),
        ({"x_train": _X.astype(np.complex64)}, "images must be uint8, another integer type or float, got dtype complex64"),
        ({"y_train": np.eye(2)[_Y] * 0.8 + 0.1}, "y_train has shape \\(6, 2\\) but row 0 .* not one-hot"),
        ({"y_train": _Y[:5]}, "y_train has 5 labels but x_train has 6 images"),
        ({"x_test": _X}, "has x_test but not y_test"),
        ({"x_train": np.array(list(_X), dtype=object)}, "x_train is an object array"),
        ({"y_train": _Y - 1}, "negative labels .*unlabelled"),
    ],
    ids=["layout", "float_range", "binary", "complex", "soft_one_hot", "length", "x_test_alone", "object", "negative"],
)
def test_npz_refuses_what_it_cannot_read_unambiguously(arrays: dict, match: str, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", **({"x_train": _X, "y_train": _Y} | arrays))
    with pytest.raises(ValueError, match=match):
        load_source("npz", root=tmp_path, path=tmp_path / "d.npz", image_size=8)


def test_npz_names_a_file_that_is_not_an_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", _X)
    with pytest.raises(ValueError, match="d.npy is not an .npz archive"):
        load_source("npz", root=tmp_path, path=tmp_path / "d.npy")


def test_folder_reads_png_modes_and_skips_junk(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    grey16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "a" / "0.png")  # 16-bit grey: PIL's convert would clip it to white
    rgb = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # non-square: stretched
    Image.fromarray(rgb).save(tmp_path / "a" / "1.TIF")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "b" / "0.PNG")
    Image.fromarray(rgb).convert("P").save(tmp_path / "b" / "1.png")
    Image.fromarray(rgb).save(tmp_path / "b" / "2.JPEG")
    for junk in ("a/._0.png", "a/.DS_Store", "b/Thumbs.db", "b/notes.txt"):  # macOS AppleDouble, Finder, Windows
        (tmp_path / junk).write_bytes(b"\0\5\26\7 not an image")
    ds = load_source("folder", root=tmp_path, path=tmp_path, image_size=8, test_fraction=0.4)
    x, y = np.concatenate([ds.x_train, ds.x_test]), np.concatenate([ds.y_train, ds.y_test])
    assert ds.classes == ["a", "b"] and np.bincount(y).tolist() == [2, 3]
    grey = [i for i in np.flatnonzero(y == 0) if (x[i, ..., 0] == x[i, ..., 2]).all()]
    np.testing.assert_array_equal(x[grey[0], ..., 0], (grey16 >> 8).astype(np.uint8))


def _tiny_png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (["a/0.png", "a/1.png", "b/0.png", "b/batch2/1.png"], "b/batch2 is a folder inside class folder .*move their images up"),
        (["train/a/0.png", "train/b/0.png", "val/a/0.png", "val/b/0.png"], "has train/ holding class folders but not both train/ and test/"),
        (["train/a/0.png", "train/b/0.png", "test/a/0.png", "test/b/notes.txt"], "class folder .*test/b has no images \\(skipped \\['notes.txt'\\]\\)"),
        (["a/0.png", "a/1.png", "b/0.png", "b/1.png", "b/link.png -> gone.png"], "b/link.png is a broken symlink"),
        (["a/0.png", "a/1.png", "b/0.png", "b/1.tiff float"], "b/1.tiff: mode F .*no fixed range"),
    ],
    ids=["nested", "train_val", "empty_test_class", "broken_symlink", "float_tiff"],
)
def test_folder_refuses_layouts_it_would_misread(layout: list[str], match: str, tmp_path: Path) -> None:
    from PIL import Image

    for entry in layout:
        path = tmp_path / entry.split(" ")[0]
        if " -> " in entry:
            path.symlink_to(tmp_path / entry.split(" -> ")[1])
        elif entry.endswith(" float"):
            Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path)
        elif path.suffix == ".png":
            _tiny_png(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("notes")
    with pytest.raises(ValueError, match=match):
        load_source("folder", root=tmp_path, path=tmp_path, image_size=8, test_fraction=0.5)


def test_paper_split_is_stratified_and_deterministic() -> None:
    from sklearn.model_selection import StratifiedShuffleSplit

    y = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(y)
    tr, va = loss_predictor_split(y)
    assert len(va) == 100 and len(tr) == 400 and not set(tr) & set(va)
    assert np.bincount(y[va]).tolist() == [10] * 10 and np.all(np.diff(tr) > 0)
    # The reference's definition: first split of StratifiedShuffleSplit(5, test_size=0.2, random_state=0).
    ref_tr, ref_va = next(StratifiedShuffleSplit(n_splits=5, test_size=0.2, random_state=0).split(y, y))
    np.testing.assert_array_equal(va, np.sort(ref_va))
    np.testing.assert_array_equal(tr, np.sort(ref_tr))
    assert not np.array_equal(va, loss_predictor_split(y, seed=1)[1])
    idx = subsample_stratified(y, 100, seed=0)
    assert np.bincount(y[idx]).tolist() == [10] * 10
    np.testing.assert_array_equal(idx, subsample_stratified(y, 100, seed=0))
    assert not np.array_equal(idx, subsample_stratified(y, 100, seed=1))
    np.testing.assert_array_equal(subsample_stratified(y, 10_000), np.arange(500))


@pytest.fixture(scope="module")
def digits_splits() -> dict:
    ds = load_source("digits", root=Path("."))
    tr, va = loss_predictor_split(ds.y_train)
    return {"train_loss": (ds.x_train[tr], ds.y_train[tr]), "valid_loss": (ds.x_train[va], ds.y_train[va]), "test": (ds.x_test, ds.y_test)}


def _failed(report_path: Path) -> list[tuple[str, str, str]]:
    report = json.loads(report_path.read_text())
    assert report["success"] is False
    return [(r["split"], r["expectation"], r["kwargs"].get("column", "")) for r in report["expectations"] if not r["success"]]


def test_validation_passes_on_good_splits_and_catches_bad_ones(digits_splits: dict, tmp_path: Path) -> None:
    pairs = [("train_loss", "valid_loss"), ("train_loss", "test"), ("valid_loss", "test")]
    report = validate_splits(digits_splits, 10, tmp_path / "ok.json", disjoint=pairs)
    assert report["success"] and json.loads((tmp_path / "ok.json").read_text()) == report
    assert report["splits"]["test"]["n"] == 360 and sum(report["splits"]["train_loss"]["class_counts"]) == 1149
    assert all(r["success"] for r in report["expectations"]) and len(report["expectations"]) == 3 * 12 + 3

    x_te, y_te = digits_splits["test"]
    leaked = dict(digits_splits, test=(np.concatenate([x_te, digits_splits["train_loss"][0][:1]]), np.concatenate([y_te, [0]])))
    with pytest.raises(DataValidationError, match="train_loss\\|test: expect_column_values_to_be_unique\\(hash\\)") as err:
        validate_splits(leaked, 10, tmp_path / "leak.json", disjoint=pairs)
    assert str(tmp_path / "leak.json") in str(err.value)
    assert _failed(tmp_path / "leak.json") == [("train_loss|test", "expect_column_values_to_be_unique", "hash")]

    bad_label = dict(digits_splits, test=(x_te, np.where(np.arange(len(y_te)) == 0, 11, y_te)))
    with pytest.raises(DataValidationError, match="test: expect_column_values_to_be_in_set\\(label\\) -> 1 unexpected, e.g. \\[11\\]"):
        validate_splits(bad_label, 10, tmp_path / "label.json")
    assert _failed(tmp_path / "label.json") == [("test", "expect_column_values_to_be_in_set", "label")]

    bad_dtype = dict(digits_splits, test=(x_te.astype(np.float32), y_te))
    with pytest.raises(DataValidationError, match="dtype"):
        validate_splits(bad_dtype, 10, tmp_path / "dtype.json")
    assert _failed(tmp_path / "dtype.json") == [("test", "expect_column_values_to_be_in_set", "dtype")]


def test_validation_catches_starved_class_blank_images_and_bad_shapes(digits_splits: dict, tmp_path: Path) -> None:
    x, y = digits_splits["valid_loss"]
    keep = (y != 3) | (np.cumsum(y == 3) <= 2)  # class 3 keeps 2 of ~29 images: under half a fair share
    blank = x.copy()
    blank[:10] = 0
    splits = {"starved": (x[keep], y[keep]), "blank": (blank, y), "gray": (x[..., :1], y), "floaty": (x, y.astype(np.float64))}
    with pytest.raises(DataValidationError, match="report: "):
        validate_splits(splits, 10, tmp_path / "r.json")
    failed = _failed(tmp_path / "r.json")
    assert ("starved", "expect_column_values_to_be_between", "count") in failed
    assert ("blank", "expect_column_values_to_be_between", "std") in failed
    assert ("gray", "expect_column_values_to_be_in_set", "shape") in failed
    assert ("floaty", "expect_column_values_to_be_in_set", "label_dtype") in failed
    assert len(failed) == 4


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.5])
@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_the_split_minimum_is_what_scikit_learn_can_split(num_classes: int, fraction: float) -> None:
    """``min_images_to_split`` is exact: scikit-learn's stratified split works there and fails one below."""
    from sklearn.model_selection import StratifiedShuffleSplit

    from ltta.data.splits import check_splittable, min_images_to_split

    def labels(n: int) -> np.ndarray:
        return np.arange(n) % num_classes

    need = min_images_to_split(num_classes, fraction)
    classes = [str(c) for c in range(num_classes)]
    kw = {"what": "t", "kept": "a", "held_out": "b", "fix": "add images", "fraction_key": "f"}
    check_splittable(labels(need), classes, fraction, **kw)
    next(StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=0).split(np.zeros(need), labels(need)))
    # one below: too few in all, or (at 2 per class) a class with a single image
    with pytest.raises(ValueError, match=f"at least ({need} images; add images, or change f|2 images of every class)"):
        check_splittable(labels(need - 1), classes, fraction, **kw)
    with pytest.raises(ValueError):
        next(StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=0).split(np.zeros(need - 1), labels(need - 1)))
