"""Test-time adaptation baselines beside the TTA methods: BN-statistics adaptation and TENT (issue 19)."""

from __future__ import annotations

import pytest
import torch

from ltta.evaluation import CLEAN, EvalSet, evaluate_methods
from ltta.models.small_cnn import SmallCNN
from ltta.tta import build_method
from ltta.tta.tent import softmax_entropy
from tests import test_tta

target = test_tta.target  # the trained colour-channel target (a module fixture), shared


@pytest.fixture(scope="module")
def shifted() -> torch.Tensor:
    """Darker, lower-contrast images than the target saw: a covariate shift."""
    return 0.2 + 0.3 * torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(8))


def test_bn_adapt_with_a_huge_prior_is_no_adaptation(target: SmallCNN, shifted: torch.Tensor) -> None:
    none = build_method("none", target).predict(shifted)
    huge = build_method("bn_adapt", target, bn_prior=1e12, batch_size=16).predict(shifted)
    assert torch.allclose(huge, none, atol=1e-5)
    full = build_method("bn_adapt", target, bn_prior=0.0, batch_size=16).predict(shifted)
    assert (full - none).abs().max() > 1e-2  # the test batch's own statistics change the prediction


def test_bn_adapt_normalises_with_the_mix_of_source_and_batch_statistics(target: SmallCNN, shifted: torch.Tensor) -> None:
    method = build_method("bn_adapt", target, bn_prior=16.0, batch_size=32)
    first = method.adapted.features[0][1]  # conv -> PriorBatchNorm2d -> relu -> pool
    x = target.features[0][0](target.normalize(shifted))
    bn = target.features[0][1]
    w = 16.0 / (16.0 + 32)
    mean = w * bn.running_mean + (1 - w) * x.mean((0, 2, 3))
    var = w * bn.running_var + (1 - w) * x.var((0, 2, 3), unbiased=True)
    expected = (x - mean[None, :, None, None]) / (var[None, :, None, None] + bn.eps).sqrt() * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(first(x), expected, atol=1e-5)
    assert method.forward_passes == 1.0 and method.adapts_on_test_stream


def test_tent_updates_only_the_bn_affine_parameters_and_lowers_the_entropy(target: SmallCNN, shifted: torch.Tensor) -> None:
    source = {n: p.detach().clone() for n, p in target.state_dict().items()}
    method = build_method("tent", target, batch_size=32)
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    with torch.no_grad():
        h0 = float(softmax_entropy(method.model(shifted)).mean())
    for _ in range(5):
        method.predict(shifted)
    changed = {n for n, p in method.model.named_parameters() if not torch.equal(p, before[n])}
    bn_affine = {n for n, m in method.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for n in (f"{n}.weight", f"{n}.bias")}
    assert changed and changed <= bn_affine  # nothing but BN scales and shifts moved
    with torch.no_grad():
        h1 = float(softmax_entropy(method.model(shifted)).mean())
    assert h1 < h0
    assert all(torch.equal(v, source[n]) for n, v in target.state_dict().items())  # the shared target is untouched
    assert method.adapts_on_test_stream and 1.5 < method.forward_passes < 4.0  # forward + backward, in forward FLOPs


def test_tent_resets_between_corrupted_sets(target: SmallCNN, shifted: torch.Tensor) -> None:
    y = torch.zeros(32, dtype=torch.long)
    method = build_method("tent", target, batch_size=16)
    first = method.predict(shifted)
    method.predict(shifted)  # adapted further: a second pass over the same set differs
    assert not torch.allclose(method.predict(shifted), first)
    method.reset()
    assert torch.equal(method.predict(shifted), first)  # the source model and a fresh optimiser again
    sets = [EvalSet("contrast", 1, shifted, y), EvalSet("fog", 1, shifted, y), EvalSet(CLEAN, 0, shifted, y)]
    res = evaluate_methods({"tent": build_method("tent", target, batch_size=16)}, sets, progress=False)
    errors = {r.corruption: (r.error, r.nll) for r in res.records}
    assert errors["contrast"] == errors["fog"] == errors[CLEAN]  # the runner resets before every set


def test_the_stream_batch_is_per_method_and_the_tent_protocol_sets_200(target: SmallCNN, shifted: torch.Tensor) -> None:
    """TENT's numbers depend on its test-stream batch; the runner feeds each method its own, so tent
    at 16 beside a method at 32 equals tent run alone at 16, and differs from tent at 32."""
    from ltta.evaluation.protocols import PROTOCOLS, method_batch_sizes

    y = torch.zeros(shifted.shape[0], dtype=torch.long)
    sets = [EvalSet("fog", 5, shifted, y)]

    def err(size: int) -> float:
        method = build_method("tent", target, batch_size=size)
        return evaluate_methods({"tent": method}, sets, batch_size=size, progress=False).records[0].nll

    mixed = evaluate_methods({"tent": build_method("tent", target, batch_size=16), "none": build_method("none", target)},
                             sets, batch_size=32, method_batch_sizes={"tent": 16}, progress=False).records
    assert mixed[0].nll == err(16) != err(32)
    assert PROTOCOLS.get("tent").batch_sizes == {"tent": 200, "bn_adapt": 200}  # DequanWang/tent cfgs/tent.yaml
    assert method_batch_sizes("tent", ["none", "tent", "bn_adapt"], 512) == {"none": 512, "tent": 200, "bn_adapt": 200}
    assert method_batch_sizes("tent", ["tent"], 512, {"tent": 128}) == {"tent": 128}
    assert method_batch_sizes("ltta", ["tent"], 512) == {"tent": 512}
