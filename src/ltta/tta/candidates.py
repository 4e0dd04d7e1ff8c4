"""The candidate test-time transforms: the public code's 12 actions, each with and without a flip.

Source: kakaobrain/learning-loss-for-tta ``commons.py`` (``tta_actions``, ``decode``) and
``eval_l2t.py`` (how a chosen action is applied). The 12 actions, in the public code's order::

    n, r-20, r20, z0.8, z1.2, c, s0.2, s0.5, s3, s4, l0.5, l2.0

are identity; rotate by -20 and +20 degrees; zoom by 0.8 and 1.2; autocontrast; sharpness 0.2,
0.5, 3, 4; colour (saturation) 0.5 and 2.0. A negative action index in the public code means the
same action followed by a horizontal flip (``eval_l2t.py`` flips last), so with flips there are 24
candidates.

The public code applies every action to a mirror-expanded image (``mirror_expansion``: numpy
``symmetric`` padding by the full image size) and crops the centre afterwards. Here the
geometric actions sample with ``padding_mode="reflection"``, which reads exactly the pixels that
padding would supply, without materialising a 3x image; rotation and zoom are BICUBIC as in the
public code (PIL's bicubic kernel has a = -0.5, torch's -0.75, so values differ slightly).
Sharpness filters a 1-pixel mirror-padded image, so border pixels are smoothed with their mirrored
neighbours as in the public code (PIL leaves the border of the *padded* image untouched, which is
cropped away). Autocontrast and colour are per-image / per-pixel, so padding changes nothing.

Names: ``identity``, ``autocontrast``, ``<family>:<magnitude>`` (``rotate:-20``, ``zoom:0.8``,
``color:2``), and ``<action>+hflip`` for the flipped candidate (``identity+hflip`` is a plain
flip). Any magnitude parses, so a candidate set can be extended from params without code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import ltta.transforms.functional as TF
from ltta.registry import Registry

FLIP_SUFFIX = "+hflip"


def _same(m: float | None) -> float | None:
    return m


def _negate(m: float | None) -> float | None:
    return None if m is None else -m


@dataclass(frozen=True)
class ActionFamily:
    """One kind of test-time action.

    ``apply(x, magnitude)`` transforms a batch; ``parametrised`` says whether a magnitude is
    required; ``mirror`` maps a magnitude to the one whose action on a flipped image equals the
    flip of this action on the original (``hflip(T_m(x)) == T_mirror(m)(hflip(x))``): rotations
    change sign, every other action here commutes with the flip.
    """

    apply: Callable[[torch.Tensor, float | None], torch.Tensor]
    parametrised: bool
    mirror: Callable[[float | None], float | None] = _same
    #: ``apply`` also takes a per-image magnitude tensor [N]: views of several magnitudes of this
    #: family are then made in one batched call (:func:`grouped_views`), with the same values.
    per_image_magnitudes: bool = False


def _identity(x: torch.Tensor, m: float | None) -> torch.Tensor:
    return x


def _magnitude(m: float | torch.Tensor | None) -> float | torch.Tensor:
    """A scalar magnitude as a Python float; a per-image tensor [N] passes through."""
    return m if isinstance(m, torch.Tensor) else float(m)  # type: ignore[arg-type]


def _rotate(x: torch.Tensor, m: float | None) -> torch.Tensor:
    # commons.py/eval_l2t.py: torchvision rotate(mirror-expanded image, deg, BICUBIC), centre crop.
    return TF.rotate(x, _magnitude(m), padding_mode="reflection", mode="bicubic")


def _zoom(x: torch.Tensor, m: float | None) -> torch.Tensor:
    # eval_l2t.py: resize the mirror-expanded image by the factor (BICUBIC), centre crop; <1 shrinks.
    return TF.zoom(x, _magnitude(m), padding_mode="reflection", mode="bicubic")


def _autocontrast(x: torch.Tensor, m: float | None) -> torch.Tensor:
    # PIL.ImageOps.autocontrast on the mirror-expanded image: same min/max as the image itself.
    return TF.autocontrast(x)


def _sharpness(x: torch.Tensor, m: float | None) -> torch.Tensor:
    # ImageEnhance.Sharpness on the mirror-expanded image: border pixels see mirrored neighbours.
    return TF.sharpness(TF.mirror_pad(x, 1), _magnitude(m))[..., 1:-1, 1:-1]


def _color(x: torch.Tensor, m: float | None) -> torch.Tensor:
    return TF.color(x, _magnitude(m))


def _brightness(x: torch.Tensor, m: float | None) -> torch.Tensor:
    return TF.brightness(x, _magnitude(m))


#: Action families by name (the public code's decode letters: n, r, z, c, s, l, b).
ACTIONS: Registry[ActionFamily] = Registry("test-time action")
ACTIONS.add("identity", ActionFamily(_identity, parametrised=False))
ACTIONS.add("rotate", ActionFamily(_rotate, parametrised=True, mirror=_negate, per_image_magnitudes=True))
ACTIONS.add("zoom", ActionFamily(_zoom, parametrised=True, per_image_magnitudes=True))
ACTIONS.add("autocontrast", ActionFamily(_autocontrast, parametrised=False))
ACTIONS.add("sharpness", ActionFamily(_sharpness, parametrised=True, per_image_magnitudes=True))
ACTIONS.add("color", ActionFamily(_color, parametrised=True, per_image_magnitudes=True))
ACTIONS.add("brightness", ActionFamily(_brightness, parametrised=True, per_image_magnitudes=True))

#: The public code's 12 actions in its order (commons.py ``tta_actions``); index 0 is identity.
PAPER_ACTIONS: tuple[str, ...] = (
    "identity",
    "rotate:-20",
    "rotate:20",
    "zoom:0.8",
    "zoom:1.2",
    "autocontrast",
    "sharpness:0.2",
    "sharpness:0.5",
    "sharpness:3",
    "sharpness:4",
    "color:0.5",
    "color:2",
)


@dataclass(frozen=True)
class Action:
    """A parametrised action: a family from :data:`ACTIONS` and its magnitude (None if unused)."""

    family: str
    magnitude: float | None = None

    def __post_init__(self) -> None:
        fam = ACTIONS.get(self.family)
        if fam.parametrised and self.magnitude is None:
            raise ValueError(f"action {self.family!r} needs a magnitude, e.g. '{self.family}:1.5'")
        if not fam.parametrised and self.magnitude is not None:
            raise ValueError(f"action {self.family!r} takes no magnitude; write it as '{self.family}'")

    @property
    def name(self) -> str:
        return self.family if self.magnitude is None else f"{self.family}:{self.magnitude:g}"

    def mirrored(self) -> Action:
        """The action that, applied to a flipped image, gives the flip of this one."""
        return Action(self.family, ACTIONS.get(self.family).mirror(self.magnitude))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIONS.get(self.family).apply(x, self.magnitude)


@dataclass(frozen=True)
class Candidate:
    """A test-time view: ``action`` then, if ``flip``, a horizontal flip (eval_l2t.py's order)."""

    name: str
    action: Action
    flip: bool

    @property
    def is_identity(self) -> bool:
        return self.action.family == "identity" and not self.flip


def parse_action(text: str) -> Action:
    """``"rotate:-20"`` -> Action("rotate", -20.0); ``"identity"`` -> Action("identity")."""
    family, sep, mag = text.strip().partition(":")
    if not sep:
        return Action(family)
    try:
        value = float(mag)
    except ValueError:
        raise ValueError(f"bad magnitude {mag!r} in action {text!r}; write e.g. 'zoom:0.8'") from None
    return Action(family, value)


def make_candidate(action: Action, flip: bool) -> Candidate:
    return Candidate(action.name + (FLIP_SUFFIX if flip else ""), action, flip)


def parse_candidate(text: str) -> Candidate:
    """``"zoom:1.2+hflip"`` -> the zoom-1.2 candidate followed by a flip."""
    text = text.strip()
    flip = text.endswith(FLIP_SUFFIX)
    return make_candidate(parse_action(text[: -len(FLIP_SUFFIX)] if flip else text), flip)


def build_candidates(names: Sequence[str] | str) -> list[Candidate]:
    """The candidate list, in a fixed order (the order of the loss dataset's columns).

    ``"all"``: the 12 public-code actions, then the same 12 followed by a flip (24 in all).
    ``"paper"``: the 12 actions without flips, the set the public code trains its predictor on
    (flips enter there only through the test-time flip ensemble of the predictor's scores).
    A list: those candidate names, in that order (see the module docstring for the syntax).
    """
    if isinstance(names, str):
        presets = {
            "all": [*PAPER_ACTIONS, *(a + FLIP_SUFFIX for a in PAPER_ACTIONS)],
            "paper": list(PAPER_ACTIONS),
        }
        if names not in presets:
            raise ValueError(f"unknown candidate set {names!r}; use 'all', 'paper' or a list of names")
        names = presets[names]
    cands = [parse_candidate(n) for n in names]
    if not cands:
        raise ValueError("the candidate list is empty; give at least one candidate (e.g. 'identity')")
    seen = [c.name for c in cands]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate candidates {dupes}; each candidate may appear once")
    return cands


def apply_candidate(x: torch.Tensor, cand: Candidate) -> torch.Tensor:
    """The view of every image in ``x`` [N,C,H,W] under ``cand`` (one batched call)."""
    out = cand.action(x)
    return TF.hflip(out) if cand.flip else out


def grouped_views(
    x: torch.Tensor, candidates: Sequence[Candidate], image_index: torch.Tensor, group_sizes: Sequence[int]
) -> torch.Tensor:
    """Views [M,C,H,W] of chosen images, grouped by candidate: a batched ``apply_candidate`` for many candidates.

    Rows ``offset_c : offset_c + group_sizes[c]`` (offsets: the running sum of the sizes) hold
    ``apply_candidate(x[image_index[rows]], candidates[c])``. Candidates of one action family run
    in a single call (one call per magnitude for a family without ``per_image_magnitudes``), and
    their flips in one more, so the cost is a handful of batched calls whatever the number of
    candidates, not one call per candidate on a small group. The values equal ``apply_candidate``'s:
    the same operations on the same images. Index bookkeeping is on the host: no device sync.
    """
    if len(group_sizes) != len(candidates):
        raise ValueError(f"got {len(group_sizes)} group sizes for {len(candidates)} candidates; give one per candidate")
    total = sum(group_sizes)
    if image_index.shape != (total,):
        raise ValueError(
            f"image_index must have shape [{total}] (the sum of group_sizes), got {tuple(image_index.shape)}"
        )
    out = x.new_empty((total, *x.shape[1:]))
    # (family, magnitude or None when magnitudes are batched) -> [(candidate, first row, rows)]
    batches: dict[tuple[str, float | None], list[tuple[Candidate, int, int]]] = {}
    start = 0
    for cand, size in zip(candidates, group_sizes):
        if size > 0:
            fam = ACTIONS.get(cand.action.family)
            key = (cand.action.family, None if fam.per_image_magnitudes else cand.action.magnitude)
            batches.setdefault(key, []).append((cand, start, size))
        start += size
    for (family, _), members in batches.items():
        if len(members) == 1:  # one candidate: a contiguous block, no scatter needed
            cand, first, size = members[0]
            out[first : first + size] = apply_candidate(x.index_select(0, image_index[first : first + size]), cand)
            continue
        members.sort(key=lambda m: m[0].flip)  # unflipped first: the flipped views are one tail block
        rows = torch.cat([torch.arange(first, first + size) for _, first, size in members]).to(x.device)
        xs = x.index_select(0, image_index[rows])
        if ACTIONS.get(family).per_image_magnitudes:
            mags = torch.cat(
                [torch.full((size,), float(c.action.magnitude or 0.0), dtype=torch.float32) for c, _, size in members]
            )
            views = ACTIONS.get(family).apply(xs, mags.to(x.device))  # type: ignore[arg-type]
        else:
            views = members[0][0].action(xs)
        plain = sum(size for c, _, size in members if not c.flip)
        out.index_copy_(0, rows[:plain], views[:plain])
        if plain < len(rows):
            out.index_copy_(0, rows[plain:], TF.hflip(views[plain:]))
    return out


def identity_index(candidates: Sequence[Candidate]) -> int:
    """Column of the identity candidate; raises if the set has none (losses need a reference)."""
    for i, c in enumerate(candidates):
        if c.is_identity:
            return i
    raise ValueError("the candidate set has no 'identity' candidate; add it (it is the no-TTA reference)")


def mirror_permutation(candidates: Sequence[Candidate]) -> torch.Tensor:
    """Indices ``perm`` such that scores of a flipped image, read as ``s_flip[perm]``, align with the original's.

    Because ``view(hflip(x); a, f) == view(x; mirror(a), not f)`` (module docstring), the
    predictor's entry for candidate c on the flipped image predicts the loss of candidate
    ``(mirror(a), not f)`` on the original. When that candidate is not in the set (the 12-action
    set has no flips), fall back to ``(mirror(a), f)``: the public code's approximation
    (eval_l2t.py swaps only r-20 and r20), which assumes the target's loss ignores a flip.
    """
    index = {c.name: i for i, c in enumerate(candidates)}
    perm = []
    for c in candidates:
        m = c.action.mirrored()
        exact = make_candidate(m, not c.flip).name
        approx = make_candidate(m, c.flip).name
        if exact in index:
            perm.append(index[exact])
        elif approx in index:
            perm.append(index[approx])
        else:
            raise ValueError(
                f"candidate {c.name!r} has no mirror image in the set (looked for {exact!r} or {approx!r}); "
                "include mirrored rotations so the flip ensemble can align scores"
            )
    return torch.tensor(perm, dtype=torch.long)
