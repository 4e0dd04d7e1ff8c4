"""Kill anywhere, the Prefect flow: `python -m pipeline.flow` SIGKILLed at seeded random moments and
rerun ends exactly where an uninterrupted `dvc repro` of the same params ends (see ``test_kill.py``;
its own file so that ``pytest -n 2`` runs the two kill tests on two workers, one reference run for both).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.killing import KILLS, check_ends_as_the_reference, kill_at_random_moments, params, run_to_end


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_prefect_flow_killed_anywhere_ends_as_an_uninterrupted_run(kill_reference: tuple[Path, float], tmp_path: Path,
                                                                       prefect_server: None) -> None:
    reference, span = kill_reference
    killed = make_project(tmp_path / "killed", params())
    log = tmp_path / "killed.log"
    flow = [sys.executable, "-m", "pipeline.flow", "--project-dir", str(killed), "--no-promote"]
    hit = kill_at_random_moments(flow, killed, log, span)
    run_to_end(flow, killed, log)
    print(f"pipeline.flow: survived {len(hit)} of {KILLS} SIGKILLs, in {hit} (uninterrupted dvc repro {span:.0f} s)")
    check_ends_as_the_reference(killed, reference, hit)
