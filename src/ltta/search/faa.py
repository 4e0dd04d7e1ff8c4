"""Fast AutoAugment: augmentation policy search by density matching (Lim et al., NeurIPS 2019).

Follows kakaobrain/fast-autoaugment ``FastAutoAugment/search.py`` (``eval_tta`` and ``__main__``)
and ``FastAutoAugment/data.py``:

* K stratified folds of the search data (``StratifiedShuffleSplit(n_splits=K,
  test_size=fold_ratio)``): a model is trained on each fold's D_M, without the policy;
* per fold, B trials of TPE (the reference uses HyperOpt through Ray Tune; here Optuna's
  ``TPESampler``). A trial proposes ``num_policies`` sub-policies of ``num_ops`` ops, each op a
  categorical over the 15 FAA ops with prob ~ U(0,1) and level ~ U(0,1);
* a trial's reward is top-1 on D_A of the fold's model when each image gets ``num_policies``
  augmented copies and counts as correct if *any* copy is classified correctly (the reference's
  ``max`` over ``corrects``). As in the reference, each copy runs the *whole* candidate policy
  (one uniformly drawn sub-policy per image, ``Augmentation`` in data.py) followed by the
  training pipeline's crop and flip (``post_augment``), not sub-policy i on copy i;
* the top N trials of each fold give their sub-policies, de-duplicated within each trial by op
  names (``remove_deplicates``), and all of them form the final policy. The reference repeats
  the fold loop ``range(1)`` times (the paper: T=2): ``repeats``.

This module holds the pieces: folds, the search space, the score, the trial loop of one study
(:func:`run_fold_trials`, safe to run from several processes on one shared study) and the
merge. :mod:`ltta.search.worker` runs the whole search (``search_policy``), in one process or
spread over workers that share an RDB storage (:mod:`ltta.search.storage`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from ltta.search.sampler import TrialSeededTPESampler
from ltta.transforms.functional import random_crop_flip
from ltta.transforms.ops import op_names
from ltta.transforms.policy import (
    CompiledPolicy,
    OpSpec,
    Policy,
    SubPolicy,
    policy_to_dict,
    remove_duplicate_subpolicies,
)

TrainFn = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]
Evaluate = Callable[[Policy, int], float]  # (candidate policy, trial number) -> reward
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
OnTrial = Callable[[int, int, float], None]  # (fold, trial number, score)

_log = logging.getLogger(__name__)


def fold_splits(y: torch.Tensor | np.ndarray, num_folds: int, fold_ratio: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (D_M, D_A) index pairs of the K folds, as the reference's ``get_dataloaders(split=...)``.

    The reference uses ``random_state=0``, i.e. ``seed=0`` here.
    """
    from sklearn.model_selection import StratifiedShuffleSplit  # here: a 2 s import the other stages skip

    labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    sss = StratifiedShuffleSplit(n_splits=num_folds, test_size=fold_ratio, random_state=seed)
    return [(np.sort(dm), np.sort(da)) for dm, da in sss.split(np.zeros(len(labels)), labels)]


def suggest_policy(trial: optuna.Trial, num_policies: int, num_ops: int) -> Policy:
    """Sample one candidate policy in the reference's search space (``space`` in search.py)."""
    names = op_names()
    subs: list[SubPolicy] = []
    for i in range(num_policies):
        sub: SubPolicy = []
        for j in range(num_ops):
            name = trial.suggest_categorical(f"op_{i}_{j}", names)
            prob = trial.suggest_float(f"prob_{i}_{j}", 0.0, 1.0)
            level = trial.suggest_float(f"level_{i}_{j}", 0.0, 1.0)
            sub.append(OpSpec(str(name), prob, level))
        subs.append(sub)
    return Policy(subs)


def trial_policy(trial: FrozenTrial, num_policies: int, num_ops: int) -> Policy:
    """Decode a finished trial's parameters back into its policy (``policy_decoder``)."""
    p = trial.params
    return Policy(
        [
            [OpSpec(str(p[f"op_{i}_{j}"]), float(p[f"prob_{i}_{j}"]), float(p[f"level_{i}_{j}"])) for j in range(num_ops)]
            for i in range(num_policies)
        ]
    )


