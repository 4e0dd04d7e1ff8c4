"""What decides a target training run: :class:`TrainConfig`, checked when it is made.

The keys of every training mode live here (a new mode adds its keys to :class:`TrainConfig`),
while the checks of a mode's own keys live with the mode (:attr:`TrainMode.check
<ltta.training.mode.TrainMode>`), which call :func:`require` so every message reads the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ltta.corruptions import ALL_CORRUPTIONS
from ltta.training.mode import TRAIN_MODES
from ltta.training.preparation import TRAIN_AUGMENTATIONS

#: torch.compile modes offered by TrainConfig.compile_mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def require(ok: bool, msg: str) -> None:
    """Raise ``ValueError("TrainConfig.<msg>")`` unless ``ok``: ``msg`` names the key and the fix."""
    if not ok:
        raise ValueError(f"TrainConfig.{msg}")


def is_int(v: Any) -> bool:
    """An integer that is not a bool (YAML's ``true`` must not pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Units: epochs are passes over the training set."""

    epochs: int
    batch_size: int = 128  # images per SGD step (last partial batch of an epoch is dropped)
    lr: float = 0.1  # peak learning rate, reached after warm-up
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2 on every parameter, as the references' SGD does
    warmup_epochs: int = 0  # linear warm-up from lr/warmup_steps to lr (FAA: 5 for WRN-40-2)
    min_lr: float = 0.0  # cosine floor (FAA: 0; AugMix: 1e-6)
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None  # clip the global gradient norm (FAA's conf: 5), None: off
    augment: str = "standard"  # a name in TRAIN_AUGMENTATIONS
    amp: bool = True  # bf16 autocast; only takes effect on CUDA
    channels_last: bool = True  # NHWC weights and batches; only takes effect on CUDA (slower on CPU)
    compile: bool = False  # torch.compile the forward/backward
    # torch.compile mode when compile is on. "reduce-overhead" replays the compiled forward and
    # backward as CUDA graphs: at the references' batch of 128 a fast GPU finishes a WRN-40-2 step
    # quicker than Python can launch its kernels one by one, so graphs are what reach the ceiling.
    compile_mode: str = "reduce-overhead"
    seed: int = 0  # data order, augmentation draws and dropout
    eval_batch_size: int = 1024
    mode: str = "standard"  # a name in TRAIN_MODES (ltta.training.modes)
    cutout: int = 0  # side in px of FAA's training cutout after crop/flip (FAA WRN-40-2: 16), 0: off
    jsd_weight: float = 12.0  # augmix: weight of the Jensen-Shannon consistency term (reference: 12)
    augmix_width: int = 3  # augmix: chains mixed per image (reference --mixture-width 3)
    augmix_depth: int = -1  # augmix: ops per chain, -1: uniform in {1, 2, 3} (reference --mixture-depth -1)
    augmix_severity: int = 3  # augmix: op levels uniform in [0.1, severity] of 10 (reference --aug-severity 3)
    # auxiliary (ltta.training.modes.auxiliary; reference: ArchipLab-LinfengZhang/Auxiliary-Training train.py):
    aux_families: tuple[str, ...] = ("blur", "noise", "contrast", "rotate")  # one head per family (train.py loaders)
    aux_ce_weight: float = 0.05  # weight of each head's cross-entropy (reference --alpha 0.05)
    aux_distill_weight: float = 0.05  # weight of each head's KL to the clean prediction (--beta 0.05)
    aux_temperature: float = 1.0  # distillation temperature (reference: 1)
    aux_merge_weight: float = 1.0  # weight of the L2 tying heads' fc to the primary fc, once on (1)
    aux_merge_start: float = 0.857  # fraction of the epochs before that penalty is on (180 of 210)
    # Benchmark corruptions mixed into the training images (the studies "AugMix+" and blur in
    # training, conf/study/): per image, with probability corruption_p, one of them at a severity
    # uniform in 1..5, drawn as the loss predictor's inputs are (ltta.corruptions.random_corruptions).
    corruptions: tuple[str, ...] = ()
    corruption_p: float = 0.0

    def __post_init__(self) -> None:
        require(is_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1 (got {self.epochs!r})")
        require(
            is_int(self.batch_size) and self.batch_size >= 1,
            f"batch_size must be an integer >= 1 (got {self.batch_size!r})",
        )
        require(is_num(self.lr) and self.lr > 0, f"lr must be a finite number > 0 (got {self.lr!r})")
        require(is_num(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum!r})")
        require(
            not (self.nesterov and self.momentum == 0),
            "nesterov=True needs momentum > 0 (set momentum, or nesterov: false)",
        )
        require(
            is_num(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be >= 0 (got {self.weight_decay!r})",
        )
        require(
            is_int(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
            f"warmup_epochs must be an integer in [0, epochs={self.epochs}) (got {self.warmup_epochs!r})",
        )
        require(
            is_num(self.min_lr) and 0 <= self.min_lr <= self.lr,
            f"min_lr must be in [0, lr={self.lr}] (got {self.min_lr!r})",
        )
        require(
            is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            f"label_smoothing must be in [0, 1) (got {self.label_smoothing!r})",
        )
        require(
            self.grad_clip_norm is None or (is_num(self.grad_clip_norm) and self.grad_clip_norm > 0),
            f"grad_clip_norm must be None (off) or > 0 (got {self.grad_clip_norm!r})",
        )
        require(
            self.augment in TRAIN_AUGMENTATIONS,
            f"augment {self.augment!r} is unknown; choose one of {', '.join(TRAIN_AUGMENTATIONS.names())}",
        )
        for flag in ("nesterov", "amp", "channels_last", "compile"):
            require(isinstance(getattr(self, flag), bool), f"{flag} must be true or false (got {getattr(self, flag)!r})")
        require(
            self.compile_mode in COMPILE_MODES,
            f"compile_mode must be one of {', '.join(COMPILE_MODES)} (got {self.compile_mode!r})",
        )
        require(is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0 (got {self.seed!r})")
        require(
            is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
            f"eval_batch_size must be an integer >= 1 (got {self.eval_batch_size!r})",
        )
        require(
            self.mode in TRAIN_MODES,
            f"mode {self.mode!r} is unknown; choose one of {', '.join(TRAIN_MODES.names())}",
        )
        require(
            is_int(self.cutout) and self.cutout >= 0,
            f"cutout must be an integer >= 0 px, 0: off (got {self.cutout!r})",
        )
        require(
            self.cutout == 0 or TRAIN_MODES.get(self.mode).allows_cutout,
            f"cutout must be 0 in mode {self.mode!r} (its reference recipe has no cutout; got {self.cutout})",
        )
        # Each mode checks its own keys, those of every mode whichever runs: a bad value in
        # params.yaml is an error before any training starts, not when the mode is switched on.
        for name in TRAIN_MODES:
            TRAIN_MODES.get(name).check(self)
        object.__setattr__(self, "aux_families", tuple(self.aux_families))  # hashable, whatever sequence came in
        require(
            isinstance(self.corruptions, tuple) and all(c in ALL_CORRUPTIONS for c in self.corruptions),
            f"corruptions must be a tuple of corruption names from {', '.join(ALL_CORRUPTIONS)} "
            f"(got {self.corruptions!r})",
        )
        require(
            is_num(self.corruption_p) and 0 <= self.corruption_p <= 1,
            f"corruption_p must be a probability in [0, 1] (got {self.corruption_p!r})",
        )
