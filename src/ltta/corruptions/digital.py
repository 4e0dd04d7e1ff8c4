"""Digital corruptions: brightness, contrast, elastic transform, pixelate, JPEG, and the held-out
saturate.

Reference: hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``. Pixelate and JPEG work on
8-bit levels as the reference's PIL calls do and return 8-bit levels.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ltta.corruptions import severity as sev
from ltta.corruptions._ops import (
    bilinear_sample,
    gaussian_filter,
    hsv2rgb,
    rgb2hsv,
    to_levels,
    uniform,
)
from ltta.corruptions.base import CORRUPTIONS


@CORRUPTIONS.register("brightness")
def brightness(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """HSV value + c (clipped), via skimage's rgb2hsv / hsv2rgb."""
    c = sev.level(sev.BRIGHTNESS, severity)
    hsv = rgb2hsv(x)
    hsv[:, 2].add_(c).clamp_(0, 1)
    return hsv2rgb(hsv).clamp(0, 1)


@CORRUPTIONS.register("saturate")
def saturate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """HSV saturation s * a + b (clipped), via skimage's rgb2hsv / hsv2rgb."""
    a, b = sev.level(sev.SATURATE, severity)
    hsv = rgb2hsv(x)
    hsv[:, 1].mul_(a).add_(b).clamp_(0, 1)
    return hsv2rgb(hsv).clamp(0, 1)


@CORRUPTIONS.register("contrast")
def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """(x - m) * c + m with m the per-image, per-channel mean (np.mean over axes (0, 1) of HWC)."""
    c = sev.level(sev.CONTRAST, severity)
    m = x.mean(dim=(2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1)


# ---------------------------------------------------------------- elastic transform


def _affine_inverse(m: torch.Tensor) -> torch.Tensor:
    """cv2.invertAffineTransform for a batch of 2x3 matrices [N,2,3] (float64)."""
    d = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    d = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    a11, a22 = m[:, 1, 1] * d, m[:, 0, 0] * d
    a12, a21 = -m[:, 0, 1] * d, -m[:, 1, 0] * d
    b1 = -a11 * m[:, 0, 2] - a12 * m[:, 1, 2]
    b2 = -a21 * m[:, 0, 2] - a22 * m[:, 1, 2]
    return torch.stack((torch.stack((a11, a12, b1), 1), torch.stack((a21, a22, b2), 1)), 1)


def warp_affine_cv(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """cv2.warpAffine(x, M, (W, H)) with INTER_LINEAR and BORDER_REFLECT_101, one M [2,3] per image.

    As OpenCV: dst(x, y) = src(M^-1 (x, y)); source coordinates are fixed point with 10 fractional
    bits (rounded half to even), then reduced to 1/32 pixel (INTER_BITS = 5), which sets the
    bilinear weights (OpenCV imgwarp.cpp, WarpAffineInvoker).
    """
    n, _, h, w = x.shape
    inv = _affine_inverse(m)
    xs = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, w)
    ys = torch.arange(h, dtype=torch.float64, device=x.device).view(1, h, 1)

    def fixed(row: torch.Tensor) -> torch.Tensor:
        a, b, c = (row[:, i].view(n, 1, 1) for i in range(3))
        x0 = torch.round((b * ys + c) * 1024.0).long() + 16  # AB_SCALE = 1024, round_delta = 16
        return (x0 + torch.round(a * xs * 1024.0).long()) >> 5

    fx_fixed, fy_fixed = fixed(inv[:, 0]), fixed(inv[:, 1])
    ix, iy = fx_fixed >> 5, fy_fixed >> 5
    fx, fy = (fx_fixed & 31).to(torch.float64) / 32.0, (fy_fixed & 31).to(torch.float64) / 32.0
    return bilinear_sample(x, iy, ix, "mirror", fy=fy, fx=fx)


def elastic_from_draws(
    x: torch.Tensor, severity: int, shift: torch.Tensor, ux: torch.Tensor, uy: torch.Tensor
) -> torch.Tensor:
    """elastic_transform given its random draws (for testing against the reference's steps).

    ``shift`` [N,3,2]: the U(-affine, affine) perturbation of the three anchor points;
    ``ux``, ``uy`` [N,H,W]: the U(-1, 1) fields that become dx and dy.
    """
    alpha, sigma, _ = sev.level(sev.ELASTIC, severity)
    n, _, h, w = x.shape
    # anchors: centre +- a third of the side, as float32 (x, y) points (OpenCV order)
    cs = np.float32([w, h]) // 2
    ss = min(h, w) // 3
    pts1 = np.float32([cs + ss, [cs[0] + ss, cs[1] - ss], cs - ss])
    pts2 = torch.as_tensor(pts1, device=x.device).unsqueeze(0) + shift.to(torch.float32)
    # cv2.getAffineTransform: the 2x3 M with M @ [p1, 1] = p2, solved in float64
    p = np.concatenate([pts1.astype(np.float64), np.ones((3, 1))], axis=1)
    pinv = torch.as_tensor(np.linalg.inv(p), device=x.device)
    m = (pinv.unsqueeze(0) @ pts2.to(torch.float64)).transpose(1, 2)  # [N,2,3]
    warped = warp_affine_cv(x, m)
    # displacement fields: skimage gaussian(mode='reflect', truncate=3) * alpha, then float32
    fields = torch.stack((ux, uy), dim=1).to(torch.float64)  # [N,2,H,W]
    fields = (gaussian_filter(fields, sigma, mode="reflect", truncate=3.0) * alpha).to(torch.float32)
    dx, dy = fields[:, 0].to(torch.float64), fields[:, 1].to(torch.float64)
    gy = torch.arange(h, dtype=torch.float64, device=x.device).view(1, h, 1)
    gx = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, w)
    # scipy map_coordinates(order=1, mode='reflect') at (y + dy, x + dx)
    out = bilinear_sample(warped, gy + dy, gx + dx, "reflect", dtype=torch.float64).to(x.dtype)
    return out.clamp(0, 1)


