"""Run every TTA method on every evaluation set; hold the tidy records and their summaries.

One record per (method, set): error, NLL, ECE, set size, throughput and cost. Summaries (the
paper's table row per method), the DVC metrics and the full JSON are computed from the records
only, so a saved list of records (``to_records`` / ``from_records``) reproduces every table and plot.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ltta.corruptions.names import BENCHMARK, EXTRA
from ltta.evaluation.metrics import (
    ROBUSTBENCH_SEVERITY, accuracy_at_severity, baseline_covers, ece, error_rate, mean_corruption_error, nll,
    relative_mce_where_defined, zero_baseline_corruptions,
)
from ltta.runtime import synchronize

CLEAN = "clean"

# The DVC view of a summary row: short keys that ``dvc metrics show`` prints as columns (one row
# per method file), taken from the summary's long names (the MLflow keys, which stay as they are).
# ``clean``, ``mce`` (the 15 benchmark corruptions) and ``extra`` (the 4 extras) are top-1 errors
# in %; ``c_nll`` / ``c_ece`` are NLL (nats) and ECE (%) averaged over the benchmark corruptions
# like ``mce``. Short and six, so that the table fits a 120-column terminal; the clean NLL/ECE and
# the unseen-corruption study's seen/unseen split are in MLflow, ``reports/eval.json`` and the report.
DVC_METRIC_KEYS: dict[str, str] = {
    "clean": "clean_error",
    "mce": "mean_corruption_error",
    "extra": "extra_error",
    "c_nll": "corruption_nll",
    "c_ece": "corruption_ece",
    "passes": "forward_passes",
}


class TTAMethod(Protocol):
    """What evaluation needs of a TTA method (``ltta.tta.methods``); the oracle's predict also takes y."""

    name: str
    forward_passes: float

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EvalSet:
    """One test set: the clean one (``corruption='clean'``, ``severity=0``) or a corruption at a severity.

    ``x`` is float [N,3,H,W] in [0,1], or a zero-argument callable returning it, so that 95
    corrupted sets need not sit in memory at once: each is loaded when its turn comes and dropped after.
    """

    corruption: str
    severity: int
    x: torch.Tensor | Callable[[], torch.Tensor]
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.corruption == CLEAN and self.severity != 0:
            raise ValueError(f"the clean set has severity 0, got {self.severity}")
        if self.corruption != CLEAN and self.severity < 1:
            raise ValueError(f"corruption {self.corruption!r} needs a severity >= 1, got {self.severity}")

    @property
    def label(self) -> str:
        return CLEAN if self.corruption == CLEAN else f"{self.corruption}/{self.severity}"

    def images(self) -> torch.Tensor:
        """The images, loading them now if ``x`` is a loader; checked against the labels."""
        x = self.x() if callable(self.x) else self.x
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.dtype.is_floating_point:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"eval set {self.label}: images must be a float tensor [N,3,H,W] in [0,1], got {shape}")
        if x.shape[0] != len(self.y):
            raise ValueError(f"eval set {self.label}: {x.shape[0]} images but {len(self.y)} labels")
        return x


@dataclass(frozen=True)
class EvalRecord:
    """The scores of one method on one set (errors and ECE in percent, NLL in nats)."""

    method: str
    corruption: str
    severity: int
    error: float
    nll: float
    ece: float
    n: int
    images_per_s: float
    forward_passes: float


def _needs_labels(method: Any) -> bool:
    """The oracle scores candidates with the labels: an explicit ``needs_labels`` or a ``y`` parameter says so."""
    flag = getattr(method, "needs_labels", None)
    if flag is not None:
        return bool(flag)
    return "y" in inspect.signature(method.predict).parameters


def _predict(method: Any, x: torch.Tensor, y: torch.Tensor, with_labels: bool, batch_size: int | None) -> torch.Tensor:
    chunk = x.shape[0] if batch_size is None else batch_size
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            xb = x[start : start + chunk]
            outs.append(method.predict(xb, y[start : start + chunk]) if with_labels else method.predict(xb))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _mean_passes(rows: Sequence[EvalRecord]) -> float:
    """Passes per image over a method's sets: its one cost, or where the cost depends on the images
    (a selection that abstains), the mean over every image evaluated."""
    costs = {r.forward_passes for r in rows}
    if len(costs) == 1:
        return rows[0].forward_passes
    return sum(r.forward_passes * r.n for r in rows) / sum(r.n for r in rows)


