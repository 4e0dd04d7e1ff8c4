"""Auxiliary Training's network (Zhang et al., *Auxiliary Training: Towards Accurate and Robust
Models*, CVPR 2020): a classifier's trunk shared by its own (primary) head and one auxiliary
head per augmentation family, with selective batch normalisation.

Reference: the authors' code, ArchipLab-LinfengZhang/Auxiliary-Training ``models.py``
(``ResNet.forward``, ``MainClassifier``, ``AuxiliaryClassifier``, ``record_bn`` / ``load_bn``):

- **What is shared.** Everything up to the feature map that the classifier globally pools
  (ResNet's ``layer4`` output there; here each architecture's ``feature_map``): every
  convolution and every batch-norm weight and bias. The primary head is the classifier's own
  pool + ``fc``; each auxiliary head (:class:`AuxiliaryClassifier`) has its own attention
  block, bottleneck and ``fc`` and only ever sees its family's images.
- **Selective batch norm.** The reference runs the trunk once per family, so each family is
  normalised with its own batch statistics, and then restores every running mean and variance
  to the values they had after the clean pass: the running statistics (the ones inference
  uses) come from clean images only. :class:`SelectiveBatchNorm2d` does the same in one pass
  over the concatenated batch ``[clean; family_1; ...]``: per-group batch statistics, the
  affine parameters shared, the running statistics updated from the clean group alone. The
  auxiliary families' statistics are never accumulated (the reference throws them away too),
  so there is nothing family-specific to keep after training.
- **At inference** only the primary classifier is used: :meth:`AuxiliaryNet.forward` outside
  :meth:`AuxiliaryNet.grouped` is exactly the wrapped classifier, and
  :meth:`AuxiliaryNet.release` hands the classifier back with plain ``BatchNorm2d`` layers, so
  a trained target is saved, loaded and exported as its own architecture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SelectiveBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training with ``views`` > 1, normalises each of ``views`` equal
    groups of the batch with the group's own statistics and updates the running statistics
    from the first (clean) group only. With ``views == 1`` (the default) or in eval mode it is
    an ordinary ``BatchNorm2d``; its parameters and buffers are those of one.
    """

    views: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views == 1 or not self.training:
            return super().forward(x)
        if x.shape[0] % self.views:
            raise ValueError(f"a batch of {x.shape[0]} cannot be split into {self.views} equal groups (one per view)")
        clean, *others = x.chunk(self.views)
        # The clean group as a plain BatchNorm2d sees it: batch statistics, running statistics updated.
        out = [super().forward(clean)]
        # Every other group with its own batch statistics, accumulating nothing.
        out += [F.batch_norm(g, None, None, self.weight, self.bias, True, 0.0, self.eps) for g in others]
        return torch.cat(out)


def _convert_batchnorm(module: nn.Module, source: type[nn.BatchNorm2d], target: type[nn.BatchNorm2d]) -> nn.Module:
    """Replace every ``source`` layer (exact type) under ``module`` by a ``target`` layer holding the
    very same parameter and buffer tensors (the pattern of torch's
    ``SyncBatchNorm.convert_sync_batchnorm``); other modules are changed in place."""
    out = module
    if type(module) is source:
        out = target(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_batchnorm(child, source, target))
    return out


