"""Auxiliary Training (Zhang et al., *Auxiliary Training: Towards Accurate and Robust Models*, CVPR
2020) as a training mode: auxiliary classifiers trained on augmented copies of each batch, one per
augmentation family, sharing the classifier's trunk under selective batch norm
(:mod:`ltta.models.auxiliary`), taught by the primary classifier through input-aware
self-distillation, and tied to it by an L2 penalty at the end of training.

Reference: the authors' code, ArchipLab-LinfengZhang/Auxiliary-Training ``train.py`` (the loss and
its schedule, the augmentation pipelines ``trans_*``), ``utils.py`` (``GaussianNoise``,
``CrossEntropy``) and ``models.py``; the code is followed wherever the two could differ. The
paper's objective (as restated by readers of it; its full text was not at hand when this was
written) is ``L = sum_j alpha_j CE(g_j(f(T_j x)), y) + lambda * sum_{j>0} Omega_j`` with
``Omega_j = KL(g_0(f(T_0 x)) || g_j(f(T_j x))) + gamma * ||theta_0 - theta_j||^2``, alpha_0 = 1,
alpha_j = lambda = 0.05, and gamma switched from 0 to 1 at the end of training. Per batch of n
clean images (already cropped and flipped) this module computes, as ``train.py`` does::

    CE(main(clean), y)
      + aux_ce_weight      * sum_j CE(aux_j(T_j x), y)                       # alpha = 0.05
      + aux_distill_weight * sum_j T^2 KL(softmax(main(clean)/T) || softmax(aux_j(T_j x)/T))
      + merge_weight(epoch) * sum_j ||W_0 - W_j||^2 + ||b_0 - b_j||^2         # fc layers only

with the clean prediction detached (the teacher; ``output_clean.detach()`` in ``train.py``). Where
the two readings differ:

- distillation: ``train.py`` uses the soft cross-entropy ``-sum p_clean log p_aux`` at temperature
  1, which is the paper's KL plus the teacher's entropy, a constant: the same gradients. We use the
  KL, with a temperature (``aux_temperature``, default 1 as there; Hinton's T^2 factor keeps the
  gradient scale, and is 1 at T = 1);
- the L2 penalty: the paper's formula puts lambda in front of gamma; ``train.py`` adds the penalty
  with weight 1 (``loss += weight_loss``), which is ``aux_merge_weight``'s default;
- the schedule: the only weight that changes during training is the penalty's (the paper's
  gamma in {0, 1}); the distillation and auxiliary CE weights are constant. ``train.py`` turns
  the penalty on from epoch 180 of 210 (its last learning-rate step); ``aux_merge_start`` is that
  point as a fraction of the run (0.857), so it scales to other epoch counts. The paper's CIFAR
  text reports 300 epochs; the code's step schedule (lr / 10 at 60, 140, 180) is not reproduced:
  this trainer decays the learning rate by a cosine.

The augmentation families are the reference's four (``train.py``: ``trans_blur``,
``trans_noise``, ``trans_contrast``, ``trans_rotate``), batched on the device with per-image
draws (:data:`AUX_FAMILIES`). They overlap the benchmark's corruptions by design (the paper trains
on corruptions to be robust to them): ``noise`` is the test set's ``gaussian_noise`` between
severities 2 and 3 (sigma 0.078); ``contrast`` (a colour jitter) covers the test ``brightness``
and ``contrast`` and the held-out extra ``saturate``; ``blur`` is a Gaussian blur like the
held-out extra ``gaussian_blur`` (sigma 1 = its severity 5) and akin to the test blurs; ``rotate``
matches no corruption. None of the benchmark's corruption ops is called here (see
:data:`FAMILY_OVERLAPS`); drop families through ``aux_families`` to keep a corruption unseen.

One deviation in the pipeline: the reference corrupts the raw image and then crops (and flips)
each view with its own draw; here every view starts from the batch the trainer prepared (crop,
flip), so the views of an image share its crop and flip, and the corruption comes after the crop.
The reference's ``rotate`` view is not flipped; here it inherits the batch's flip (the rotation
angle is symmetric, so this only adds mirror images to that family).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ltta.checkpoint import private_rng
from ltta.models.auxiliary import AuxiliaryNet
from ltta.registry import Registry
from ltta.training.config import TrainConfig, is_num, require
from ltta.training.mode import Forward, TrainMode
from ltta.transforms import functional as TF

# The reference's defaults are TrainConfig's (train.py): ``CE * args.alpha`` and ``CrossEntropy *
# args.beta``, 0.05 each; the L2 penalty's weight once on (``loss += weight_loss``: 1) and when it
# comes on: from epoch 180 of 210 (``if epoch >= 180``, 0-based), as a fraction of the run (0.857).
AUX_MERGE_WEIGHT: float = TrainConfig.aux_merge_weight
AUX_MERGE_START: float = TrainConfig.aux_merge_start
# The heads' initial weights come from the run's seed (seed: data order, seed + 1: dropout).
_HEAD_SEED_OFFSET = 2


# ---------------------------------------------------------------- augmentation families


def pil_box_radius(radius: float, passes: int = 3) -> float:
    """The fractional box radius Pillow's ``GaussianBlur(radius)`` uses for each of its ``passes`` box
    blurs (Pillow src/libImaging/BoxBlur.c ``_gaussian_blur_radius``, after Gwosdek et al., SSVM
    2011, "Theoretical foundations of Gaussian convolution by extended box filtering")."""
    sigma2 = radius * radius / passes
    length = math.sqrt(12.0 * sigma2 + 1.0)
    whole = math.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) ** 2))
    return whole + frac


@functools.lru_cache(maxsize=16)
def _box_kernel(radius: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Pillow's extended box: ``2*floor(r)+1`` taps of weight 1 and one of weight ``r - floor(r)`` at
    each end, normalised by ``2r + 1`` (BoxBlur.c ``ImagingLineBoxBlur``: ``ww``, ``fw``)."""
    whole = int(radius)
    frac = radius - whole
    taps = [frac] + [1.0] * (2 * whole + 1) + [frac]
    return torch.tensor(taps, dtype=dtype, device=device) / (2.0 * radius + 1.0)


