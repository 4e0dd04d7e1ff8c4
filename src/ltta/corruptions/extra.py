"""Spatter (held-out corruption), with the OpenCV steps of its "liquid" branch emulated in torch.

Reference: hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py`` (spatter). Severities 1-3
use the liquid branch: a thresholded, Gaussian-filtered N(loc, scale) layer whose Canny edges
feed a distance transform, which shapes pale-turquoise water drops. Severities 4-5 use the mud
branch: the thresholded layer blurred again and painted mud brown. The OpenCV functions are
reproduced from OpenCV's imgproc sources (canny.cpp, distransform.cpp, histogram.cpp, box_filter):
integer and fixed-point steps are exact, and so are borders.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ltta.corruptions import severity as sev
from ltta.corruptions._ops import filter2d, gaussian_filter, pad2d, separable_filter
from ltta.corruptions.base import CORRUPTIONS

# pale turquoise (175, 238, 238) added to R, G, B (the reference builds it as "BGR" but applies it
# to the RGB image without reordering, which lands on these RGB values); mud brown (63, 42, 20).
_WATER = (175 / 255.0, 238 / 255.0, 238 / 255.0)
_MUD = (63 / 255.0, 42 / 255.0, 20 / 255.0)

# ---------------------------------------------------------------- OpenCV emulation (uint8 images as float levels)

_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # canny.cpp, CANNY_SHIFT = 15


def _shift(x: torch.Tensor, dy: int, dx: int, fill: float | int) -> torch.Tensor:
    """out[i, j] = x[i + dy, j + dx] for |dy|, |dx| <= 2, ``fill`` outside; x [N,1,H,W]."""
    h, w = x.shape[-2:]
    p = F.pad(x, (2, 2, 2, 2), value=fill)
    return p[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]


def canny(levels: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(img, low, high) (aperture 3, L1 gradient) on 8-bit levels [N,1,H,W] -> bool edges.

    Sobel with BORDER_REPLICATE; magnitude |dx| + |dy|; non-maximum suppression along the gradient
    sector with OpenCV's fixed-point tan(22.5) test and its asymmetric comparisons (>, >= ...),
    magnitude 0 outside the image; hysteresis: the 8-connected components of candidates
    (m > low and locally maximal) that contain a pixel with m > high. (OpenCV's stack tracking
    reaches exactly those components.)
    """
    # integer levels and gradients (|g| <= 1020, the fixed-point products < 2**31): int32 is exact
    p = pad2d(levels.to(torch.float32), 1, 1, "nearest").to(torch.int32)
    h, w = levels.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mag = gx.abs() + gy.abs()
    left, right = _shift(mag, 0, -1, 0), _shift(mag, 0, 1, 0)
    up, down = _shift(mag, -1, 0, 0), _shift(mag, 1, 0, 0)
    ax, ay = gx.abs(), gy.abs() << 15
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    s_neg = (gx ^ gy) < 0  # s = -1
    # diagonal neighbours: previous row at column j - s, next row at column j + s
    d1 = torch.where(s_neg, _shift(mag, -1, 1, 0), _shift(mag, -1, -1, 0))
    d2 = torch.where(s_neg, _shift(mag, 1, -1, 0), _shift(mag, 1, 1, 0))
    keep = torch.where(
        horizontal,
        (mag > left) & (mag >= right),
        torch.where(vertical, (mag > up) & (mag >= down), (mag > d1) & (mag > d2)),
    )
    cand = keep & (mag > math.floor(low))  # cvFloor of the thresholds
    edges = cand & (mag > math.floor(high))
    while True:
        grown = cand & _dilate3(edges)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def _dilate3(mask: torch.Tensor) -> torch.Tensor:
    """Binary dilation of a bool mask [..., H, W] by a 3x3 square (8-neighbourhood), nothing outside:
    a row pass and a column pass of ORs over shifted slices."""
    p = F.pad(mask.to(torch.uint8), (1, 1, 1, 1))
    r = p[..., :, :-2] | p[..., :, 1:-1] | p[..., :, 2:]
    return (r[..., :-2, :] | r[..., 1:-1, :] | r[..., 2:, :]).bool()


