"""The loss predictor's training data: deformed inputs, and the frozen target's loss under every candidate.

Follows kakaobrain/learning-loss-for-tta ``dataloader.py`` (``AugmentedDataset.__getitem__``
through ``CorruptedDataset``, as ``train.py`` builds it):

- every training image is used ``num_duplication`` (3) times; for each copy a rotation from
  {-20, 0, 20}, a zoom from {0.9, 1, 1.1} and a brightness from {0.9, 1, 1.1} are each drawn
  with probability ``aug_p`` (0.4; otherwise the neutral value), shared by both flips of the copy;
- each copy is used unflipped *and* flipped (``transform_flip = [False, True]``), and each of
  those two draws its own corruption with probability ``aug_p``: one of the 15 benchmark
  corruptions (``corruption_tuple_tr``; the 4 extras are held out) at a severity uniform in 1..5;
- order: corruption (its output truncated to 8 bits, ``astype(np.uint8)``) -> flip -> rotation
  (bicubic, on the mirror-expanded image) -> brightness -> zoom (bicubic) -> centre crop;
- the labels are the target's cross-entropy (and correctness) under each candidate action applied
  to that deformed image.
The validation inputs of ``train.py`` (``do_transform=False``) are one unflipped copy with only
the random corruption: ``duplication=1, flips="none", deform=False``.

Differences: the public code applies the candidate actions to the deformed *mirror-expanded*
image; here they are applied to the deformed 32x32 image (mirror sampling again at its border),
so a rotation after a rotation mirrors at the rotated border. Everything is batched: the random
choices are drawn as tensors, and the loop runs over the few distinct (corruption, severity)
pairs and over candidates, never over images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import ltta.transforms.functional as TF
from ltta.models.inference import predict_proba
from ltta.tta.candidates import Candidate, apply_candidate

# dataloader.py, CorruptedDataset (norm != 'intensive'): the deformation choices.
ROTATIONS: tuple[float, ...] = (-20.0, 0.0, 20.0)
ZOOMS: tuple[float, ...] = (0.9, 1.0, 1.1)
BRIGHTNESSES: tuple[float, ...] = (0.9, 1.0, 1.1)

#: flips per copy: the public code uses both ("both"); "random" is one flip drawn per copy.
FLIP_MODES: dict[str, int] = {"both": 2, "random": 1, "none": 1}


def copies_per_image(duplication: int, flips: str = "both") -> int:
    """How many rows :func:`predictor_training_inputs` makes per input image."""
    if flips not in FLIP_MODES:
        raise ValueError(f"flips must be one of {sorted(FLIP_MODES)}, got {flips!r}")
    if duplication < 1:
        raise ValueError(f"duplication must be >= 1, got {duplication}")
    return duplication * FLIP_MODES[flips]


def _choose(
    values: Sequence[float], neutral: float, n: int, p: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Per sample: with probability p a uniform pick from ``values``, else ``neutral``. [n] float32."""
    table = torch.tensor(values, dtype=torch.float32, device=device)
    active = torch.rand(n, device=device, generator=gen) < p
    pick = table[torch.randint(0, len(values), (n,), device=device, generator=gen)]
    return torch.where(active, pick, torch.full_like(pick, neutral))


def _apply_where(x: torch.Tensor, mag: torch.Tensor, neutral: float, op) -> torch.Tensor:  # noqa: ANN001
    """Apply ``op(x[idx], mag[idx])`` only where ``mag != neutral`` (neutral values stay bit-exact)."""
    idx = (mag != neutral).nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = op(x[idx], mag[idx])
    return out


