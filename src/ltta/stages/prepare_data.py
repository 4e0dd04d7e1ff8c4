"""Stage prepare_data: load the source, make the paper's splits, validate them, build the corruption benchmark.

Outputs (dvc.yaml): ``data/prepared/{train,test}.npz`` (uint8 NHWC images, int64 labels),
``data/prepared/splits.npz`` (train_loss / valid_loss indices into train), ``data/prepared/meta.json``,
``data/corrupted/test/<corruption>.npy`` + ``labels.npy`` in the CIFAR-10-C layout (generated, or
the official release's rows of the test split: ``corruptions.source``), and
``reports/data_validation.json`` (the Great Expectations report).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ltta import tracking
from ltta.config import Params
from ltta.corruptions import check_release_matches, copy_corruption_set, write_corruption_set
from ltta.data.corrupted_release import FetchedRelease, fetch_release
from ltta.data import check_prepared_splits, load_source, loss_predictor_split, subsample_stratified, validate_splits
from ltta.io import atomic_dir, save_npz, write_json
from ltta.runtime import resolve_device
from ltta.stages.base import Paths, mlflow_stage

STAGE = "prepare_data"


def _cap(y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of a stratified cap of ``n`` images (all of them, in order, without a cap)."""
    if n is None or n >= len(y):
        return np.arange(len(y))
    return subsample_stratified(y, n, seed)


def _fetch_release(params: Params) -> FetchedRelease | None:
    """The official corrupted release, downloaded and unpacked before anything is written (None: generated)."""
    c = params.corruptions
    if c.source != "official":
        return None
    return fetch_release(params.data.source, Path(params.data.root), list(c.names), url=c.url, md5=c.md5)


def run(params: Params, paths: Paths = Paths()) -> None:
    """Load, split, validate, corrupt; every output is complete or absent."""
    d = params.data
    device = resolve_device(params.device)
    with mlflow_stage(STAGE, params, ("data", "corruptions")):
        raw = load_source(
            d.source,
            root=Path(d.root),
            path=Path(d.path) if d.path else None,
            url=d.url,
            md5=d.md5,
            image_size=d.image_size,
            test_fraction=d.test_fraction,
            seed=params.seed,
        )
        release = _fetch_release(params)
        if release is not None:
            check_release_matches(release.folder, raw.y_test)
        keep_train = _cap(raw.y_train, d.max_train, params.seed)
        x_train, y_train = raw.x_train[keep_train], raw.y_train[keep_train]
        keep_test = _cap(raw.y_test, d.max_test, params.seed)
        x_test, y_test = raw.x_test[keep_test], raw.y_test[keep_test]
        check_prepared_splits(y_train, y_test, raw.classes, d.valid_loss_fraction)  # before anything is written
        train_loss, valid_loss = loss_predictor_split(y_train, valid_fraction=d.valid_loss_fraction, seed=params.seed)

        report_path = paths.reports / "data_validation.json"
        validate_splits(  # raises (after writing the report) when an expectation fails
            {
                "train_loss": (x_train[train_loss], y_train[train_loss]),
                "valid_loss": (x_train[valid_loss], y_train[valid_loss]),
                "test": (x_test, y_test),
            },
            num_classes=len(raw.classes),
            report_path=report_path,
            disjoint=[("train_loss", "valid_loss"), ("train_loss", "test"), ("valid_loss", "test")],
        )

        meta = {
            "source": d.source,
            "classes": list(raw.classes),
            "num_classes": len(raw.classes),
            "image_size": d.image_size,
            "n_train": int(len(y_train)),
            "n_train_loss": int(len(train_loss)),
            "n_valid_loss": int(len(valid_loss)),
            "n_test": int(len(y_test)),
            # Per-channel statistics of the training images: the models normalise with these.
            "mean": (x_train.reshape(-1, 3).mean(0) / 255.0).round(4).tolist(),
            "std": (x_train.reshape(-1, 3).std(0) / 255.0).round(4).tolist(),
            # Which corrupted set the benchmark holds: the report's protocol record names it.
            "corrupted": release.provenance() if release else {"source": "generated", "seed": params.seed},
        }
        with atomic_dir(paths.prepared) as out:
            save_npz(out / "train.npz", x=x_train, y=y_train)
            save_npz(out / "test.npz", x=x_test, y=y_test)
            save_npz(out / "splits.npz", train_loss=train_loss, valid_loss=valid_loss)
            write_json(out / "meta.json", meta)

        c = params.corruptions
        keep_c = _cap(y_test, c.max_images, params.seed)
        with atomic_dir(paths.corrupted) as out:
            if release is None:
                write_corruption_set(out, x_test[keep_c], y_test[keep_c], list(c.names), seed=params.seed, device=device,
                                     progress=True)
            else:  # the release corrupts the official test set in its order: keep our test images' rows
                copy_corruption_set(out, release.folder, list(c.names), keep_test[keep_c], y_test[keep_c])

        tracking.log_metrics({k: v for k, v in meta.items() if isinstance(v, int)})
        tracking.set_tags({f"ltta.corrupted.{k}": str(v) for k, v in meta["corrupted"].items()})
        tracking.log_artifacts([report_path, paths.prepared / "meta.json"])
