"""Stage train_target: train the classifier whose robustness TTA should buy back.

Mode ``policy`` trains with the Fast AutoAugment policy file ``train_target.policy`` (e.g. the
search_policy stage's ``policies/faa.json``), a DVC dep of this stage.

``train_target.source`` other than ``train`` writes a published target instead of training one (a
checkpoint file, a torchvision model: :mod:`ltta.models.published`), with the same outputs.

Outputs: ``models/target.pt``, ``metrics/target.json`` (test error; MLflow has loss, train error,
images/s), ``plots/target_curve.csv`` (per-epoch loss,
error, lr, images/s). A checkpoint under ``checkpoints/`` keyed by the params makes a killed run
resume where it stopped; other params start fresh.

``torchrun --nproc_per_node=W -m ltta.cli train-target`` trains data-parallel on W GPUs (or W CPU
processes with gloo): ``batch_size`` stays the global batch, rank 0 alone logs to MLflow and
writes the outputs (:mod:`ltta.training.distributed`).
"""

from __future__ import annotations

import contextlib
import csv
from typing import Any

import torch

from ltta import tracking
from ltta.config import Params, TrainTargetParams
from ltta.checkpoint import file_digest, stable_hash
from ltta.io import atomic_path, write_json
from ltta.model_io import save_model_file
from ltta.models import build_model
from ltta.models.published import resolve_target
from ltta.runtime import seed_everything, to_float_nchw
from ltta.stages.base import Paths, mlflow_stage
from ltta.stages.inputs import labelled_images, prepared_meta
from ltta.training.distributed import DistContext, distributed_session
from ltta.models.inference import evaluate_classifier
from ltta.training.config import TrainConfig
from ltta.training.target import RESUMABLE_CHANGES, train_classifier
from ltta.transforms.policy import CompiledPolicy, load_policy

STAGE = "train_target"


