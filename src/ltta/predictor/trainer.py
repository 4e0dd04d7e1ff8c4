"""Training the loss predictor to rank the candidates by the frozen target's loss.

Follows kakaobrain/learning-loss-for-tta ``train.py`` (settings from ``confs/imagenet.yaml``):

- objective: ``target = softmin(losses / tau)`` (tau = 1), ``pred = softmax(output)``, SoDeep's
  Spearman loss between them (``sodeep/sodeep.py``; :func:`ltta.predictor.ranking.sodeep_style_rank_mse`);
  or, as alternatives, ``1 - rho`` on soft ranks (:func:`ltta.predictor.ranking.spearman_loss`) and,
  not in the paper, ``listwise``, ListNet's top-one cross-entropy (:mod:`ltta.predictor.listwise`). The
  ranking inside either is a *ranker* by name (``ranker``): ``sodeep``, a SoDeep sorter trained
  on synthetic sequences as the SoDeep paper does (:mod:`ltta.predictor.sodeep`; the public one is not
  published) and frozen, as the public code uses it; ``soft_rank``, Blondel et al.'s fast soft
  rank; ``pairwise_sigmoid``, a closed-form soft rank (see :mod:`ltta.predictor.ranking`);
- plus ``decay * sum ||p||_2`` over every parameter outside normalisation layers (the public
  code adds ``torch.norm(p, p=2)``, the unsquared norm, with decay 1e-5; the optimiser's own
  weight decay is 0);
- optimiser RMSpropTF (alpha 0.9, momentum 0.9, eps 1e-3; ``architectures/efficientnet_pytorch/
  rmsproptf.py``), lr 0.01 with a cosine decay to 0 stepped at fractional epochs (so per step),
  60 epochs, 128 images per step, each image with its 3 copies x 2 flips (768 rows);
- an EMA of all weights and buffers (``ema.py``: decay ``min(0.999, (1 + t) / (10 + t))`` at
  update t), which is the model evaluated and returned;
- the predictor's input gets cutout (``dataloader.py`` ``cutout``: a square centred uniformly,
  clipped at the border, filled with a random grey level; side ``(size // 3) * 3``, i.e. about
  the whole image) while the labels come from the uncut image; validation inputs are uncut.

Reported per epoch, as train.py logs them: the loss, the mean loss under the predictor's choice,
under identity and under the oracle's choice, the rank correlation of predicted vs true (Spearman
here, Pearson of the softmaxes there), plus the same for a random ranking as a baseline.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ltta.checkpoint import private_rng
from ltta.registry import Registry
from ltta.predictor.listwise import softmin_cross_entropy
from ltta.predictor.ranking import RANKERS, Ranker, build_ranker, sodeep_style_rank_mse, spearman_loss, spearman_rho
from ltta.predictor.quality import check_loss_table, predictor_quality, prior_scores
from ltta.predictor.scoring import as_float_images, predictor_scores


# ---------------------------------------------------------------- optimiser


class RMSpropTF(torch.optim.Optimizer):
    """TensorFlow's RMSprop with momentum, as the public code's ``RMSpropTF``.

    Differences from ``torch.optim.RMSprop``: the mean square starts at 1 (not 0) and epsilon is
    added inside the square root. Per step: ``ms += (1 - alpha) * (g^2 - ms)``;
    ``mom = momentum * mom + lr * g / sqrt(ms + eps)``; ``p -= mom``.
    """

    def __init__(
        self, params: Any, lr: float = 0.01, alpha: float = 0.9, eps: float = 1e-3, momentum: float = 0.9
    ) -> None:
        if lr < 0 or eps < 0 or not 0 <= alpha < 1 or momentum < 0:
            raise ValueError(f"RMSpropTF: bad settings lr={lr} alpha={alpha} eps={eps} momentum={momentum}")
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["ms"] = torch.ones_like(p)
                    state["mom"] = torch.zeros_like(p)
                g = p.grad
                ms, mom = state["ms"], state["mom"]
                ms.add_((g * g - ms) * (1.0 - group["alpha"]))
                mom.mul_(group["momentum"]).addcdiv_(g, (ms + group["eps"]).sqrt(), value=group["lr"])
                p.sub_(mom)
        return loss


OPTIMIZERS: Registry[Callable[[Any, "PredictorConfig"], torch.optim.Optimizer]] = Registry("predictor optimizer")
# train.py: RMSpropTF(alpha=0.9, momentum=0.9, eps=0.001); Adam(amsgrad=True); SGD(nesterov=True).
OPTIMIZERS.add(
    "rmsprop_tf", lambda params, cfg: RMSpropTF(params, lr=cfg.lr, alpha=0.9, eps=1e-3, momentum=cfg.momentum)
)
OPTIMIZERS.add("adam", lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, amsgrad=True))
OPTIMIZERS.add("sgd", lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True))


# ---------------------------------------------------------------- objectives


def _sodeep_objective(logits: torch.Tensor, losses: torch.Tensor, cfg: PredictorConfig, ranker: Ranker) -> torch.Tensor:
    target = torch.softmax(-losses / cfg.tau, dim=1)  # softmin(losses / tau)
    return sodeep_style_rank_mse(torch.softmax(logits, dim=1), target, ranker, cfg.t_easy)


def _spearman_objective(logits: torch.Tensor, losses: torch.Tensor, cfg: PredictorConfig, ranker: Ranker) -> torch.Tensor:
    return spearman_loss(logits, -losses, ranker)


def _listwise_objective(logits: torch.Tensor, losses: torch.Tensor, cfg: PredictorConfig, ranker: Ranker) -> torch.Tensor:
    return softmin_cross_entropy(logits, losses, cfg.tau)  # no ranker: ListNet's top-one probabilities


# (logits, losses, cfg, ranker) -> loss
Objective = Callable[[torch.Tensor, torch.Tensor, "PredictorConfig", Ranker], torch.Tensor]
OBJECTIVES: Registry[Objective] = Registry("predictor objective")
OBJECTIVES.add("sodeep_style", _sodeep_objective)
OBJECTIVES.add("spearman", _spearman_objective)
OBJECTIVES.add("listwise", _listwise_objective)  # ltta.predictor.listwise: top-heavy, not in the paper


@dataclass
class PredictorConfig:
    """Predictor training settings; defaults are the public code's ImageNet ones where it has them."""

    epochs: int = 60  # confs/imagenet.yaml
    batch_size: int = 768  # rows per step: 128 images x 3 copies x 2 flips (train.py, imagenet.yaml)
    lr: float = 0.01  # initial learning rate, cosine to 0
    weight_decay: float = 1e-5  # coefficient of sum ||p||_2 over non-norm-layer parameters
    ema_decay: float = 0.999  # EMA of weights and buffers, with the (1+t)/(10+t) warm-up
    tau: float = 1.0  # softmin temperature of the target (sodeep_style objective)
    # pairwise_sigmoid's temperature / soft_rank's regularisation strength, on the scale of the ranked
    # scores: ~0.01 on softmax outputs (sodeep_style), ~0.1-1 on logits (spearman); unused by sodeep
    rank_temperature: float = 0.01
    objective: str = "sodeep_style"  # or "spearman" (1 - rho on soft ranks of the raw outputs), "listwise"
    ranker: str = "pairwise_sigmoid"  # or "soft_rank", "sodeep" (needs a trained sorter: train_predictor(sorter=))
    t_easy: float = 0.05  # sodeep_style: squared rank errors up to this are masked (sodeep.py)
    optimizer: str = "rmsprop_tf"  # or "adam", "sgd"
    momentum: float = 0.9  # rmsprop_tf and sgd
    cutout: float = 1.0  # cutout side as a fraction of the image side (0 = off); public: 222/224 px
    eval_batch_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.ema_decay < 1, "ema_decay must lie in [0, 1)"),
            (self.tau > 0, "tau must be > 0"),
            (self.rank_temperature > 0, "rank_temperature must be > 0"),
            (self.t_easy >= 0, "t_easy must be >= 0"),
            (self.cutout >= 0, "cutout must be >= 0"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"PredictorConfig: {msg}")
        if self.objective not in OBJECTIVES:
            known = ", ".join(OBJECTIVES.names())
            raise ValueError(f"PredictorConfig: unknown objective {self.objective!r}; known: {known}")
        if self.ranker not in RANKERS:
            known = ", ".join(RANKERS.names())
            raise ValueError(f"PredictorConfig: unknown ranker {self.ranker!r}; known: {known}")
        if self.optimizer not in OPTIMIZERS:
            known = ", ".join(OPTIMIZERS.names())
            raise ValueError(f"PredictorConfig: unknown optimizer {self.optimizer!r}; known: {known}")


