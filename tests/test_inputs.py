"""Inputs a stage did not write itself are checked and named; outputs are never half-written or NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ltta.io import atomic_path, open_npy, read_json, save_npz, write_json
from ltta.stages.base import Paths
from ltta.stages.inputs import (
    check_target_classes,
    labelled_images,
    loss_meta,
    loss_split,
    prepared_meta,
    split_indices,
)

META = {"source": "digits", "classes": ["a", "b", "c"], "num_classes": 3, "image_size": 8, "n_test": 4,
        "mean": [0.5] * 3, "std": [0.2] * 3}


def _images(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- io


def test_read_json_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    with pytest.raises(FileNotFoundError, match=r"meta.json does not exist: run the stage"):
        read_json(path)
    path.write_text('{"candidates": ["identity"')  # truncated
    with pytest.raises(ValueError, match=r"meta.json is not readable JSON .*delete it and rerun"):
        read_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        read_json(path)
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"lacks keys \['b'\]"):
        read_json(path, required=("a", "b"))
    assert read_json(path, required=("a",)) == {"a": 1}


def test_truncated_npy_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fog.npy"
    np.save(path, _images(10))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"fog.npy is not a readable .npy .*delete it and regenerate"):
        open_npy(path, redo="regenerate it")
    with pytest.raises(FileNotFoundError):
        open_npy(tmp_path / "absent.npy", redo="regenerate it")


def test_write_json_refuses_nan_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "predictor.json"
    write_json(path, {"spearman_rho": 0.25})  # the previous run's result
    with pytest.raises(ValueError, match=r"not writing .*predictor.json.*NaN or infinite"):
        write_json(path, {"spearman_rho": float("nan")})
    assert json.loads(path.read_text()) == {"spearman_rho": 0.25} and list(path.parent.iterdir()) == [path]


def test_atomic_path_sweeps_temporaries_of_killed_writers_only(tmp_path: Path) -> None:
    final = tmp_path / "target.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a finished process: its pid names a writer that is gone
    stale = tmp_path / f".target.pt.{dead.pid}.abc123.tmp"
    live = tmp_path / f".target.pt.{os.getpid()}.def456.tmp"  # ours, as if another write were under way
    other = tmp_path / f".other.pt.{dead.pid}.abc123.tmp"  # another output's: not ours to judge
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    with atomic_path(final) as tmp:
        assert tmp.name.startswith(f".target.pt.{os.getpid()}.")
        tmp.write_bytes(b"done")
    assert final.read_bytes() == b"done"
    assert not stale.exists() and live.exists() and other.exists()


# ---------------------------------------------------------------- stage inputs


def _prepared(tmp_path: Path, x: np.ndarray, y: np.ndarray, meta: dict | None = None) -> Paths:
    paths = Paths(tmp_path)
    save_npz(paths.prepared / "train.npz", x=x, y=y)
    (paths.prepared / "meta.json").write_text(json.dumps(meta or META))
    return paths


def test_prepared_images_are_checked_against_meta(tmp_path: Path) -> None:
    paths = _prepared(tmp_path, _images(6), np.array([0, 1, 2, 0, 1, 2]))
    meta = prepared_meta(paths)
    x, y = labelled_images(paths.prepared / "train.npz", meta)
    assert x.shape == (6, 8, 8, 3) and y.dtype == np.int64
    cases = [
        (_images(6, 16), np.zeros(6, int), r"'x' must be uint8 \[N,8,8,3\] images .* has uint8 \(6, 16, 16, 3\)"),
        (_images(6)[..., 0], np.zeros(6, int), r"'x' must be uint8"),
        (_images(6).astype(np.float32), np.zeros(6, int), r"has float32"),
        (_images(6), np.zeros(5, int), r"'y' must be integer labels \[6\]"),
        (_images(6), np.array([0, 1, 2, 3, 0, 1]), r"labels span \[0, 3\] but meta.json has 3 classes"),
        (_images(6), np.array([0, -1, 2, 0, 1, 2]), r"labels span \[-1, 2\]"),
    ]
    for x_bad, y_bad, match in cases:
        save_npz(paths.prepared / "train.npz", x=x_bad, y=y_bad)
        with pytest.raises(ValueError, match=match) as err:
            labelled_images(paths.prepared / "train.npz", meta)
        assert "train.npz" in str(err.value) and "rerun prepare_data" in str(err.value)
    (paths.prepared / "meta.json").write_text(json.dumps({k: v for k, v in META.items() if k != "std"}))
    with pytest.raises(ValueError, match=r"meta.json lacks keys \['std'\]"):
        prepared_meta(paths)


def test_the_target_must_know_the_prepared_classes(tmp_path: Path) -> None:
    target = tmp_path / "models" / "target.pt"
    check_target_classes(target, {"classes": ["a", "b", "c"]}, META)
    check_target_classes(target, {}, META)  # a model file without class names: nothing to compare
    with pytest.raises(ValueError, match=r"target.pt was trained on 2 classes \['a', 'b'\] but data/prepared has 3 .*rerun train_target"):
        check_target_classes(target, {"classes": ["a", "b"]}, META)
    many = {"classes": [str(i) for i in range(100)]}
    with pytest.raises(ValueError, match=r"100 classes \['0', .*'11', '...'\]"):
        check_target_classes(target, many, META)


def test_split_indices_stay_within_the_training_set(tmp_path: Path) -> None:
    path = tmp_path / "splits.npz"
    save_npz(path, train_loss=np.array([0, 1, 2]), valid_loss=np.array([3, 4]))
    assert split_indices(path, 5)["valid_loss"].tolist() == [3, 4]
    with pytest.raises(ValueError, match=r"'valid_loss' indexes \[3, 4\] but train.npz has 4 images"):
        split_indices(path, 4)
    save_npz(path, train_loss=np.array([0.0, 1.0]), valid_loss=np.array([3, 4]))
    with pytest.raises(ValueError, match=r"'train_loss' must be non-empty 1-D integer indices"):
        split_indices(path, 5)


def test_loss_dataset_columns_follow_its_candidates(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    path = paths.loss_data / "train.npz"
    (paths.loss_data).mkdir(parents=True)
    (paths.loss_data / "meta.json").write_text(json.dumps({"candidates": ["identity", "hflip", "zoom:0.8"], "identity_index": 0}))
    names = loss_meta(paths)["candidates"]
    losses = np.random.default_rng(1).random((4, 3)).astype(np.float32)
    save_npz(path, x=_images(4), losses=losses)
    x, got = loss_split(path, 8, len(names))
    assert x.shape == (4, 8, 8, 3) and np.array_equal(got, losses)
    save_npz(path, x=_images(4), losses=losses[:, :2])
    with pytest.raises(ValueError, match=r"'losses' must be float \[4,3\] .* has float32 \(4, 2\); rerun build_loss_dataset"):
        loss_split(path, 8, 3)
    losses[2, 1] = np.nan
    save_npz(path, x=_images(4), losses=losses)
    with pytest.raises(ValueError, match="NaN or inf"):
        loss_split(path, 8, 3)
    (paths.loss_data / "meta.json").write_text(json.dumps({"candidates": ["identity"], "identity_index": 4}))
    with pytest.raises(ValueError, match="'identity_index' 4 is not a column"):
        loss_meta(paths)


# ---------------------------------------------------------------- stores and the CLI


def test_a_damaged_search_storage_is_named(tmp_path: Path) -> None:
    from ltta.search import make_storage

    db = tmp_path / "search.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=r"search storage 'sqlite:///.*search.db' cannot be used .*search_policy.storage"):
        make_storage(f"sqlite:///{db}", attempts=1)


def test_a_damaged_mlflow_store_is_named(tmp_path: Path) -> None:
    import mlflow

    from ltta.tracking import open_experiment

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database" * 100)
    uri = f"sqlite:///{db}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(RuntimeError, match=r"the MLflow store sqlite:///.*mlflow.db cannot be read .*MLFLOW_TRACKING_URI"):
            open_experiment(uri, "ltta")
    finally:
        mlflow.set_tracking_uri(previous)


def test_cli_turns_an_unexpected_error_into_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ltta.cli import main
    from ltta.stages import evaluate

    root = Path(__file__).resolve().parents[1]

    def boom(params: object) -> None:
        raise IndexError("index 24 is out of bounds")

    monkeypatch.setattr(evaluate, "run", boom)
    monkeypatch.delenv("LTTA_DEBUG", raising=False)
    assert main(["evaluate", "--params", str(root / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: evaluate: unexpected IndexError: index 24 is out of bounds (LTTA_DEBUG=1 or `ltta --debug` prints the traceback)"
    ]
    assert main(["--debug", "evaluate", "--params", str(root / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("unexpected IndexError: index 24 is out of bounds")


def test_a_model_file_that_does_not_rebuild_is_named(tmp_path: Path) -> None:
    import torch

    from ltta.model_io import load_model_file, save_model_file
    from ltta.models import build_model

    path = tmp_path / "target.pt"
    save_model_file(path, build_model("small_cnn", num_classes=3, width=4), "small_cnn", {"num_classes": 3, "width": 4})
    assert load_model_file(path)[0](torch.zeros(1, 3, 8, 8)).shape == (1, 3)
    blob = torch.load(path, weights_only=True)
    for kwargs, arch in (({"num_classes": 5, "width": 4}, "small_cnn"), ({"num_classes": 3, "depth": 7}, "small_cnn"),
                         (blob["kwargs"], "no_such_net")):
        torch.save({**blob, "kwargs": kwargs, "arch": arch}, path)
        with pytest.raises(ValueError, match=rf"target.pt does not rebuild as '{arch}' .*rerun its stage"):
            load_model_file(path)
