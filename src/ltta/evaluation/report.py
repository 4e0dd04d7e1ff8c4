"""The results as the paper shows them: a Markdown table per report, PNG plots, DVC plot rows.

Everything here reads an :class:`EvalResults` only, never a model, so a report can be re-rendered
from saved records. Figures are built with matplotlib's object API (``Figure``, Agg canvas): no
pyplot global state, no display needed, and each PNG is written under a temporary name then renamed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ltta.corruptions.names import BENCHMARK
from ltta.evaluation.metrics import ROBUSTBENCH_SEVERITY
from ltta.evaluation.runner import CLEAN, EvalResults
from ltta.io import save_figure

MISSING = "n/a"
# The methods the paper is about, drawn larger and labelled in bold in the cost figure (those present).
HIGHLIGHTED = ("learned", "prior", "gps")
ROBUSTBENCH_IMAGES = 10_000  # images per corruption and severity on the RobustBench CIFAR-10-C leaderboard

# Okabe & Ito's colour-blind-safe palette (https://jfly.uni-koeln.de/color/), black last: one colour
# per method, in the order the methods were evaluated, the same in every figure.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """A fixed colour per method (the palette repeats past eight methods)."""
    return {m: OKABE_ITO[i % len(OKABE_ITO)] for i, m in enumerate(methods)}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats on both (cheaper or equal, and more
    accurate or equal, one strictly), sorted by cost: the methods worth their passes."""
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(set(points), key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def cost_ticks(costs: Sequence[float]) -> list[int]:
    """Integer ticks for the forward-pass axis: a learned top-k costs e.g. 5.57 passes, which next to
    a tick at 5 printed two labels on top of each other; its own value is in the table instead."""
    return sorted({max(1, round(c)) for c in costs if c > 0})


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


def _groups(
    results: EvalResults, benchmark: Sequence[str] | None, extra: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    default_b, default_e = results.default_groups()
    return list(default_b if benchmark is None else benchmark), list(default_e if extra is None else extra)


def _ordered_corruptions(results: EvalResults, benchmark: Sequence[str], extra: Sequence[str]) -> list[str]:
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
    benchmark, extra = _groups(results, benchmark, extra)
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
    corruptions = _ordered_corruptions(results, benchmark, extra)
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
    (severity 5 missing, fewer than the 15 corruptions, fewer images), so no one compares blindly."""
    n, sev, s5 = len(benchmark), _severity_text(results.severities()), ROBUSTBENCH_SEVERITY
    parts = [
        f"Accuracy = 100 - top-1 error (%), mean over the {n} benchmark corruptions evaluated: at severity {s5}, "
        f"and over severities {sev}. RobustBench's CIFAR-10-C leaderboard reports the first: accuracy at "
        f"severity {s5}, mean over the {len(BENCHMARK)} corruptions, {ROBUSTBENCH_IMAGES:,} images each; "
        f"here {_image_count_text(results, benchmark)} images per corruption and severity."
    ]
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
        [m, _cell(r["robustbench_sev5_acc"], ".2f"), _cell(r["robustbench_all_acc"], ".2f")]
        for m, r in results.robustbench(benchmark).items()
    ]
    header = ["Method", f"Sev. {s5} acc. ({n})", f"All-severity acc. ({n})"]
    return ["", "## RobustBench view (accuracy, %)", "", *_table(header, rows), "", robustbench_note(results, benchmark)]


def severity_plot_rows(results: EvalResults, benchmark: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{method, severity, error}`` for ``dvc plots``: severity 0 is clean, others the mean
    error over the benchmark corruptions at that severity (default: the evaluated ones of the 15)."""
    benchmark, _ = _groups(results, benchmark, None)
    rows = []
    for m in results.methods():
        for s, err in sorted(results.severity_means(m, benchmark).items()):
            rows.append({"method": m, "severity": s, "error": round(err, 4)})
    return rows


def _severity_figure(results: EvalResults, benchmark: Sequence[str]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    colours = method_colours(results.methods())
    for m in results.methods():
        means = results.severity_means(m, benchmark)
        xs = sorted(means)
        ax.plot(xs, [means[s] for s in xs], marker="o", label=m, color=colours[m])
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel(f"top-1 error (%), mean over {len(benchmark)} corruptions")
    ax.set_title("Error by corruption severity")
    ax.set_xticks(sorted({0, *results.severities()}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _heatmap_figure(results: EvalResults, corruptions: Sequence[str]) -> Any:
    from matplotlib.figure import Figure

    methods = results.methods()
    tables = {m: results.table(m) for m in methods}
    data = [
        [sum(tables[m][c].values()) / len(tables[m][c]) if tables[m].get(c) else float("nan") for m in methods]
        for c in corruptions
    ]
    fig = Figure(figsize=(1.1 * len(methods) + 3.0, 0.38 * len(corruptions) + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_yticks(range(len(corruptions)), corruptions)
    finite = [v for row in data for v in row if v == v]
    mid = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < mid else "black")
    fig.colorbar(image, ax=ax, label="top-1 error (%), mean over severities")
    ax.set_title("Error per corruption and TTA method")
    return fig


def marker_name(marker: str) -> str:
    return {"o": "circles", "s": "squares"}.get(marker, marker)


def highlighted_methods(methods: Sequence[str]) -> list[str]:
    """The methods of :data:`HIGHLIGHTED` that were evaluated, in evaluation order (``gps`` may be absent)."""
    return [m for m in methods if m in HIGHLIGHTED]


def _scatter_methods(ax: Any, pts: Sequence[tuple[float, float, str]], marker: str, colours: Mapping[str, str],
                     highlight: Sequence[str]) -> None:
    """The points of one series, highlighted methods large and labelled in bold, the rest small and
    faded with a grey label: the eye finds the paper's methods first, every colour stays the method's."""
    for big in (False, True):
        group = [p for p in pts if (p[2] in highlight) == big]
        if not group:
            continue
        ax.scatter([p[0] for p in group], [p[1] for p in group], marker=marker, c=[colours[p[2]] for p in group],
                   s=110 if big else 28, alpha=1.0 if big else 0.6, edgecolors="black" if big else "0.5",
                   linewidths=1.2 if big else 0.5, zorder=4 if big else 3)
        for x, y, m in group:
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(6, 4) if big else (5, 3),
                        fontsize=9 if big else 7, fontweight="bold" if big else "normal",
                        color="black" if big else "0.45")


def _cost_figure(results: EvalResults, benchmark: Sequence[str], extra: Sequence[str]) -> Any:
    from matplotlib.figure import Figure

    summary = results.summary(benchmark, extra)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    colours = method_colours(list(summary))
    highlight = highlighted_methods(list(summary))
    series: list[tuple[str, str, str, str]] = [
        ("clean_error", "clean", "o", "-"), ("mean_corruption_error", "corrupted (benchmark mean)", "s", "--"),
    ]
    for key, label, marker, line in series:
        pts = [(s["forward_passes"], 100.0 - s[key], m) for m, s in summary.items() if s[key] is not None]
        pts = [p for p in pts if p[0] and p[0] > 0]
        if not pts:
            continue
        _scatter_methods(ax, pts, marker, colours, highlight)
        front = pareto_front([(x, y) for x, y, _ in pts])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", linestyle=line, color="0.4",
                label=f"{label}: Pareto frontier ({marker_name(marker)})")
    ax.set_xscale("log")
    costs = [s["forward_passes"] for s in summary.values() if s["forward_passes"]]
    ticks = cost_ticks(costs)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("forward passes per image (log scale; exact values in the table)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy against test-time cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


FIGURE_CAPTIONS: dict[str, str] = {
    "error_by_severity.png": "Mean error over the benchmark corruptions at each severity (0 = clean), one line per TTA method.",
    "corruption_heatmap.png": "Error per corruption (rows) and TTA method (columns), mean over the evaluated severities.",
    "accuracy_vs_cost.png": "Accuracy against forward passes per image; the step lines join the methods no cheaper one beats; "
    "learned, prior and gps (where evaluated) are drawn large with bold labels.",
}


def figures_markdown(names: Sequence[str], folder: str = "figures") -> str:
    """A Markdown section that shows each figure with its one-line meaning under it."""
    lines = ["## Figures", ""]
    for name in names:
        lines += [f"![{name}]({folder}/{name})", "", FIGURE_CAPTIONS[name], ""]
    return "\n".join(lines)


def write_plots(
    results: EvalResults,
    out_dir: str | os.PathLike[str],
    *,
    benchmark: Sequence[str] | None = None,
    extra: Sequence[str] | None = None,
) -> list[Path]:
    """Write the PNGs (error by severity, corruption x method heatmap, accuracy vs cost); return their paths.

    The heatmap is left out when no corrupted set was evaluated.
    """
    benchmark, extra = _groups(results, benchmark, extra)
    out = Path(out_dir)
    corruptions = _ordered_corruptions(results, benchmark, extra)
    figures: list[tuple[str, Callable[[], Any]]] = [
        ("error_by_severity.png", lambda: _severity_figure(results, benchmark)),
        ("accuracy_vs_cost.png", lambda: _cost_figure(results, benchmark, extra)),
    ]
    if corruptions:
        figures.insert(1, ("corruption_heatmap.png", lambda: _heatmap_figure(results, corruptions)))
    return [save_figure(make(), out / name) for name, make in figures]

