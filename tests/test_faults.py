"""The fault catalogue: one row per fault a user meets, each run through the real ``ltta`` command.

Every row copies the session's tiny pipeline workspace (every stage's outputs present, as after a
``dvc repro``), injects one fault (a bad param, a missing, truncated, crafted or inconsistent
file, a hostile archive served on 127.0.0.1, a full disk), runs the stage's command in process and
asserts: the exit code; one ``error:`` line on stderr naming the problem and the fix; and that the
stage's outputs (dvc.yaml's outs, metrics, plots) hash the same as before, none created, no
temporary left behind. A crafted pickle that would create a marker folder when unpickled must
leave no marker.

Checks already pinned closer to their code are listed in :data:`BY_REFERENCE` (test ids) rather
than repeated; a test here fails when one of them disappears.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ltta import cli
from tests.conftest import ROOT, copy_workspace, tiny_params

Inject = Callable[[Path, "Served"], None]


@dataclass(frozen=True)
class Served:
    """Files served over HTTP on 127.0.0.1 for the download rows: ``url(name)`` after ``put``."""

    base: str
    folder: Path

    def put(self, name: str, data: bytes) -> str:
        (self.folder / name).write_bytes(data)
        return f"{self.base}/{name}"


@dataclass(frozen=True)
class Fault:
    id: str
    command: str  # the ltta subcommand
    problem: str  # regex the error line must match: what is wrong, and where
    fix: str  # regex the error line must match: what to do
    inject: Inject = lambda ws, served: None
    params: dict = field(default_factory=dict)  # tiny_params overrides
    code: int = cli.EXIT_FAILURE
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # e.g. a writer that hits a full disk


# ---------------------------------------------------------------- fault makers

MARKER = "PWNED"  # the folder a crafted pickle creates when it is unpickled (it must never appear)


class _Exploit:
    """Unpickling this calls ``os.mkdir(marker)``: what a weights_only=False load would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def crafted(rel: str) -> Inject:
    def inject(ws: Path, served: Served) -> None:
        torch.save({"format": 1, "state_dict": _Exploit(str(ws / MARKER))}, ws / rel)

    return inject


def truncated(rel: str, keep: float = 0.5) -> Inject:
    def inject(ws: Path, served: Served) -> None:
        data = (ws / rel).read_bytes()
        (ws / rel).write_bytes(data[: int(len(data) * keep)])

    return inject


def removed(rel: str) -> Inject:
    def inject(ws: Path, served: Served) -> None:
        p = ws / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return inject


def edit_json(rel: str, change: Callable[[dict], None]) -> Inject:
    def inject(ws: Path, served: Served) -> None:
        doc = json.loads((ws / rel).read_text())
        change(doc)
        (ws / rel).write_text(json.dumps(doc))

    return inject


def edit_npz(rel: str, change: Callable[[dict[str, np.ndarray]], None]) -> Inject:
    def inject(ws: Path, served: Served) -> None:
        with np.load(ws / rel) as z:
            arrays = {k: z[k] for k in z.files}
        change(arrays)
        np.savez(ws / rel, **arrays)

    return inject


def user_npz(**arrays: np.ndarray) -> Inject:
    def inject(ws: Path, served: Served) -> None:
        np.savez(ws / "user.npz", **arrays)

    return inject


def both(*injects: Inject) -> Inject:
    def inject(ws: Path, served: Served) -> None:
        for f in injects:
            f(ws, served)

    return inject


def _set_op(doc: dict, key: str, value: object) -> None:
    doc["subpolicies"][0][0][key] = value


