"""Batched torch equivalents of the scipy / skimage / OpenCV / ImageMagick / Pillow primitives
that the CIFAR-C generator (hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``) calls.

Each helper states the library call it stands for and the border convention it reproduces. All
work on float tensors [N,C,H,W] on any device; index maps are built with integer arithmetic so
borders behave exactly like the library's, not like ``F.pad``'s narrower set of modes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# OpenCV's RGB -> gray weights (cv2.cvtColor COLOR_RGB2GRAY, float path).
CV_GRAY = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------- border index maps


def border_index(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer indices (any, possibly outside [0, n)) into [0, n) under a border rule.

    ``nearest``: clamp (scipy 'nearest', OpenCV BORDER_REPLICATE, ImageMagick edge pixels).
    ``reflect``: half-sample symmetric, ``d c b a | a b c d`` (scipy/skimage 'reflect').
    ``mirror``: whole-sample symmetric, ``d c b | a b c d`` (scipy 'mirror', OpenCV BORDER_REFLECT_101).
    ``wrap``: periodic.
    Works for any distance from the border (several reflections), which F.pad does not.
    """
    if mode == "nearest":
        return idx.clamp(0, n - 1)
    if mode == "wrap":
        return torch.remainder(idx, n)
    if mode == "reflect":
        m = torch.remainder(idx, 2 * n)
        return torch.where(m < n, m, 2 * n - 1 - m)
    if mode == "mirror":
        if n == 1:
            return torch.zeros_like(idx)
        m = torch.remainder(idx, 2 * n - 2)
        return torch.where(m < n, m, 2 * n - 2 - m)
    raise ValueError(f"unknown border mode {mode!r}; use nearest, reflect, mirror or wrap")


def pad2d(x: torch.Tensor, pad_h: int, pad_w: int, mode: str) -> torch.Tensor:
    """Pad the last two dims of ``x`` by (pad_h, pad_w) on each side with :func:`border_index` rules."""
    h, w = x.shape[-2:]
    dev = x.device
    if pad_h:
        rows = border_index(torch.arange(-pad_h, h + pad_h, device=dev), h, mode)
        x = x.index_select(-2, rows)
    if pad_w:
        cols = border_index(torch.arange(-pad_w, w + pad_w, device=dev), w, mode)
        x = x.index_select(-1, cols)
    return x


# ---------------------------------------------------------------- linear filters


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's sampled Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / float(sigma)) ** 2)
    return k / k.sum()


