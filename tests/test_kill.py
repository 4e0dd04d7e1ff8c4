"""Kill anywhere: `dvc repro` and the Prefect flow, SIGKILLed at seeded random moments and rerun,
end exactly where an uninterrupted run ends.

Every stage writes to a temporary name and renames, checkpoints what it trains, and sweeps the
temporaries of dead writers; DVC records a stage only once it has finished. So a kill at any
moment costs at most the unfinished stage's unsaved work, and the rerun's outputs are the
uninterrupted run's, byte for byte on CPU: the check compares the md5s dvc.lock records for the
data, the policy and the metrics files, and the two models' weights tensor by tensor (their files
also hold the epochs' timings), not rounded figures.

Slow (two pipelines and the kills, minutes on 2 cores): ``pytest -m slow tests/test_kill.py
tests/test_kill_flow.py`` (the flow's kills), which ``.ci/run`` runs after the main suite. The
uninterrupted run is made once for both (``kill_reference``); the helpers are ``tests/killing.py``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.killing import BIN, KILLS, check_ends_as_the_reference, kill_at_random_moments, params, run_to_end


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_dvc_repro_killed_anywhere_ends_as_an_uninterrupted_run(kill_reference: tuple[Path, float], tmp_path: Path) -> None:
    reference, span = kill_reference
    killed = make_project(tmp_path / "killed", params())
    log = tmp_path / "killed.log"
    hit = kill_at_random_moments([str(BIN / "dvc"), "repro"], killed, log, span)
    run_to_end([str(BIN / "dvc"), "repro"], killed, log)
    print(f"dvc repro: survived {len(hit)} of {KILLS} SIGKILLs, in {hit} (uninterrupted run {span:.0f} s)")
    check_ends_as_the_reference(killed, reference, hit)
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=killed, capture_output=True, text=True, timeout=300)
    assert "up to date" in status.stdout, status.stdout
