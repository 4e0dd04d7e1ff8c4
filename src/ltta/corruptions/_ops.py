"""Batched torch equivalents of the scipy / skimage / OpenCV / ImageMagick / Pillow primitives
that the CIFAR-C generator (hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``) calls.

Each helper states the library call it stands for and the border convention it reproduces. All
work on float tensors [N,C,H,W] on any device; index maps are built with integer arithmetic so
borders behave exactly like the library's, not like ``F.pad``'s narrower set of modes.
"""

from __future__ import annotations

import functools
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


# border rules that F.pad implements for pads shorter than the side (one reflection at most)
_F_PAD_MODES = {"nearest": "replicate", "mirror": "reflect", "wrap": "circular"}


def _flip_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric padding (``reflect``) of one dim by ``pad`` <= its size."""
    if not pad:
        return x
    n = x.shape[dim]
    return torch.cat((x.narrow(dim, 0, pad).flip(dim), x, x.narrow(dim, n - pad, pad).flip(dim)), dim=dim)


def pad2d(x: torch.Tensor, pad_h: int, pad_w: int, mode: str) -> torch.Tensor:
    """Pad the last two dims of ``x`` by (pad_h, pad_w) on each side with :func:`border_index` rules.

    Pads within one reflection of a float tensor go through F.pad (or two flipped slices for
    ``reflect``), which is tens of times faster than the general index gather used otherwise.
    """
    h, w = x.shape[-2:]
    dev = x.device
    if x.is_floating_point() and pad_h < h and pad_w < w:
        if mode in _F_PAD_MODES:
            lead = x.shape[:-2]
            y = F.pad(x.reshape(-1, h, w), (pad_w, pad_w, pad_h, pad_h), mode=_F_PAD_MODES[mode])
            return y.reshape(*lead, h + 2 * pad_h, w + 2 * pad_w)
        if mode == "reflect":
            return _flip_pad(_flip_pad(x, pad_h, x.dim() - 2), pad_w, x.dim() - 1)
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


@functools.lru_cache(maxsize=256)
def _correlation_matrix_np(taps: tuple[float, ...], n: int, mode: str) -> np.ndarray:
    """float64 [n, n] matrix M with ``(M @ v)[i] = sum_t taps[t] * v[border(i + t - r)]``: a 1-D
    correlation (odd, centred kernel; scipy correlate1d / OpenCV anchor) with its border rule
    folded in. Taps that land on the same pixel at a border are summed in tap order."""
    r = len(taps) // 2
    m = np.zeros((n, n), dtype=np.float64)
    rows = np.arange(n)
    for t, k in enumerate(taps):
        cols = border_index(torch.arange(n) + (t - r), n, mode).numpy()
        np.add.at(m, (rows, cols), k)
    return m


@functools.lru_cache(maxsize=256)
def correlation_matrix(taps: tuple[float, ...], n: int, mode: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_correlation_matrix_np` as a tensor, built once per (kernel, size, border, device, dtype).

    Why matrices: on 32x32 images a 1-D filter as ``X @ M.T`` is one large GEMM with the border
    inside the matrix, several times faster than padding (a gather) plus a one-channel
    convolution, on CPU and GPU alike; the sums are the same up to float rounding.
    """
    return torch.as_tensor(_correlation_matrix_np(taps, n, mode), dtype=dtype, device=device)


