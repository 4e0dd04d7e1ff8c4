"""Stage build_loss_dataset: the frozen target's loss for every (image, candidate transform).

The predictor's inputs are made as the public code makes them (kakaobrain/learning-loss-for-tta
dataloader.py): train_loss images duplicated, flipped, randomly rotated / zoomed / brightened and
corrupted with the benchmark corruptions named in params (held-out families stay out);
valid_loss images are corrupted the same way but neither deformed nor flipped. Outputs ``data/loss/{train,valid}.npz``
(``x`` uint8 NHWC, ``y``, ``losses`` float32 [N,C], ``correct`` bool [N,C]) and
``data/loss/meta.json`` (the candidate names, in column order), and ``reports/loss_dataset.json``
(rows, and the identity's and oracle's loss and error per split).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ltta import tracking
from ltta.config import Params
from ltta.io import atomic_dir, save_npz, write_json
from ltta.runtime import make_generator, resolve_device, seed_everything, to_float_nchw, to_uint8_nhwc
from ltta.stages.base import Paths, mlflow_stage
from ltta.stages.inputs import labelled_images, load_target, prepared_meta, split_indices
from ltta.tta import Candidate, build_candidates, identity_index
from ltta.predictor import candidate_losses, predictor_training_inputs

STAGE = "build_loss_dataset"
CHUNK = 4096  # source images per chunk: bounds memory on CPU and GPU alike


def build_split(
    target: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    candidates: list[Candidate],
    *,
    deform: bool,
    duplication: int,
    flips: str,
    params: Params,
    device: torch.device,
    seed: int,
    desc: str,
) -> dict[str, np.ndarray]:
    """Inputs, labels, losses and correctness for one split, in chunks of source images."""
    ld = params.loss_dataset
    gen = make_generator(seed, device)
    parts: dict[str, list[np.ndarray]] = {"x": [], "y": [], "losses": [], "correct": []}
    for start in tqdm(range(0, len(y), CHUNK), desc=desc, unit="chunk"):
        xb = to_float_nchw(x[start : start + CHUNK], device)
        yb = torch.as_tensor(y[start : start + CHUNK], device=device)
        x_in = predictor_training_inputs(
            xb, gen, duplication=duplication, p_aug=ld.p_aug, corruptions=list(ld.corruptions),
            deform=deform, flips=flips,
        )
        y_in = yb.repeat(x_in.shape[0] // xb.shape[0])
        losses, correct = candidate_losses(target, x_in, y_in, candidates, batch_size=ld.batch_size, device=device)
        parts["x"].append(to_uint8_nhwc(x_in))
        parts["y"].append(y_in.cpu().numpy())
        parts["losses"].append(losses.cpu().numpy())
        parts["correct"].append(correct.cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def summarize(split: dict[str, np.ndarray], ident: int) -> dict[str, float]:
    """Identity vs oracle loss and error: the headroom a perfect predictor would have."""
    losses, correct = split["losses"], split["correct"]
    best = losses.argmin(1)
    rows = np.arange(len(best))
    return {
        "rows": int(len(losses)),
        "identity_loss": round(float(losses[:, ident].mean()), 4),
        "oracle_loss": round(float(losses[rows, best].mean()), 4),
        "identity_error": round(100.0 * (1.0 - float(correct[:, ident].mean())), 4),
        "oracle_error": round(100.0 * (1.0 - float(correct[rows, best].mean())), 4),
    }


def run(params: Params, paths: Paths = Paths()) -> None:
    ld = params.loss_dataset
    device = resolve_device(params.device)
    seed_everything(params.seed)
    meta = prepared_meta(paths)
    x_train, y_train = labelled_images(paths.prepared / "train.npz", meta)
    splits = split_indices(paths.prepared / "splits.npz", len(y_train))
    target = load_target(ld.target, paths, meta, device)
    candidates = build_candidates(ld.candidates)
    ident = identity_index(candidates)

    with mlflow_stage(STAGE, params, ("loss_dataset",)):
        built = {}
        # train_loss: duplicated, both flips, deformed; valid_loss: one unflipped, undeformed copy (public code).
        plan = (("train", True, ld.duplication, "both"), ("valid", False, 1, "none"))
        for i, (name, deform, dup, flips) in enumerate(plan):
            idx = splits[f"{name}_loss"]
            built[name] = build_split(
                target, x_train[idx], y_train[idx], candidates, deform=deform, duplication=dup, flips=flips,
                params=params, device=device, seed=params.seed + 1000 * (i + 1), desc=f"loss dataset ({name})",
            )
        with atomic_dir(paths.loss_data) as out:
            for name, arrays in built.items():
                save_npz(out / f"{name}.npz", **arrays)
            write_json(out / "meta.json", {"candidates": [c.name for c in candidates], "identity_index": ident})
        metrics = {name: summarize(arrays, ident) for name, arrays in built.items()}
        metrics["candidates"] = len(candidates)
        write_json(paths.reports / "loss_dataset.json", metrics)  # a report: sizes and reference losses
        tracking.log_metrics({f"{s}.{k}": v for s in ("train", "valid") for k, v in metrics[s].items()})
