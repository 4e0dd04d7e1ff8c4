"""AugMix (batched ops, mixture, JSD loss) and the trainer's augmix / policy modes, on real digits."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ltta.models import build_model
from ltta.training.augmix import AUGMIX_OPS, apply_chain_step, augmix, jsd_loss, mix
from ltta.training import CheckpointMismatchError, TrainConfig, evaluate_classifier, train_classifier
from ltta.training.modes import TRAIN_MODES
from ltta.training.preparation import cutout_default
from ltta.transforms import functional as TF
from ltta.transforms.policy import CompiledPolicy, OpSpec, Policy
from test_training import assert_kill_and_resume_is_exact


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- augmix itself


def test_augmix_shape_range_determinism_and_per_sample_draws(digits) -> None:
    x = digits[0][:16]
    out = augmix(x, _gen(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, augmix(x, _gen(0)))  # same seed, same images
    assert not torch.equal(out, augmix(x, _gen(1)))
    # Sixteen copies of one digit: every copy gets its own chains and mixing weights.
    same = x[:1].expand(16, -1, -1, -1).contiguous()
    views = augmix(same, _gen(0)).flatten(1)
    assert torch.cdist(views, views).add(torch.eye(16) * 1e9).min() > 1e-3
    assert (views - same.flatten(1)).abs().amax(1).min() > 0  # none left unchanged
    # The schedule does not change the draws: dense (GPU path) == subset (CPU path).
    torch.testing.assert_close(augmix(x, _gen(3), strategy="dense"), augmix(x, _gen(3), strategy="subset"))
    with pytest.raises(ValueError, match="severity"):
        augmix(x, _gen(0), severity=11)


def test_mix_is_the_identity_at_m_zero_and_the_weighted_chains_at_m_one() -> None:
    g = _gen(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    chains = torch.rand(3, 4, 3, 8, 8, generator=g)
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.equal(mix(x, chains, w, torch.zeros(4)), x)
    expected = torch.einsum("nw,wnchv->nchv", w, chains)
    torch.testing.assert_close(mix(x, chains, w, torch.ones(4)), expected)
    half = mix(x, chains, w, torch.full((4,), 0.25))
    torch.testing.assert_close(half, 0.75 * x + 0.25 * expected)


def test_each_op_at_the_reference_magnitudes() -> None:
    """augmentations.py at a given level: int(level*maxval/10) (float for shear), sign for geometry,
    PIL BILINEAR, black outside; inactive images untouched."""
    x = torch.rand(7, 3, 32, 32, generator=_gen(0))
    names = ["rotate", "shear_x", "shear_y", "translate_x", "translate_y", "posterize", "solarize"]
    op = torch.tensor([AUGMIX_OPS.index(n) for n in names])
    level = torch.tensor([2.5, 2.0, 1.0, 3.0, 1.0, 2.5, 1.0], dtype=torch.float64)
    sign = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    out = apply_chain_step(x, op, level, sign, torch.ones(7, dtype=torch.bool), "subset")
    bil = {"mode": "bilinear", "fill": 0.0}
    expected = [
        TF.rotate(x[0:1], -7.0, **bil),  # int(2.5 * 30 / 10) = 7 degrees, negated
        TF.shear_x(x[1:2], 0.06, **bil),  # 2.0 * 0.3 / 10
        TF.shear_y(x[2:3], -0.03, **bil),
        TF.translate_x(x[3:4], -3.0, **bil),  # int(3.0 * (32/3) / 10) = 3 px; PIL's (1,0,3,...) moves left
        TF.translate_y(x[4:5], 1.0, **bil),  # int(1.0667) = 1, negated: PIL's (1,0,0,0,1,-1) moves down
        TF.posterize(x[5:6], 3),  # 4 - int(2.5 * 4 / 10) = 3 bits
        TF.solarize(x[6:7], 231),  # 256 - int(1.0 * 256 / 10)
    ]
    for i, want in enumerate(expected):
        torch.testing.assert_close(out[i : i + 1], want, msg=names[i])
    inactive = torch.tensor([True, False, True, False, True, False, True])
    partial = apply_chain_step(x, op, level, sign, inactive, "dense")
    assert torch.equal(partial[~inactive], x[~inactive])
    torch.testing.assert_close(partial[inactive], out[inactive])
    assert "contrast" not in AUGMIX_OPS and "brightness" not in AUGMIX_OPS  # overlap the test corruptions


# ---------------------------------------------------------------- the JSD term


def test_jsd_matches_a_hand_computed_value() -> None:
    lc = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    l1 = np.array([[1.0, 1.0, 0.0], [-2.0, 1.0, 0.5]])
    l2 = np.array([[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]])

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps = [softmax(v) for v in (lc, l1, l2)]
    m = np.clip(sum(ps) / 3, 1e-7, 1)
    kls = [np.sum(p * (np.log(p) - np.log(m))) / 2 for p in ps]  # batchmean over 2 images
    expected = sum(kls) / 3
    got = jsd_loss(*(torch.tensor(v, dtype=torch.float32) for v in (lc, l1, l2)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert 0.05 < expected < 0.3  # a real, non-trivial divergence


def test_jsd_is_zero_for_equal_predictions_and_symmetric() -> None:
    logits = torch.randn(5, 10, generator=_gen(0))
    assert jsd_loss(logits, logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    a, b, c = torch.randn(3, 5, 10, generator=_gen(1))
    assert jsd_loss(a, b, c).item() == pytest.approx(jsd_loss(c, a, b).item(), rel=1e-5)
    assert jsd_loss(a, b, c).item() > 0


# ---------------------------------------------------------------- trainer modes


def test_augmix_mode_trains_small_cnn(digits) -> None:
    x, y, xv, yv = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, width=8)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, mode="augmix")
    history = train_classifier(model, x, y, cfg, x_val=xv, y_val=yv, progress=False)
    losses = [h["train_loss"] for h in history]  # CE(clean) + 12 * JSD
    assert losses[1] < losses[0] - 0.05 and losses[0] < math.log(10) + 0.5
    assert history[1]["train_error"] < history[0]["train_error"]  # error of the clean third
    assert history[-1]["val_error"] < 0.8  # learning (chance is 0.9; about 0.7 here)
    assert evaluate_classifier(model, xv, yv)["error"] == pytest.approx(history[-1]["val_error"])


def test_augmix_mode_resumes_exactly(digits, tmp_path: Path) -> None:
    x, y = digits[0][:96], digits[1][:96]
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, mode="augmix", seed=5)
    build = lambda: build_model("small_cnn", num_classes=10, width=4)  # noqa: E731
    ckpt = tmp_path / "augmix.ckpt"
    assert_kill_and_resume_is_exact(build, x, y, cfg, ckpt, seed=7)
    # The AugMix settings are part of the run: other ones refuse the checkpoint.
    with pytest.raises(CheckpointMismatchError, match="jsd_weight"):
        train_classifier(build(), x, y, dataclasses.replace(cfg, jsd_weight=1.0), checkpoint_path=ckpt,
                         progress=False)  # fmt: skip


def test_policy_mode_needs_a_policy_and_pins_it_in_the_checkpoint(digits, tmp_path: Path) -> None:
    x, y = digits[0][:64], digits[1][:64]
    cfg = TrainConfig(epochs=1, batch_size=32, mode="policy", cutout=16)
    with pytest.raises(ValueError, match=r"mode 'policy' .* no extra_augment .*CompiledPolicy\(load_policy"):
        train_classifier(build_model("small_cnn", width=4), x, y, cfg, progress=False)
    policy = CompiledPolicy(Policy([[OpSpec("Rotate", 0.8, 0.6), OpSpec("Equalize", 0.5, 0.0)]]))
    ckpt = tmp_path / "policy.ckpt"
    history = train_classifier(build_model("small_cnn", width=4), x, y, cfg, extra_augment=policy,
                               checkpoint_path=ckpt, progress=False)  # fmt: skip
    assert math.isfinite(history[0]["train_loss"])
    other = CompiledPolicy(Policy([[OpSpec("Rotate", 0.8, 0.7), OpSpec("Equalize", 0.5, 0.0)]]))
    with pytest.raises(CheckpointMismatchError, match="extra_augment_policy"):
        train_classifier(build_model("small_cnn", width=4), x, y, cfg, extra_augment=other, checkpoint_path=ckpt,
                         progress=False)  # fmt: skip


def test_cutout_default_is_faas_darts_cutout() -> None:
    """FastAutoAugment/data.py CutoutDefault: integer centre, [c - L//2, c + L//2) clipped, mean fill."""
    x = torch.rand(400, 3, 32, 32, generator=_gen(0))
    fill = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    out = cutout_default(x, _gen(1), 16, fill)
    painted = (out != x).any(1)  # [N,H,W]
    rows, cols = painted.any(2), painted.any(1)
    heights, widths = rows.sum(1), cols.sum(1)
    assert int(heights.max()) == 16 and int(widths.max()) == 16  # a full 16 x 16 square inside
    assert int(heights.min()) == 8 and int(widths.min()) == 8  # centre on the border: half of it
    assert torch.equal(painted.sum((1, 2)), heights * widths)  # one axis-aligned rectangle each
    assert torch.allclose(out.permute(0, 2, 3, 1)[painted], fill.view(3).expand(int(painted.sum()), 3))
    assert torch.equal(cutout_default(x, _gen(1), 0, fill), x)
    assert torch.equal(out, cutout_default(x, _gen(1), 16, fill))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "mixup"}, "mode 'mixup' is unknown; choose one of standard, augmix, policy, auxiliary"),
        ({"mode": "augmix", "cutout": 16}, "cutout must be 0 in mode 'augmix'"),
        ({"cutout": -1}, "cutout must be"),
        ({"augmix_depth": 0}, "augmix_depth must be -1"),
        ({"augmix_width": 0}, "augmix_width"),
        ({"augmix_severity": 11}, "augmix_severity"),
        ({"jsd_weight": float("nan")}, "jsd_weight"),
    ],
)
def test_train_config_rejects_bad_mode_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(epochs=2, **kwargs)
    assert set(TRAIN_MODES.names()) == {"standard", "augmix", "policy", "auxiliary"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_augmix_matches_its_own_seed_and_trains(digits) -> None:
    x, y = (t[:128].cuda() for t in digits[:2])
    g = torch.Generator(device="cuda")
    a = augmix(x, g.manual_seed(0))
    assert a.device.type == "cuda" and torch.equal(a, augmix(x, g.manual_seed(0)))
    torch.testing.assert_close(a, augmix(x, g.manual_seed(0), strategy="subset"))
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, width=8).cuda()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, mode="augmix")
    history = train_classifier(model, x, y, cfg, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
