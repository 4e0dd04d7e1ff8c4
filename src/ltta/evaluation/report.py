"""The results as the paper shows them: the Markdown tables and the DVC plot rows.

The figures are :mod:`~ltta.evaluation.figures`.

Everything here reads an :class:`EvalResults` only, never a model, so a report can be re-rendered
from saved records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ltta.corruptions.names import BENCHMARK
from ltta.evaluation.metrics import ROBUSTBENCH_SEVERITY
from ltta.evaluation.runner import CLEAN, EvalResults

MISSING = "n/a"
ROBUSTBENCH_IMAGES = 10_000  # images per corruption and severity on the RobustBench CIFAR-10-C leaderboard


def _cell(value: float | None, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def _escape(text: Any) -> str:
    """A Markdown table cell: pipes escaped and newlines flattened, so they cannot break the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = True) -> list[str]:
    sep = [":---" if (i == 0 and align_first_left) else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return lines


def _severity_text(severities: Sequence[int]) -> str:
    if not severities:
        return "none"
    s = list(severities)
    if s == list(range(s[0], s[-1] + 1)) and len(s) > 1:
        return f"{s[0]}-{s[-1]}"
    return ", ".join(str(v) for v in s)


def resolve_groups(
    results: EvalResults, benchmark: Sequence[str] | None, extra: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    default_b, default_e = results.default_groups()
    return list(default_b if benchmark is None else benchmark), list(default_e if extra is None else extra)


def ordered_corruptions(results: EvalResults, benchmark: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Benchmark first, then extras, then anything else evaluated, each group in its given order."""
    present = results.corruptions()
    head = [c for c in list(benchmark) + list(extra) if c in present]
    return head + [c for c in present if c not in head]


def results_markdown(
    results: EvalResults,
    *,
    title: str,
    meta: Mapping[str, Any],
    benchmark: Sequence[str] | None = None,
    extra: Sequence[str] | None = None,
    baseline_method: str | None = None,
    unseen: Sequence[str] | None = None,
) -> str:
    """The paper's table (methods as rows), then error per corruption, under a header of ``meta``.

    ``meta`` is rendered in its own order (dataset, target arch, training mode, test images, device,
    date, git commit: whatever the stage passes). Errors and ECE are percentages, NLL in nats.
    ``unseen`` (the benchmark corruptions held out of training, unseen-corruption study) adds the
    mean error over the seen and over the unseen ones next to the mean over all.
    """
    benchmark, extra = resolve_groups(results, benchmark, extra)
    unseen = list(unseen or [])
    summary = results.summary(benchmark, extra, baseline_method, unseen)
    sev = _severity_text(results.severities())
    lines = [f"# {title}", ""]
    lines += [f"- **{_escape(k)}**: {_escape(v)}" for k, v in meta.items()]
    lines += [
        "",
        f"Top-1 error in %. Corruption error: unnormalised mean over the {len(benchmark)} benchmark corruptions "
        f"and severities {sev} (as AugMix reports it); extras: mean over the {len(extra)} held-out corruptions. "
        + (
            f"mCE: Hendrycks & Dietterich's corruption error relative to `{baseline_method}` (100 = baseline). "
            if baseline_method
            else ""
        )
        + (
            f"Seen / unseen: the same mean over the {len(benchmark) - len(unseen)} benchmark corruptions "
            f"used in training and over the {len(unseen)} held out of it ({', '.join(unseen)}). "
            if unseen
            else ""
        )
        + "NLL in nats, ECE in % (15 equal-width bins); corrupted NLL/ECE averaged like the error. "
        "Images/s: wall clock over all sets, including synchronisation.",
        "",
        "## Summary",
        "",
    ]
    header = [
        "Method",
        "Clean err.",
        f"Corr. err. ({len(benchmark)})",
        *([f"Seen err. ({len(benchmark) - len(unseen)})", f"Unseen err. ({len(unseen)})"] if unseen else []),
        f"Extra err. ({len(extra)})",
        f"mCE vs {baseline_method}" if baseline_method else "mCE",
        "Clean NLL",
        "Corr. NLL",
        "Clean ECE",
        "Corr. ECE",
        "Fwd passes/img",
        "Images/s",
    ]
    rows = []
    for m, s in summary.items():
        rows.append(
            [
                m,
                _cell(s["clean_error"], ".2f"),
                _cell(s["mean_corruption_error"], ".2f"),
                *([_cell(s["seen_error"], ".2f"), _cell(s["unseen_error"], ".2f")] if unseen else []),
                _cell(s["extra_error"], ".2f"),
                _cell(s["mce_vs_baseline"], ".1f"),
                _cell(s["clean_nll"], ".3f"),
                _cell(s["corruption_nll"], ".3f"),
                _cell(s["clean_ece"], ".2f"),
                _cell(s["corruption_ece"], ".2f"),
                _cell(s["forward_passes"], "g"),
                _cell(s["images_per_s"], ".0f"),
            ]
        )
    lines += _table(header, rows)
    lines += _mce_note(results, benchmark, baseline_method)
    lines += _robustbench_section(results, benchmark)
    corruptions = ordered_corruptions(results, benchmark, extra)
    if corruptions:
        lines += ["", f"## Error per corruption (mean over severities {sev}, %)", ""]
        per_rows = []
        for m in results.methods():
            table = results.table(m)
            per_rows.append(
                [m]
                + [
                    _cell(sum(table[c].values()) / len(table[c]) if table.get(c) else None, ".2f")
                    for c in corruptions
                ]
            )
        lines += _table(["Method", *corruptions], per_rows)
    return "\n".join(lines) + "\n"


def _names(names: Sequence[str]) -> str:
    return ", ".join(names)


def _mce_note(results: EvalResults, benchmark: Sequence[str], baseline_method: str | None) -> list[str]:
    """The note under the summary table when the mCE fallback left corruptions out (the baseline
    makes no error on them, CE divides by zero): without it the column would silently mean less."""
    excluded = results.mce_excluded(benchmark, baseline_method) if baseline_method else None
    if not excluded:
        return []
    n, sev = len(benchmark), _severity_text(results.severities())
    if len(excluded) == n:
        text = (
            f"mCE n/a: the baseline `{baseline_method}` makes no error on any of the {n} benchmark corruptions "
            f"(summed over severities {sev}), so every corruption's CE divides by zero."
        )
    else:
        text = (
            f"mCE over {n - len(excluded)} of {n} corruptions: the baseline `{baseline_method}` makes no error on "
            f"{_names(excluded)} (summed over severities {sev}), where CE divides by zero, so "
            f"{'it is' if len(excluded) == 1 else 'they are'} left out of the mean; Corr. err. still covers all {n}."
        )
    return ["", text]


def _lacking_severity(results: EvalResults, corruptions: Sequence[str], severity: int) -> list[str]:
    """The corruptions with no set at ``severity`` (for any method), to name in a footnote."""
    have = {r.corruption for r in results.records if r.severity == severity}
    return [c for c in corruptions if c not in have]


def _image_count_text(results: EvalResults, corruptions: Sequence[str]) -> str:
    counts = sorted({r.n for r in results.records if r.corruption in corruptions and r.corruption != CLEAN})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def robustbench_note(results: EvalResults, benchmark: Sequence[str]) -> str:
    """What the RobustBench columns are and, where they differ, how they differ from the leaderboard's
    (other severities, fewer than the 15 corruptions, fewer images), so no one compares blindly.

    The leaderboard's corruption accuracy is the mean over every corruption x severity cell:
    RobustBench ``eval.py`` ``corruptions_evaluation`` scores the 15 corruptions at severities 1-5
    and reports the mean of those 75 accuracies (its ``Standard`` card's 73.46 % is that mean).
    """
    n, sev, s5 = len(benchmark), _severity_text(results.severities()), ROBUSTBENCH_SEVERITY
    parts = [
        f"Accuracy = 100 - top-1 error (%), mean over the {n} benchmark corruptions evaluated: over every "
        f"evaluated severity ({sev}), and at severity {s5} alone. RobustBench's CIFAR-10-C leaderboard reports "
        f"the first: the mean over all {len(BENCHMARK)} corruptions x severities 1-5, {ROBUSTBENCH_IMAGES:,} "
        f"images each; the second is a separate view (DequanWang/tent's tables use severity {s5}); "
        f"here {_image_count_text(results, benchmark)} images per corruption and severity."
    ]
    if results.severities() != list(range(1, s5 + 1)):
        parts.append(f"Severities {sev} were evaluated, not 1-{s5}, so the all-severity column is not the leaderboard's.")
    if n < len(BENCHMARK):
        missing = [c for c in BENCHMARK if c not in benchmark]
        parts.append(
            f"Only {n} of the {len(BENCHMARK)} benchmark corruptions were evaluated (not {_names(missing)}), "
            "so neither number is the leaderboard's."
        )
    lacking = _lacking_severity(results, benchmark, s5)
    if lacking == list(benchmark):
        parts.append(f"Sev. {s5} acc. is {MISSING}: severity {s5} was not evaluated (severities {sev}).")
    elif lacking:
        parts.append(f"Sev. {s5} acc. is {MISSING}: severity {s5} was not evaluated on {_names(lacking)}.")
    return " ".join(parts)


def _robustbench_section(results: EvalResults, benchmark: Sequence[str]) -> list[str]:
    """A second, small table: accuracy as RobustBench reports it, next to the paper's error table
    (which stays as it is); left out when no benchmark corruption was evaluated."""
    if not benchmark:
        return []
    n, s5 = len(benchmark), ROBUSTBENCH_SEVERITY
    rows = [
        [m, _cell(r["robustbench_all_acc"], ".2f"), _cell(r["robustbench_sev5_acc"], ".2f")]
        for m, r in results.robustbench(benchmark).items()
    ]
    header = ["Method", f"All-severity acc. ({n}; RobustBench's)", f"Sev. {s5} acc. ({n})"]
    return ["", "## RobustBench view (accuracy, %)", "", *_table(header, rows), "", robustbench_note(results, benchmark)]


def severity_plot_rows(results: EvalResults, benchmark: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{method, severity, error}`` for ``dvc plots``: severity 0 is clean, others the mean
    error over the benchmark corruptions at that severity (default: the evaluated ones of the 15)."""
    benchmark, _ = resolve_groups(results, benchmark, None)
    rows = []
    for m in results.methods():
        for s, err in sorted(results.severity_means(m, benchmark).items()):
            rows.append({"method": m, "severity": s, "error": round(err, 4)})
    return rows
