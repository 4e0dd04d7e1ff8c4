"""Batched image ops on float tensors [N,C,H,W] in [0,1], on whatever device the tensor lives on.

Shared by training augmentation, Fast AutoAugment and test-time augmentation. Per-sample
randomness is drawn as tensors from an explicit ``torch.Generator`` (on the tensor's device), so
one call augments a whole batch with no per-image Python.

Every magnitude may be a Python number (same for the whole batch) or a tensor of shape [N]
(one value per image), so a batch can be rotated by N different angles in one call.

Semantics follow the PIL calls the reference code makes (kakaobrain/fast-autoaugment
``FastAutoAugment/augmentations.py``; kakaobrain/learning-loss-for-tta ``commons.py``,
``dataloader.py``); each op's docstring names the PIL call it reproduces and where it departs.
Colour ops stay differentiable in the image (no rounding to 8-bit levels), so the results differ
from PIL's uint8 arithmetic by at most about one level; histogram ops (equalize, posterize,
solarize's threshold test) work on the 256 levels ``round(255 * x)`` exactly as PIL does.

Why one module: it is the op namespace every op table indexes (``TF.rotate``, ``TF.equalize``:
FAA's ops, AugMix's, the TTA candidates, the auxiliary families), some 25 small ops on a handful
of shared helpers (per-image magnitudes, the affine sampler, fills). Split in two, the helpers
would be shared across modules and the tables would import from both, or through a re-export.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Magnitude = float | int | torch.Tensor

# FAA's cutout colour, (125, 123, 114) in 8-bit levels (fast-autoaugment augmentations.py, CutoutAbs).
FAA_CUTOUT_FILL: tuple[float, float, float] = (125 / 255, 123 / 255, 114 / 255)

# ITU-R 601-2 luma, the weights of PIL's ``convert("L")`` (used by ImageEnhance.Color and .Contrast).
_LUMA = (0.299, 0.587, 0.114)

_INTERP_MODES = ("nearest", "bilinear", "bicubic")
_PADDING_MODES = ("zeros", "reflection", "border")


# ---------------------------------------------------------------- helpers


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected images [N,C,H,W], got shape {tuple(x.shape)}")


def per_sample(v: Magnitude, x: torch.Tensor) -> torch.Tensor:
    """A magnitude as a float32 tensor [N] on ``x``'s device (a scalar is broadcast to every image)."""
    n = x.shape[0]
    if not isinstance(v, torch.Tensor):  # a fill kernel, not a host-to-device copy
        return torch.full((n,), float(v), dtype=torch.float32, device=x.device)
    t = v.to(device=x.device, dtype=torch.float32)
    if t.dim() == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"per-sample magnitude must have shape [{n}] (one per image), got {tuple(t.shape)}")
    return t


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[N] -> [N,1,1,1] in ``x``'s dtype, for broadcasting against images."""
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """8-bit levels 0..255 of an image in [0,1] (int64), as ``to_uint8`` would store them."""
    return x.detach().clamp(0, 1).mul(255).round().long()


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL ``convert("L")`` luma, [N,1,H,W]; a single-channel input is its own luma."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"colour ops need 1 or 3 channels, got {x.shape[1]}")
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: Magnitude) -> torch.Tensor:
    """PIL ImageEnhance: ``degenerate + factor * (x - degenerate)``, clipped to [0,1]."""
    f = _bcast(per_sample(factor, x), x)
    return (degenerate + f * (x - degenerate)).clamp(0.0, 1.0)


def _fill_values(fill: float | Sequence[float], channels: int) -> tuple[float, ...]:
    """A fill colour as one float per channel: a scalar is grey on every channel."""
    values = (float(fill),) if isinstance(fill, (int, float)) else tuple(float(v) for v in fill)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"fill has {len(values)} values but the images have {channels} channels")
    return values


