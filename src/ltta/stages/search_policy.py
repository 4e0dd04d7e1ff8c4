"""Stage search_policy: Fast AutoAugment density matching (TPE) on a reduced training set.

Outputs: ``policies/faa.json`` (the merged top sub-policies, read by ``evaluate`` as the static
TTA policy and by ``train_target`` in policy mode), ``metrics/search.json`` (the best density-matching score; MLflow has the trial count and mean) and
``plots/search_trials.csv`` (score by trial and fold, for ``dvc plots``) and
``plots/search_scores.png``. In MLflow each (repeat, fold) is a child run of the stage's run with
its trial scores as steps of the metric ``score``.

``ltta search-policy --worker`` (``run(..., worker=True)``) only runs trials against the shared
``search_policy.storage`` and writes nothing else; start several, then the plain command, which
joins them, waits for every fold's trials and writes the outputs (see ``ltta.search.worker``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import optuna
import torch
from tqdm import tqdm

from ltta import tracking
from ltta.config import Params
from ltta.data import subsample_stratified
from ltta.checkpoint import stable_hash
from ltta.io import atomic_path, save_figure, write_json
from ltta.models import build_model
from ltta.runtime import resolve_device, seed_everything, to_float_nchw
from ltta.search import SearchSpec, default_model_cache, run_search_worker, search_policy
from ltta.stages.base import Paths, mlflow_stage
from ltta.stages.inputs import labelled_images, prepared_meta
from ltta.stages.train_target import model_kwargs
from ltta.training.config import TrainConfig
from ltta.training.target import train_classifier
from ltta.transforms.policy import save_policy

STAGE = "search_policy"

# One line per trial floods the log; the score is logged to MLflow and plots/search_trials.csv instead.
optuna.logging.set_verbosity(optuna.logging.WARNING)


def log_fold_runs(history: list[dict[str, Any]]) -> None:
    """One MLflow child run per (repeat, fold): its trial scores as the metric ``score`` by trial number."""
    by_study: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for h in history:
        by_study.setdefault((int(h.get("repeat", 0)), int(h["fold"])), []).append((int(h["trial"]), float(h["score"])))
    for (repeat, fold), points in sorted(by_study.items()):
        scores = [v for _, v in points]
        tracking.log_child_run(
            f"search_policy/r{repeat}-f{fold}", {"score": sorted(points)},
            tags={"ltta.stage": STAGE, "ltta.fold": str(fold), "ltta.repeat": str(repeat)},
            summary={"best_score": max(scores), "mean_score": sum(scores) / len(scores), "trials": len(scores)},
        )  # fmt: skip


def write_score_figure(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Trial score over trials, one line per fold (and its running best), as a PNG for MLflow."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for fold in sorted({int(r["fold"]) for r in rows}):
        pts = sorted((int(r["trial"]), float(r["score"])) for r in rows if int(r["fold"]) == fold)
        steps, scores = [p[0] for p in pts], [p[1] for p in pts]
        line = ax.plot(steps, scores, ".", alpha=0.35, label=f"fold {fold}")[0]
        best = [max(scores[: i + 1]) for i in range(len(scores))]
        ax.plot(steps, best, "-", color=line.get_color())
    ax.set_xlabel("trial")
    ax.set_ylabel("density-matching score (D_A accuracy)")
    ax.set_title("Fast AutoAugment search: score per trial (dots) and running best (lines)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def run(params: Params, paths: Paths = Paths(), worker: bool = False) -> None:
    s, t = params.search_policy, params.train_target
    if worker and s.storage is None:
        raise ValueError("--worker needs a shared search_policy.storage "
                         "(e.g. sqlite:///policies/faa_search.db) in params.yaml")
    device = resolve_device(params.device)
    seed_everything(params.seed)
    meta = prepared_meta(paths)
    x_np, y_np = labelled_images(paths.prepared / "train.npz", meta)
    if s.max_images is not None and s.max_images < len(y_np):
        idx = subsample_stratified(y_np, s.max_images, params.seed)
        x_np, y_np = x_np[idx], y_np[idx]
    x, y = to_float_nchw(x_np, device), torch.as_tensor(y_np, device=device)
    kwargs = model_kwargs(t.width, meta)

    # One bar for the stage: the trials (folds x repeats x trials; a resumed search starts it lower
    # because stored trials are not rerun), with the fold model being trained named beside it.
    bar = tqdm(total=s.folds * s.repeats * s.trials, desc="search", unit="trial", disable=worker)

    def build_fold_model() -> torch.nn.Module:
        """An untrained fold model, laid out as training leaves it (a cached state dict loads into it)."""
        model = build_model(t.arch, **kwargs).to(device)
        if t.channels_last and device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        return model

    def train_fold_model(x_dm: torch.Tensor, y_dm: torch.Tensor, fold: int) -> torch.nn.Module:
        bar.set_postfix_str(f"training fold {fold} model")
        # FAA trains each fold's model on D_M without the searched augmentation (crop/flip baseline off).
        model = build_fold_model()
        cfg = TrainConfig(
            epochs=s.epochs, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
            augment="none", amp=t.amp, channels_last=t.channels_last, seed=params.seed + fold,
            compile=t.compile, compile_mode=t.compile_mode,
        )
        train_classifier(model, x_dm, y_dm, cfg, progress=False)
        return model.eval()

    rows: list[dict[str, float]] = []

    def on_trial(fold: int, trial: int, score: float) -> None:
        rows.append({"fold": fold, "trial": trial, "score": score})
        bar.set_postfix_str(f"fold {fold} score {score:.3f}")
        bar.update(1)
        tracking.log_metrics({f"fold{fold}_score": score}, step=trial)

    # Fold models are cached beside a SQLite storage (trained once, shared by workers), keyed by what shapes them.
    cache_key = stable_hash(
        [t.arch, kwargs, t.batch_size, t.lr, t.weight_decay, t.amp, t.channels_last, s.epochs, params.seed])
    spec = SearchSpec(num_folds=s.folds, fold_ratio=s.fold_ratio, num_trials=s.trials, num_policies=s.policies,
                      num_ops=s.ops, top_n=s.top_n, repeats=s.repeats, seed=params.seed)
    options = dict(train_fn=train_fold_model, device=device, storage=s.storage,
                   model_cache=default_model_cache(s.storage), build_fn=build_fold_model, cache_key=cache_key)
    if worker:  # no outputs, no MLflow run: the plain command merges and records everything
        ran: list[int] = []
        run_search_worker(x, y, spec, on_trial=lambda fold, trial, score: ran.append(trial), wait=False, **options)
        print(f"search worker: {len(ran)} trials run here; nothing left to start in {s.storage}")
        return

    with mlflow_stage(STAGE, params, ("search_policy",)):
        policy, history = search_policy(x, y, spec, on_trial=on_trial, **options)
        bar.close()
        # Every stored trial (other workers' and earlier runs' too), not only this process's.
        rows = [{"fold": h["fold"], "trial": h["trial"], "score": h["score"]} for h in history]
        save_policy(paths.policy, policy)
        with atomic_path(paths.plots / "search_trials.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["fold", "trial", "score"])
            writer.writeheader()
            writer.writerows(rows)
        scores = [r["score"] for r in rows]
        metrics = {
            "trials": len(rows),
            "best_score": round(max(scores), 4) if scores else 0.0,
            "mean_score": round(sum(scores) / len(scores), 4) if scores else 0.0,
            "subpolicies": len(policy.subpolicies),
        }
        write_json(paths.metrics / "search.json", {"score": metrics["best_score"]})  # DVC's view; MLflow has all
        tracking.log_metrics(metrics)
        log_fold_runs(history)
        figure = write_score_figure(paths.plots / "search_scores.png", rows)
        tracking.log_artifacts([paths.policy, paths.plots / "search_trials.csv", figure])