def sandwich(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ X @ b.T`` for every [H,W] plane X of ``x`` [..., H, W]: ``a`` acts on rows (H), ``b``
    on columns (W). The W product is one GEMM over all planes, the H product a batched one."""
    return torch.matmul(a, x @ b.T)


def _taps(k: np.ndarray | torch.Tensor | tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(k, dtype=np.float64).ravel())


def separable_filter(x: torch.Tensor, kh: np.ndarray | torch.Tensor, kw: np.ndarray | torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every [H,W] plane of ``x`` [N,C,H,W] with ``kh`` along H and ``kw`` along W.

    The kernels have odd length and are centred (scipy correlate1d / OpenCV sepFilter2D anchors);
    the borders follow :func:`border_index` (``mode``). Computed as ``Mh @ X @ Mw.T`` with the
    cached matrices of :func:`correlation_matrix`.
    """
    h, w = x.shape[-2:]
    kh_t, kw_t = _taps(kh), _taps(kw)
    if len(kh_t) == 1 and len(kw_t) == 1 and kh_t[0] == 1.0 and kw_t[0] == 1.0:
        return x
    mh = correlation_matrix(kh_t, h, mode, x.device, x.dtype)
    mw = correlation_matrix(kw_t, w, mode, x.device, x.dtype)
    return sandwich(x, mh, mw)


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian / scipy.ndimage.gaussian_filter over H and W of every channel.

    skimage's defaults (mode 'nearest', truncate 4.0; with ``multichannel=True`` the channel axis
    gets sigma 0, i.e. is left alone). scipy skips axes whose sigma is ~0, so sigma 0 is identity.
    """
    if sigma <= 1e-15:
        return x
    k = gaussian_kernel1d(sigma, truncate)
    return separable_filter(x, k, k, mode)


@functools.lru_cache(maxsize=64)
def separable_terms(kernel: tuple[tuple[float, ...], ...], rtol: float = 1e-7) -> tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]:
    """A 2-D kernel as a sum of outer products ``sum_i u_i v_i^T`` (its SVD, float64), keeping the
    terms whose singular value exceeds ``rtol`` times the largest.

    Why: correlating with ``u v^T`` is a column pass with ``u`` then a row pass with ``v``
    (:func:`separable_filter`), and the CIFAR defocus kernels have rank 1 or 2 (a point or a 3x3
    square blurred by a separable Gaussian: rank 1; the radius-1 cross: rank 2). The dropped
    singular values are float32 rounding of the kernel (< 1e-8 of the largest for those).
    """
    k = np.asarray(kernel, dtype=np.float64)
    u, s, vt = np.linalg.svd(k)
    keep = s > rtol * s[0] if s[0] > 0 else np.zeros_like(s, dtype=bool)
    return tuple((_taps(u[:, i] * s[i]), _taps(vt[i])) for i in np.flatnonzero(keep))


def filter2d_separable(x: torch.Tensor, kernel: np.ndarray, mode: str = "mirror") -> torch.Tensor:
    """cv2.filter2D (a correlation, anchor at the centre; default border BORDER_REFLECT_101,
    ``mirror``) with an odd square kernel of low rank, as the sum of the separable passes of
    :func:`separable_terms`. Equal to the direct 2-D correlation up to float rounding; for integer
    kernels whose sums must stay exact use :func:`filter2d`."""
    key = tuple(_taps(row) for row in np.asarray(kernel, dtype=np.float64))
    terms = separable_terms(key)
    if not terms:
        return torch.zeros_like(x)
    out = separable_filter(x, terms[0][0], terms[0][1], mode)
    for u, v in terms[1:]:
        out = out + separable_filter(x, u, v, mode)
    return out


def filter2d(x: torch.Tensor, kernel: np.ndarray | torch.Tensor, mode: str = "mirror") -> torch.Tensor:
    """cv2.filter2D (a correlation, anchor at the centre) with an odd square kernel; default border
    BORDER_REFLECT_101 (``mirror``). A sum of shifted copies over the nonzero taps in row-major
    order, so integer kernels on integer levels give exact sums."""
    k = np.asarray(kernel, dtype=np.float64)
    r = k.shape[0] // 2
    h, w = x.shape[-2:]
    p = pad2d(x, r, r, mode)
    out = torch.zeros_like(x)
    for i, j in zip(*np.nonzero(k)):
        out.add_(p[..., i : i + h, j : j + w], alpha=float(k[i, j]))
    return out


# ---------------------------------------------------------------- sampling


def gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[n, :, rows[n, i, j], cols[n, i, j]]`` for in-range integer maps [N,H',W'] -> [N,C,H',W']."""
    n, c, h, w = x.shape
    flat = (rows * w + cols).reshape(n, 1, -1).expand(n, c, -1)
    return torch.gather(x.reshape(n, c, h * w), 2, flat).reshape(n, c, *rows.shape[1:])


