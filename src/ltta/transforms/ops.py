"""The Fast AutoAugment op table: 15 named ops, each with its magnitude range.

Source: kakaobrain/fast-autoaugment ``FastAutoAugment/augmentations.py`` (``augment_list`` with
``for_autoaug=False``, and ``apply_augment``). An op is applied at a *level* lambda in [0, 1]
that maps linearly to its magnitude, ``lambda * (hi - lo) + lo``; Shear, Translate and Rotate
flip the sign of the magnitude with probability 1/2 (``random_mirror``). SamplePairing is
commented out in the reference, so there are 15 ops, not the paper's 16.

Geometric ops reproduce PIL's defaults there: NEAREST resampling, black outside the image.
Levels may be one float for the batch or a tensor [N] (one per image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ltta.registry import Registry
from ltta.transforms import functional as F

# (images [N,C,H,W], magnitudes [N] after scaling and sign, generator) -> images
OpFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class OpDef:
    """One FAA op: magnitude range [lo, hi], whether the sign is flipped at random, the op itself."""

    name: str
    lo: float
    hi: float
    random_sign: bool
    fn: OpFn


FAA_OPS: Registry[OpDef] = Registry("Fast AutoAugment op")


def _op(name: str, lo: float, hi: float, random_sign: bool = False) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        FAA_OPS.add(name, OpDef(name, lo, hi, random_sign, fn))
        return fn

    return deco


# PIL's Image.transform / Image.rotate defaults in the reference: nearest neighbour, fill 0.
_GEOM = {"mode": "nearest", "fill": 0.0}


@_op("ShearX", -0.3, 0.3, random_sign=True)
def _shear_x(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.shear_x(x, v, **_GEOM)


@_op("ShearY", -0.3, 0.3, random_sign=True)
def _shear_y(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.shear_y(x, v, **_GEOM)


@_op("TranslateX", -0.45, 0.45, random_sign=True)
def _translate_x(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Reference: PIL AFFINE (1, 0, v*width, 0, 1, 0), which moves the content left by v*width.
    return F.translate_x(x, -v * x.shape[-1], **_GEOM)


@_op("TranslateY", -0.45, 0.45, random_sign=True)
def _translate_y(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.translate_y(x, -v * x.shape[-2], **_GEOM)


@_op("Rotate", -30.0, 30.0, random_sign=True)
def _rotate(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.rotate(x, v, **_GEOM)


@_op("AutoContrast", 0.0, 1.0)
def _autocontrast(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.autocontrast(x)


@_op("Invert", 0.0, 1.0)
def _invert(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.invert(x)


@_op("Equalize", 0.0, 1.0)
def _equalize(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.equalize(x)


@_op("Solarize", 0.0, 256.0)
def _solarize(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.solarize(x, v)


@_op("Posterize", 4.0, 8.0)
def _posterize(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.posterize(x, v)  # truncates to int bits, as the reference's ``int(v)``


@_op("Contrast", 0.1, 1.9)
def _contrast(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.contrast(x, v)


@_op("Color", 0.1, 1.9)
def _color(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.color(x, v)


@_op("Brightness", 0.1, 1.9)
def _brightness(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.brightness(x, v)


@_op("Sharpness", 0.1, 1.9)
def _sharpness(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.sharpness(x, v)


@_op("Cutout", 0.0, 0.2)
def _cutout(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Reference: side v * width pixels (img.size[0]), FAA's grey fill; v <= 0 leaves the image.
    return F.cutout(x, v * x.shape[-1], g, fill=F.FAA_CUTOUT_FILL)


def op_names() -> list[str]:
    """The 15 op names, in the reference's ``augment_list`` order (the search's categorical)."""
    return FAA_OPS.names()


def magnitude(name: str, level: float | torch.Tensor) -> float | torch.Tensor:
    """``level * (hi - lo) + lo`` for op ``name`` (before any random sign flip)."""
    op = FAA_OPS.get(name)
    return level * (op.hi - op.lo) + op.lo


def apply_op(
    x: torch.Tensor, name: str, level: float | torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Apply FAA op ``name`` to every image of ``x`` at ``level`` in [0, 1] (float or [N]).

    The random sign of the geometric ops and Cutout's position are drawn per image from
    ``generator`` (on ``x``'s device).
    """
    op = FAA_OPS.get(name)
    if isinstance(level, torch.Tensor):
        bad = bool(((level < 0) | (level > 1)).any())
    else:
        bad = not 0.0 <= float(level) <= 1.0
    if bad:
        raise ValueError(f"{name}: level must lie in [0, 1], got {level}")
    return run_op(x, op, F.per_sample(level, x), generator)


def run_op(x: torch.Tensor, op: OpDef, level: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """:func:`apply_op` for levels [N] already known to lie in [0, 1]: no check, so no GPU sync."""
    v = level * (op.hi - op.lo) + op.lo
    if op.random_sign:  # reference: ``if random_mirror and random.random() > 0.5: v = -v``
        flip = torch.rand(x.shape[0], device=x.device, generator=generator) > 0.5
        v = torch.where(flip, -v, v)
    return op.fn(x, v, generator)
