"""Architectures by name: ``build_model("wrn_40_2", num_classes=100)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ltta.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered architecture; unknown names list the known ones."""
    return MODELS.get(name)(**kwargs)
