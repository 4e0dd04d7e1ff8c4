"""Run state: checkpoints that resume exactly, private random streams, and fingerprints.

Three trainers keep state here, and each used to have its own variant of it: the target trainer
(:mod:`ltta.training.target`, which the policy search's fold models also train through), the loss
predictor's trainer (:mod:`ltta.predictor.trainer`) and SoDeep's sorter (:mod:`ltta.predictor.sodeep`);
the search's shared fold-model cache (:mod:`ltta.search.model_cache`) and the stages that name a
checkpoint or a cache entry key their files with the same fingerprints.

- **Fingerprints** say what a result depends on, so a checkpoint is resumed, and a cached model
  reused, only under the same settings and data: :func:`stable_hash` of plain settings,
  :func:`data_digest` of tensors, :func:`file_digest` of a file.
- **Random streams**: dropout and weight initialisation draw from torch's global generators.
  :func:`private_rng` seeds them for a block and gives the caller's state back afterwards, so a
  run neither depends on nor disturbs what ran before it; :func:`rng_state` and
  :func:`set_rng_state` carry them, and the trainer's explicit generator, across a resume.
- **Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`) are written atomically and
  refused, with the differing settings named, when they belong to another run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltta.io import load_error_reason, save_torch

#: Version of the trainer's checkpoint layout. 2: the training data's digest is
#: :func:`data_digest` of a strided sample (format 1 quantised the sample to 8 bits first).
CHECKPOINT_FORMAT = 2


class CheckpointMismatchError(RuntimeError):
    """A checkpoint exists at the path but was written by a run with other settings or data."""


# ---------------------------------------------------------------- fingerprints


def stable_hash(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys;
    values JSON cannot hold are written as ``str``): the same settings give the same hash in any
    process, on any machine."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def data_digest(*tensors: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes: equal only for identical data, whichever
    device the tensors live on. Callers that fingerprint a large resident set pass a strided
    sample of it (the target trainer does), which still catches another dataset or split."""
    h = hashlib.sha256()
    for t in tensors:
        arr = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (e.g. the policy file a training run applies)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- random streams


def cuda_index(device: torch.device) -> int:
    """The CUDA device's index (the current device for a bare ``cuda``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def private_rng(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """Fork torch's global CPU generator (and ``device``'s CUDA generator) for the block, seeded with
    ``seed`` when given; the caller's random state is back afterwards, whatever the block drew."""
    devices = [cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(seed)
        yield


def rng_state(device: torch.device, generator: torch.Generator) -> dict[str, Any]:
    """The global CPU (and ``device``'s CUDA) generator state and ``generator``'s, for a checkpoint."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device, generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | os.PathLike[str], *, fingerprint: dict[str, Any], device: torch.device, epoch: int, **state: Any
) -> None:
    """Write a checkpoint atomically (a kill mid-write leaves the previous one): the run's
    ``fingerprint``, the device type its random streams belong to, the last finished ``epoch``, and
    ``state`` (state dicts, RNG state, history: tensors and plain containers only)."""
    save_torch(path, {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "device_type": device.type,
                      "epoch": epoch, **state})  # fmt: skip


def load_checkpoint(
    path: Path, expected: dict[str, Any], device: torch.device, resumable: Collection[str] = ()
) -> dict[str, Any]:
    """The checkpoint at ``path`` if this run may resume it: written in this format, by a run whose
    fingerprint equals ``expected`` except in the ``resumable`` keys, on the same device type.
    Anything else raises :class:`CheckpointMismatchError` naming what differs and the fix."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or crafted file
        raise CheckpointMismatchError(
            f"checkpoint {path} cannot be read ({load_error_reason(exc)}); delete it to train from scratch."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"{path} is not a checkpoint of this trainer (format {CHECKPOINT_FORMAT}); delete it to train from scratch."
        )
    stored = ckpt["fingerprint"]
    diffs = [
        f"{k}: checkpoint {stored.get(k)!r} vs now {expected.get(k)!r}"
        for k in sorted(set(stored) | set(expected))
        if stored.get(k) != expected.get(k) and k not in resumable
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by a run with different settings or data ({'; '.join(diffs)}). "
            f"Delete it to start this run from scratch, or restore the original settings to resume it."
        )
    if ckpt["device_type"] != device.type:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written on {ckpt['device_type']} but this run is on {device.type}; the random "
            f"streams cannot carry over. Resume on {ckpt['device_type']}, or delete the checkpoint to start over."
        )
    return ckpt