def evaluate_methods(
    methods: Mapping[str, TTAMethod],
    sets: Iterable[EvalSet],
    *,
    batch_size: int | None = None,
    method_batch_sizes: Mapping[str, int] | None = None,
    ece_bins: int = 15,
    progress: bool = True,
) -> EvalResults:
    """Score every method on every set; wall-clock throughput includes CUDA synchronisation.

    Each set is loaded once and shared by all methods. ``batch_size`` splits a set into chunks
    before ``predict`` (None: one call, for methods that batch themselves); ``method_batch_sizes``
    sets it per method (the stream test-time adaptation adapts on: :mod:`~ltta.evaluation.protocols`).
    The oracle (``predict`` takes ``y``) gets the labels. ECE: ``ece_bins`` equal bins (15, Guo et al.).
    """
    if not methods:
        raise ValueError("evaluate_methods needs at least one method")
    chunks = {label: (method_batch_sizes or {}).get(label, batch_size) for label in methods}
    if bad := {label: size for label, size in chunks.items() if size is not None and size < 1}:
        raise ValueError(f"batch sizes must be positive or None, got {bad}")
    for label, method in methods.items():
        if not hasattr(method, "predict") or not hasattr(method, "forward_passes"):
            raise ValueError(f"method {label!r} must have predict(x) and forward_passes (see ltta.tta)")
    sets = list(sets)
    if not sets:
        raise ValueError("evaluate_methods needs at least one evaluation set")
    records: list[EvalRecord] = []
    bar = tqdm(total=len(sets) * len(methods), desc="evaluate", disable=not progress)
    for eval_set in sets:
        x = eval_set.images()
        y = torch.as_tensor(eval_set.y).to(x.device).long()
        for label, method in methods.items():
            bar.set_postfix_str(f"{eval_set.label} {label}")
            with_labels = _needs_labels(method)
            if callable(getattr(method, "reset", None)):
                method.reset()  # test-time adaptation starts from the source model on every set
            synchronize(x.device)
            start = time.perf_counter()
            probs = _predict(method, x, y, with_labels, chunks[label])
            synchronize(x.device)
            elapsed = max(time.perf_counter() - start, 1e-9)
            if not isinstance(probs, torch.Tensor) or probs.shape[0] != x.shape[0] or probs.ndim != 2:
                got = tuple(probs.shape) if hasattr(probs, "shape") else type(probs).__name__
                raise RuntimeError(f"method {label!r} on {eval_set.label}: predict must return probs [N,K], got {got}")
            if not bool(torch.isfinite(probs).all()):
                raise RuntimeError(f"method {label!r} on {eval_set.label}: predict returned non-finite probabilities")
            records.append(
                EvalRecord(
                    method=label,
                    corruption=eval_set.corruption,
                    severity=int(eval_set.severity),
                    error=error_rate(probs, y),
                    nll=nll(probs, y),
                    ece=ece(probs, y, n_bins=ece_bins),
                    n=int(x.shape[0]),
                    images_per_s=x.shape[0] / elapsed,
                    forward_passes=float(method.forward_passes),
                )
            )
            bar.update(1)
        del x
    bar.close()
    return EvalResults(records)


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, digits)
    return value


