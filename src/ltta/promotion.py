"""Champion / challenger: the registered ``candidate`` replaces the ``champion`` only when it wins.

Every ``evaluate`` run registers the learned TTA it measured as a new version of ``ltta-tta``
with the alias ``candidate`` (:func:`ltta.stages.evaluate.register_tta_model`); the version's run
holds the evaluation's metrics and its tags name the target and predictor versions it is built
from. :func:`promote` reads one metric of the candidate's run and of the champion's run, and
moves ``champion`` (on ``ltta-tta`` and on those target and predictor versions) only when the
candidate is strictly better: a tie keeps the champion, so re-running the same pipeline never
churns the alias. The first candidate becomes champion. Both versions get the figures and the
decision as tags, so the registry alone tells why an alias points where it does.

The library takes a client and plain arguments; ``ltta promote`` (the CLI) supplies them from
params.yaml's ``promote`` section.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from typing import Any

CANDIDATE = "candidate"
CHAMPION = "champion"
#: Tags on an ``ltta-tta`` version naming the registered versions it is built from.
COMPONENTS = (("ltta-target", "ltta.target_version"), ("ltta-predictor", "ltta.predictor_version"))


@dataclass(frozen=True)
class Decision:
    """What :func:`promote` decided, with the figures it compared."""

    model: str
    metric: str
    mode: str
    candidate_version: str
    candidate_value: float
    champion_version: str | None  # before the decision; None: there was none
    champion_value: float | None
    promoted: bool
    reason: str

    def line(self) -> str:
        """One line for a terminal or a CI log."""
        verb = "promoted" if self.promoted else "kept the champion"
        champ = "none" if self.champion_version is None else f"v{self.champion_version} {self.metric}={self.champion_value:.4f}"
        return (f"{self.model}: {verb}: candidate v{self.candidate_version} {self.metric}={self.candidate_value:.4f} "
                f"vs champion {champ} ({self.reason})")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _version_by_alias(client: Any, model: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None


def run_metric(client: Any, version: Any, metric: str, model: str) -> float:
    """``metric`` of the run that logged ``version``; a missing one is named with the fix."""
    if not version.run_id:
        raise ValueError(f"{model} v{version.version} has no source run to read {metric!r} from; re-register it (dvc repro evaluate)")
    metrics = client.get_run(version.run_id).data.metrics
    if metric not in metrics:
        known = ", ".join(sorted(k for k in metrics if k.startswith(metric.split(".")[0] + ".")))[:400] or "none"
        raise ValueError(
            f"{model} v{version.version}'s run {version.run_id} has no metric {metric!r} (promote.metric); "
            f"its metrics of that method: {known}. Set promote.metric to one of them, or rerun evaluate with that method."
        )
    return float(metrics[metric])


def better(candidate: float, champion: float, mode: str) -> bool:
    """Strictly better in ``mode`` (``min``: lower wins, ``max``: higher wins); a tie is not better."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return candidate < champion if mode == "min" else candidate > champion


def promote(client: Any, *, model: str = "ltta-tta", metric: str = "learned.mean_corruption_error",
            mode: str = "min") -> Decision:
    """Compare ``model@candidate`` with ``model@champion`` on ``metric`` and move ``champion`` if it wins.

    Raises ValueError (with the fix) when there is no candidate or a figure is missing.
    """
    candidate = _version_by_alias(client, model, CANDIDATE)
    if candidate is None:
        raise ValueError(
            f"{model} has no version with alias {CANDIDATE!r} in this MLflow store; run the pipeline's evaluate stage "
            "with learned among evaluate.methods and tracking.register_models: true (dvc repro)"
        )
    cand_value = run_metric(client, candidate, metric, model)
    champion = _version_by_alias(client, model, CHAMPION)
    champ_value = None if champion is None else run_metric(client, champion, metric, model)
    if champion is None:
        promoted, reason = True, "no champion yet: the first candidate becomes champion"
    elif champion.version == candidate.version:
        promoted, reason = False, "the candidate is the champion already"
    elif better(cand_value, float(champ_value), mode):  # type: ignore[arg-type]
        promoted, reason = True, f"the candidate is better ({'lower' if mode == 'min' else 'higher'} wins)"
    elif cand_value == champ_value:
        promoted, reason = False, "a tie: the champion stays"
    else:
        promoted, reason = False, f"the candidate is worse ({'lower' if mode == 'min' else 'higher'} wins)"
    decision = Decision(
        model=model, metric=metric, mode=mode, candidate_version=str(candidate.version), candidate_value=cand_value,
        champion_version=None if champion is None else str(champion.version), champion_value=champ_value,
        promoted=promoted, reason=reason,
    )
    if champion is None or str(champion.version) != decision.candidate_version:  # a new comparison: on record
        _record(client, decision, champion)
    if promoted:
        client.set_registered_model_alias(model, CHAMPION, candidate.version)
        for component, tag in COMPONENTS:
            version = candidate.tags.get(tag)
            if version:
                client.set_registered_model_alias(component, CHAMPION, version)
    return decision


def _record(client: Any, d: Decision, champion: Any | None) -> None:
    """The figures and the verdict as tags, on the candidate and on the champion it was compared with."""
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    tags = {
        "ltta.promotion.metric": f"{d.metric} ({d.mode})",
        "ltta.promotion.candidate_value": f"{d.candidate_value:.6g}",
        "ltta.promotion.champion_value": "none" if d.champion_value is None else f"{d.champion_value:.6g}",
        "ltta.promotion.champion_version": d.champion_version or "none",
        "ltta.promotion.decision": "promoted" if d.promoted else "kept champion",
        "ltta.promotion.reason": d.reason,
        "ltta.promotion.at": when,
    }
    for key, value in tags.items():
        client.set_model_version_tag(d.model, d.candidate_version, key, value)
    if champion is not None:
        client.set_model_version_tag(
            d.model, str(champion.version), "ltta.promotion.last_challenger",
            f"v{d.candidate_version} {d.metric}={d.candidate_value:.6g}: {tags['ltta.promotion.decision']} ({when})",
        )
