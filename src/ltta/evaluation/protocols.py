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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ltta.registry import Registry


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