def pil_gaussian_blur(x: torch.Tensor, radius: float, passes: int = 3) -> torch.Tensor:
    """Pillow ``ImageFilter.GaussianBlur(radius)`` on float images [N,C,H,W]: ``passes`` extended box
    blurs along the rows, then as many along the columns, edge pixels repeated outside the image
    (BoxBlur.c). Pillow rounds to 8 bits after every pass; this stays in float."""
    if radius <= 0:
        return x
    n, c, h, w = x.shape
    k = _box_kernel(pil_box_radius(radius, passes), x.device, x.dtype)
    pad = k.numel() // 2
    y = x.reshape(n * c, 1, h, w)
    for _ in range(passes):
        y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    for _ in range(passes):
        y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """train.py ``trans_blur``: ``PIL.ImageFilter.GaussianBlur(1.0)`` (deterministic)."""
    return pil_gaussian_blur(x, 1.0)


# utils.py ``GaussianNoise(20)``: N(0, 20^2) on 8-bit levels.
_NOISE_SIGMA = 20.0 / 255.0


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """train.py ``trans_noise``: additive Gaussian noise of sigma 20 levels, per pixel and channel.

    The reference adds ``np.uint8(noise)`` to the uint8 image in place, so negative noise and
    overflow wrap around modulo 256 (a black pixel can turn white); we clip to [0, 1] instead,
    as the benchmark's ``gaussian_noise`` does, and keep the noise real-valued (no truncation).
    """
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + _NOISE_SIGMA * noise).clamp(0.0, 1.0)


# train.py ``trans_contrast``: ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0).
_JITTER = 0.5
_JITTER_OPS = (TF.brightness, TF.contrast, TF.color)


