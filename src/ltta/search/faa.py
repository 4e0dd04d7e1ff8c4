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

Trials live in an Optuna study per (repeat, fold); with an RDB ``storage`` (e.g.
``sqlite:///search.db``) a killed search resumes from its completed trials, and several worker
processes can run :func:`run_fold_trials` on the same study.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from sklearn.model_selection import StratifiedShuffleSplit
from torch import nn

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


def fold_splits(y: torch.Tensor | np.ndarray, num_folds: int, fold_ratio: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (D_M, D_A) index pairs of the K folds, as the reference's ``get_dataloaders(split=...)``.

    The reference uses ``random_state=0``, i.e. ``seed=0`` here.
    """
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


def run_fold_trials(
    study: optuna.Study,
    evaluate: Evaluate,
    n_trials: int,
    *,
    num_policies: int = 5,
    num_ops: int = 2,
    on_trial: Callable[[int, float], None] | None = None,
) -> int:
    """Run trials on ``study`` until it holds ``n_trials`` completed ones; return how many ran here.

    Safe to call from several processes on one shared-storage study: each stops once the study
    as a whole reaches ``n_trials`` completed trials (Optuna's ``MaxTrialsCallback``).
    ``on_trial(trial_number, score)`` runs after each trial is stored.
    """
    before = len(completed_trials(study))
    remaining = n_trials - before
    if remaining <= 0:
        return 0

    def objective(trial: optuna.Trial) -> float:
        return float(evaluate(suggest_policy(trial, num_policies, num_ops), trial.number))

    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
        MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))
    ]
    if on_trial is not None:

        def report(_: optuna.Study, trial: FrozenTrial) -> None:
            if trial.state == TrialState.COMPLETE and trial.value is not None:
                on_trial(trial.number, float(trial.value))

        callbacks.append(report)
    study.optimize(objective, n_trials=remaining, callbacks=callbacks, gc_after_trial=False)
    return len(completed_trials(study)) - before


def _eval_seed(seed: int, repeat: int, fold: int, trial_number: int) -> int:
    """A per-trial seed for the augmentation draws, so a score never depends on trial order."""
    return int(np.random.SeedSequence([seed, repeat, fold, trial_number]).generate_state(1)[0])


def _subpolicy_json(policy: Policy) -> list[list[dict[str, Any]]]:
    return policy_to_dict(policy)["subpolicies"]


def search_policy(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    train_fn: TrainFn,
    num_folds: int = 5,
    fold_ratio: float = 0.4,
    num_trials: int = 200,
    num_policies: int = 5,
    num_ops: int = 2,
    top_n: int = 10,
    repeats: int = 1,
    seed: int = 0,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    on_trial: OnTrial | None = None,
    storage: str | None = None,
    study_name: str = "ltta-faa",
    post_augment: Augment | None = random_crop_flip,
) -> tuple[Policy, list[dict[str, Any]]]:
    """Search a Fast AutoAugment policy on images ``x`` (float [N,C,H,W] in [0,1]) and labels ``y``.

    ``train_fn(x_dm, y_dm, fold)`` trains and returns a model on a fold's D_M (taking images in
    [0,1]); it is called only for folds whose study still lacks trials, so a resumed search with
    every fold complete trains nothing (make ``train_fn`` checkpoint to resume inside a fold's
    training). Studies are named ``{study_name}-r{repeat}-f{fold}`` in ``storage`` (None: in
    memory). ``on_trial(fold, trial_number, score)`` reports progress.

    Returns the final policy (``meta`` records the settings and per-fold scores) and the history
    of every completed trial: ``{"repeat", "fold", "trial", "score", "subpolicies"}``.
    """
    if x.dim() != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [N,C,H,W] with one label per image; got {tuple(x.shape)} and {tuple(y.shape)}")
    if not 0.0 < fold_ratio < 1.0:
        raise ValueError(f"fold_ratio (the D_A share) must lie in (0, 1), got {fold_ratio}")
    for name, value in (("num_folds", num_folds), ("num_trials", num_trials), ("num_policies", num_policies),
                        ("num_ops", num_ops), ("top_n", top_n), ("repeats", repeats), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    dev = torch.device(device) if device is not None else x.device
    splits = fold_splits(y, num_folds, fold_ratio, seed)

    studies: dict[tuple[int, int], optuna.Study] = {}
    for fold, (dm_idx, da_idx) in enumerate(splits):
        model: nn.Module | None = None
        x_da = x[torch.as_tensor(da_idx, device=x.device)]
        y_da = y[torch.as_tensor(da_idx, device=y.device)]
        for repeat in range(repeats):
            study = optuna.create_study(
                study_name=f"{study_name}-r{repeat}-f{fold}",
                storage=storage,
                sampler=optuna.samplers.TPESampler(seed=seed + 1000 * repeat + fold),
                direction="maximize",
                load_if_exists=True,
            )
            studies[(repeat, fold)] = study
            if len(completed_trials(study)) >= num_trials:
                continue
            if model is None:
                dm = torch.as_tensor(dm_idx, device=x.device)
                model = train_fn(x[dm], y[torch.as_tensor(dm_idx, device=y.device)], fold).to(dev)
            fold_model = model

            def evaluate(policy: Policy, trial_number: int, _r: int = repeat, _f: int = fold) -> float:
                gen = torch.Generator(device=dev).manual_seed(_eval_seed(seed, _r, _f, trial_number))
                return policy_score(
                    fold_model, x_da, y_da, policy, generator=gen, num_copies=num_policies,
                    batch_size=batch_size, post_augment=post_augment,
                )

            report = None if on_trial is None else (lambda num, score, _f=fold: on_trial(_f, num, score))
            run_fold_trials(study, evaluate, num_trials, num_policies=num_policies, num_ops=num_ops, on_trial=report)
        del model

    final: list[SubPolicy] = []
    history: list[dict[str, Any]] = []
    fold_stats: list[dict[str, Any]] = []
    for repeat in range(repeats):  # reference order: repeats outer, folds inner
        for fold in range(num_folds):
            trials = sorted(completed_trials(studies[(repeat, fold)]), key=lambda t: t.number)
            for t in trials:
                history.append({
                    "repeat": repeat, "fold": fold, "trial": t.number, "score": float(t.value),
                    "subpolicies": _subpolicy_json(trial_policy(t, num_policies, num_ops)),
                })
            best = sorted(trials, key=lambda t: (-float(t.value), t.number))[:top_n]
            for t in best:
                final.extend(remove_duplicate_subpolicies(trial_policy(t, num_policies, num_ops).subpolicies))
            fold_stats.append({
                "repeat": repeat, "fold": fold, "trials": len(trials),
                "best_score": float(best[0].value) if best else None,
                "top_n_mean_score": float(np.mean([t.value for t in best])) if best else None,
            })
    if not final:
        raise RuntimeError("the search finished without a completed trial; check the trial errors above")
    meta = {
        "method": "fast-autoaugment",
        "reference": "kakaobrain/fast-autoaugment FastAutoAugment/search.py",
        "num_images": int(x.shape[0]),
        "num_folds": num_folds, "fold_ratio": fold_ratio, "num_trials": num_trials,
        "num_policies": num_policies, "num_ops": num_ops, "top_n": top_n, "repeats": repeats, "seed": seed,
        "folds": fold_stats,
    }
    return Policy(final, meta), history
