"""Targets from where users keep them: a checkpoint file of a registered architecture, or a model
published through torchvision's weights API, instead of one trained by the train_target stage.

Published numbers (RobustBench, the TENT tables) are made on published models; a target resolved
here is written as the usual ``models/target.pt``, so every stage after train_target (loss dataset,
predictor, GPS, aggregation, evaluate, the served pyfunc, promotion) runs on it unchanged.

A torchvision model is kept as the architecture ``published`` (:class:`PublishedModel`): the
library and model name that rebuild its layers without downloading anything, its input
convention (the mean/std and input side of its weights' own transforms) and its weights. The
pipeline's models all take float RGB [0,1] NCHW and normalise inside (``Normalize``); a published
model does the same with its own statistics, so preprocessing belongs to the model and cannot be
applied twice or forgotten. A model whose classes or input side differ from the prepared data's is
refused naming both sides (a 1000-class 224 px ImageNet model does not classify 32 px CIFAR).

Sources (``train_target.source``):

- ``train``: the stage trains the target (the default);
- ``checkpoint:<path>``: a ``state_dict`` of ``train_target.arch`` (plain, or under ``state_dict``,
  ``model`` or ``net`` as training scripts save it; DataParallel's ``module.`` prefix is dropped).
  A checkpoint without our ``normalize`` buffers normalises with the prepared data's statistics;
- ``torchvision:<model>[:<weights>]``: torchvision's weights API (``torchvision.models.get_model_weights``),
  its cache under ``$TORCH_HOME`` or its download; ``<weights>`` defaults to ``DEFAULT``.

RobustBench and timm models are not resolved by this version (see the README's roadmap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltta.models.layers import Normalize
from ltta.models.registry import MODELS, build_model
from ltta.registry import Registry
from ltta.tracking import file_md5

#: The source prefixes :func:`resolve_target` understands (``train`` is the stage's own training).
SOURCE_KINDS = ("train", "checkpoint", "torchvision")
#: The keys training scripts wrap a state_dict under (torch.save({"state_dict": ...}) and the like).
WRAPPER_KEYS = ("state_dict", "model", "net")

#: Library name -> fn(model name, num_classes) building the architecture with no weights.
ARCHITECTURES: Registry[Callable[[str, int], nn.Module]] = Registry("model library")


def _torchvision_architecture(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


ARCHITECTURES.add("torchvision", _torchvision_architecture)


class PublishedModel(nn.Module):
    """A library's classifier behind the pipeline's input convention: RGB [0,1] NCHW in, normalised
    with the weights' own statistics, logits out."""

    def __init__(self, library: str, name: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 input_size: int) -> None:
        super().__init__()
        self.library, self.name, self.input_size = library, name, int(input_size)
        self.normalize = Normalize(mean, std)
        self.net = ARCHITECTURES.get(library)(name, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


MODELS.add("published", PublishedModel)


@dataclass
class ResolvedTarget:
    """A target from a source: the model, how its file rebuilds it, and where it came from."""

    model: nn.Module
    arch: str
    kwargs: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)


def parse_source(source: str) -> tuple[str, str]:
    """``"torchvision:resnet50:IMAGENET1K_V1"`` -> ``("torchvision", "resnet50:IMAGENET1K_V1")``; refuses unknown kinds."""
    kind, _, rest = source.partition(":")
    if kind not in SOURCE_KINDS or (kind == "train") != (rest == ""):
        raise ValueError(
            f"train_target.source {source!r} is not one of: train, checkpoint:<path>, torchvision:<model>[:<weights>] "
            f"(timm: and robustbench: sources are not available in this version)"
        )
    return kind, rest


