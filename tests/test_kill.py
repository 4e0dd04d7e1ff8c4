"""Kill anywhere: `dvc repro` and the Prefect flow, SIGKILLed at seeded random moments and rerun,
end exactly where an uninterrupted run ends.

Every stage writes to a temporary name and renames, checkpoints what it trains, and sweeps the
temporaries of dead writers; DVC records a stage only once it has finished. So a kill at any
moment costs at most the unfinished stage's unsaved work, and the rerun's outputs are the
uninterrupted run's, byte for byte on CPU: the check compares the md5s dvc.lock records for the
data, the policy and the metrics files, and the two models' weights tensor by tensor (their files
also hold the epochs' timings), not rounded figures.

Slow (two pipelines and the kills, minutes on 2 cores): ``pytest -m slow tests/test_kill.py``,
which ``.ci/run`` runs after the main suite.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, make_project, tiny_params

BIN = Path(sys.executable).parent
SEED = 20261206
KILLS = 5
RESTART_SECONDS = 4.0  # what a rerun spends before it reaches the stage it was killed in (DVC's checks)
# Outputs whose bytes follow from the inputs alone (the curves, the reports and the model files'
# training histories also hold timings: the models are compared by their weights).
DETERMINISTIC = ("data/prepared", "data/corrupted/test", "data/loss", "policies/faa.json", "metrics/target.json",
                 "metrics/predictor.json", "metrics/feature_head.json", "metrics/search.json", "metrics/tta")
MODELS = ("models/target.pt", "models/predictor.pt")


def _params() -> dict:
    return tiny_params(train_target={"epochs": 4})


def _outs(project: Path) -> dict[str, str]:
    """What dvc.lock records for each deterministic output (md5, or the directory's .dir md5)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    found = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in DETERMINISTIC:
                found[out["path"]] = out["md5"]
    return found


def _same_weights(a: Path, b: Path) -> None:
    """Every tensor of the two projects' model files is bitwise equal."""
    import torch

    for rel in MODELS:
        sa, sb = (torch.load(p / rel, weights_only=True)["state_dict"] for p in (a, b))
        assert sa.keys() == sb.keys(), rel
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{rel}: weights differ"


def _start(cmd: list[str], project: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    api = _prefect_api()
    if api:
        env["PREFECT_API_URL"] = api  # the test's server: no throwaway server per flow process
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the kill takes the stage with it


def _prefect_api() -> str | None:
    """The Prefect API of the running test harness, if one is up (the flow test's)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _run_to_end(cmd: list[str], project: Path, log: Path, timeout: float = 900) -> float:
    t0 = time.monotonic()
    proc = _start(cmd, project, log)
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    return time.monotonic() - t0


def _kill_at_random_moments(cmd: list[str], project: Path, log: Path, span: float) -> list[str]:
    """Run ``cmd`` again and again, SIGKILLing its process group, ``KILLS`` times.

    The moments are seeded random points of an uninterrupted run's timeline (``span`` seconds),
    sorted; each run is killed when its share of the timeline has passed (a restart skips the
    finished stages, so the kills spread over the whole pipeline). Returns, per kill that landed
    while the command still ran, the stage it hit.
    """
    rng = random.Random(SEED)
    moments = sorted(rng.uniform(0.02, 0.98) * span for _ in range(KILLS))
    hit, previous = [], 0.0
    for moment in moments:
        proc = _start(cmd, project, log)
        try:
            proc.wait(timeout=max(2.0, moment - previous + RESTART_SECONDS))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stages = [line.split("'")[1] for line in log.read_text().splitlines() if line.startswith("Running stage '")]
            hit.append(stages[-1] if stages else "start-up")
            with log.open("a") as fh:
                fh.write("\n==== SIGKILL ====\n")
        previous = moment
    return hit


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_dvc_repro_killed_anywhere_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = make_project(tmp_path / "reference", _params())
    span = _run_to_end([str(BIN / "dvc"), "repro"], reference, tmp_path / "reference.log")

    killed = make_project(tmp_path / "killed", _params())
    log = tmp_path / "killed.log"
    hit = _kill_at_random_moments([str(BIN / "dvc"), "repro"], killed, log, span)
    _run_to_end([str(BIN / "dvc"), "repro"], killed, log)
    print(f"dvc repro: survived {len(hit)} of {KILLS} SIGKILLs, in {hit} (uninterrupted run {span:.0f} s)")
    assert _outs(killed) == _outs(reference)
    _same_weights(killed, reference)
    assert not list(killed.rglob("*.tmp")), "a temporary survived the rerun"
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=killed, capture_output=True, text=True, timeout=300)
    assert "up to date" in status.stdout, status.stdout
    assert len(hit) >= KILLS - 1, "the kills should land while the pipeline runs"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_prefect_flow_killed_anywhere_ends_as_an_uninterrupted_run(tmp_path: Path, prefect_server: None) -> None:
    reference = make_project(tmp_path / "reference", _params())
    flow = [sys.executable, "-m", "pipeline.flow", "--project-dir", str(reference), "--no-promote"]
    span = _run_to_end(flow, reference, tmp_path / "reference.log")

    killed = make_project(tmp_path / "killed", _params())
    log = tmp_path / "killed.log"
    flow = [sys.executable, "-m", "pipeline.flow", "--project-dir", str(killed), "--no-promote"]
    hit = _kill_at_random_moments(flow, killed, log, span)
    _run_to_end(flow, killed, log)
    print(f"pipeline.flow: survived {len(hit)} of {KILLS} SIGKILLs, in {hit} (uninterrupted run {span:.0f} s)")
    assert _outs(killed) == _outs(reference)
    _same_weights(killed, reference)
    assert not list(killed.rglob("*.tmp"))
    assert len(hit) >= KILLS - 1
