"""The loss predictor: from the untransformed image, one score per candidate test-time transform.

The public predictor (kakaobrain/learning-loss-for-tta ``networks.py`` -> ``efficientnet-l2t`` in
``architectures/efficientnet_pytorch/model.py``) is an ImageNet-pretrained EfficientNet-B0 run
on the image resized to 64x64. It pools the outputs of blocks 1, 3, 5 and 11 (24, 40, 80, 192
channels), passes each through its own FC + ReLU (with a per-sample drop of the whole pooled
feature, ``drop_connect2``, p = 0.2, scaled by 1 - p at test time), concatenates them with the
pooled 1280-d head feature, applies dropout 0.3 and one linear layer to the 12 outputs. Its
cost is about 0.8% of the ResNet-50 target's (B0 at 64x64: ~0.03 GMACs vs 4.1 GMACs).

No CIFAR predictor is published. This is a small analogue at the CIFAR resolution (32x32, no
resizing), built the same way: a plain conv-BN-ReLU trunk with four stages (32, 16, 8, 4 pixels;
``width``, 2x, 4x, 8x channels), the pooled output of each stage through FC + ReLU with the same
branch drop, concatenated with a pooled 1x1-conv head feature (16x ``width``), dropout, one
linear layer. Measured with ``torch.utils.flop_counter.FlopCounterMode`` at 32x32: width 16
is 28 MFLOPs (4.3% of WRN-40-2's 655 MFLOPs), width 8 is 7.2 MFLOPs (1.1%): the "few
percent of the target" of the paper, where a copy of B0 would cost more than the target itself.
It is trained from scratch (the public one starts from ImageNet weights, which do not exist for
a 32x32 trunk).

Outputs are scores: higher means the candidate is predicted to give a *lower* loss (the public
code trains ``softmax(output)`` to rank like ``softmin(losses / tau)``, so an output is
``-loss / tau`` up to a per-image constant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ltta.models.layers import CIFAR_MEAN, CIFAR_STD, Normalize, init_kaiming
from ltta.models.registry import MODELS


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BranchDrop(nn.Module):
    """The public code's ``drop_connect2`` on a pooled branch feature [N,D].

    Training: each sample's whole feature is zeroed with probability ``p`` (no rescaling);
    evaluation: the feature is scaled by ``1 - p``, its expected value in training.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"branch drop probability must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        if not self.training:
            return x * (1.0 - self.p)
        keep = torch.rand(x.shape[0], 1, device=x.device, dtype=x.dtype) >= self.p
        return x * keep.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LossPredictor(nn.Module):
    """Multi-scale conv predictor of the per-candidate loss ranking (see the module docstring)."""

    def __init__(
        self,
        num_outputs: int = 12,
        width: int = 16,
        dropout: float = 0.3,
        branch_drop: float = 0.2,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
    ) -> None:
        super().__init__()
        if num_outputs < 2:
            raise ValueError(f"num_outputs must be >= 2 (one score per candidate), got {num_outputs}")
        if width < 1:
            raise ValueError(f"loss_predictor width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        w = width
        self.num_outputs = num_outputs
        self.normalize = Normalize(mean, std)
        self.stem = _conv_bn_relu(3, w)
        self.stages = nn.ModuleList(
            [
                _conv_bn_relu(w, w),  # 32x32
                nn.Sequential(_conv_bn_relu(w, 2 * w, stride=2), _conv_bn_relu(2 * w, 2 * w)),  # 16x16
                nn.Sequential(_conv_bn_relu(2 * w, 4 * w, stride=2), _conv_bn_relu(4 * w, 4 * w)),  # 8x8
                nn.Sequential(_conv_bn_relu(4 * w, 8 * w, stride=2), _conv_bn_relu(8 * w, 8 * w)),  # 4x4
            ]
        )
        branch_ch = [w, 2 * w, 4 * w, 8 * w]
        self.branch_fc = nn.ModuleList([nn.Linear(c, c) for c in branch_ch])
        self.branch_drop = BranchDrop(branch_drop)
        self.head = _conv_bn_relu(8 * w, 16 * w, kernel=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(sum(branch_ch) + 16 * w, num_outputs)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(self.normalize(x))
        feats = []
        for stage, fc in zip(self.stages, self.branch_fc):
            out = stage(out)
            feats.append(self.branch_drop(torch.relu(fc(self.pool(out).flatten(1)))))
        feats.append(self.pool(self.head(out)).flatten(1))
        return self.fc(self.dropout(torch.cat(feats, dim=1)))


@MODELS.register("loss_predictor")
def loss_predictor(
    num_outputs: int = 12,
    width: int = 16,
    dropout: float = 0.3,
    branch_drop: float = 0.2,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> LossPredictor:
    """The CIFAR loss predictor (dropout 0.3 and branch drop 0.2 as the public code's)."""
    return LossPredictor(num_outputs, width, dropout, branch_drop, mean, std)
