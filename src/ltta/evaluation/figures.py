"""The evaluation's figures: error by severity, the corruption x method heatmap, accuracy against cost.

Readable at 15-20 methods. Each method belongs to a family (``TTAMethod.family``, the families of
:data:`ltta.tta.methods.FAMILIES`: classical views, learned choice, fitted policies and
aggregation, test-time adaptation, oracle) and gets one :class:`SeriesStyle` used in every figure:
the family sets the line style and the first marker, the colour tells the family's members apart
(Okabe & Ito's colour-blind-safe palette, https://jfly.uni-koeln.de/color/), and past seven
members the marker changes too, so no two methods share a style. ``none`` is the black reference
drawn in every panel. The severity figure is small multiples, one panel per family; the cost
figure puts clean and corrupted accuracy in two panels (their scales differ) and places each
label where it overlaps no other label and no point (:func:`place_labels`).

Everything here reads an :class:`~ltta.evaluation.runner.EvalResults` only, never a model.
Figures are built with matplotlib's object API (``Figure``, Agg canvas): no pyplot global state,
no display needed, and each PNG is written under a temporary name then renamed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltta.evaluation.report import ordered_corruptions, resolve_groups
from ltta.evaluation.runner import EvalResults
from ltta.io import FIGURE_DPI, save_figure

#: The reference method: black, and drawn in every panel of the severity figure.
REFERENCE = "none"
#: The methods the paper is about, drawn larger and labelled in bold in the cost figure (those present).
HIGHLIGHTED = ("learned", "prior", "gps")
#: A method whose class declares no family (or is not registered, e.g. a user's own callable).
OTHER = "other"

# Okabe & Ito's palette without black (the reference's colour), yellow last (faint on white).
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")
FAMILY_MARKERS = {"classical": "o", "learned": "s", "fitted": "D", "adaptation": "^", "oracle": "*", OTHER: "v"}
FAMILY_LINES: dict[str, Any] = {
    "classical": "-", "learned": "--", "fitted": "-.", "adaptation": ":", "oracle": (0, (6, 2)), OTHER: (0, (3, 1, 1, 1)),
}
# Markers a family moves on to once its colours are used up.
SPARE_MARKERS = ("o", "s", "D", "^", "v", "<", ">", "P", "X", "h", "p", "*")


@dataclass(frozen=True)
class SeriesStyle:
    """How one method is drawn in every figure."""

    colour: str
    marker: str
    linestyle: Any

    def line_kwargs(self) -> dict[str, Any]:
        return {"color": self.colour, "marker": self.marker, "linestyle": self.linestyle}


def family_labels() -> dict[str, str]:
    """Family key -> its title, in report order, ``other`` last."""
    from ltta.tta.methods import FAMILIES  # the methods declare their families; only the figures ask

    return {**FAMILIES, OTHER: "other methods"}


def method_families(methods: Sequence[str], families: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each method's family: ``families`` where given, else the registered method's ``family``."""
    if families is None:
        from ltta.tta import TTA_METHODS

        families = {m: TTA_METHODS.get(m).family for m in methods if m in TTA_METHODS}
    known = family_labels()
    return {m: families.get(m, OTHER) if families.get(m, OTHER) in known else OTHER for m in methods}


def by_family(methods: Sequence[str], families: Mapping[str, str]) -> dict[str, list[str]]:
    """Family -> its methods, families in report order, methods in evaluation order."""
    return {f: members for f in family_labels() if (members := [m for m in methods if families[m] == f])}


