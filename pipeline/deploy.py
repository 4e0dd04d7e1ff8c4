"""Deploy the ltta flow to a Prefect work pool, so a worker on a GPU box runs it from the UI or a schedule.

    prefect server start                                       # the API and UI at http://127.0.0.1:4200
    python -m pipeline.deploy --cron "0 3 * * *"               # pool "gpu", queue "gpu", deployment ltta/nightly
    prefect worker start --pool gpu --type process             # on the GPU box, in the checkout
    prefect deployment run ltta-pipeline/nightly -p study=augmix   # or "Quick run" / "Custom run" in the UI

What it sets up (idempotent: run it again to change the schedule or defaults):

* a **process** work pool (default ``gpu``) with a concurrency limit of 1, and a queue in it
  (default ``gpu``) also limited to 1: one GPU, one pipeline at a time; a second run waits in the
  queue instead of fighting for the device and DVC's lock;
* the deployment: the flow from this checkout (``pipeline/flow.py:ltta_pipeline``; the worker runs
  it in this directory), its parameters' defaults (profile, study, Hydra overrides, stages,
  stages to force, promote), a cron schedule, and the deployment's own concurrency limit of 1.
  Each stage task retries with exponential backoff (``pipeline.flow.STAGE_RETRY_DELAYS``) when a
  rerun may pass.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.flow import STAGES

ENTRYPOINT = "pipeline/flow.py:ltta_pipeline"


@dataclass(frozen=True)
class DeploymentSpec:
    """Everything :func:`deploy` creates, as plain values (the CLI fills it)."""

    project_dir: Path
    name: str = "nightly"
    pool: str = "gpu"
    queue: str = "gpu"
    cron: str | None = "0 3 * * *"
    timezone: str = "UTC"
    profile: str | None = None
    study: str | None = None
    overrides: list[str] = field(default_factory=list)
    stages: list[str] | None = None
    force: list[str] = field(default_factory=list)
    promote: bool = True
    paused: bool = False

    def parameters(self) -> dict[str, Any]:
        """The flow's parameter defaults for runs of this deployment (the UI's "Custom run" edits them)."""
        return {"project_dir": str(self.project_dir), "profile": self.profile, "study": self.study,
                "overrides": list(self.overrides), "stages": self.stages, "force": list(self.force),
                "promote": self.promote}


def ensure_pool(pool: str, queue: str) -> None:
    """A process work pool and a queue in it, each running at most one flow run at a time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=1))
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", concurrency_limit=1,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="ltta: one GPU, one pipeline run at a time",
            ))
        try:
            found = client.read_work_queue_by_name(queue, work_pool_name=pool)
            client.update_work_queue(found.id, concurrency_limit=1)
        except ObjectNotFound:
            client.create_work_queue(queue, work_pool_name=pool, concurrency_limit=1)


def deploy(spec: DeploymentSpec) -> str:
    """Create or update the deployment; returns its id."""
    from prefect import flow
    from prefect.client.schemas.schedules import CronSchedule

    ensure_pool(spec.pool, spec.queue)
    remote = flow.from_source(source=str(spec.project_dir), entrypoint=ENTRYPOINT)
    schedules = [CronSchedule(cron=spec.cron, timezone=spec.timezone)] if spec.cron else []
    # to_deployment + apply is what Flow.deploy does for a process pool, without its online-workers
    # check (Prefect 3.8.8's client sends limit=None there and the server answers 422).
    deployment = remote.to_deployment(
        name=spec.name, work_pool_name=spec.pool, work_queue_name=spec.queue, schedules=schedules,
        parameters=spec.parameters(), concurrency_limit=1, paused=spec.paused, tags=["ltta"],
        description="The ltta pipeline: dvc repro stage by stage, promote, results table as an artifact.",
    )
    deployment_id = deployment.apply(work_pool_name=spec.pool)
    return str(deployment_id)


def run_listing(deployment: str, limit: int = 20) -> str:
    """The deployment's latest flow runs, one line each (name, state, start, duration), newest first.

    Every filter is given in full: Prefect 3.8.8's client sends the missing ones as null, which its
    server answers with 422 (``prefect flow-run ls`` fails the same way against it).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowFilter, FlowRunFilter, TaskRunFilter, WorkPoolFilter, WorkQueueFilter,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(), flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])), work_pool_filter=WorkPoolFilter(),
            work_queue_filter=WorkQueueFilter(), sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit, offset=0,
        )
    lines = [f"{'flow run':<28} {'state':<10} {'start (UTC)':<20} {'took':>8}  parameters"]
    for run in runs:
        start = run.start_time.strftime("%Y-%m-%d %H:%M:%S") if run.start_time else "-"
        took = f"{run.total_run_time.total_seconds():.0f} s" if run.start_time else "-"
        state = run.state.type.value if run.state else "-"
        lines.append(f"{run.name:<28} {state:<10} {start:<20} {took:>8}  {run.parameters.get('overrides') or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", type=Path, default=Path("."), help="the checkout the worker runs in (default: .)")
    parser.add_argument("--name", default="nightly", help="deployment name (default: nightly -> ltta-pipeline/nightly)")
    parser.add_argument("--pool", default="gpu", help="work pool, created as a process pool if missing (default: gpu)")
    parser.add_argument("--queue", default="gpu", help="work queue in the pool (default: gpu)")
    parser.add_argument("--cron", default="0 3 * * *", help="schedule (default: every day 03:00); '' for none")
    parser.add_argument("--timezone", default="UTC", help="the schedule's time zone (default: UTC)")
    parser.add_argument("--profile", default=None, help="default profile of the runs (default: params.yaml as it is)")
    parser.add_argument("--study", default=None, help="default study of the runs")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="default Hydra override (repeatable)")
    parser.add_argument("--stage", action="append", choices=STAGES, default=None, help="run only these stages (repeatable)")
    parser.add_argument("--force-stage", action="append", choices=STAGES, default=[], help="stage to rerun even if up to date")
    parser.add_argument("--no-promote", action="store_true", help="runs do not promote after evaluate")
    parser.add_argument("--paused", action="store_true", help="create the schedule paused")
    parser.add_argument("--list", action="store_true", help="only list the deployment's latest runs and exit")
    args = parser.parse_args(argv)
    if args.list:
        print(run_listing(f"ltta-pipeline/{args.name}"))
        return 0
    spec = DeploymentSpec(
        project_dir=args.project_dir.resolve(), name=args.name, pool=args.pool, queue=args.queue, cron=args.cron or None,
        timezone=args.timezone, profile=args.profile, study=args.study, overrides=args.override, stages=args.stage,
        force=args.force_stage, promote=not args.no_promote, paused=args.paused,
    )
    deployment_id = deploy(spec)
    print(f"deployment ltta-pipeline/{spec.name} ({deployment_id}) on pool {spec.pool!r} queue {spec.queue!r}, "
          f"schedule {spec.cron or 'none'}; start a worker in {spec.project_dir}: "
          f"prefect worker start --pool {spec.pool} --type process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