def _init_like_reference(module: nn.Module) -> None:
    """The reference's init loop (``ResNet.__init__``): He-normal (fan_out, ReLU) conv weights, BN
    at (1, 0); conv biases, the transposed conv and the linear layer keep PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class AuxiliaryClassifier(nn.Module):
    """One auxiliary head on a C-channel feature map, as the reference's ``AuxiliaryClassifier``:

    - attention: conv3x3 (C->C) - BN - ReLU - transposed conv3x3 (C->C) - BN - sigmoid, a mask
      multiplied into the features;
    - bottleneck: conv1x1 (C->C/2) - BN - ReLU - conv3x3 *without padding* (C/2->C/2) - BN - ReLU -
      conv1x1 (C/2->C) - BN - ReLU - global average pool (the bottleneck convs have biases, the
      attention convs none, as there);
    - ``fc``: linear C -> classes, the layer the L2 penalty ties to the primary classifier's ``fc``.

    The unpadded 3x3 conv needs a feature map of at least 3x3 (32x32 inputs give 4x4 or 8x8).
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"an auxiliary head needs a feature map of >= 2 channels, got {channels}")
        c, h = channels, channels // 2
        self.attention = nn.Sequential(
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c, c, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.Sigmoid(),
        )
        self.bottleneck = nn.Sequential(
            nn.Conv2d(c, h, kernel_size=1),
            nn.BatchNorm2d(h),
            nn.ReLU(inplace=True),
            nn.Conv2d(h, h, kernel_size=3),
            nn.BatchNorm2d(h),
            nn.ReLU(inplace=True),
            nn.Conv2d(h, c, kernel_size=1),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(c, num_classes)
        _init_like_reference(self)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if min(fmap.shape[-2:]) < 3:
            raise ValueError(
                f"auxiliary heads need a feature map of at least 3x3 (their 3x3 conv is unpadded), got "
                f"{tuple(fmap.shape[-2:])}: train on larger images (32x32 gives 4x4 or 8x8)"
            )
        return self.fc(self.bottleneck(self.attention(fmap) * fmap).flatten(1))


class AuxiliaryNet(nn.Module):
    """A classifier (``base``) plus one :class:`AuxiliaryClassifier` per augmentation family.

    ``base`` must expose ``feature_map(x)`` (the map its classifier globally pools) and an
    ``nn.Linear`` ``fc`` on the pooled map, with ``base(x) == fc(avgpool(feature_map(x)))``: every
    architecture of :data:`ltta.models.MODELS` does. It is wrapped *in place*: its BatchNorm2d
    layers become :class:`SelectiveBatchNorm2d` (same tensors) until :meth:`release`.

    ``forward(x)`` is ``base(x)``, the primary classifier's logits. Inside :meth:`grouped`,
    ``forward`` takes ``[clean; family_1; ...; family_F]`` (F+1 equal groups, families in the
    order of ``families``) and returns the primary head's logits on the clean group followed by
    each family's head on its group, concatenated like the input.
    """

    def __init__(self, base: nn.Module, families: Sequence[str]) -> None:
        super().__init__()
        if isinstance(base, AuxiliaryNet):
            raise TypeError("the model already has auxiliary heads")
        fc = getattr(base, "fc", None)
        if not callable(getattr(base, "feature_map", None)) or not isinstance(fc, nn.Linear):
            raise TypeError(
                f"{type(base).__name__} cannot take auxiliary heads: it needs a feature_map(x) method and an nn.Linear "
                f"`fc` on the pooled map (as every architecture of ltta.models.MODELS has)"
            )
        families = tuple(families)
        if not families or len(set(families)) != len(families):
            raise ValueError(f"families must be distinct names, at least one, got {list(families)}")
        self.families = families
        self.base = _convert_batchnorm(base, nn.BatchNorm2d, SelectiveBatchNorm2d)
        self.heads = nn.ModuleDict({f: AuxiliaryClassifier(fc.in_features, fc.out_features) for f in families})
        ref = next(base.parameters())
        self.heads.to(device=ref.device, dtype=ref.dtype)
        self.views = 1
        self._released = False

    def _selective_layers(self) -> Iterator[SelectiveBatchNorm2d]:
        return (m for m in self.base.modules() if isinstance(m, SelectiveBatchNorm2d))

    @contextlib.contextmanager
    def grouped(self) -> Iterator[None]:
        """Within the block, :meth:`forward` takes ``[clean; family_1; ...]`` and the trunk's batch
        norms are selective (one group per view)."""
        if self._released:
            raise RuntimeError("this AuxiliaryNet was released; its classifier is trained and stands alone")
        views = 1 + len(self.families)
        self.views = views
        for m in self._selective_layers():
            m.views = views
        try:
            yield
        finally:
            self.views = 1
            for m in self._selective_layers():
                m.views = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views == 1:
            return self.base(x)
        if x.shape[0] % self.views:
            raise ValueError(f"a grouped batch of {x.shape[0]} images is not {self.views} equal views")
        parts = self.base.feature_map(x).chunk(self.views)
        main = self.base.fc(F.adaptive_avg_pool2d(parts[0], 1).flatten(1))
        return torch.cat([main, *(head(p) for head, p in zip(self.heads.values(), parts[1:]))])

    def head_distance(self) -> torch.Tensor:
        """Sum over auxiliary heads of ``||W_0 - W_j||^2 + ||b_0 - b_j||^2`` between the primary ``fc``
        and head j's ``fc``: the reference's ``weight_loss`` (squared differences summed)."""
        w0, b0 = self.base.fc.weight, self.base.fc.bias
        total = w0.new_zeros(())
        for head in self.heads.values():
            total = total + (w0 - head.fc.weight).pow(2).sum()
            if b0 is not None and head.fc.bias is not None:
                total = total + (b0 - head.fc.bias).pow(2).sum()
        return total

    def release(self) -> nn.Module:
        """The classifier on its own again, plain ``BatchNorm2d`` layers and all (same tensors); the
        auxiliary heads are dropped, as the paper does at inference."""
        self._released = True
        return _convert_batchnorm(self.base, SelectiveBatchNorm2d, nn.BatchNorm2d)
