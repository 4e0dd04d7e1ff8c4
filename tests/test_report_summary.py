"""The report's RobustBench view, the mCE fallback for a baseline that makes no error, and the
highlighted methods of the cost figure, on tiny synthetic records checked against hand computations."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from ltta.corruptions.names import BENCHMARK
from ltta.evaluation import (
    DVC_METRIC_KEYS, EvalResults, method_metrics, relative_mce, relative_mce_where_defined, results_markdown,
    write_plots,
)
from ltta.evaluation.figures import _cost_figure, highlighted_methods

# errors[method][corruption][severity] in %; "none" (the baseline) makes no error on snow.
ERRORS = {
    "none": {"gaussian_noise": {1: 10.0, 5: 30.0}, "snow": {1: 0.0, 5: 0.0}, "fog": {1: 20.0, 5: 40.0}},
    "learned": {"gaussian_noise": {1: 5.0, 5: 25.0}, "snow": {1: 2.0, 5: 4.0}, "fog": {1: 10.0, 5: 30.0}},
}
PASSES = {"none": 1.0, "flip": 2.0, "learned": 5.5, "prior": 5.0, "gps": 4.0, "oracle": 24.0}


def _results(errors: Mapping[str, Mapping[str, Mapping[int, float]]], n: int = 100) -> EvalResults:
    """Records as the runner writes them: a clean set and every corruption x severity per method."""
    rows = []
    for m, table in errors.items():
        rows.append(dict(method=m, corruption="clean", severity=0, error=5.0))
        rows += [dict(method=m, corruption=c, severity=s, error=e) for c, by in table.items() for s, e in by.items()]
    return EvalResults.from_records(
        [r | dict(nll=1.0, ece=5.0, n=n, images_per_s=100.0, forward_passes=PASSES.get(r["method"], 1.0)) for r in rows]
    )


def _row(md: str, method: str, after: str) -> list[str]:
    """The cells of ``method``'s row in the first table after the line starting with ``after``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    row = next(line for line in lines[start:] if line.startswith(f"| {method} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def _note_after(md: str, heading: str) -> str:
    """The first non-table, non-empty line after the table under ``heading``."""
    lines = md.splitlines()
    start = lines.index(heading)
    return next(line for line in lines[start + 1 :] if line and not line.startswith("|"))


def test_robustbench_accuracies_by_hand() -> None:
    res = _results(ERRORS)
    got = res.robustbench()
    # none: severity 5 -> 100 - (30 + 0 + 40) / 3 = 76.6667; all severities -> 100 - (20 + 0 + 30) / 3 = 83.3333.
    assert got["none"]["robustbench_sev5_acc"] == pytest.approx(76.666667)
    assert got["none"]["robustbench_all_acc"] == pytest.approx(83.333333)
    # learned: 100 - (25 + 4 + 30) / 3 = 80.3333; 100 - (15 + 3 + 20) / 3 = 87.3333.
    assert got["learned"]["robustbench_sev5_acc"] == pytest.approx(80.333333)
    assert got["learned"]["robustbench_all_acc"] == pytest.approx(87.333333)

    doc = res.to_json(baseline_method="none")
    json.dumps(doc, allow_nan=False)
    assert doc["summary"]["learned"]["robustbench_sev5_acc"] == 80.3333
    assert doc["summary"]["learned"]["robustbench_all_acc"] == 87.3333
    # Not in the summary (MLflow's keys) nor in the DVC metrics: `dvc metrics show` keeps its six columns.
    summary = res.summary(baseline_method="none")
    assert not any(k.startswith("robustbench") for row in summary.values() for k in row)
    assert all(list(row) == list(DVC_METRIC_KEYS) for row in method_metrics(summary).values())

    md = results_markdown(res, title="t", meta={}, baseline_method="none")
    heading = "## RobustBench view (accuracy, %)"
    assert _row(md, "learned", heading) == ["learned", "87.33", "80.33"]
    assert "| Method | All-severity acc. (3; RobustBench's) | Sev. 5 acc. (3) |" in md
    note = _note_after(md, heading)
    # The leaderboard's number is the mean over all corruption x severity cells (robustbench eval.py), not severity 5.
    assert "leaderboard reports the first: the mean over all 15 corruptions x severities 1-5, 10,000 images each" in note
    assert "Severities 1, 5 were evaluated, not 1-5, so the all-severity column is not the leaderboard's." in note
    assert "here 100 images per corruption and severity" in note
    assert "Only 3 of the 15 benchmark corruptions were evaluated" in note
    assert "was not evaluated (" not in note  # severity 5 is there


