"""Auxiliary Training (Zhang et al., CVPR 2020): the families against Pillow, selective batch norm,
the shared trunk, the loss against the reference's per-family passes, the penalty's schedule, and
the trainer's ``auxiliary`` mode (learning, exact resume, a plain classifier handed back)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter
from test_training import assert_kill_and_resume_is_exact

from ltta.corruptions.names import ALL_CORRUPTIONS
from ltta.model_io import load_model_file, save_model_file
from ltta.models import build_model
from ltta.models.auxiliary import AuxiliaryNet, SelectiveBatchNorm2d
from ltta.training.modes.auxiliary import (
    AUX_FAMILIES,
    DEFAULT_FAMILIES,
    FAMILY_OVERLAPS,
    attach_auxiliary,
    auxiliary_loss,
    auxiliary_merge_weight,
    pil_gaussian_blur,
)
from ltta.training import TrainConfig, evaluate_classifier, train_classifier
from ltta.training.modes import TRAIN_MODES, Forward
from ltta.transforms import functional as TF


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _small(width: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, width=width)


def _to_u8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- families


def test_blur_family_is_pillows_gaussian_blur() -> None:
    """train.py's ``GaussianBlur(1.0)`` is Pillow's 3-pass extended box blur: within Pillow's own
    per-pass 8-bit rounding of it (a true Gaussian of sigma 1 is off by up to 13 levels here)."""
    arr = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    x = torch.tensor(arr).permute(0, 3, 1, 2).float() / 255
    ours = _to_u8(AUX_FAMILIES.get("blur")(x, _gen(0))).astype(int)
    ref = np.stack([np.array(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.0))) for a in arr]).astype(int)
    assert np.abs(ours - ref).max() <= 2 and np.abs(ours - ref).mean() < 0.6
    assert torch.equal(pil_gaussian_blur(x, 0.0), x)


def test_colour_jitter_family_is_torchvisions_on_pil(digits) -> None:
    """ColorJitter(0.5, 0.5, 0.5, 0) on PIL images: three ImageEnhance ops in a random order per
    image, factors uniform in [0.5, 1.5]. Replay the family's draws through Pillow itself."""
    x = digits[0][:6] * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)  # coloured, so saturation matters
    out = AUX_FAMILIES.get("contrast")(x, _gen(5))
    g = _gen(5)
    factors = 1.0 + 0.5 * (2.0 * torch.rand(3, 6, generator=g) - 1.0)
    order = torch.rand(6, 3, generator=g).argsort(dim=1)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for i, img in enumerate(_to_u8(x)):
        pil = Image.fromarray(img)
        for op in order[i].tolist():
            pil = enhancers[op](pil).enhance(float(factors[op, i]))
        diff = np.abs(np.array(pil).astype(int) - _to_u8(out[i : i + 1])[0].astype(int))
        assert diff.max() <= 4, (i, diff.max())  # Pillow truncates to 8 bits after each of the 3 ops
    assert float(factors.min()) >= 0.5 and float(factors.max()) <= 1.5
    assert len({tuple(o) for o in order.tolist()}) > 1  # the order is drawn per image


def test_rotate_and_noise_families_draw_per_image(digits) -> None:
    x = digits[0][:1].expand(8, -1, -1, -1).contiguous()  # eight copies of one digit
    rot = AUX_FAMILIES.get("rotate")(x, _gen(1))
    angles = (2.0 * torch.rand(8, generator=_gen(1)) - 1.0) * 30.0
    assert float(angles.abs().max()) <= 30.0
    assert torch.equal(rot, TF.rotate(x, angles, fill=0.0, mode="nearest"))  # PIL's NEAREST, black fill
    noisy = AUX_FAMILIES.get("noise")(x, _gen(2))
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 1.0
    inner = (x > 0.2) & (x < 0.8)  # away from the clip: the noise's spread is 20 levels
    assert abs(float((noisy - x)[inner].std()) - 20 / 255) < 0.01
    assert set(FAMILY_OVERLAPS) == set(AUX_FAMILIES) == set(DEFAULT_FAMILIES)
    assert all(c in ALL_CORRUPTIONS for names in FAMILY_OVERLAPS.values() for c in names)
    for name in DEFAULT_FAMILIES:
        fn = AUX_FAMILIES.get(name)
        assert torch.equal(fn(x, _gen(3)), fn(x, _gen(3)))
        if name != "blur":  # blur is deterministic; the others differ between copies of one image
            views = fn(x, _gen(3)).flatten(1)
            assert torch.cdist(views, views).add(torch.eye(8) * 1e9).min() > 1e-3


# ---------------------------------------------------------------- selective batch norm