def method_metrics(summary: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Per method, the few headline figures of :meth:`EvalResults.summary` under
    :data:`DVC_METRIC_KEYS`' short names.

    The stage writes one file per method (``metrics/tta/<method>.json``), so ``dvc metrics show``
    prints the paper's table: a row per method, a column per figure, whatever the number of
    methods. Throughput is left out: it differs between identical runs, and ``dvc metrics diff``
    should show only what a change did (MLflow keeps it).
    """
    return {
        m: _round({short: row[long] for short, long in DVC_METRIC_KEYS.items() if long in row})
        for m, row in summary.items()
    }


@dataclass
class EvalResults:
    """The tidy records of an evaluation, in run order, and the summaries built from them."""

    records: list[EvalRecord]

    # ---- views -------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.records))

    def corruptions(self) -> list[str]:
        """Corrupted sets present (not 'clean'), in run order."""
        return list(dict.fromkeys(r.corruption for r in self.records if r.corruption != CLEAN))

    def severities(self) -> list[int]:
        return sorted({r.severity for r in self.records if r.corruption != CLEAN})

    def for_method(self, method: str) -> list[EvalRecord]:
        rows = [r for r in self.records if r.method == method]
        if not rows:
            raise KeyError(f"no results for method {method!r}; have {self.methods()}")
        return rows

    def clean(self, method: str) -> EvalRecord | None:
        return next((r for r in self.for_method(method) if r.corruption == CLEAN), None)

    def table(self, method: str, field: str = "error") -> dict[str, dict[int, float]]:
        """``{corruption: {severity: value}}`` of one record field, the shape the mCE functions take."""
        out: dict[str, dict[int, float]] = {}
        for r in self.for_method(method):
            if r.corruption != CLEAN:
                out.setdefault(r.corruption, {})[r.severity] = float(getattr(r, field))
        return out

    def default_groups(self) -> tuple[list[str], list[str]]:
        """The benchmark and extra corruptions that were evaluated, in release order."""
        present = set(self.corruptions())
        return [c for c in BENCHMARK if c in present], [c for c in EXTRA if c in present]

    # ---- summaries ---------------------------------------------------------------------------
    def summary(
        self,
        benchmark: Sequence[str] | None = None,
        extra: Sequence[str] | None = None,
        baseline_method: str | None = None,
        unseen: Sequence[str] | None = None,
    ) -> dict[str, dict[str, float | None]]:
        """One row per method: the paper's table, plus calibration, cost and throughput.

        ``benchmark`` / ``extra`` default to the release's 15 / 4 corruptions that were evaluated;
        named explicitly, each must have been evaluated. Means over corruptions follow
        :func:`mean_corruption_error` (per corruption over severities, then over corruptions).
        ``mce_vs_baseline`` is :func:`relative_mce_where_defined`: the mCE over the benchmark
        corruptions on which the baseline errs, leaving out those where its summed error is 0 (CE
        undefined; :meth:`mce_excluded` names them); None without a baseline, where the baseline errs
        on none, or where it lacks results on one. A value missing for lack of sets is None too. ``unseen`` (benchmark corruptions
        held out of training: the unseen-corruption study) adds ``seen_error`` and ``unseen_error``,
        the same mean over the benchmark corruptions outside and inside it.
        """
        default_b, default_e = self.default_groups()
        benchmark = list(default_b if benchmark is None else benchmark)
        extra = list(default_e if extra is None else extra)
        unseen = list(unseen or [])
        if not set(unseen) <= set(benchmark):
            raise ValueError(
                f"unseen corruptions {sorted(set(unseen) - set(benchmark))} are not among the benchmark corruptions "
                f"summarised ({benchmark}); the extras are reported apart"
            )
        seen = [c for c in benchmark if c not in unseen]
        methods = self.methods()
        if baseline_method is not None and baseline_method not in methods:
            raise ValueError(f"baseline method {baseline_method!r} was not evaluated; evaluated: {methods}")
        base_err = self.table(baseline_method) if baseline_method is not None else None
        out: dict[str, dict[str, float | None]] = {}
        for m in methods:
            rows = self.for_method(m)
            clean = self.clean(m)
            err, nll_t, ece_t = self.table(m, "error"), self.table(m, "nll"), self.table(m, "ece")
            mce_rel = None
            if base_err is not None and baseline_covers(base_err, benchmark):
                mce_rel, _ = relative_mce_where_defined(err, base_err, benchmark)
            total_s = sum(r.n / r.images_per_s for r in rows)
            out[m] = {
                "clean_error": clean.error if clean else None,
                "clean_nll": clean.nll if clean else None,
                "clean_ece": clean.ece if clean else None,
                "mean_corruption_error": mean_corruption_error(err, benchmark) if benchmark else None,
                "extra_error": mean_corruption_error(err, extra) if extra else None,
                "mce_vs_baseline": mce_rel,
                "corruption_nll": mean_corruption_error(nll_t, benchmark) if benchmark else None,
                "corruption_ece": mean_corruption_error(ece_t, benchmark) if benchmark else None,
                "forward_passes": _mean_passes(rows),
                # Aggregate throughput over every set: total images / total seconds.
                "images_per_s": sum(r.n for r in rows) / total_s,
            }
            if unseen:
                out[m]["seen_error"] = mean_corruption_error(err, seen) if seen else None
                out[m]["unseen_error"] = mean_corruption_error(err, unseen)
        return out

    def mce_excluded(self, benchmark: Sequence[str] | None = None, baseline_method: str | None = None) -> list[str] | None:
        """The benchmark corruptions that ``mce_vs_baseline`` leaves out because the baseline makes no
        error on them at any severity, so a report can say so; None where there is no such mCE at all
        (no baseline, or the baseline lacks results on a corruption)."""
        benchmark = list(self.default_groups()[0] if benchmark is None else benchmark)
        if baseline_method is None:
            return None
        base_err = self.table(baseline_method)
        return zero_baseline_corruptions(base_err, benchmark) if baseline_covers(base_err, benchmark) else None

    def robustbench(self, benchmark: Sequence[str] | None = None) -> dict[str, dict[str, float | None]]:
        """Per method, accuracy (100 - error, %) as RobustBench's CIFAR-10-C leaderboard reports it:
        ``robustbench_sev5_acc``, the mean over ``benchmark`` at severity 5 (None where a corruption
        lacks severity 5), and ``robustbench_all_acc``, the same over all evaluated severities.

        Kept out of :meth:`summary` (hence out of MLflow and the DVC metrics): it restates the
        corruption error as accuracy, for comparison with a leaderboard only.
        """
        benchmark = list(self.default_groups()[0] if benchmark is None else benchmark)
        out: dict[str, dict[str, float | None]] = {}
        for m in self.methods():
            err = self.table(m)
            has_sev5 = bool(benchmark) and all(ROBUSTBENCH_SEVERITY in err.get(c, {}) for c in benchmark)
            out[m] = {
                "robustbench_sev5_acc": accuracy_at_severity(err, benchmark, ROBUSTBENCH_SEVERITY) if has_sev5 else None,
                "robustbench_all_acc": 100.0 - mean_corruption_error(err, benchmark) if benchmark else None,
            }
        return out

    def severity_means(self, method: str, corruptions: Sequence[str]) -> dict[int, float]:
        """Mean error over ``corruptions`` at each severity, with the clean error at severity 0."""
        table = self.table(method)
        out: dict[int, float] = {}
        clean = self.clean(method)
        if clean is not None:
            out[0] = clean.error
        for s in self.severities():
            vals = [table[c][s] for c in corruptions if c in table and s in table[c]]
            if vals:
                out[s] = float(sum(vals) / len(vals))
        return out

    def to_json(
        self,
        benchmark: Sequence[str] | None = None,
        extra: Sequence[str] | None = None,
        baseline_method: str | None = None,
        unseen: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """The whole evaluation: ``summary`` per method (with :meth:`robustbench`'s two accuracies
        added), ``errors[method][corruption]`` by severity and mean, the set counts, and
        ``mce_excluded`` (the corruptions :meth:`mce_excluded` names; None without such an mCE)
        (``reports/eval.json``; the headline view is :func:`method_metrics`).

        Nested dicts of numbers (None where undefined) rounded to 4 decimals, and the one list of
        names, so a reader (or ``ltta compare``) gets comparable numbers without re-running.
        """
        default_b, default_e = self.default_groups()
        benchmark = list(default_b if benchmark is None else benchmark)
        extra = list(default_e if extra is None else extra)
        errors: dict[str, Any] = {}
        for m in self.methods():
            per: dict[str, Any] = {}
            for c, by_sev in self.table(m).items():
                per[c] = {str(s): by_sev[s] for s in sorted(by_sev)} | {"mean": _mean(list(by_sev.values()))}
            errors[m] = per
        summary = self.summary(benchmark, extra, baseline_method, unseen)
        robust = self.robustbench(benchmark)
        return _round(
            {
                "summary": {m: row | robust[m] for m, row in summary.items()},
                "errors": errors,
                "counts": {
                    "benchmark_corruptions": len(benchmark),
                    "extra_corruptions": len(extra),
                    "severities": len(self.severities()),
                    "clean_images": next((r.n for r in self.records if r.corruption == CLEAN), 0),
                },
                "mce_excluded": self.mce_excluded(benchmark, baseline_method),
            }
        )

    # ---- persistence -------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """Records as plain dicts (JSON-ready), e.g. to re-render the report without re-running."""
        return [dataclasses.asdict(r) for r in self.records]

    @classmethod
    def from_records(cls, rows: Iterable[Mapping[str, Any]]) -> EvalResults:
        fields = [f.name for f in dataclasses.fields(EvalRecord)]
        out = []
        for i, row in enumerate(rows):
            missing = [f for f in fields if f not in row]
            if missing:
                raise ValueError(f"record {i} lacks fields {missing}; it must have {fields}")
            out.append(EvalRecord(**{f: row[f] for f in fields}))
        return cls(out)
