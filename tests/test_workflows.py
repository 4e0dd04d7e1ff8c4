"""The GitHub workflows are valid (actionlint, with the self-hosted `gpu` label declared)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_workflows_pass_actionlint() -> None:
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.fail("actionlint is not installed: pip install -e '.[dev]'")
    proc = subprocess.run([exe, "-no-color"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {p.name for p in (ROOT / ".github" / "workflows").glob("*.yml")}
    assert {"ci.yml", "gpu.yml"} <= names


def test_gpu_workflow_targets_self_hosted_gpu_runner() -> None:
    text = (ROOT / ".github" / "workflows" / "gpu.yml").read_text()
    assert "runs-on: [self-hosted, gpu]" in text and 'bash pipeline/gpu_job.sh "${PROFILE}"' in text


def test_gpu_job_runs_the_runner_steps_in_order() -> None:
    """pull, GPU tests, short run, report files, push, promote, job summary (tests/test_team.py runs it)."""
    script = (ROOT / "pipeline" / "gpu_job.sh").read_text()
    body = script[script.index("set -euo pipefail"):]
    steps = ["dvc pull", "pytest -m gpu", "ltta params", "dvc repro", "cp -r reports", "dvc push", "ltta promote",
             "GITHUB_STEP_SUMMARY"]
    at = [body.index(s) for s in steps]
    assert at == sorted(at), dict(zip(steps, at))
    assert subprocess.run(["bash", "-n", str(ROOT / "pipeline" / "gpu_job.sh")]).returncode == 0
