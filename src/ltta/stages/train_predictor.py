"""Stage train_predictor: the loss predictor, trained to rank the candidates by the target's loss.

Outputs: ``models/predictor.pt`` (the EMA weights, with the candidate names in column order, the
prior and the ``abstain`` margin chosen on valid_loss), ``models/feature_head.pt`` (with
``train_predictor.feature_head``: the head on the frozen target's features that ``feat_pick``
uses, its margin too; :mod:`ltta.models.feature_head`),
``metrics/predictor.json`` and ``metrics/feature_head.json`` (``rho``: Spearman correlation with the true losses, ``top1``: agreement
with the oracle's candidate, both on valid_loss) and ``plots/predictor_curve.csv`` (per epoch, beside
the random-ranking baseline and the input-independent prior: each candidate's mean training loss;
MLflow has the same as ``final_*``). With
``train_predictor.ranker: sodeep`` the SoDeep sorter comes from ``models/sorters/`` and is trained
there first when missing (:mod:`ltta.stages.train_sorter`).
"""

from __future__ import annotations

import numpy as np
import torch

from ltta import tracking
from ltta.config import Params, TrainPredictorParams
from ltta.io import write_json
from ltta.model_io import save_model_file
from ltta.models import build_model
from ltta.runtime import resolve_device, seed_everything
from ltta.stages.base import Paths, mlflow_stage
from ltta.stages.inputs import loss_meta, loss_split, prepared_meta
from ltta.stages.train_sorter import load_or_train_sorter
from ltta.stages.train_target import write_curve
from ltta.stages.inputs import load_target
from ltta.predictor.quality import prior_scores
from ltta.predictor.scoring import flip_ensemble_probs, predictor_scores
from ltta.predictor.trainer import PredictorConfig, train_predictor
from ltta.tta import build_candidates
from ltta.tta.abstain import choose_margin
from ltta.tta.target_features import target_features

STAGE = "train_predictor"
REPORTED = (
    "spearman_rho", "random_rho", "top1_agreement", "random_top1_agreement",
    "chosen_loss", "identity_loss", "oracle_loss", "random_loss",
    "prior_rho", "prior_top1_agreement", "prior_loss",
)


def _nchw_uint8(x: np.ndarray) -> torch.Tensor:
    """The stored NHWC uint8 inputs as NCHW uint8 (the trainer converts per batch on the device)."""
    return torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()


def predictor_config(p: TrainPredictorParams, seed: int) -> PredictorConfig:
    """The predictor trainer's settings from the ``train_predictor`` params: the one mapping, also
    used by ``benchmarks/dev_study.py`` so that its predictor is the profile's."""
    return PredictorConfig(
        epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, ema_decay=p.ema_decay,
        tau=p.tau, rank_temperature=p.rank_temperature, objective=p.objective, ranker=p.ranker,
        optimizer=p.optimizer, cutout=p.cutout, seed=seed,
    )


