"""The target classifier's trainer: data resident on the device, batched augmentation, exact resume.

The recipe is the CIFAR one of the reference code the paper builds on: SGD with Nesterov
momentum, weight decay, a cosine learning-rate decay updated every step (AugMix:
google-research/augmix cifar.py ``get_lr`` through ``LambdaLR``; Fast AutoAugment:
kakaobrain/fast-autoaugment FastAutoAugment/train.py, which steps a cosine schedule at fractional
epochs behind a linear warm-up), cross-entropy, pad-4 crop + flip (with a searched policy applied
first, FAA's order: policy -> crop -> flip -> cutout).

The loop knows no training mode by name. Each batch is prepared as
:mod:`ltta.training.preparation` says (the corruption-mixing studies' corruptions, the caller's
``extra_augment``, crop/flip, cutout), then ``cfg.mode``, a :class:`~ltta.training.mode.TrainMode`
from :mod:`ltta.training.modes`, supplies the extra views of each image, the loss and any
training-only modules. Checkpoints, random streams and fingerprints are :mod:`ltta.checkpoint`'s;
running the classifier (validation, prediction) is :mod:`ltta.models.inference`'s.

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
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ltta.checkpoint import (
    data_digest,
    load_checkpoint,
    private_rng,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stable_hash,
)
from ltta.models.inference import evaluate_classifier, model_device
from ltta.runtime import make_generator
from ltta.training.config import TrainConfig
from ltta.training.corruption_mixing import corruption_augment
from ltta.training.distributed import BatchShard
from ltta.training.mode import Forward, TrainMode
from ltta.training.modes import TRAIN_MODES
from ltta.training.preparation import TRAIN_AUGMENTATIONS, Augment, batch_preparation, cutout_fill
from ltta.transforms.policy import Policy

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
#: How many training images the fingerprint hashes (a strided sample, plus every label): enough to
#: tell another dataset or split apart without copying a GPU-resident set to the host whole.
_DIGEST_SAMPLE = 64


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
    device = model_device(model)
    if x.device != device or y.device != device:
        raise ValueError(
            f"x_{name}/y_{name} live on {x.device}/{y.device} but the model is on {device}; move the data to the "
            f"model's device once before training (the trainer keeps the whole set resident there)."
        )


def _fingerprint(
    cfg: TrainConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra_augment: Augment | None
) -> dict[str, Any]:
    """Everything that decides the run's weights, as plain JSON: a checkpoint resumes only under equal ones."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    fields["model"] = type(model).__name__
    fields["model_parameters"] = sum(p.numel() for p in model.parameters())
    fields["train_shape"] = list(x.shape)
    fields["train_data"] = data_digest(x[:: max(1, x.shape[0] // _DIGEST_SAMPLE)], y)
    # Which extra augmentation (by type/name), and a policy's contents when it carries one (a
    # CompiledPolicy does); other parameters of a custom augmentation are the caller's to pin.
    fields["extra_augment"] = None if extra_augment is None else getattr(
        extra_augment, "__qualname__", type(extra_augment).__qualname__
    )
    policy = getattr(extra_augment, "policy", None)
    # The sub-policies (ops, probabilities, levels); the free-form ``meta`` is left out.
    fields["extra_augment_policy"] = (
        stable_hash([[[op.name, float(op.prob), float(op.level)] for op in sub] for sub in policy.subpolicies])
        if isinstance(policy, Policy) else None
    )  # fmt: skip
    return json.loads(json.dumps(fields))  # plain JSON types, comparable after a torch.load


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
    (:mod:`ltta.training.modes`) turns it into the loss: a mode with views trains on the clean
    image and its views in one forward pass, the history's loss is the mode's and its error and
    images/s count clean images; modules a mode attaches (auxiliary heads) are removed at the end,
    so ``model`` comes back as its own architecture.

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
    device = model_device(model)
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
    prepare = batch_preparation(
        extra_augment, TRAIN_AUGMENTATIONS.get(cfg.augment), cfg.cutout, cutout_fill(model) if cfg.cutout else 0.0,
        corrupt=corruption_augment(cfg.corruptions, cfg.corruption_p),
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

    # Dropout's global stream, private to the run: a seed distinct from the data-order generator's.
    with private_rng(device, cfg.seed + 1):
        history: list[dict[str, Any]] = []
        start_epoch = 1
        if ckpt_path is not None and shard.agree(ckpt_path.exists(), f"whether {ckpt_path} exists"):
            ckpt = load_checkpoint(ckpt_path, fingerprint, device, RESUMABLE_CHANGES)
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
            set_rng_state(ckpt["rng"], device, generator)
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
                    save_checkpoint(
                        ckpt_path, fingerprint=fingerprint, device=device, epoch=epoch, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        rng=rng_state(device, generator), history=history,
                    )  # fmt: skip
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
