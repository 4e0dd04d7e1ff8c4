"""One run of a stage per workspace: a second ``ltta <stage>`` started beside a running one is refused.

``dvc repro`` already refuses a second ``dvc repro`` in the same workspace (DVC's own lock); this
covers stages started directly, from a Prefect task, a notebook or a second terminal, where two
runs would train twice and race on the same outputs (each write is atomic, so nothing is torn,
but the last writer wins and the checkpoint is shared). The lock is an ``flock`` on a file under
``checkpoints/.locks/``: the kernel drops it when the holder exits, so a killed run never leaves
a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


class StageBusyError(RuntimeError):
    """Another process holds this stage's lock in this workspace."""


@contextlib.contextmanager
def stage_lock(stage: str, root: Path = Path(".")) -> Iterator[Path]:
    """Hold ``stage``'s lock in the workspace ``root`` for the block; raise StageBusyError if taken."""
    path = root / "checkpoints" / ".locks" / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "a process"
            raise StageBusyError(
                f"another `ltta {stage}` ({holder}) is running in this workspace; wait for it to finish "
                f"(or stop it), then rerun"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        try:
            yield path
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