def method_styles(methods: Sequence[str], families: Mapping[str, str]) -> dict[str, SeriesStyle]:
    """One style per method, unique: ``(colour, marker, line style)`` differ for any two methods."""
    styles = {}
    for family, members in by_family(methods, families).items():
        first = FAMILY_MARKERS[family]
        markers = [first, *(m for m in SPARE_MARKERS if m != first)]
        ranked = [m for m in members if m != REFERENCE]
        for i, m in enumerate(ranked):
            n = len(OKABE_ITO)
            styles[m] = SeriesStyle(OKABE_ITO[i % n], markers[(i // n) % len(markers)], FAMILY_LINES[family])
        if REFERENCE in members:
            styles[REFERENCE] = SeriesStyle("#000000", first, FAMILY_LINES[family])
    return styles


# ------------------------------------------------------------------ label placement


def _overlaps(a: Any, b: Any, pad: float = 2.0) -> bool:
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad


def _overlap_area(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


#: Where a label may sit relative to its point: radii in points, twelve directions each (right first).
LABEL_RADII = (6.0, 12.0, 20.0, 30.0, 44.0, 60.0)
LABEL_ANGLES = tuple(math.radians(a) for a in (20, -20, 160, 200, 90, 270, 50, -50, 130, 230, 0, 180))


def text_box(annotation: Any, renderer: Any) -> Any:
    """The display-space box of an annotation's text alone (``get_window_extent`` adds its leader line)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    fontsize: float = 7.0
    bold: bool = False
    colour: str = "0.3"


def place_labels(ax: Any, labels: Sequence[Label], marker_points: float = 9.0) -> list[Any]:
    """Annotate each point where its text overlaps no earlier label, no point and stays inside the axes.

    Greedy, in the given order (put the important ones first): for each label the candidate
    positions are tried nearest first; one further out than the first ring gets a thin leader
    line. The figure's layout and the axes' limits must be final before this runs (the boxes are
    measured in display space). Where no position is free the least-overlapping one is used.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0
    half = marker_points * px / 2.0
    from matplotlib.transforms import Bbox

    points = [ax.transData.transform((lab.x, lab.y)) for lab in labels]
    obstacles = [Bbox.from_extents(x - half, y - half, x + half, y + half) for x, y in points]
    placed: list[Any] = []
    annotations = []
    for i, lab in enumerate(labels):
        best: tuple[float, Any, Any] | None = None
        clear = False
        for radius in LABEL_RADII:
            for angle in LABEL_ANGLES:
                dx, dy = radius * math.cos(angle), radius * math.sin(angle)
                ann = ax.annotate(
                    lab.text, (lab.x, lab.y), xytext=(dx, dy), textcoords="offset points",
                    ha="left" if dx > 1 else "right" if dx < -1 else "center",
                    va="bottom" if dy > 1 else "top" if dy < -1 else "center",
                    fontsize=lab.fontsize, fontweight="bold" if lab.bold else "normal", color=lab.colour,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6, "shrinkA": 0, "shrinkB": 3}
                    if radius > LABEL_RADII[0] else None,
                    zorder=5,
                )
                box = text_box(ann, renderer)
                outside = box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1
                cost = sum(_overlap_area(box, b) for b in placed) * 10 + sum(
                    _overlap_area(box, o) for j, o in enumerate(obstacles) if j != i
                ) + (1e6 if outside else 0.0)
                clear = not outside and not any(_overlaps(box, b) for b in placed) and not any(
                    _overlaps(box, o, pad=0.0) for j, o in enumerate(obstacles) if j != i
                )
                if clear:
                    if best is not None:
                        best[1].remove()
                    best = (0.0, ann, box)
                    break
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, ann, box)
                else:
                    ann.remove()
            if clear:  # not best[0] == 0: a box within the padding of another costs 0 without being clear
                break
        assert best is not None
        placed.append(best[2])
        annotations.append(best[1])
    return annotations


# ------------------------------------------------------------------ the figures


def _severity_figure(results: EvalResults, benchmark: Sequence[str], families: Mapping[str, str] | None = None) -> Any:
    from matplotlib.figure import Figure

    methods = results.methods()
    families = method_families(methods, families)
    styles = method_styles(methods, families)
    groups = by_family(methods, families)
    titles = family_labels()
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(4.3 * ncols, 3.3 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    means = {m: results.severity_means(m, benchmark) for m in methods}
    for ax, (family, members) in zip(axes, groups.items()):
        shown = ([REFERENCE] if REFERENCE in methods and REFERENCE not in members else []) + members
        for m in shown:
            xs = sorted(means[m])
            ref = m == REFERENCE
            ax.plot(xs, [means[m][s] for s in xs], label=m, lw=2.2 if ref else 1.6, ms=5, alpha=0.9,
                    zorder=2 if ref else 3, **styles[m].line_kwargs())
        ax.set_title(titles[family], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    ticks = sorted({0, *results.severities()})
    for ax in axes:
        ax.set_xticks(ticks)
    for i, ax in enumerate(axes[: len(groups)]):
        if i + ncols >= len(groups):  # nothing drawn below it: its own tick labels and axis title
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("severity (0 = clean)")
    for ax in axes[::ncols]:
        ax.set_ylabel(f"top-1 error (%)\nmean over {len(benchmark)} corruptions", fontsize=9)
    fig.suptitle("Error by corruption severity, per method family (none, black, in every panel)", fontsize=11)
    return fig


def _heatmap_figure(results: EvalResults, corruptions: Sequence[str], families: Mapping[str, str] | None = None) -> Any:
    from matplotlib.figure import Figure

    groups = by_family(results.methods(), method_families(results.methods(), families))
    methods = [m for members in groups.values() for m in members]
    tables = {m: results.table(m) for m in methods}
    data = [
        [sum(tables[m][c].values()) / len(tables[m][c]) if tables[m].get(c) else float("nan") for m in methods]
        for c in corruptions
    ]
    fig = Figure(figsize=(0.75 * len(methods) + 3.2, 0.38 * len(corruptions) + 1.9))
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
    ax.set_yticks(range(len(corruptions)), corruptions)
    finite = [v for row in data for v in row if v == v]
    mid = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if v < mid else "black")
    edge = 0
    for members in list(groups.values())[:-1]:  # white rules between the families
        edge += len(members)
        ax.axvline(edge - 0.5, color="white", lw=2.5)
    fig.colorbar(image, ax=ax, label="top-1 error (%), mean over severities")
    ax.set_title("Error per corruption and TTA method (columns grouped by family)")
    return fig


def highlighted_methods(methods: Sequence[str]) -> list[str]:
    """The methods of :data:`HIGHLIGHTED` that were evaluated, in evaluation order (``gps`` may be absent)."""
    return [m for m in methods if m in HIGHLIGHTED]


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


COST_PANELS = (("clean_error", "clean test set"), ("mean_corruption_error", "corrupted (benchmark mean)"))


def _cost_figure(
    results: EvalResults, benchmark: Sequence[str], extra: Sequence[str], families: Mapping[str, str] | None = None
) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = results.summary(benchmark, extra)
    methods = list(summary)
    styles = method_styles(methods, method_families(methods, families))
    highlight = highlighted_methods(methods)
    panels = [(key, title) for key, title in COST_PANELS
              if any(s[key] is not None and s["forward_passes"] for s in summary.values())]  # fmt: skip
    # Laid out at the resolution it is saved at: label placement measures the text, in pixels.
    fig = Figure(figsize=(6.0 * max(len(panels), 1), 5.0), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False).ravel()
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.84, wspace=0.2)
    costs = [s["forward_passes"] for s in summary.values() if s["forward_passes"]]
    ticks = cost_ticks(costs)
    for ax, (key, title) in zip(axes, panels):
        pts = [(s["forward_passes"], 100.0 - s[key], m) for m, s in summary.items() if s[key] is not None]
        pts = [p for p in pts if p[0] and p[0] > 0]
        # Highlighted methods last, so they are drawn on top; their labels are placed first.
        for x, y, m in sorted(pts, key=lambda p: p[2] in highlight):
            big = m in highlight
            st = styles[m]
            ax.scatter([x], [y], marker=st.marker, c=[st.colour], s=110 if big else 36, alpha=1.0 if big else 0.8,
                       edgecolors="black" if big else "0.35", linewidths=1.2 if big else 0.5, zorder=4 if big else 3,
                       gid=m)
        front = pareto_front([(x, y) for x, y, _ in pts])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", linestyle="--", color="0.5", lw=1.0,
                label="Pareto frontier: no cheaper method is more accurate", zorder=1)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.margins(x=0.12, y=0.18)
        ax.autoscale_view()
        ax.set_xlim(ax.get_xlim())
        low, high = ax.get_ylim()
        ax.set_ylim(low, min(high, 101.0))  # room for labels, not a 102 % accuracy tick
        ax.set_xlabel("forward passes per image (log scale; exact values in the table)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        order = sorted(pts, key=lambda p: (p[2] not in highlight, p[2] != REFERENCE))
        place_labels(ax, [Label(x, y, m, 9.0 if m in highlight else 7.5, m in highlight,
                                "black" if m in highlight else "0.3") for x, y, m in order])
    fig.suptitle("Accuracy against test-time cost (learned, prior and gps drawn large)", fontsize=11)
    if panels:  # above the panels, so it never hides a point or a label
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.945), fontsize="small", frameon=False)
    return fig


