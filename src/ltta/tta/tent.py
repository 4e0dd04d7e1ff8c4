"""``tent``: entropy minimisation on the batch-norm affine parameters, online over each test set.

Wang, Shelhamer, Liu, Olshausen, Darrell, *Tent: Fully Test-Time Adaptation by Entropy
Minimization* (ICLR 2021; DequanWang/tent ``tent.py`` and ``cfgs/tent.yaml``), as its CIFAR-10-C
setting runs it:

- the model in training mode, batch norm normalising with the *test batch's* statistics (no
  running statistics), every parameter frozen except the batch-norm scales and shifts;
- per test batch, one step (``STEPS: 1``): forward, the mean Shannon entropy of the softmax, its
  gradient, one Adam update (lr 1e-3, betas (0.9, 0.999), no weight decay); the batch's
  prediction is the forward *before* the update, as ``forward_and_adapt`` returns it;
- online: the adapted parameters and Adam's state carry from one batch to the next within a
  corrupted set, and are reset to the source model's (and a fresh optimiser) before each set
  (:meth:`TentTTA.reset`, which the evaluation runner calls at every set), as the reference's
  per-corruption ``model.reset()``.

The batch is the method's test-stream batch (``evaluate.batch_sizes``, or the protocol's: the
reference's ``TEST.BATCH_SIZE`` is 200, ``evaluate.protocol: tent``). Predictions
depend on the order of the stream and on the other images of each batch: the method adapts on
the test stream, which the report says. Cost per image: the forward and the backward to the
batch-norm parameters, measured in FLOPs (``FlopCounterMode``) over the forward's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ltta.tta.methods import TTA_METHODS, MethodContext, TTAMethod
from ltta.models.inference import model_device

TENT_LR = 1e-3  # cfgs/tent.yaml OPTIM.LR
TENT_BETAS = (0.9, 0.999)  # OPTIM.BETA 0.9, torch's default second moment


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax per row [N] (tent.py ``softmax_entropy``)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def configure_for_tent(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy in training mode with batch statistics only; its trainable parameters: the BN affine ones."""
    adapted = copy.deepcopy(model).train().requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in adapted.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
    if not params:
        raise ValueError(f"tent: {type(model).__name__} has no affine BatchNorm2d parameters to adapt")
    return adapted, params


def _tent_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.enable_grad():
        if amp and x.device.type == "cuda":
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                logits = model(x)
        else:
            logits = model(x)
        logits = logits.float()
        softmax_entropy(logits).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logits.detach().softmax(1)


@TTA_METHODS.register("tent")
class TentTTA(TTAMethod):
    """TENT on a private copy of the target (see the module); ``reset()`` before each test set."""

    name = "tent"

    family = "adaptation"

    merges_views = False
    adapts_on_test_stream = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.model, self.params = configure_for_tent(ctx.target)
        self._source = copy.deepcopy(self.model.state_dict())
        self.optimizer = torch.optim.Adam(self.params, lr=TENT_LR, betas=TENT_BETAS, weight_decay=0.0)
        self.cost = _forward_backward_ratio(self.model, self.params, ctx.image_size)

    def reset(self) -> None:
        """The source model's BN parameters and a fresh Adam state (between corrupted sets)."""
        self.model.load_state_dict(self._source)
        self.optimizer = torch.optim.Adam(self.params, lr=TENT_LR, betas=TENT_BETAS, weight_decay=0.0)

    @property
    def forward_passes(self) -> float:
        return self.cost

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        b = self.ctx.batch_size
        return torch.cat([_tent_step(self.model, self.optimizer, x[i : i + b], self.ctx.amp) for i in range(0, x.shape[0], b)])


def _forward_backward_ratio(model: nn.Module, params: list[nn.Parameter], image_size: int) -> float:
    """FLOPs of TENT's forward + backward (to the BN parameters) over the forward's, on a 2-image batch."""
    x = torch.rand(2, 3, image_size, image_size, device=model_device(model))
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model(x)
    state = copy.deepcopy(model.state_dict())
    with FlopCounterMode(display=False) as both, torch.enable_grad():
        softmax_entropy(model(x)).mean().backward()
    for p in params:
        p.grad = None
    model.load_state_dict(state)
    return both.get_total_flops() / max(fwd.get_total_flops(), 1)