def test_robustbench_with_all_fifteen_has_no_caveat() -> None:
    res = _results({"none": {c: {5: 10.0 + i} for i, c in enumerate(BENCHMARK)}})
    assert res.robustbench()["none"]["robustbench_sev5_acc"] == pytest.approx(100.0 - 17.0)  # mean of 10..24
    note = _note_after(results_markdown(res, title="t", meta={}), "## RobustBench view (accuracy, %)")
    assert "Only" not in note and "n/a" not in note


def test_the_robustbench_column_is_the_mean_over_all_75_cells() -> None:
    """RobustBench's corruption accuracy (eval.py corruptions_evaluation) is the mean over the 15
    corruptions x 5 severities; by hand: cell errors i + s for corruption i (0..14), severity s (1..5)."""
    res = _results({"none": {c: {s: float(i + s) for s in range(1, 6)} for i, c in enumerate(BENCHMARK)}})
    cells = [i + s for i in range(15) for s in range(1, 6)]
    got = res.robustbench()["none"]
    assert got["robustbench_all_acc"] == pytest.approx(100.0 - sum(cells) / 75)  # 100 - 10 = 90
    assert got["robustbench_sev5_acc"] == pytest.approx(100.0 - sum(i + 5 for i in range(15)) / 15)  # 100 - 12 = 88
    md = results_markdown(res, title="t", meta={})
    assert _row(md, "none", "## RobustBench view (accuracy, %)") == ["none", "90.00", "88.00"]
    note = _note_after(md, "## RobustBench view (accuracy, %)")
    assert "not the leaderboard's" not in note and "Only" not in note and "n/a" not in note


def test_missing_severity_5_reads_na_with_the_reason() -> None:
    low = {m: {c: {s: e for s, e in by.items() if s == 1} | {2: 50.0} for c, by in t.items()} for m, t in ERRORS.items()}
    res = _results(low)
    assert res.robustbench()["learned"]["robustbench_sev5_acc"] is None
    assert res.robustbench()["learned"]["robustbench_all_acc"] is not None
    assert res.to_json()["summary"]["learned"]["robustbench_sev5_acc"] is None
    md = results_markdown(res, title="t", meta={})
    heading = "## RobustBench view (accuracy, %)"
    assert _row(md, "learned", heading)[2] == "n/a"
    assert "Sev. 5 acc. is n/a: severity 5 was not evaluated (severities 1-2)." in _note_after(md, heading)

    # Severity 5 on some corruptions only: n/a too, naming the ones without it.
    partial = {m: {c: (by if c != "fog" else {1: by[1]}) for c, by in t.items()} for m, t in ERRORS.items()}
    partial["none"]["fog"][5] = 40.0  # the baseline has it, learned does not: the method's own sets decide
    res = _results(partial)
    assert res.robustbench()["learned"]["robustbench_sev5_acc"] is None
    assert res.robustbench()["none"]["robustbench_sev5_acc"] == pytest.approx(76.666667)
    res = _results({m: {c: (by if c != "fog" else {1: by[1]}) for c, by in t.items()} for m, t in ERRORS.items()})
    note = _note_after(results_markdown(res, title="t", meta={}), heading)
    assert "severity 5 was not evaluated on fog." in note


