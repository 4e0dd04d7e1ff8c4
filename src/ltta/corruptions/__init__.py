"""The corruption benchmark of CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019):
19 corruptions x 5 severities as batched torch ops, and the release's file layout.

Public API:
- ``CORRUPTIONS``: registry name -> ``fn(x [N,3,H,W] float in [0,1], severity, generator) -> x'``
- ``BENCHMARK`` (15, release order), ``EXTRA`` (4 held out), ``ALL_CORRUPTIONS``, ``FAMILIES``
- ``corrupt`` (float), ``corrupt_images`` (uint8 NHWC in and out, truncated like the reference)
- ``random_corruptions``: a random corruption (or none) per image, for training inputs
- ``write_corruption_set``, ``read_corruption``, ``available_corruptions`` (official layout)
"""

from __future__ import annotations

# Importing the op modules registers them, in no particular order; BENCHMARK/EXTRA give the order.
from ltta.corruptions import blur, digital, extra, noise, weather  # noqa: F401
from ltta.corruptions.apply import corrupt, corrupt_images, derive_seed, random_corruptions, truncate_to_uint8
from ltta.corruptions.base import CORRUPTIONS, CorruptionFn
from ltta.corruptions.cifar_c import available_corruptions, read_corruption, write_corruption_set
from ltta.corruptions.names import ALL_CORRUPTIONS, BENCHMARK, EXTRA, FAMILIES
from ltta.corruptions.severity import SEVERITIES, TABLES

__all__ = [
    "ALL_CORRUPTIONS",
    "BENCHMARK",
    "CORRUPTIONS",
    "CorruptionFn",
    "EXTRA",
    "FAMILIES",
    "SEVERITIES",
    "TABLES",
    "available_corruptions",
    "corrupt",
    "corrupt_images",
    "derive_seed",
    "random_corruptions",
    "read_corruption",
    "truncate_to_uint8",
    "write_corruption_set",
]
