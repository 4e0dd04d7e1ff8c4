"""Weather corruptions: snow, frost, fog.

Reference: hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py`` (snow, frost, fog,
plasma_fractal). Every image gets its own random layer (snow flakes and angle, frost picture and
crop, fog fractal), drawn for the whole batch at once.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import torch
from PIL import Image

from ltta.corruptions import severity as sev
from ltta.corruptions._ops import clipped_zoom, motion_blur_levels, rgb2gray_cv, uniform
from ltta.corruptions.base import CORRUPTIONS

# ---------------------------------------------------------------- fog


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The reference's diamond-square height maps, ``n`` at once: [n, mapsize, mapsize] in [0, 1].

    Same recurrence as ``plasma_fractal`` (a modification of FLHerne/mapgen diamondsquare.py): at
    each step size, square centres get the mean of their four corners and diamond centres the mean
    of their four neighbours (periodic via roll), each plus ``wibble * U(-wibble, wibble)``; wibble
    starts at 100 and is divided by ``wibbledecay`` per level. Each map is min-max normalised.
    """
    if mapsize & (mapsize - 1):
        raise ValueError(f"plasma fractal mapsize must be a power of two, got {mapsize}")
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64, device=device)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        return total / 4 + wibble * uniform(tuple(total.shape), -wibble, wibble, generator, device, torch.float64)

    while step >= 2:
        half = step // 2
        # squares: centre of each square of corners `step` apart
        corner = m[:, 0::step, 0::step]
        acc = corner + torch.roll(corner, -1, dims=1)
        acc = acc + torch.roll(acc, -1, dims=2)
        m[:, half::step, half::step] = wibbled_mean(acc)
        # diamonds: the two kinds of edge midpoints
        dr = m[:, half::step, half::step]
        ul = m[:, 0::step, 0::step]
        left = (dr + torch.roll(dr, 1, dims=1)) + (ul + torch.roll(ul, -1, dims=2))
        m[:, 0::step, half::step] = wibbled_mean(left)
        top = (dr + torch.roll(dr, 1, dims=2)) + (ul + torch.roll(ul, -1, dims=1))
        m[:, half::step, 0::step] = wibbled_mean(top)
        step //= 2
        wibble /= wibbledecay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


@CORRUPTIONS.register("fog")
def fog(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """x + amount * plasma (same on all channels), rescaled by max / (max + amount), clipped;
    max is the image's maximum over all pixels and channels."""
    amount, decay = sev.level(sev.FOG, severity)
    n, _, h, w = x.shape
    plasma = plasma_fractal(n, sev.FOG_MAPSIZE, decay, generator, x.device)[:, :h, :w]
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    y = x + amount * plasma.unsqueeze(1).to(x.dtype)
    return (y * max_val / (max_val + amount)).clamp(0, 1)


# ---------------------------------------------------------------- snow


@CORRUPTIONS.register("snow")
def snow(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Snow flakes: a N(loc, scale) layer, zoomed, thresholded, stored as 8-bit, motion-blurred by
    ImageMagick (angle U(-135, -45)), added to the image and to its 180-degree rotation over an
    image brightened towards ``max(x, 1.5 gray + 0.5)``."""
    loc, scale, zoom, thresh, radius, sigma, blend = sev.level(sev.SNOW, severity)
    n, _, h, w = x.shape
    layer = loc + scale * torch.randn((n, 1, h, w), generator=generator, device=x.device, dtype=torch.float64)
    layer = clipped_zoom(layer, zoom)
    layer = torch.where(layer < thresh, torch.zeros_like(layer), layer)
    levels = torch.floor(layer.clamp(0, 1) * 255.0)  # PIL 'L' image of astype(uint8)
    angle = uniform((n,), *sev.SNOW_ANGLE, generator, x.device, torch.float64)
    flakes = (motion_blur_levels(levels, radius, sigma, angle) / 255.0).to(x.dtype)
    y = blend * x + (1 - blend) * torch.maximum(x, rgb2gray_cv(x) * 1.5 + 0.5)
    return (y + flakes + torch.flip(flakes, dims=(2, 3))).clamp(0, 1)


# ---------------------------------------------------------------- frost

# The reference draws randint(5), so only frost1..frost5 are ever used (frost6.jpg never is).
FROST_FILES: tuple[str, ...] = tuple(f"frost{i}.png" for i in range(1, 6))


@functools.lru_cache(maxsize=1)
def frost_pictures() -> tuple[np.ndarray, ...]:
    """The five frost pictures, RGB uint8 [H,W,3], already at the reference's 0.2 scale.

    Shipped in ``ltta/corruptions/frost/`` (hendrycks/robustness, Apache-2.0). They are the
    originals' pixels (5i+2, 5j+2): cv2.resize(fx=fy=0.2, INTER_LINEAR) samples exactly those
    (source coordinate (i + 0.5) * 5 - 0.5 is an integer, so the bilinear weights are 1 and 0),
    so storing them pre-scaled is bit-equivalent to resizing at run time; alpha dropped as
    cv2.imread(IMREAD_COLOR) does, and BGR->RGB applied.
    """
    folder = resources.files("ltta.corruptions").joinpath("frost")
    pics = []
    for name in FROST_FILES:
        with folder.joinpath(name).open("rb") as fh:
            pics.append(np.asarray(Image.open(fh).convert("RGB"), dtype=np.uint8))
    return tuple(pics)


@functools.lru_cache(maxsize=4)
def _frost_bank(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frost pictures zero-padded into one tensor [5,3,Hmax,Wmax] (levels) and their sizes [5,2],
    built once per device."""
    pics = frost_pictures()
    hmax = max(p.shape[0] for p in pics)
    wmax = max(p.shape[1] for p in pics)
    bank = np.zeros((len(pics), hmax, wmax, 3), dtype=np.float32)
    for i, p in enumerate(pics):
        bank[i, : p.shape[0], : p.shape[1]] = p
    sizes = torch.tensor([p.shape[:2] for p in pics], device=device)
    return torch.as_tensor(bank, device=device).permute(0, 3, 1, 2), sizes


def frost_crops(n: int, h: int, w: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n random h x w crops (levels, [n,3,h,w]): picture ~ randint(5), top ~ randint(0, H - h),
    left ~ randint(0, W - w) (exclusive high, as numpy's randint)."""
    bank, sizes = _frost_bank(torch.device(device))
    if h >= int(sizes[:, 0].min()) or w >= int(sizes[:, 1].min()):
        raise ValueError(f"frost needs images smaller than the frost pictures ({sizes.min(0).values.tolist()}), got {h}x{w}")
    idx = torch.randint(0, len(FROST_FILES), (n,), generator=generator, device=device)
    span_h = (sizes[idx, 0] - h).to(torch.float64)
    span_w = (sizes[idx, 1] - w).to(torch.float64)
    top = torch.floor(torch.rand(n, generator=generator, device=device, dtype=torch.float64) * span_h).long()
    left = torch.floor(torch.rand(n, generator=generator, device=device, dtype=torch.float64) * span_w).long()
    rows = top[:, None] + torch.arange(h, device=device)[None, :]
    cols = left[:, None] + torch.arange(w, device=device)[None, :]
    crops = bank[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [n,h,w,3]
    return crops.permute(0, 3, 1, 2)


@CORRUPTIONS.register("frost")
def frost(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """a * x + b * frost crop (in 8-bit units), clipped."""
    a, b = sev.level(sev.FROST, severity)
    n, _, h, w = x.shape
    crops = frost_crops(n, h, w, generator, x.device).to(x.dtype) / 255.0
    return (a * x + b * crops).clamp(0, 1)
