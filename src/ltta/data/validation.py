"""Data contracts at the boundary, checked with Great Expectations before any training.

Each split is summarised as one row per image (label, content hash, pixel range and spread,
shape, dtype) and checked against an expectation suite: uint8 [H,W,3] images in [0,255] that are
not constant, labels in the label set, every class present and none starved, and no image shared
by two splits declared disjoint. A failure writes the report and stops with its path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ltta.io import write_json


class DataValidationError(ValueError):
    """A data contract failed; the message lists the failed expectations and the report's path."""


def image_table(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """One row per image: what the expectations look at."""
    n = len(x)
    flat = x.reshape(n, -1) if x.ndim >= 2 else x.reshape(n, 1)
    shape = "x".join(str(s) for s in x.shape[1:])
    return pd.DataFrame(
        {
            "label": np.asarray(y).astype(np.int64) if np.issubdtype(np.asarray(y).dtype, np.integer) else np.asarray(y),
            "hash": [hashlib.sha1(row.tobytes()).hexdigest() for row in np.ascontiguousarray(flat)],
            "min": flat.min(1).astype(np.float64),
            "max": flat.max(1).astype(np.float64),
            "std": flat.astype(np.float32).std(1).astype(np.float64),
            "shape": shape,
            "ndim": x.ndim,
            "dtype": str(x.dtype),
        }
    )


def _suite(gx: Any, name: str, num_classes: int, image_shape: str) -> Any:
    e = gx.expectations
    classes = list(range(num_classes))
    suite = gx.ExpectationSuite(name=name)
    for exp in (
        e.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        e.ExpectColumnValuesToBeInSet(column="ndim", value_set=[4]),
        e.ExpectColumnValuesToBeInSet(column="shape", value_set=[image_shape]),
        e.ExpectColumnValuesToBeBetween(column="min", min_value=0, max_value=255),
        e.ExpectColumnValuesToBeBetween(column="max", min_value=0, max_value=255),
        e.ExpectColumnValuesToBeBetween(column="std", min_value=0, strict_min=True),
        e.ExpectColumnValuesToNotBeNull(column="label"),
        e.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
        e.ExpectColumnDistinctValuesToContainSet(column="label", value_set=classes),
    ):
        suite.add_expectation(exp)
    return suite


def _batch(context: Any, name: str, df: pd.DataFrame) -> Any:
    asset = context.data_sources.add_pandas(f"src_{name}").add_dataframe_asset(name=name)
    return asset.add_batch_definition_whole_dataframe(f"all_{name}").get_batch(batch_parameters={"dataframe": df})


def _record(split: str, result: Any) -> dict[str, Any]:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in dict(cfg.kwargs).items() if k not in ("batch_id",)}
    observed = {k: v for k, v in dict(result.result).items() if k in ("observed_value", "unexpected_count", "unexpected_percent", "partial_unexpected_list")}
    return {"split": split, "expectation": cfg.type, "kwargs": kwargs, "success": bool(result.success), "result": observed}


def validate_splits(
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    report_path: Path,
    *,
    disjoint: Sequence[tuple[str, str]] = (),
    min_class_share: float = 0.5,
) -> dict[str, Any]:
    """Check every split and every declared-disjoint pair; write the JSON report; raise on failure."""
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    records: list[dict[str, Any]] = []
    tables: dict[str, pd.DataFrame] = {}
    for split, (x, y) in splits.items():
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            records.append({"split": split, "expectation": "images_match_labels", "kwargs": {}, "success": False,
                            "result": {"observed_value": f"{len(x)} images, {len(y)} labels"}})
            continue
        df = image_table(x, y)
        tables[split] = df
        image_shape = "x".join(str(s) for s in x.shape[1:3]) + "x3"
        suite = _suite(gx, f"split_{split}", num_classes, image_shape)
        result = _batch(context, split, df).validate(suite)
        records.extend(_record(split, r) for r in result.results)
        if min_class_share > 0 and len(df):
            # Class balance: the rarest class holds at least min_class_share of a perfectly fair share.
            counts = df["label"].value_counts().reindex(range(num_classes), fill_value=0)
            fair = len(df) / num_classes
            counts_df = pd.DataFrame({"label": counts.index, "count": counts.values.astype(np.float64)})
            res = _batch(context, f"{split}_balance", counts_df).validate(
                gx.expectations.ExpectColumnValuesToBeBetween(column="count", min_value=min_class_share * fair)
            )
            records.append(_record(split, res))
    for a, b in disjoint:
        if a not in tables or b not in tables:
            continue
        both = pd.DataFrame({"hash": pd.concat([tables[a]["hash"].drop_duplicates(), tables[b]["hash"].drop_duplicates()], ignore_index=True)})
        res = _batch(context, f"{a}_vs_{b}", both).validate(gx.expectations.ExpectColumnValuesToBeUnique(column="hash"))
        records.append(_record(f"{a}|{b}", res))
    report = {"success": all(r["success"] for r in records), "expectations": records}
    write_json(report_path, report)
    if not report["success"]:
        failed = [f"{r['split']}: {r['expectation']} {r['kwargs'].get('column', '')} -> {r['result'].get('observed_value', r['result'].get('unexpected_count'))}" for r in records if not r["success"]]
        raise DataValidationError(
            f"data validation failed ({len(failed)} expectation(s)); report: {report_path}\n  " + "\n  ".join(failed)
        )
    return report