def bilinear_sample(
    x: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    mode: str,
    fy: torch.Tensor | None = None,
    fx: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Order-1 interpolation of ``x`` [N,C,H,W] at (ys, xs) [N,H',W'] (pixel units, centres at
    integers), neighbours outside the image mapped by :func:`border_index` (``mode``).

    This is scipy.ndimage.map_coordinates(order=1) for ``mode='reflect'`` / ``'nearest'`` /
    ``'mirror'``: each of the two neighbours is mapped into the image independently. Callers that
    quantise coordinates (OpenCV's 1/32-pixel grid) pass integer parts in ys/xs and fractions in fy/fx.
    ``dtype``: the arithmetic's precision (default ``x``'s); a float32 image interpolated in
    float64 is gathered as float32 (half the memory traffic) and widened exactly in the products.

    The image is padded once by the largest reach of the coordinates (with the same border rule),
    so the four neighbours are plain offsets of one flat index: a padded pixel holds exactly the
    value :func:`border_index` would have fetched.
    """
    n, c, h, w = x.shape
    if fy is None or fx is None:
        y0f, x0f = torch.floor(ys), torch.floor(xs)
        fy, fx = ys - y0f, xs - x0f
        y0, x0 = y0f.long(), x0f.long()
    else:
        y0, x0 = ys.long(), xs.long()
    # one host sync for the reach (the coordinates of a corruption stay within a few pixels)
    lo = torch.stack((y0.amin(), x0.amin()))
    hi = torch.stack((y0.amax() + 1 - (h - 1), x0.amax() + 1 - (w - 1)))
    pad_h, pad_w = (int(v) for v in torch.maximum(torch.maximum(-lo, hi), torch.zeros_like(lo)).tolist())
    p = pad2d(x, pad_h, pad_w, mode)
    wp = w + 2 * pad_w
    base = ((y0 + pad_h) * wp + (x0 + pad_w)).reshape(n, 1, -1)
    flat = p.reshape(n, c, -1)

    def at(offset: int) -> torch.Tensor:
        idx = (base + offset).expand(n, c, -1)
        return torch.gather(flat, 2, idx).reshape(n, c, *ys.shape[1:])

    fy = fy.to(dtype or x.dtype).unsqueeze(1)
    fx = fx.to(dtype or x.dtype).unsqueeze(1)
    gx = 1 - fx
    top = at(0) * gx + at(1) * fx
    bot = at(wp) * gx + at(wp + 1) * fx
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
    a = zoom_tensor(x.shape[-1], zoom, x.device, x.dtype)
    return sandwich(x, a, a)


@functools.lru_cache(maxsize=256)
def zoom_tensor(size: int, zoom: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`zoom_matrix` as a tensor, built once per (size, factor, device, dtype)."""
    return torch.as_tensor(zoom_matrix(size, zoom), dtype=dtype, device=device)


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
    # edge pixels repeat: clamped row and column indices are separable, so each tap's flat index is
    # one [N,H,1] + [N,1,W] sum; the gather reads float32 Q16 values (exact integers) and the
    # accumulation stays in float64 in tap order, as ImageMagick's double sum
    src = (levels.to(torch.float32) * 257.0).reshape(n, c, h * w)  # ScaleCharToQuantum (Q16)
    rows = (ys + off_y.view(n, 1, width)).clamp(0, h - 1) * w  # [N, H, width]
    cols = (xs.view(1, w, 1) + off_x.view(n, 1, width)).clamp(0, w - 1)  # [N, W, width]
    acc = torch.zeros(n, c, h * w, dtype=torch.float64, device=levels.device)
    for t in range(width):
        idx = (rows[:, :, t : t + 1] + cols[:, None, :, t]).reshape(n, 1, h * w).expand(n, c, h * w)
        acc.add_(torch.gather(src, 2, idx), alpha=float(k[t]))
    return _quantize_im_q16(acc.view(n, c, h, w) / 65535.0).to(levels.dtype)


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
    # which of (v, p, q, t) each of r, g, b takes in sectors 0..5 (skimage's table)
    pick = _hsv_sector_table(x.device)[:, hi]  # [3, N, H, W]
    out = torch.gather(torch.stack((v, p, q, t)), 0, pick)  # [3, N, H, W]
    return out.permute(1, 0, 2, 3)


@functools.lru_cache(maxsize=8)
def _hsv_sector_table(device: torch.device) -> torch.Tensor:
    """[3, 6] indices into (v, p, q, t): r = (v, q, p, p, t, v), g = (t, v, v, q, p, p),
    b = (p, p, t, v, v, q) over the six hue sectors."""
    v, p, q, t = range(4)
    return torch.tensor([[v, q, p, p, t, v], [t, v, v, q, p, p], [p, p, t, v, v, q]], device=device)


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