@torch.no_grad()
def policy_score(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    policy: Policy | CompiledPolicy,
    *,
    generator: torch.Generator,
    num_copies: int,
    batch_size: int = 512,
    post_augment: Augment | None = random_crop_flip,
) -> float:
    """Top-1 of ``model`` on (x, y) when an image counts if any of ``num_copies`` augmented copies is right.

    Each copy applies ``policy`` (one random sub-policy per image) and then ``post_augment``.
    Batches of ``batch_size`` go to the device of ``generator``; on CUDA the forward pass runs
    under bf16 autocast. The model is put in eval mode.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need matching, non-empty images and labels, got {x.shape[0]} and {y.shape[0]}")
    device = generator.device
    compiled = policy if isinstance(policy, CompiledPolicy) else CompiledPolicy(policy, device)
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True).float()
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        any_right = torch.zeros(xb.shape[0], dtype=torch.bool, device=device)
        for _ in range(num_copies):
            view = compiled(xb, generator)
            if post_augment is not None:
                view = post_augment(view, generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(view)
            any_right |= logits.argmax(1) == yb
        correct += int(any_right.sum())
    return correct / x.shape[0]


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's completed trials (failed or killed-while-running ones do not count)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def logical_trial_number(trial: FrozenTrial) -> int:
    """The trial's slot: its own number, or, for a retry of a killed worker's trial, the original's.

    ``RetryHeartbeatStaleTrialCallback`` records the first failed trial of a retry chain in the
    ``failed_trial`` system attribute; the retry has the same parameters and, scored with the
    original number's seed, the same score the killed trial would have had.
    """
    return int(trial.system_attrs.get("failed_trial", trial.number))


def worker_id() -> str:
    """``host:pid`` of this process, stored on every trial it runs (``user_attrs["worker"]``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


_COUNTED = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def trial_counts(study: optuna.Study) -> tuple[int, int]:
    """(completed, running) trials of the study; a slot is free while their sum is below the budget."""
    states = Counter(t.state for t in study.get_trials(deepcopy=False))
    return states[TrialState.COMPLETE], states[TrialState.RUNNING]


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and, with :func:`ltta.search.storage.make_storage`, requeue) trials of dead workers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_fold_trials(
    study: optuna.Study,
    evaluate: Evaluate,
    n_trials: int,
    *,
    num_policies: int = 5,
    num_ops: int = 2,
    on_trial: Callable[[int, float], None] | None = None,
    wait: bool = True,
    poll_interval: float = 1.0,
) -> int:
    """Run trials on ``study`` until it holds ``n_trials`` completed ones; return how many completed here.

    Safe to call from several processes on one shared-storage study, and never overshoots:

    * a trial starts only while completed + running trials < ``n_trials``;
    * two workers can still pass that check together, so a trial first counts the trials
      numbered below it that are completed, running or queued: if there are already
      ``n_trials`` it is *surplus*, and ends PRUNED (``user_attrs["surplus"]``) before sampling
      anything. Numbers are handed out in creation order by the storage, so of any n+1 trials
      that could complete, the highest-numbered one sees the other n below it: at most
      ``n_trials`` ever complete.

    When every open slot is held by another worker's running trial: with ``wait`` poll every
    ``poll_interval`` s (failing and requeueing the trials of workers whose heartbeat stopped,
    see :mod:`ltta.search.storage`) until the study is done; without, return. A retried trial
    is scored under its original number (:func:`logical_trial_number`).
    ``on_trial(trial_number, score)`` runs after each trial completed here is stored.
    """
    me = worker_id()
    ran = 0

    def objective(trial: optuna.Trial) -> float:
        counted = study.get_trials(deepcopy=False, states=_COUNTED)
        if sum(t.number < trial.number for t in counted) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"surplus: {n_trials} trials were already done or running")
        frozen = next(t for t in counted if t.number == trial.number)
        trial.set_user_attr("worker", me)
        return float(evaluate(suggest_policy(trial, num_policies, num_ops), logical_trial_number(frozen)))

    def count(_: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            ran += 1
            if on_trial is not None:
                on_trial(logical_trial_number(trial), float(trial.value))

    waiting_logged = False
    while True:
        done, running = trial_counts(study)
        if done >= n_trials:
            return ran
        if done + running >= n_trials:
            if not wait:
                return ran
            if not waiting_logged:
                _log.info("%s: waiting for %d trial(s) running in other workers", study.study_name, running)
                waiting_logged = True
            time.sleep(poll_interval)
            fail_stale_trials(study)
            continue
        try:
            study.optimize(objective, n_trials=1, callbacks=[count], gc_after_trial=False)
        except UpdateFinishedTrialError:
            # this process went silent past the grace period (e.g. suspended): its trial was
            # failed and requeued for another worker, so its result is dropped, not stored twice
            _log.warning("%s: a trial of this worker was taken over by another; continuing", study.study_name)


def open_fold_study(
    storage: str | BaseStorage | None,
    study_name: str,
    repeat: int,
    fold: int,
    seed: int,
    settings: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create or load the study of ``(repeat, fold)``: ``{study_name}-r{repeat}-f{fold}``.

    ``settings`` (what a stored trial's score depends on) are recorded in a new study; loading
    a study recorded with other settings raises, so a worker started with different params
    cannot mix its trials into the search.
    """
    name = f"{study_name}-r{repeat}-f{fold}"
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=TrialSeededTPESampler(seed=seed + 1000 * repeat + fold),
        direction="maximize",
        load_if_exists=True,
    )
    if settings is not None:
        stored = study.user_attrs.get("settings")
        if stored is None:
            study.set_user_attr("settings", settings)
        elif stored != settings:
            raise ValueError(
                f"study {name!r} in the search storage was run with settings {stored}, not {settings}; "
                "point search_policy.storage at a new database (or delete the old one) to search again"
            )
    return study


def trial_eval_seed(seed: int, repeat: int, fold: int, trial_number: int) -> int:
    """A per-trial seed for the augmentation draws, so a score never depends on trial order."""
    return int(np.random.SeedSequence([seed, repeat, fold, trial_number]).generate_state(1)[0])


def _subpolicy_json(policy: Policy) -> list[list[dict[str, Any]]]:
    return policy_to_dict(policy)["subpolicies"]


def merge_trials(
    studies: dict[tuple[int, int], optuna.Study], *, num_policies: int, num_ops: int, top_n: int
) -> tuple[list[SubPolicy], list[dict[str, Any]], list[dict[str, Any]]]:
    """The final sub-policies, the trial history and per-fold statistics of finished studies.

    ``studies`` maps ``(repeat, fold)`` to its study. In the reference's order (repeats outer,
    folds inner) the top ``top_n`` completed trials of each study give their sub-policies,
    de-duplicated within each trial by op names. Trials are identified by
    :func:`logical_trial_number` (ties in score go to the lower number), so a search where a
    killed worker's trial was retried merges exactly as one where it was not.
    """
    final: list[SubPolicy] = []
    history: list[dict[str, Any]] = []
    fold_stats: list[dict[str, Any]] = []
    for (repeat, fold), study in sorted(studies.items()):
        trials = sorted(completed_trials(study), key=logical_trial_number)
        for t in trials:
            history.append({
                "repeat": repeat, "fold": fold, "trial": logical_trial_number(t), "score": float(t.value),
                "subpolicies": _subpolicy_json(trial_policy(t, num_policies, num_ops)),
            })
        best = sorted(trials, key=lambda t: (-float(t.value), logical_trial_number(t)))[:top_n]
        for t in best:
            final.extend(remove_duplicate_subpolicies(trial_policy(t, num_policies, num_ops).subpolicies))
        fold_stats.append({
            "repeat": repeat, "fold": fold, "trials": len(trials),
            "best_score": float(best[0].value) if best else None,
            "top_n_mean_score": float(np.mean([t.value for t in best])) if best else None,
        })
    return final, history, fold_stats
