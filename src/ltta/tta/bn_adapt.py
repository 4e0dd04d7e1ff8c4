"""``bn_adapt``: batch-norm statistics re-estimated on the test batch (test-time adaptation baseline).

Schneider, Rusak, Eck, Bringmann, Brendel, Bethge, *Improving robustness against common corruptions
by covariate shift adaptation* (NeurIPS 2020; bethgelab/robustness, ``robusta/batchnorm``): every
batch-norm layer normalises with a mix of the source statistics and the test batch's own,

    mu = N / (N + n) * mu_source + n / (N + n) * mu_batch      (the same for the variance)

where n is the number of test images in the batch and N the *prior strength* (N = 0: the batch's
statistics alone, "full adaptation"; N -> infinity: no adaptation). The batch's variance is the
unbiased one, as a training-mode ``batch_norm`` with momentum 1 records it (the reference's way of
estimating it). Affine parameters are unchanged; nothing is learned and nothing carries over from
one batch to the next, so the order of the stream does not matter, but each prediction depends on
the other images of its batch (``batch_size`` of the evaluation): the method adapts on the test
stream, which the report says. Cost: one forward pass per image (the statistics are computed in
the same pass).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ltta.models.inference import predict_proba
from ltta.tta.methods import TTA_METHODS, MethodContext, TTAMethod


class PriorBatchNorm2d(nn.Module):
    """A frozen ``BatchNorm2d`` that mixes its running statistics with the batch's (prior strength N)."""

    def __init__(self, layer: nn.BatchNorm2d, prior_strength: float) -> None:
        super().__init__()
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError("bn_adapt needs batch-norm layers with running statistics (the source's)")
        self.layer = layer
        self.prior_strength = float(prior_strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]  # images in the batch
        prior = 1.0 if self.prior_strength == float("inf") else self.prior_strength / (self.prior_strength + n)
        layer = self.layer
        mean = x.new_zeros(x.shape[1], dtype=torch.float32)
        var = x.new_ones(x.shape[1], dtype=torch.float32)
        F.batch_norm(x.float(), mean, var, None, None, True, 1.0, layer.eps)  # records the batch's mean, unbiased var
        mixed_mean = prior * layer.running_mean + (1.0 - prior) * mean
        mixed_var = prior * layer.running_var + (1.0 - prior) * var
        return F.batch_norm(x, mixed_mean.to(x.dtype), mixed_var.to(x.dtype), layer.weight, layer.bias, False, 0.0, layer.eps)


def with_prior_batchnorm(model: nn.Module, prior_strength: float) -> nn.Module:
    """A copy of ``model`` (eval mode) whose ``BatchNorm2d`` layers are :class:`PriorBatchNorm2d`."""
    adapted = copy.deepcopy(model).eval()
    layers = [name for name, m in adapted.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise ValueError(f"bn_adapt: {type(model).__name__} has no BatchNorm2d layer to adapt")
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = adapted.get_submodule(parent_name) if parent_name else adapted
        setattr(parent, child, PriorBatchNorm2d(getattr(parent, child), prior_strength))
    return adapted.requires_grad_(False)


@TTA_METHODS.register("bn_adapt")
class BNAdaptTTA(TTAMethod):
    """The target with batch-norm statistics from each test batch mixed with the source's (see the module)."""

    name = "bn_adapt"

    family = "adaptation"

    merges_views = False
    adapts_on_test_stream = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if not ctx.bn_prior >= 0:
            raise ValueError(f"bn_adapt: the prior strength N must be >= 0 (0: the test batch alone), got {ctx.bn_prior}")
        self.adapted = with_prior_batchnorm(ctx.target, ctx.bn_prior)

    @property
    def forward_passes(self) -> float:
        return 1.0

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return predict_proba(self.adapted, x, batch_size=self.ctx.batch_size, amp=self.ctx.amp)
