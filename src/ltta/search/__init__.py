"""Fast AutoAugment policy search (density matching with TPE; Optuna studies, resumable, distributable)."""

from ltta.search.faa import (
    completed_trials,
    fold_splits,
    logical_trial_number,
    merge_trials,
    open_fold_study,
    policy_score,
    run_fold_trials,
    suggest_policy,
    trial_eval_seed,
    trial_policy,
)
from ltta.search.model_cache import FoldModelCache
from ltta.search.storage import default_model_cache, make_storage
from ltta.search.worker import SearchSpec, run_search_worker, search_policy

__all__ = [
    "FoldModelCache",
    "SearchSpec",
    "completed_trials",
    "default_model_cache",
    "fold_splits",
    "logical_trial_number",
    "make_storage",
    "merge_trials",
    "open_fold_study",
    "policy_score",
    "run_fold_trials",
    "run_search_worker",
    "search_policy",
    "suggest_policy",
    "trial_eval_seed",
    "trial_policy",
]
