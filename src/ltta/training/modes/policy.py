"""Mode ``policy``: Fast AutoAugment's training (Lim et al., NeurIPS 2019), cross-entropy on batches
augmented by a searched policy.

The policy is the caller's ``extra_augment`` (a :class:`~ltta.transforms.policy.CompiledPolicy`),
applied before crop/flip (:mod:`ltta.training.preparation`); FAA's WRN-40-2 recipe adds
``cutout=16``. The loss is ``standard``'s.
"""

from __future__ import annotations

from ltta.training.mode import TrainMode
from ltta.training.modes.standard import cross_entropy_loss

MODE = TrainMode(cross_entropy_loss, needs_extra_augment=True)