def _images(n: int, shape: tuple[int, ...] = (8, 8, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n: int) -> np.ndarray:
    return np.arange(n) % 2


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def _file(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), b"escaped"


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, b""


def cifar_archive(members: list[tuple[tarfile.TarInfo, bytes]], *, md5: str | None = None,
                  serve_bytes: int | None = None) -> Inject:
    """Serve a CIFAR-10 archive made of ``members`` and point params.yaml at it.

    The pinned md5 (data.md5) is the archive's own unless ``md5`` is given; ``serve_bytes``
    serves only the first bytes of it (a transfer cut short).
    """

    def inject(ws: Path, served: Served) -> None:
        data = _tar(members)
        url = served.put("cifar-10-python.tar.gz", data if serve_bytes is None else data[:serve_bytes])
        params = yaml.safe_load((ws / "params.yaml").read_text())
        params["data"].update(source="cifar10", url=url, md5=md5 or hashlib.md5(data).hexdigest())
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    return inject


FOLDER = "cifar-10-batches-py"
VALID_MEMBERS = [_file(f"{FOLDER}/data_batch_1")]


def full_disk(mp: pytest.MonkeyPatch) -> None:
    """A full disk: every atomic write of the run fails with ENOSPC after half its bytes.

    ``atomic_path`` / ``atomic_dir`` are patched wherever ltta imported them; the write itself
    happens as usual and then half of it is cut off and the error raised, before the rename.
    """
    import sys

    from ltta import io as lio

    def fail(tmp: Path) -> None:
        files = [tmp] if tmp.is_file() else sorted(q for q in tmp.rglob("*") if q.is_file())
        for f in files[:1]:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    def failing(real: Callable) -> Callable:
        @contextlib.contextmanager
        def writer(path: str | os.PathLike[str]) -> Iterator[Path]:
            with real(path) as tmp:
                yield tmp
                fail(tmp)

        return writer

    fakes = {name: (getattr(lio, name), failing(getattr(lio, name))) for name in ("atomic_path", "atomic_dir")}
    for module in [m for n, m in sys.modules.items() if n == "ltta" or n.startswith("ltta.")]:
        for name, (real, fake) in fakes.items():
            if getattr(module, name, None) is real:
                mp.setattr(module, name, fake)


# ---------------------------------------------------------------- the catalogue

CATALOGUE: list[Fault] = [
    # ---- prepare-data: params, user data, downloads and archives
    Fault("prepare/unknown-source", "prepare-data", r"data\.source", r"Input should be", params={"data": {"source": "mnist"}},
          code=cli.EXIT_USAGE),
    Fault("prepare/unknown-corruption", "prepare-data", r"corruptions\.names", r"known|choose|one of",
          params={"corruptions": {"names": ["gaussian_noise", "lens_flare"]}}, code=cli.EXIT_USAGE),
    Fault("prepare/npz-missing", "prepare-data", r"data\.path .*user\.npz is not a file", r"point it at an \.npz",
          params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/npz-wrong-shape", "prepare-data", r"expected images \[N,H,W,C\].*got shape \(10, 5\)", r"\[N,H,W,C\]",
          inject=user_npz(x_train=np.zeros((10, 5), np.uint8), y_train=_labels(10)),
          params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/npz-label-count", "prepare-data", r"9 labels but .* 10 images", r"exactly one label per image",
          inject=user_npz(x_train=_images(10), y_train=_labels(9)), params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/npz-nan-images", "prepare-data", r"NaN or inf", r"fix or drop those images",
          inject=user_npz(x_train=np.full((10, 8, 8, 3), np.nan, np.float32), y_train=_labels(10)),
          params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/npz-not-an-npz", "prepare-data", r"user\.npz is not an \.npz archive", r"numpy\.savez",
          inject=lambda ws, s: (ws / "user.npz").write_bytes(b"PK\x03\x04 not really a zip"),
          params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/folder-broken-image", "prepare-data", r"broken\.png is not a readable image", r"fix or remove it",
          inject=lambda ws, s: _image_folder(ws / "imgs"), params={"data": {"source": "folder", "path": "imgs"}}),
    # Data a classifier and the paper's splits cannot be made from: refused before anything is written.
    Fault("prepare/data-one-class", "prepare-data", r"npz: 1 class \(0\); a classifier needs at least 2 classes",
          r"add images of another class", inject=user_npz(x_train=_images(20), y_train=np.zeros(20, np.int64)),
          params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/data-too-few-to-split", "prepare-data",
          r"npz: 4 images split 3 train / 1 test at fraction 0\.2, but each side needs one image of each of the 2 classes",
          r"at least 6 images; add images or provide a test split, or change data\.test_fraction",
          inject=user_npz(x_train=_images(4), y_train=_labels(4)), params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/data-rare-class", "prepare-data", r"needs at least 2 images of every class; 1 class\(es\) have fewer: 2 \(1\)",
          r"add images or provide a test split, or drop those classes",
          inject=user_npz(x_train=_images(21), y_train=np.array([0] * 10 + [1] * 10 + [2])),
          params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/data-capped-below-the-split", "prepare-data",
          r"the training split: 14 images split 11 train_loss / 3 valid_loss .* each of the 4 classes: at least 16 images",
          r"add images or raise data\.max_train, or change data\.valid_loss_fraction",
          inject=user_npz(x_train=_images(40), y_train=np.arange(40) % 4, x_test=_images(8), y_test=np.arange(8) % 4),
          params={"data": {"source": "npz", "path": "user.npz", "max_train": 14}}),
    Fault("prepare/data-test-of-one-image", "prepare-data", r"the test split holds 1 image\(s\)",
          r"add test images or raise data\.max_test",
          inject=user_npz(x_train=_images(20), y_train=_labels(20), x_test=_images(1), y_test=np.array([0])),
          params={"data": {"source": "npz", "path": "user.npz"}}),
    Fault("prepare/folder-decompression-bomb", "prepare-data",
          r"huge\.png is refused by Pillow's decompression-bomb limit", r"downscale it .* otherwise remove it",
          inject=lambda ws, s: _bomb_folder(ws / "imgs"), params={"data": {"source": "folder", "path": "imgs"}}),
    Fault("prepare/full-disk", "prepare-data", r"no space left on device", r"free space .* and rerun", patch=full_disk),
    Fault("prepare/archive-wrong-checksum", "prepare-data", r"checksum mismatch for http://127\.0\.0\.1:\d+/cifar-10-python\.tar\.gz",
          r"deleted.*Rerun", inject=cifar_archive(VALID_MEMBERS, md5="0" * 32)),
    Fault("prepare/archive-cut-short", "prepare-data", r"checksum mismatch", r"deleted.*Rerun",
          inject=cifar_archive(VALID_MEMBERS * 40, md5=None, serve_bytes=60)),
    Fault("prepare/archive-truncated", "prepare-data", r"cifar-10-python\.tar\.gz could not be extracted", r"delete it and rerun",
          inject=lambda ws, s: cifar_archive([])(ws, s) or _truncate_served(ws, s)),
    Fault("prepare/archive-dotdot", "prepare-data", r"member\(s\) outside cifar-10-batches-py/.*'cifar-10-batches-py/\.\./\.\./escaped'",
          r"refusing to extract.*point data\.url at the official archive",
          inject=cifar_archive(VALID_MEMBERS + [_file(f"{FOLDER}/../../escaped")])),
    Fault("prepare/archive-absolute", "prepare-data", r"outside cifar-10-batches-py/.*'/tmp/escaped-abs'", r"refusing to extract",
          inject=cifar_archive(VALID_MEMBERS + [_file("/tmp/escaped-abs")])),
    Fault("prepare/archive-crafted-batch", "prepare-data",
          r"data_batch_1 is not a readable CIFAR batch \(it names posix\.mkdir, which no CIFAR batch holds",
          r"delete .* and its archive, and rerun", inject=lambda ws, s: cifar_archive(_crafted_batches(ws))(ws, s)),
    Fault("prepare/archive-symlink-out", "prepare-data", r"links or devices .*'cifar-10-batches-py/link -> \.\./\.\./\.\.'",
          r"refusing to extract", inject=cifar_archive(VALID_MEMBERS + [_symlink(f"{FOLDER}/link", "../../.."),
                                                                        _file(f"{FOLDER}/link/escaped")])),
    # ---- train-target
    Fault("target/prepared-missing", "train-target", r"data/prepared/train\.npz", r"prepare",
          inject=removed("data/prepared/train.npz")),
    Fault("target/prepared-truncated", "train-target", r"train\.npz", r"rerun|delete",
          inject=truncated("data/prepared/train.npz")),
    Fault("target/meta-classes", "train-target", r"meta\.json|classes", r"prepare",
          inject=edit_json("data/prepared/meta.json", lambda d: d.update(num_classes=3, classes=["0", "1", "2"]))),
    Fault("target/policy-unknown-op", "train-target", r"unknown op 'Twirl'", r"fix that entry, or delete .* rerun the search_policy",
          inject=edit_json("policies/faa.json", lambda d: _set_op(d, "op", "Twirl")),
          params={"train_target": {"mode": "policy", "policy": "policies/faa.json"}}),
    Fault("target/policy-prob-range", "train-target", r"prob must lie in \[0, 1\], got 1\.5", r"fix that entry",
          inject=edit_json("policies/faa.json", lambda d: _set_op(d, "prob", 1.5)),
          params={"train_target": {"mode": "policy", "policy": "policies/faa.json"}}),
    Fault("target/policy-level-range", "train-target", r"level must lie in \[0, 1\], got -0\.2", r"fix that entry",
          inject=edit_json("policies/faa.json", lambda d: _set_op(d, "level", -0.2)),
          params={"train_target": {"mode": "policy", "policy": "policies/faa.json"}}),
    Fault("target/diverges", "train-target", r"training diverged: non-finite loss .* at epoch 1, step \d+",
          r"Lower the learning rate", params={"train_target": {"lr": 1e30}}),
    Fault("target/full-disk", "train-target", r"no space left on device", r"free space .* and rerun",
          patch=full_disk),
    # ---- build-loss-dataset
    Fault("loss/target-missing", "build-loss-dataset", r"models/target\.pt does not exist", r"run the stage .*dvc repro",
          inject=removed("models/target.pt")),
    Fault("loss/target-crafted-pickle", "build-loss-dataset", r"models/target\.pt .*weights_only loading refused it.*posix\.mkdir",
          r"delete it and rerun its stage",
          inject=crafted("models/target.pt")),
    Fault("loss/target-truncated", "build-loss-dataset", r"models/target\.pt is not a readable model file", r"delete it and rerun",
          inject=truncated("models/target.pt")),
    Fault("loss/unknown-candidate", "build-loss-dataset", r"loss_dataset\.candidates", r"known|one of|choose",
          params={"loss_dataset": {"candidates": ["identity", "warp_drive"]}}, code=cli.EXIT_USAGE),
    # ---- train-predictor
    Fault("predictor/loss-missing", "train-predictor", r"data/loss/train\.npz does not exist", r"run the stage .*dvc repro",
          inject=removed("data/loss/train.npz")),
    Fault("predictor/loss-nan", "train-predictor", r"'losses' holds NaN or inf", r"rerun",
          inject=edit_npz("data/loss/train.npz", lambda a: a["losses"].__setitem__((0, 0), np.nan))),
    Fault("predictor/candidates-mismatch", "train-predictor", r"'losses' must be float \[\d+,23\] \(one column per candidate",
          r"rerun build_loss_dataset",
          inject=edit_json("data/loss/meta.json", lambda d: d.update(candidates=d["candidates"][:-1]))),
    Fault("predictor/full-disk", "train-predictor", r"no space left on device", r"free space .* and rerun",
          patch=full_disk),
    # ---- search-policy
    Fault("search/bad-storage-url", "search-policy", r"search_policy\.storage", r"sqlite|URL",
          params={"search_policy": {"storage": "nosuchdb://x"}}, code=cli.EXIT_USAGE),
    Fault("search/prepared-missing", "search-policy", r"data/prepared", r"prepare",
          inject=removed("data/prepared/meta.json")),
    # ---- search-gps
    Fault("gps/valid-missing", "search-gps", r"data/loss/valid\.npz does not exist", r"run the stage .*dvc repro",
          inject=removed("data/loss/valid.npz")),
    Fault("gps/target-crafted-pickle", "search-gps", r"models/target\.pt .*refused it", r"delete it and rerun its stage",
          inject=crafted("models/target.pt")),
    Fault("gps/full-disk", "search-gps", r"no space left on device", r"free space .* and rerun", patch=full_disk),
    # ---- fit-aggregation
    Fault("aggregation/valid-labels-out-of-range", "fit-aggregation", r"valid\.npz: labels span \[\d+, 99\]",
          r"rerun build_loss_dataset", inject=edit_npz("data/loss/valid.npz", lambda a: a["y"].__setitem__(0, 99))),
    Fault("aggregation/full-disk", "fit-aggregation", r"no space left on device", r"free space .* and rerun",
          patch=full_disk),
    # ---- evaluate
    Fault("evaluate/gps-policy-unknown-op", "evaluate", r"gps\.json: unknown op 'Twirl'", r"rerun the search_gps stage",
          inject=edit_json("policies/gps.json", lambda d: d["members"].__setitem__(0, {"ops": [{"op": "Twirl", "level": 0.5}],
                                                                                        "crop_flip": True}))),
    Fault("evaluate/aggregator-missing", "evaluate", r"aggregation_class\.pt", r"dvc repro",
          inject=removed("models/aggregation_class.pt")),
    Fault("evaluate/predictor-crafted-pickle", "evaluate", r"models/predictor\.pt .*refused it.*posix\.mkdir",
          r"delete it and rerun its stage",
          inject=crafted("models/predictor.pt")),
    Fault("evaluate/candidates-mismatch", "evaluate", r"trained on 24 candidates but loss_dataset\.candidates gives 12",
          r"retrain it .*dvc repro train_predictor", params={"loss_dataset": {"candidates": "paper"}}),
    Fault("evaluate/policy-unknown-op", "evaluate", r"faa\.json: sub-policy 0 op 0: unknown op 'Twirl'", r"fix that entry",
          inject=edit_json("policies/faa.json", lambda d: _set_op(d, "op", "Twirl"))),
    Fault("evaluate/empty-corrupted-set", "evaluate", r"gaussian_noise\.npy holds no images \(an empty corrupted set\)",
          r"regenerate it \(the prepare_data stage\)", inject=lambda ws, s: _empty_corrupted_set(ws, s)),
    Fault("evaluate/corrupted-labels-mismatch", "evaluate", r"labels\.npy has shape \(0,\) but .* has \d+ images",
          r"regenerate it", inject=lambda ws, s: np.save(ws / "data/corrupted/test/labels.npy", np.zeros(0, np.int64))),
    Fault("evaluate/corruption-truncated", "evaluate", r"gaussian_noise\.npy is not a readable \.npy", r"regenerate",
          inject=truncated("data/corrupted/test/gaussian_noise.npy", 0.3)),
    Fault("evaluate/target-crafted-pickle", "evaluate", r"models/target\.pt .*refused it", r"delete it and rerun its stage",
          inject=crafted("models/target.pt")),
    Fault("evaluate/full-disk", "evaluate", r"no space left on device", r"free space .* and rerun",
          params={"evaluate": {"methods": ["none", "learned"]}}, patch=full_disk),  # two methods: the writes are the point
]


def _empty_corrupted_set(ws: Path, served: Served) -> None:
    """Every corruption file and the labels with zero rows (a generation that kept no images)."""
    for f in (ws / "data/corrupted/test").glob("*.npy"):
        arr = np.load(f)
        np.save(f, arr[:0])


def _crafted_batches(ws: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Every file an official archive holds, the first batch a pickle that runs ``os.mkdir`` when loaded."""
    import pickle

    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    members = [(tarfile.TarInfo(f"{FOLDER}/{n}"), pickle.dumps({b"data": b"", b"labels": []})) for n in names]
    members[0] = (members[0][0], pickle.dumps(_Exploit(str(ws / MARKER)), protocol=2))
    return members


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` 1-bit pixels and holds no pixel data: Pillow
    reads the size when it opens the file, so its decompression-bomb check fires without decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _bomb_folder(root: Path) -> None:
    """Two class folders of real images, one of them holding a picture past Pillow's pixel limit."""
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(_images(1, seed=i)[0]).save(root / cls / f"{i}.png")
    (root / "b" / "huge.png").write_bytes(_png_header_only(20_000, 10_000))  # 2e8 pixels > 2 x 89,478,485


def _image_folder(root: Path) -> None:
    """Two class folders whose images are not images."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then junk")


def _truncate_served(ws: Path, served: Served) -> None:
    """Replace the served archive by its first half and pin that half's md5 (a truncated file, not a transfer)."""
    archive = served.folder / "cifar-10-python.tar.gz"
    half = _tar(VALID_MEMBERS * 40)[:200]
    archive.write_bytes(half)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["data"]["md5"] = hashlib.md5(half).hexdigest()
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


#: Bad-input checks pinned closer to their code (file::test): part of the catalogue by reference.
BY_REFERENCE = [
    "tests/test_data.py::test_checksum_mismatch_deletes_and_explains",
    "tests/test_data.py::test_unreachable_url_names_the_fix",
    "tests/test_data.py::test_corrupted_or_foreign_archive_is_a_clear_error",
    "tests/test_data.py::test_npz_refuses_what_it_cannot_read_unambiguously",
    "tests/test_data.py::test_npz_names_a_file_that_is_not_an_npz",
    "tests/test_data.py::test_folder_refuses_layouts_it_would_misread",
    "tests/test_data.py::test_validation_passes_on_good_splits_and_catches_bad_ones",
    "tests/test_data.py::test_validation_catches_starved_class_blank_images_and_bad_shapes",
    "tests/test_inputs.py::test_read_json_names_the_file_and_the_fix",
    "tests/test_inputs.py::test_truncated_npy_is_named",
    "tests/test_inputs.py::test_write_json_refuses_nan_and_leaves_nothing",
    "tests/test_inputs.py::test_atomic_path_sweeps_temporaries_of_killed_writers_only",
    "tests/test_inputs.py::test_prepared_images_are_checked_against_meta",
    "tests/test_inputs.py::test_the_target_must_know_the_prepared_classes",
    "tests/test_inputs.py::test_split_indices_stay_within_the_training_set",
    "tests/test_inputs.py::test_loss_dataset_columns_follow_its_candidates",
    "tests/test_inputs.py::test_a_damaged_search_storage_is_named",
    "tests/test_inputs.py::test_a_damaged_mlflow_store_is_named",
    "tests/test_inputs.py::test_a_model_file_that_does_not_rebuild_is_named",
    "tests/test_stages.py::test_prior_method_reads_the_predictors_training_means",
]


# ---------------------------------------------------------------- running a row


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("www")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{server.server_address[1]}", folder)
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@functools.cache
def stage_outputs() -> dict[str, list[str]]:
    """dvc.yaml's outs, metrics and plots per stage (the files a failed stage must leave as they were)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outputs: dict[str, list[str]] = {}
    for name, stage in stages.items():
        paths = []
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
        outputs[name] = paths
    return outputs


def snapshot(ws: Path, rels: list[str]) -> dict[str, str]:
    """A hash per output path (``absent`` when missing); a folder hashes its files' names and bytes."""
    out = {}
    for rel in rels:
        p = ws / rel
        if not p.exists():
            out[rel] = "absent"
            continue
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]:
            h.update(str(f.relative_to(ws)).encode() + b"\0" + f.read_bytes())
        out[rel] = h.hexdigest()
    return out


def run_command(command: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    with contextlib.chdir(ws):
        code = cli.main([command])
    return code, capsys.readouterr().err


@pytest.fixture
def workspace(tiny_pipeline: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the session's pipeline workspace whose MLflow store is its own."""
    ws = copy_workspace(tiny_pipeline[0], tmp_path / "ws")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    return ws


@pytest.mark.parametrize("fault", CATALOGUE, ids=[f.id for f in CATALOGUE])
def test_fault(fault: Fault, workspace: Path, served: Served, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> None:
    ws = workspace
    params = tiny_params(**fault.params)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fault.inject(ws, served)
    rels = stage_outputs()[cli.STAGE_COMMANDS[fault.command][0]]
    before = snapshot(ws, rels)
    if fault.patch is not None:
        fault.patch(monkeypatch)
    code, err = run_command(fault.command, ws, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert code == fault.code, err
    assert len(error_lines) == 1, err
    message = error_lines[0] if fault.code != cli.EXIT_USAGE else err  # params errors list each bad key below
    assert re.search(fault.problem, message), f"the problem is not named in:\n{err}"
    assert re.search(fault.fix, message), f"no fix in:\n{err}"
    assert snapshot(ws, rels) == before, "a failed stage changed or created an output"
    assert not list(ws.rglob("*.tmp")), "a temporary file was left behind"
    assert not (ws / MARKER).exists(), "a crafted pickle ran its code"
    assert not list(ws.parent.rglob("escaped*")) and not Path("/tmp/escaped-abs").exists(), "an archive wrote outside"


def test_the_catalogue_is_big_enough_and_covers_every_stage() -> None:
    commands = {f.command for f in CATALOGUE}
    assert len(CATALOGUE) >= 30
    assert commands >= {c for c, (m, _) in cli.STAGE_COMMANDS.items() if m in stage_outputs()}


def test_checks_listed_by_reference_exist() -> None:
    for ref in BY_REFERENCE:
        file, name = ref.split("::")
        tree = ast.parse((ROOT / file).read_text())
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{ref} is gone"


def test_no_source_file_unpickles_arbitrary_objects() -> None:
    """Model files travel between machines: every torch.load in src/ is weights_only=True."""
    offenders = []
    for f in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if "weights_only" in kw and not (isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
                elif "weights_only" not in kw and _is_torch_load(node):
                    offenders.append(f"{f.relative_to(ROOT)}:{node.lineno} (no weights_only)")
    assert offenders == []
    assert "weights_only=False" not in "".join(f.read_text() for f in (ROOT / "src").rglob("*.py"))


def _is_torch_load(node: ast.Call) -> bool:
    func = node.func
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "torch"


# ---------------------------------------------------------------- faults that need more than one run


class _Poisoned(torch.nn.Module):
    """A tiny classifier whose output turns NaN from its ``poison_from``-th training forward on
    (a divergence in the middle of a run); ``poison_from=None`` is the healthy model."""

    def __init__(self, poison_from: int | None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        self.poison_from, self.calls = poison_from, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.poison_from is not None and self.calls >= self.poison_from:
                out = out * float("nan")
        return out


def test_nan_mid_training_stops_at_the_step_keeps_the_last_good_epoch_and_resumes_with_a_lower_lr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ltta.training import TrainConfig, train_classifier

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    ckpt = tmp_path / "ckpt.pt"
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, augment="none", seed=0)  # 4 steps per epoch
    torch.manual_seed(0)
    model = _Poisoned(poison_from=6)  # epoch 2, step 2
    with pytest.raises(RuntimeError, match=r"non-finite loss \(nan\) at epoch 2, step 2 of 4 .*lower lr resumes from it"):
        train_classifier(model, x, y, cfg, checkpoint_path=ckpt, progress=False)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())
    good = {k: v.clone() for k, v in saved["model"].items()}

    model.poison_from = None  # the same architecture, now healthy; resumed with half the lr
    history = train_classifier(model, x, y, dataclasses.replace(cfg, lr=0.05), checkpoint_path=ckpt, progress=False)
    assert "resuming" in capsys.readouterr().err and [h["epoch"] for h in history] == [1, 2, 3]
    assert history[1]["lr"] < 0.05 and not torch.equal(model.net[1].weight.detach(), good["net.1.weight"])
    with pytest.raises(RuntimeError, match="different settings"):  # anything but the lr still refuses to resume
        train_classifier(model, x, y, dataclasses.replace(cfg, lr=0.05, weight_decay=0.0), checkpoint_path=ckpt,
                         progress=False)


def test_the_fold_model_cache_holds_state_dicts_and_refuses_a_crafted_pickle(tmp_path: Path) -> None:
    from ltta.search.model_cache import FoldModelCache

    def build() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))

    cache = FoldModelCache(tmp_path / "models", build)
    torch.manual_seed(0)
    model = build()
    model(torch.randn(8, 4))  # BN running stats are buffers: they travel too
    cache.save(0, "k", model)
    assert set(torch.load(cache.path(0, "k"), weights_only=True)) == {"state_dict"}
    loaded = cache.load(0, "k", torch.device("cpu"))
    assert not loaded.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    torch.save({"state_dict": _Exploit(str(tmp_path / MARKER))}, cache.path(1, "k"))
    with pytest.raises(RuntimeError, match=r"fold1-k\.pt is unreadable .*refused it.*posix\.mkdir.*delete it to retrain"):
        cache.load(1, "k", torch.device("cpu"))
    assert not (tmp_path / MARKER).exists()
    torch.save({"weights": 1}, cache.path(2, "k"))
    with pytest.raises(RuntimeError, match="not a fold-model file"):
        cache.load(2, "k", torch.device("cpu"))


# ---------------------------------------------------------------- two runs at once (slow: .ci/run runs them)

BIN = Path(sys.executable).parent


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.communicate()[0] if proc.poll() is not None else ""
            raise AssertionError(f"never saw {what} (exit {proc.poll()}):\n{out[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def prepared_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace holding prepare_data's outputs only (what train-target reads): seconds, where the
    whole pipeline's copy would first cost the session's pipeline run."""
    from ltta.config import parse_params
    from ltta.stages import prepare_data
    from ltta.stages.base import Paths

    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "conf" / "policies", ws / "conf" / "policies")  # train_target's policy dep
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    prepare_data.run(parse_params(tiny_params()), Paths(ws))
    return ws


@pytest.mark.slow
def test_a_second_run_of_a_stage_is_refused_while_the_first_finishes_intact(prepared_workspace: Path) -> None:
    """Two `ltta train-target` in one workspace: the second exits 1 naming the first's pid; the first
    is unaffected and its model loads."""
    from ltta.model_io import load_model_file

    workspace = prepared_workspace
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_params(train_target={"epochs": 4}), sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"}
    lock = workspace / "checkpoints" / ".locks" / "train-target.lock"
    first = subprocess.Popen([str(BIN / "ltta"), "train-target"], cwd=workspace, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: lock.is_file() and f"pid {first.pid}," in lock.read_text(), first, "the first run's lock")
        second = subprocess.run([str(BIN / "ltta"), "train-target"], cwd=workspace, env=env, text=True,
                                capture_output=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert re.search(rf"another `ltta train-target` \(pid {first.pid}, since .*\) is running in this workspace; "
                         r"wait for it", second.stderr), second.stderr
        out = first.communicate(timeout=300)[0]
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:]
    model, extra = load_model_file(workspace / "models" / "target.pt")
    assert extra and json.loads((workspace / "metrics" / "target.json").read_text())
    third = subprocess.run([str(BIN / "ltta"), "check-params"], cwd=workspace, env=env, capture_output=True, timeout=60)
    assert third.returncode == 0  # the lock went with its holder


@pytest.mark.slow
def test_a_second_dvc_repro_is_refused_and_corrupts_nothing(tmp_path: Path) -> None:
    """Two `dvc repro` in one workspace: DVC's lock refuses the second with its message; the first
    completes and `dvc status` is clean after it."""
    from tests.conftest import make_project

    project = make_project(tmp_path / "project", tiny_params())
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    first = subprocess.Popen([str(BIN / "dvc"), "repro", "prepare_data"], cwd=project, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lock = project / "checkpoints" / ".locks" / "prepare-data.lock"
        _wait_for(lock.is_file, first, "prepare-data running under dvc repro")
        second = subprocess.run([str(BIN / "dvc"), "repro", "prepare_data"], cwd=project, env=env, text=True,
                                capture_output=True, timeout=120)
        out = first.communicate(timeout=300)[0]
    finally:
        first.kill()
    assert second.returncode != 0
    assert re.search(r"lock|busy", second.stderr + second.stdout, re.I), second.stderr
    assert first.returncode == 0, out[-3000:]
    status = subprocess.run([str(BIN / "dvc"), "status", "prepare_data"], cwd=project, env=env, text=True,
                            capture_output=True, timeout=120)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
