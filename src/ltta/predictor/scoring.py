"""Running the loss predictor: its scores for a batch, and the public code's flip ensemble of them.

kakaobrain/learning-loss-for-tta ``eval_l2t.py`` (``AugmentorLearned``): the predictor scores
the image and its flipped image, each through a softmax; the flipped image's scores are put back
in the original's candidate order (there: r-20 and r20 swapped) and the two are averaged.

One deliberate deviation: the public code flips with ``torch.flip(img, (1,))`` on a single
C x H x W tensor, which reverses the rows (a vertical flip), though the paper speaks of the
image's flip and its r-20/r20 swap holds for either mirror. We use the horizontal mirror: it is
the symmetry the targets are trained with (random horizontal flips), so its scores are in
distribution, and for candidate sets with flips :func:`mirror_permutation` aligns them exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

import ltta.transforms.functional as TF
from ltta.models.inference import eval_mode, model_device
from ltta.tta.candidates import Candidate, mirror_permutation


@torch.no_grad()
def predictor_scores(predictor: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The predictor's raw outputs float32 [N,C] (eval mode), on ``x``'s device.

    Images are float [N,3,H,W] in [0,1] or uint8 [N,3,H,W] (divided by 255 batch by batch, so a
    large uint8 set need not be expanded to float in memory).
    """
    if x.dim() != 4:
        raise ValueError(f"expected images [N,3,H,W], got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = model_device(predictor)
    out = []
    with eval_mode(predictor):
        for start in range(0, x.shape[0], batch_size):
            xb = as_float_images(x[start : start + batch_size].to(dev, non_blocking=True))
            out.append(predictor(xb).float().to(x.device))
    if not out:
        raise ValueError("predictor_scores got an empty batch (N = 0)")
    return torch.cat(out)


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float in [0,1]; float images pass through."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise ValueError(f"images must be float in [0,1] or uint8, got dtype {x.dtype}")
    return x


@functools.lru_cache(maxsize=64)
def _mirror_permutation(candidates: tuple[Candidate, ...], device: torch.device) -> torch.Tensor:
    """:func:`mirror_permutation` on ``device``, built once per candidate list (not a host copy per chunk)."""
    return mirror_permutation(candidates).to(device)


@torch.no_grad()
def flip_ensemble_probs(
    predictor: nn.Module, x: torch.Tensor, candidates: Sequence[Candidate], batch_size: int = 1024
) -> torch.Tensor:
    """``(softmax(f(x)) + softmax(f(hflip x))[:, perm]) / 2`` [N,C]; higher = lower predicted loss."""
    n_out = len(candidates)
    s = predictor_scores(predictor, x, batch_size)
    if s.shape[1] != n_out:
        raise ValueError(
            f"the predictor has {s.shape[1]} outputs but {n_out} candidates were given; "
            "use the candidate list the predictor was trained with"
        )
    # Two calls, not one on the concatenation: the predictor is a few % of the target's cost, and
    # on CPU a doubled batch runs slower per image (cache), so concatenating gains nothing.
    s_flip = predictor_scores(predictor, TF.hflip(x), batch_size)
    perm = _mirror_permutation(tuple(candidates), s.device)
    return (s.softmax(1) + s_flip.softmax(1)[:, perm]) / 2.0
