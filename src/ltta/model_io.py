"""Model files: architecture name + constructor arguments + weights, so any stage can rebuild a model.

The file is the DVC-tracked artifact (``models/*.pt``); the same model also goes to the MLflow
registry. Loading never unpickles arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltta.io import load_torch, save_torch
from ltta.models import build_model


def save_model_file(path: str | Path, model: nn.Module, arch: str, kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``{arch, kwargs, state_dict, extra}`` atomically."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(path, {"arch": arch, "kwargs": kwargs, "state_dict": state, "extra": extra or {}})


def load_model_file(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture and load its weights; returns (model in eval mode, extra)."""
    p = Path(path)
    blob = load_torch(p, what="model", missing_fix="run the stage that trains it (dvc repro)", redo="rerun its stage")
    for key in ("arch", "kwargs", "state_dict"):
        if key not in blob:
            raise ValueError(f"{p} lacks {key!r}: not an ltta model file; rerun its stage.")
    try:
        model = build_model(blob["arch"], **blob["kwargs"])
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:  # unknown arch, bad kwargs, weights of another shape
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{p} does not rebuild as {blob['arch']!r} with its own arguments ({type(exc).__name__}: {first}); "
            "it was written by another version or edited: rerun its stage."
        ) from exc
    return model.to(device).eval(), dict(blob.get("extra", {}))
