"""The official CIFAR-10-C / CIFAR-100-C releases through their real download path (served on
127.0.0.1): fetched, checked, unpacked, and turned into the benchmark of prepare_data's test split."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ltta.config import OFFICIAL_CORRUPTED, ParamsError, parse_params
from ltta.corruptions import read_corruption
from ltta.data.corrupted_release import RELEASES, fetch_release, unpack_release
from ltta.stages import prepare_data
from ltta.stages.base import Paths
from tests.conftest import tiny_params
from tests.served import RangeHandler

NAMES = ["fog", "contrast"]
N_TRAIN, N_TEST = 120, 40  # 10 classes: 12 and 4 images each


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _cifar10(rng: np.random.Generator) -> tuple[bytes, dict[str, np.ndarray]]:
    """A small CIFAR-10 archive in the official python layout, every class in both splits."""
    y_train, y_test = np.arange(N_TRAIN) % 10, rng.permutation(np.arange(N_TEST) % 10)
    x_train = rng.integers(0, 256, (N_TRAIN, 3072), dtype=np.uint8)
    x_test = rng.integers(0, 256, (N_TEST, 3072), dtype=np.uint8)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i, chunk in enumerate(np.array_split(np.arange(N_TRAIN), 5), start=1):
            _add(tar, f"cifar-10-batches-py/data_batch_{i}", pickle.dumps({b"data": x_train[chunk], b"labels": y_train[chunk].tolist()}))
        _add(tar, "cifar-10-batches-py/test_batch", pickle.dumps({b"data": x_test, b"labels": y_test.tolist()}))
        _add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return buf.getvalue(), {"x_test": x_test.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), "y_test": y_test}


def _release(y_test: np.ndarray, rng: np.random.Generator, *, folder: str = "CIFAR-10-C",
             extra: dict[str, bytes] | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """A release tar in the Zenodo layout: ``<folder>/<name>.npy`` [5N,32,32,3] and labels.npy (uint8, x5)."""
    arrays = {name: rng.integers(0, 256, (5 * len(y_test), 32, 32, 3), dtype=np.uint8) for name in NAMES}
    arrays["labels"] = np.tile(y_test.astype(np.uint8), 5)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for name, array in arrays.items():
            _add(tar, f"{folder}/{name}.npy", _npy(array))
        for name, data in (extra or {}).items():
            _add(tar, name, data)
    return buf.getvalue(), arrays


@pytest.fixture()
def served_cifar10(served: tuple[str, Path]) -> tuple[str, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """CIFAR-10 and its corrupted release on the loopback server: (base URL, www folder, clean, release)."""
    base, www = served
    rng = np.random.default_rng(0)
    clean_archive, clean = _cifar10(rng)
    release_archive, release = _release(clean["y_test"], rng)
    (www / "cifar-10-python.tar.gz").write_bytes(clean_archive)
    (www / "CIFAR-10-C.tar").write_bytes(release_archive)
    return base, www, clean, release


def _params(base: str, www: Path, root: Path, **corruptions: object) -> dict:
    raw = tiny_params(corruptions={"names": NAMES, "source": "official", "url": f"{base}/",
                                   "md5": hashlib.md5((www / "CIFAR-10-C.tar").read_bytes()).hexdigest(), **corruptions})
    raw["data"].update(source="cifar10", root=str(root / "raw"), url=f"{base}/", max_train=None, max_test=None,
                       md5=hashlib.md5((www / "cifar-10-python.tar.gz").read_bytes()).hexdigest())
    return raw


def test_the_registry_and_the_params_name_the_same_releases() -> None:
    assert tuple(RELEASES) == OFFICIAL_CORRUPTED
    assert RELEASES["cifar10"].md5 == "56bf5dcef84df0e2308c6dcbcbbd8499"  # as Zenodo record 2535967 lists it
    assert RELEASES["cifar100"].md5 == "11f0ed0f1191edbf9fa23466ae6021d3"  # and record 3555552


@pytest.mark.parametrize(("data", "match"), [({"source": "digits"}, "needs data.source in"),
                                             ({"source": "cifar10", "image_size": 64}, "holds 32 px images")])
def test_params_refuse_a_release_for_other_data(data: dict, match: str) -> None:
    raw = tiny_params(corruptions={"source": "official"})
    raw["data"].update(data)
    with pytest.raises(ParamsError, match=match):
        parse_params(raw)


def test_prepare_data_holds_the_releases_rows_of_its_test_split(served_cifar10: tuple, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base, www, clean, release = served_cifar10
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths = Paths(tmp_path / "ws")
    # A capped test split and a capped benchmark: the rows kept must be those very images, in every severity.
    raw = _params(base, www, tmp_path, max_images=10)
    raw["data"]["max_test"] = 30
    prepare_data.run(parse_params(raw), paths)

    test = np.load(paths.prepared / "test.npz")
    rows = [int(np.flatnonzero((clean["x_test"] == img).all(axis=(1, 2, 3)))[0]) for img in test["x"]]
    assert len(set(rows)) == 30
    for name in NAMES:
        for s in (1, 5):
            images, labels = read_corruption(paths.corrupted, name, severity=s)
            # Each kept row is one of the test split's images, at that severity, with its label.
            found = [int(np.flatnonzero((release[name][(s - 1) * N_TEST:s * N_TEST] == img).all(axis=(1, 2, 3)))[0])
                     for img in images]
            assert set(found) <= set(rows) and len(set(found)) == 10
            np.testing.assert_array_equal(labels, clean["y_test"][found])
    meta = json.loads((paths.prepared / "meta.json").read_text())
    assert meta["corrupted"]["source"] == "official" and meta["corrupted"]["archive"] == "CIFAR-10-C.tar"
    assert meta["corrupted"]["md5"] == hashlib.md5((www / "CIFAR-10-C.tar").read_bytes()).hexdigest()
    assert meta["corrupted"]["record"] == "10.5281/zenodo.2535967"

    import mlflow

    run = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name(raw["tracking"]["experiment"]).experiment_id])[0]
    assert run.data.tags["ltta.corrupted.source"] == "official"
    assert run.data.tags["ltta.corrupted.md5"] == meta["corrupted"]["md5"]


def test_a_release_of_another_test_set_is_refused_before_anything_is_written(served_cifar10: tuple, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base, www, clean, _ = served_cifar10
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    shuffled, _ = _release(clean["y_test"][::-1].copy(), np.random.default_rng(1))  # labels in another order
    (www / "CIFAR-10-C.tar").write_bytes(shuffled)
    paths = Paths(tmp_path / "ws")
    with pytest.raises(ValueError, match="does not hold this test set's labels in its order"):
        prepare_data.run(parse_params(_params(base, www, tmp_path)), paths)
    assert not (tmp_path / "ws" / "data").exists()


def test_unpacking_resumes_and_refuses_a_crafted_archive(tmp_path: Path) -> None:
    y = np.arange(20) % 10
    data, arrays = _release(y, np.random.default_rng(0))
    archive = tmp_path / "CIFAR-10-C.tar"
    archive.write_bytes(data)
    folder = unpack_release(archive, tmp_path, "CIFAR-10-C", NAMES)
    np.testing.assert_array_equal(np.load(folder / "fog.npy"), arrays["fog"])
    # A killed unpacking left a short file under a temporary name only; a rerun redoes only what is missing.
    (folder / "fog.npy").unlink()
    (folder / ".fog.npy.partial").write_bytes(b"short")
    kept = (folder / "contrast.npy").stat().st_mtime_ns
    unpack_release(archive, tmp_path, "CIFAR-10-C", NAMES)
    np.testing.assert_array_equal(np.load(folder / "fog.npy"), arrays["fog"])
    assert (folder / "contrast.npy").stat().st_mtime_ns == kept and not (folder / ".fog.npy.partial").exists()

    with pytest.raises(ValueError, match=r"lacks CIFAR-10-C/\{snow.npy\}"):
        unpack_release(archive, tmp_path, "CIFAR-10-C", ["snow"])
    crafted, _ = _release(y, np.random.default_rng(0), extra={"../evil.npy": b"x"})
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "CIFAR-10-C.tar"
    bad.write_bytes(crafted)
    with pytest.raises(ValueError, match="refusing to extract it"):
        unpack_release(bad, tmp_path / "bad", "CIFAR-10-C", NAMES)
    assert not (tmp_path / "bad" / "CIFAR-10-C").exists() and not (tmp_path / "evil.npy").exists()


def test_fetch_resumes_a_download_and_names_a_bad_checksum(served: tuple[str, Path], tmp_path: Path) -> None:
    base, www = served
    data, arrays = _release(np.arange(20) % 10, np.random.default_rng(0), folder="CIFAR-100-C")
    (www / "CIFAR-100-C.tar").write_bytes(data)
    root = tmp_path / "raw"
    root.mkdir()
    (root / "CIFAR-100-C.tar.part").write_bytes(data[:1000])
    got = fetch_release("cifar100", root, NAMES, url=f"{base}/", md5=hashlib.md5(data).hexdigest(), progress=False)
    assert RangeHandler.requests == ["bytes=1000-"]
    np.testing.assert_array_equal(np.load(got.folder / "labels.npy"), arrays["labels"])
    assert got.provenance()["url"] == f"{base}/CIFAR-100-C.tar" and got.provenance()["record"] == "10.5281/zenodo.3555552"
    with pytest.raises(ValueError, match="exists but its md5 is"):  # the record's md5, not this file's
        fetch_release("cifar100", root, NAMES, url=f"{base}/", progress=False)
    (root / "CIFAR-100-C.tar").unlink()
    with pytest.raises(ValueError, match="expected md5 11f0ed0f1191edbf9fa23466ae6021d3.*point corruptions.url at the official"):
        fetch_release("cifar100", root, NAMES, url=f"{base}/", progress=False)
    assert not (root / "CIFAR-100-C.tar").exists() and not (root / "CIFAR-100-C.tar.part").exists()
    with pytest.raises(ValueError, match="no official corrupted release for data source 'digits'"):
        fetch_release("digits", root, NAMES)
