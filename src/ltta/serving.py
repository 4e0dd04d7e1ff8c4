"""One deployable model: the paper's learned TTA (target + loss predictor + candidates + k + rule)
as an MLflow pyfunc model, ``ltta-tta`` in the registry.

``mlflow models serve -m models:/ltta-tta@champion`` then answers ``/invocations`` with what the
``evaluate`` stage computes for the ``learned`` row on the same images: the same model files
(``models/target.pt``, ``models/predictor.pt``, rebuilt by :func:`ltta.model_io.load_model_file`,
weights only), the same candidate set, k, selection rule and threshold, the same
:class:`ltta.tta.learned.LearnedTTA`. Loading needs the installed ``ltta`` package, not a checkout; the model is logged as "models from
code" (:mod:`ltta.tta_pyfunc`), so no pickled object is stored.

Input: images ``[N,H,W,3]`` (the CIFAR storage layout) as float32, either pixel levels 0-255 or
[0,1]; the inference param ``scale`` says which (``auto``, the default: levels when any value
exceeds 1). MLflow's tensor schema fixes one dtype, so a Python caller holding uint8 arrays passes
``x.astype("float32")``; over HTTP, JSON numbers have no dtype and integers 0-255 just work.
Output: ``probabilities`` [N,K] (the mean softmax over the k chosen views), ``label`` [N] (their
argmax, an index into the target's classes) and ``candidates`` [N,k] (the chosen candidate indices,
best first; the names are in the model's config, ``candidate_names``).

A request the model cannot answer (wrong shape, an empty batch, values out of range, an unknown
``scale``) raises an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which MLflow's scoring
server turns into a 400 with the message, not a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

#: What ``scale`` may say: how the float32 input's values map to [0,1].
SCALES = ("auto", "byte", "unit")


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def to_unit_nchw(images: Any, image_size: int, scale: str = "auto") -> Any:
    """Check a request's images and turn them into float32 [N,3,H,W] in [0,1] (a torch tensor on CPU).

    Refuses, with the fix, what cannot be an image batch for this model; ``scale`` is ``auto``
    (levels 0-255 when any value exceeds 1, else [0,1]), ``byte`` or ``unit``.
    """
    import torch

    x = np.asarray(images)
    expected = f"[N,{image_size},{image_size},3]"
    if x.ndim != 4 or x.shape[1:] != (image_size, image_size, 3):
        raise _bad_request(f"images have shape {list(x.shape)}; this model takes {expected} (NHWC, RGB)")
    if x.shape[0] == 0:
        raise _bad_request(f"the batch is empty (N = 0); send at least one image {expected}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise _bad_request(f"images have dtype {x.dtype}; send numbers (float32 levels 0-255 or [0,1])")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise _bad_request("images contain NaN or infinite values")
    if scale not in SCALES:
        raise _bad_request(f"scale {scale!r} is not one of {list(SCALES)}")
    lo, hi = float(x.min()), float(x.max())
    as_levels = scale == "byte" or (scale == "auto" and hi > 1.0)
    top = 255.0 if as_levels else 1.0
    if lo < 0.0 or hi > top:
        raise _bad_request(
            f"pixel values span [{lo:g}, {hi:g}], outside [0, {top:g}] for scale {scale!r}; "
            "send levels 0-255 or values in [0,1]"
        )
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return t / 255.0 if as_levels else t


class LearnedTTAModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper; its state is rebuilt from the artifacts in ``load_context``."""

    def load_context(self, context: Any) -> None:
        from ltta.model_io import load_model_file
        from ltta.runtime import resolve_device
        from ltta.tta import build_method

        cfg = dict(context.model_config)
        self.device = resolve_device(str(cfg.get("serve_device", "auto")))
        target, _ = load_model_file(context.artifacts["target"], self.device)
        predictor, _ = load_model_file(context.artifacts["predictor"], self.device)
        self.image_size = int(cfg["image_size"])
        self.method = build_method(
            "learned", target, candidates=list(cfg["candidate_names"]), k=int(cfg["k"]), predictor=predictor,
            batch_size=int(cfg["batch_size"]), device=self.device, image_size=self.image_size,
            selection=str(cfg["selection"]), threshold=float(cfg["threshold"]),
        )

    # ``np.ndarray`` is the hint MLflow takes as "no schema from hints": the schema is the explicit
    # signature logged with the model (uint8 or float NHWC), and the class defines without MLflow's
    # "add type hints" warning. A richer hint would make MLflow convert and validate inputs itself.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> dict[str, Any]:
        import torch

        x = to_unit_nchw(model_input, self.image_size, str((params or {}).get("scale", "auto")))
        with torch.no_grad():
            probs, chosen = self.method.predict_with_selection(x)
        return {
            "probabilities": probs.float().cpu().numpy(),
            "label": probs.argmax(dim=1).cpu().numpy().astype(np.int64),
            "candidates": chosen.cpu().numpy().astype(np.int64),
        }


@dataclass(frozen=True)
class _LocalContext:
    """What ``load_context`` reads, for the one prediction that gives the signature its output."""

    artifacts: dict[str, str]
    model_config: dict[str, Any]


def tta_model_config(candidate_names: list[str], *, k: int, selection: str, threshold: float, batch_size: int,
                     image_size: int, classes: list[Any], device: str = "auto") -> dict[str, Any]:
    """The pyfunc's ``model_config``: everything besides the two model files that fixes its answers."""
    return {
        "candidate_names": list(candidate_names), "k": int(k), "selection": selection, "threshold": float(threshold),
        "batch_size": int(batch_size), "image_size": int(image_size), "classes": [str(c) for c in classes],
        "serve_device": device,
    }


def log_tta_model(target_file: Path, predictor_file: Path, config: dict[str, Any], example: np.ndarray, *,
                  name: str = "ltta-tta") -> Any:
    """Log the learned TTA as a pyfunc model in the active run, with a signature and an input example.

    The signature's output is computed by loading the model just as a server would, on
    ``example`` (float32 levels [n,H,W,3]), so it is what the served model really returns.
    Returns MLflow's ``ModelInfo``.
    """
    import torch
    from mlflow.models import infer_signature

    import ltta

    artifacts = {"target": str(target_file), "predictor": str(predictor_file)}
    context = _LocalContext(artifacts, config)
    probe = LearnedTTAModel()
    probe.load_context(context)
    output = probe.predict(context, example)
    signature = infer_signature(example, output, params={"scale": "auto"})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("tta_pyfunc.py")),  # models from code: no pickle
        artifacts=artifacts,
        model_config=config,
        signature=signature,
        input_example=example,
        pip_requirements=[
            f"ltta=={ltta.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
        ],
    )
