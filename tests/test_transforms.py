"""Fidelity of the batched image ops against PIL, the FAA op table, and batched policy application."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from ltta.transforms import functional as F
from ltta.transforms.ops import FAA_OPS, apply_op, magnitude, op_names


def _images() -> np.ndarray:
    """Four fixed 32x32 RGB images: smooth random fields (upsampled noise) plus one hard edge."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        base = (rng.random((8, 8, 3)) * 200 + 20).astype(np.uint8)
        img = np.array(Image.fromarray(base).resize((32, 32), Image.BICUBIC))
        if i == 3:
            img[:, 16:] = 255 - img[:, 16:]
        out.append(img)
    return np.stack(out)


IMAGES = _images()
X = torch.from_numpy(IMAGES).permute(0, 3, 1, 2).float() / 255.0


def _pil(fn) -> np.ndarray:  # noqa: ANN001
    return np.stack([np.asarray(fn(Image.fromarray(a)), dtype=np.float64) for a in IMAGES])


def _ours(y: torch.Tensor) -> np.ndarray:
    return (y.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.float64)


# (PIL reference, ours, max mean-abs-diff in uint8 levels). Colour blends are continuous here and
# truncated to integers by PIL, so up to one level apart; histogram ops match exactly.
PHOTOMETRIC = {
    "autocontrast": (ImageOps.autocontrast, F.autocontrast, 1.0),
    "equalize": (ImageOps.equalize, F.equalize, 0.0),
    "invert": (ImageOps.invert, F.invert, 0.0),
    "solarize_100": (lambda im: ImageOps.solarize(im, 100), lambda x: F.solarize(x, 100), 0.0),
    "solarize_0": (lambda im: ImageOps.solarize(im, 0), lambda x: F.solarize(x, 0), 0.0),
    "solarize_256": (lambda im: ImageOps.solarize(im, 256), lambda x: F.solarize(x, 256), 0.0),
    "posterize_5": (lambda im: ImageOps.posterize(im, 5), lambda x: F.posterize(x, 5.9), 0.0),
    "posterize_4": (lambda im: ImageOps.posterize(im, 4), lambda x: F.posterize(x, 4), 0.0),
    "contrast_0.3": (lambda im: ImageEnhance.Contrast(im).enhance(0.3), lambda x: F.contrast(x, 0.3), 1.0),
    "contrast_1.8": (lambda im: ImageEnhance.Contrast(im).enhance(1.8), lambda x: F.contrast(x, 1.8), 1.0),
    "color_0.2": (lambda im: ImageEnhance.Color(im).enhance(0.2), lambda x: F.color(x, 0.2), 1.0),
    "color_1.9": (lambda im: ImageEnhance.Color(im).enhance(1.9), lambda x: F.color(x, 1.9), 1.0),
    "brightness_0.4": (lambda im: ImageEnhance.Brightness(im).enhance(0.4), lambda x: F.brightness(x, 0.4), 1.0),
    "brightness_1.6": (lambda im: ImageEnhance.Brightness(im).enhance(1.6), lambda x: F.brightness(x, 1.6), 1.0),
    "sharpness_0.2": (lambda im: ImageEnhance.Sharpness(im).enhance(0.2), lambda x: F.sharpness(x, 0.2), 1.0),
    "sharpness_1.9": (lambda im: ImageEnhance.Sharpness(im).enhance(1.9), lambda x: F.sharpness(x, 1.9), 1.0),
    "sharpness_4": (lambda im: ImageEnhance.Sharpness(im).enhance(4.0), lambda x: F.sharpness(x, 4.0), 1.0),
}


@pytest.mark.parametrize("name", list(PHOTOMETRIC))
def test_photometric_ops_match_pil(name: str) -> None:
    pil_fn, ours_fn, tol = PHOTOMETRIC[name]
    ref, got = _pil(pil_fn), _ours(ours_fn(X))
    diff = np.abs(ref - got)
    assert diff.mean() <= tol * 0.6 + 1e-9, f"{name}: mean |diff| {diff.mean():.3f} levels"
    assert diff.max() <= tol + 1e-9, f"{name}: max |diff| {diff.max():.0f} levels"


def test_sharpness_leaves_the_border_untouched() -> None:
    y = F.sharpness(X, 0.1)
    assert torch.equal(y[..., 0, :], X[..., 0, :]) and torch.equal(y[..., :, -1], X[..., :, -1])
    assert not torch.allclose(y[..., 1:-1, 1:-1], X[..., 1:-1, 1:-1])


