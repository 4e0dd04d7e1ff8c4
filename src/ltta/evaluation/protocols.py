"""Named evaluation protocols: the settings under which published test-time adaptation numbers were made.

Test-time adaptation (``bn_adapt``, ``tent``) depends on the batches of the test stream it adapts
on, so its batch size is part of the result, not a memory knob. A protocol names those batches
per method; ``evaluate.batch_sizes`` overrides single methods, and every other method runs at
``evaluate.batch_size`` (where the batch changes only memory and speed, not the numbers).

- ``ltta``: every method at ``evaluate.batch_size`` (this pipeline's default).
- ``tent``: DequanWang/tent ``cfgs/tent.yaml`` and ``cfgs/norm.yaml`` (``TEST.BATCH_SIZE: 200``;
  Adam lr 1e-3, betas (0.9, 0.999), one step, no weight decay: :mod:`ltta.tta.tent`'s constants),
  the model reset before each corruption and severity (the runner resets at every set): the
  setting of the tent README's CIFAR-10-C table.

Every evaluation writes its protocol record (``eval.json``'s ``protocol``, the run's
``ltta.protocol.*`` tags): the data and corrupted-set sources with their md5, the target's source,
weights hash and input convention, images per cell, severities, each method's batch and reset, the
stream order. Two numbers are comparable only where those agree; ``ltta compare`` says where not.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ltta.registry import Registry
from ltta.tracking import PROTOCOL_TAG, flatten


@dataclass(frozen=True)
class Protocol:
    """The per-method test-stream batch sizes of a published setting, and where they come from."""

    batch_sizes: Mapping[str, int] = field(default_factory=dict)
    source: str = ""


PROTOCOLS: Registry[Protocol] = Registry("evaluation protocol")
PROTOCOLS.add("ltta", Protocol({}, "every method at evaluate.batch_size"))
PROTOCOLS.add("tent", Protocol({"tent": 200, "bn_adapt": 200},
                               "DequanWang/tent cfgs/tent.yaml, cfgs/norm.yaml: TEST.BATCH_SIZE 200, reset per set"))


def method_batch_sizes(
    protocol: str, methods: Sequence[str], default: int, overrides: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The test-stream batch of every method: ``overrides``, else the protocol's, else ``default``."""
    chosen = {**PROTOCOLS.get(protocol).batch_sizes, **(overrides or {})}
    return {m: int(chosen.get(m, default)) for m in methods}


def input_convention(model: Any, image_size: int) -> dict[str, Any]:
    """What a target takes and does to it before its first layer: the part of the protocol that
    decides whether two numbers were made on the same inputs (a published model's own mean/std)."""
    from ltta.models.layers import Normalize

    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    out: dict[str, Any] = {"input": f"RGB float [0,1], NCHW, {image_size}x{image_size} px"}
    if norm is None:
        out["normalisation"] = "none inside the model"
    else:
        out["normalisation"] = {"mean": [round(v, 4) for v in norm.mean.flatten().tolist()],
                                "std": [round(v, 4) for v in norm.std.flatten().tolist()]}
    return out


def method_streams(batch_sizes: Mapping[str, int], adapting: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method, the test-stream batch and what is reset between sets (adapting methods only carry state)."""
    return {m: {"batch_size": int(b), "reset": "model and optimiser before each set" if m in adapting else "stateless"}
            for m, b in batch_sizes.items()}


def protocol_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """The record as flat MLflow tags ``ltta.protocol.<a>.<b>`` (lists as JSON), for filtering and comparing runs."""
    return flatten(record, PROTOCOL_TAG, leaf=lambda v: v if isinstance(v, str) else json.dumps(v))


def stream_digest(sets: Sequence[tuple[str, int, Any]]) -> str:
    """md5 of the evaluation stream: each set's name, severity and label sequence, in the order run
    (two runs with the same digest saw the same sets, the same images' labels, in the same order)."""
    digest = hashlib.md5()
    for name, severity, labels in sets:
        digest.update(f"{name}/{severity}:".encode())
        digest.update(labels.detach().to("cpu", dtype=torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def environment(device: Any) -> dict[str, str]:
    """What ran the numbers: the libraries whose kernels make them and the device (bf16 on a GPU, fp32 on CPU)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["device"] += f" ({torch.cuda.get_device_name(device)})"
    for package in ("torchvision", "ltta"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out