def model_kwargs(arch_width: int | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments recorded in the model file (num_classes, normalisation, width)."""
    kwargs: dict[str, Any] = {"num_classes": meta["num_classes"], "mean": tuple(meta["mean"]), "std": tuple(meta["std"])}
    if arch_width is not None:
        kwargs["width"] = arch_width
    return kwargs


def write_curve(path: Any, history: list[dict[str, Any]]) -> None:
    """Per-epoch rows as CSV for ``dvc plots``."""
    if not history:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def train_config(p: TrainTargetParams, seed: int) -> TrainConfig:
    """The trainer's settings from the ``train_target`` params: the one mapping, also used by
    ``benchmarks/dev_study.py`` so that its recipes are the studies' (``conf/study/``)."""
    return TrainConfig(
        epochs=p.epochs,
        batch_size=p.batch_size,
        lr=p.lr,
        momentum=p.momentum,
        nesterov=p.nesterov,
        weight_decay=p.weight_decay,
        warmup_epochs=p.warmup_epochs,
        min_lr=p.min_lr,
        mode=p.mode,
        cutout=p.cutout,
        augment="standard",
        jsd_weight=p.jsd_weight,
        augmix_width=p.augmix_width,
        augmix_depth=p.augmix_depth,
        augmix_severity=p.augmix_severity,
        aux_families=tuple(p.aux_families),  # mode auxiliary: the heads are attached for the run only
        aux_ce_weight=p.aux_ce_weight,
        aux_distill_weight=p.aux_distill_weight,
        aux_temperature=p.aux_temperature,
        aux_merge_weight=p.aux_merge_weight,
        aux_merge_start=p.aux_merge_start,
        corruptions=tuple(p.corruptions),  # the studies augmix_plus / blur_train (conf/study/)
        corruption_p=p.corruption_p,
        amp=p.amp,
        channels_last=p.channels_last,
        compile=p.compile,
        compile_mode=p.compile_mode,
        seed=seed,
    )


def run(params: Params, paths: Paths = Paths()) -> None:
    # Launched by torchrun: a process group and one device per process; otherwise a no-op.
    with distributed_session(params.device) as proc:
        _run(params, paths, proc)


def _run(params: Params, paths: Paths, proc: DistContext) -> None:
    p = params.train_target
    device = proc.device
    seed_everything(params.seed)
    meta = prepared_meta(paths)
    x_train, y_train = labelled_images(paths.prepared / "train.npz", meta)
    x_test, y_test = labelled_images(paths.prepared / "test.npz", meta)
    kwargs = model_kwargs(p.width, meta)
    if p.source != "train":
        if proc.is_main:  # nothing to train: rank 0 resolves and writes it, the others wait at the barrier
            _write_published(params, paths, meta, kwargs, device, (x_train, y_train, x_test, y_test))
        return

    cfg = train_config(p, params.seed)
    policy = load_policy(paths.root / p.policy) if p.mode == "policy" else None
    policy_digest = file_digest(paths.root / p.policy) if policy is not None else None
    # The checkpoint's name leaves out what a resume may change (the lr, lowered after a divergence).
    named = {k: v for k, v in p.model_dump().items() if k not in RESUMABLE_CHANGES}
    fingerprint = stable_hash([named, kwargs, params.seed, policy_digest], 12)
    ckpt = paths.checkpoints / f"target-{fingerprint}.pt"

    # The checkpoint goes only once the MLflow run has closed: a tracking server failing at the end
    # makes the stage fail, and the rerun then resumes after the last epoch instead of training again.
    with mlflow_stage(STAGE, params, ("train_target",)) if proc.is_main else contextlib.nullcontext():
        model = build_model(p.arch, **kwargs).to(device)
        x_tr, y_tr = to_float_nchw(x_train, device), torch.as_tensor(y_train, device=device)
        x_te, y_te = to_float_nchw(x_test, device), torch.as_tensor(y_test, device=device)
        history = train_classifier(
            model, x_tr, y_tr, cfg, x_val=x_te, y_val=y_te, checkpoint_path=ckpt,
            on_epoch=lambda row: tracking.log_metrics(row, step=int(row["epoch"])),
            extra_augment=CompiledPolicy(policy, device) if policy is not None else None,
        )
        if not proc.is_main:
            return  # rank 0 writes the outputs; the others wait at the session's closing barrier
        final = evaluate_classifier(model, x_te, y_te)
        save_model_file(paths.target, model, p.arch, kwargs, extra={"classes": meta["classes"], "history": history})
        metrics = {
            "test_error": round(100.0 * float(final["error"]), 4),  # percent, as the results table
            "test_loss": round(float(final["loss"]), 4),
            "train_error": round(100.0 * float(history[-1]["train_error"]), 4),
            "epochs": len(history),
            "images_per_s": round(float(sum(h["images_per_s"] for h in history) / len(history)), 1),
        }
        # DVC's view is the one figure experiments are compared on; MLflow keeps the rest.
        write_json(paths.metrics / "target.json", {"test_err": metrics["test_error"]})
        write_curve(paths.plots / "target_curve.csv", history)
        tracking.log_metrics(metrics)
        tracking.log_artifacts([paths.plots / "target_curve.csv"])
        lineage = tracking.lineage_tags(STAGE, paths.target, paths.root) if params.tracking.register_models else None
        tracking.log_and_register_model(
            model, "ltta-target", x_te[:2].cpu().numpy(), register_as=lineage, model_file=paths.target
        )
    ckpt.unlink(missing_ok=True)  # the finished model is the artifact; the checkpoint only served resumption


def _write_published(params: Params, paths: Paths, meta: dict[str, Any], kwargs: dict[str, Any], device: torch.device,
                     data: tuple[Any, Any, Any, Any]) -> None:
    """A target from ``train_target.source`` (a checkpoint, a published model), written, measured and
    registered as a trained one, its source in the model file, the metrics and MLflow's tags."""
    p = params.train_target
    with mlflow_stage(STAGE, params, ("train_target",)):
        resolved = resolve_target(p.source, p.arch, kwargs, int(meta["image_size"]), root=paths.root)
        model = resolved.model.to(device)
        x_train, y_train, x_test, y_test = data
        x_tr, y_tr = to_float_nchw(x_train, device), torch.as_tensor(y_train, device=device)
        x_te, y_te = to_float_nchw(x_test, device), torch.as_tensor(y_test, device=device)
        train, test = evaluate_classifier(model, x_tr, y_tr), evaluate_classifier(model, x_te, y_te)
        # One row, "epoch 0": the published model's errors on this data before (and without) any training here.
        row = {"epoch": 0, "loss": round(float(train["loss"]), 4), "train_error": float(train["error"]),
               "val_error": float(test["error"]), "val_loss": float(test["loss"])}
        save_model_file(paths.target, model, resolved.arch, resolved.kwargs,
                        extra={"classes": meta["classes"], "history": [], "source": resolved.provenance})
        test_error = round(100.0 * float(test["error"]), 4)
        write_json(paths.metrics / "target.json", {"test_err": test_error})
        write_curve(paths.plots / "target_curve.csv", [row])
        tracking.log_metrics({"test_error": test_error, "test_loss": round(float(test["loss"]), 4),
                              "train_error": round(100.0 * float(train["error"]), 4)})
        tracking.set_tags({f"ltta.target.{k}": str(v) for k, v in resolved.provenance.items()})
        lineage = tracking.lineage_tags(STAGE, paths.target, paths.root) if params.tracking.register_models else None
        tracking.log_and_register_model(
            model, "ltta-target", x_te[:2].cpu().numpy(), register_as=lineage, model_file=paths.target
        )
