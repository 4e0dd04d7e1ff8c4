"""Architectures: every registered model builds, has the published size, normalises inside itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltta.models import CIFAR_MEAN, CIFAR_STD, MODELS, Normalize, build_model
from ltta.config import NOT_TARGET_ARCHS

# Classifiers take num_classes; the loss predictor (num_outputs) has its own tests (test_predictor.py).
CLASSIFIERS = sorted(n for n in MODELS.names() if n not in NOT_TARGET_ARCHS)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_architectures() -> None:
    assert {"small_cnn", "wrn", "wrn_40_2", "wrn_28_10", "resnet18", "preact_resnet18"} <= set(MODELS.names())
    with pytest.raises(KeyError, match="known: .*wrn_40_2"):
        build_model("wrn_40_3")


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_model_maps_32x32_images_to_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert isinstance(model.normalize, Normalize)


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        # WRN-40-2 "2.2M" and WRN-28-10 "36.5M" (Zagoruyko & Komodakis 2016, CIFAR-10); the exact
        # counts are those of the WRN that AugMix trains (third_party/WideResNet_pytorch).
        ("wrn_40_2", 10, 2_243_546),
        ("wrn_40_2", 100, 2_255_156),
        ("wrn_28_10", 10, 36_479_194),
        # CIFAR ResNet-18 (kuangliu/pytorch-cifar): 11.17M for 10 classes.
        ("resnet18", 10, 11_173_962),
        # Pre-activation ResNet-18: ResNet-18 minus the stem BN and shortcut BNs, plus a final BN.
        ("preact_resnet18", 10, 11_172_170),
    ],
)
def test_parameter_counts_match_the_published_architectures(name: str, num_classes: int, expected: int) -> None:
    assert _n_params(build_model(name, num_classes=num_classes)) == expected


def test_wrn_layout_follows_depth_and_width() -> None:
    model = build_model("wrn", depth=16, widen_factor=4, num_classes=10)
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 1 + 2 * 2 * 3  # stem + 2 convs per block x n=(16-4)/6=2 blocks x 3 stages
    assert [c.out_channels for c in convs3][-1] == 64 * 4
    assert model.fc.in_features == 256
    with pytest.raises(ValueError, match="6n\\+4"):
        build_model("wrn", depth=41)


def test_normalisation_happens_inside_the_model_and_only_there() -> None:
    """A model with (mean, std) on x equals the same weights with identity stats on (x-mean)/std."""
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    for name in ("small_cnn", "wrn_40_2", "preact_resnet18"):
        torch.manual_seed(0)
        m1 = build_model(name, num_classes=5, mean=mean, std=std).eval()
        m2 = build_model(name, num_classes=5, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()
        weights = {k: v for k, v in m1.state_dict().items() if not k.startswith("normalize.")}
        missing, unexpected = m2.load_state_dict(weights, strict=False)
        assert sorted(missing) == ["normalize.mean", "normalize.std"] and not unexpected
        x = torch.rand(3, 3, 32, 32)
        pre = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            torch.testing.assert_close(m1(x), m2(pre), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(m1(x), m2(x), atol=1e-3)


def test_normalize_defaults_and_saved_buffers() -> None:
    norm = Normalize()
    x = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(norm(x), torch.zeros(2, 3, 4, 4), atol=1e-7)
    one_std = x + torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(norm(one_std), torch.ones(2, 3, 4, 4), atol=1e-6)
    sd = build_model("small_cnn", num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).state_dict()
    assert sd["normalize.mean"].flatten().tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="positive"):
        Normalize((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="same length"):
        Normalize((0.5, 0.5), (0.5, 0.5, 0.5))


def test_kaiming_init_of_convolutions() -> None:
    torch.manual_seed(0)
    model = build_model("wrn_40_2", num_classes=10)
    conv = model.block2[1].conv1  # 64 -> 64 channels, 3x3: fan_out = 64 * 9
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05
    bn = model.block2[1].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(model.fc.bias == 0)


@pytest.mark.parametrize("name", ["small_cnn", "wrn_40_2", "resnet18", "preact_resnet18"])
def test_channels_last_and_bf16_autocast(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out_cl = model(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
    assert out_bf16.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: the logits agree to a few percent of their spread.
    assert (out_bf16.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_wrn_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model("wrn", depth=10, widen_factor=1, num_classes=10, dropout=0.3)
    x = torch.rand(4, 3, 32, 32)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_small_cnn_width_scales_channels_and_backpropagates() -> None:
    model = build_model("small_cnn", num_classes=3, width=4)
    assert model.fc.in_features == 16
    loss = model(torch.rand(2, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_models_train_step_on_cuda_channels_last_bf16(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).cuda().to(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(8, device="cuda") % 10)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
