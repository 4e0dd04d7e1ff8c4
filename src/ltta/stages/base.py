"""What every stage shares: the artifact paths of dvc.yaml, and the MLflow run around the work.

A stage is a thin function ``run(params) -> None``: it reads its inputs, calls the library with
plain arguments, writes its outputs atomically and logs to MLflow. The paths here are the ones
``dvc.yaml`` declares; a test checks that the two agree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltta import tracking
from ltta.config import Params

#: Set by ``dvc exp run`` for the stage commands it runs (dvc.env.DVC_EXP_NAME): the experiment's name.
DVC_EXP_ENV = "DVC_EXP_NAME"


@dataclass(frozen=True)
class Paths:
    """Artifact locations, relative to the project root (the working directory of ``dvc repro``)."""

    root: Path = Path(".")

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def corrupted(self) -> Path:
        return self.root / "data" / "corrupted" / "test"

    @property
    def loss_data(self) -> Path:
        return self.root / "data" / "loss"

    @property
    def target(self) -> Path:
        return self.root / "models" / "target.pt"

    @property
    def predictor(self) -> Path:
        return self.root / "models" / "predictor.pt"

    @property
    def feature_head(self) -> Path:
        return self.root / "models" / "feature_head.pt"

    @property
    def policy(self) -> Path:
        return self.root / "policies" / "faa.json"

    @property
    def gps_policy(self) -> Path:
        return self.root / "policies" / "gps.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


@contextlib.contextmanager
def mlflow_stage(stage: str, params: Params, sections: tuple[str, ...]) -> Iterator[Any]:
    """An MLflow run for ``stage`` with the params sections it reads.

    The tags ``ltta.profile``, ``ltta.study``, ``ltta.unseen`` (and ``ltta.dvc_exp``, the experiment's
    name under ``dvc exp run``) are what ``ltta compare --by`` and the MLflow UI's filters group on.
    """
    dumped = params.model_dump()
    logged = {"seed": params.seed, "device": params.device, "profile": params.profile, "study": params.study,
              "unseen": params.unseen}
    logged.update({s: dumped[s] for s in sections})
    tags = {"ltta.profile": params.profile, "ltta.study": params.study, "ltta.unseen": params.unseen}
    if os.environ.get(DVC_EXP_ENV):
        tags["ltta.dvc_exp"] = os.environ[DVC_EXP_ENV]
    t = params.tracking
    with tracking.stage_run(stage, logged, experiment=t.experiment, tags=tags, retry_seconds=t.retry_seconds,
                            request_timeout=t.request_timeout) as run:
        yield run
