"""Ranking losses, the loss predictor network and its trainer (synthetic learnable losses, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr
from torch import nn

from ltta.models.loss_predictor import LossPredictor
from ltta.models.registry import build_model
from ltta.models.wideresnet import wrn_40_2
from ltta.predictor.trainer import (
    PredictorConfig,
    RMSpropTF,
    WeightEMA,
    penalised_parameters,
    predictor_cutout,
    train_predictor,
)
from ltta.predictor.quality import predictor_quality, prior_scores, ranking_quality
from ltta.tta.learned import flops_per_image
from ltta.predictor.ranking import (
    RANKERS,
    build_ranker,
    exact_rank,
    pairwise_sigmoid_rank,
    soft_rank,
    sodeep_style_rank_mse,
    spearman_loss,
)
from ltta.predictor.sodeep import build_sorter

C = 6
_W = torch.randn(12, C, generator=torch.Generator().manual_seed(123))


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images whose per-candidate loss is a linear function of quadrant colour means."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    return x, synthetic_losses(x)


def synthetic_losses(x: torch.Tensor) -> torch.Tensor:
    return (F.adaptive_avg_pool2d(x, 2).flatten(1) - 0.5) @ _W + 2.0


class ExactPredictor(nn.Module):
    """Knows the synthetic loss function: scores = -loss (a perfect ranker)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -synthetic_losses(x) + self.dummy


# ---------------------------------------------------------------- ranking


def _ranker(name: str, temperature: float) -> object:
    """Every registered ranker; ``sodeep`` with an untrained sorter (differentiability needs no training)."""
    torch.manual_seed(0)
    return build_ranker(name, temperature, build_sorter("gruc", 6) if name == "sodeep" else None)


@pytest.mark.parametrize("name", RANKERS.names())
def test_every_ranker_is_differentiable(name: str) -> None:
    ranker = _ranker(name, 0.5)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    if name != "sodeep":  # the sorter's weights are float32
        assert torch.autograd.gradcheck(ranker, (s,))
    for loss_fn in (lambda p, t: spearman_loss(p, t, ranker), lambda p, t: sodeep_style_rank_mse(p, t, ranker, t_easy=0.0)):
        pred = torch.randn(4, 6, requires_grad=True)
        loss_fn(pred, torch.randn(4, 6)).backward()
        assert pred.grad is not None and bool(torch.isfinite(pred.grad).all()) and float(pred.grad.abs().sum()) > 0


def test_sodeep_ranker_needs_a_sorter() -> None:
    with pytest.raises(ValueError, match="train-sorter"):
        build_ranker("sodeep", 0.1)
    with pytest.raises(KeyError, match="soft_rank"):
        build_ranker("neural_sort", 0.1)
    with pytest.raises(ValueError, match="ranker"):
        PredictorConfig(ranker="neural_sort")


@pytest.mark.parametrize("rank_fn", [pairwise_sigmoid_rank, soft_rank])
def test_soft_ranks_tend_to_exact_rank_with_ties(rank_fn) -> None:  # noqa: ANN001
    s = torch.tensor([[0.3, -1.0, 2.0, 0.3, 5.0], [1.0, 1.0, 1.0, 0.0, -2.0]])
    expected = torch.tensor(np.stack([rankdata(r) for r in s.numpy()]), dtype=torch.float32)
    assert torch.equal(exact_rank(s), expected)
    torch.testing.assert_close(rank_fn(s, 1e-4), expected)
    assert not torch.allclose(rank_fn(s, 3.0), expected, atol=0.1)  # a real relaxation at a large temperature
    # Both stay on the rank scale: each row sums to 1 + ... + C, whatever the temperature.
    torch.testing.assert_close(rank_fn(s, 3.0).sum(1), torch.full((2,), 15.0))


def test_soft_rank_is_the_permutahedron_projection() -> None:
    """Blondel et al.: the soft rank is the projection of s / eps onto the permutahedron of (C..1),
    checked against a generic constrained solver on small rows; large eps -> all ranks (C + 1) / 2."""
    from itertools import combinations

    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, generator=g, dtype=torch.float64)
    eps = 0.7
    w = np.arange(4, 0, -1.0)
    for row, got in zip(s.numpy() / eps, soft_rank(s, eps).numpy()):
        cons = [{"type": "eq", "fun": lambda r: r.sum() - w.sum()}]
        cons += [{"type": "ineq", "fun": lambda r, idx=list(sub): w[: len(idx)].sum() - r[idx].sum()}
                 for k in range(1, 4) for sub in combinations(range(4), k)]
        ref = minimize(lambda r, z=row: 0.5 * ((r - z) ** 2).sum(), np.full(4, 2.5), constraints=cons,
                       method="SLSQP", options={"ftol": 1e-12}).x
        np.testing.assert_allclose(got, ref, atol=1e-5)
    torch.testing.assert_close(soft_rank(s, 1e6), torch.full_like(s, 2.5), atol=1e-5, rtol=0)


