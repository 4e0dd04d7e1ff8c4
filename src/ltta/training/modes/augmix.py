"""Mode ``augmix`` (Hendrycks et al., ICLR 2020): two AugMix views of each image and AugMix's
Jensen-Shannon consistency term, as google-research/augmix ``cifar.py`` ``train`` computes it.

The AugMix augmentation and the JSD are :mod:`ltta.training.augmix`; this module makes the views for
a whole chunk at once and forms the loss. The reference trains without cutout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltta.training.augmix import augmix, jsd_loss
from ltta.training.config import TrainConfig, is_int, is_num, require
from ltta.training.mode import Forward, TrainMode


def augmix_views(x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Two AugMix views per image [N,2,C,H,W], both in one call: independent per-image draws."""
    views = augmix(
        torch.cat([x, x]), generator, width=cfg.augmix_width, depth=cfg.augmix_depth, severity=cfg.augmix_severity
    )
    return views.view(2, *x.shape).transpose(0, 1)


def augmix_loss(
    forward: Forward, xb: torch.Tensor, yb: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """google-research/augmix cifar.py ``train``: one forward pass over [clean; aug1; aug2] (3x batch,
    so batch norm sees all three), cross-entropy on the clean third only, plus
    ``jsd_weight`` (12) times the JSD of the three predictions. ``xb`` is [B,C,H,W] (the views are
    made here) or [B,3,C,H,W] with the views made beforehand (:func:`augmix_views`)."""
    if xb.dim() == 4:
        with torch.no_grad():
            xb = torch.cat([xb[:, None], augmix_views(xb, cfg, generator)], dim=1)
    n = xb.shape[0]
    logits_clean, logits_aug1, logits_aug2 = forward(xb.transpose(0, 1).flatten(0, 1)).split(n)
    loss = F.cross_entropy(logits_clean, yb, label_smoothing=cfg.label_smoothing)
    return loss + cfg.jsd_weight * jsd_loss(logits_clean, logits_aug1, logits_aug2), logits_clean


def check_augmix_keys(cfg: TrainConfig) -> None:
    """``jsd_weight`` and ``augmix_*`` (reference flags ``--mixture-width``, ``--mixture-depth``, ``--aug-severity``)."""
    require(
        is_num(cfg.jsd_weight) and cfg.jsd_weight >= 0,
        f"jsd_weight must be a finite number >= 0 (got {cfg.jsd_weight!r})",
    )
    require(
        is_int(cfg.augmix_width) and cfg.augmix_width >= 1,
        f"augmix_width must be an integer >= 1 (got {cfg.augmix_width!r})",
    )
    require(
        is_int(cfg.augmix_depth) and (cfg.augmix_depth == -1 or cfg.augmix_depth >= 1),
        f"augmix_depth must be -1 (random 1..3 per chain) or an integer >= 1 (got {cfg.augmix_depth!r})",
    )
    require(
        is_int(cfg.augmix_severity) and 1 <= cfg.augmix_severity <= 10,
        f"augmix_severity must be an integer in [1, 10] (got {cfg.augmix_severity!r})",
    )


MODE = TrainMode(augmix_loss, allows_cutout=False, views=augmix_views, check=check_augmix_keys)
