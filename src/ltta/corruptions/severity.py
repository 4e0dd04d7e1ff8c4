"""Severity tables (s1..s5) of the CIFAR-10-C / CIFAR-100-C generator.

Every number is read off hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py`` (the 32x32
parameters, which differ from the ImageNet-C ones); each entry names the function it feeds. Index
with ``TABLE[severity - 1]``, or better through :func:`level`, which checks the severity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# The CIFAR script's image side; its elastic parameters are fractions of it.
IMSIZE = 32

# ---- noise
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # std of additive N(0, c^2) on [0,1] pixels
SHOT_NOISE = (500, 250, 100, 75, 50)  # Poisson rate: x -> Poisson(x * c) / c
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # s&p amount (skimage random_noise, salt_vs_pepper 0.5)
SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)  # std of multiplicative noise x + x * N(0, c^2)

# ---- blur
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # sigma (skimage.filters.gaussian)
# (sigma, max_delta, iterations)
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
# (disk radius, alias_blur sigma)
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))
# (ImageMagick radius, sigma); the angle is U(-45, 45) degrees per image
MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
MOTION_BLUR_ANGLE = (-45.0, 45.0)
# zoom factors; np.arange is kept (not literal lists) because its float stop is part of the
# reference: arange(1, 1.06, .01) has 7 entries and arange(1, 1.11, .01) 12 (the stop slips in),
# while the other three levels stop short of it (16, 21, 26 entries).
ZOOM_BLUR = tuple(
    tuple(float(z) for z in np.arange(1, stop, 0.01)) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)
)

# ---- weather
# (loc, scale, zoom, threshold, motion radius, motion sigma, blend)
SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
SNOW_ANGLE = (-135.0, -45.0)
# (image weight, frost weight); frost picture randint(5) of frost1..5, resized x0.2, random 32x32 crop
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
# (amount, wibbledecay) of the plasma fractal; mapsize 32
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
FOG_MAPSIZE = 32

# ---- digital
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor around the per-channel mean
# (alpha, sigma, affine) = IMSIZE * the script's fractions
ELASTIC = tuple(
    (IMSIZE * a, IMSIZE * s, IMSIZE * f)
    for a, s, f in ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # BOX down to int(32 * c), BOX back up
JPEG_QUALITY = (80, 65, 58, 50, 40)

# ---- extra (held out)
# (loc, scale, sigma, threshold, intensity / mud sigma, mode: 0 liquid, 1 mud)
SPATTER = (
    (0.62, 0.1, 0.7, 0.7, 0.5, 0),
    (0.65, 0.1, 0.8, 0.7, 0.5, 0),
    (0.65, 0.3, 1, 0.69, 0.5, 0),
    (0.65, 0.1, 0.7, 0.69, 0.6, 1),
    (0.65, 0.1, 0.5, 0.68, 0.6, 1),
)
SATURATE = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))  # HSV saturation s * a + b

TABLES: dict[str, Sequence[Any]] = {
    "gaussian_noise": GAUSSIAN_NOISE,
    "shot_noise": SHOT_NOISE,
    "impulse_noise": IMPULSE_NOISE,
    "defocus_blur": DEFOCUS_BLUR,
    "glass_blur": GLASS_BLUR,
    "motion_blur": MOTION_BLUR,
    "zoom_blur": ZOOM_BLUR,
    "snow": SNOW,
    "frost": FROST,
    "fog": FOG,
    "brightness": BRIGHTNESS,
    "contrast": CONTRAST,
    "elastic_transform": ELASTIC,
    "pixelate": PIXELATE,
    "jpeg_compression": JPEG_QUALITY,
    "speckle_noise": SPECKLE_NOISE,
    "gaussian_blur": GAUSSIAN_BLUR,
    "spatter": SPATTER,
    "saturate": SATURATE,
}


def check_severity(severity: int) -> int:
    """Return ``severity`` if it is one of 1..5, else raise naming the allowed values."""
    if isinstance(severity, bool) or int(severity) != severity or int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5 (the benchmark's levels), got {severity!r}")
    return int(severity)


def level(table: Sequence[Any], severity: int) -> Any:
    """The table entry for ``severity`` (1-based, as in the reference's ``c[severity - 1]``)."""
    return table[check_severity(severity) - 1]
