"""TPE whose random draws are seeded by the trial number, for searches shared by several workers.

A ``TPESampler(seed=s)`` holds one random stream. Two workers built with the same seed would
propose the *same* candidates for their first trials (TPE's start-up trials are random draws),
and a resumed search would restart the stream. Seeding each trial's draws from
``(seed, trial number)`` instead makes a trial's proposal a function of its number and of the
trials stored before it: workers never duplicate each other's draws, and a resumed or
distributed search proposes what one uninterrupted process would have, as long as the
sampler is still in its random start-up phase (later, TPE also sees which trials had finished).

``constant_liar`` (Optuna's recommendation for parallel TPE) makes a trial that is still running
on another worker count as a bad result, so parallel workers do not crowd the same region.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState


def trial_seed(seed: int, trial_number: int) -> int:
    """The seed of one trial's draws (independent streams for neighbouring numbers)."""
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


class TrialSeededTPESampler(BaseSampler):
    """``TPESampler(constant_liar=True)`` re-seeded from ``(seed, trial.number)`` before each trial."""

    def __init__(self, seed: int, **tpe_kwargs: Any) -> None:
        self._seed = seed
        self._tpe_kwargs = {"constant_liar": True, **tpe_kwargs}
        self._tpe = self._make(seed)

    def _make(self, seed: int) -> TPESampler:
        with warnings.catch_warnings():  # constant_liar is "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return TPESampler(seed=seed, **self._tpe_kwargs)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        # TPE keeps no state besides its random stream (the history is read from the storage),
        # so a fresh sampler per trial changes nothing but the seed.
        self._tpe = self._make(trial_seed(self._seed, trial.number))
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()
