"""The corruption benchmark of CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019):
19 corruptions x 5 severities as batched torch ops, and the release's file layout.

Public API:
- ``CORRUPTIONS``: registry name -> ``fn(x [N,3,H,W] float in [0,1], severity, generator) -> x'``
- ``BENCHMARK`` (15, release order), ``EXTRA`` (4 held out), ``ALL_CORRUPTIONS``, ``FAMILIES``
- ``corrupt`` (float), ``corrupt_images`` (uint8 NHWC in and out, truncated like the reference)
- ``random_corruptions``: a random corruption (or none) per image, for training inputs
- ``write_corruption_set``, ``read_corruption``, ``available_corruptions`` (official layout),
  ``copy_corruption_set`` (our test split's rows of the official release)
"""

from __future__ import annotations

import importlib
from typing import Any

from ltta.corruptions.names import ALL_CORRUPTIONS, BENCHMARK, EXTRA, FAMILIES

# The names above need no torch, so ``ltta.config`` (and every command that only reads params:
# --help, params, check-params, promote, compare) starts without it. The rest loads on first use.
_LAZY: dict[str, str] = {
    "corrupt": "apply", "corrupt_images": "apply", "derive_seed": "apply", "random_corruptions": "apply",
    "truncate_to_uint8": "apply", "CORRUPTIONS": "base", "CorruptionFn": "base",
    "available_corruptions": "cifar_c", "check_release_matches": "cifar_c", "copy_corruption_set": "cifar_c",
    "read_corruption": "cifar_c", "write_corruption_set": "cifar_c",
    "SEVERITIES": "severity", "TABLES": "severity",
}
#: Importing the op modules registers them, in no particular order; BENCHMARK/EXTRA give the order.
_OPS = ("blur", "digital", "extra", "noise", "weather")


def __getattr__(name: str) -> Any:
    """PEP 562: the op registry and helpers, imported (ops registered) on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for op in _OPS:
        importlib.import_module(f"{__name__}.{op}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


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
    "check_release_matches",
    "copy_corruption_set",
    "corrupt",
    "corrupt_images",
    "derive_seed",
    "random_corruptions",
    "read_corruption",
    "truncate_to_uint8",
    "write_corruption_set",
]
