"""Test-time augmentation methods, one registry: ``build_method("learned", target, ...)``; the baselines.

Every method turns images into class probabilities by averaging the target's softmax over its
views, as kakaobrain/learning-loss-for-tta ``eval_l2t.py`` does (``torch.mean(preds, dim=1)``,
a plain mean). Views are made in batches on the device and all views of a chunk go through the
target together, in full ``batch_size`` batches, rather than one small call per view or per
candidate (small, variable-size calls leave a GPU idle and, with ``cudnn.benchmark``, re-tune
the convolutions for every new batch size). Methods that pick views per image (``random``,
``learned``) make exactly the N x k chosen views (:func:`~ltta.tta.candidates.grouped_views`,
one host sync per chunk for the group sizes), a fixed number per set size, and scatter their
probabilities back; that is k passes per image, fewer than the C passes of scoring every
candidate and gathering. The ``oracle`` needs every candidate's loss, so it runs all C.

``forward_passes`` is the cost per image in target forward passes.

This module holds the core (:class:`MethodContext`, :class:`TTAMethod` and its shared helpers,
``TTA_METHODS``, :func:`build_method`) and the fixed baselines (none, flip, five_crop, ten_crop,
random, policy). The learned choice (learned, prior, oracle, ``SELECTIONS``,
``flops_per_image``) is :mod:`ltta.tta.learned`; the other methods register from their own
modules (:mod:`ltta.tta`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ltta.transforms.functional as TF
from ltta.registry import Registry
from ltta.models.inference import model_device, predict_proba
from ltta.runtime import make_generator
from ltta.tta.candidates import Candidate, build_candidates, grouped_views
from ltta.tta.merging import MERGES, merge, sum_in_order


@dataclass
class MethodContext:
    """Everything a method may need; each method reads only its part."""

    target: nn.Module
    candidates: list[Candidate]
    k: int = 1
    predictor: nn.Module | None = None
    prior: torch.Tensor | None = None  # [C] input-independent candidate scores (higher = better)
    policy: Any = None  # ltta.transforms.policy.Policy (or a list of sub-policies)
    generator: torch.Generator | None = None
    batch_size: int = 512
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = True
    crop_margin: int = 4
    image_size: int = 32
    selection: str = "topk"  # learned: how scores become k candidates (SELECTIONS)
    bn_prior: float = 0.0  # bn_adapt: prior strength N of the source statistics (0: the test batch alone)
    threshold: float = 0.0  # learned: "eval_l2t"'s fallback ratio to identity, "abstain"'s margin (ltta.tta.abstain)
    merge: str = "mean"  # how the views' softmaxes are combined (ltta.tta.merging.MERGES); the paper's mean


#: The method families, in the order reports group them: what decides the views a method averages.
FAMILIES: dict[str, str] = {
    "classical": "classical views",  # a fixed set of views, the same for every image
    "learned": "learned choice",  # views chosen per image (or once) from the loss predictor or features
    "fitted": "fitted policies and aggregation",  # a policy or weights fitted on held-out data
    "adaptation": "test-time adaptation",  # the model itself changes on the test stream
    "oracle": "oracle (reads the labels)",  # an upper bound, not a method
}


class TTAMethod(ABC):
    """Base: ``predict(x, y=None) -> probs float32 [N,K]`` on ``x``'s device, in chunks."""

    name = "base"
    needs_labels = False
    family = "classical"  #: a key of :data:`FAMILIES`: how the figures group and style it
    merges_views = True  #: whether its views are merged with equal weight, so any merge mode applies

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        if ctx.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {ctx.batch_size}")
        if ctx.k < 1:
            raise ValueError(f"k must be >= 1, got {ctx.k}")
        self.identity_index = next((i for i, c in enumerate(ctx.candidates) if c.is_identity), -1)  # -1: none
        self.views_made = 0  # views rendered and scored by _average_selected since the last predict()
        self.images_seen = 0

    #: True for test-time *adaptation* (bn_adapt, tent): predictions depend on the other test images
    adapts_on_test_stream = False

    @property
    @abstractmethod
    def forward_passes(self) -> float:
        """Cost per image in target forward passes."""

    def reset(self) -> None:
        """Forget anything learned from earlier test sets; the runner calls it before each set (a
        no-op for augmentation methods, which learn nothing at test time)."""

    def _probs(self, view: torch.Tensor) -> torch.Tensor:
        return predict_proba(self.ctx.target, view, batch_size=self.ctx.batch_size, amp=self.ctx.amp)

    def _mean_over_views(self, views: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Mean softmax over V views (a list of [N,...] or a stacked [V,N,...]), all in one target call.

        Summed view by view in the given order, as a running sum would, so the values do not
        depend on how the views were batched.
        """
        stacked = views.flatten(0, 1) if isinstance(views, torch.Tensor) else torch.cat(list(views))
        count = views.shape[0] if isinstance(views, torch.Tensor) else len(views)
        probs = self._probs(stacked)
        return merge(probs.view(count, probs.shape[0] // count, probs.shape[1]), self.ctx.merge)

    @abstractmethod
    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Probabilities [n,K] for one chunk already on the device."""

    def _chunks(self, x: torch.Tensor, y: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Check the inputs and yield them on the device in chunks of ``8 * batch_size`` images
        (which bounds the memory of one chunk's views)."""
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"expected float images [N,3,H,W] in [0,1], got {tuple(x.shape)} {x.dtype}")
        if self.needs_labels and (y is None or y.shape != (x.shape[0],)):
            raise ValueError(f"method {self.name!r} needs the labels y [N] (it is an upper bound that looks at them)")
        if x.shape[0] == 0:
            raise ValueError("predict got an empty batch (N = 0)")
        chunk = 8 * self.ctx.batch_size
        for start in range(0, x.shape[0], chunk):
            xc = x[start : start + chunk].to(self.ctx.device)
            yield xc, (None if y is None else y[start : start + chunk].to(self.ctx.device))

    def mean_views(self) -> float | None:
        """Views made per image by :meth:`_average_selected` since the last :meth:`predict` (None: none yet)."""
        return self.views_made / self.images_seen if self.images_seen else None

    @torch.no_grad()
    def predict(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.views_made = self.images_seen = 0  # forward_passes of data-dependent methods: this call's
        return torch.cat([self._predict_chunk(xc, yc).float().to(x.device) for xc, yc in self._chunks(x, y)])

    # -- per-image choices ---------------------------------------------------------------
    def _scored_rows(
        self, x: torch.Tensor, image_index: torch.Tensor, sizes: Sequence[int]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Softmax of ``grouped_views(x, candidates, image_index, sizes)``, ``batch_size`` rows at a time.

        Yields ``(first row, probs [rows,K])``. Views are made batch by batch (not all at once), so
        their memory is one batch and, on a CPU, the views are still in cache when the target reads them.
        """
        for first, last, part in _row_slices(sizes, self.ctx.batch_size):
            yield first, self._probs(grouped_views(x, self.ctx.candidates, image_index[first:last], part))

    def _average_selected(
        self, x: torch.Tensor, sel: torch.Tensor, identity_probs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean of the target's softmax over the candidates ``sel`` [N,k] of each image.

        The N x k views are sorted by candidate (stable), made by :func:`grouped_views` and scored
        in full batches; a candidate chosen twice for one image (``random`` draws with
        replacement) is scored twice. Each batch's rows are put back in ``sel``'s layout (unique
        indices) and the k views are summed in slot order, so the result is deterministic on CUDA
        too (an ``index_add_`` accumulation is not).

        A slot of -1 is no view: the image's mean is over its other slots (an abstaining
        selection keeps identity alone). With ``identity_probs`` [N,K] (the identity view's
        softmax, already computed), slots choosing identity take it instead of a new pass. Every
        call adds the views it made to :attr:`views_made` (per image: :meth:`mean_views`), the
        exact cost of data-dependent selections.
        """
        n, k = sel.shape
        flat = sel.reshape(-1)
        made = flat >= 0
        if identity_probs is not None:
            made &= flat != self.identity_index
        slots = made.nonzero().squeeze(1)
        order = slots[torch.sort(flat[slots], stable=True).indices]  # flat slot of each view, grouped by candidate
        image_index = order // k
        sizes = torch.bincount(flat[slots], minlength=len(self.ctx.candidates)).tolist()  # the chunk's one host sync
        per_slot: torch.Tensor | None = None
        for first, probs in self._scored_rows(x, image_index, sizes):
            if per_slot is None:
                per_slot = x.new_zeros(n * k, probs.shape[1], dtype=probs.dtype, device=probs.device)
            per_slot[order[first : first + probs.shape[0]].to(probs.device)] = probs
        if identity_probs is not None:
            if per_slot is None:
                per_slot = identity_probs.new_zeros(n * k, identity_probs.shape[1])
            reused = (flat == self.identity_index).nonzero().squeeze(1)
            per_slot[reused] = identity_probs[reused // k].to(per_slot.dtype)
        if per_slot is None:
            raise ValueError("the selection chose no view for any image (every slot is -1)")
        self.views_made += len(order)
        self.images_seen += n
        count = (sel >= 0).sum(1, keepdim=True)
        if bool((count == 0).any()):
            raise ValueError("the selection chose no view for some image (a row of -1 slots)")
        if self.ctx.merge != "mean":
            if not bool((count == k).all()):
                raise ValueError(f"merge {self.ctx.merge!r} needs every image's k views; an abstaining selection "
                                 "leaves some out: use merge 'mean'")
            return merge(per_slot.view(n, k, -1).transpose(0, 1), self.ctx.merge)
        total = sum_in_order(per_slot.view(n, k, -1).transpose(0, 1))
        return total / k if bool((count == k).all()) else total / count

    def _all_candidate_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The target's softmax [N,C,K] under every candidate, scored in full batches across candidates."""
        n, c_count = x.shape[0], len(self.ctx.candidates)
        image_index = torch.arange(n, device=x.device).repeat(c_count)  # candidate-major rows
        parts = [probs for _, probs in self._scored_rows(x, image_index, [n] * c_count)]
        return torch.cat(parts).view(c_count, n, -1).transpose(0, 1)


def _row_slices(sizes: Sequence[int], budget: int) -> Iterator[tuple[int, int, list[int]]]:
    """Split rows grouped by candidate (``sizes`` per candidate) into slices of at most ``budget`` rows.

    Yields ``(first, last, sizes within the slice)``; host arithmetic only.
    """
    total = sum(sizes)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    for first in range(0, total, budget):
        last = min(first + budget, total)
        part = [max(0, min(hi, last) - max(lo, first)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        yield first, last, part


def method_generator(ctx: MethodContext) -> torch.Generator:
    """``ctx.generator``, or seed 0 on ``ctx.device``; it must live where the views are made."""
    gen = ctx.generator if ctx.generator is not None else make_generator(0, ctx.device)
    if gen.device.type != ctx.device.type:
        raise ValueError(f"the generator lives on {gen.device} but views are made on {ctx.device}; create it there")
    return gen


def check_k_within_candidates(ctx: MethodContext) -> None:
    """Methods that pick k distinct candidates per image need k <= C."""
    if ctx.k > len(ctx.candidates):
        raise ValueError(f"k={ctx.k} exceeds the {len(ctx.candidates)} candidates")


#: Method classes by name; each is built from a :class:`MethodContext`.
TTA_METHODS: Registry[Callable[[MethodContext], TTAMethod]] = Registry("TTA method")


@TTA_METHODS.register("none")
class NoTTA(TTAMethod):
    """The image as it is (for 32x32 inputs the centre crop is the image itself)."""

    name = "none"

    @property
    def forward_passes(self) -> float:
        return 1.0

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self._probs(x)


@TTA_METHODS.register("flip")
class FlipTTA(TTAMethod):
    """Image and its mirror image (eval_l2t.py ``AugmentorHFlip`` with two views)."""

    name = "flip"

    @property
    def forward_passes(self) -> float:
        return 2.0

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self._mean_over_views([x, TF.hflip(x)])


def _crops(x: torch.Tensor, margin: int) -> torch.Tensor:
    """Five crops [5,N,C,H,W] of the image's size from the centre (H + margin) window of its mirror expansion.

    eval_l2t.py (``multicrop``): the centre crop of the image, and four corner crops of the
    centred ``target_size + pad`` window of the mirror-expanded image, with pad = 4 where the
    dataset has no resize margin (ImageNet's is 256 - 224 = 32). For 32x32 images the corners
    are then shifted by margin / 2 = 2 pixels.
    """
    h = x.shape[-1]
    window = TF.center_crop(TF.mirror_pad(x, (margin + 1) // 2), h + margin)
    return TF.five_crop(window, h)


@TTA_METHODS.register("five_crop")
class FiveCropTTA(TTAMethod):
    name = "five_crop"

    @property
    def forward_passes(self) -> float:
        return 5.0

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self._mean_over_views(_crops(x, self.ctx.crop_margin))


@TTA_METHODS.register("ten_crop")
class TenCropTTA(TTAMethod):
    name = "ten_crop"

    @property
    def forward_passes(self) -> float:
        return 10.0

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        crops = _crops(x, self.ctx.crop_margin)  # [5,N,C,H,W]
        return self._mean_over_views(torch.cat([crops, TF.hflip(crops)]))


@TTA_METHODS.register("random")
class RandomTTA(TTAMethod):
    """k candidates per image drawn uniformly with replacement (eval_l2t.py ``AugmentorRandom``)."""

    name = "random"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.generator = method_generator(ctx)

    @property
    def forward_passes(self) -> float:
        return float(self.ctx.k)

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        shape = (x.shape[0], self.ctx.k)
        sel = torch.randint(0, len(self.ctx.candidates), shape, device=x.device, generator=self.generator)
        return self._average_selected(x, sel)


@TTA_METHODS.register("policy")
class PolicyTTA(TTAMethod):
    """A static Fast AutoAugment policy: the image plus one view per each of its first k sub-policies."""

    name = "policy"
    family = "fitted"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if ctx.policy is None:
            raise ValueError("method 'policy' needs policy= (a searched Fast AutoAugment policy)")
        subs = getattr(ctx.policy, "subpolicies", ctx.policy)
        if len(subs) < ctx.k:
            raise ValueError(
                f"method 'policy' with k={ctx.k} needs at least k sub-policies, the policy has {len(subs)}"
            )
        self.subpolicies = list(subs)[: ctx.k]
        self.generator = method_generator(ctx)

    @property
    def forward_passes(self) -> float:
        return float(self.ctx.k + 1)

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        from ltta.transforms.policy import apply_subpolicy  # the FAA op table loads only for this method

        return self._mean_over_views([x] + [apply_subpolicy(x, sub, self.generator) for sub in self.subpolicies])


def build_method(
    name: str,
    target: nn.Module,
    *,
    candidates: Sequence[Candidate] | Sequence[str] | str | None = None,
    k: int = 1,
    predictor: nn.Module | None = None,
    prior: torch.Tensor | Sequence[float] | None = None,
    policy: Any = None,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    amp: bool = True,
    crop_margin: int = 4,
    image_size: int = 32,
    selection: str = "topk",
    threshold: float = 0.0,
    bn_prior: float = 0.0,
    merge: str = "mean",
) -> TTAMethod:
    """Build the TTA method ``name`` around the frozen ``target``.

    ``candidates``: Candidate objects, names, or a preset ("all", "paper"); default "all".
    ``prior``: per-candidate scores for ``prior`` (minus the mean training loss).
    ``generator`` (on ``device``) drives ``random`` and ``policy``; default: seed 0 there.
    ``device``: where views are made; default the target's.
    ``selection`` / ``threshold``: how ``learned`` picks its k views (:data:`~ltta.tta.learned.SELECTIONS`).
    ``bn_prior``: ``bn_adapt``'s prior strength N.
    ``merge``: how the views' softmaxes are combined (:data:`~ltta.tta.merging.MERGES`), for the
    methods that average views with equal weight (``merges_views``).
    """
    method_class = TTA_METHODS.get(name)
    MERGES.get(merge)  # an unknown mode is refused by name, listing the known ones
    if merge != "mean" and not method_class.merges_views:
        raise ValueError(f"method {name!r} does not average views with equal weight (its weights, policy or adaptation "
                         f"were fitted for its own rule); use merge 'mean' with it, or a view method (flip, crops, learned)")
    dev = torch.device(device) if device is not None else model_device(target)
    if candidates is None:
        cands = build_candidates("all")
    elif isinstance(candidates, str):
        cands = build_candidates(candidates)
    else:
        items = list(candidates)
        cands = items if all(isinstance(c, Candidate) for c in items) else build_candidates([str(c) for c in items])
    prior_t = None if prior is None else torch.as_tensor(prior, dtype=torch.float32)
    ctx = MethodContext(
        target=target, candidates=cands, k=k, predictor=predictor, prior=prior_t, policy=policy, generator=generator,
        batch_size=batch_size, device=dev, amp=amp, crop_margin=crop_margin, image_size=image_size,
        selection=selection, threshold=threshold, bn_prior=bn_prior, merge=merge,
    )
    return method_class(ctx)