def test_mce_fallback_leaves_out_exactly_the_zero_baseline_corruptions() -> None:
    base, mine = ERRORS["none"], ERRORS["learned"]
    # CE_gaussian = (5 + 25) / (10 + 30) = .75, CE_fog = (10 + 30) / (20 + 40) = .6667; snow: 6 / 0, left out.
    value, excluded = relative_mce_where_defined(mine, base, ["gaussian_noise", "snow", "fog"])
    assert excluded == ["snow"] and value == pytest.approx(100.0 * (0.75 + 2.0 / 3.0) / 2)
    assert relative_mce_where_defined(mine, base, ["gaussian_noise", "fog"]) == (
        pytest.approx(relative_mce(mine, base, ["gaussian_noise", "fog"])), [])
    with pytest.raises(ValueError, match="no errors"):  # the strict function stays strict
        relative_mce(mine, base, ["gaussian_noise", "snow", "fog"])

    res = _results(ERRORS)
    summary = res.summary(baseline_method="none")
    assert summary["learned"]["mce_vs_baseline"] == pytest.approx(70.833333)
    assert summary["none"]["mce_vs_baseline"] == pytest.approx(100.0)
    assert res.mce_excluded(baseline_method="none") == ["snow"]
    assert res.to_json(baseline_method="none")["mce_excluded"] == ["snow"]
    assert res.to_json()["mce_excluded"] is None  # no baseline, no mCE

    md = results_markdown(res, title="t", meta={}, baseline_method="none")
    cells = _row(md, "learned", "## Summary")
    assert cells[4] == "70.8"  # Method, Clean, Corr., Extra, mCE
    note = _note_after(md, "## Summary")
    assert note.startswith("mCE over 2 of 3 corruptions: the baseline `none` makes no error on snow ")
    assert "fog" not in note and "gaussian_noise" not in note


def test_mce_note_absent_when_the_baseline_errs_everywhere() -> None:
    res = _results({m: {c: by for c, by in t.items() if c != "snow"} for m, t in ERRORS.items()})
    assert res.mce_excluded(baseline_method="none") == []
    md = results_markdown(res, title="t", meta={}, baseline_method="none")
    assert "mCE over" not in md and "mCE n/a" not in md


def test_all_zero_baseline_gives_na() -> None:
    errors = {"none": {c: {1: 0.0, 5: 0.0} for c in ("snow", "fog")}, "learned": {c: {1: 1.0, 5: 2.0} for c in ("snow", "fog")}}
    assert relative_mce_where_defined(errors["learned"], errors["none"], ["snow", "fog"]) == (None, ["snow", "fog"])
    res = _results(errors)
    assert all(row["mce_vs_baseline"] is None for row in res.summary(baseline_method="none").values())
    assert res.to_json(baseline_method="none")["mce_excluded"] == ["snow", "fog"]
    md = results_markdown(res, title="t", meta={}, baseline_method="none")
    assert _row(md, "learned", "## Summary")[4] == "n/a"
    assert _note_after(md, "## Summary").startswith(
        "mCE n/a: the baseline `none` makes no error on any of the 2 benchmark corruptions")


def _cost_results(methods: list[str]) -> EvalResults:
    return _results({m: {"fog": {5: 40.0 - PASSES[m]}} for m in methods})


def test_cost_figure_marks_the_frontier_and_labels_the_highlighted_methods(tmp_path: Path) -> None:
    methods = ["none", "flip", "learned", "prior", "oracle"]  # no gps: highlight whichever are present
    res = _cost_results(methods)
    assert highlighted_methods(res.methods()) == ["learned", "prior"]
    assert highlighted_methods(res.methods() + ["gps"]) == ["learned", "prior", "gps"]
    ax = _cost_figure(res, ["fog"], []).axes[0]
    bold = {t.get_text() for t in ax.texts if t.get_fontweight() == "bold"}
    plain = {t.get_text() for t in ax.texts if t.get_fontweight() != "bold"}
    assert bold == {"learned", "prior"} and plain == {"none", "flip", "oracle"}
    assert any("Pareto" in t.get_text() for t in ax.figure.legends[0].get_texts())
    # Larger markers for the highlighted ones: one scatter per method, named by its gid.
    sizes = {c.get_gid(): float(c.get_sizes()[0]) for c in ax.collections}
    assert set(sizes) == set(methods)
    assert min(sizes["learned"], sizes["prior"]) > max(sizes["none"], sizes["flip"], sizes["oracle"])

    with_gps = _cost_results(methods + ["gps"])
    ax = _cost_figure(with_gps, ["fog"], []).axes[0]
    assert {t.get_text() for t in ax.texts if t.get_fontweight() == "bold"} == {"learned", "prior", "gps"}
    paths = write_plots(with_gps, tmp_path)
    cost = next(p for p in paths if p.name == "accuracy_vs_cost.png")
    assert cost.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
