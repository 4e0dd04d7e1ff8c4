"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper), speckle.

Reference: hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py`` (gaussian_noise,
shot_noise, impulse_noise, speckle_noise). Noise is drawn independently for every pixel and
channel, as the reference draws it with ``size=x.shape`` on the HxWx3 array; results are clipped
to [0,1].
"""

from __future__ import annotations

import torch

from ltta.corruptions import severity as sev
from ltta.corruptions.base import CORRUPTIONS


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, c^2), clipped."""
    c = sev.level(sev.GAUSSIAN_NOISE, severity)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return noise.mul_(c).add_(x).clamp_(0, 1)  # x + c * noise, in the noise's buffer


@CORRUPTIONS.register("shot_noise")
def shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson(x * c) / c, clipped (photon noise at rate c per unit intensity)."""
    c = float(sev.level(sev.SHOT_NOISE, severity))
    return torch.poisson(x * c, generator=generator).div_(c).clamp_(0, 1)


@CORRUPTIONS.register("impulse_noise")
def impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """skimage.util.random_noise(mode='s&p', amount=c): each value is hit with probability c,
    and a hit is salt (1) or pepper (0) with probability 1/2 (salt_vs_pepper=0.5)."""
    c = sev.level(sev.IMPULSE_NOISE, severity)
    flipped = torch.rand(x.shape, generator=generator, device=x.device) < c
    salted = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    return x.masked_fill(flipped & salted, 1.0).masked_fill_(flipped & ~salted, 0.0).clamp_(0, 1)


@CORRUPTIONS.register("speckle_noise")
def speckle_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """x + x * N(0, c^2), clipped (multiplicative noise)."""
    c = sev.level(sev.SPECKLE_NOISE, severity)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x * c).mul_(noise).add_(x).clamp_(0, 1)  # x + (x * c) * noise
