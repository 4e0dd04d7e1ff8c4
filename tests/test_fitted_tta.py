"""TTA fitted on a validation split (issue 19): greedy policy search and learned aggregation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from ltta.models.small_cnn import SmallCNN
from ltta.tta import build_candidates, build_method
from ltta.tta.aggregation import aggregator_temperature, candidate_logits, fit_aggregator
from ltta.tta.candidates import apply_candidate, parse_candidate
from ltta.tta.gps import (
    GPSMember, GPSPolicy, gps_pool, greedy_policy_search, load_gps_policy, policy_from_search, pool_log_probs,
    save_gps_policy,
)
from ltta.tta.temperature import calibrated_nll, fit_temperature
from tests import test_tta

target = test_tta.target  # the trained colour-channel target (a module fixture), shared


def _reference_calibrated_nll(log_probs: np.ndarray, y: np.ndarray) -> float:
    """NLL after temperature scaling, by a scalar search over log T (scipy), one predictor at a time."""
    z, yt = torch.as_tensor(log_probs, dtype=torch.float64), torch.as_tensor(y)
    res = minimize_scalar(lambda lt: float(F.cross_entropy(z / math.exp(lt), yt)), bounds=(-6.0, 6.0), method="bounded",
                          options={"xatol": 1e-9})
    return float(res.fun)


def _pool(p: int = 7, n: int = 120, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of P noisy predictors of different quality and sharpness on N labelled points."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    signal = torch.linspace(0.5, 3.0, p)[:, None, None] * F.one_hot(y, k)[None]
    scale = torch.linspace(3.0, 0.7, p)[:, None, None]
    return torch.log_softmax(scale * (torch.randn(p, n, k, generator=g) + signal), -1), y


def test_fit_temperature_is_the_nll_minimum_for_every_predictor_at_once() -> None:
    log_probs, y = _pool()
    nll, t = calibrated_nll(log_probs, y)
    for i in range(log_probs.shape[0]):
        assert float(nll[i]) == pytest.approx(_reference_calibrated_nll(log_probs[i].numpy(), y.numpy()), abs=1e-6)
        assert float(t[i]) == pytest.approx(float(fit_temperature(log_probs[i], y)), rel=1e-6)  # batched == one by one
    assert bool((t != 1.0).all())  # none of them was calibrated to begin with


def test_gps_greedy_step_adds_the_member_that_lowers_the_calibrated_nll_most() -> None:
    log_probs, y = _pool()
    steps = greedy_policy_search(log_probs, y, length=3)
    chosen: list[int] = []
    for step in steps:
        scores = []
        for i in range(log_probs.shape[0]):
            members = log_probs[[*chosen, i]]
            ens = torch.logsumexp(members, 0) - math.log(len(members))  # mean softmax, as the reference's logmeansoftmax
            scores.append(_reference_calibrated_nll(ens.numpy(), y.numpy()))
        assert step.member == int(np.argmin(scores))
        assert step.nll == pytest.approx(min(scores), abs=1e-5)
        chosen.append(step.member)


def test_gps_without_calibration_selects_by_plain_nll_and_members_may_repeat() -> None:
    log_probs, y = _pool()
    best_plain = int(np.argmin([float(F.nll_loss(lp, y)) for lp in log_probs]))
    steps = greedy_policy_search(log_probs, y, length=3, calibrate=False)
    assert steps[0].member == best_plain and steps[0].temperature == 1.0
    # One member far better than all others: picked again and again (with replacement, as the reference).
    planted = torch.cat([log_probs, torch.log_softmax(20.0 * F.one_hot(y, 5).float(), -1)[None]])
    assert [s.member for s in greedy_policy_search(planted, y, length=3, calibrate=False)] == [7, 7, 7]


def test_gps_method_averages_its_first_k_members_and_applies_their_temperature(target: SmallCNN) -> None:
    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    members = [GPSMember(candidate="autocontrast"), GPSMember(candidate="identity+hflip"), GPSMember(candidate="zoom:1.2")]
    steps = [{"nll": 1.0, "temperature": t, "error": 0.1} for t in (1.0, 0.5, 2.0)]
    method = build_method("gps", target, policy=GPSPolicy(members, steps), k=2)
    probs = method.predict(x)
    views = [target(apply_candidate(x, parse_candidate(m.candidate))).softmax(1) for m in members[:2]]
    expected = torch.softmax(((views[0] + views[1]) / 2).log() / 0.5, dim=1)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert method.forward_passes == 2.0
    with pytest.raises(ValueError, match="at least k members"):
        build_method("gps", target, policy=GPSPolicy(members, steps), k=4)
    with pytest.raises(ValueError, match="GPSPolicy"):
        build_method("gps", target, k=2)


def test_gps_pool_and_search_on_a_real_target(target: SmallCNN, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 32, 32, generator=g)
    y = target(x).argmax(1)  # labels the target mostly agrees with: a meaningful NLL
    pool = gps_pool(["identity", "identity+hflip"], random_subpolicies=3, ops_per_subpolicy=2, crop_flip_samples=2,
                    generator=torch.Generator().manual_seed(0))
    assert [m.candidate for m in pool[:2]] == ["identity", "identity+hflip"]
    assert all(m.crop_flip and not m.ops for m in pool[2:4]) and all(len(m.ops) == 2 and m.crop_flip for m in pool[4:])
    log_probs = pool_log_probs(target, x, pool, torch.Generator().manual_seed(0), batch_size=16)
    assert log_probs.shape == (7, 40, target.fc.out_features)
    assert torch.allclose(log_probs[0].exp(), target(x).softmax(1), atol=1e-5)
    policy = policy_from_search(pool, greedy_policy_search(log_probs, y, 3), {"pool": len(pool)})
    save_gps_policy(tmp_path / "gps.json", policy)
    back = load_gps_policy(tmp_path / "gps.json")
    assert back.members == policy.members and back.steps == policy.steps
    doc = json.loads((tmp_path / "gps.json").read_text())
    doc["members"][0] = {"ops": [{"op": "Twirl", "level": 0.5}], "crop_flip": True}
    (tmp_path / "gps.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"unknown op 'Twirl'.*rerun the search_gps stage"):
        load_gps_policy(tmp_path / "gps.json")
    with pytest.raises(FileNotFoundError, match="search_gps"):
        load_gps_policy(tmp_path / "missing.json")


def _planted_views(n: int = 600, views: int = 4, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N,A,K] where view 2 carries the label and the other views are mostly noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    z = 2.0 * torch.randn(n, views, k, generator=g)
    z[:, 2] += 3.0 * F.one_hot(y, k)
    z[:, [0, 1, 3]] += 0.3 * F.one_hot(y, k)[:, None]
    return z, y


def test_aug_aggregator_weights_sum_to_one_and_recover_the_planted_view() -> None:
    z, y = _planted_views()
    model, curve = fit_aggregator(z, y, "agg_aug", temperature=1.0, epochs=60, batch_size=200)
    w = model.weights().detach()
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6) and bool((w >= 0).all())
    assert int(w.argmax()) == 2 and float(w[2]) > 0.5
    assert curve[-1] < curve[0]
    mean_err = float((z.mean(1).argmax(1) != y).float().mean())
    assert float((model(z).argmax(1) != y).float().mean()) < mean_err


def test_class_aggregator_keeps_non_negative_per_class_weights_and_favours_the_planted_view() -> None:
    z, y = _planted_views()
    model, curve = fit_aggregator(z, y, "agg_class", temperature=1.0, epochs=60, batch_size=200)
    w = model.weights().detach()
    assert w.shape == (4, 5) and bool((model.weight >= 0).all())  # clamped after every step, as the reference
    assert bool((w.argmax(0) == 2).all())  # for every class, the informative view weighs most
    assert curve[-1] < curve[0]
    start, _ = fit_aggregator(z, y, "agg_class", temperature=1.0, epochs=1, lr=1e-12)
    assert torch.allclose(start.weights(), torch.full((4, 5), 0.25))  # from the plain mean (1/A)


def test_aggregation_method_is_the_aggregator_on_every_candidates_logits(target: SmallCNN) -> None:
    x = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cands = build_candidates(["identity", "identity+hflip", "autocontrast"])
    z = candidate_logits(target, x, cands)
    assert torch.allclose(z[:, 1], target(x.flip(-1)), atol=1e-5)
    y = z[:, 0].argmax(1)
    t = aggregator_temperature(z, y, identity=0)
    model, _ = fit_aggregator(z, y, "agg_aug", temperature=t, epochs=2)
    method = build_method("agg_aug", target, candidates=cands, predictor=model)
    assert torch.allclose(method.predict(x), model(z).softmax(1), atol=1e-5)
    assert method.forward_passes == 3.0
    with pytest.raises(ValueError, match="aggregator over the 24 candidates"):
        build_method("agg_class", target, predictor=model)  # fitted on 3 views, asked for all 24