_DIST_SHIFT = 16
_INIT_DIST0 = (2**31 - 1) >> 2  # distransform.cpp INIT_DIST0: pixels outside the image
# cv2.distanceTransform(DIST_L2, maskSize=5): chamfer weights 1, 1.4, 2.1969 (distransform.cpp),
# as fixed point cvRound(w * 2**16).
_CHAMFER5 = (round(1.0 * 65536), round(1.4 * 65536), round(2.1969 * 65536))


def _row_scan(c: torch.Tensor, step: int, reverse: bool) -> torch.Tensor:
    """``d[j] = min(c[j], d[j-1] + step)`` along the last dim (``d[j+1]`` if ``reverse``), with the
    pixel beyond the row's start at INIT_DIST0: the in-row part of one OpenCV raster pass, as a
    cumulative minimum of ``c[k] - step * k`` (integers, so exact)."""
    w = c.shape[-1]
    ramp = torch.arange(w, device=c.device, dtype=c.dtype) * step
    if reverse:
        c = c.flip(-1)
    d = torch.minimum(torch.cummin(c - ramp, dim=-1).values + ramp, _INIT_DIST0 + step + ramp)
    return d.flip(-1) if reverse else d


def distance_transform_l2_5(nonzero: torch.Tensor) -> torch.Tensor:
    """cv2.distanceTransform(src, DIST_L2, 5): float32 distance of every pixel to the nearest zero
    pixel under the 5x5 chamfer metric; [N,1,H,W] bool (True = nonzero) -> float.

    OpenCV's own two raster passes (distransform.cpp, distanceTransform_5x5) on fixed-point
    integers, with its INIT_DIST0 border: the forward pass takes each pixel's minimum over the
    five-by-five mask's upper half (rows i-2, i-1) and its left neighbour, the backward pass the
    mirrored half and its right neighbour. Rows are vectorised over the batch; the in-row
    dependency is a cumulative minimum (:func:`_row_scan`). Integer sums, so the result is exact,
    including images without a zero pixel (OpenCV's values near INIT_DIST0 / 2**16).
    """
    hv, diag, lng = _CHAMFER5
    n, c, h, w = nonzero.shape
    nz = nonzero.reshape(n * c, h, w)
    # int32 holds every sum for images below 4096 pixels a side: INIT_DIST0 (2**29 - 1) plus at
    # most a row of chamfer steps stays below 2**31
    dt = torch.int32 if max(h, w) < 4096 else torch.int64
    t = torch.full((n * c, h + 4, w + 4), _INIT_DIST0, dtype=dt, device=nonzero.device)
    zero = torch.zeros((), dtype=dt, device=nonzero.device)
    # column j of the image is column j + 2 of t; row i is row i + 2
    for i in range(h):
        r2, r1 = t[:, i], t[:, i + 1]
        m = torch.minimum(r2[:, 1 : w + 1], r2[:, 3 : w + 3]) + lng
        m = torch.minimum(m, torch.minimum(r1[:, 0:w], r1[:, 4 : w + 4]) + lng)
        m = torch.minimum(m, torch.minimum(r1[:, 1 : w + 1], r1[:, 3 : w + 3]) + diag)
        m = torch.minimum(m, r1[:, 2 : w + 2] + hv)
        t[:, i + 2, 2 : w + 2] = _row_scan(torch.where(nz[:, i], m, zero), hv, reverse=False)
    for i in range(h - 1, -1, -1):
        r1, r2 = t[:, i + 3], t[:, i + 4]
        m = torch.minimum(r2[:, 1 : w + 1], r2[:, 3 : w + 3]) + lng
        m = torch.minimum(m, torch.minimum(r1[:, 0:w], r1[:, 4 : w + 4]) + lng)
        m = torch.minimum(m, torch.minimum(r1[:, 1 : w + 1], r1[:, 3 : w + 3]) + diag)
        m = torch.minimum(m, r1[:, 2 : w + 2] + hv)
        t[:, i + 2, 2 : w + 2] = _row_scan(torch.minimum(t[:, i + 2, 2 : w + 2], m), hv, reverse=True)
    d = t[:, 2 : h + 2, 2 : w + 2].reshape(n, c, h, w)
    return (d.to(torch.float64) / (1 << _DIST_SHIFT)).to(torch.float32)


def box_blur3(x: torch.Tensor) -> torch.Tensor:
    """cv2.blur(x, (3, 3)), BORDER_REFLECT_101: exact sums in float64 times 1/9 (as OpenCV's
    normalised box filter), returned in float64. The inputs here are multiples of 2**-16 below
    256, so the float64 sums are exact in any order (a separable pass of ones)."""
    ones = (1.0, 1.0, 1.0)
    return separable_filter(x.to(torch.float64), ones, ones, "mirror") * (1.0 / 9.0)