def run(params: Params, paths: Paths = Paths()) -> None:
    tp = params.train_predictor
    device = resolve_device(params.device)
    seed_everything(params.seed)
    data_meta = prepared_meta(paths)
    meta = loss_meta(paths)
    names = meta["candidates"]
    size = int(data_meta["image_size"])
    x_train, losses_train = loss_split(paths.loss_data / "train.npz", size, len(names))
    x_valid, losses_valid = loss_split(paths.loss_data / "valid.npz", size, len(names))
    kwargs = {"num_outputs": len(names), "width": tp.width, "mean": tuple(data_meta["mean"]), "std": tuple(data_meta["std"])}
    cfg = predictor_config(tp, params.seed)
    sorter = load_or_train_sorter(params, len(names), paths, device)[0] if tp.ranker == "sodeep" else None
    with mlflow_stage(STAGE, params, ("train_predictor",)):
        predictor = build_model("loss_predictor", **kwargs)
        ema, history = train_predictor(
            predictor, _nchw_uint8(x_train), torch.as_tensor(losses_train),
            _nchw_uint8(x_valid), torch.as_tensor(losses_valid), cfg, device=device,
            identity_index=int(meta["identity_index"]), sorter=sorter,
            on_epoch=lambda epoch, m: tracking.log_metrics(m, step=epoch),
        )
        prior = prior_scores(torch.as_tensor(losses_train)).tolist()  # for evaluate's 'prior' method
        x_valid_t = _nchw_uint8(x_valid).float().div(255.0).to(device)
        valid_scores = flip_ensemble_probs(ema, x_valid_t, build_candidates(names))
        margin = choose_margin(valid_scores, torch.as_tensor(losses_valid).to(valid_scores.device), int(meta["identity_index"]))
        save_model_file(paths.predictor, ema, "loss_predictor", kwargs,
                        extra={"candidates": names, "prior": prior, "abstain": margin})
        last = history[-1]
        metrics = {k: round(float(last[f"valid_{k}"]), 4) for k in REPORTED if f"valid_{k}" in last}
        metrics["epochs"] = len(history)
        # DVC's view: how well the predictor ranks (Spearman) and picks (top-1 = the oracle's
        # candidate) on valid_loss; the rest (random and prior references, losses) goes to MLflow.
        write_json(paths.metrics / "predictor.json", {"rho": metrics["spearman_rho"], "top1": metrics["top1_agreement"]})
        if tp.feature_head is not None:  # its own file with the same two keys: the same columns in `dvc metrics show`
            head_metrics = _train_feature_head(params, paths, device, meta, data_meta, (x_train, losses_train, x_valid, losses_valid))
            write_json(paths.metrics / "feature_head.json", {"rho": head_metrics["spearman_rho"], "top1": head_metrics["top1_agreement"]})
            tracking.log_metrics({f"head_{k}": v for k, v in head_metrics.items()})
        tracking.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        write_curve(paths.plots / "predictor_curve.csv", history)
        tracking.log_artifacts([paths.plots / "predictor_curve.csv"])
        example = _nchw_uint8(x_valid[:2]).float().div(255.0).numpy()
        lineage = tracking.lineage_tags(STAGE, paths.predictor, paths.root) if params.tracking.register_models else None
        tracking.log_and_register_model(ema, "ltta-predictor", example, register_as=lineage, model_file=paths.predictor)


def _train_feature_head(params: Params, paths: Paths, device: torch.device, meta: dict, data_meta: dict,
                        tables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> dict[str, float]:
    """The head on the frozen target's features (the target the loss dataset was built with), its
    ``abstain`` margin on valid_loss, saved to ``models/feature_head.pt``; returns its valid metrics."""
    fh = params.train_predictor.feature_head
    assert fh is not None
    x_train, losses_train, x_valid, losses_valid = tables
    target = load_target(params.loss_dataset.target, paths, data_meta, device)
    batch = params.loss_dataset.batch_size

    def rows(x: np.ndarray) -> torch.Tensor:  # features and logits as [N, D+K, 1, 1], batch by batch from uint8
        parts = []
        for start in range(0, len(x), batch):
            xb = _nchw_uint8(x[start : start + batch]).to(device).float().div(255.0)
            parts.append(torch.cat(target_features(target, xb, batch), 1))
        return torch.cat(parts)[:, :, None, None]

    f_train, f_valid = rows(x_train), rows(x_valid)
    kwargs = {"features": int(target.fc.in_features), "classes": int(target.fc.out_features),
              "num_outputs": len(meta["candidates"]), "hidden": fh.hidden}
    cfg = PredictorConfig(epochs=fh.epochs, batch_size=fh.batch_size, lr=fh.lr, objective=fh.objective, tau=fh.tau,
                          cutout=0.0, seed=params.seed)
    head = build_model("feature_head", **kwargs)
    ident = int(meta["identity_index"])
    ema, history = train_predictor(head, f_train, torch.as_tensor(losses_train), f_valid, torch.as_tensor(losses_valid), cfg,
                                   device=device, identity_index=ident,
                                   on_epoch=lambda epoch, m: tracking.log_metrics({f"head_{k}": v for k, v in m.items()}, step=epoch))
    lv = torch.as_tensor(losses_valid).to(device)
    margin = choose_margin(predictor_scores(ema, f_valid).softmax(1).to(device), lv, ident)
    save_model_file(paths.feature_head, ema, "feature_head", kwargs, extra={"candidates": list(meta["candidates"]), "abstain": margin})
    last = history[-1]
    out = {k: round(float(last[f"valid_{k}"]), 4) for k in REPORTED if f"valid_{k}" in last}
    out["abstain_margin"], out["abstain_valid_augmented"] = margin["margin"], margin["augmented"]
    return out