def test_spearman_loss_equals_one_minus_rho() -> None:
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    rho = np.mean([spearmanr(p, t).statistic for p, t in zip(pred.numpy(), tgt.numpy())])
    for name in ("pairwise_sigmoid", "soft_rank"):
        ranker = build_ranker(name, 1e-4)
        assert float(spearman_loss(pred, tgt, ranker)) == pytest.approx(1 - rho, abs=1e-5)
        assert float(spearman_loss(tgt, tgt, ranker)) == pytest.approx(0.0, abs=1e-6)
        assert float(spearman_loss(-tgt, tgt, ranker)) == pytest.approx(2.0, abs=1e-6)
    assert float(spearman_loss(pred, tgt, exact_rank)) == pytest.approx(1 - rho, abs=1e-6)


def test_sodeep_style_matches_masked_rank_mse() -> None:
    g = torch.Generator().manual_seed(1)
    pred = torch.softmax(torch.randn(8, 12, generator=g), 1)
    tgt = torch.softmax(-torch.rand(8, 12, generator=g) * 3, 1)
    # sodeep/utils.py get_rank: descending rank / n (largest -> 1/n); squared errors <= 0.05 masked.
    rp = (13 - np.stack([rankdata(r) for r in pred.numpy()])) / 12
    rt = (13 - np.stack([rankdata(r) for r in tgt.numpy()])) / 12
    err = (rp - rt) ** 2
    expected = np.mean(err * (err > 0.05))
    assert expected > 0
    for name in ("pairwise_sigmoid", "soft_rank"):
        assert float(sodeep_style_rank_mse(pred, tgt, build_ranker(name, 1e-6))) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- network and pieces


def test_loss_predictor_shape_and_cost() -> None:
    model = build_model("loss_predictor", num_outputs=24, width=16)
    assert isinstance(model, LossPredictor)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 24)
    ratio = flops_per_image(model, 32) / flops_per_image(wrn_40_2(num_classes=100), 32)
    assert 0.01 < ratio < 0.06  # "a few percent of the target", as the public B0-at-64 vs ResNet-50
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    penal = penalised_parameters(model)
    assert penal and not any(id(p) in bn_params for p in penal)
    assert len(penal) + len(bn_params) == len(list(model.parameters()))


def test_rmsprop_tf_step_matches_formula() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = RMSpropTF([p], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9)
    g = torch.tensor([0.5, 3.0])
    ms, mom, w = torch.ones(2), torch.zeros(2), p.detach().clone()
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
        ms = ms + (g * g - ms) * 0.1
        mom = 0.9 * mom + 0.1 * g / torch.sqrt(ms + 1e-3)
        w = w - mom
    torch.testing.assert_close(p.detach(), w)


def test_weight_ema_follows_warmup_schedule() -> None:
    model = nn.Linear(1, 1, bias=False)
    ema = WeightEMA(model, decay=0.999)
    values = [1.0, 3.0, 5.0]
    expected = None
    for t, v in enumerate(values):
        model.weight.data.fill_(v)
        ema.update(model)
        mu = min(0.999, (1 + t) / (10 + t))
        expected = v if expected is None else mu * expected + (1 - mu) * v
    assert float(ema.module.weight) == pytest.approx(expected)


def test_predictor_cutout() -> None:
    x = torch.rand(64, 3, 32, 32)
    out = predictor_cutout(x, 32.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, predictor_cutout(x, 32.0, torch.Generator().manual_seed(0)))
    cut = (out != x).any(1)  # [N,H,W]
    frac = cut.float().mean((1, 2))
    assert 0.2 < float(frac.min()) and float(frac.mean()) == pytest.approx(0.56, abs=0.1)  # (3/4)^2 on average
    grey = out.permute(0, 2, 3, 1)[cut]  # painted pixels: one grey level per image
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 0], grey[:, 2])
    assert torch.equal(predictor_cutout(x, 0.0, torch.Generator()), x)


# ---------------------------------------------------------------- quality and training


def test_ranking_quality_on_a_hand_computed_case() -> None:
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.5]])
    losses = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.1, 0.5]])
    correct = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    q = ranking_quality(scores, losses, correct=correct, identity_index=0)
    # rho per row: 1 (same order), -1 (reversed), 0 (ranks [1,3,2] vs [2.5,2.5,1]: zero covariance).
    assert q["spearman_rho"] == pytest.approx(0.0, abs=1e-6)
    # Top-1 hit: row 1 yes, row 2 no, row 3 yes (its pick ties for the lowest loss).
    assert q["top1_agreement"] == pytest.approx(2 / 3)
    assert q["random_top1_agreement"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert q["chosen_loss"] == pytest.approx((0.1 + 0.3 + 0.1) / 3)
    assert q["oracle_loss"] == pytest.approx(0.1) and q["identity_loss"] == pytest.approx(0.1)
    assert q["random_loss"] == pytest.approx(1.9 / 9)
    assert q["chosen_error"] == pytest.approx(1 / 3) and q["identity_error"] == pytest.approx(1 / 3)
    assert q["oracle_error"] == pytest.approx(1 / 3) and q["random_error"] == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match=r"\[N,C\]"):
        ranking_quality(scores[:, :2], losses)


