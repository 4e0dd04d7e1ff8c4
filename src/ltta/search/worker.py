"""The whole Fast AutoAugment search, in one process or spread over workers sharing a storage.

Every process runs the same loop (:func:`run_search_worker`): for each fold in order whose
studies still have a free trial slot, get the fold's D_M model (train it, or load it from the
shared model cache when another worker trained it, or move on to the next fold while another
worker is training this one), then run trials until no slot is free. ``ltta search-policy
--worker`` runs only this loop and exits when nothing is left for it; the plain ``ltta
search-policy`` (:func:`search_policy`) runs it too, then waits until every study holds its
trials (retrying the trials of killed workers) and merges them into the policy. So::

    ltta search-policy --worker &   # N times, on this machine or others sharing the storage
    ltta search-policy               # joins them, then writes policies/faa.json

Without a storage, the studies live in memory and the loop is the plain sequential search.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import optuna
import torch
from optuna.storages import BaseStorage
from torch import nn

from ltta.checkpoint import data_digest, stable_hash
from ltta.search.faa import (
    Augment,
    OnTrial,
    TrainFn,
    completed_trials,
    fail_stale_trials,
    fold_splits,
    merge_trials,
    open_fold_study,
    policy_score,
    run_fold_trials,
    trial_counts,
    trial_eval_seed,
)
from ltta.search.model_cache import FoldModelCache
from ltta.search.storage import make_storage
from ltta.transforms.functional import random_crop_flip
from ltta.transforms.policy import Policy


@dataclass(frozen=True)
class SearchSpec:
    """What a search's trials, scores and merged policy depend on: Fast AutoAugment's K, B, T and
    the policy's shape (kakaobrain/fast-autoaugment ``search.py``: ``cv_num`` 5, ``num_search`` 200,
    ``num_policy`` 5, ``num_op`` 2, top 10 per fold), in one value that every entry point passes on.
    """

    num_folds: int = 5  # K
    fold_ratio: float = 0.4  # share of each fold in D_A
    num_trials: int = 200  # B, TPE trials per fold and repeat
    num_policies: int = 5  # sub-policies per candidate policy
    num_ops: int = 2  # ops per sub-policy
    top_n: int = 10  # best trials per fold (and repeat) merged into the final policy
    repeats: int = 1  # T
    seed: int = 0
    batch_size: int = 512  # D_A images per scoring batch

    def __post_init__(self) -> None:
        if not 0.0 < self.fold_ratio < 1.0:
            raise ValueError(f"fold_ratio (the D_A share) must lie in (0, 1), got {self.fold_ratio}")
        for name in ("num_folds", "num_trials", "num_policies", "num_ops", "top_n", "repeats", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [N,C,H,W] with one label per image; got {tuple(x.shape)} and {tuple(y.shape)}")


def _free_slot(study: optuna.Study, n_trials: int) -> bool:
    return sum(trial_counts(study)) < n_trials


def run_search_worker(
    x: torch.Tensor,
    y: torch.Tensor,
    spec: SearchSpec,
    *,
    train_fn: TrainFn,
    device: torch.device | str | None = None,
    on_trial: OnTrial | None = None,
    storage: str | BaseStorage | None = None,
    study_name: str = "ltta-faa",
    post_augment: Augment | None = random_crop_flip,
    model_cache: str | os.PathLike[str] | FoldModelCache | None = None,
    build_fn: Callable[[], nn.Module] | None = None,
    cache_key: str = "",
    wait: bool = True,
    poll_interval: float = 1.0,
) -> dict[tuple[int, int], optuna.Study]:
    """Run this process's share of the search's trials; return the studies by ``(repeat, fold)``.

    Arguments as :func:`search_policy`, plus: ``model_cache``, a folder (or a
    :class:`FoldModelCache`) where fold models are shared between workers, keyed by
    ``cache_key`` (a hash of the training settings; the fold's data is added to it) and
    holding state dicts that are loaded into ``build_fn()`` (an untrained module of the
    architecture ``train_fn`` trains; required with a folder), and
    ``wait``: whether to stay until every study is complete (waiting for other workers'
    running trials and retrying those of dead ones) or return once nothing is left to start.
    """
    _check_data(x, y)
    num_folds, repeats, num_trials, seed = spec.num_folds, spec.repeats, spec.num_trials, spec.seed
    dev = torch.device(device) if device is not None else x.device
    rdb = make_storage(storage) if isinstance(storage, str) else storage
    settings = None
    if rdb is not None:  # what a stored score depends on; workers started with other params are refused
        settings = {"num_folds": num_folds, "fold_ratio": spec.fold_ratio, "num_policies": spec.num_policies,
                    "num_ops": spec.num_ops, "seed": seed, "train": cache_key, "data": data_digest(x, y)}
    studies = {
        (repeat, fold): open_fold_study(rdb, study_name, repeat, fold, seed, settings)
        for fold in range(num_folds)
        for repeat in range(repeats)
    }
    if isinstance(model_cache, (str, os.PathLike)):
        if build_fn is None:
            raise ValueError("model_cache needs build_fn: a function returning an untrained module of the fold "
                             "models' architecture (the cache stores state dicts, never pickled modules)")
        cache: FoldModelCache | None = FoldModelCache(model_cache, build_fn)
    else:
        cache = model_cache
    splits = fold_splits(y, num_folds, spec.fold_ratio, seed)
    models: dict[int, nn.Module] = {}

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return x[torch.as_tensor(idx, device=x.device)], y[torch.as_tensor(idx, device=y.device)]

    def fold_model(fold: int) -> nn.Module | None:
        """The fold's D_M model, or None while another worker trains it."""
        if fold in models:
            return models[fold]
        x_dm, y_dm = take(splits[fold][0])
        if cache is None:
            model = train_fn(x_dm, y_dm, fold).to(dev)
        else:
            key = stable_hash([cache_key, fold, data_digest(x_dm, y_dm)])
            model = cache.load(fold, key, dev)
            if model is None:
                with cache.claim(fold, key) as mine:
                    if not mine:
                        return None
                    model = cache.load(fold, key, dev)  # saved between our look and our claim
                    if model is None:
                        model = train_fn(x_dm, y_dm, fold).to(dev)
                        cache.save(fold, key, model)
        models[fold] = model
        return model

    def run_fold(fold: int, model: nn.Module) -> None:
        x_da, y_da = take(splits[fold][1])
        for repeat in range(repeats):

            def evaluate(policy: Policy, trial_number: int, _r: int = repeat) -> float:
                gen = torch.Generator(device=dev).manual_seed(trial_eval_seed(seed, _r, fold, trial_number))
                return policy_score(model, x_da, y_da, policy, generator=gen, num_copies=spec.num_policies,
                                    batch_size=spec.batch_size, post_augment=post_augment)

            report = None if on_trial is None else (lambda num, score: on_trial(fold, num, score))
            run_fold_trials(studies[(repeat, fold)], evaluate, num_trials, num_policies=spec.num_policies,
                            num_ops=spec.num_ops, on_trial=report, wait=False)

    while True:
        open_folds = [f for f in range(num_folds)
                      if any(len(completed_trials(studies[(r, f)])) < num_trials for r in range(repeats))]
        for f in [f for f in models if f not in open_folds]:
            del models[f]  # done: free its memory
        if not open_folds:
            return studies
        worked = training_elsewhere = False
        for fold in open_folds:
            if not any(_free_slot(studies[(r, fold)], num_trials) for r in range(repeats)):
                continue  # every slot of this fold is taken by a running trial
            model = fold_model(fold)
            if model is None:
                training_elsewhere = True
                continue
            run_fold(fold, model)
            worked = True
        if worked:
            continue
        if not (wait or training_elsewhere):
            return studies  # what is left runs in other workers
        time.sleep(poll_interval)
        for fold in open_folds:
            for r in range(repeats):
                fail_stale_trials(studies[(r, fold)])


def search_policy(
    x: torch.Tensor, y: torch.Tensor, spec: SearchSpec, *, train_fn: TrainFn, **options: Any
) -> tuple[Policy, list[dict[str, Any]]]:
    """Search a Fast AutoAugment policy on images ``x`` (float [N,C,H,W] in [0,1]) and labels ``y``.

    ``spec`` fixes K, B, T and the policy's shape; ``options`` are :func:`run_search_worker`'s
    keywords (``device``, ``on_trial``, ``storage``, ``study_name``, ``post_augment``,
    ``model_cache``, ``build_fn``, ``cache_key``, ``poll_interval``), described here.

    ``train_fn(x_dm, y_dm, fold)`` trains and returns a model on a fold's D_M (taking images in
    [0,1]); it is called only for folds whose studies still lack trials, so a resumed search with
    every fold complete trains nothing. Studies are named ``{study_name}-r{repeat}-f{fold}`` in
    ``storage`` (an RDB URL, made shareable by :func:`ltta.search.storage.make_storage`; None: in
    memory). Other processes running :func:`run_search_worker` on the same storage share the
    trials; this one waits for them and merges. With ``model_cache`` (a folder) fold models are
    saved there (state dicts, loaded into ``build_fn()``) and reused, by other workers and by a
    resumed search. ``on_trial(fold,
    trial_number, score)`` reports each trial completed in this process.

    Returns the final policy (``meta`` records the settings and per-fold scores) and the history
    of every completed trial: ``{"repeat", "fold", "trial", "score", "subpolicies"}``.
    """
    if "wait" in options:
        raise TypeError("search_policy always waits for every trial; use run_search_worker(wait=False) to leave early")
    studies = run_search_worker(x, y, spec, train_fn=train_fn, wait=True, **options)
    final, history, fold_stats = merge_trials(studies, num_policies=spec.num_policies, num_ops=spec.num_ops,
                                              top_n=spec.top_n)
    if not final:
        raise RuntimeError("the search finished without a completed trial; check the trial errors above")
    meta = {
        "method": "fast-autoaugment",
        "reference": "kakaobrain/fast-autoaugment FastAutoAugment/search.py",
        "num_images": int(x.shape[0]),
        **{k: v for k, v in asdict(spec).items() if k != "batch_size"},
        "folds": fold_stats,
    }
    return Policy(final, meta), history
