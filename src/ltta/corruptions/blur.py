"""Blur corruptions: defocus, glass, motion, zoom, and the held-out gaussian blur.

Reference: hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``. The library calls the
reference makes (cv2.filter2D, skimage gaussian, ImageMagick MotionBlurImage, scipy zoom) are
reproduced by the helpers in :mod:`ltta.corruptions._ops`, borders included.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ltta.corruptions import severity as sev
from ltta.corruptions._ops import (
    clipped_zoom,
    filter2d_separable,
    gather_pixels,
    gaussian_filter,
    motion_blur_levels,
    to_levels,
    uniform,
)
from ltta.corruptions.base import CORRUPTIONS


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's ``disk``: a normalised binary disk on a 17x17 grid (radius <= 8; else a
    (2r+1)^2 grid), then anti-aliased by cv2.GaussianBlur with a 3x3 kernel (5x5 for radius > 8) of
    sigma ``alias_blur`` (OpenCV's sampled Gaussian, border BORDER_REFLECT_101). float32, as there."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    d = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    d /= d.sum()
    r = ksize // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t * t) / (2.0 * alias_blur * alias_blur))
    g = (g / g.sum()).astype(np.float32)
    # separable blur with whole-sample symmetric borders (numpy 'reflect' == BORDER_REFLECT_101)
    p = np.pad(d, r, mode="reflect")
    rows = sum(g[i] * p[i : i + d.shape[0], :] for i in range(ksize))
    out = sum(g[i] * rows[:, i : i + d.shape[1]] for i in range(ksize))
    return out.astype(np.float32)


@CORRUPTIONS.register("defocus_blur")
def defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """cv2.filter2D of every channel with the anti-aliased disk (border BORDER_REFLECT_101), as
    the sum of the kernel's separable terms (rank 1 or 2 for the CIFAR radii)."""
    radius, alias = sev.level(sev.DEFOCUS_BLUR, severity)
    return filter2d_separable(x, _disk_kernel_cached(radius, alias), mode="mirror").clamp(0, 1)


@functools.lru_cache(maxsize=16)
def _disk_kernel_cached(radius: float, alias_blur: float) -> np.ndarray:
    k = disk_kernel(radius, alias_blur)
    k.flags.writeable = False
    return k


@CORRUPTIONS.register("gaussian_blur")
def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """skimage.filters.gaussian(sigma=c, multichannel=True): mode 'nearest', truncate 4."""
    sigma = sev.level(sev.GAUSSIAN_BLUR, severity)
    return gaussian_filter(x, sigma, mode="nearest", truncate=4.0).clamp(0, 1)


def glass_shuffle(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, max_delta: int) -> torch.Tensor:
    """One pass of the reference's local pixel "swap", given the offsets it would draw.

    The reference visits h, w = H-d .. d+1 (descending, w inner) and runs
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views, which only copies (h', w') into
    (h, w). Offsets come from randint(-d, d), i.e. -d..d-1 (never positive), so (h', w') is above
    and/or left of (h, w) and is visited *later*: when (h, w) is written its source still holds
    its value from the start of the pass. The sequential loop therefore equals this parallel
    gather exactly. ``dy``/``dx``: integer offsets [N, H-2d, W-2d] for the visited block.
    """
    n, _, h, w = x.shape
    d = max_delta
    rows = torch.arange(h, device=x.device).view(1, h, 1).expand(n, h, w).clone()
    cols = torch.arange(w, device=x.device).view(1, 1, w).expand(n, h, w).clone()
    rows[:, d + 1 : h - d + 1, d + 1 : w - d + 1] += dy
    cols[:, d + 1 : h - d + 1, d + 1 : w - d + 1] += dx
    return gather_pixels(x, rows, cols)


@CORRUPTIONS.register("glass_blur")
def glass_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur, truncation to 8 bits, ``iterations`` passes of local pixel copies, blur again."""
    sigma, d, iterations = sev.level(sev.GLASS_BLUR, severity)
    n, _, h, w = x.shape
    y = torch.floor(gaussian_filter(x, sigma) * 255.0) / 255.0  # np.uint8(gaussian(x) * 255)
    for _ in range(iterations):
        shape = (n, h - 2 * d, w - 2 * d)
        dy = torch.randint(-d, d, shape, generator=generator, device=x.device)
        dx = torch.randint(-d, d, shape, generator=generator, device=x.device)
        y = glass_shuffle(y, dy, dx, d)
    return gaussian_filter(y, sigma).clamp(0, 1)


@CORRUPTIONS.register("motion_blur")
def motion_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """ImageMagick MotionBlurImage(radius, sigma, angle ~ U(-45, 45) per image) on the 8-bit image;
    the output is 8-bit, as the reference decodes ImageMagick's PNG."""
    radius, sigma = sev.level(sev.MOTION_BLUR, severity)
    angle = uniform((x.shape[0],), *sev.MOTION_BLUR_ANGLE, generator, x.device, torch.float64)
    return motion_blur_levels(to_levels(x), radius, sigma, angle) / 255.0


@CORRUPTIONS.register("zoom_blur")
def zoom_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Mean of the image and its centre zooms (scipy zoom order 1, cropped back) over the factors."""
    factors = sev.level(sev.ZOOM_BLUR, severity)
    out = torch.zeros_like(x)
    for z in factors:
        out += clipped_zoom(x, z)
    return ((x + out) / (len(factors) + 1)).clamp(0, 1)
