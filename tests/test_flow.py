"""The Prefect flow drives `dvc repro` stage by stage against a real Prefect server on 127.0.0.1,
under a parent MLflow run on a real `mlflow server`; a second run finds everything up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project, tiny_params

DVC = str(Path(sys.executable).parent / "dvc")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("flow-project"), tiny_params(evaluate={"severities": [3]}))


@pytest.mark.timeout(1200)  # the whole pipeline twice through DVC: ~2 min on an idle 2-core machine
def test_flow_runs_stages_through_dvc_and_nests_mlflow_runs(project: Path, prefect_server: None, mlflow_server: str, monkeypatch) -> None:
    import mlflow

    from pipeline.flow import STAGES, ltta_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = ltta_pipeline(project_dir=str(project))
    assert list(out) == list(STAGES)
    assert (project / "reports" / "results.md").exists()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    status = subprocess.run([DVC, "status", "--quiet"], cwd=project)
    assert status.returncode == 0, "a stage is stale right after the flow ran"

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("ltta")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ltta.flow") == "ltta-pipeline"]
    assert parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["dvc.stage"] for r in children} == set(STAGES)
    target_run = next(r for r in children if r.data.tags["dvc.stage"] == "train_target")
    assert "train_target.epochs" in target_run.data.params and "test_error" in target_run.data.metrics
    assert len(target_run.data.tags["mlflow.source.git.commit"]) > 0
    versions = client.search_model_versions("name='ltta-target'")
    assert versions and client.get_model_version_by_alias("ltta-target", "candidate")

    # Second run: DVC finds every stage up to date and runs nothing.
    again = ltta_pipeline(project_dir=str(project))
    for stage, text in again.items():
        assert "didn't change, skipping" in text or "is cached" in text or "up to date" in text.lower(), (stage, text)


def test_flow_stops_on_bad_params_before_any_stage(tmp_path: Path, prefect_server: None, mlflow_server: str, monkeypatch) -> None:
    from pipeline.flow import ltta_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    raw = tiny_params()
    raw["train_target"]["epochs"] = -1
    project = make_project(tmp_path / "bad", raw)
    with pytest.raises(Exception, match="train_target.epochs"):
        ltta_pipeline(project_dir=str(project))
    assert not (project / "data").exists() and not (project / "dvc.lock").exists()
