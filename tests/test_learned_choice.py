"""Issue 22's variants: the feature-reading predictor, the abstaining selection, the listwise objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltta.evaluation import CLEAN, EvalSet, evaluate_methods
from ltta.models import build_model
from ltta.models.small_cnn import SmallCNN
from ltta.predictor.trainer import OBJECTIVES, PredictorConfig, train_predictor
from ltta.tta import build_method
from ltta.tta.abstain import choose_margin, predicted_gain, select_abstain
from ltta.predictor.listwise import softmin_cross_entropy
from ltta.tta.target_features import target_features
from tests import test_tta

target = test_tta.target  # the trained colour-channel target (a module fixture), shared


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _head(target: SmallCNN, n_out: int = 24) -> torch.nn.Module:
    """An untrained head whose input batch norm has the statistics of these images' features, so its
    scores differ from image to image."""
    torch.manual_seed(3)
    head = build_model("feature_head", features=target.fc.in_features, classes=3, num_outputs=n_out)
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    head.norm.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        head.train()(torch.cat(target_features(target, x), 1))
    return head.eval()


def _all_probs(target: SmallCNN, x: torch.Tensor) -> torch.Tensor:
    return build_method("oracle", target, candidates="all", k=1)._all_candidate_probs(x)  # [N,C,K]


# ---------------------------------------------------------------- the target's features


def test_target_features_are_the_targets_own_pass(target: SmallCNN, images: torch.Tensor) -> None:
    feats, logits = target_features(target, images, batch_size=7)
    assert feats.shape == (40, target.fc.in_features) and logits.shape == (40, 3)
    assert torch.equal(logits, target(images))  # bitwise: the identity view's prediction comes for free
    with pytest.raises(ValueError, match="feature_map"):
        target_features(torch.nn.Linear(3, 3), images)


def test_feature_head_refuses_another_targets_features(target: SmallCNN) -> None:
    head = _head(target)
    with pytest.raises(ValueError, match="expects 16 features \\+ 3 logits"):
        head(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="feature_head for this target"):
        build_method("feat_pick", target, candidates="all", predictor=build_model("loss_predictor", num_outputs=24, width=4))


# ---------------------------------------------------------------- learned_features


def test_learned_features_averages_its_topk_and_counts_the_views_it_made(target: SmallCNN, images: torch.Tensor) -> None:
    head = _head(target)
    method = build_method("feat_pick", target, candidates="all", k=3, predictor=head, batch_size=16)
    probs = method.predict(images)
    scores, identity_probs = method.scores_and_identity(images)
    sel = scores.topk(3, 1).indices
    expected = _all_probs(target, images).gather(1, sel[:, :, None].expand(-1, -1, 3)).mean(1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.equal(identity_probs, build_method("none", target).predict(images))
    non_identity = float((sel != method.identity_index).sum()) / images.shape[0]
    assert method.forward_passes == pytest.approx(1.0 + non_identity + method.head_cost)
    assert 0 < method.head_cost < 0.05  # a few kFLOPs against the target's pass


def test_abstaining_keeps_identity_alone_below_the_margin(target: SmallCNN, images: torch.Tensor) -> None:
    head = _head(target)
    scores, _ = build_method("feat_pick", target, candidates="all", predictor=head).scores_and_identity(images)
    gain = predicted_gain(scores, 0)
    margin = float(gain.median())
    method = build_method("feat_pick", target, candidates="all", k=3, predictor=head, selection="abstain", threshold=margin)
    probs = method.predict(images)
    none = build_method("none", target).predict(images)
    kept = gain <= margin
    assert 0 < int(kept.sum()) < images.shape[0]
    assert torch.equal(probs[kept], none[kept])  # abstained images: exactly no TTA
    sel = scores.topk(3, 1).indices
    expected = _all_probs(target, images).gather(1, sel[:, :, None].expand(-1, -1, 3)).mean(1)
    assert torch.allclose(probs[~kept], expected[~kept], atol=1e-6)
    views = float((sel[~kept] != 0).sum()) / images.shape[0]
    assert method.forward_passes == pytest.approx(1.0 + views + method.head_cost)  # abstained images cost one pass


def test_learned_with_abstain_costs_the_views_it_made(target: SmallCNN, images: torch.Tensor) -> None:
    torch.manual_seed(4)
    pred = build_model("loss_predictor", num_outputs=24, width=4).eval()
    full = build_method("learned", target, candidates="all", k=3, predictor=pred)
    full.predict(images)
    never = build_method("learned", target, candidates="all", k=3, predictor=pred, selection="abstain", threshold=math.inf)
    probs = never.predict(images)
    assert torch.equal(probs, build_method("none", target).predict(images))
    assert never.forward_passes == pytest.approx(full.forward_passes - 2.0)  # one view instead of three


def test_select_abstain_rows() -> None:
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    sel = select_abstain(scores, 2, identity=0, margin=0.1)
    assert sel.tolist() == [[0, -1], [1, 2]]  # image 0: identity is best (gain 0); image 1: log(0.5/0.2) > 0.1
    with pytest.raises(ValueError, match="margin must be >= 0"):
        select_abstain(scores, 2, 0, -1.0)
    with pytest.raises(ValueError, match="needs the 'identity' candidate"):
        select_abstain(scores, 2, -1, 0.1)


# ---------------------------------------------------------------- the margin


def test_choose_margin_is_the_best_rule_on_validation_and_never_worse_than_identity() -> None:
    g = torch.Generator().manual_seed(5)
    for trial in range(5):
        scores = torch.softmax(torch.randn(60, 6, generator=g) * 2, 1)
        losses = torch.rand(60, 6, generator=g)
        got = choose_margin(scores, losses, identity=0)
        gain = predicted_gain(scores, 0)
        pick = losses.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)

        def rule(m: float) -> float:
            return float(torch.where(gain > m, pick, losses[:, 0]).mean())

        brute = min(rule(m) for m in [0.0, math.inf, *gain.tolist()])
        assert got["valid_loss"] == pytest.approx(brute, abs=1e-6)
        assert rule(got["margin"]) == pytest.approx(got["valid_loss"], abs=1e-6)
        assert got["valid_loss"] <= got["identity_loss"] + 1e-9


def test_choose_margin_abstains_everywhere_when_the_scores_only_hurt() -> None:
    losses = torch.zeros(20, 4)
    losses[:, 1:] = 1.0  # identity is always best
    scores = torch.softmax(torch.tensor([[0.0, 3.0, 1.0, 1.0]]).expand(20, -1), 1)  # predicts candidate 1
    got = choose_margin(scores, losses, identity=0)
    assert got["augmented"] == 0.0 and got["valid_loss"] == 0.0
    assert select_abstain(scores, 2, 0, got["margin"])[:, 1].eq(-1).all()


# ---------------------------------------------------------------- the listwise objective


def test_listwise_objective_is_minimal_at_the_target_and_tends_to_the_oracle_cross_entropy() -> None:
    losses = torch.tensor([[0.3, 0.1, 0.9, 0.5]])
    tau = 0.5
    at_target = (-losses / tau).clone().requires_grad_(True)  # softmax(at_target) = softmin(losses / tau)
    value = softmin_cross_entropy(at_target, losses, tau)
    value.backward()
    assert at_target.grad is not None and at_target.grad.abs().max() < 1e-6
    p = torch.softmax(-losses / tau, 1)
    assert float(value.detach()) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)  # the target's entropy
    scores = torch.tensor([[0.2, 1.5, -1.0, 0.0]])
    oracle_ce = float(F.cross_entropy(scores, losses.argmin(1)))
    assert float(softmin_cross_entropy(scores, losses, 1e-4)) == pytest.approx(oracle_ce, abs=1e-5)
    assert "listwise" in OBJECTIVES
    with pytest.raises(ValueError, match="tau must be > 0"):
        softmin_cross_entropy(scores, losses, 0.0)


# ---------------------------------------------------------------- it reads the input


def test_feature_head_learns_a_planted_input_dependent_best_candidate(target: SmallCNN) -> None:
    """Dark images are best under candidate 3, bright ones under candidate 5: no fixed ranking gets both."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(480, 3, 32, 32, generator=g)
    dark = torch.rand(480, generator=g) < 0.5
    x = torch.where(dark[:, None, None, None], x * 0.3, 0.7 + 0.3 * x)
    losses = 1.0 + 0.05 * torch.rand(480, 8, generator=g)
    best = torch.where(dark, 3, 5)
    losses[torch.arange(480), best] -= 0.5
    feats, logits = target_features(target, x)
    rows = torch.cat([feats, logits], 1)[:, :, None, None]
    head = build_model("feature_head", features=feats.shape[1], classes=3, num_outputs=8, hidden=32)
    cfg = PredictorConfig(epochs=12, batch_size=32, objective="listwise", tau=0.1, cutout=0.0, optimizer="adam", lr=3e-3)
    head, hist = train_predictor(head, rows[:400], losses[:400], rows[400:], losses[400:], cfg, device="cpu", progress=False)
    last = hist[-1]
    assert last["valid_top1_agreement"] > 0.9
    assert last["valid_prior_top1_agreement"] < 0.7  # the fixed ranking gets only one of the two groups


def test_runner_reports_the_mean_passes_of_a_data_dependent_method(target: SmallCNN, images: torch.Tensor) -> None:
    head = _head(target)
    scores, _ = build_method("feat_pick", target, candidates="all", predictor=head).scores_and_identity(images)
    margin = float(predicted_gain(scores, 0).median())
    method = build_method("feat_pick", target, candidates="all", k=3, predictor=head, selection="abstain", threshold=margin)
    y = torch.zeros(40, dtype=torch.long)
    sets = [EvalSet(CLEAN, 0, images, y), EvalSet("contrast", 1, images * 0.2, y)]
    res = evaluate_methods({"m": method}, sets, progress=False)
    per_set = [r.forward_passes for r in res.records]
    assert res.summary(["contrast"], [], None)["m"]["forward_passes"] == pytest.approx(sum(per_set) / 2)
