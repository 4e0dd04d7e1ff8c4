"""The ltta pipeline as a Prefect flow: the DVC stages in order (ltta.stages.ORDER), each a retried task.

Each task runs ``dvc repro --single-item <stage>``, so DVC still decides what is stale and an
up-to-date stage costs nothing. The flow opens a parent MLflow run and exports its id
(``LTTA_PARENT_RUN_ID``) so every stage's run nests under it. Given a profile, a study or Hydra
overrides, it first composes params.yaml from ``conf/`` (``ltta params``, as ``dvc exp run -S``
would); after ``evaluate`` it runs ``ltta promote`` and publishes ``reports/results.md`` as a
Prefect Markdown artifact (key ``ltta-results``) with a link to the MLflow parent run.

A stage is retried only when a rerun may pass: killed by a signal (the OOM killer), DVC's lock
held by another run. When ltta itself refused the stage's input (exit 1) or its params (exit 2),
the same run would fail the same way, so the flow stops at once; ``main()`` then prints that
stage's error as one line, the tracebacks only with ``--debug``.

    python -m pipeline.flow                 # one run, now
    python -m pipeline.flow --profile cifar10 --study augmix --override train_target.epochs=5
    python -m pipeline.deploy               # a deployment on the work pool "gpu" (then: prefect worker start)
    python -m pipeline.serve --cron "0 3 * * *"   # or serve on a schedule from this process
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from ltta import tracking
from ltta.stages import ORDER

STAGES: tuple[str, ...] = ORDER  # the DVC stages, in dependency order


#: Exit codes of an ``ltta`` command that a rerun cannot change: its error for bad input (1) and
#: for bad params or usage (2) (ltta.cli's EXIT_FAILURE, EXIT_USAGE).
NO_RETRY_EXITS = frozenset({1, 2})

# DVC exits 255 whatever the command did; the command's own code is only in its message
# (dvc.stage.exceptions.StageCmdFailedError): "failed to run: ltta train-target, exited with 1".
_DVC_CMD_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")


class StageFailed(RuntimeError):
    """A step of the flow failed; ``exit_code`` is its command's own (None: DVC failed around it)."""

    def __init__(self, stage: str, exit_code: int | None, detail: str) -> None:
        super().__init__(f"{stage} failed{_how(exit_code)}: {detail}")
        self.stage, self.exit_code, self.detail = stage, exit_code, detail


def _how(exit_code: int | None) -> str:
    if exit_code is None:
        return ""
    return f" (killed by signal {-exit_code})" if exit_code < 0 else f" (exit {exit_code})"


def command_exit_code(dvc_stderr: str) -> int | None:
    """The stage command's exit code as DVC reports it (negative: killed by that signal), or None."""
    codes = _DVC_CMD_EXIT.findall(dvc_stderr)
    return int(codes[-1]) if codes else None


def stage_error(stderr: str) -> str:
    """What went wrong, without the MLflow and DVC lines around it: ltta's own ``error: ...``
    message (with its indented lines, one per bad params key), else DVC's last ERROR line."""
    lines = stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    if start is not None:
        end = next((j for j in range(start + 1, len(lines)) if not lines[j][:1].isspace()), len(lines))
        return "\n".join(lines[start:end]).removeprefix("error: ")
    errors = [line for line in lines if line.startswith("ERROR: ")] or lines or ["(no output on stderr)"]
    return errors[-1].removeprefix("ERROR: ")


def should_retry(exc: BaseException | None) -> bool:
    """Retry unless the stage's command itself refused its input or params (``NO_RETRY_EXITS``):
    a kill, an OOM kill or DVC's lock contention may pass next time; that verdict would not."""
    return not (isinstance(exc, StageFailed) and exc.exit_code in NO_RETRY_EXITS)


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn`` (a plain function: Prefect calls only those): the failed state's exception decides."""
    return should_retry(state.result(raise_on_failure=False))


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
    _ltta(["check-params"], project_dir, "check-params")


def _ltta(args: list[str], project_dir: str, step: str, env: dict[str, str] | None = None) -> str:
    """Run ``ltta <args>`` in the project; its stdout, or :class:`StageFailed` with its own error."""
    proc = subprocess.run([sys.executable, "-m", "ltta.cli", *args], cwd=project_dir, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise StageFailed(step, proc.returncode, stage_error(proc.stderr or proc.stdout))
    return proc.stdout


@task(task_run_name="compose-params")
def compose_params(project_dir: str, overrides: list[str]) -> str:
    """``ltta params <overrides>``: params.yaml from conf/ with the run's profile, study and overrides."""
    return _ltta(["params", *overrides], project_dir, "compose-params").strip()


#: Each retry of a stage waits twice as long as the one before (10 s, 20 s), with jitter.
STAGE_RETRIES = 2
STAGE_RETRY_DELAYS = exponential_backoff(backoff_factor=10)


@task(retries=STAGE_RETRIES, retry_delay_seconds=STAGE_RETRY_DELAYS, retry_jitter_factor=0.2,
      retry_condition_fn=_retry_condition, task_run_name="dvc-{stage}")
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
        logger.error("stage %s: dvc exited %d; its stderr:\n%s", stage, proc.returncode, proc.stderr[-4000:])
        raise StageFailed(stage, command_exit_code(proc.stderr), stage_error(proc.stderr))
    return proc.stdout


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), task_run_name="promote")
def promote_models(project_dir: str) -> str:
    """``ltta promote``: champion moves to the new candidate only if it wins on promote.metric."""
    line = _ltta(["promote"], project_dir, "promote", env=_env(None)).strip()
    get_run_logger().info(line)
    return line


