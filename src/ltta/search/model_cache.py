"""Fold models shared between search workers through files, so each is trained once.

Every worker needs the model trained on a fold's D_M before it can score trials on that fold.
The first worker to reach a fold *claims* it (a lock file created with ``O_EXCL``), trains, and
saves the model atomically; the others skip to a fold nobody is training, or wait, and then load
the saved file. A claim is kept alive by touching the lock file every ``beat`` seconds while the
model trains; a lock not touched for ``stale_after`` seconds, or held by a process on this host
that no longer exists, belongs to a killed worker and is taken over.

A saved model is its ``state_dict`` only, loaded with ``weights_only=True`` into a module made by
the caller's ``build`` (the architecture and its arguments): the cache sits on shared storage that
other users and machines write to, so unpickling whole modules from it would run their code.

Waiting on a live claim (rather than every worker training every fold) is what lets N workers
train N folds at once. The rare race when two workers take over the same stale lock only costs
a duplicate training: the model files are written atomically and keyed by everything that
determines them, so either copy is the same model.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ltta.io import load_error_reason, pid_alive, save_torch


class FoldModelCache:
    """Fold models under ``directory``, named ``fold{f}-{key}.pt``.

    ``key`` must change whenever the trained model would (training settings, data, fold
    split); :func:`ltta.checkpoint.data_digest` and the caller's settings hash
    (:func:`ltta.checkpoint.stable_hash`) make it. ``build()`` returns an
    untrained module of the fold models' architecture, the one a saved state dict is loaded into.
    """

    def __init__(self, directory: str | os.PathLike[str], build: Callable[[], nn.Module], *,
                 stale_after: float = 120.0, beat: float = 5.0) -> None:
        if not callable(build):
            raise TypeError(f"build must be a function returning the fold models' module, got {build!r}")
        if not 0 < beat < stale_after:
            raise ValueError(f"need 0 < beat < stale_after, got beat={beat}, stale_after={stale_after}")
        self.directory = Path(directory)
        self.build = build
        self.stale_after = stale_after
        self.beat = beat
        self._me = {"host": socket.gethostname(), "pid": os.getpid()}

    def path(self, fold: int, key: str) -> Path:
        return self.directory / f"fold{fold}-{key}.pt"

    def load(self, fold: int, key: str, device: torch.device) -> nn.Module | None:
        """The cached model of ``fold`` on ``device``, or None if no worker has saved it yet."""
        path = self.path(fold, key)
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
                raise ValueError("not a fold-model file (no state_dict)")
            model = self.build().to(device)
            model.load_state_dict(saved["state_dict"])
        except Exception as exc:  # a crafted pickle fails in weights_only's unpickler, before any of its code runs
            raise RuntimeError(f"cached fold model {path} is unreadable or not a state dict ({load_error_reason(exc)}); "
                               "delete it to retrain the fold model") from exc
        return model.eval()

    def save(self, fold: int, key: str, model: nn.Module) -> None:
        """Save ``model``'s weights and buffers (atomically: a killed save leaves no file)."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_torch(self.path(fold, key), {"state_dict": state})

    def _lock_is_stale(self, lock: Path) -> bool:
        try:
            age = time.time() - lock.stat().st_mtime
            holder = json.loads(lock.read_text() or "{}")
        except FileNotFoundError:
            return False  # released meanwhile: not stale, simply free
        except (OSError, ValueError):
            return False  # being written right now
        if holder.get("host") == self._me["host"] and isinstance(holder.get("pid"), int):
            if not pid_alive(holder["pid"]):
                return True
        return age > self.stale_after

    @contextlib.contextmanager
    def claim(self, fold: int, key: str) -> Iterator[bool]:
        """Try to claim the training of ``fold``; yields whether this process holds the claim.

        While held, a thread keeps the lock fresh; leaving the block releases it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = self.path(fold, key).with_suffix(".lock")
        if lock.exists() and self._lock_is_stale(lock):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            yield False
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({**self._me, "since": time.time()}))
        stop = threading.Event()

        def keep_fresh() -> None:
            while not stop.wait(self.beat):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(lock)

        beater = threading.Thread(target=keep_fresh, name=f"fold{fold}-claim", daemon=True)
        beater.start()
        try:
            yield True
        finally:
            stop.set()
            beater.join()
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