def _color_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """train.py ``trans_contrast``: torchvision ``ColorJitter(0.5, 0.5, 0.5, 0)`` on the PIL image.

    Per image: brightness, contrast and saturation factors uniform in [0.5, 1.5], applied in a
    random order (torchvision shuffles the adjustments per call; hue 0 is skipped), each the PIL
    ``ImageEnhance`` op that torchvision calls on PIL images (``TF.brightness``, ``TF.contrast``,
    ``TF.color``). All three ops run on the batch at every step; each image keeps the one it drew.
    """
    n = x.shape[0]
    factors = 1.0 + _JITTER * (2.0 * torch.rand(len(_JITTER_OPS), n, generator=generator, device=x.device) - 1.0)
    order = torch.rand(n, len(_JITTER_OPS), generator=generator, device=x.device).argsort(dim=1)
    out = x
    for step in range(len(_JITTER_OPS)):
        chosen = order[:, step].view(-1, 1, 1, 1)
        stepped = out
        for i, op in enumerate(_JITTER_OPS):
            stepped = torch.where(chosen == i, op(out, factors[i]), stepped)
        out = stepped
    return out


_ROTATE_DEGREES = 30.0  # train.py ``transforms.RandomRotation(30)``


def _rotate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """train.py ``trans_rotate``: ``RandomRotation(30)``, an angle uniform in [-30, 30] degrees per
    image, PIL's default NEAREST resampling about the centre, black outside the image."""
    u = torch.rand(x.shape[0], generator=generator, device=x.device)
    return TF.rotate(x, (2.0 * u - 1.0) * _ROTATE_DEGREES, fill=0.0, mode="nearest")


Family = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

#: Augmentation families, one auxiliary head each: ``fn(x [B,3,H,W] in [0,1], generator) -> x``.
#: The default order is the reference's (train.py ``loaders``: blur, noise, contrast, rotate).
AUX_FAMILIES: Registry[Family] = Registry("auxiliary-training family")
AUX_FAMILIES.add("blur", _blur)
AUX_FAMILIES.add("noise", _noise)
AUX_FAMILIES.add("contrast", _color_jitter)
AUX_FAMILIES.add("rotate", _rotate)
DEFAULT_FAMILIES: tuple[str, ...] = TrainConfig.aux_families
#: The benchmark corruptions (ltta.corruptions) each family resembles: test ones and held-out extras.
FAMILY_OVERLAPS: dict[str, tuple[str, ...]] = {
    "blur": ("gaussian_blur", "defocus_blur"),
    "noise": ("gaussian_noise",),
    "contrast": ("brightness", "contrast", "saturate"),
    "rotate": (),
}


# ---------------------------------------------------------------- the mode


def auxiliary_merge_weight(
    epoch: int, epochs: int, start: float = AUX_MERGE_START, weight: float = AUX_MERGE_WEIGHT
) -> float:
    """The L2 penalty's weight (the paper's gamma) in 1-based ``epoch`` of ``epochs``: 0 for the first
    ``round(start * epochs)`` epochs, then ``weight`` (train.py: 0-based ``epoch >= 180`` of 210)."""
    return weight if epoch > round(start * epochs) else 0.0


def attach_auxiliary(model: nn.Module, cfg: TrainConfig) -> AuxiliaryNet:
    """``model`` with one auxiliary head per ``cfg.aux_families`` and selective batch norm (in place).

    The heads' initial weights are drawn from ``cfg.seed`` on a forked CPU generator, so a run is
    reproducible and the caller's global random state is left alone.
    """
    with private_rng(torch.device("cpu"), cfg.seed + _HEAD_SEED_OFFSET):  # the heads are built on the CPU
        return AuxiliaryNet(model, cfg.aux_families)


def detach_auxiliary(trainee: nn.Module) -> None:
    """Drop the auxiliary heads after training: the classifier stands alone, plain batch norms again."""
    if not isinstance(trainee, AuxiliaryNet):
        raise TypeError(f"expected the AuxiliaryNet that attach_auxiliary returned, got {type(trainee).__name__}")
    trainee.release()