def mlflow_run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows a run: a URL on a tracking server, else how to open the local store."""
    if tracking.is_server(uri):
        return f"[{run_id}]({uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"`{run_id}` (local store: `mlflow ui --backend-store-uri {uri}`)"


@task(task_run_name="publish-results")
def publish_results(project_dir: str, parent_link: str, promotion: str | None) -> str:
    """``reports/results.md`` as the flow run's Markdown artifact ``ltta-results`` (Prefect UI: Artifacts)."""
    table = (Path(project_dir) / "reports" / "results.md").read_text()
    head = f"**MLflow parent run:** {parent_link}\n\n" + (f"**Promotion:** {promotion}\n\n" if promotion else "")
    return str(create_markdown_artifact(key=RESULTS_ARTIFACT, markdown=head + table,
                                        description="ltta results table of this flow run"))


#: The key of the results table's Prefect artifact (one per flow run, its history under this key).
RESULTS_ARTIFACT = "ltta-results"


def param_overrides(profile: str | None, study: str | None, overrides: list[str] | None) -> list[str]:
    """The Hydra overrides a run composes params.yaml with (empty: keep params.yaml as it is)."""
    chosen = [f"profile={profile}"] if profile else []
    chosen += [f"study={study}"] if study else []
    return chosen + list(overrides or [])


@flow(name="ltta-pipeline", log_prints=True)
def ltta_pipeline(project_dir: str = ".", stages: list[str] | None = None, force: bool | list[str] = False,
                  profile: str | None = None, study: str | None = None, overrides: list[str] | None = None,
                  promote: bool = True) -> dict[str, str]:
    """Run the stages in order under one parent MLflow run; returns each step's output.

    ``profile``, ``study`` and ``overrides`` (Hydra syntax, e.g. ``train_target.epochs=5``) compose
    params.yaml first; none of them: params.yaml as it is. ``force``: True reruns every chosen stage,
    a list only those, even when DVC finds them up to date. ``promote``: after ``evaluate``, run
    ``ltta promote`` (a no-op when params register no models).
    """
    import mlflow

    root = Path(project_dir).resolve()
    chosen = list(stages or STAGES)
    forced = set(chosen) if force is True else set(force or [])
    unknown = [s for s in [*chosen, *forced] if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    outputs: dict[str, str] = {}
    composed = param_overrides(profile, study, overrides)
    if composed:
        outputs["compose_params"] = compose_params(str(root), composed)
    check_params(str(root))
    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    params = _params(root)
    # The stages' experiment (tracking.experiment): the parent run and its stage runs nest in one.
    exp = mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(run_name="pipeline", tags={"ltta.flow": "ltta-pipeline", "mlflow.source.git.commit": tracking.git_commit(root)}) as run:
        for stage in chosen:
            outputs[stage] = run_stage(stage, str(root), run.info.run_id, stage in forced)
    if "evaluate" in chosen:
        registers = params.tracking.register_models and "learned" in params.evaluate.methods
        promotion = promote_models(str(root)) if promote and registers else None
        if promotion:
            outputs["promote"] = promotion
        outputs["publish_results"] = publish_results(str(root), mlflow_run_link(uri, exp.experiment_id, run.info.run_id), promotion)
    return outputs


def _params(root: Path) -> Any:
    """params.yaml, checked by check-params already: the experiment, and whether evaluate registers a candidate."""
    from ltta.config import load_params

    return load_params(root / "params.yaml")


def _one_line(text: str) -> str:
    """A message's lines as one (``params.yaml is invalid: a.b: ...; c.d: ...``): the last line of the run's output."""
    head, *rest = [line.strip() for line in text.strip().splitlines() if line.strip()] or [""]
    return " ".join([head, "; ".join(rest)]) if rest else head


class _NoTraceback(logging.Filter):
    """Drops the traceback Prefect logs with each failure (task, then flow) from the console only:
    the API handler, on Prefect's own loggers, has sent the record to the server (the UI) before."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _quiet_console() -> None:
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def main(argv: list[str] | None = None) -> int:
    """Run the flow; a failure is one line on stderr (the step and its error) and exit 1, or 2 for bad params."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.flow", description="Run the ltta pipeline once as a Prefect flow.")
    parser.add_argument("--project-dir", default=".", help="project root holding dvc.yaml (default: .)")
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only these stages (repeatable)")
    parser.add_argument("--force", action="store_true", help="rerun every chosen stage even when DVC finds it up to date")
    parser.add_argument("--force-stage", action="append", choices=STAGES, default=[],
                        help="rerun this stage even when DVC finds it up to date (repeatable)")
    parser.add_argument("--profile", default=None, help="compose params.yaml with this profile first (conf/profile/)")
    parser.add_argument("--study", default=None, help="compose params.yaml with this study first (conf/study/)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override composed into params.yaml first, e.g. train_target.epochs=5 (repeatable)")
    parser.add_argument("--no-promote", action="store_true", help="do not run `ltta promote` after evaluate")
    parser.add_argument("--debug", action="store_true", help="print the tracebacks of a failure (Prefect's and the flow's)")
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_console()
    try:
        ltta_pipeline(project_dir=args.project_dir, stages=args.stage, force=True if args.force else args.force_stage,
                      profile=args.profile, study=args.study, overrides=args.override, promote=not args.no_promote)
    except Exception as exc:  # the flow's failure, whatever raised it: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        what = str(exc) if isinstance(exc, StageFailed) else f"ltta-pipeline failed: {type(exc).__name__}: {exc}"
        print(f"error: {_one_line(what)}" + ("" if args.debug else " (--debug prints the tracebacks)"), file=sys.stderr)
        return 2 if isinstance(exc, StageFailed) and exc.exit_code == 2 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
