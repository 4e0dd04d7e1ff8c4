"""The ltta pipeline as a Prefect flow: the six DVC stages in order, each a retried task.

Each task runs ``dvc repro --single-item <stage>``, so DVC still decides what is stale and an
up-to-date stage costs nothing. The flow opens a parent MLflow run and exports its id
(``LTTA_PARENT_RUN_ID``) so every stage's run nests under it.

    python -m pipeline.flow                 # one run, now
    python -m pipeline.serve --cron "0 3 * * *"   # serve on a schedule (Prefect UI: Deployments)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

from ltta import tracking

STAGES: tuple[str, ...] = (
    "prepare_data",
    "train_target",
    "build_loss_dataset",
    "train_predictor",
    "search_policy",
    "evaluate",
)


def _env(parent_run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    # The `ltta` console script lives beside this interpreter; DVC runs stage commands through PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if parent_run_id:
        env[tracking.PARENT_RUN_ENV] = parent_run_id
    return env


@task(task_run_name="check-params")
def check_params(project_dir: str) -> None:
    """Validate params.yaml before any stage runs: a bad key fails the flow at once, nothing written."""
    proc = subprocess.run([sys.executable, "-m", "ltta.cli", "check-params"], cwd=project_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(proc.stderr.strip() or proc.stdout.strip())


@task(retries=2, retry_delay_seconds=10, task_run_name="dvc-{stage}")
def run_stage(stage: str, project_dir: str, parent_run_id: str | None, force: bool = False) -> str:
    """``dvc repro --single-item stage``; returns DVC's output (it says when the stage was skipped)."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    dvc = Path(sys.executable).parent / "dvc"
    if dvc.exists():
        cmd[0] = str(dvc)
    proc = subprocess.run(cmd, cwd=project_dir, env=_env(parent_run_id), capture_output=True, text=True)
    logger.info("%s\n%s", " ".join(cmd), proc.stdout[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


@flow(name="ltta-pipeline", log_prints=True)
def ltta_pipeline(project_dir: str = ".", stages: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Run the stages in order under one parent MLflow run; returns each stage's DVC output."""
    import mlflow

    root = Path(project_dir).resolve()
    chosen = list(stages or STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    check_params(str(root))
    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(os.environ.get("LTTA_EXPERIMENT", "ltta"))
    outputs: dict[str, str] = {}
    with mlflow.start_run(run_name="pipeline", tags={"ltta.flow": "ltta-pipeline", "mlflow.source.git.commit": tracking.git_commit(root)}) as run:
        for stage in chosen:
            outputs[stage] = run_stage(stage, str(root), run.info.run_id, force)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flow", description="Run the ltta pipeline once as a Prefect flow.")
    parser.add_argument("--project-dir", default=".", help="project root holding dvc.yaml (default: .)")
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only these stages (repeatable)")
    parser.add_argument("--force", action="store_true", help="rerun stages even when DVC finds them up to date")
    args = parser.parse_args(argv)
    ltta_pipeline(project_dir=args.project_dir, stages=args.stage, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
