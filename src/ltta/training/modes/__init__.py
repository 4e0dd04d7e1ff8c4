"""The training modes, one module each, registered in :data:`~ltta.training.mode.TRAIN_MODES`.

A mode supplies what the trainer cannot know: its extra views of each image, its loss, the
training-only modules it attaches (:class:`~ltta.training.mode.TrainMode`), and the check of its
config keys. Adding one is a module here, its line below, and its keys in
:class:`~ltta.training.config.TrainConfig`.

- ``standard`` (:mod:`~ltta.training.modes.standard`): cross-entropy;
- ``augmix`` (:mod:`~ltta.training.modes.augmix`): AugMix's views and Jensen-Shannon term;
- ``policy`` (:mod:`~ltta.training.modes.policy`): a searched Fast AutoAugment policy;
- ``auxiliary`` (:mod:`~ltta.training.modes.auxiliary`): Auxiliary Training's heads.

The corruption-mixing studies are not a mode: they compose with every mode, as a preparation
step (:mod:`ltta.training.corruption_mixing`).
"""

from ltta.training.mode import TRAIN_MODES, Forward, TrainMode
from ltta.training.modes import augmix, auxiliary, policy, standard

TRAIN_MODES.add("standard", standard.MODE)
TRAIN_MODES.add("augmix", augmix.MODE)
TRAIN_MODES.add("policy", policy.MODE)
TRAIN_MODES.add("auxiliary", auxiliary.MODE)

__all__ = ["TRAIN_MODES", "Forward", "TrainMode"]