def separable_filter(x: torch.Tensor, kh: np.ndarray | torch.Tensor, kw: np.ndarray | torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every [H,W] plane of ``x`` [N,C,H,W] with ``kh`` along H then ``kw`` along W.

    The kernels have odd length and are centred (scipy correlate1d / OpenCV sepFilter2D anchors).
    """
    n, c, h, w = x.shape
    kh_t = torch.as_tensor(np.asarray(kh), dtype=x.dtype, device=x.device)
    kw_t = torch.as_tensor(np.asarray(kw), dtype=x.dtype, device=x.device)
    rh, rw = kh_t.numel() // 2, kw_t.numel() // 2
    y = x.reshape(n * c, 1, h, w)
    if rh:
        y = F.conv2d(pad2d(y, rh, 0, mode), kh_t.view(1, 1, -1, 1))
    if rw:
        y = F.conv2d(pad2d(y, 0, rw, mode), kw_t.view(1, 1, 1, -1))
    return y.reshape(n, c, h, w)


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian / scipy.ndimage.gaussian_filter over H and W of every channel.

    skimage's defaults (mode 'nearest', truncate 4.0; with ``multichannel=True`` the channel axis
    gets sigma 0, i.e. is left alone). scipy skips axes whose sigma is ~0, so sigma 0 is identity.
    """
    if sigma <= 1e-15:
        return x
    k = gaussian_kernel1d(sigma, truncate)
    return separable_filter(x, k, k, mode)


def filter2d(x: torch.Tensor, kernel: np.ndarray | torch.Tensor, mode: str = "mirror") -> torch.Tensor:
    """cv2.filter2D (a correlation, anchor at the centre) with an odd square kernel; default border
    BORDER_REFLECT_101 (``mirror``)."""
    n, c, h, w = x.shape
    k = torch.as_tensor(np.asarray(kernel), dtype=x.dtype, device=x.device)
    r = k.shape[0] // 2
    y = pad2d(x.reshape(n * c, 1, h, w), r, r, mode)
    return F.conv2d(y, k.view(1, 1, *k.shape)).reshape(n, c, h, w)


# ---------------------------------------------------------------- sampling


def gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[n, :, rows[n, i, j], cols[n, i, j]]`` for in-range integer maps [N,H',W'] -> [N,C,H',W']."""
    n, c, h, w = x.shape
    flat = (rows * w + cols).reshape(n, 1, -1).expand(n, c, -1)
    return torch.gather(x.reshape(n, c, h * w), 2, flat).reshape(n, c, *rows.shape[1:])


def bilinear_sample(
    x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, mode: str, fy: torch.Tensor | None = None, fx: torch.Tensor | None = None
) -> torch.Tensor:
    """Order-1 interpolation of ``x`` [N,C,H,W] at (ys, xs) [N,H',W'] (pixel units, centres at
    integers), neighbours outside the image mapped by :func:`border_index` (``mode``).

    This is scipy.ndimage.map_coordinates(order=1) for ``mode='reflect'`` / ``'nearest'`` /
    ``'mirror'``: each of the two neighbours is mapped into the image independently. Callers that
    quantise coordinates (OpenCV's 1/32-pixel grid) pass integer parts in ys/xs and fractions in fy/fx.
    """
    h, w = x.shape[-2:]
    if fy is None or fx is None:
        y0f, x0f = torch.floor(ys), torch.floor(xs)
        fy, fx = ys - y0f, xs - x0f
        y0, x0 = y0f.long(), x0f.long()
    else:
        y0, x0 = ys.long(), xs.long()
    ya, yb = border_index(y0, h, mode), border_index(y0 + 1, h, mode)
    xa, xb = border_index(x0, w, mode), border_index(x0 + 1, w, mode)
    fy = fy.to(x.dtype).unsqueeze(1)
    fx = fx.to(x.dtype).unsqueeze(1)
    top = gather_pixels(x, ya, xa) * (1 - fx) + gather_pixels(x, ya, xb) * fx
    bot = gather_pixels(x, yb, xa) * (1 - fx) + gather_pixels(x, yb, xb) * fx
    return top * (1 - fy) + bot * fy


def zoom_matrix(size: int, zoom: float) -> np.ndarray:
    """The linear map [size x size] of the reference's ``clipped_zoom`` along one axis.

    ``clipped_zoom`` crops the central ``ceil(size / zoom)`` pixels (top ``(size - ch) // 2``),
    zooms them with scipy.ndimage.zoom(order=1) to ``round(ch * zoom)`` pixels (output pixel o reads
    input coordinate ``o * (ch - 1) / (out - 1)``) and keeps the central ``size`` of those. As a
    matrix, a 2-D zoom of an image X is ``A @ X @ A.T``. Coordinates past the last input pixel
    (rounding) weight the missing neighbour by ~0, which is dropped (scipy's 'constant' mode).
    """
    ch = int(math.ceil(size / zoom))
    top = (size - ch) // 2
    out = int(round(ch * zoom))
    trim = (out - size) // 2
    step = (ch - 1) / (out - 1) if out > 1 else 1.0
    a = np.zeros((size, size), dtype=np.float64)
    for i in range(size):
        coord = (trim + i) * step
        lo = int(math.floor(coord))
        frac = coord - lo
        if lo >= ch - 1:
            a[i, top + ch - 1] = 1.0
            continue
        a[i, top + lo] += 1.0 - frac
        a[i, top + lo + 1] += frac
    return a


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """The reference's ``clipped_zoom`` on a batch [N,C,H,W] (square images)."""
    size = x.shape[-1]
    at = torch.as_tensor(zoom_matrix(size, zoom), dtype=x.dtype, device=x.device).T
    # A @ X @ A.T as two plain right-multiplications (no broadcast batched matmul)
    return ((x @ at).transpose(-1, -2) @ at).transpose(-1, -2)


# ---------------------------------------------------------------- ImageMagick motion blur


def _quantize_im_q16(v: torch.Tensor) -> torch.Tensor:
    """ImageMagick Q16 round trip of a blurred 8-bit image: ClampToQuantum (round half up into
    0..65535) then ScaleQuantumToChar ((q + 128 - ((q + 128) >> 8)) >> 8), as PNG output writes it."""
    q = torch.floor(v * 65535.0 + 0.5).clamp(0, 65535).long()
    return ((q + 128 - ((q + 128) >> 8)) >> 8).to(v.dtype)


def motion_blur_levels(levels: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """ImageMagick 6 MotionBlurImage on 8-bit levels [N,C,H,W] (floats 0..255), one angle per image.

    Kernel (ImageMagick MagickCore/effect.c, GetMotionBlurKernel / MotionBlurImageChannel): width
    ``2 * ceil(radius) + 1`` (GetOptimalKernelWidth1D), taps ``exp(-i^2 / (2 sigma^2))`` for
    i = 0..width-1 normalised to sum 1 (a one-sided half Gaussian), tap i reads the pixel at
    integer offset ``(ceil(i cos a - 0.5), ceil(i sin a - 0.5))`` (x right, y down), edge pixels
    repeated outside (the default virtual-pixel method). Offsets are rounded, not interpolated.
    Returns 8-bit levels after the Q16 quantisation and 8-bit PNG write.
    """
    n, c, h, w = levels.shape
    width = int(2 * math.ceil(radius) + 1)
    s = max(abs(float(sigma)), 1e-12)  # MagickSigma
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i * i) / (2.0 * s * s))
    k = k / k.sum()
    rad = angle_deg.to(torch.float64) * (math.pi / 180.0)
    px, py = width * torch.sin(rad), width * torch.cos(rad)
    hyp = torch.hypot(px, py)
    it = torch.arange(width, dtype=torch.float64, device=levels.device)
    off_x = torch.ceil(it[None, :] * py[:, None] / hyp[:, None] - 0.5).long()  # [N, width]
    off_y = torch.ceil(it[None, :] * px[:, None] / hyp[:, None] - 0.5).long()
    ys = torch.arange(h, device=levels.device).view(1, h, 1)
    xs = torch.arange(w, device=levels.device).view(1, 1, w)
    acc = torch.zeros(n, c, h, w, dtype=torch.float64, device=levels.device)
    src = levels.to(torch.float64) * 257.0  # ScaleCharToQuantum (Q16)
    for t in range(width):
        rows = (ys + off_y[:, t].view(n, 1, 1)).clamp(0, h - 1).expand(n, h, w)
        cols = (xs + off_x[:, t].view(n, 1, 1)).clamp(0, w - 1).expand(n, h, w)
        acc += float(k[t]) * gather_pixels(src, rows, cols)
    return _quantize_im_q16(acc / 65535.0).to(levels.dtype)


# ---------------------------------------------------------------- colour


def rgb2hsv(x: torch.Tensor) -> torch.Tensor:
    """skimage.color.rgb2hsv on [N,3,H,W]: V = max, S = (max - min) / max (0 where max == min),
    H from whichever channel equals the max, ties resolved red < green < blue (skimage assigns in
    that order, the last assignment wins), H = 0 where max == min."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.amax(dim=1)
    delta = v - x.amin(dim=1)
    flat = delta == 0
    safe = torch.where(flat, torch.ones_like(delta), delta)
    s = torch.where(flat, torch.zeros_like(delta), delta / torch.where(v == 0, torch.ones_like(v), v))
    hh = (g - b) / safe
    hh = torch.where(g == v, 2.0 + (b - r) / safe, hh)
    hh = torch.where(b == v, 4.0 + (r - g) / safe, hh)
    hh = torch.remainder(hh / 6.0, 1.0)
    hh = torch.where(flat, torch.zeros_like(hh), hh)
    return torch.stack((hh, s, v), dim=1)


def hsv2rgb(x: torch.Tensor) -> torch.Tensor:
    """skimage.color.hsv2rgb on [N,3,H,W] (sector ``floor(6 h) mod 6``; p, q, t as in skimage)."""
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    hi_f = torch.floor(h * 6.0)
    f = h * 6.0 - hi_f
    hi = torch.remainder(hi_f.long(), 6)
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    # rows: sector 0..5; columns: (r, g, b)
    table = torch.stack(
        (
            torch.stack((v, t, p)),
            torch.stack((q, v, p)),
            torch.stack((p, v, t)),
            torch.stack((p, q, v)),
            torch.stack((t, p, v)),
            torch.stack((v, p, q)),
        )
    )  # [6, 3, N, H, W]
    idx = hi.unsqueeze(0).unsqueeze(0).expand(1, 3, *hi.shape)
    out = torch.gather(table, 0, idx)[0]  # [3, N, H, W]
    return out.permute(1, 0, 2, 3)


def rgb2gray_cv(x: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(RGB2GRAY) on float images: [N,3,H,W] -> [N,1,H,W]."""
    r, g, b = CV_GRAY
    return (r * x[:, 0] + g * x[:, 1] + b * x[:, 2]).unsqueeze(1)


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """float [0,1] -> the 8-bit levels 0..255 (as floats) of the PIL image the reference gets."""
    return torch.round(x.clamp(0, 1) * 255.0)


def uniform(shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U(lo, hi) draws from ``generator`` on ``device``."""
    return torch.rand(shape, generator=generator, device=device, dtype=dtype) * (hi - lo) + lo
