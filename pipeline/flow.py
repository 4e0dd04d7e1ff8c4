"""The ltta pipeline as a Prefect flow: the six DVC stages in order, each a retried task.

Each task runs ``dvc repro --single-item <stage>``, so DVC still decides what is stale and an
up-to-date stage costs nothing. The flow opens a parent MLflow run and exports its id
(``LTTA_PARENT_RUN_ID``) so every stage's run nests under it.

A stage is retried only when a rerun may pass: killed by a signal (the OOM killer), DVC's lock
held by another run. When ltta itself refused the stage's input (exit 1) or its params (exit 2),
the same run would fail the same way, so the flow stops at once; ``main()`` then prints that
stage's error as one line, the tracebacks only with ``--debug``.

    python -m pipeline.flow                 # one run, now
    python -m pipeline.serve --cron "0 3 * * *"   # serve on a schedule (Prefect UI: Deployments)
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

from ltta import tracking

STAGES: tuple[str, ...] = (
    "prepare_data",
    "train_target",
    "build_loss_dataset",
    "train_predictor",
    "search_policy",
    "evaluate",
)


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
    proc = subprocess.run([sys.executable, "-m", "ltta.cli", "check-params"], cwd=project_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed("check-params", proc.returncode, stage_error(proc.stderr or proc.stdout))


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_condition, task_run_name="dvc-{stage}")
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
    parser.add_argument("--force", action="store_true", help="rerun stages even when DVC finds them up to date")
    parser.add_argument("--debug", action="store_true", help="print the tracebacks of a failure (Prefect's and the flow's)")
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_console()
    try:
        ltta_pipeline(project_dir=args.project_dir, stages=args.stage, force=args.force)
    except Exception as exc:  # the flow's failure, whatever raised it: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        what = str(exc) if isinstance(exc, StageFailed) else f"ltta-pipeline failed: {type(exc).__name__}: {exc}"
        print(f"error: {_one_line(what)}" + ("" if args.debug else " (--debug prints the tracebacks)"), file=sys.stderr)
        return 2 if isinstance(exc, StageFailed) and exc.exit_code == 2 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