# ---------------------------------------------------------------- pieces


def predictor_cutout(x: torch.Tensor, side: float, generator: torch.Generator) -> torch.Tensor:
    """dataloader.py ``cutout``: per image, a square of ``side`` px centred uniformly in the image,
    clipped at the border (PIL rectangle, both corners inclusive), painted a random grey level."""
    if side <= 0:
        return x
    n, _, h, w = x.shape
    dev = x.device
    cx = torch.rand(n, device=dev, generator=generator) * w
    cy = torch.rand(n, device=dev, generator=generator) * h
    grey = torch.randint(0, 256, (n,), device=dev, generator=generator).to(x.dtype) / 255.0
    x0, x1 = (cx - side / 2).clamp(min=0).floor(), (cx + side / 2).clamp(max=w)
    y0, y1 = (cy - side / 2).clamp(min=0).floor(), (cy + side / 2).clamp(max=h)
    cols = torch.arange(w, device=dev, dtype=torch.float32)
    rows = torch.arange(h, device=dev, dtype=torch.float32)
    in_x = (cols[None] >= x0[:, None]) & (cols[None] <= x1[:, None])
    in_y = (rows[None] >= y0[:, None]) & (rows[None] <= y1[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    return torch.where(mask, grey.view(-1, 1, 1, 1), x)


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def penalised_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside normalisation layers (train.py: names without ``_bn`` / ``.bn``)."""
    skip = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    return [p for p in model.parameters() if id(p) not in skip]


class WeightEMA:
    """An exponential moving average of a model's parameters *and* buffers (ema.py averages the
    whole state dict, BN statistics included).

    The first update copies the model; update t >= 1 uses ``mu = min(decay, (1 + t) / (10 + t))``
    (TF ExponentialMovingAverage's num_updates warm-up, as ema.py). Integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        mu = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates)) if self.updates else 0.0
        src = model.state_dict()
        for name, avg in self.module.state_dict().items():
            cur = src[name].detach()
            if avg.is_floating_point():
                avg.lerp_(cur, 1.0 - mu)
            else:
                avg.copy_(cur)
        self.updates += 1


# ---------------------------------------------------------------- training


def train_predictor(
    predictor: nn.Module,
    x_train: torch.Tensor,
    losses_train: torch.Tensor,
    x_valid: torch.Tensor,
    losses_valid: torch.Tensor,
    cfg: PredictorConfig,
    *,
    device: torch.device | str,
    identity_index: int = 0,
    sorter: nn.Module | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train ``predictor`` in place; return its EMA copy (the one to evaluate and save) and the history.

    ``sorter``: the trained SoDeep sorter that ranker ``sodeep`` needs (:func:`ltta.predictor.sodeep.ensure_sorter`);
    it is moved to ``device`` and frozen (its weights never change, as in the public code).

    Images: float [N,3,H,W] in [0,1] or uint8 [N,3,H,W] (kept uint8 on the device, converted per
    batch); losses: float [N,C] (column ``identity_index`` is identity). Both sets are moved to
    ``device`` once. After every epoch the EMA model is scored on the validation set with
    :func:`predictor_quality` (keys prefixed ``valid_``; the prior is the training table's
    :func:`prior_scores`), next to ``train_loss``, ``lr``,
    ``valid_raw_spearman_rho`` (the non-averaged weights) and ``seconds``; ``on_epoch(epoch,
    metrics)`` gets that dict (epochs count from 1). A non-finite loss stops with a RuntimeError.
    """
    check_loss_table(x_train, losses_train, "train_predictor (train)")
    check_loss_table(x_valid, losses_valid, "train_predictor (valid)")
    if losses_train.shape[1] != losses_valid.shape[1]:
        raise ValueError(f"train has {losses_train.shape[1]} candidates but valid has {losses_valid.shape[1]}")
    dev = torch.device(device)
    predictor.to(dev)
    xt, lt = x_train.to(dev), losses_train.to(dev).float()
    xv, lv = x_valid.to(dev), losses_valid.to(dev).float()
    prior = prior_scores(lt)
    n = xt.shape[0]
    steps_per_epoch = max(1, n // cfg.batch_size)  # drop_last, as train.py
    total = cfg.epochs * steps_per_epoch
    optimizer = OPTIMIZERS.get(cfg.optimizer)(predictor.parameters(), cfg)
    cosine = lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))  # noqa: E731 - per step, to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    objective = OBJECTIVES.get(cfg.objective)
    if sorter is not None:
        # Frozen, but left in train mode: cuDNN's RNN backward (the gradient to the sorter's *input*)
        # only runs in training mode; the sorters have no dropout or batch norm, so the output is the
        # same (the public code also calls spearman_loss.train()).
        sorter.to(dev).train().requires_grad_(False)
    ranker = build_ranker(cfg.ranker, cfg.rank_temperature, sorter)
    penalised = penalised_parameters(predictor)
    ema = WeightEMA(predictor, cfg.ema_decay)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    side = cfg.cutout * xt.shape[-1]
    history: list[dict[str, float]] = []
    epochs = tqdm(range(1, cfg.epochs + 1), desc="predictor", disable=not progress)
    with private_rng(dev, cfg.seed):  # the global stream (dropout, branch drop), private to the run
        for epoch in epochs:
            t0 = time.time()
            predictor.train()
            perm = torch.randperm(n, device=dev, generator=gen)
            loss_sum = torch.zeros((), device=dev)
            for step in range(steps_per_epoch):
                idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                xb = predictor_cutout(as_float_images(xt[idx]), side, gen)
                loss = objective(predictor(xb), lt[idx], cfg, ranker)
                if cfg.weight_decay:
                    loss = loss + cfg.weight_decay * sum(p.norm(2) for p in penalised)
                if not bool(torch.isfinite(loss)):
                    raise RuntimeError(
                        f"predictor training diverged: the loss is {float(loss.detach())} "
                        f"at epoch {epoch}, step {step + 1}; "
                        f"lower lr (now {schedule.get_last_lr()[0]:.3g}) or check the predictor's weights and inputs"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                ema.update(predictor)
                loss_sum += loss.detach()
            ema_model = ema.module
            metrics: dict[str, float] = {"epoch": float(epoch), "lr": float(schedule.get_last_lr()[0])}
            metrics["train_loss"] = float(loss_sum) / steps_per_epoch
            quality = predictor_quality(
                ema_model, xv, lv, identity_index=identity_index, prior=prior, batch_size=cfg.eval_batch_size
            )
            metrics.update({f"valid_{k}": v for k, v in quality.items()})
            raw = predictor_scores(predictor, xv, cfg.eval_batch_size)
            metrics["valid_raw_spearman_rho"] = float(spearman_rho(raw, -lv).nanmean())
            metrics["seconds"] = time.time() - t0
            if math.isnan(metrics["valid_spearman_rho"]):
                raise RuntimeError(
                    f"predictor training collapsed at epoch {epoch}: Spearman's rho is undefined on every valid "
                    "image, so the averaged predictor scores all candidates alike (or every image's losses are "
                    f"equal); lower lr (now {metrics['lr']:.3g}) and check the loss dataset"
                )
            history.append(metrics)
            epochs.set_postfix(loss=f"{metrics['train_loss']:.4f}", rho=f"{metrics['valid_spearman_rho']:.3f}")
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    ema_model = ema.module
    ema_model.eval()
    return ema_model, history


def config_dict(cfg: PredictorConfig) -> dict[str, Any]:
    """The config as a flat dict (for logging as parameters)."""
    return asdict(cfg)


__all__ = [
    "OBJECTIVES",
    "OPTIMIZERS",
    "PredictorConfig",
    "RMSpropTF",
    "WeightEMA",
    "config_dict",
    "penalised_parameters",
    "predictor_cutout",
    "train_predictor",
]