# PIL's FAA geometric calls (NEAREST, black fill) against ours in nearest mode: bit-exact.
GEOMETRIC = {
    "rotate_30": (lambda im: im.rotate(30), lambda x: F.rotate(x, 30, mode="nearest")),
    "rotate_-17": (lambda im: im.rotate(-17), lambda x: F.rotate(x, -17, mode="nearest")),
    "shear_x_0.3": (
        lambda im: im.transform(im.size, Image.AFFINE, (1, 0.3, 0, 0, 1, 0)),
        lambda x: F.shear_x(x, 0.3, mode="nearest"),
    ),
    "shear_y_-0.2": (
        lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, -0.2, 1, 0)),
        lambda x: F.shear_y(x, -0.2, mode="nearest"),
    ),
    # PIL's AFFINE translation c moves the content by -c.
    "translate_x_5.3": (
        lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 5.3, 0, 1, 0)),
        lambda x: F.translate_x(x, -5.3, mode="nearest"),
    ),
    "translate_y_-7.7": (
        lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, -7.7)),
        lambda x: F.translate_y(x, 7.7, mode="nearest"),
    ),
}


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_ops_match_pil_nearest(name: str) -> None:
    pil_fn, ours_fn = GEOMETRIC[name]
    np.testing.assert_array_equal(_ours(ours_fn(X)), _pil(pil_fn))


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_rotate_90_is_rot90(mode: str) -> None:
    y = F.rotate(X, 90.0, mode=mode)
    expected = torch.rot90(X, 1, dims=(-2, -1))  # counter-clockwise, as PIL
    torch.testing.assert_close(y[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-4, rtol=0)


def test_integer_translation_is_a_shift_and_fill_is_painted() -> None:
    y = F.translate_x(X, 3.0, fill=0.5)
    torch.testing.assert_close(y[..., 3:], X[..., :-3], atol=1e-5, rtol=0)
    assert torch.allclose(y[..., :3], torch.full_like(y[..., :3], 0.5))
    y = F.translate_y(X, -2.0)
    torch.testing.assert_close(y[..., :-2, :], X[..., 2:, :], atol=1e-5, rtol=0)
    assert torch.all(y[..., -2:, :] == 0)


def test_per_sample_magnitudes_equal_separate_calls() -> None:
    angles = torch.tensor([-25.0, 0.0, 10.0, 30.0])
    batched = F.rotate(X, angles, mode="bilinear")
    for i, a in enumerate(angles.tolist()):
        torch.testing.assert_close(batched[i : i + 1], F.rotate(X[i : i + 1], a), atol=1e-5, rtol=0)
    assert torch.allclose(batched[1], X[1], atol=1e-5)  # zero angle is the identity
    factors = torch.tensor([0.1, 0.5, 1.0, 1.9])
    for fn in (F.contrast, F.color, F.brightness, F.sharpness, F.zoom):
        out = fn(X, factors if fn is not F.zoom else factors + 0.5)
        for i in range(4):
            f = float(factors[i]) + (0.5 if fn is F.zoom else 0.0)
            torch.testing.assert_close(out[i : i + 1], fn(X[i : i + 1], f), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one per image"):
        F.rotate(X, torch.zeros(3))


def test_zoom_and_mirror_pad() -> None:
    torch.testing.assert_close(F.zoom(X, 1.0), X, atol=1e-5, rtol=0)
    # zoom 2 about the centre: the central 16x16 fills the frame (nearest reads each pixel twice).
    z = F.zoom(X, 2.0, mode="nearest")
    torch.testing.assert_close(z[..., ::2, ::2], X[..., 8:24, 8:24], atol=0, rtol=0)
    p = F.mirror_pad(X, 32)
    assert p.shape[-2:] == (96, 96)
    np.testing.assert_array_equal(
        p.numpy(), np.pad(X.numpy(), ((0, 0), (0, 0), (32, 32), (32, 32)), mode="symmetric")
    )
    # rotating the mirror-padded image and cropping = rotating with reflection padding
    r_pad = F.center_crop(F.rotate(p, 20.0), 32)
    r_ref = F.rotate(X, 20.0, padding_mode="reflection")
    torch.testing.assert_close(r_pad, r_ref, atol=2e-3, rtol=0)


def test_crops() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    c = F.center_crop(x, 4)
    assert torch.equal(c, x[..., 1:5, 1:5])
    fc = F.five_crop(x, 4)
    assert fc.shape == (5, 2, 3, 4, 4)
    assert torch.equal(fc[0], x[..., :4, :4]) and torch.equal(fc[3], x[..., 2:, 2:])
    assert torch.equal(fc[4], c)


def test_cutout_matches_the_reference_geometry() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(256, 3, 32, 32)
    y = F.cutout(x, 6.4, g)  # FAA Cutout at level 1: 0.2 * 32 pixels
    painted = (y != 0).any(1)  # [N,H,W]
    fill = torch.tensor(F.FAA_CUTOUT_FILL).view(1, 3, 1, 1)
    assert torch.all((y == 0) | (y == fill.expand_as(y)))
    widths = painted.any(1).sum(-1)
    # PIL draws the rectangle with both corners included: a 7-pixel side (int(6.4)+1) unless clipped.
    assert int(widths.max()) == 7 and int(widths.min()) >= 1
    assert torch.equal(F.cutout(x, 0.0, g), x)
    # deterministic under a seed, different with another
    a = F.cutout(torch.zeros(8, 3, 32, 32), 8.0, torch.Generator().manual_seed(3))
    b = F.cutout(torch.zeros(8, 3, 32, 32), 8.0, torch.Generator().manual_seed(3))
    c = F.cutout(torch.zeros(8, 3, 32, 32), 8.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_flip_is_deterministic_under_a_seed() -> None:
    a = F.random_crop_flip(X, torch.Generator().manual_seed(1))
    b = F.random_crop_flip(X, torch.Generator().manual_seed(1))
    c = F.random_crop_flip(X, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every output is a shifted window of the zero-padded (possibly flipped) input
    assert a.shape == X.shape


def test_continuous_ops_are_differentiable() -> None:
    x = X.clone().requires_grad_(True)
    angle = torch.full((4,), 10.0, requires_grad=True)
    y = F.rotate(x, angle, padding_mode="reflection")
    y = F.zoom(y, 1.2)
    y = F.sharpness(F.color(F.contrast(F.brightness(y, 0.9), 1.3), 0.7), 2.0)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert angle.grad is not None and angle.grad.abs().sum() > 0


# ---------------------------------------------------------------- the FAA op table

REFERENCE_RANGES = {  # fast-autoaugment FastAutoAugment/augmentations.py, augment_list(False)
    "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "TranslateX": (-0.45, 0.45), "TranslateY": (-0.45, 0.45),
    "Rotate": (-30, 30), "AutoContrast": (0, 1), "Invert": (0, 1), "Equalize": (0, 1), "Solarize": (0, 256),
    "Posterize": (4, 8), "Contrast": (0.1, 1.9), "Color": (0.1, 1.9), "Brightness": (0.1, 1.9),
    "Sharpness": (0.1, 1.9), "Cutout": (0, 0.2),
}


def test_op_table_matches_the_reference() -> None:
    assert op_names() == list(REFERENCE_RANGES)
    for name, (lo, hi) in REFERENCE_RANGES.items():
        op = FAA_OPS.get(name)
        assert (op.lo, op.hi) == (lo, hi), name
        assert op.random_sign == (name in {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
    assert magnitude("Solarize", 0.25) == 64.0
    assert magnitude("Contrast", 0.5) == pytest.approx(1.0)


def test_apply_op_matches_pil_for_the_reference_magnitudes() -> None:
    g = torch.Generator().manual_seed(0)
    # Posterize level 0.6 -> 6.4 -> int 6 bits; Solarize level 0.5 -> 128.
    np.testing.assert_array_equal(_ours(apply_op(X, "Posterize", 0.6, g)), _pil(lambda im: ImageOps.posterize(im, 6)))
    np.testing.assert_array_equal(_ours(apply_op(X, "Solarize", 0.5, g)), _pil(lambda im: ImageOps.solarize(im, 128)))
    # Rotate level 1 -> +-30 degrees with a random sign per image.
    got = _ours(apply_op(X, "Rotate", 1.0, g))
    plus, minus = _pil(lambda im: im.rotate(30)), _pil(lambda im: im.rotate(-30))
    for i in range(len(X)):
        assert np.array_equal(got[i], plus[i]) or np.array_equal(got[i], minus[i])


@pytest.mark.parametrize("name", op_names())
def test_every_op_runs_batched_with_per_sample_levels(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.0, 0.3, 0.7, 1.0])
    y = apply_op(X, name, levels, g)
    assert y.shape == X.shape and y.dtype == X.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    with pytest.raises(ValueError, match="level"):
        apply_op(X, name, 1.5, g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_on_cuda_match_cpu() -> None:
    xc = X.cuda()
    for name in ("AutoContrast", "Equalize", "Solarize", "Posterize", "Contrast", "Color", "Sharpness"):
        cpu = apply_op(X, name, 0.7, torch.Generator().manual_seed(0))
        gpu = apply_op(xc, name, 0.7, torch.Generator("cuda").manual_seed(0)).cpu()
        torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=0)
    torch.testing.assert_close(F.rotate(xc, 30.0, mode="nearest").cpu(), F.rotate(X, 30.0, mode="nearest"))
