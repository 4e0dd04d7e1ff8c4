"""The Prefect flow's failures: bad params stop it before any stage, a stage that refused its input
or params is not retried, and `main()` reports it in one line. (The flow running the whole pipeline
through DVC under a parent MLflow run, on a Prefect worker, and a second run finding everything up
to date: tests/test_team.py.)"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from tests.conftest import make_project, tiny_params



def test_flow_stops_on_bad_params_before_any_stage(tmp_path: Path, prefect_server: None, mlflow_server: str, monkeypatch) -> None:
    from pipeline.flow import ltta_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    raw = tiny_params()
    raw["train_target"]["epochs"] = -1
    project = make_project(tmp_path / "bad", raw)
    with pytest.raises(Exception, match="train_target.epochs"):
        ltta_pipeline(project_dir=str(project))
    assert not (project / "data").exists() and not (project / "dvc.lock").exists()


# DVC 3's stderr for a failed stage command (dvc.stage.exceptions.StageCmdFailedError), as captured
# from `dvc repro --single-item prepare_data` with a missing data.path, bad params, and a killed command.
DVC_EXIT_1 = """2026/12/05 11:24:51 INFO mlflow.store.db.utils: Creating initial MLflow database tables...
error: prepare-data: data.path nowhere/missing.npz is not a file: point it at an .npz with x_train, y_train[, x_test, y_test]
ERROR: failed to reproduce 'prepare_data': failed to run: ltta prepare-data, exited with 1
"""
DVC_EXIT_2 = """error: params.yaml is invalid:
  train_target.epochs: Input should be greater than or equal to 1 (got -1)
ERROR: failed to reproduce 'prepare_data': failed to run: ltta prepare-data, exited with 2
"""
DVC_KILLED = "ERROR: failed to reproduce 'prepare_data': failed to run: sh -c 'kill -9 $$', exited with -9\n"
DVC_NO_DEP = "ERROR: failed to reproduce 'train_target': [Errno 2] No such file or directory: '/p/data/prepared'\n"
DVC_LOCKED = "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly.\n"


@pytest.mark.parametrize(
    "stderr, code, retry",
    [(DVC_EXIT_1, 1, False), (DVC_EXIT_2, 2, False), (DVC_KILLED, -9, True), (DVC_NO_DEP, None, True), (DVC_LOCKED, None, True),
     ("ERROR: failed to run: ltta evaluate, exited with 137\n", 137, True)],  # a shell's report of an OOM kill
)
def test_only_a_stage_that_may_pass_next_time_is_retried(stderr: str, code: int | None, retry: bool) -> None:
    from prefect.states import Failed

    from pipeline.flow import StageFailed, _retry_condition, command_exit_code, run_stage, should_retry, stage_error

    assert command_exit_code(stderr) == code
    exc = StageFailed("prepare_data", code, stage_error(stderr))
    assert should_retry(exc) is retry
    assert _retry_condition(run_stage, None, Failed(data=exc)) is retry  # what Prefect calls, on the state it builds
    assert run_stage.retries == 2 and run_stage.retry_condition_fn is _retry_condition


def test_other_failures_are_retried() -> None:
    from pipeline.flow import should_retry

    assert should_retry(OSError("connection reset")) and should_retry(None)


def test_stage_error_is_ltta_own_message() -> None:
    from pipeline.flow import stage_error

    assert stage_error(DVC_EXIT_1).startswith("prepare-data: data.path nowhere/missing.npz is not a file")
    assert stage_error(DVC_EXIT_2) == (
        "params.yaml is invalid:\n  train_target.epochs: Input should be greater than or equal to 1 (got -1)"
    )
    assert stage_error(DVC_KILLED) == "failed to reproduce 'prepare_data': failed to run: sh -c 'kill -9 $$', exited with -9"
    assert stage_error("") == "(no output on stderr)"


@pytest.mark.parametrize("debug", [False, True])
def test_main_reports_a_failed_stage_in_one_line(monkeypatch, capsys, debug: bool) -> None:
    import pipeline.flow as flow

    def failing(**_: object) -> None:
        raise flow.StageFailed("check-params", 2, flow.stage_error(DVC_EXIT_2))

    monkeypatch.setattr(flow, "ltta_pipeline", failing)
    monkeypatch.setattr(flow, "_quiet_console", lambda: None)  # global logging state: tested below
    assert flow.main(["--debug"] if debug else []) == 2
    err = capsys.readouterr().err
    assert ("Traceback" in err) is debug
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: check-params failed (exit 2): params.yaml is invalid: train_target.epochs: ")
    assert "(got -1)" in last


def test_main_exits_1_for_an_unexpected_error(monkeypatch, capsys) -> None:
    import pipeline.flow as flow

    def failing(**_: object) -> None:
        raise ConnectionError("mlflow server unreachable")

    monkeypatch.setattr(flow, "ltta_pipeline", failing)
    monkeypatch.setattr(flow, "_quiet_console", lambda: None)
    assert flow.main([]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: ltta-pipeline failed: ConnectionError: mlflow server unreachable (--debug prints the tracebacks)"
    )


def test_console_filter_drops_only_the_traceback() -> None:
    from pipeline.flow import _NoTraceback

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed: %r", ("boom",),
                                   sys.exc_info())
    assert _NoTraceback().filter(record) and record.exc_info is None
    assert logging.Formatter().format(record) == "Task run failed: 'boom'"
