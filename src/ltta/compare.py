"""``ltta compare``: the paper's table for several ``evaluate`` runs side by side, read from MLflow.

Every ``evaluate`` run logs one metric per method and aggregate, ``<method>.<key>`` (for example
``learned.mean_corruption_error``; the keys are :data:`COLUMNS` and the rest of
``Results.summary``), and carries the tags ``ltta.stage=evaluate``, ``ltta.profile``,
``ltta.study``, ``ltta.unseen`` and, under ``dvc exp run``, ``ltta.dvc_exp``. So the MLflow UI's
compare view and this table show the same numbers.

Two shapes:

* the long table (default): one row per method and run, the paper's columns (clean error,
  corruption mean, extras, NLL, ECE, forward passes); methods stay together so the runs of one
  method read side by side;
* ``--by study`` (or ``profile``, ``unseen``, ``dvc_exp``, ``seed``): methods as rows, one column
  per group, each cell the mean ± sample standard deviation of one metric over the group's runs:
  the paper's "training augmentation x TTA method" table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ltta.tracking import PROTOCOL_TAG

#: The paper's columns: summary key -> header.
COLUMNS: dict[str, str] = {
    "clean_error": "clean err %",
    "mean_corruption_error": "corruption err %",
    "extra_error": "extras err %",
    "clean_nll": "NLL",
    "clean_ece": "ECE %",
    "forward_passes": "passes/img",
}

#: What ``--by`` can group on: each is a tag ``ltta.<key>`` of the run, else a logged param ``<key>``.
GROUP_KEYS: tuple[str, ...] = ("study", "profile", "unseen", "dvc_exp", "seed")

EVALUATE_FILTER = "tags.`ltta.stage` = 'evaluate'"


@dataclass(frozen=True)
class EvalRun:
    """One ``evaluate`` run: its id, a label for the table, tags, params and ``metrics[method][key]``."""

    run_id: str
    label: str
    tags: Mapping[str, str]
    params: Mapping[str, str]
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def group(self, key: str) -> str:
        return self.tags.get(f"ltta.{key}") or self.params.get(key) or "?"

    @classmethod
    def from_mlflow(cls, run: Any) -> EvalRun:
        metrics: dict[str, dict[str, float]] = {}
        for name, value in run.data.metrics.items():
            method, _, key = name.partition(".")
            if key:
                metrics.setdefault(method, {})[key] = float(value)
        tags = dict(run.data.tags)
        label = tags.get("ltta.dvc_exp") or f"{tags.get('ltta.study', 'run')}@{run.info.run_id[:8]}"
        return cls(run.info.run_id, label, tags, dict(run.data.params), metrics)


def find_runs(client: Any, *, experiments: Sequence[str] = (), run_ids: Sequence[str] = (),
              filter_string: str | None = None, dvc_exps: Sequence[str] = ()) -> list[EvalRun]:
    """The ``evaluate`` runs chosen by run id, by DVC experiment name (the newest run of each), or by
    experiment name(s) and an MLflow filter; oldest first. Raises ``ValueError`` naming what matched nothing."""
    runs: list[Any] = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        if run.data.tags.get("ltta.stage") != "evaluate":
            raise ValueError(f"run {run_id} is not an evaluate run (its ltta.stage tag is "
                             f"{run.data.tags.get('ltta.stage')!r}); pass the id of an evaluate run")
        runs.append(run)
    if dvc_exps or not run_ids:
        ids = _experiment_ids(client, experiments or ["ltta"])
        query = EVALUATE_FILTER + (f" and {filter_string}" if filter_string else "")
        if dvc_exps:
            for name in dvc_exps:
                found = client.search_runs(ids, f"{query} and tags.`ltta.dvc_exp` = '{name}'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
                if not found:
                    raise ValueError(f"no evaluate run is tagged ltta.dvc_exp={name!r} in experiment(s) "
                                     f"{', '.join(experiments or ['ltta'])}; `dvc exp show` lists the names, "
                                     "and only runs made by `dvc exp run` carry one")
                runs.append(found[0])
        else:
            runs.extend(client.search_runs(ids, query, order_by=["attributes.start_time ASC"], max_results=1000))
    if not runs:
        raise ValueError(f"no evaluate runs match (experiment(s) {', '.join(experiments or ['ltta'])}"
                         + (f", filter {filter_string!r}" if filter_string else "") + "); run `dvc repro` first")
    runs.sort(key=lambda r: r.info.start_time)
    return [EvalRun.from_mlflow(r) for r in runs]


def _experiment_ids(client: Any, names: Sequence[str]) -> list[str]:
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ValueError(f"no MLflow experiment named {name!r} at this tracking URI; "
                             "`mlflow experiments search` lists them (tracking.experiment in params.yaml names ours)")
        ids.append(exp.experiment_id)
    return ids


def _methods(runs: Iterable[EvalRun]) -> list[str]:
    """Every method of the runs, in the order of their first appearance."""
    seen: dict[str, None] = {}
    for run in runs:
        for m in run.metrics:
            seen.setdefault(m, None)
    return list(seen)


# ---- the two tables, as rows of plain values ----------------------------------------------------
def long_rows(runs: Sequence[EvalRun]) -> list[dict[str, Any]]:
    """One record per method and run (methods together): run, label, method and the :data:`COLUMNS`."""
    rows = []
    for method in _methods(runs):
        for run in runs:
            if method in run.metrics:
                rows.append({"method": method, "run": run.label, "run_id": run.run_id,
                             **{k: run.metrics[method].get(k) for k in COLUMNS}})
    return rows


@dataclass(frozen=True)
class Cell:
    """A metric over the runs of one group: mean, sample sd (None for one run), and how many runs."""

    mean: float
    sd: float | None
    n: int

    def text(self, digits: int) -> str:
        if self.sd is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def grouped(runs: Sequence[EvalRun], by: str, metric: str) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """``(groups, table[method][group])`` of ``metric`` over the runs of each value of ``by``."""
    if by not in GROUP_KEYS:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUP_KEYS)}")
    groups: dict[str, list[EvalRun]] = {}
    for run in runs:
        groups.setdefault(run.group(by), []).append(run)
    table: dict[str, dict[str, Cell]] = {}
    for method in _methods(runs):
        for g, members in groups.items():
            vals = [r.metrics[method][metric] for r in members if metric in r.metrics.get(method, {})]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else None
                table.setdefault(method, {})[g] = Cell(statistics.fmean(vals), sd, len(vals))
    if not table:
        known = sorted({k for r in runs for row in r.metrics.values() for k in row})
        raise ValueError(f"no run has the metric {metric!r}; metrics logged: {', '.join(known)}")
    return list(groups), table


# ---- rendering --------------------------------------------------------------------------------
def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if key == "forward_passes" else f"{value:.3f}" if key == "clean_nll" else f"{value:.2f}"


def _markdown(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def render_long(runs: Sequence[EvalRun], fmt: str) -> str:
    rows = long_rows(runs)
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        return _csv(["method", "run", "run_id", *COLUMNS], [[r[k] for k in ["method", "run", "run_id", *COLUMNS]] for r in rows])
    body, last = [], None
    for r in rows:
        body.append([r["method"] if r["method"] != last else "", r["run"], *(_fmt(r[k], k) for k in COLUMNS)])
        last = r["method"]
    return _markdown(["method", "run", *COLUMNS.values()], body)


def render_grouped(runs: Sequence[EvalRun], by: str, metric: str, fmt: str) -> str:
    groups, table = grouped(runs, by, metric)
    if fmt == "json":
        out = {"by": by, "metric": metric, "groups": groups,
               "table": {m: {g: vars(c) for g, c in row.items()} for m, row in table.items()}}
        return json.dumps(out, indent=2) + "\n"
    if fmt == "csv":
        header = ["method"] + [f"{g}_{part}" for g in groups for part in ("mean", "sd", "n")]
        body = [[m] + [x for g in groups for x in ((row[g].mean, row[g].sd, row[g].n) if g in row else ("", "", 0))]
                for m, row in table.items()]
        return _csv(header, body)
    digits = 1 if metric.endswith("forward_passes") else 3 if "nll" in metric else 2
    counts = {g: max((row[g].n for row in table.values() if g in row), default=0) for g in groups}
    header = [f"method \\ {by}"] + [f"{g} (n={counts[g]})" for g in groups]
    body = [[m] + [row[g].text(digits) if g in row else "n/a" for g in groups] for m, row in table.items()]
    return f"{metric} (mean ± sd over runs)\n\n" + _markdown(header, body)


#: Protocol fields that differ by design between the runs a comparison puts side by side: the model
#: being compared (each study trains its own target) and the seed (``--by seed``).
IDENTITY_FIELDS = tuple(PROTOCOL_TAG + f for f in ("target.source", "target.origin", "target.md5", "seed"))


def protocol_differences(runs: Sequence[EvalRun]) -> list[str]:
    """Where the runs' protocol records disagree (one line per field, each run's value): numbers made on
    other corrupted files, another target or other test-time batches are not one table's numbers."""
    keys = sorted({k for r in runs for k in r.tags if k.startswith(PROTOCOL_TAG)} - set(IDENTITY_FIELDS))
    lines = []
    for key in keys:
        # A method one run did not evaluate has no stream to disagree about; any other missing field does.
        per_method = key.startswith(PROTOCOL_TAG + "methods.")
        values = {r.label: r.tags.get(key, "(not recorded)") for r in runs if key in r.tags or not per_method}
        if len(set(values.values())) > 1:
            lines.append(f"{key.removeprefix(PROTOCOL_TAG)}: " + "; ".join(f"{label}={v}" for label, v in values.items()))
    return lines


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
