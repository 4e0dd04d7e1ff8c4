"""AugMix (Hendrycks et al., ICLR 2020), batched on the device, and its Jensen-Shannon consistency loss.

Reference: google-research/augmix, ``augmentations.py`` (ops and magnitudes) and ``cifar.py``
(``aug``: the mixture; ``train``: the JSD loss). Per image, ``width`` chains of ``depth`` ops
(depth uniform in {1, 2, 3} per chain when ``depth`` <= 0) are applied to the (already cropped and
flipped) image; the chains are mixed with Dirichlet(1, ..., 1) weights, and the mixture is blended
with the original image by ``m ~ Beta(1, 1)``: ``(1 - m) * x + m * sum_i w_i * chain_i(x)``.

The op set is the reference's default ``augmentations`` list (autocontrast, equalize, posterize,
rotate, solarize, shear_x, shear_y, translate_x, translate_y): contrast, color, brightness and
sharpness are left out because they overlap the test corruptions. Each op application draws its
level uniformly in [0.1, severity] and maps it as the reference's ``int_parameter`` /
``float_parameter`` (``level * maxval / 10``, truncated for the integer ones); the geometric ops
flip their sign with probability 1/2 and resample BILINEAR with black outside the image, as the
reference's PIL calls do.

Every random draw (chain depths, ops, levels, signs, mixing weights) is made up front as tensors
from the caller's generator, so the result does not depend on how the ops are scheduled: ``dense``
runs each op on every image and keeps it where drawn (no device sync, the fast way on a GPU),
``subset`` runs each op only on the images that drew it (least arithmetic, the fast way on a CPU).
All five geometric ops are one affine resampling with a per-image matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ltta.transforms import functional as TF

#: The reference's default op list (augmentations.py ``augmentations``), in its order.
AUGMIX_OPS: tuple[str, ...] = (
    "autocontrast",
    "equalize",
    "posterize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_OP_INDEX = {name: i for i, name in enumerate(AUGMIX_OPS)}
_MAX_RANDOM_DEPTH = 3  # cifar.py: ``np.random.randint(1, 4)`` when mixture_depth <= 0
PARAMETER_MAX = 10  # augmentations.py: levels are on a 0..10 scale
_STRATEGIES = ("auto", "dense", "subset")


def _int_parameter(level: torch.Tensor, maxval: float) -> torch.Tensor:
    """augmentations.py ``int_parameter``: ``int(level * maxval / 10)`` (levels are positive: floor)."""
    return torch.floor(level * maxval / PARAMETER_MAX)


def _float_parameter(level: torch.Tensor, maxval: float) -> torch.Tensor:
    """augmentations.py ``float_parameter``: ``level * maxval / 10``."""
    return level * maxval / PARAMETER_MAX


def _geometric_matrices(
    op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Per-image inverse affine maps [M,2,3] in PIL's pixel convention (see ``affine_pixels``).

    Identity for images whose op is not geometric. The maps are those of the reference's PIL
    calls: ``rotate(degrees)`` about the centre; ``transform(AFFINE, (1, s, 0, 0, 1, 0))`` and
    ``(1, 0, 0, s, 1, 0)`` for the shears; ``(1, 0, t, 0, 1, 0)`` and ``(1, 0, 0, 0, 1, t)`` for
    the translations, ``t`` whole pixels (``int_parameter(level, IMAGE_SIZE / 3)``).
    """
    f32 = torch.float32
    degrees = (sign * _int_parameter(level, 30.0)).to(f32)
    shear = (sign * _float_parameter(level, 0.3)).to(f32)
    shift_x = (sign * _int_parameter(level, width / 3)).to(f32)
    shift_y = (sign * _int_parameter(level, height / 3)).to(f32)
    # Image.rotate builds its inverse map with the angle negated, about (w/2, h/2): the same
    # matrix as ltta.transforms.functional.rotate (pinned against it in the tests).
    angle = -degrees * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    maps = {  # (a, b, c, d, e, f) of each op
        "rotate": (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy),
        "shear_x": (one, shear, zero, zero, one, zero),
        "shear_y": (one, zero, zero, shear, one, zero),
        "translate_x": (one, zero, shift_x, zero, one, zero),
        "translate_y": (one, zero, zero, zero, one, shift_y),
    }
    a, b, c, d, e, f = one, zero, zero, zero, one, zero  # identity for the colour ops
    for name, coeffs in maps.items():
        hit = op == _OP_INDEX[name]
        a, b, c, d, e, f = [torch.where(hit, new, old) for new, old in zip(coeffs, (a, b, c, d, e, f))]
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], 1)