def _state_dict_of(blob: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint as training scripts save them, without DataParallel's prefix."""
    for key in WRAPPER_KEYS:
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(
            f"{path} holds no state_dict (a dict of tensors, plain or under {', '.join(map(repr, WRAPPER_KEYS))}); "
            f"save the model with torch.save(model.state_dict(), path)"
        )
    if all(k.startswith("module.") for k in blob):
        blob = {k.removeprefix("module."): v for k, v in blob.items()}
    return blob


def from_checkpoint(path: Path, arch: str, kwargs: dict[str, Any]) -> ResolvedTarget:
    """``train_target.arch`` with the weights of a checkpoint file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train_target.source names {path}, which is not a file; point it at a checkpoint")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickle of code, a truncated file, not a torch file: all the same to the user
        raise ValueError(f"{path} is not a readable weights-only torch checkpoint ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0]}); save it with torch.save(model.state_dict(), path)") from None
    state = _state_dict_of(blob, path)
    model = build_model(arch, **kwargs)
    ours = model.state_dict()
    own_stats = all(k in state for k in ours if k.startswith("normalize."))
    if not own_stats:  # a checkpoint of the same layers trained elsewhere: normalise with the data's statistics
        state = {**{k: v for k, v in ours.items() if k.startswith("normalize.")}, **state}
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a {arch} checkpoint: {len(missing)} weights missing ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
            f"{', ...' if len(unexpected) > 3 else ''}); set train_target.arch to its architecture"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # same names, other shapes: another width or number of classes
        raise ValueError(f"{path} does not fit {arch} with {kwargs.get('num_classes')} classes "
                         f"({(str(exc).strip().splitlines() or [''])[-1].strip()}); check train_target.arch and width") from None
    provenance = {"source": f"checkpoint:{path}", "md5": file_md5(path), "arch": arch,
                  "normalisation": "the checkpoint's" if own_stats else "the prepared data's mean/std (the checkpoint has none)"}
    return ResolvedTarget(model.eval(), arch, kwargs, provenance)


def from_torchvision(spec: str, num_classes: int, image_size: int) -> ResolvedTarget:
    """A torchvision model with published weights, its preprocessing from the weights' own transforms."""
    import torchvision

    name, _, weights_name = spec.partition(":")
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()") from None
    try:
        weights = enum[weights_name or "DEFAULT"]
    except KeyError:
        raise ValueError(f"torchvision's {name} has no weights {weights_name!r} (it has {', '.join(w.name for w in enum)}, "
                         f"or DEFAULT)") from None
    transforms = weights.transforms()
    side = int(transforms.crop_size[0])
    classes = len(weights.meta["categories"])
    if classes != num_classes or side != image_size:
        raise ValueError(
            f"torchvision:{name}:{weights.name} classifies {classes} classes at {side} px (its weights' transforms: "
            f"resize {list(transforms.resize_size)}, crop {side}), but the prepared data has {num_classes} classes at "
            f"{image_size} px; use data with its classes at data.image_size={side}, or another target source"
        )
    kwargs = {"library": "torchvision", "name": name, "num_classes": classes, "mean": tuple(transforms.mean),
              "std": tuple(transforms.std), "input_size": side}
    model = PublishedModel(**kwargs)
    model.net.load_state_dict(weights.get_state_dict(progress=True, check_hash=True))
    provenance = {"source": f"torchvision:{name}:{weights.name}", "url": weights.url, "library": "torchvision",
                  "library_version": torchvision.__version__, "input": f"RGB, {side} px, mean {list(transforms.mean)}, "
                  f"std {list(transforms.std)}"}
    return ResolvedTarget(model.eval(), "published", kwargs, provenance)


def resolve_target(source: str, arch: str, kwargs: dict[str, Any], image_size: int, root: Path = Path(".")) -> ResolvedTarget:
    """The target ``source`` names (not ``train``), checked against the prepared data's classes and size."""
    kind, rest = parse_source(source)
    if kind == "checkpoint":
        path = Path(rest) if Path(rest).is_absolute() else root / rest
        return from_checkpoint(path, arch, kwargs)
    if kind == "torchvision":
        return from_torchvision(rest, int(kwargs["num_classes"]), image_size)
    raise ValueError(f"train_target.source {source!r}: the stage trains this target; nothing to resolve")