@functools.lru_cache(maxsize=64)
def _fill_cached(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def _fill_tensor(fill: float | Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """The fill colour as [1,C,1,1] on ``x``'s device (cached: no copy to the GPU per call)."""
    return _fill_cached(_fill_values(fill, x.shape[1]), x.device, x.dtype)


def affine_pixels(
    x: torch.Tensor,
    matrix: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Resample ``x`` through a per-image affine map given in PIL's pixel convention.

    ``matrix`` [N,2,3] maps an *output* point (u, v) to the *input* point it reads,
    ``(a u + b v + c, d u + e v + f)``, in continuous pixel coordinates whose pixel centres sit at
    +0.5 (exactly what ``PIL.Image.transform(..., AFFINE, (a,b,c,d,e,f))`` does). It is turned
    into the normalised ``theta`` of ``affine_grid`` (align_corners=False), so grid_sample's
    nearest mode reads the same pixel as PIL's NEAREST filter (PIL floors the source coordinate,
    grid_sample rounds coordinate - 0.5; a 1e-4 pixel nudge settles exact ties PIL's way).

    Outside the image: ``padding_mode`` ``zeros`` paints ``fill`` (scalar or one value per
    channel), ``reflection`` mirrors about the border (numpy ``symmetric``), ``border`` repeats it.
    """
    _check_images(x)
    if mode not in _INTERP_MODES:
        raise ValueError(f"mode must be one of {_INTERP_MODES}, got {mode!r}")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    n, c, h, w = x.shape
    m = matrix.to(device=x.device, dtype=torch.float32)
    a, b, cc = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, ff = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    if mode == "nearest":
        # PIL floors the source coordinate; grid_sample rounds (coordinate - 0.5) half-to-even.
        # A tiny nudge makes exact ties (e.g. shear 0.2 every fifth column) go PIL's way.
        cc, ff = cc + 1e-4, ff + 1e-4
    # theta = N M N^-1 with N: pixel -> normalised coordinates (align_corners=False), written out
    # elementwise so that no small matrix is copied to the device per call.
    theta = torch.stack(
        [
            torch.stack([a, b * (h / w), a + b * (h / w) + cc * (2.0 / w) - 1.0], -1),
            torch.stack([d * (w / h), e, d * (w / h) + e + ff * (2.0 / h) - 1.0], -1),
        ],
        1,
    )
    work_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    grid = F.affine_grid(theta.to(work_dtype), [n, c, h, w], align_corners=False)
    fill_values = _fill_values(fill, c)
    use_mask = padding_mode == "zeros" and any(v != 0.0 for v in fill_values)
    src = x.to(work_dtype)
    if use_mask:
        src = torch.cat([src, torch.ones_like(src[:, :1])], dim=1)
    out = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    if use_mask:
        inside = out[:, -1:].clamp(0.0, 1.0)
        out = out[:, :-1] + _fill_cached(fill_values, x.device, work_dtype) * (1.0 - inside)
    if mode == "bicubic":  # cubic overshoots; PIL clips to the 8-bit range
        out = out.clamp(0.0, 1.0)
    return out.to(x.dtype)


def _affine_batch(a, b, c, d, e, f) -> torch.Tensor:  # noqa: ANN001 - tensors [N]
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], 1)


# ---------------------------------------------------------------- flips and crops


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return x.flip(-1)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image independently with probability ``p``."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x: torch.Tensor, generator: torch.Generator, padding: int = 4, fill: float = 0.0) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop a random window of the original size per image.

    Same distribution as torchvision's ``RandomCrop(32, padding=4)`` (offsets uniform in
    [0, 2*padding]), done as one gather for the whole batch.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), value=fill)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # [N,H]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # [N,W]
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [N,H,W,C]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR training augmentation: pad-4 random crop, then random horizontal flip."""
    return random_hflip(random_crop(x, generator, padding), generator)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size`` x ``size`` window; offsets rounded as torchvision's ``center_crop``."""
    _check_images(x)
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"center_crop size {size} exceeds the image size {h}x{w}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def five_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Four corner crops and the centre crop, stacked [5,N,C,size,size].

    Order as torchvision's ``five_crop``: top-left, top-right, bottom-left, bottom-right, centre.
    """
    _check_images(x)
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"five_crop size {size} exceeds the image size {h}x{w}")
    return torch.stack(
        [
            x[..., :size, :size],
            x[..., :size, w - size :],
            x[..., h - size :, :size],
            x[..., h - size :, w - size :],
            center_crop(x, size),
        ]
    )


def mirror_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad every side by ``pad`` pixels with the mirrored image, edge pixel repeated.

    This is numpy's ``symmetric`` mode, the one learning-loss-for-tta's ``mirror_expansion``
    (commons.py) uses before its geometric test-time actions (it pads by the full image size).
    torch's ``reflect`` mode would skip the edge pixel, hence the explicit flips.
    """
    _check_images(x)
    h, w = x.shape[-2:]
    if pad < 0 or pad > min(h, w):
        raise ValueError(f"mirror_pad needs 0 <= pad <= min(H, W) = {min(h, w)}, got {pad}")
    if pad == 0:
        return x
    x = torch.cat([x[..., :, :pad].flip(-1), x, x[..., :, w - pad :].flip(-1)], dim=-1)
    return torch.cat([x[..., :pad, :].flip(-2), x, x[..., h - pad :, :].flip(-2)], dim=-2)


# ---------------------------------------------------------------- geometric ops


def rotate(
    x: torch.Tensor,
    degrees: Magnitude,
    fill: float | Sequence[float] = 0.0,
    padding_mode: str = "zeros",
    mode: str = "bilinear",
) -> torch.Tensor:
    """Rotate counter-clockwise by ``degrees`` about the image centre, as PIL ``Image.rotate``.

    PIL's default (used by FAA's Rotate) is NEAREST with black fill: pass ``mode="nearest"``,
    ``fill=0`` to reproduce it. learning-loss-for-tta rotates a mirror-padded image with BICUBIC:
    ``padding_mode="reflection", mode="bicubic"`` is the same without materialising the padding.
    """
    _check_images(x)
    h, w = x.shape[-2:]
    # PIL builds the inverse map with angle -theta about (w/2, h/2) (Image.rotate).
    a = -per_sample(degrees, x) * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = w / 2.0, h / 2.0
    c = cx - cos * cx - sin * cy
    f = cy + sin * cx - cos * cy
    m = _affine_batch(cos, sin, c, -sin, cos, f)
    return affine_pixels(x, m, mode=mode, padding_mode=padding_mode, fill=fill)


def shear_x(
    x: torch.Tensor, factor: Magnitude, fill: float | Sequence[float] = 0.0, mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """PIL ``transform(AFFINE, (1, factor, 0, 0, 1, 0))``: output (u, v) reads input (u + factor*v, v).

    The shear is about the top-left corner, as in FAA's ShearX (not about the centre).
    """
    v = per_sample(factor, x)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    m = _affine_batch(one, v, zero, zero, one, zero)
    return affine_pixels(x, m, mode=mode, padding_mode=padding_mode, fill=fill)


def shear_y(
    x: torch.Tensor, factor: Magnitude, fill: float | Sequence[float] = 0.0, mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """PIL ``transform(AFFINE, (1, 0, 0, factor, 1, 0))``: output (u, v) reads input (u, factor*u + v)."""
    v = per_sample(factor, x)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    m = _affine_batch(one, zero, zero, v, one, zero)
    return affine_pixels(x, m, mode=mode, padding_mode=padding_mode, fill=fill)


def translate_x(
    x: torch.Tensor, pixels: Magnitude, fill: float | Sequence[float] = 0.0, mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Shift the content right by ``pixels`` (may be fractional; negative shifts left).

    PIL's ``transform(AFFINE, (1, 0, v, 0, 1, 0))`` (FAA's TranslateX) shifts *left* by v, i.e.
    equals ``translate_x(x, -v)``; FAA flips the sign at random, so the distribution is the same.
    """
    v = per_sample(pixels, x)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    m = _affine_batch(one, zero, -v, zero, one, zero)
    return affine_pixels(x, m, mode=mode, padding_mode=padding_mode, fill=fill)


def translate_y(
    x: torch.Tensor, pixels: Magnitude, fill: float | Sequence[float] = 0.0, mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Shift the content down by ``pixels`` (PIL's AFFINE (1,0,0,0,1,v) equals ``translate_y(x, -v)``)."""
    v = per_sample(pixels, x)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    m = _affine_batch(one, zero, zero, zero, one, -v)
    return affine_pixels(x, m, mode=mode, padding_mode=padding_mode, fill=fill)


def zoom(
    x: torch.Tensor, scale: Magnitude, padding_mode: str = "reflection", mode: str = "bilinear",
    fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Scale about the centre and keep the original size: ``scale`` > 1 zooms in, < 1 zooms out.

    learning-loss-for-tta (dataloader.py) resizes a 3x mirror-padded image by the factor (BICUBIC)
    and crops the centre; ``padding_mode="reflection", mode="bicubic"`` is the same map without
    the padding. Its centre crop rounds to whole pixels (a half-pixel offset for odd sizes) and
    PIL antialiases when shrinking; neither quirk is reproduced here.
    """
    _check_images(x)
    h, w = x.shape[-2:]
    if not isinstance(scale, torch.Tensor) and scale <= 0:
        raise ValueError(f"zoom scale must be positive, got {scale}")
    s = per_sample(scale, x)  # per-image scales must be positive (not checked: no GPU sync)
    inv = 1.0 / s
    zero = torch.zeros_like(s)
    cx, cy = w / 2.0, h / 2.0
    m = _affine_batch(inv, zero, cx - inv * cx, zero, inv, cy - inv * cy)
    return affine_pixels(x, m, mode=mode, padding_mode=padding_mode, fill=fill)


# ---------------------------------------------------------------- colour / histogram ops


def invert(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.invert``: 255 - level."""
    return 1.0 - x


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): stretch each channel of each image to [0, 1].

    A constant channel is left as is, as PIL does. PIL truncates ``level*scale + offset`` to an
    integer; here the map stays continuous (differentiable), at most one level above PIL's.
    """
    _check_images(x)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    flat = span <= 0.5 / 255  # same 8-bit level: PIL's ``hi <= lo``
    scaled = (x - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, x, scaled)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize``, per image and channel, on 256-bin histograms for the whole batch.

    PIL's rule: with ``step = (pixels - count of the highest occupied level) // 255``, level i maps
    to ``(step // 2 + number of pixels below level i) // step``; a channel with one occupied
    level or step 0 is left unchanged. Integer arithmetic throughout, so it matches PIL exactly.
    """
    _check_images(x)
    n, c, h, w = x.shape
    lv = _levels(x).view(n, c, h * w)
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, lv, torch.ones_like(lv))
    top_level = lv.amax(dim=2, keepdim=True)  # highest occupied level
    top_count = hist.gather(2, top_level)
    step = (h * w - top_count) // 255  # [N,C,1]
    below = hist.cumsum(2) - hist  # pixels strictly below each level
    safe = step.clamp(min=1)
    lut = ((step // 2 + below) // safe).clamp(0, 255)
    occupied = (hist > 0).sum(2, keepdim=True)
    identity = torch.arange(256, device=x.device).expand(n, c, 256)
    lut = torch.where((step > 0) & (occupied > 1), lut, identity)
    out = lut.gather(2, lv).view(n, c, h, w)
    return out.to(x.dtype) / 255.0


def solarize(x: torch.Tensor, threshold: Magnitude) -> torch.Tensor:
    """PIL ``ImageOps.solarize``: invert every level >= ``threshold`` (in level units, 0..256).

    Threshold 256 leaves the image unchanged, 0 inverts it all (FAA's Solarize range [0, 256]).
    """
    t = _bcast(per_sample(threshold, x), x)
    return torch.where(_levels(x).to(x.dtype) < t, x, 1.0 - x)


def posterize(x: torch.Tensor, bits: Magnitude) -> torch.Tensor:
    """PIL ``ImageOps.posterize``: keep the top ``bits`` bits of each 8-bit level (1..8).

    A fractional ``bits`` is truncated, as FAA's Posterize does with ``int(v)``.
    """
    if not isinstance(bits, torch.Tensor) and not 1 <= bits <= 8:
        raise ValueError(f"posterize bits must lie in [1, 8], got {bits}")
    # Per-image bits are clamped rather than checked: a check would stall the GPU on every call.
    b = per_sample(bits, x).floor().clamp(1.0, 8.0)
    q = torch.pow(2.0, 8.0 - b).to(torch.long).view(-1, 1, 1, 1)
    lv = _levels(x)
    return ((lv // q) * q).to(x.dtype) / 255.0


def brightness(x: torch.Tensor, factor: Magnitude) -> torch.Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black, i.e. ``factor * x`` clipped."""
    return _blend(torch.zeros_like(x), x, factor)


def contrast(x: torch.Tensor, factor: Magnitude) -> torch.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with a flat grey at the mean luma of each image.

    PIL rounds that mean to a whole level (``int(mean + 0.5)``); so does this.
    """
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    degenerate = torch.floor(mean * 255.0 + 0.5).detach() / 255.0
    return _blend(degenerate.expand_as(x), x, factor)


def color(x: torch.Tensor, factor: Magnitude) -> torch.Tensor:
    """PIL ``ImageEnhance.Color`` (saturation): blend with the image's own luma (0 -> grey)."""
    return _blend(_grayscale(x).expand_as(x), x, factor)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageFilter.SMOOTH``: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13, border pixels copied."""
    _check_images(x)
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(c, 1, 3, 3)
    inner = F.conv2d(x, k, groups=c)  # valid conv: [N,C,H-2,W-2]
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def sharpness(x: torch.Tensor, factor: Magnitude) -> torch.Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (<1 blurs, >1 sharpens).

    The border pixels equal their smoothed version, so they stay untouched, as in PIL.
    """
    return _blend(smooth(x), x, factor)


def cutout(
    x: torch.Tensor,
    size_px: Magnitude,
    generator: torch.Generator,
    fill: float | Sequence[float] = FAA_CUTOUT_FILL,
) -> torch.Tensor:
    """FAA's CutoutAbs: paint one square of side ~``size_px`` at a random place in each image.

    As the reference draws it (fast-autoaugment augmentations.py with PIL ImageDraw): a centre
    uniform over the image, the top-left corner ``int(max(0, centre - v/2))``, the far corner
    ``min(size, corner + v)``, and PIL's rectangle includes both corners (truncated to
    integers). A size <= 0 leaves the image unchanged (FAA's Cutout returns early there).
    """
    _check_images(x)
    n, _, h, w = x.shape
    v = per_sample(size_px, x)
    cx = torch.rand(n, device=x.device, generator=generator) * w
    cy = torch.rand(n, device=x.device, generator=generator) * h
    x0 = (cx - v / 2).clamp(min=0).floor()
    y0 = (cy - v / 2).clamp(min=0).floor()
    x1 = torch.minimum(x0 + v, torch.full_like(v, float(w))).floor()
    y1 = torch.minimum(y0 + v, torch.full_like(v, float(h))).floor()
    cols = torch.arange(w, device=x.device, dtype=torch.float32)
    rows = torch.arange(h, device=x.device, dtype=torch.float32)
    in_x = (cols[None, :] >= x0[:, None]) & (cols[None, :] <= x1[:, None])  # [N,W]
    in_y = (rows[None, :] >= y0[:, None]) & (rows[None, :] <= y1[:, None])  # [N,H]
    mask = in_y[:, :, None] & in_x[:, None, :] & (v > 0)[:, None, None]
    return torch.where(mask[:, None], _fill_tensor(fill, x), x)
