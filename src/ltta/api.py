"""ltta as a library: test-time augmentation around your own classifier, and a one-call benchmark.

Two lines for a model you already have (it takes float images [N,3,H,W] in [0,1]; put your
normalisation in front of it, e.g. ``nn.Sequential(normalize, model)``)::

    tta = ltta.api.TTA(model, "five_crop", merge="gmean")   # an nn.Module
    probs = tta(images)                                      # [N,K] class probabilities

Any method of :data:`ltta.tta.TTA_METHODS` that needs no fitting (``none``, ``flip``,
``five_crop``, ``ten_crop``, ``random``, ``policy`` with a policy, ``bn_adapt``, ``tent``) works
this way; the fitted ones (``learned``, ``prior``, ``feat_pick``, ``gps``, ``agg_aug``,
``agg_class``) are loaded from the pipeline's outputs (:meth:`TTA.from_files`) or from the
served model in the MLflow registry (:meth:`TTA.from_mlflow`, ``models:/ltta-tta@champion``).
The module runs exactly the code the ``evaluate`` stage runs (:func:`ltta.tta.build_method`), so
its outputs are the pipeline's for the same method and images.

:func:`benchmark` evaluates a model with chosen methods on clean images and their corruptions
(generated here, or read from an official CIFAR-10-C / CIFAR-100-C folder) and returns the
:class:`~ltta.evaluation.EvalResults`, whose ``summary()`` is the evaluate stage's table and
:func:`~ltta.evaluation.results_markdown` its Markdown, as RobustBench's ``benchmark()`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ltta.runtime import to_float_nchw, to_uint8_nhwc
from ltta.tta import TTA_METHODS, TTAMethod, build_method

#: The methods that need something fitted by the pipeline, and the file each reads.
FITTED = {"learned": "predictor", "prior": "predictor", "feat_pick": "feature head", "gps": "policy",
          "agg_aug": "aggregator", "agg_class": "aggregator"}  # fmt: skip


class TTA(nn.Module):
    """A classifier wrapped with one TTA method: ``forward(images) -> class probabilities [N,K]``.

    ``images`` are float [N,3,H,W] in [0,1] (uint8 is divided by 255). The wrapped model is
    frozen (eval mode) as the pipeline's target is; ``bn_adapt`` and ``tent`` adapt it on the
    batches they see (:meth:`reset` restores it). Keyword arguments go to
    :func:`ltta.tta.build_method` (``k``, ``candidates``, ``merge``, ``batch_size``, ``policy``, ...).
    """

    def __init__(self, model: nn.Module, method: str = "flip", **settings: Any) -> None:
        super().__init__()
        needs = FITTED.get(method)
        given = settings.get("policy" if needs == "policy" else "prior" if method == "prior" else "predictor")
        if needs is not None and given is None:
            raise ValueError(
                f"method {method!r} needs its fitted {FITTED[method]}: load it with TTA.from_files(...) from the "
                f"pipeline's outputs or TTA.from_mlflow('models:/ltta-tta@champion')"
            )
        self.model = model.eval()
        self.method_name = method
        self.method: TTAMethod = build_method(method, self.model, **settings)

    @classmethod
    def from_method(cls, method: TTAMethod) -> TTA:
        """Wrap a method object already built (what :meth:`from_files` and :meth:`from_mlflow` do)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.model, obj.method_name, obj.method = method.ctx.target, method.name, method
        return obj

    @classmethod
    def from_files(
        cls,
        method: str,
        target: str | Path,
        *,
        predictor: str | Path | None = None,
        policy: str | Path | None = None,
        device: str | torch.device = "cpu",
        **settings: Any,
    ) -> TTA:
        """A method on the pipeline's own files: ``target`` (``models/target.pt``) and, for a fitted
        method, ``predictor`` (``models/predictor.pt``, ``models/feature_head.pt`` for ``feat_pick``,
        ``models/aggregation_{aug,class}.pt`` for ``agg_*``) or ``policy`` (``policies/gps.json``).

        The candidates, the prior and the abstain margin travel inside the predictor's file; the
        other settings (``k``, ``selection``, ...) are the evaluate stage's params, passed here.
        """
        from ltta.model_io import load_model_source
        from ltta.tta.gps import load_gps_policy

        model, _ = load_model_source(target, device)
        if method in FITTED and FITTED[method] == "policy":
            if policy is None:
                raise ValueError(f"method {method!r} needs policy=... (the search_gps stage's policies/gps.json)")
            settings["policy"] = load_gps_policy(policy)
        elif method in FITTED:
            if predictor is None:
                raise ValueError(f"method {method!r} needs predictor=... (its {FITTED[method]} file from the pipeline)")
            net, extra = load_model_source(predictor, device)
            settings["predictor"] = net
            if "candidates" in extra:
                settings.setdefault("candidates", list(extra["candidates"]))
            if method == "prior":
                if "prior" not in extra:
                    raise ValueError(f"{predictor} holds no candidate prior; retrain it (dvc repro train_predictor)")
                settings.setdefault("prior", extra["prior"])
        return cls.from_method(build_method(method, model, device=device, **settings))

    @classmethod
    def from_mlflow(cls, uri: str = "models:/ltta-tta@champion") -> TTA:
        """The learned TTA the pipeline registered and serves (``ltta-tta``), as a module.

        Resolved against ``MLFLOW_TRACKING_URI`` (or the pipeline's default store); the same files
        and settings the served model answers with.
        """
        import mlflow.pyfunc

        from ltta import tracking

        tracking_uri = tracking.tracking_uri()
        tracking.check_reachable(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        python_model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        return cls.from_method(python_model.method)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
        return self.method.predict(x)

    def reset(self) -> None:
        """Forget what a test-time adaptation method learned from earlier batches."""
        self.method.reset()

    def extra_repr(self) -> str:
        return f"method={self.method_name!r}, merge={self.method.ctx.merge!r}, k={self.method.ctx.k}"


def _as_tensor_images(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (the CIFAR layout) or float NCHW in [0,1] -> float NCHW in [0,1]."""
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8 and t.dim() == 4 and t.shape[-1] == 3:
        return to_float_nchw(t)
    if t.is_floating_point() and t.dim() == 4 and t.shape[1] == 3:
        return t
    raise ValueError(f"images must be uint8 [N,H,W,3] or float [N,3,H,W] in [0,1], got {t.dtype} {tuple(t.shape)}")


def benchmark(
    model: nn.Module | dict[str, nn.Module],
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    methods: Sequence[str] = ("none", "flip", "five_crop"),
    corruptions: Sequence[str] = ("gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression"),
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corrupted_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = False,
    **settings: Any,
) -> Any:
    """Evaluate ``model`` with ``methods`` on the clean images and each corruption x severity.

    ``batch_size`` is also the chunk the sets are fed in (test-time adaptation adapts per chunk).
    ``x`` / ``y``: the clean test images (uint8 [N,32,32,3] or float [N,3,32,32] in [0,1]) and
    labels. The corrupted sets are generated from them (the CIFAR-10-C generator, seeded by
    ``seed``), or, with ``corrupted_dir``, read from a CIFAR-10-C / CIFAR-100-C folder (the
    official release or the prepare_data stage's output), whose images replace the generated
    ones. ``model`` may also be ``{method: module}`` (e.g. :class:`TTA` objects of fitted methods),
    each evaluated as is. Returns :class:`~ltta.evaluation.EvalResults`: ``.summary()`` is the
    evaluate stage's table, :func:`ltta.evaluation.results_markdown` its report.
    """
    from ltta.corruptions import corrupt_images, read_corruption
    from ltta.evaluation import CLEAN, EvalSet, evaluate_methods

    if isinstance(model, dict):
        built: dict[str, Any] = {name: m.method if isinstance(m, TTA) else m for name, m in model.items()}
    else:
        unknown = [m for m in methods if m not in TTA_METHODS]
        if unknown:
            TTA_METHODS.get(unknown[0])  # raises, naming the known methods
        built = {m: TTA(model, m, batch_size=batch_size, **settings).method for m in methods}
    x_clean = _as_tensor_images(x)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    x_u8 = to_uint8_nhwc(x_clean)
    sets = [EvalSet(CLEAN, 0, x_clean, y_t)]
    for name in corruptions:
        for s in severities:
            if corrupted_dir is not None:
                images, labels = read_corruption(Path(corrupted_dir), name, s)
                sets.append(EvalSet(name, s, _as_tensor_images(images), torch.as_tensor(labels)))
            else:
                images = corrupt_images(x_u8, name, s, seed=seed)
                sets.append(EvalSet(name, s, _as_tensor_images(images), y_t))
    # Sets are fed in chunks of batch_size, as the evaluate stage feeds them: bn_adapt and tent adapt per chunk.
    return evaluate_methods(built, sets, batch_size=batch_size, progress=progress)
