"""The figures stay readable at 15-20 methods: one style per method, grouped by family, no label on another."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from ltta.evaluation import CLEAN, EvalRecord, EvalResults, write_plots
from ltta.evaluation.figures import (
    OTHER,
    REFERENCE,
    _cost_figure,
    _heatmap_figure,
    _severity_figure,
    by_family,
    method_families,
    method_styles,
    text_box,
)
from ltta.io import FIGURE_DPI
from ltta.tta import FAMILIES, TTA_METHODS

CORRUPTIONS = ("gaussian_noise", "fog", "contrast")
#: Five methods beyond the registered fifteen, as a user's own or a later issue's would be.
EXTRA_METHODS = ("mine_a", "mine_b", "mine_c", "mine_d", "mine_e")


def _results(methods: list[str], passes: dict[str, float], error: dict[str, float]) -> EvalResults:
    rows = []
    for m in methods:
        rows.append(EvalRecord(m, CLEAN, 0, error[m] / 3, 0.5, 2.0, 100, 100.0, passes[m]))
        for c, s in itertools.product(CORRUPTIONS, (1, 3, 5)):
            rows.append(EvalRecord(m, c, s, min(100.0, error[m] + 4.0 * s), 0.5, 2.0, 100, 100.0, passes[m]))
    return EvalResults(rows)


@pytest.fixture(scope="module")
def crowded() -> EvalResults:
    """20 methods, crowded the way real runs are: several at 1 pass with near-equal errors (none,
    bn_adapt, tent, ...), pairs at the same cost and error (oracle and agg_aug at 24 passes)."""
    methods = TTA_METHODS.names() + list(EXTRA_METHODS)
    passes = {"none": 1, "bn_adapt": 1, "tent": 2, "flip": 2, "five_crop": 5, "ten_crop": 10, "random": 3,
              "policy": 4, "learned": 5.5748, "prior": 3, "oracle": 24, "agg_aug": 24, "agg_class": 24, "gps": 3,
              "feat_pick": 5.5, "mine_a": 1, "mine_b": 1, "mine_c": 3, "mine_d": 24, "mine_e": 5}  # fmt: skip
    error = {m: 20.0 + (i % 4) * 0.2 for i, m in enumerate(methods)}
    error["oracle"] = error["agg_aug"] = 10.0
    return _results(methods, passes, error)


def test_every_registered_method_declares_a_known_family() -> None:
    for name in TTA_METHODS.names():
        assert TTA_METHODS.get(name).family in FAMILIES, name
    fams = method_families(["none", "tent", "gps", "learned", "oracle", "mine_a"])
    assert fams == {"none": "classical", "tent": "adaptation", "gps": "fitted", "learned": "learned",
                    "oracle": "oracle", "mine_a": OTHER}  # fmt: skip
    assert method_families(["mine_a"], {"mine_a": "learned"}) == {"mine_a": "learned"}
    assert method_families(["mine_a"], {"mine_a": "no such family"}) == {"mine_a": OTHER}


def test_no_two_methods_share_a_style_even_forty_in_one_family() -> None:
    many = [f"m{i}" for i in range(40)]
    styles = method_styles(many, {m: "learned" for m in many})
    assert len({(s.colour, s.marker, str(s.linestyle)) for s in styles.values()}) == 40
    registered = TTA_METHODS.names() + list(EXTRA_METHODS)
    styles = method_styles(registered, method_families(registered))
    assert len({(s.colour, s.marker, str(s.linestyle)) for s in styles.values()}) == len(registered)
    assert styles[REFERENCE].colour == "#000000"


def test_severity_figure_one_panel_per_family_with_none_in_each_and_unique_styles(crowded: EvalResults) -> None:
    fig = _severity_figure(crowded, list(CORRUPTIONS))
    groups = by_family(crowded.methods(), method_families(crowded.methods()))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(groups) == 6  # five families and the unregistered methods
    seen: dict[str, tuple] = {}
    for ax, members in zip(panels, groups.values()):
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels[0] == REFERENCE and set(labels[1:]) | {REFERENCE} == set(members) | {REFERENCE}
        for line in ax.get_lines():
            style = (line.get_color(), line.get_marker(), line.get_linestyle())
            assert seen.setdefault(line.get_label(), style) == style  # none looks the same in every panel
    assert len(set(seen.values())) == len(seen) == 20


def _overlap(a, b) -> bool:  # noqa: ANN001 (matplotlib Bbox)
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_cost_figure_places_twenty_labels_without_overlap_in_two_panels(crowded: EvalResults) -> None:
    fig = _cost_figure(crowded, list(CORRUPTIONS), [])
    assert [ax.get_title() for ax in fig.axes] == ["clean test set", "corrupted (benchmark mean)"]
    assert fig.dpi == FIGURE_DPI  # laid out at the resolution the PNG is written at
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        boxes = {t.get_text(): text_box(t, renderer) for t in ax.texts}
        assert set(boxes) == set(crowded.methods())
        for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
            assert not _overlap(box_a, box_b), f"{ax.get_title()}: labels {a!r} and {b!r} overlap"
        legend = fig.legends[0].get_window_extent(renderer)
        for name, box in boxes.items():
            assert not _overlap(box, legend), name
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
        # a label sits near its own point (a leader line joins the ones moved further out)
        for t in ax.texts:
            px, py = ax.transData.transform(t.xy)
            box = text_box(t, renderer)
            gap = math.hypot(max(box.x0 - px, 0, px - box.x1), max(box.y0 - py, 0, py - box.y1))
            assert gap < 70 * fig.dpi / 72, t.get_text()


def test_cost_figure_labels_the_same_without_overlap_when_saved(crowded: EvalResults, tmp_path: Path) -> None:
    """The PNG is what users see: its labels, measured at the saved resolution, do not overlap either."""
    paths = write_plots(crowded, tmp_path)
    assert [p.name for p in paths] == ["error_by_severity.png", "corruption_heatmap.png", "accuracy_vs_cost.png"]
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_heatmap_columns_are_grouped_by_family(crowded: EvalResults) -> None:
    ax = _heatmap_figure(crowded, list(CORRUPTIONS)).axes[0]
    columns = [t.get_text() for t in ax.get_xticklabels()]
    fams = method_families(columns)
    order = list(FAMILIES) + [OTHER]
    ranks = [order.index(fams[c]) for c in columns]
    assert ranks == sorted(ranks) and sorted(columns) == sorted(crowded.methods())