def predictor_training_inputs(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    duplication: int = 3,
    p_aug: float = 0.4,
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    flips: str = "both",
    deform: bool = True,
) -> torch.Tensor:
    """Deformed copies of ``x`` [N,3,H,W] (float in [0,1]) as the public dataloader makes them.

    Returns ``[copies_per_image(duplication, flips) * N, 3, H, W]``, copy-major: rows
    ``[k*N, (k+1)*N)`` are copy k of every image (for "both", k = 2*dup + flip), so the labels
    are ``y.repeat(copies)``. Values are rounded to 8-bit levels, as the public code works on
    8-bit PIL images, so storing them as uint8 loses nothing. The whole expanded set is built
    at once (corruptions grouped over all rows); call it on chunks of images if memory is tight.
    ``deform=False`` leaves out the rotation/zoom/brightness draws (the public validation
    inputs). ``generator`` must live on ``x``'s device; the result is a deterministic function
    of it.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected float images [N,C,H,W] in [0,1], got {tuple(x.shape)} {x.dtype}")
    copies = copies_per_image(duplication, flips)
    if not 0.0 <= p_aug <= 1.0:
        raise ValueError(f"p_aug must lie in [0, 1], got {p_aug}")
    from ltta.corruptions import random_corruptions  # the corruption tables load only when needed

    n, dev = x.shape[0], x.device
    per_flip = FLIP_MODES[flips]
    # Row k*N + i is copy k of image i; copy k belongs to duplicate k // per_flip.
    # random_corruptions checks the names and severities (before any draw).
    out = random_corruptions(x.repeat(copies, 1, 1, 1), generator, p_aug, corruptions, severities)
    if flips == "both":
        flipped = (torch.arange(copies, device=dev) % 2 == 1).repeat_interleave(n)
        out = torch.where(flipped[:, None, None, None], TF.hflip(out), out)
    elif flips == "random":
        out = TF.random_hflip(out, generator)
    if deform:
        def per_copy(v: torch.Tensor) -> torch.Tensor:  # [dup*N] -> [copies*N]: shared by a copy's flips
            return v.view(duplication, 1, n).expand(duplication, per_flip, n).reshape(-1)

        rot = per_copy(_choose(ROTATIONS, 0.0, duplication * n, p_aug, generator, dev))
        zoom = per_copy(_choose(ZOOMS, 1.0, duplication * n, p_aug, generator, dev))
        bright = per_copy(_choose(BRIGHTNESSES, 1.0, duplication * n, p_aug, generator, dev))
        out = _apply_where(out, rot, 0.0, lambda t, m: TF.rotate(t, m, padding_mode="reflection", mode="bicubic"))
        out = _apply_where(out, bright, 1.0, TF.brightness)
        out = _apply_where(out, zoom, 1.0, lambda t, m: TF.zoom(t, m, padding_mode="reflection", mode="bicubic"))
    out = out.clamp(0.0, 1.0).mul(255.0).round().div(255.0)
    return out


@torch.no_grad()
def candidate_losses(
    target: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    candidates: Sequence[Candidate],
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    amp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target's cross-entropy and correctness for every (image, candidate).

    Returns ``(losses float32 [N,C], correct bool [N,C])`` on ``x``'s device. For each
    candidate, one batched pass: the view of the whole set is made on ``device`` (default: the
    target's) and classified with :func:`~ltta.models.inference.predict_proba` (eval mode, bf16
    autocast on CUDA when ``amp``). The loss is ``-log p[y]``, clamped at float32's smallest
    normal number (a loss of at most 87.3) so an underflowed probability stays finite.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected float images [N,C,H,W] in [0,1], got {tuple(x.shape)} {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must be [N] = [{x.shape[0]}] labels, got shape {tuple(y.shape)}")
    if not candidates:
        raise ValueError("no candidates given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(target.parameters()).device
    dev = torch.device(device)
    xd = x.to(dev)
    yd = y.to(dev).long()
    tiny = torch.finfo(torch.float32).tiny
    losses = torch.empty(x.shape[0], len(candidates), dtype=torch.float32, device=dev)
    correct = torch.empty(x.shape[0], len(candidates), dtype=torch.bool, device=dev)
    for j, cand in enumerate(candidates):
        for start in range(0, x.shape[0], batch_size):  # views made per batch: bounded memory
            sl = slice(start, start + batch_size)
            probs = predict_proba(target, apply_candidate(xd[sl], cand), batch_size=batch_size, amp=amp)
            p_true = probs.gather(1, yd[sl, None]).squeeze(1)
            losses[sl, j] = -torch.log(p_true.clamp_min(tiny))
            correct[sl, j] = probs.argmax(1) == yd[sl]
    if not bool(torch.isfinite(losses).all()):
        raise RuntimeError("candidate losses contain NaN/inf: the target's outputs are not finite; check the model")
    return losses.to(x.device), correct.to(x.device)
