"""The target classifier's trainer: data resident on the device, batched augmentation, exact resume.

The recipe is the CIFAR one of the reference code the paper builds on: SGD with Nesterov
momentum, weight decay, a cosine learning-rate decay updated every step (AugMix:
google-research/augmix cifar.py ``get_lr`` through ``LambdaLR``; Fast AutoAugment:
kakaobrain/fast-autoaugment FastAutoAugment/train.py, which steps a cosine schedule at fractional
epochs behind a linear warm-up), cross-entropy, pad-4 crop + flip (with a searched policy applied
first, FAA's order: policy -> crop -> flip -> cutout).

A training *mode* says how a prepared batch becomes a loss (``TRAIN_MODES``): ``standard`` is
cross-entropy; ``augmix`` adds two AugMix views of each image and AugMix's Jensen-Shannon
consistency term (:mod:`ltta.training.augmix`); ``policy`` is ``standard`` with a Fast AutoAugment
policy as the required ``extra_augment`` (usually with ``cutout=16``); ``auxiliary`` is Auxiliary
Training: heads on the shared trunk for augmented copies of each batch, attached for the run and
dropped after it (:mod:`ltta.training.auxiliary`).

Unlike the references there is no DataLoader: the whole training set is one tensor on the device,
each epoch is a random permutation drawn from an explicit generator, batches are index slices,
and augmentation runs batched on the device. Everything random is checkpointed, so a killed run
resumed from its checkpoint ends bitwise equal to an uninterrupted one (on CPU). Under ``torchrun``
the same loop runs data-parallel (DDP), each process on a shard of every global batch
(:mod:`ltta.training.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ltta.corruptions import ALL_CORRUPTIONS, random_corruptions
from ltta.io import load_error_reason, save_torch
from ltta.models.layers import Normalize
from ltta.registry import Registry
from ltta.runtime import make_generator
from ltta.training.augmix import augmix, jsd_loss
from ltta.training.auxiliary import (
    AUX_CE_WEIGHT,
    AUX_DISTILL_WEIGHT,
    AUX_FAMILIES,
    AUX_MERGE_START,
    AUX_MERGE_WEIGHT,
    DEFAULT_FAMILIES,
    attach_auxiliary,
    auxiliary_loss,
    auxiliary_views,
    detach_auxiliary,
)
from ltta.training.distributed import BatchShard
from ltta.transforms.functional import random_crop_flip
from ltta.transforms.policy import Policy

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _no_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


#: Batched training augmentations by name: ``fn(x [B,3,H,W] in [0,1], generator) -> x``.
TRAIN_AUGMENTATIONS: Registry[Augment] = Registry("training augmentation")
TRAIN_AUGMENTATIONS.add("none", _no_augment)
# Pad-4 random crop then random flip: the standard CIFAR augmentation of AugMix and FAA.
TRAIN_AUGMENTATIONS.add("standard", random_crop_flip)


def cutout_default(
    x: torch.Tensor, generator: torch.Generator, length: int, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """FAA's training cutout (``CutoutDefault`` in kakaobrain/fast-autoaugment FastAutoAugment/data.py,
    itself DARTS' ``Cutout``): per image an integer centre (row, then column) uniform over the
    image, and the rows/columns ``[centre - length//2, centre + length//2)`` clipped to the
    image set to ``fill`` (a scalar or [1,C,1,1]).

    The reference multiplies the *normalised* image by the mask, i.e. paints 0 after
    normalisation: the normalisation mean in [0,1] units, which is what the trainer passes as
    ``fill`` (the model's :class:`~ltta.models.layers.Normalize` mean). This is not FAA's
    ``CutoutAbs`` op (:func:`ltta.transforms.functional.cutout`: grey fill, inclusive corners).
    """
    if length <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n,), device=x.device, generator=generator)
    half = length // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_y = (rows[None, :] >= (cy - half).clamp(0, h)[:, None]) & (rows[None, :] < (cy + half).clamp(0, h)[:, None])
    in_x = (cols[None, :] >= (cx - half).clamp(0, w)[:, None]) & (cols[None, :] < (cx + half).clamp(0, w)[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # [N,1,H,W]
    fill_t = fill.to(device=x.device, dtype=x.dtype) if isinstance(fill, torch.Tensor) else fill
    return torch.where(mask, fill_t, x)


# ---------------------------------------------------------------- training modes

class Forward:
    """``forward(images) -> float32 logits``: the network under autocast, in the training memory format.

    A mode that needs more than logits reads ``model`` (the module being trained, not its
    ``torch.compile`` wrapper: e.g. its auxiliary heads) and ``epoch`` (1-based, for schedules).
    """

    def __init__(self, net: nn.Module, epoch: int, amp: bool, memory_format: torch.memory_format) -> None:
        self.net = net
        inner = getattr(net, "_orig_mod", net)  # under torch.compile
        self.model: nn.Module = inner.module if isinstance(inner, DistributedDataParallel) else inner
        self.epoch = epoch
        self.amp = amp
        self.memory_format = memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with _autocast(images.device, self.amp):
            return self.net(images.contiguous(memory_format=self.memory_format)).float()


#: ``(forward, prepared images, labels, cfg, generator) -> (loss, logits of the clean images)``.
ModeLoss = Callable[
    [Forward, torch.Tensor, torch.Tensor, "TrainConfig", torch.Generator], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class TrainMode:
    """How one prepared batch (after extra_augment -> crop/flip -> cutout) becomes the SGD loss.

    ``loss(forward, xb, yb, cfg, generator)`` returns ``(loss, logits of the clean batch)``; the
    clean logits give the training error. A mode with ``views`` trains on several views of each
    image: ``views(x, cfg, generator)`` makes them for a whole chunk of prepared images at once
    ([N,V,C,H,W]), and the loss then gets ``xb`` as [B,1+V,C,H,W] (the clean image first).
    """

    loss: ModeLoss
    needs_extra_augment: bool = False  # the mode is defined by the caller's extra augmentation
    allows_cutout: bool = True
    # Training-only modules around the classifier (Auxiliary Training's heads): ``attach(model, cfg)``
    # returns the module to train, whose plain forward is the classifier's; ``detach(trainee)`` drops
    # them once training ends, leaving the caller's model trained in place. None: train it as it is.
    attach: Callable[[nn.Module, TrainConfig], nn.Module] | None = None
    detach: Callable[[nn.Module], None] | None = None
    views: Callable[[torch.Tensor, TrainConfig, torch.Generator], torch.Tensor] | None = None


def _cross_entropy_loss(
    forward: Forward, xb: torch.Tensor, yb: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = forward(xb)
    return F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing), logits


def _augmix_loss(
    forward: Forward, xb: torch.Tensor, yb: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """google-research/augmix cifar.py ``train``: one forward pass over [clean; aug1; aug2] (3x batch,
    so batch norm sees all three), cross-entropy on the clean third only, plus
    ``jsd_weight`` (12) times the JSD of the three predictions. ``xb`` is [B,C,H,W] (the views are
    made here) or [B,3,C,H,W] with the views made beforehand (:func:`_augmix_views`)."""
    if xb.dim() == 4:
        with torch.no_grad():
            xb = torch.cat([xb[:, None], _augmix_views(xb, cfg, generator)], dim=1)
    n = xb.shape[0]
    logits_clean, logits_aug1, logits_aug2 = forward(xb.transpose(0, 1).flatten(0, 1)).split(n)
    loss = F.cross_entropy(logits_clean, yb, label_smoothing=cfg.label_smoothing)
    return loss + cfg.jsd_weight * jsd_loss(logits_clean, logits_aug1, logits_aug2), logits_clean


def _augmix_views(x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Two AugMix views per image [N,2,C,H,W], both in one call: independent per-image draws."""
    views = augmix(
        torch.cat([x, x]), generator, width=cfg.augmix_width, depth=cfg.augmix_depth, severity=cfg.augmix_severity
    )
    return views.view(2, *x.shape).transpose(0, 1)


#: Training modes by name (TrainConfig.mode).
TRAIN_MODES: Registry[TrainMode] = Registry("training mode")
TRAIN_MODES.add("standard", TrainMode(_cross_entropy_loss))
# AugMix (Hendrycks et al., ICLR 2020): the reference trains without cutout.
TRAIN_MODES.add("augmix", TrainMode(_augmix_loss, allows_cutout=False, views=_augmix_views))
# Fast AutoAugment (Lim et al., NeurIPS 2019): the searched policy is the caller's extra_augment.
TRAIN_MODES.add("policy", TrainMode(_cross_entropy_loss, needs_extra_augment=True))
# Auxiliary Training (Zhang et al., CVPR 2020; ltta.training.auxiliary): auxiliary heads on the
# shared trunk for the training run only. The reference (ArchipLab-LinfengZhang/Auxiliary-Training
# train.py) trains without cutout.
TRAIN_MODES.add(
    "auxiliary",
    TrainMode(auxiliary_loss, allows_cutout=False, attach=attach_auxiliary, detach=detach_auxiliary, views=auxiliary_views),
)

CHECKPOINT_FORMAT = 1
#: Images augmented per call (crop/flip, policy, cutout, the mode's views): whole chunks of the
#: epoch's order, sliced into batches afterwards. Per-image draws are the same kind as per batch;
#: what changes is the number of kernel launches, which at batch 128 on a GPU otherwise bounds the
#: step time (AugMix's and a policy's many small ops per batch).
PREPARE_CHUNK = 8192
# Settings that change nothing the optimiser sees, so a run may resume under different values.
_NOT_FINGERPRINTED = frozenset({"eval_batch_size", "compile", "compile_mode"})
# Settings a resumed run may change on purpose: a run that diverged resumes from its last good
# epoch with a lower peak lr (the schedule keeps its shape and position, rescaled to the new peak).
RESUMABLE_CHANGES = frozenset({"lr"})
#: torch.compile modes offered by TrainConfig.compile_mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint exists at the path but was written by a run with other settings or data."""


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
    mode: str = "standard"  # a name in TRAIN_MODES: standard, augmix, policy, auxiliary
    cutout: int = 0  # side in px of FAA's training cutout after crop/flip (FAA WRN-40-2: 16), 0: off
    jsd_weight: float = 12.0  # augmix: weight of the Jensen-Shannon consistency term (reference: 12)
    augmix_width: int = 3  # augmix: chains mixed per image (reference --mixture-width 3)
    augmix_depth: int = -1  # augmix: ops per chain, -1: uniform in {1, 2, 3} (reference --mixture-depth -1)
    augmix_severity: int = 3  # augmix: op levels uniform in [0.1, severity] of 10 (reference --aug-severity 3)
    # auxiliary (ltta.training.auxiliary; reference: ArchipLab-LinfengZhang/Auxiliary-Training train.py):
    aux_families: tuple[str, ...] = DEFAULT_FAMILIES  # one auxiliary head per family (names in AUX_FAMILIES)
    aux_ce_weight: float = AUX_CE_WEIGHT  # weight of each head's cross-entropy (reference --alpha 0.05)
    aux_distill_weight: float = AUX_DISTILL_WEIGHT  # weight of each head's KL to the clean prediction (--beta 0.05)
    aux_temperature: float = 1.0  # distillation temperature (reference: 1)
    aux_merge_weight: float = AUX_MERGE_WEIGHT  # weight of the L2 tying heads' fc to the primary fc, once on (1)
    aux_merge_start: float = AUX_MERGE_START  # fraction of the epochs before that penalty is on (180 of 210)
    # Benchmark corruptions mixed into the training images (the studies "AugMix+" and blur in
    # training, conf/study/): per image, with probability corruption_p, one of them at a severity
    # uniform in 1..5, drawn as the loss predictor's inputs are (ltta.corruptions.random_corruptions).
    corruptions: tuple[str, ...] = ()
    corruption_p: float = 0.0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1 (got {self.epochs!r})")
        need(
            is_int(self.batch_size) and self.batch_size >= 1,
            f"batch_size must be an integer >= 1 (got {self.batch_size!r})",
        )
        need(is_num(self.lr) and self.lr > 0, f"lr must be a finite number > 0 (got {self.lr!r})")
        need(is_num(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum!r})")
        need(
            not (self.nesterov and self.momentum == 0),
            "nesterov=True needs momentum > 0 (set momentum, or nesterov: false)",
        )
        need(
            is_num(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be >= 0 (got {self.weight_decay!r})",
        )
        need(
            is_int(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
            f"warmup_epochs must be an integer in [0, epochs={self.epochs}) (got {self.warmup_epochs!r})",
        )
        need(
            is_num(self.min_lr) and 0 <= self.min_lr <= self.lr,
            f"min_lr must be in [0, lr={self.lr}] (got {self.min_lr!r})",
        )
        need(
            is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            f"label_smoothing must be in [0, 1) (got {self.label_smoothing!r})",
        )
        need(
            self.grad_clip_norm is None or (is_num(self.grad_clip_norm) and self.grad_clip_norm > 0),
            f"grad_clip_norm must be None (off) or > 0 (got {self.grad_clip_norm!r})",
        )
        need(
            self.augment in TRAIN_AUGMENTATIONS,
            f"augment {self.augment!r} is unknown; choose one of {', '.join(TRAIN_AUGMENTATIONS.names())}",
        )
        for flag in ("nesterov", "amp", "channels_last", "compile"):
            need(isinstance(getattr(self, flag), bool), f"{flag} must be true or false (got {getattr(self, flag)!r})")
        need(
            self.compile_mode in COMPILE_MODES,
            f"compile_mode must be one of {', '.join(COMPILE_MODES)} (got {self.compile_mode!r})",
        )
        need(is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0 (got {self.seed!r})")
        need(
            is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
            f"eval_batch_size must be an integer >= 1 (got {self.eval_batch_size!r})",
        )
        need(
            self.mode in TRAIN_MODES,
            f"mode {self.mode!r} is unknown; choose one of {', '.join(TRAIN_MODES.names())}",
        )
        need(
            is_int(self.cutout) and self.cutout >= 0,
            f"cutout must be an integer >= 0 px, 0: off (got {self.cutout!r})",
        )
        need(
            self.cutout == 0 or TRAIN_MODES.get(self.mode).allows_cutout,
            f"cutout must be 0 in mode {self.mode!r} (its reference recipe has no cutout; got {self.cutout})",
        )
        need(
            is_num(self.jsd_weight) and self.jsd_weight >= 0,
            f"jsd_weight must be a finite number >= 0 (got {self.jsd_weight!r})",
        )
        need(
            is_int(self.augmix_width) and self.augmix_width >= 1,
            f"augmix_width must be an integer >= 1 (got {self.augmix_width!r})",
        )
        need(
            is_int(self.augmix_depth) and (self.augmix_depth == -1 or self.augmix_depth >= 1),
            f"augmix_depth must be -1 (random 1..3 per chain) or an integer >= 1 (got {self.augmix_depth!r})",
        )
        need(
            is_int(self.augmix_severity) and 1 <= self.augmix_severity <= 10,
            f"augmix_severity must be an integer in [1, 10] (got {self.augmix_severity!r})",
        )
        families = self.aux_families
        need(
            isinstance(families, (tuple, list))
            and len(families) > 0
            and len(set(families)) == len(families)
            and all(isinstance(f, str) and f in AUX_FAMILIES for f in families),
            f"aux_families must be distinct names from {', '.join(AUX_FAMILIES.names())}, at least one "
            f"(got {families!r})",
        )
        object.__setattr__(self, "aux_families", tuple(families))  # hashable, whatever sequence came in
        for weight in ("aux_ce_weight", "aux_distill_weight", "aux_merge_weight"):
            value = getattr(self, weight)
            need(is_num(value) and value >= 0, f"{weight} must be a finite number >= 0 (got {value!r})")
        need(
            is_num(self.aux_temperature) and self.aux_temperature > 0,
            f"aux_temperature must be a finite number > 0 (got {self.aux_temperature!r})",
        )
        need(
            is_num(self.aux_merge_start) and 0 <= self.aux_merge_start <= 1,
            f"aux_merge_start must be a fraction of the epochs in [0, 1] (got {self.aux_merge_start!r})",
        )
        need(
            isinstance(self.corruptions, tuple) and all(c in ALL_CORRUPTIONS for c in self.corruptions),
            f"corruptions must be a tuple of corruption names from {', '.join(ALL_CORRUPTIONS)} "
            f"(got {self.corruptions!r})",
        )
        need(
            is_num(self.corruption_p) and 0 <= self.corruption_p <= 1,
            f"corruption_p must be a probability in [0, 1] (got {self.corruption_p!r})",
        )


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based).

    Linear warm-up ``(step+1)/warmup_steps`` (FAA's GradualWarmupScheduler with multiplier 1
    ramps the same way, per epoch), then half a cosine from 1 down to ``min_ratio`` over the
    remaining steps, evaluated per step as AugMix's ``get_lr(step, total_steps, ...)``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- inference helpers


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 for these nets)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _prefers_channels_last(model: nn.Module) -> bool:
    """True when the model's first conv weight is channels_last (so inputs should match it)."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the caller's mode back (so helpers can run mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batched_logits(model: nn.Module, x: torch.Tensor, batch_size: int, amp: bool) -> Iterator[tuple[int, torch.Tensor]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.dim() != 4:
        raise ValueError(f"expected images [N,C,H,W], got shape {tuple(x.shape)}")
    device = _model_device(model)
    fmt = torch.channels_last if _prefers_channels_last(model) else torch.contiguous_format
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True).contiguous(memory_format=fmt)
        with _autocast(device, amp):
            logits = model(xb)
        yield start, logits.float()


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, amp: bool = True) -> torch.Tensor:
    """Softmax probabilities float32 [N,K] on ``x``'s device (eval mode, bf16 autocast on CUDA)."""
    chunks = []
    with _eval_mode(model):
        for _, logits in _batched_logits(model, x, batch_size, amp):
            chunks.append(logits.softmax(dim=1).to(x.device))
    if not chunks:
        raise ValueError("predict_proba got an empty batch (N = 0)")
    return torch.cat(chunks)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024, amp: bool = True
) -> dict[str, float]:
    """Mean cross-entropy and top-1 error (fractions, not %) of ``model`` on ``(x, y)``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("evaluate_classifier got an empty set (N = 0)")
    loss_sum = torch.zeros((), dtype=torch.float64, device=_model_device(model))
    wrong = torch.zeros((), dtype=torch.int64, device=loss_sum.device)
    with _eval_mode(model):
        for start, logits in _batched_logits(model, x, batch_size, amp):
            yb = y[start : start + logits.shape[0]].to(logits.device, non_blocking=True)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            wrong += (logits.argmax(dim=1) != yb).sum()
    n = x.shape[0]
    return {"loss": float(loss_sum) / n, "error": float(wrong) / n}


# ---------------------------------------------------------------- checkpoint helpers


def _data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """A device-independent fingerprint of the training set (a strided sample of it, quantised)."""
    n = x.shape[0]
    stride = max(1, n // 64)
    sample = (x[::stride].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    h = hashlib.sha256(sample.numpy().tobytes())
    h.update(y.detach().to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _policy_digest(policy: Policy) -> str:
    """The sub-policies (ops, probabilities, levels) as a short hash; the free-form ``meta`` is left out."""
    ops = [[[op.name, float(op.prob), float(op.level)] for op in sub] for sub in policy.subpolicies]
    return hashlib.sha256(json.dumps(ops).encode()).hexdigest()[:16]


def _cutout_fill(model: nn.Module) -> torch.Tensor | float:
    """Zero after the model's input normalisation, in [0,1] units: its Normalize mean ([1,C,1,1]),
    or 0 for a model that normalises nothing (FAA's CutoutDefault masks the normalised image)."""
    for module in model.modules():
        if isinstance(module, Normalize):
            return module.mean.detach().clone()
    return 0.0


def _fingerprint(
    cfg: TrainConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra_augment: Augment | None
) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    fields["model"] = type(model).__name__
    fields["model_parameters"] = sum(p.numel() for p in model.parameters())
    fields["train_shape"] = list(x.shape)
    fields["train_data"] = _data_digest(x, y)
    # Which extra augmentation (by type/name), and a policy's contents when it carries one (a
    # CompiledPolicy does); other parameters of a custom augmentation are the caller's to pin.
    fields["extra_augment"] = None if extra_augment is None else getattr(
        extra_augment, "__qualname__", type(extra_augment).__qualname__
    )
    policy = getattr(extra_augment, "policy", None)
    fields["extra_augment_policy"] = _policy_digest(policy) if isinstance(policy, Policy) else None
    return json.loads(json.dumps(fields))  # plain JSON types, comparable after a torch.load


def _load_checkpoint(path: Path, expected: dict[str, Any], device: torch.device) -> dict[str, Any]:
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
        if stored.get(k) != expected.get(k) and k not in RESUMABLE_CHANGES
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


def _rng_state(device: torch.device, generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device, generator: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def _private_global_rng(device: torch.device) -> Iterator[None]:
    """Dropout draws from torch's global RNG: fork it so training neither depends on nor disturbs
    the caller's random state (it is seeded from the config or restored from the checkpoint)."""
    devices = [_cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


# ---------------------------------------------------------------- training


def _check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x_{name} must be float images [N,C,H,W] in [0,1], got {x.dtype} {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y_{name} must be labels [N] matching x_{name} (N={x.shape[0]}), got {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"y_{name} must hold integer class indices, got {y.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"x_{name} is empty")
    device = _model_device(model)
    if x.device != device or y.device != device:
        raise ValueError(
            f"x_{name}/y_{name} live on {x.device}/{y.device} but the model is on {device}; move the data to the "
            f"model's device once before training (the trainer keeps the whole set resident there)."
        )


def train_classifier(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    cfg: TrainConfig,
    *,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    checkpoint_path: Path | str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    extra_augment: Augment | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place on ``(x_train, y_train)`` (already on the model's device).

    Returns the history: one dict per epoch with ``epoch`` (1-based), ``train_loss``,
    ``train_error`` (on the augmented batches), ``val_loss``/``val_error`` (None without a
    validation set), ``lr`` (at the epoch's last step), ``images_per_s`` and ``seconds``.
    With ``checkpoint_path`` every finished epoch is saved atomically, and an existing checkpoint
    of the same run is resumed from the epoch after it; ``on_epoch`` runs after each save.
    Each batch is prepared as ``cfg.corruptions`` (with probability ``cfg.corruption_p`` per
    image) -> ``extra_augment`` (e.g. a searched policy; required by mode
    ``policy``) -> ``cfg.augment`` (crop/flip) -> cutout (``cfg.cutout`` > 0), then ``cfg.mode``
    turns it into the loss (``augmix``: clean + two AugMix views in one 3x forward pass; the
    history's loss is then CE + jsd_weight * JSD, its error and images/s count clean images;
    ``auxiliary``: clean + one view per ``cfg.aux_families`` in one pass, the heads attached to
    ``model`` for the run and removed at the end, so ``model`` comes back as its own architecture).

    In an initialised process group (``torchrun``, :mod:`ltta.training.distributed`) the model
    trains under DDP: ``cfg.batch_size`` is the global batch (divisible by the world size), each
    process trains on its shard of every batch, and the result is the single-process one up to
    batch-norm statistics. Rank 0 alone writes the checkpoint, shows progress and calls
    ``on_epoch``; every process resumes from the same checkpoint and returns rank 0's history.
    """
    _check_inputs(model, x_train, y_train, "train")
    if (x_val is None) != (y_val is None):
        raise ValueError("pass both x_val and y_val, or neither")
    if x_val is not None and y_val is not None:
        _check_inputs(model, x_val, y_val, "val")
    mode = TRAIN_MODES.get(cfg.mode)
    if mode.needs_extra_augment and extra_augment is None:
        raise ValueError(
            f"TrainConfig.mode {cfg.mode!r} trains with an augmentation policy, but no extra_augment was given; pass "
            f"extra_augment=CompiledPolicy(load_policy(path), device) (ltta.transforms.policy), or use mode 'standard'."
        )
    device = _model_device(model)
    n = x_train.shape[0]
    batch_size = min(cfg.batch_size, n)
    # Under torchrun: this process's shard of every global batch (ltta.training.distributed).
    shard = BatchShard.current(cfg.seed, device)
    shard.check_batch(batch_size, n)
    # Full batches only (FAA's training loader drops the last one too): static shapes for
    # torch.compile, and no size-1 batch for BatchNorm. A fresh permutation each epoch covers all.
    steps_per_epoch = n // batch_size
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    prepare = _batch_preparation(
        extra_augment, TRAIN_AUGMENTATIONS.get(cfg.augment), cfg.cutout, _cutout_fill(model) if cfg.cutout else 0.0,
        corrupt=_corruption_augment(cfg.corruptions, cfg.corruption_p),
    )
    y_train = y_train.long()
    y_val = y_val.long() if y_val is not None else None

    # The mode's training-only modules (auxiliary heads) around the caller's classifier: trained,
    # checkpointed and resumed with it, and dropped again at the end (TrainMode.attach / detach).
    model = mode.attach(model, cfg) if mode.attach is not None else model

    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        # One fused kernel for the whole update on CUDA instead of a few per parameter tensor:
        # the same arithmetic, fewer launches in a host-bound loop.
        fused=device.type == "cuda",
    )
    min_ratio = cfg.min_lr / cfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, min_ratio)
    )
    generator = make_generator(cfg.seed, device)
    fingerprint = _fingerprint(cfg, model, x_train, y_train, extra_augment)
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    ddp = shard.wrap(model)  # DDP under torchrun (it copies rank 0's weights to every process), else model
    net: nn.Module = torch.compile(ddp, mode=cfg.compile_mode) if cfg.compile else ddp  # type: ignore[assignment]

    with _private_global_rng(device):
        history: list[dict[str, Any]] = []
        start_epoch = 1
        # Dropout's global stream: a seed distinct from the data-order generator's.
        torch.default_generator.manual_seed(cfg.seed + 1)
        if device.type == "cuda":
            torch.cuda.default_generators[_cuda_index(device)].manual_seed(cfg.seed + 1)
        if ckpt_path is not None and shard.agree(ckpt_path.exists(), f"whether {ckpt_path} exists"):
            ckpt = _load_checkpoint(ckpt_path, fingerprint, device)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt["fingerprint"].get("lr") != cfg.lr:  # resuming with another peak lr (after a divergence)
                scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
                factor = warmup_cosine_factor(scheduler.last_epoch, total_steps, warmup_steps, min_ratio)
                for group in optimizer.param_groups:
                    group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
                if shard.is_main:
                    print(f"resuming {ckpt_path} after epoch {ckpt['epoch']} with lr {cfg.lr} "
                          f"(it was written with lr {ckpt['fingerprint'].get('lr')})", file=sys.stderr)
            _set_rng_state(ckpt["rng"], device, generator)
            history = list(ckpt["history"])
            start_epoch = int(ckpt["epoch"]) + 1

        bar = tqdm(
            range(start_epoch, cfg.epochs + 1),
            total=cfg.epochs,
            initial=start_epoch - 1,
            desc="train",
            unit="epoch",
            disable=not (progress and shard.is_main),
            dynamic_ncols=True,
        )
        with contextlib.closing(bar):
            for epoch in bar:
                record = _train_epoch(
                    net, optimizer, scheduler, x_train, y_train, cfg, epoch, steps_per_epoch, batch_size,
                    generator, prepare, mode, channels_last, shard,
                )  # fmt: skip
                if x_val is not None and y_val is not None and shard.is_main:
                    val = evaluate_classifier(model, x_val, y_val, cfg.eval_batch_size, cfg.amp)
                    record["val_loss"], record["val_error"] = val["loss"], val["error"]
                record = shard.from_main(record)  # every process returns rank 0's history
                history.append(record)
                if ckpt_path is not None and shard.is_main:
                    save_torch(
                        ckpt_path,
                        {
                            "format": CHECKPOINT_FORMAT,
                            "fingerprint": fingerprint,
                            "device_type": device.type,
                            "epoch": epoch,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "rng": _rng_state(device, generator),
                            "history": history,
                        },
                    )
                bar.set_postfix(
                    loss=f"{record['train_loss']:.3f}",
                    err=f"{record['train_error']:.3f}",
                    val_err="-" if record["val_error"] is None else f"{record['val_error']:.3f}",
                    lr=f"{record['lr']:.3g}",
                )
                if on_epoch is not None and shard.is_main:
                    on_epoch(dict(record))
    model.eval()
    if mode.detach is not None:
        mode.detach(model)
    return history


def _corruption_augment(names: tuple[str, ...], p: float) -> Augment | None:
    """The benchmark corruptions as a batched training augmentation (None when off)."""
    if not names or p <= 0:
        return None

    def corrupt(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_corruptions(xb, generator, p, names)

    return corrupt


def _batch_preparation(
    extra_augment: Augment | None,
    augment: Augment,
    cutout: int,
    fill: torch.Tensor | float,
    corrupt: Augment | None = None,
) -> Augment:
    """Corruption (on the whole 32x32 image, as the loss predictor's inputs are corrupted before
    any deformation) -> FAA's order: policy (extra_augment) -> crop/flip (augment) -> cutout."""

    def prepare(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if corrupt is not None:
            xb = corrupt(xb, generator)
        if extra_augment is not None:
            xb = extra_augment(xb, generator)
        xb = augment(xb, generator)
        if cutout > 0:
            xb = cutout_default(xb, generator, cutout, fill)
        return xb

    return prepare


def _train_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    epoch: int,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    prepare: Augment,
    mode: TrainMode,
    channels_last: bool,
    shard: BatchShard,
) -> dict[str, Any]:
    """One pass; per-step losses stay on the device and are read once at the end (no per-step sync).

    Under DDP each process prepares the whole global batch with the shared generator (so each
    image's draws do not depend on the number of processes) and trains on its shard of it; the
    epoch's losses and errors are then all-reduced to the global batch's.
    """
    device = x.device
    net.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    step_losses = torch.empty(steps, dtype=torch.float32, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    lr_used = optimizer.param_groups[0]["lr"]

    forward = Forward(net, epoch, cfg.amp, fmt)
    loss_generator = shard.epoch_generator(generator, epoch)  # the shared generator when alone
    t0 = time.perf_counter()
    order = torch.randperm(x.shape[0], device=device, generator=generator)
    chunk_steps = max(1, PREPARE_CHUNK // batch_size)
    for step in range(steps):
        if cfg.compile:  # a new iteration for CUDA-graph trees: last step's graph outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        if step % chunk_steps == 0:  # augment the next chunk of batches in one go (see PREPARE_CHUNK)
            first = step * batch_size
            chunk_idx = order[first : min(step + chunk_steps, steps) * batch_size]
            with torch.no_grad():
                chunk = prepare(x[chunk_idx], generator)
                if mode.views is not None:
                    chunk = torch.cat([chunk[:, None], mode.views(chunk, cfg, generator)], dim=1)
        idx = order[step * batch_size : (step + 1) * batch_size]
        xb = chunk[step * batch_size - first : (step + 1) * batch_size - first]
        xb, yb = shard.local(xb), shard.local(y[idx])
        loss, logits = mode.loss(forward, xb, yb, cfg, loss_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip_norm)
        lr_used = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step_losses[step] = loss.detach()
        wrong += (logits.detach().argmax(dim=1) != yb).sum()
    shard.mean_(step_losses)  # each process's shard means -> the global batches' means
    shard.sum_(wrong)
    bad = (~torch.isfinite(step_losses)).nonzero()
    if bad.numel() > 0:
        first = int(bad[0, 0])
        raise RuntimeError(
            f"training diverged: non-finite loss ({float(step_losses[first])}) at epoch {epoch}, step {first + 1} of "
            f"{steps} (lr {cfg.lr}). Lower the learning rate (lr; in params.yaml train_target.lr, which the policy "
            f"search's fold models use too) or lengthen the warmup (warmup_epochs) and rerun: the last checkpoint, if "
            f"any, holds the previous epoch, and a rerun with a lower lr resumes from it."
        )
    seconds = time.perf_counter() - t0  # the reads above synchronised the device
    images = steps * batch_size
    return {
        "epoch": epoch,
        "train_loss": float(step_losses.double().mean()),
        "train_error": float(wrong) / images,
        "val_loss": None,
        "val_error": None,
        "lr": lr_used,
        "images_per_s": images / seconds if seconds > 0 else float("inf"),
        "seconds": seconds,
    }