def test_prior_ranking_is_the_mean_training_loss_order() -> None:
    """The input-independent baseline: one fixed order for every image, from the training table."""
    train = torch.tensor([[0.5, 0.1, 0.9], [0.3, 0.3, 0.7]])  # means 0.4, 0.2, 0.8: candidate 1 first
    prior = prior_scores(train)
    assert torch.allclose(prior, torch.tensor([-0.4, -0.2, -0.8]))
    losses = torch.tensor([[0.2, 0.1, 0.3], [0.1, 0.2, 0.3]])
    correct = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    q = ranking_quality(prior.expand_as(losses), losses, correct=correct, prior=prior)
    # row 1: prior ranks [2, 3, 1] vs -loss ranks [2, 3, 1] -> rho 1; row 2: [2, 3, 1] vs [3, 2, 1] -> rho 0.5
    assert q["prior_rho"] == pytest.approx(0.75) and q["spearman_rho"] == pytest.approx(q["prior_rho"])
    assert q["prior_top1_agreement"] == pytest.approx(0.5) == q["top1_agreement"]
    assert q["prior_loss"] == pytest.approx(0.15) and q["prior_error"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one score per candidate"):
        ranking_quality(losses, losses, prior=prior[:2])


def test_predictor_quality_of_a_perfect_ranker() -> None:
    x, losses = synthetic(64, 5)
    q = predictor_quality(ExactPredictor(), x, losses, identity_index=0)
    assert q["spearman_rho"] == pytest.approx(1.0)
    assert q["top1_agreement"] == 1.0
    assert q["chosen_loss"] == pytest.approx(q["oracle_loss"])
    assert q["oracle_loss"] < q["random_loss"] and q["oracle_loss"] <= q["identity_loss"]
    assert abs(q["random_rho"]) < 0.2
    assert q["random_top1_agreement"] == pytest.approx(1 / C)
    flipped = predictor_quality(ExactPredictor(), x, -losses)
    assert flipped["spearman_rho"] == pytest.approx(-1.0)


def test_train_predictor_learns_the_ranking() -> None:
    x_train, l_train = synthetic(512, 0)
    x_valid, l_valid = synthetic(256, 1)
    cfg = PredictorConfig(epochs=6, batch_size=64, lr=0.01, optimizer="adam", objective="spearman",
                          rank_temperature=0.1, cutout=0.0, ema_decay=0.9)
    torch.manual_seed(0)
    model = LossPredictor(num_outputs=C, width=8)
    seen = []
    ema, history = train_predictor(model, x_train, l_train, x_valid, l_valid, cfg, device="cpu",
                                   on_epoch=lambda e, m: seen.append(e), progress=False)
    assert seen == list(range(1, 7)) and len(history) == 6
    first, last = history[0], history[-1]
    assert last["valid_spearman_rho"] > 0.45
    assert last["valid_spearman_rho"] > first["valid_spearman_rho"] + 0.2
    assert last["valid_spearman_rho"] > last["valid_random_rho"] + 0.4
    assert last["valid_top1_agreement"] > 2 * last["valid_random_top1_agreement"]
    assert last["valid_chosen_loss"] < last["valid_random_loss"]
    assert last["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine to zero
    # The returned model is the EMA copy, not the raw weights.
    assert ema is not model and not ema.training
    raw, avg = model.state_dict(), ema.state_dict()
    assert any(not torch.equal(raw[k], avg[k]) for k in raw if raw[k].is_floating_point())
    q = predictor_quality(ema, x_valid, l_valid)
    assert q["spearman_rho"] == pytest.approx(last["valid_spearman_rho"])


def test_train_predictor_errors() -> None:
    x, losses = synthetic(32, 0)
    cfg = PredictorConfig(epochs=1, batch_size=16, cutout=0.0)
    bad = losses.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_predictor(LossPredictor(C, width=2), x, bad, x, losses, cfg, device="cpu", progress=False)
    broken = LossPredictor(C, width=2)
    with torch.no_grad():
        broken.fc.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="diverged"):
        train_predictor(broken, x, losses, x, losses, cfg, device="cpu", progress=False)
    with pytest.raises(RuntimeError, match="collapsed at epoch 1: Spearman's rho is undefined"):
        train_predictor(LossPredictor(C, width=2), x, losses, x, torch.ones_like(losses), cfg, device="cpu", progress=False)
    with pytest.raises(ValueError, match="objective"):
        PredictorConfig(objective="mse")


@pytest.mark.gpu
def test_train_predictor_on_cuda_with_public_defaults() -> None:
    """The public code's objective and optimiser (sodeep_style, RMSpropTF, cutout) learn on the GPU."""
    x_train, l_train = synthetic(4096, 0)
    x_valid, l_valid = synthetic(512, 1)
    cfg = PredictorConfig(epochs=15, batch_size=256)
    torch.manual_seed(0)
    ema, history = train_predictor(LossPredictor(num_outputs=C, width=16), x_train, l_train, x_valid, l_valid, cfg,
                                   device="cuda", progress=False)
    assert next(ema.parameters()).device.type == "cuda"
    assert history[-1]["valid_spearman_rho"] > 0.5
    assert history[-1]["valid_spearman_rho"] > history[0]["valid_spearman_rho"] + 0.2
