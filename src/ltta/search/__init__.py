"""Fast AutoAugment policy search (density matching with TPE; Optuna studies, resumable)."""

from ltta.search.faa import (
    completed_trials,
    fold_splits,
    policy_score,
    run_fold_trials,
    search_policy,
    suggest_policy,
    trial_policy,
)

__all__ = [
    "completed_trials",
    "fold_splits",
    "policy_score",
    "run_fold_trials",
    "search_policy",
    "suggest_policy",
    "trial_policy",
]
