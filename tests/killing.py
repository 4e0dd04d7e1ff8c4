"""What the kill tests share (``test_kill.py``: `dvc repro`, ``test_kill_flow.py``: the Prefect
flow): the params, the SIGKILLs at seeded random moments, the comparison with an uninterrupted run,
and that uninterrupted run itself, made once per session (``conftest.kill_reference``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import ROOT, built_once, make_project, tiny_params

BIN = Path(sys.executable).parent
SEED = 20261206
KILLS = 5
RESTART_SECONDS = 4.0  # what a rerun spends before it reaches the stage it was killed in (DVC's checks)
# Outputs whose bytes follow from the inputs alone (the curves, the reports and the model files'
# training histories also hold timings: the models are compared by their weights).
DETERMINISTIC = ("data/prepared", "data/corrupted/test", "data/loss", "policies/faa.json", "metrics/target.json",
                 "metrics/predictor.json", "metrics/feature_head.json", "metrics/search.json", "metrics/tta")
MODELS = ("models/target.pt", "models/predictor.pt")


def params() -> dict:
    return tiny_params(train_target={"epochs": 4})


def outs(project: Path) -> dict[str, str]:
    """What dvc.lock records for each deterministic output (md5, or the directory's .dir md5)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    found = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in DETERMINISTIC:
                found[out["path"]] = out["md5"]
    return found


def same_weights(a: Path, b: Path) -> None:
    """Every tensor of the two projects' model files is bitwise equal."""
    import torch

    for rel in MODELS:
        sa, sb = (torch.load(p / rel, weights_only=True)["state_dict"] for p in (a, b))
        assert sa.keys() == sb.keys(), rel
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{rel}: weights differ"


def start(cmd: list[str], project: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    api = prefect_api()
    if api:
        env["PREFECT_API_URL"] = api  # the test's server: no throwaway server per flow process
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the kill takes the stage with it


def prefect_api() -> str | None:
    """The Prefect API of the running test harness, if one is up (the flow test's)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def run_to_end(cmd: list[str], project: Path, log: Path, timeout: float = 900) -> float:
    t0 = time.monotonic()
    proc = start(cmd, project, log)
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    return time.monotonic() - t0


def kill_at_random_moments(cmd: list[str], project: Path, log: Path, span: float) -> list[str]:
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
        proc = start(cmd, project, log)
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


def reference_run(shared: Path) -> tuple[Path, float]:
    """One uninterrupted `dvc repro` of :func:`params` in ``shared/project`` and how long it ran.

    Both kill tests end equal to it (the flow's tasks are `dvc repro` of the same stages); under
    pytest-xdist the first worker to need it runs it and the other waits (a file lock), so a
    session runs it once.
    """

    def build(folder: Path) -> None:
        project = make_project(folder / "project", params())
        span = run_to_end([str(BIN / "dvc"), "repro"], project, folder / "reference.log")
        (folder / ".span").write_text(f"{span}\n")

    shared = built_once(shared, build)
    return shared / "project", float((shared / ".span").read_text())


def check_ends_as_the_reference(killed: Path, reference: Path, hit: list[str]) -> None:
    """The killed-and-rerun project's outputs are the uninterrupted run's, and the kills landed."""
    assert outs(killed) == outs(reference)
    same_weights(killed, reference)
    assert not list(killed.rglob("*.tmp")), "a temporary survived the rerun"
    assert len(hit) >= KILLS - 1, "the kills should land while the pipeline runs"