def test_selective_batchnorm_keeps_each_familys_statistics_apart() -> None:
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(3)
    plain.weight.data.uniform_(0.5, 1.5)
    plain.bias.data.uniform_(-0.5, 0.5)
    sel = SelectiveBatchNorm2d(3)
    sel.load_state_dict(plain.state_dict())
    sel.views = 3
    groups = [torch.randn(4, 3, 5, 5) * s + m for s, m in ((1.0, 0.0), (3.0, 2.0), (0.2, -1.0))]
    out = sel(torch.cat(groups)).split(4)
    # The clean group exactly as a plain BN sees it alone, running statistics included ...
    torch.testing.assert_close(out[0], plain(groups[0]))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(sel, key), getattr(plain, key)), key
    # ... every other family normalised with its own batch statistics, the affine parameters shared.
    for g, o in zip(groups[1:], out[1:]):
        torch.testing.assert_close(o, F.batch_norm(g, None, None, plain.weight, plain.bias, True, 0.0, plain.eps))
        assert abs(float(o.detach().mean()) - float(plain.bias.detach().mean())) < 0.2  # its own mean, not clean's
    # The families leave the clean output and the running statistics alone.
    other = SelectiveBatchNorm2d(3)
    other.load_state_dict(plain.state_dict())
    other.running_mean.zero_(), other.running_var.fill_(1), other.num_batches_tracked.zero_()
    other.views = 3
    before = copy.deepcopy(other.state_dict())
    out2 = other(torch.cat([groups[0], groups[2], groups[1]])).split(4)
    torch.testing.assert_close(out2[0], out[0])
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict(before)
    ref(groups[0])
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ref.state_dict().items())
    # One view, or eval mode: an ordinary BatchNorm2d.
    sel.views = 1
    x = torch.randn(6, 3, 5, 5)
    torch.testing.assert_close(sel(x), plain(x))
    sel.eval(), plain.eval()
    sel.views = 3
    torch.testing.assert_close(sel(x), plain(x))
    with pytest.raises(ValueError, match="equal groups"):
        sel.train()(torch.randn(7, 3, 5, 5))


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize(
    "arch, kwargs",
    [("small_cnn", {"width": 4}), ("wrn", {"depth": 10, "widen_factor": 1}), ("resnet18", {}), ("preact_resnet18", {})],
)
def test_every_architecture_pools_its_feature_map(arch: str, kwargs: dict) -> None:
    """The trunk the heads share is each architecture's ``feature_map``: the classifier is its pool + fc."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, **kwargs).eval()
    x = torch.rand(2, 3, 32, 32)
    fmap = model.feature_map(x)
    assert fmap.dim() == 4 and fmap.shape[1] == model.fc.in_features and min(fmap.shape[-2:]) >= 3
    torch.testing.assert_close(model(x), model.fc(F.adaptive_avg_pool2d(fmap, 1).flatten(1)))


def _touched(p: torch.Tensor) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_auxiliary_heads_share_the_whole_trunk_and_only_it() -> None:
    base = _small()
    trunk = {name: p for name, p in base.named_parameters() if not name.startswith("fc.")}
    net = AuxiliaryNet(base, DEFAULT_FAMILIES)
    assert net.base is base
    # Every trunk parameter (convolutions and batch-norm affine) is the classifier's own object.
    assert {n: p for n, p in net.base.named_parameters() if not n.startswith("fc.")} == trunk
    assert all(type(m) is not torch.nn.BatchNorm2d for m in base.modules())  # all trunk BNs are selective
    head_params = {id(p) for p in net.heads.parameters()}
    assert not head_params & {id(p) for p in base.parameters()}  # heads have their own weights
    assert list(net.heads) == list(DEFAULT_FAMILIES)

    x = torch.rand(5 * 8, 3, 32, 32)
    with net.grouped():
        logits = net(x)
    assert logits.shape == (40, 10)
    # A loss on the noise head alone reaches the whole shared trunk (convs and BN affine), that
    # head, and nothing else: not the primary fc, not the other heads.
    logits[16:24].logsumexp(1).sum().backward()
    assert all(_touched(p) for p in trunk.values())
    assert not any(_touched(p) for p in base.fc.parameters())
    for name, head in net.heads.items():
        assert all(_touched(p) == (name == "noise") for p in head.parameters()), name
    # The primary head's logits on the clean group come from the classifier's own fc.
    net.zero_grad(set_to_none=True)
    with net.grouped():
        net(x)[:8].sum().backward()
    assert all(_touched(p) for p in base.fc.parameters())
    assert not any(_touched(p) for p in net.heads.parameters())


def test_plain_forward_is_the_classifier_and_release_hands_it_back() -> None:
    base = _small()
    x = torch.rand(8, 3, 32, 32)
    expected = copy.deepcopy(base).eval()(x)
    tensors = {k: v.data_ptr() for k, v in base.state_dict().items()}
    net = AuxiliaryNet(base, ("blur", "rotate")).eval()
    torch.testing.assert_close(net(x), expected)
    released = net.release()
    assert released is base
    assert all(type(m) is not SelectiveBatchNorm2d for m in released.modules())
    assert {k: v.data_ptr() for k, v in released.state_dict().items()} == tensors  # the same tensors
    torch.testing.assert_close(released(x), expected)
    with pytest.raises(RuntimeError, match="released"), net.grouped():
        pass
    with pytest.raises(TypeError, match="feature_map"):
        AuxiliaryNet(torch.nn.Linear(3, 3), ("blur",))


# ---------------------------------------------------------------- the loss and its schedule


def test_merge_penalty_schedule_is_the_references() -> None:
    """train.py: ``if epoch >= 180: loss += weight_loss`` (0-based, 210 epochs); 1-based here."""
    w = lambda e, n=210, **kw: auxiliary_merge_weight(e, n, **kw)  # noqa: E731
    assert [w(e) for e in (1, 100, 180)] == [0.0, 0.0, 0.0]
    assert [w(e) for e in (181, 200, 210)] == [1.0, 1.0, 1.0]
    assert w(171, 200) == 0.0 and w(172, 200) == 1.0  # the same fraction (171.4 of 200, rounded)
    assert w(1, 6) == 0.0 and w(6, 6) == 1.0  # a short run still gets its last epoch merged
    assert w(1, 10, start=0.0, weight=2.5) == 2.5 and w(10, 10, start=1.0) == 0.0
    cfg = TrainConfig(epochs=210, mode="auxiliary")
    assert auxiliary_merge_weight(181, cfg.epochs, cfg.aux_merge_start, cfg.aux_merge_weight) == 1.0
    assert auxiliary_merge_weight(180, cfg.epochs, cfg.aux_merge_start, cfg.aux_merge_weight) == 0.0


def _reference_style_loss(net: AuxiliaryNet, views: list[torch.Tensor], y: torch.Tensor, merge: float) -> torch.Tensor:
    """ArchipLab-LinfengZhang/Auxiliary-Training as written: one trunk pass per view (plain batch
    statistics each), the running statistics put back to the clean pass's, soft cross-entropy."""
    base = net.base
    outs, saved = [], None
    for i, v in enumerate(views):
        fmap = base.feature_map(v)
        if i == 0:
            outs.append(base.fc(F.adaptive_avg_pool2d(fmap, 1).flatten(1)))
            saved = {k: t.clone() for k, t in base.named_buffers() if "running" in k}
        else:
            outs.append(list(net.heads.values())[i - 1](fmap))
    for k, t in base.named_buffers():  # load_bn(): ``m.running_mean.data = ...`` (no autograd version bump)
        if k in saved:
            t.data = saved[k]
    loss = F.cross_entropy(outs[0], y)
    teacher = outs[0].detach().softmax(1)
    for o in outs[1:]:
        loss = loss + 0.05 * F.cross_entropy(o, y)
        loss = loss + 0.05 * -(F.log_softmax(o, 1) * teacher).sum(1).mean()  # utils.py CrossEntropy
    return loss + merge * net.head_distance()


