"""Evaluation: metrics against hand-computed values, the runner on tiny real models, table and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ltta.evaluation import (
    EvalResults,
    EvalSet,
    ece,
    error_rate,
    evaluate_methods,
    mean_corruption_error,
    nll,
    relative_mce,
    results_markdown,
    severity_plot_rows,
    write_plots,
)

# Six predictions over 3 classes; confidences chosen exactly representable (except 0.4).
#   row  probs                 y  pred conf   correct
#   0    .9    .05   .05       0  0    .9     yes
#   1    .75   .125  .125      1  0    .75    no
#   2    .25   .625  .125      1  1    .625   yes
#   3    .5    .25   .25       0  0    .5     yes
#   4    .4    .3    .3        2  0    .4     no
#   5    .0625 .875  .0625     2  1    .875   no
PROBS = torch.tensor(
    [
        [0.9, 0.05, 0.05],
        [0.75, 0.125, 0.125],
        [0.25, 0.625, 0.125],
        [0.5, 0.25, 0.25],
        [0.4, 0.3, 0.3],
        [0.0625, 0.875, 0.0625],
    ]
)
LABELS = torch.tensor([0, 1, 1, 0, 2, 2])


def test_error_and_nll_by_hand() -> None:
    # 3 wrong of 6.
    assert error_rate(PROBS, LABELS) == pytest.approx(50.0)
    # -(ln .9 + ln .125 + ln .625 + ln .5 + ln .3 + ln .0625) / 6
    # = (0.105361 + 2.079442 + 0.470004 + 0.693147 + 1.203973 + 2.772589) / 6 = 7.324516 / 6
    assert nll(PROBS, LABELS) == pytest.approx(1.220753, abs=1e-5)
    # numpy in, same answer.
    assert nll(PROBS.numpy(), LABELS.numpy()) == pytest.approx(1.220753, abs=1e-5)
    # A zero probability on the true class is clamped at 1e-12: -ln(1e-12) = 27.631021.
    assert nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(27.631021, abs=1e-5)


def test_ece_by_hand_with_upper_inclusive_bins() -> None:
    # 4 bins (0,.25] (.25,.5] (.5,.75] (.75,1]; 0.75 sits on a boundary and belongs to the lower bin.
    #   (.25,.5]:  rows 3, 4   acc 1/2  conf (.5+.4)/2 = .45     |gap| .05    weight 2/6
    #   (.5,.75]:  rows 1, 2   acc 1/2  conf (.75+.625)/2 = .6875 |gap| .1875  weight 2/6
    #   (.75,1]:   rows 0, 5   acc 1/2  conf (.9+.875)/2 = .8875  |gap| .3875  weight 2/6
    # ECE = (.05 + .1875 + .3875) / 3 = .208333 -> 20.8333 %
    # (Had 0.75 gone up, the answer would be 33.33 %.)
    assert ece(PROBS, LABELS, n_bins=4) == pytest.approx(20.8333, abs=1e-3)
    # 15 bins of width 1/15: only .9 and .875 share a bin (13/15, 14/15]: acc .5 conf .8875 gap .3875;
    # the rest are alone: gaps .75 (wrong), .375, .5, .4 (wrong) -> (2*.3875 + .75 + .375 + .5 + .4) / 6
    # = 2.8 / 6 = 46.667 %
    assert ece(PROBS, LABELS) == pytest.approx(46.6667, abs=1e-3)
    # Perfectly calibrated: confidence 1 and always right.
    assert ece(torch.eye(3), torch.arange(3)) == pytest.approx(0.0)


def test_metrics_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        error_rate(torch.ones(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        nll(PROBS, torch.tensor([0, 1, 2, 3, 0, 0]))
    with pytest.raises(ValueError, match="rows of probs"):
        ece(PROBS, LABELS[:4])


ERRORS = {"a": {1: 10.0, 2: 20.0}, "b": {1: 30.0, 2: 50.0}}
BASELINE = {"a": {1: 20.0, 2: 20.0}, "b": {1: 40.0, 2: 40.0}}


def test_corruption_means_by_hand() -> None:
    # Per corruption over severities: a 15, b 40; over corruptions: 27.5.
    assert mean_corruption_error(ERRORS, ["a", "b"]) == pytest.approx(27.5)
    assert mean_corruption_error(ERRORS, ["b"]) == pytest.approx(40.0)
    # CE_a = (10+20)/(20+20) = .75, CE_b = (30+50)/(40+40) = 1 -> mCE = 87.5 %.
    assert relative_mce(ERRORS, BASELINE, ["a", "b"]) == pytest.approx(87.5)
    assert relative_mce(BASELINE, BASELINE, ["a", "b"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="'c'"):
        mean_corruption_error(ERRORS, ["a", "c"])
    with pytest.raises(ValueError, match="no errors"):
        relative_mce(ERRORS, {"a": {1: 0.0, 2: 0.0}, "b": BASELINE["b"]}, ["a", "b"])
    with pytest.raises(ValueError, match="severities"):
        relative_mce(ERRORS, {"a": {1: 20.0}, "b": BASELINE["b"]}, ["a", "b"])


class ChannelMeanClassifier:
    """A real (tiny) model: class = the brightest colour channel, via a fixed linear layer."""

    name = "linear"
    forward_passes = 1.0

    def __init__(self) -> None:
        self.layer = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(10.0 * torch.eye(3))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.mean(dim=(2, 3))).softmax(dim=1)


class LabelOracle:
    """Uses the labels, as the oracle does: puts probability .8 on the true class."""

    name = "oracle"
    forward_passes = 12.0

    def predict(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 3), 0.1).scatter_(1, y[:, None], 0.8)


def _images(bright: list[int]) -> torch.Tensor:
    """One 2x2 image per entry; channel ``bright[i]`` at .9, the others at .1."""
    x = torch.full((len(bright), 3, 2, 2), 0.1)
    x[torch.arange(len(bright)), torch.tensor(bright)] = 0.9
    return x


Y = torch.tensor([0, 1, 2, 0])


def _sets() -> list[EvalSet]:
    loaded: list[str] = []

    def load_noisy() -> torch.Tensor:
        loaded.append("gaussian_noise")
        return _images([1, 1, 2, 2])  # rows 0 and 3 now look like other classes

    return [
        EvalSet("clean", 0, _images([0, 1, 2, 0]), Y),
        EvalSet("gaussian_noise", 1, load_noisy, Y),  # loaded lazily
        EvalSet("gaussian_noise", 2, _images([1, 0, 0, 2]), Y),  # all wrong
    ]


@pytest.fixture(scope="module")
def results() -> EvalResults:
    return evaluate_methods({"linear": ChannelMeanClassifier(), "oracle": LabelOracle()}, _sets(), progress=False)


def test_runner_records(results: EvalResults) -> None:
    got = [(r.method, r.corruption, r.severity, r.error, r.n, r.forward_passes) for r in results.records]
    assert got == [
        ("linear", "clean", 0, 0.0, 4, 1.0),
        ("oracle", "clean", 0, 0.0, 4, 12.0),
        ("linear", "gaussian_noise", 1, 50.0, 4, 1.0),
        ("oracle", "gaussian_noise", 1, 0.0, 4, 12.0),
        ("linear", "gaussian_noise", 2, 100.0, 4, 1.0),
        ("oracle", "gaussian_noise", 2, 0.0, 4, 12.0),
    ]
    oracle = results.records[1]
    assert oracle.nll == pytest.approx(-math.log(0.8))
    # Confidence .8 on every image, all right: ECE = |1 - .8| = 20 %.
    assert oracle.ece == pytest.approx(20.0)
    # The linear model: logits 10 * channel means, the bright channel .9 vs .1 -> p = 1/(1+2e^-8).
    p_top = 1.0 / (1.0 + 2.0 * math.exp(-8.0))
    assert results.records[0].nll == pytest.approx(-math.log(p_top), rel=1e-4)
    assert all(r.images_per_s > 0 for r in results.records)


def test_runner_batches_and_validates() -> None:
    chunked = evaluate_methods({"linear": ChannelMeanClassifier(), "oracle": LabelOracle()}, _sets(), batch_size=3, progress=False)
    assert [r.error for r in chunked.records] == [0.0, 0.0, 50.0, 0.0, 100.0, 0.0]
    # Each chunk's labels travel with its images (4 images in chunks of 3 and 1): the oracle's NLL stays exact.
    assert all(r.nll == pytest.approx(-math.log(0.8)) for r in chunked.records if r.method == "oracle")
    with pytest.raises(ValueError, match="2 labels"):
        evaluate_methods({"linear": ChannelMeanClassifier()}, [EvalSet("clean", 0, _images([0]), Y[:2])], progress=False)
    with pytest.raises(ValueError, match="severity >= 1"):
        EvalSet("fog", 0, _images([0]), Y[:1])


def test_summary_and_json(results: EvalResults) -> None:
    summary = results.summary(["gaussian_noise"], [], baseline_method="linear")
    lin, orc = summary["linear"], summary["oracle"]
    assert lin["clean_error"] == 0.0
    assert lin["mean_corruption_error"] == pytest.approx(75.0)  # (50 + 100) / 2
    assert lin["mce_vs_baseline"] == pytest.approx(100.0)
    assert orc["mce_vs_baseline"] == pytest.approx(0.0)
    assert lin["extra_error"] is None
    assert orc["forward_passes"] == 12.0
    assert orc["corruption_ece"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="not evaluated"):
        results.summary(["gaussian_noise"], [], baseline_method="flip")
    with pytest.raises(ValueError, match="'fog'"):
        results.summary(["gaussian_noise", "fog"], [])

    doc = results.to_json(baseline_method="linear")  # default groups: the evaluated ones of the 15 / 4
    json.dumps(doc, allow_nan=False)
    assert doc["errors"]["linear"]["gaussian_noise"] == {"1": 50.0, "2": 100.0, "mean": 75.0}
    assert doc["summary"]["linear"]["mean_corruption_error"] == 75.0
    assert doc["summary"]["oracle"]["clean_nll"] == round(-math.log(0.8), 4)
    assert doc["counts"] == {"benchmark_corruptions": 1, "extra_corruptions": 0, "severities": 2, "clean_images": 4}

    again = EvalResults.from_records(json.loads(json.dumps(results.to_records())))
    assert again.summary() == results.summary()


def test_extra_corruptions_stay_out_of_the_benchmark_means() -> None:
    """An extra (here speckle_noise, one of the release's 4) is reported apart: it moves no benchmark figure."""
    sets = _sets() + [EvalSet("speckle_noise", 1, _images([1, 0, 0, 2]), Y)]  # all wrong
    with_extra = evaluate_methods({"linear": ChannelMeanClassifier()}, sets, progress=False)
    assert with_extra.default_groups() == (["gaussian_noise"], ["speckle_noise"])
    base = evaluate_methods({"linear": ChannelMeanClassifier()}, _sets(), progress=False).summary(baseline_method="linear")
    got = with_extra.summary(baseline_method="linear")["linear"]
    assert got["extra_error"] == pytest.approx(100.0)
    for key in ("mean_corruption_error", "mce_vs_baseline", "corruption_nll", "corruption_ece", "clean_error"):
        assert got[key] == pytest.approx(base["linear"][key]), key
    assert got["mean_corruption_error"] == pytest.approx(75.0)  # 87.5 had the extra been averaged in
    doc = with_extra.to_json(baseline_method="linear")
    assert doc["counts"]["benchmark_corruptions"] == 1 and doc["counts"]["extra_corruptions"] == 1
    with pytest.raises(ValueError, match="unseen"):
        with_extra.summary(unseen=["speckle_noise"])


def _table_blocks(md: str) -> list[list[str]]:
    blocks, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def test_markdown_table(results: EvalResults) -> None:
    meta = {"dataset": "toy", "target arch": "linear", "git commit": "abc123"}
    md = results_markdown(results, title="Toy results", meta=meta, baseline_method="linear")
    assert md.startswith("# Toy results\n")
    assert "- **dataset**: toy" in md and "- **git commit**: abc123" in md
    blocks = _table_blocks(md)
    assert len(blocks) == 3  # the summary, the RobustBench view (accuracy), error per corruption
    for block in blocks:
        n_cols = block[0].count("|") - 1
        assert block[1].count("|") - 1 == n_cols
        assert all(set(c.strip()) <= set(":-") for c in block[1].strip("|").split("|"))
        assert all(row.count("|") - 1 == n_cols for row in block)
    main, robust, per = blocks
    assert len(main) == 4 and len(robust) == 4 and len(per) == 4  # header, separator, 2 methods
    assert robust[2] == "| linear | 25.00 | n/a |"  # severities 1-2 only: all-severity mean, no severity 5
    assert main[2].startswith("| linear | 0.00 | 75.00 | n/a | 100.0 |")
    assert main[3].startswith("| oracle | 0.00 | 0.00 | n/a | 0.0 |")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in main]
    assert cells[0][9] == "Fwd passes/img" and [cells[2][9], cells[3][9]] == ["1", "12"]
    assert cells[3][7:9] == ["20.00", "20.00"]  # oracle's clean and corrupted ECE
    assert per[0] == "| Method | gaussian_noise |"
    assert per[2] == "| linear | 75.00 |"


