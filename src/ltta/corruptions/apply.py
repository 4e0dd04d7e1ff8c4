"""Apply a registered corruption to uint8 images the way the reference generator stores them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from ltta.corruptions.base import CORRUPTIONS, check_images
from ltta.corruptions.severity import IMSIZE, SEVERITIES, check_severity
from ltta.runtime import make_generator, to_float_nchw


# Images per call of a corruption function on the CPU. The ops are chains of elementwise float32 /
# float64 passes over the whole batch; 256 CIFAR images keep each intermediate (3 MB in float32,
# 6 MB in float64) inside the last-level cache, where 10,000 images stream every pass through
# memory: measured 2-4x faster on 2 cores for elastic, motion and zoom blur, snow, spatter,
# pixelate and saturate (64-1,024 were within noise of 256; whole batches were the slowest).
# An accelerator gets the whole batch: there, large launches are what is fast.
CPU_CHUNK = 256


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Float in, float out: the registered corruption ``name`` at ``severity`` on a batch [N,3,H,W].

    On the CPU the batch runs in consecutive chunks of :data:`CPU_CHUNK` images drawing from the one
    ``generator`` in order (a batch of up to ``CPU_CHUNK`` images is one call), so the output is a
    deterministic function of the images, the generator's state and the device type.
    """
    check_images(x)
    fn = CORRUPTIONS.get(name)
    severity = check_severity(severity)
    if x.shape[0] == 0:  # nothing to corrupt; several ops (glass, elastic, JPEG, spatter) need one image
        return x.clone()
    if x.device.type != "cpu" or x.shape[0] <= CPU_CHUNK:
        return fn(x, severity, generator)
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], CPU_CHUNK):
        out[start : start + CPU_CHUNK] = fn(x[start : start + CPU_CHUNK], severity, generator)
    return out


def random_corruptions(
    x: torch.Tensor,
    generator: torch.Generator,
    p: float,
    names: Sequence[str],
    severities: Sequence[int] = SEVERITIES,
) -> torch.Tensor:
    """Per image, with probability ``p``, one of ``names`` at a severity drawn from ``severities``
    (both uniform); the corrupted images are truncated to 8-bit levels as the reference stores them.

    This is how kakaobrain/learning-loss-for-tta ``dataloader.py`` (``AugmentedDataset.__getitem__``)
    corrupts the loss predictor's inputs, and how the study targets (AugMix+, blur in training)
    see corruptions. Batched: the draws are tensors from ``generator`` (on ``x``'s device) and the
    loop runs over the few distinct (corruption, severity) cells present, never over images.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    bad = [s for s in severities if int(s) not in SEVERITIES]
    if bad or not severities:
        raise ValueError(f"severities must be a non-empty subset of {list(SEVERITIES)}, got {list(severities)}")
    for name in names:
        CORRUPTIONS.get(name)  # unknown names fail here, listing the known ones
    if p <= 0 or not names:
        return x
    n, dev = x.shape[0], x.device
    active = torch.rand(n, device=dev, generator=generator) < p
    which = torch.randint(0, len(names), (n,), device=dev, generator=generator)
    sev = torch.randint(0, len(severities), (n,), device=dev, generator=generator)
    cell = torch.where(active, which * len(severities) + sev, torch.full_like(which, -1))
    out = x.clone()
    for c in torch.unique(cell).tolist():  # at most len(names) * len(severities) groups
        if c < 0:
            continue
        idx = (cell == c).nonzero().squeeze(1)
        name, level = names[c // len(severities)], int(severities[c % len(severities)])
        y = corrupt(x[idx], name, level, generator)
        out[idx] = truncate_to_uint8(y).permute(0, 3, 1, 2).to(x.dtype) / 255.0
    return out


def truncate_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The reference's ``np.uint8(np.clip(x, 0, 1) * 255)``: truncation, not rounding. [N,3,H,W]
    float -> uint8 [N,H,W,3] on the same device."""
    return torch.floor(x.clamp(0, 1) * 255.0).to(torch.uint8).permute(0, 2, 3, 1)


def derive_seed(seed: int, name: str, severity: int) -> int:
    """A 63-bit seed for one (corruption, severity) cell, independent of which cells are requested."""
    digest = hashlib.sha256(f"ltta-corruption:{int(seed)}:{name}:{int(severity)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def corrupt_images(
    images_uint8_nhwc: np.ndarray | torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    batch_size: int = 10000,
) -> np.ndarray:
    """Corrupt uint8 images [N,32,32,3] and return uint8 [N,32,32,3] (truncated as the reference).

    Batches of ``batch_size`` are processed on ``device`` with one generator seeded by ``seed``;
    the output is a deterministic function of (images, name, severity, seed, batch_size, device
    type): CPU and CUDA generators produce different streams.
    """
    if name not in CORRUPTIONS:
        CORRUPTIONS.get(name)  # raises, listing the known names
    check_severity(severity)
    arr = images_uint8_nhwc
    if arr.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"corrupt_images expects uint8 images [N,H,W,3], got dtype {arr.dtype}")
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (IMSIZE, IMSIZE, 3):
        raise ValueError(
            f"corrupt_images expects uint8 images [N,{IMSIZE},{IMSIZE},3] (the severity tables are the "
            f"CIFAR 32x32 ones), got shape {tuple(arr.shape)}; resize the images to 32x32 first"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    gen = make_generator(seed, dev)
    out = np.empty(tuple(arr.shape), dtype=np.uint8)
    for start in range(0, arr.shape[0], batch_size):
        chunk = arr[start : start + batch_size]
        if isinstance(chunk, np.ndarray):
            chunk = np.array(chunk)  # a writable copy (the input may be a read-only memory map)
        x = to_float_nchw(chunk, dev)
        y = corrupt(x, name, severity, gen)
        out[start : start + batch_size] = truncate_to_uint8(y).cpu().numpy()
    return out
