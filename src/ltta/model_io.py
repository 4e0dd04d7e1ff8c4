"""Model files: architecture name + constructor arguments + weights, so any stage can rebuild a model.

The file is the DVC-tracked artifact (``models/*.pt``); the same model also goes to the MLflow
registry. Loading never unpickles arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

import shutil
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


def is_model_uri(source: str | Path) -> bool:
    """Whether ``source`` names an MLflow model (``models:/...``, ``runs:/...``) rather than a file."""
    return str(source).startswith(("models:/", "runs:/"))


def load_model_source(
    source: str | Path, device: torch.device | str = "cpu", *, copy_to: Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_model_file` of a file, or of the ltta model file registered with an MLflow model.

    ``models:/ltta-target@champion`` (or a version, or ``runs:/<id>/<name>``) is resolved against
    the tracking store of :func:`ltta.tracking.tracking_uri`; the version's logged model carries
    its ``models/*.pt`` as an extra file (:func:`ltta.tracking.log_and_register_model`), which is
    downloaded to a temporary folder and rebuilt exactly as the file would be. ``copy_to``: keep
    the model file there too (a stage that hands the same file on, e.g. to the served TTA model).
    """
    if not is_model_uri(source):
        if copy_to is not None:
            shutil.copyfile(source, copy_to)
        return load_model_file(source, device)
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from ltta import tracking

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory(prefix="ltta-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(source), dst_path=tmp))
        except MlflowException as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ValueError(
                f"{source} cannot be resolved in the MLflow store {uri} ({first}); check the name and alias "
                "(`ltta promote` sets champion), or set the params key back to the model file"
            ) from None
        files = sorted(local.glob("extra_files/*.pt"))
        if len(files) != 1:
            raise ValueError(
                f"{source} carries no ltta model file (extra_files/*.pt): it was registered before models travelled "
                "with their file; retrain it (dvc repro) so a new version is registered, or use the model file"
            )
        if copy_to is not None:
            shutil.copyfile(files[0], copy_to)
        return load_model_file(files[0], device)