@CORRUPTIONS.register("elastic_transform")
def elastic_transform(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Random affine warp (three anchors moved by U(-affine, affine)), then a smooth random
    displacement field (Gaussian-filtered U(-1,1) noise times alpha), the CIFAR script's version."""
    _, _, affine = sev.level(sev.ELASTIC, severity)
    n, _, h, w = x.shape
    shift = uniform((n, 3, 2), -affine, affine, generator, x.device, torch.float64)
    ux = uniform((n, h, w), -1.0, 1.0, generator, x.device, torch.float64)
    uy = uniform((n, h, w), -1.0, 1.0, generator, x.device, torch.float64)
    return elastic_from_draws(x, severity, shift, ux, uy)


# ---------------------------------------------------------------- pixelate (PIL BOX)

_PIL_PRECISION_BITS = 32 - 8 - 2  # Pillow Resample.c, 8-bit fixed point


def pil_box_coeffs(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point BOX resampling matrix [out, in] (integers scaled by 2**22).

    Pillow libImaging/Resample.c ``precompute_coeffs``: scale = in/out, filter support 0.5 *
    max(scale, 1); output pixel xx is centred at (xx + 0.5) * scale and covers input pixels
    ``int(center -+ support + 0.5)``; box weight 1 where (x - center + 0.5) / filterscale lies in
    (-0.5, 0.5]; weights normalised, then rounded to integers (``normalize_coeffs_8bpc``).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    k = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        for xi in range(xmin, xmax):
            t = (xi - center + 0.5) / filterscale
            k[xx, xi] = 1.0 if -0.5 < t <= 0.5 else 0.0
        total = k[xx].sum()
        if total != 0.0:
            k[xx] /= total
    scaled = k * (1 << _PIL_PRECISION_BITS)
    return np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))


@functools.lru_cache(maxsize=64)
def _pil_box_tensor(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """:func:`pil_box_coeffs` as a float64 tensor, built once per (sizes, device)."""
    return torch.as_tensor(pil_box_coeffs(in_size, out_size), dtype=torch.float64, device=device)


def _pil_pass(levels: torch.Tensor, in_size: int, out_size: int, dim: int) -> torch.Tensor:
    """One Pillow 8-bit resampling pass along ``dim`` (-1: horizontal, -2: vertical): integer
    accumulation with rounding offset 2**21, shift by 22 bits, clip to 0..255. The sums of
    integer coefficients times levels stay below 2**31, so float64 holds them exactly; the
    shift is an exact multiplication by 2**-22 and a floor, done in place."""
    k = _pil_box_tensor(in_size, out_size, levels.device)
    v = levels.to(torch.float64)
    acc = v @ k.T if dim == -1 else torch.matmul(k, v)
    acc.add_(1 << (_PIL_PRECISION_BITS - 1)).mul_(1.0 / (1 << _PIL_PRECISION_BITS)).floor_()
    return acc.clamp_(0, 255)


def pil_resize_box(levels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL Image.resize((w, h), BOX) on 8-bit levels [N,C,H,W]: horizontal pass, 8-bit
    intermediate, then vertical pass (Pillow's order)."""
    h, w = levels.shape[-2:]
    out_w, out_h = size
    y = levels
    if out_w != w:
        y = _pil_pass(y, w, out_w, -1)
    if out_h != h:
        y = _pil_pass(y, h, out_h, -2)
    return y


@CORRUPTIONS.register("pixelate")
def pixelate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """PIL BOX resize to int(32 c) (int(W c) x int(H c)) and BOX back, on 8-bit levels."""
    c = sev.level(sev.PIXELATE, severity)
    h, w = x.shape[-2:]
    small = pil_resize_box(to_levels(x), (int(w * c), int(h * c)))
    return (pil_resize_box(small, (w, h)) / 255.0).to(x.dtype)


# ---------------------------------------------------------------- JPEG


@CORRUPTIONS.register("jpeg_compression")
def jpeg_compression(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """JPEG round trip at quality c with libjpeg (torchvision.io), as PIL's save(quality=c) does:
    standard IJG tables scaled by quality, 4:2:0 chroma subsampling, baseline, islow DCT.

    Always encodes on the CPU (libjpeg) so the bytes match PIL's; GPU (nvJPEG) coding would
    quantise differently. The batch is passed as one list call.
    """
    # Imported here: torchvision's import pulls in its models and torch._dynamo (about 2 s), which
    # every stage importing the corruptions would otherwise pay at start-up.
    import torchvision.io

    q = int(sev.level(sev.JPEG_QUALITY, severity))
    levels = to_levels(x).to(torch.uint8).cpu()
    encoded = torchvision.io.encode_jpeg(list(levels.unbind(0)), quality=q)
    decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB)
    out = torch.stack(decoded).to(device=x.device, dtype=x.dtype)
    return out / 255.0