def auxiliary_views(x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """One view per family of ``cfg.aux_families`` for each image, [N,F,C,H,W] (batched, per-image draws)."""
    return torch.stack([AUX_FAMILIES.get(f)(x, generator) for f in cfg.aux_families], dim=1)


def auxiliary_loss(
    forward: Forward, xb: torch.Tensor, yb: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """train.py's step: one pass over ``[clean; blur(clean); noise(clean); ...]`` (selective batch norm
    keeps each family's statistics apart), the loss of the module docstring; returns it with the
    primary classifier's logits on the clean images."""
    net = forward.model
    if not isinstance(net, AuxiliaryNet):
        raise TypeError(
            f"mode 'auxiliary' trains an AuxiliaryNet, got {type(net).__name__}: pass the plain classifier to "
            f"train_classifier, which attaches the heads (or build one with attach_auxiliary(model, cfg))"
        )
    n, k = xb.shape[0], len(net.families)
    if xb.dim() == 4:
        with torch.no_grad():
            xb = torch.cat([xb[:, None], auxiliary_views(xb, cfg, generator)], dim=1)
    if xb.shape[1] != 1 + k:
        raise ValueError(f"got {xb.shape[1] - 1} views per image for {k} auxiliary heads ({', '.join(net.families)})")
    views = xb.transpose(0, 1).flatten(0, 1)  # [clean; family 1; ...], n images each
    with net.grouped():
        logits = forward(views)
    main, aux = logits[:n], logits[n:]
    loss = F.cross_entropy(main, yb, label_smoothing=cfg.label_smoothing)
    # Each family's mean over its n images, summed over families.
    aux_ce = F.cross_entropy(aux, yb.repeat(k), reduction="sum", label_smoothing=cfg.label_smoothing) / n
    t = cfg.aux_temperature
    teacher = (main.detach() / t).softmax(dim=1).repeat(k, 1)
    distill = F.kl_div((aux / t).log_softmax(dim=1), teacher, reduction="sum") / n
    loss = loss + cfg.aux_ce_weight * aux_ce + cfg.aux_distill_weight * (t * t) * distill
    gamma = auxiliary_merge_weight(forward.epoch, cfg.epochs, cfg.aux_merge_start, cfg.aux_merge_weight)
    if gamma > 0:
        loss = loss + gamma * net.head_distance()
    return loss, main


def check_auxiliary_keys(cfg: TrainConfig) -> None:
    """``aux_families`` (distinct names in :data:`AUX_FAMILIES`) and the loss's weights and schedule."""
    families = cfg.aux_families
    require(
        isinstance(families, (tuple, list))
        and len(families) > 0
        and len(set(families)) == len(families)
        and all(isinstance(f, str) and f in AUX_FAMILIES for f in families),
        f"aux_families must be distinct names from {', '.join(AUX_FAMILIES.names())}, at least one "
        f"(got {families!r})",
    )
    for weight in ("aux_ce_weight", "aux_distill_weight", "aux_merge_weight"):
        value = getattr(cfg, weight)
        require(is_num(value) and value >= 0, f"{weight} must be a finite number >= 0 (got {value!r})")
    require(
        is_num(cfg.aux_temperature) and cfg.aux_temperature > 0,
        f"aux_temperature must be a finite number > 0 (got {cfg.aux_temperature!r})",
    )
    require(
        is_num(cfg.aux_merge_start) and 0 <= cfg.aux_merge_start <= 1,
        f"aux_merge_start must be a fraction of the epochs in [0, 1] (got {cfg.aux_merge_start!r})",
    )


# The reference (ArchipLab-LinfengZhang/Auxiliary-Training train.py) trains without cutout.
MODE = TrainMode(
    auxiliary_loss, allows_cutout=False, attach=attach_auxiliary, detach=detach_auxiliary, views=auxiliary_views,
    check=check_auxiliary_keys,
)