FIGURE_CAPTIONS: dict[str, str] = {
    "error_by_severity.png": "Mean error over the benchmark corruptions at each severity (0 = clean), one panel per "
    "method family, `none` in black in every panel.",
    "corruption_heatmap.png": "Error per corruption (rows) and TTA method (columns, grouped by family), mean over "
    "the evaluated severities.",
    "accuracy_vs_cost.png": "Accuracy against forward passes per image, clean and corrupted in their own panels; "
    "the step lines join the methods no cheaper one beats; learned, prior and gps (where evaluated) are drawn "
    "large with bold labels.",
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
    families: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write the PNGs (error by severity, corruption x method heatmap, accuracy vs cost); return their paths.

    ``families`` maps a method to its family (default: the registered method's ``family``; other
    names are ``other``). The heatmap is left out when no corrupted set was evaluated.
    """
    benchmark, extra = resolve_groups(results, benchmark, extra)
    fams = method_families(results.methods(), families)  # resolved once for the three figures
    out = Path(out_dir)
    corruptions = ordered_corruptions(results, benchmark, extra)
    figures: list[tuple[str, Callable[[], Any]]] = [
        ("error_by_severity.png", lambda: _severity_figure(results, benchmark, fams)),
        ("accuracy_vs_cost.png", lambda: _cost_figure(results, benchmark, extra, fams)),
    ]
    if corruptions:
        figures.insert(1, ("corruption_heatmap.png", lambda: _heatmap_figure(results, corruptions, fams)))
    return [save_figure(make(), out / name) for name, make in figures]