def test_plots_and_plot_rows(results: EvalResults, tmp_path: Path) -> None:
    rows = severity_plot_rows(results)
    assert rows == [
        {"method": "linear", "severity": 0, "error": 0.0},
        {"method": "linear", "severity": 1, "error": 50.0},
        {"method": "linear", "severity": 2, "error": 100.0},
        {"method": "oracle", "severity": 0, "error": 0.0},
        {"method": "oracle", "severity": 1, "error": 0.0},
        {"method": "oracle", "severity": 2, "error": 0.0},
    ]
    paths = write_plots(results, tmp_path / "plots")
    assert [p.name for p in paths] == ["error_by_severity.png", "corruption_heatmap.png", "accuracy_vs_cost.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert sorted(q.name for q in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp files


@pytest.mark.gpu
def test_runner_on_cuda_matches_cpu() -> None:
    dev = torch.device("cuda")
    model = ChannelMeanClassifier()
    model.layer.to(dev)
    sets = [EvalSet(s.corruption, s.severity, s.images().to(dev), s.y.to(dev)) for s in _sets()]
    res = evaluate_methods({"linear": model}, sets, progress=False)
    assert [r.error for r in res.records] == [0.0, 50.0, 100.0]
    assert np.isfinite([r.images_per_s for r in res.records]).all()


def test_pareto_front_keeps_only_methods_no_cheaper_one_beats() -> None:
    from ltta.evaluation.figures import pareto_front

    pts = [(1.0, 80.0), (2.0, 79.0), (5.0, 85.0), (5.5748, 84.0), (24.0, 90.0), (3.0, 85.0)]
    assert pareto_front(pts) == [(1.0, 80.0), (3.0, 85.0), (24.0, 90.0)]
    assert pareto_front([(2.0, 50.0), (2.0, 60.0)]) == [(2.0, 60.0)]  # same cost: the better one


def test_cost_axis_ticks_are_distinct_integers_and_colours_are_colour_blind_safe(results: EvalResults) -> None:
    from ltta.evaluation.figures import OKABE_ITO, _cost_figure, cost_ticks, figures_markdown, method_families, method_styles

    assert cost_ticks([1.0, 2.0, 5.0, 5.5748, 24.0]) == [1, 2, 5, 6, 24]  # no "5" on top of "5.5748"
    fig = _cost_figure(results, ["gaussian_noise"], [])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels and all(x.isdigit() for x in labels) and len(set(labels)) == len(labels)
    assert any("Pareto" in t.get_text() for t in fig.legends[0].get_texts())
    styles = method_styles(results.methods(), method_families(results.methods()))
    assert {st.colour for st in styles.values()} <= {*OKABE_ITO, "#000000"}
    md = figures_markdown(["accuracy_vs_cost.png"])
    assert "](figures/accuracy_vs_cost.png)" in md and "step lines" in md
