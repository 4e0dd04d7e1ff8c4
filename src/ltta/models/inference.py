"""Running a classifier on a tensor of images: probabilities, loss and error, in batches.

Every part of the pipeline that classifies (the trainer's validation, the loss dataset, the TTA
methods, the report) goes through these helpers, so they agree on eval mode, the memory format
and bf16 autocast on CUDA. They sit beside the architectures because they need nothing but a
module: the algorithms import them, never the other way round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 for these nets)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a module with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def prefers_channels_last(model: nn.Module) -> bool:
    """True when the model's first conv weight is channels_last (so inputs should match it)."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the caller's mode back (so helpers can run mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def batched_logits(model: nn.Module, x: torch.Tensor, batch_size: int, amp: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, float32 logits)`` for each batch of ``x``, moved to the model's device and layout."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.dim() != 4:
        raise ValueError(f"expected images [N,C,H,W], got shape {tuple(x.shape)}")
    device = model_device(model)
    fmt = torch.channels_last if prefers_channels_last(model) else torch.contiguous_format
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, amp):
            logits = model(xb)
        yield start, logits.float()


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, amp: bool = True) -> torch.Tensor:
    """Softmax probabilities float32 [N,K] on ``x``'s device (eval mode, bf16 autocast on CUDA)."""
    chunks = []
    with eval_mode(model):
        for _, logits in batched_logits(model, x, batch_size, amp):
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
    loss_sum = torch.zeros((), dtype=torch.float64, device=model_device(model))
    wrong = torch.zeros((), dtype=torch.int64, device=loss_sum.device)
    with eval_mode(model):
        for start, logits in batched_logits(model, x, batch_size, amp):
            yb = y[start : start + logits.shape[0]].to(logits.device, non_blocking=True)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            wrong += (logits.argmax(dim=1) != yb).sum()
    n = x.shape[0]
    return {"loss": float(loss_sum) / n, "error": float(wrong) / n}