@pytest.mark.parametrize("epoch", [1, 3])
def test_one_selective_pass_equals_the_references_per_family_passes(epoch: int) -> None:
    """Same gradients and running statistics as train.py's five separate passes; the loss differs only
    by the teacher's entropy (the paper's KL instead of the code's soft cross-entropy)."""
    cfg = TrainConfig(epochs=4, mode="auxiliary", aux_merge_start=0.5)  # the penalty is on from epoch 3
    ours = attach_auxiliary(_small(), cfg).train()
    ref = copy.deepcopy(ours)
    xb, yb = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, main = auxiliary_loss(Forward(ours, epoch, False, torch.contiguous_format), xb, yb, cfg, _gen(4))
    g = _gen(4)
    views = [xb] + [AUX_FAMILIES.get(f)(xb, g) for f in ref.families]
    expected = _reference_style_loss(ref, views, yb, merge=1.0 if epoch == 3 else 0.0)
    teacher = main.detach().softmax(1)
    entropy = -(teacher * teacher.log()).sum(1).mean()
    torch.testing.assert_close(loss, expected - 0.05 * len(views[1:]) * entropy, rtol=1e-5, atol=1e-5)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(ours.named_buffers(), ref.buffers(), strict=True):
        if name.startswith("base.") and "running" in name:  # the trunk's: from the clean images only
            torch.testing.assert_close(b, c, msg=name)
    assert main.shape == (8, 10)