def equalize_hist(levels: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist on 8-bit levels [N,1,H,W]: LUT with lut[first nonempty bin] = 0 and
    lut[i] = saturate_cast<uchar>(cumsum_after_first[i] * (255.f / (total - hist[first]))),
    computed in float32 and rounded half to even; a constant image stays as it is."""
    n = levels.shape[0]
    v = levels.reshape(n, -1).long()
    total = v.shape[1]
    hist = torch.zeros(n, 256, dtype=torch.int64, device=levels.device).scatter_add_(1, v, torch.ones_like(v))
    first = (hist > 0).to(torch.int64).argmax(dim=1)  # first nonempty bin
    first_count = hist.gather(1, first[:, None])
    scale = torch.tensor(255.0, dtype=torch.float32, device=levels.device) / (total - first_count).to(torch.float32)
    bins = torch.arange(256, device=levels.device)[None, :]
    after = torch.where(bins > first[:, None], hist, torch.zeros_like(hist)).cumsum(dim=1)
    lut = torch.round(after.to(torch.float32) * scale).clamp(0, 255)
    constant = (first_count == total).expand(-1, 256)
    lut = torch.where(constant, bins.expand(n, -1).to(torch.float32), lut)
    return lut.gather(1, v).reshape(levels.shape).to(levels.dtype)


# ---------------------------------------------------------------- spatter


def liquid_mask(layer: torch.Tensor, intensity: float) -> torch.Tensor:
    """The water-drop map m [N,1,H,W] of the liquid branch, from the thresholded layer."""
    # (liquid * 255).astype(uint8): truncation; values above 255 wrap modulo 256 as numpy's cast does on x86
    lv = (torch.trunc(layer * 255.0).to(torch.int64) & 255).to(layer.dtype)
    edges = canny(lv, 50, 150)
    dist = distance_transform_l2_5(~edges)  # 255 - Canny: edges are the zeros
    dist = dist.clamp(max=20.0)  # cv2.threshold(dist, 20, 20, THRESH_TRUNC)
    dist = torch.floor(box_blur3(dist).to(torch.float32))  # cv2.blur then astype(uint8)
    dist = equalize_hist(dist)
    ker = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=torch.float64)
    dist = filter2d(dist.to(torch.float64), ker, mode="mirror").clamp(0, 255)  # filter2D to CV_8U (integer sums)
    dist = torch.round(box_blur3(dist)).clamp(0, 255).to(torch.float32)  # cv2.blur on uint8 rounds
    m = lv.to(torch.float32) * dist
    peak = m.amax(dim=(2, 3), keepdim=True)
    # the reference divides by the max; an all-zero map (no drop) would give NaN there: leave x as is
    m = torch.where(peak > 0, m / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(m))
    return m * intensity


def _liquid(x: torch.Tensor, layer: torch.Tensor, intensity: float) -> torch.Tensor:
    m = liquid_mask(layer, intensity).to(x.dtype)
    color = torch.tensor(_WATER, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x + m * color).clamp(0, 1)


def _mud(x: torch.Tensor, layer: torch.Tensor, thresh: float, sigma: float) -> torch.Tensor:
    m = (layer > thresh).to(torch.float32)
    m = gaussian_filter(m, sigma)
    m = torch.where(m < 0.8, torch.zeros_like(m), m).to(x.dtype)
    color = torch.tensor(_MUD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * (1 - m) + color * m).clamp(0, 1)


@CORRUPTIONS.register("spatter")
def spatter(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Water drops (severities 1-3) or mud splashes (4-5) from a thresholded smooth noise layer."""
    loc, scale, sigma, thresh, intensity, mode = sev.level(sev.SPATTER, severity)
    n, _, h, w = x.shape
    layer = loc + scale * torch.randn((n, 1, h, w), generator=generator, device=x.device, dtype=torch.float64)
    layer = gaussian_filter(layer, sigma)  # skimage gaussian: mode 'nearest', truncate 4
    layer = torch.where(layer < thresh, torch.zeros_like(layer), layer)
    if mode == 0:
        return _liquid(x, layer, intensity)
    return _mud(x, layer, thresh, intensity)
