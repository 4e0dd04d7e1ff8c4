"""Stage fit_aggregation: the learned aggregators of Shanmugam et al. (ICCV 2021) on the valid_loss images.

The frozen target's logits under every candidate of the loss dataset are computed once on the
validation split (:func:`ltta.tta.aggregation.candidate_logits`); both aggregators are fitted on
them. Outputs: ``models/aggregation_aug.pt`` and ``models/aggregation_class.pt`` (ltta model
files, their candidates and the fit's losses in ``extra``) and ``reports/aggregation.md`` (the
per-view weights of ``agg_aug``, largest first: which views the fit trusts).
"""

from __future__ import annotations

from typing import Any

import torch

from ltta import tracking
from ltta.config import Params
from ltta.io import write_text
from ltta.model_io import save_model_file
from ltta.runtime import resolve_device, seed_everything
from ltta.stages.base import Paths, mlflow_stage
from ltta.stages.inputs import load_target, loss_meta, prepared_meta, validation_split
from ltta.tta import build_candidates
from ltta.tta.aggregation import AGGREGATORS, aggregator_temperature, candidate_logits, fit_aggregator

STAGE = "fit_aggregation"


def aggregator_path(paths: Paths, kind: str) -> Any:
    """``models/aggregation_aug.pt`` for ``agg_aug``, ``models/aggregation_class.pt`` for ``agg_class``."""
    return paths.root / "models" / f"aggregation_{kind.removeprefix('agg_')}.pt"


def weights_markdown(names: list[str], weights: torch.Tensor, temperature: float) -> str:
    order = torch.argsort(weights, descending=True).tolist()
    lines = ["# Learned aggregation: agg_aug's weight per view", "",
             f"Fitted on the valid_loss images; the views' logits are divided by T = {temperature:.3f} first. "
             f"The plain mean would give every view {1 / len(names):.4f}.", "", "| view | weight |", "| --- | ---: |"]
    lines += [f"| {names[i]} | {float(weights[i]):.4f} |" for i in order]
    return "\n".join(lines) + "\n"


def run(params: Params, paths: Paths = Paths()) -> None:
    a = params.fit_aggregation
    device = resolve_device(params.device)
    seed_everything(params.seed)
    meta = prepared_meta(paths)
    lmeta = loss_meta(paths)
    names = list(lmeta["candidates"])
    target = load_target(a.target, paths, meta, device)
    x, y = validation_split(paths, meta, device)
    with mlflow_stage(STAGE, params, ("fit_aggregation",)):
        z = candidate_logits(target, x, build_candidates(names))
        temperature = aggregator_temperature(z, y, int(lmeta["identity_index"]))
        for kind in AGGREGATORS:
            model, curve = fit_aggregator(z, y, kind, temperature, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size)
            kwargs = {"views": len(names), "classes": int(z.shape[2]), "temperature": temperature}
            save_model_file(aggregator_path(paths, kind), model, kind, kwargs, extra={"candidates": names, "loss": curve})
            tracking.log_metrics({f"{kind}_loss": curve[-1], f"{kind}_first_loss": curve[0]})
            if kind == "agg_aug":
                write_text(paths.reports / "aggregation.md", weights_markdown(names, model.weights().detach().cpu(), temperature))
        tracking.log_metrics({"temperature": temperature})
        tracking.log_artifacts([paths.reports / "aggregation.md"])