# ---------------------------------------------------------------- the trainer's mode


def test_auxiliary_mode_learns_and_hands_back_a_plain_classifier(digits, tmp_path: Path) -> None:
    x, y, xv, yv = digits[0][:64], digits[1][:64], digits[2][:32], digits[3][:32]
    model = _small(width=8)
    fresh_keys = list(build_model("small_cnn", num_classes=10, width=8).state_dict())
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.05, mode="auxiliary", aux_merge_start=1.0)
    history = train_classifier(model, x, y, cfg, x_val=xv, y_val=yv, progress=False)
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < losses[1] < losses[0]
    # The classifier alone, its own architecture again: plain BNs, the same keys, main logits [N, classes].
    assert type(model).__name__ == "SmallCNN" and not model.training
    assert all(type(m) is not SelectiveBatchNorm2d for m in model.modules())
    assert list(model.state_dict()) == fresh_keys
    assert model(xv[:5]).shape == (5, 10)
    ev = evaluate_classifier(model, xv, yv)
    assert ev["error"] == pytest.approx(history[-1]["val_error"])
    save_model_file(tmp_path / "target.pt", model, "small_cnn", {"num_classes": 10, "width": 8})
    loaded, _ = load_model_file(tmp_path / "target.pt")
    torch.testing.assert_close(loaded(xv), model(xv))
    assert TRAIN_MODES.get("auxiliary").allows_cutout is False


def test_merge_penalty_pulls_the_heads_onto_the_primary_classifier(digits, tmp_path: Path) -> None:
    x, y = digits[0][:64], digits[1][:64]

    def head_distance(start: float) -> float:
        ckpt = tmp_path / f"c{start}.pt"
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, mode="auxiliary", aux_merge_start=start)
        train_classifier(_small(), x, y, cfg, checkpoint_path=ckpt, progress=False)
        state = torch.load(ckpt, weights_only=True)["model"]  # the checkpoint keeps the heads
        w0, b0 = state["base.fc.weight"], state["base.fc.bias"]
        return sum(
            float((w0 - state[f"heads.{f}.fc.weight"]).pow(2).sum() + (b0 - state[f"heads.{f}.fc.bias"]).pow(2).sum())
            for f in DEFAULT_FAMILIES
        )

    assert head_distance(0.0) < 0.5 * head_distance(1.0)


def test_kill_and_resume_in_auxiliary_mode_is_bitwise_exact(digits, tmp_path: Path) -> None:
    """The heads, their optimiser state and the penalty's schedule resume with the rest: the penalty
    switches on in epoch 3, after the resume; the tiny WRN has dropout too."""
    x, y = digits[0][:64], digits[1][:64]
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=3, mode="auxiliary", aux_merge_start=0.5)
    build = lambda: build_model("wrn", depth=10, widen_factor=1, num_classes=10, dropout=0.2)  # noqa: E731
    ckpt = tmp_path / "target.ckpt"
    reference, _ = assert_kill_and_resume_is_exact(build, x, y, cfg, ckpt)
    assert set(torch.load(ckpt, weights_only=True)["model"]) > {f"base.{k}" for k in reference.state_dict()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"aux_families": ()}, "aux_families"),
        ({"aux_families": ("blur", "blur")}, "aux_families"),
        ({"aux_families": ("gaussian_blur",)}, "aux_families"),
        ({"aux_ce_weight": -1.0}, "aux_ce_weight"),
        ({"aux_distill_weight": float("nan")}, "aux_distill_weight"),
        ({"aux_temperature": 0.0}, "aux_temperature"),
        ({"aux_merge_start": 1.5}, "aux_merge_start"),
        ({"mode": "auxiliary", "cutout": 16}, "cutout must be 0"),
    ],
)
def test_train_config_rejects_bad_auxiliary_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(epochs=2, **kwargs)


@pytest.mark.gpu
def test_cuda_auxiliary_mode_with_bf16_channels_last_and_compile(digits, tmp_path: Path) -> None:
    x, y, xv, yv = (t.cuda() for t in digits)
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = build_model("wrn", depth=10, widen_factor=2, num_classes=10).cuda()
        cfg = TrainConfig(
            epochs=3, batch_size=64, lr=0.05, mode="auxiliary", amp=True, channels_last=True, compile=compile_,
            aux_merge_start=0.5,
        )
        ckpt = tmp_path / f"c{compile_}.pt"
        history = train_classifier(model, x, y, cfg, x_val=xv, y_val=yv, progress=False, checkpoint_path=ckpt)
        assert history[1]["train_loss"] < history[0]["train_loss"]
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert all(type(m) is not SelectiveBatchNorm2d for m in model.modules())
        assert model(xv[:4]).shape == (4, 10)