# The four non-geometric ops at the reference's magnitudes: (images, levels [M]) -> images.
_COLOUR_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "autocontrast": lambda x, level: TF.autocontrast(x),
    "equalize": lambda x, level: TF.equalize(x),
    # ImageOps.posterize(img, 4 - int_parameter(level, 4)): 4 or 3 bits at severity 3.
    "posterize": lambda x, level: TF.posterize(x, 4.0 - _int_parameter(level, 4.0)),
    # ImageOps.solarize(img, 256 - int_parameter(level, 256)).
    "solarize": lambda x, level: TF.solarize(x, 256.0 - _int_parameter(level, 256.0)),
}


def apply_chain_step(
    x: torch.Tensor,
    op: torch.Tensor,
    level: torch.Tensor,
    sign: torch.Tensor,
    active: torch.Tensor,
    strategy: str = "auto",
) -> torch.Tensor:
    """One op of every chain: image i gets op ``AUGMIX_OPS[op[i]]`` at ``level[i]`` where ``active[i]``.

    ``level`` is on the reference's 0..10 scale; ``sign`` (+1/-1) applies to the geometric ops.
    Images that are not active come back unchanged (bitwise).
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(_STRATEGIES)}, got {strategy!r}")
    dense = strategy == "dense" or (strategy == "auto" and x.device.type == "cuda")
    h, w = x.shape[-2:]
    is_geo = torch.zeros_like(active)
    for name in _GEOMETRIC:
        is_geo |= op == _OP_INDEX[name]
    geo = active & is_geo
    if dense:
        moved = TF.affine_pixels(x, _geometric_matrices(op, level, sign, h, w), mode="bilinear", fill=0.0)
        out = torch.where(geo[:, None, None, None], moved, x)
        for name, fn in _COLOUR_OPS.items():
            hit = active & (op == _OP_INDEX[name])
            out = torch.where(hit[:, None, None, None], fn(out, level), out)
        return out
    out = x.clone()
    idx = geo.nonzero().squeeze(1)
    if idx.numel() > 0:
        m = _geometric_matrices(op[idx], level[idx], sign[idx], h, w)
        out[idx] = TF.affine_pixels(out[idx], m, mode="bilinear", fill=0.0)
    for name, fn in _COLOUR_OPS.items():
        idx = (active & (op == _OP_INDEX[name])).nonzero().squeeze(1)
        if idx.numel() > 0:
            out[idx] = fn(out[idx], level[idx])
    return out


def mix(x: torch.Tensor, chains: torch.Tensor, weights: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """cifar.py ``aug``'s mixture: ``(1 - m) * x + m * sum_i weights[:, i] * chains[i]``.

    ``x`` [N,C,H,W], ``chains`` [W,N,C,H,W], ``weights`` [N,W] (rows sum to 1), ``m`` [N].
    The reference mixes after ``preprocess`` (ToTensor + Normalize); the weights are convex, so
    mixing before normalisation is the same. The result is clamped to [0, 1] against rounding.
    """
    n = x.shape[0]
    if chains.dim() != 5 or chains.shape[1:] != x.shape:
        raise ValueError(f"chains must be [W,{','.join(map(str, x.shape))}], got {tuple(chains.shape)}")
    if weights.shape != (n, chains.shape[0]) or m.shape != (n,):
        raise ValueError(
            f"weights must be [N={n}, W={chains.shape[0]}] and m [N={n}], "
            f"got {tuple(weights.shape)} and {tuple(m.shape)}"
        )
    wt = weights.to(x.dtype).t()[:, :, None, None, None]  # [W,N,1,1,1]
    mixture = (wt * chains).sum(0)
    mm = m.to(x.dtype).view(-1, 1, 1, 1)
    return ((1.0 - mm) * x + mm * mixture).clamp(0.0, 1.0)


def augmix(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    width: int = 3,
    depth: int = -1,
    severity: int = 3,
    strategy: str = "auto",
) -> torch.Tensor:
    """One AugMix image per input image (float [N,C,H,W] in [0,1], on ``generator``'s device).

    ``width`` chains per image; ``depth`` ops per chain, or (``depth`` <= 0, the reference's -1)
    uniform in {1, 2, 3} per chain and image; op levels uniform in [0.1, ``severity``] on the
    0..10 scale. For the JSD loss call it on ``cat([x, x])`` and split: two independent draws.
    """
    if x.dim() != 4:
        raise ValueError(f"augmix expects images [N,C,H,W], got shape {tuple(x.shape)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"augmix width (mixture width) must be an integer >= 1, got {width!r}")
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"augmix depth must be an integer (-1: random 1..3), got {depth!r}")
    if isinstance(severity, bool) or not isinstance(severity, (int, float)) or not 0.1 <= severity <= PARAMETER_MAX:
        raise ValueError(f"augmix severity must lie in [0.1, {PARAMETER_MAX}] (the reference uses 3), got {severity!r}")
    n = x.shape[0]
    dev = x.device
    chains_n = width * n
    steps = depth if depth > 0 else _MAX_RANDOM_DEPTH
    # All draws up front, in a fixed order, so the schedule (dense or subset) cannot change them.
    if depth > 0:
        chain_depth = torch.full((chains_n,), depth, dtype=torch.long, device=dev)
    else:
        chain_depth = torch.randint(1, _MAX_RANDOM_DEPTH + 1, (chains_n,), device=dev, generator=generator)
    ops = torch.randint(0, len(AUGMIX_OPS), (steps, chains_n), device=dev, generator=generator)
    u = torch.rand((steps, chains_n), device=dev, generator=generator, dtype=torch.float64)
    levels = 0.1 + (float(severity) - 0.1) * u  # np.random.uniform(low=0.1, high=severity)
    flips = torch.rand((steps, chains_n), device=dev, generator=generator) > 0.5  # uniform() > 0.5: negate
    signs = torch.where(flips, -1.0, 1.0).to(torch.float64)
    # Dirichlet(1, ..., 1) is normalised Exp(1) draws; Beta(1, 1) is Uniform(0, 1).
    e = torch.empty((n, width), device=dev, dtype=torch.float64).exponential_(generator=generator)
    weights = (e / e.sum(1, keepdim=True).clamp_min(1e-300)).to(torch.float32)
    m = torch.rand(n, device=dev, generator=generator)

    chains = x.repeat(width, 1, 1, 1)  # chain-major: chain i of image j at i * n + j
    for s in range(steps):
        chains = apply_chain_step(chains, ops[s], levels[s], signs[s], s < chain_depth, strategy)
    return mix(x, chains.view(width, *x.shape), weights, m)


def jsd_loss(logits_clean: torch.Tensor, logits_aug1: torch.Tensor, logits_aug2: torch.Tensor) -> torch.Tensor:
    """AugMix's Jensen-Shannon consistency term, exactly as cifar.py's ``train`` computes it.

    With p the softmaxes and ``log_m = log(clamp((p_clean + p_aug1 + p_aug2) / 3, 1e-7, 1))``:
    ``(KL(p_clean || m) + KL(p_aug1 || m) + KL(p_aug2 || m)) / 3``, each KL a ``batchmean``
    (summed over classes, averaged over images). The caller weights it (reference: 12) and adds
    the clean cross-entropy. Computed in float32 whatever the logits' dtype.
    """
    if not (logits_clean.shape == logits_aug1.shape == logits_aug2.shape) or logits_clean.dim() != 2:
        raise ValueError(
            f"jsd_loss needs three logits of one shape [N,K], got {tuple(logits_clean.shape)}, "
            f"{tuple(logits_aug1.shape)}, {tuple(logits_aug2.shape)}"
        )
    p_clean, p_aug1, p_aug2 = (t.float().softmax(dim=1) for t in (logits_clean, logits_aug1, logits_aug2))
    log_mixture = ((p_clean + p_aug1 + p_aug2) / 3.0).clamp(1e-7, 1.0).log()
    return (
        F.kl_div(log_mixture, p_clean, reduction="batchmean")
        + F.kl_div(log_mixture, p_aug1, reduction="batchmean")
        + F.kl_div(log_mixture, p_aug2, reduction="batchmean")
    ) / 3.0
