"""Data contracts at the boundary, checked with Great Expectations before any training.

Each split is summarised as one row per image (label, content hash, pixel min/max/mean/std, shape,
dtype), so that plain column expectations state the contract: uint8 [H,W,3] images with values in
[0,255] that are not blank, integer labels in the label set, every class present and none starved,
and no image shared by two splits declared disjoint. The JSON report records every expectation with
its observed values; a failure stops the caller with the report's path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ltta.io import write_json

INTEGER_DTYPES = sorted({np.dtype(t).name for t in np.typecodes["AllInteger"]})
_CHUNK = 4096  # images per block when computing pixel statistics (bounds the float copy's memory)


class DataValidationError(ValueError):
    """A data contract failed; the message lists the failed expectations and the report's path."""


def image_table(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """One row per image: exactly what the expectations look at."""
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    flat = np.ascontiguousarray(x.reshape(n, int(np.prod(x.shape[1:], dtype=np.int64))))
    stats = np.zeros((n, 4), dtype=np.float64)  # min, max, mean, std
    for i in range(0, n, _CHUNK):
        block = flat[i : i + _CHUNK].astype(np.float64)
        if block.shape[1]:
            stats[i : i + _CHUNK] = np.stack([block.min(1), block.max(1), block.mean(1), block.std(1)], axis=1)
    integer = np.issubdtype(y.dtype, np.integer)
    return pd.DataFrame(
        {
            "label": y.astype(np.int64) if integer else y,
            "label_dtype": str(y.dtype),
            # The content hash covers the raw bytes: equal hashes mean the same image, bit for bit.
            "hash": [hashlib.sha1(row.tobytes()).hexdigest() for row in flat],
            "min": stats[:, 0],
            "max": stats[:, 1],
            "mean": stats[:, 2],
            "std": stats[:, 3],
            "shape": "x".join(str(s) for s in x.shape[1:]),
            "ndim": x.ndim,
            "dtype": str(x.dtype),
        }
    )


def _split_suite(gx: Any, name: str, num_classes: int, image_shape: str) -> Any:
    """The per-split contract, one expectation per property."""
    e = gx.expectations
    classes = list(range(num_classes))
    suite = gx.ExpectationSuite(name=name)
    for exp in (
        e.ExpectTableRowCountToBeBetween(min_value=1),
        e.ExpectColumnValuesToBeInSet(column="ndim", value_set=[4]),
        e.ExpectColumnValuesToBeInSet(column="shape", value_set=[image_shape]),
        e.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        e.ExpectColumnValuesToBeBetween(column="min", min_value=0, max_value=255),
        e.ExpectColumnValuesToBeBetween(column="max", min_value=0, max_value=255),
        # Not blank: a stray constant image is tolerated (1%), a loader that yields blanks is not.
        e.ExpectColumnValuesToBeBetween(column="std", min_value=0, strict_min=True, mostly=0.99),
        e.ExpectColumnValuesToBeInSet(column="label_dtype", value_set=INTEGER_DTYPES),
        e.ExpectColumnValuesToNotBeNull(column="label"),
        e.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
        e.ExpectColumnDistinctValuesToContainSet(column="label", value_set=classes),
    ):
        suite.add_expectation(exp)
    return suite


def _jsonable(obj: Any) -> Any:
    """GX results may hold numpy scalars and tuples; the report must be plain JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _record(split: str, result: Any) -> dict[str, Any]:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in dict(cfg.kwargs).items() if k != "batch_id"}
    keep = ("observed_value", "element_count", "unexpected_count", "unexpected_percent", "partial_unexpected_list")
    observed = {k: v for k, v in dict(result.result).items() if k in keep}
    return _jsonable({"split": split, "expectation": cfg.type, "kwargs": kwargs, "success": bool(result.success), "result": observed})


def _failure_line(r: dict[str, Any]) -> str:
    res = r["result"]
    what = res.get("observed_value")
    if what is None and "unexpected_count" in res:
        what = f"{res['unexpected_count']} unexpected, e.g. {res.get('partial_unexpected_list', [])[:5]}"
    column = r["kwargs"].get("column", "")
    return f"{r['split']}: {r['expectation']}({column}) -> {what}"


def validate_splits(
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    report_path: Path,
    *,
    disjoint: Sequence[tuple[str, str]] = (),
    min_class_fraction: float = 0.5,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Check every split and every declared-disjoint pair; write the JSON report; raise on failure.

    ``splits`` maps a name to (images, labels). Images must be uint8 [N,H,W,3] with one H,W for all
    splits (``image_size`` if given, else the first split's). Class balance rule: in each split the
    rarest class holds at least ``min_class_fraction`` of a fair share ``N / num_classes`` (0 turns
    the check off); a share rather than a max/min ratio, so one over-full class does not fail a
    split whose other classes are all well represented. ``disjoint`` names pairs of splits that
    must share no image (equal bytes). Returns the report (``success``, ``splits`` sizes and class
    counts, ``expectations``); on failure raises ``DataValidationError`` after writing it.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if not splits:
        raise ValueError("validate_splits needs at least one split")
    unknown = sorted({s for pair in disjoint for s in pair} - set(splits))
    if unknown:
        raise ValueError(f"disjoint names splits {unknown} that are not in splits {sorted(splits)}")

    # One ephemeral context per call: creating it is the slow part, and a fresh one per call avoids
    # "already exists" clashes between calls.
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    n_batches = 0

    def validate(df: pd.DataFrame, what: Any) -> Any:
        nonlocal n_batches
        n_batches += 1
        source = context.data_sources.add_pandas(f"source_{n_batches}")
        asset = source.add_dataframe_asset(name=f"asset_{n_batches}")
        batch = asset.add_batch_definition_whole_dataframe(f"batch_{n_batches}").get_batch(batch_parameters={"dataframe": df})
        return batch.validate(what)

    first = np.asarray(next(iter(splits.values()))[0])
    hw = (image_size, image_size) if image_size else tuple(first.shape[1:3])
    image_shape = "x".join(str(s) for s in hw) + "x3"

    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    tables: dict[str, pd.DataFrame] = {}
    for split, (x, y) in splits.items():
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            records.append({"split": split, "expectation": "images_match_labels", "kwargs": {}, "success": False,
                            "result": {"observed_value": f"{len(x)} images, {len(y)} labels"}})
            continue
        df = image_table(x, y)
        tables[split] = df
        counts = df["label"].value_counts().reindex(range(num_classes), fill_value=0)
        summary[split] = {"n": int(len(df)), "shape": list(x.shape), "dtype": str(x.dtype), "class_counts": [int(c) for c in counts]}
        result = validate(df, _split_suite(gx, f"split_{split}", num_classes, image_shape))
        records.extend(_record(split, r) for r in result.results)
        if min_class_fraction > 0 and len(df):
            fair = len(df) / num_classes
            counts_df = pd.DataFrame({"label": counts.index, "count": counts.to_numpy(dtype=np.float64)})
            res = validate(counts_df, gx.expectations.ExpectColumnValuesToBeBetween(column="count", min_value=min_class_fraction * fair))
            records.append(_record(split, res))
    for a, b in disjoint:
        if a not in tables or b not in tables:
            continue  # that split already failed its size check
        # Duplicates inside one split are not leakage: deduplicate each side, then ask for uniqueness.
        both = pd.DataFrame({"hash": pd.concat([tables[a]["hash"].drop_duplicates(), tables[b]["hash"].drop_duplicates()], ignore_index=True)})
        res = validate(both, gx.expectations.ExpectColumnValuesToBeUnique(column="hash"))
        records.append(_record(f"{a}|{b}", res))

    report = {"success": all(r["success"] for r in records), "splits": summary, "expectations": records}
    write_json(report_path, report)
    if not report["success"]:
        failed = [_failure_line(r) for r in records if not r["success"]]
        raise DataValidationError(
            f"data validation failed ({len(failed)} expectation(s)); report: {report_path}\n  " + "\n  ".join(failed)
        )
    return report
