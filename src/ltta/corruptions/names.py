"""Names of the corruption benchmark, in the order of the CIFAR-10-C / CIFAR-100-C release.

Kept apart from the implementations so that the params schema can check names without
importing the corruption code.
"""

from __future__ import annotations

# Hendrycks & Dietterich (ICLR 2019), hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py.
BENCHMARK: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# The four held-out corruptions of the release (used for validation, not in the mean).
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = BENCHMARK + EXTRA

# The four families of Hendrycks & Dietterich (ICLR 2019, Figure 1: brightness is a weather
# corruption), plus the extras; the unseen-corruption studies hold one family out (conf/unseen/).
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    "extra": EXTRA,
}
