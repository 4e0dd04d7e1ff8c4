"""Stage prepare_data: load the source, make the paper's splits, validate them, build the corruption benchmark.

Outputs (dvc.yaml): ``data/prepared/{train,test}.npz`` (uint8 NHWC images, int64 labels),
``data/prepared/splits.npz`` (train_loss / valid_loss indices into train), ``data/prepared/meta.json``,
``data/corrupted/test/<corruption>.npy`` + ``labels.npy`` in the CIFAR-10-C layout, and
``reports/data_validation.json`` (the Great Expectations report).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ltta import tracking
from ltta.config import Params
from ltta.corruptions import write_corruption_set
from ltta.data import check_prepared_splits, load_source, loss_predictor_split, subsample_stratified, validate_splits
from ltta.io import atomic_dir, save_npz, write_json
from ltta.runtime import resolve_device
from ltta.stages.base import Paths, mlflow_stage

STAGE = "prepare_data"


def _cap(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n is None or n >= len(y):
        return x, y
    idx = subsample_stratified(y, n, seed)
    return x[idx], y[idx]


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
        x_train, y_train = _cap(raw.x_train, raw.y_train, d.max_train, params.seed)
        x_test, y_test = _cap(raw.x_test, raw.y_test, d.max_test, params.seed)
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
        }
        with atomic_dir(paths.prepared) as out:
            save_npz(out / "train.npz", x=x_train, y=y_train)
            save_npz(out / "test.npz", x=x_test, y=y_test)
            save_npz(out / "splits.npz", train_loss=train_loss, valid_loss=valid_loss)
            write_json(out / "meta.json", meta)

        c = params.corruptions
        x_c, y_c = _cap(x_test, y_test, c.max_images, params.seed)
        with atomic_dir(paths.corrupted) as out:
            write_corruption_set(out, x_c, y_c, list(c.names), seed=params.seed, device=device, progress=True)

        tracking.log_metrics({k: v for k, v in meta.items() if isinstance(v, int)})
        tracking.log_artifacts([report_path, paths.prepared / "meta.json"])
