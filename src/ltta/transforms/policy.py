"""Augmentation policies in Fast AutoAugment's shape, their JSON file format, and batched application.

A policy is a list of sub-policies; a sub-policy is a list of ops, each ``(name, prob, level)``
with prob and level in [0, 1] (kakaobrain/fast-autoaugment ``FastAutoAugment/archive.py``,
``policy_decoder``). In training the reference picks one sub-policy uniformly per image and
applies each of its ops with its probability (``FastAutoAugment/data.py``, ``Augmentation``).

On disk::

    {"format": "ltta-faa-policy", "version": 1,
     "subpolicies": [[{"op": "Rotate", "prob": 0.4, "level": 0.7}, ...], ...],
     "meta": {...}}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ltta.io import write_json
from ltta.transforms.ops import FAA_OPS, op_names, run_op

POLICY_FORMAT = "ltta-faa-policy"
POLICY_VERSION = 1


@dataclass(frozen=True)
class OpSpec:
    """One op of a sub-policy: an FAA op name, the probability of applying it, its level."""

    name: str
    prob: float
    level: float


SubPolicy = list[OpSpec]


@dataclass
class Policy:
    """A list of sub-policies plus free-form provenance (``meta``: search settings, scores...)."""

    subpolicies: list[SubPolicy]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.subpolicies)


# ---------------------------------------------------------------- validation and (de)serialisation


def _unit_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must lie in [0, 1], got {v}")
    return v


def validate_policy(policy: Policy, source: str = "policy") -> Policy:
    """Check op names and ranges; return the policy, or raise ValueError naming the bad entry."""
    if not policy.subpolicies:
        raise ValueError(f"{source}: a policy needs at least one sub-policy")
    for i, sub in enumerate(policy.subpolicies):
        if not sub:
            raise ValueError(f"{source}: sub-policy {i} is empty; give it at least one op")
        for j, op in enumerate(sub):
            where = f"{source}: sub-policy {i} op {j}"
            if op.name not in FAA_OPS:
                raise ValueError(f"{where}: unknown op {op.name!r}; known ops: {', '.join(op_names())}")
            _unit_number(op.prob, f"{where} ({op.name}) prob")
            _unit_number(op.level, f"{where} ({op.name}) level")
    return policy


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The JSON document of a policy (validated first)."""
    validate_policy(policy)
    return {
        "format": POLICY_FORMAT,
        "version": POLICY_VERSION,
        "subpolicies": [
            [{"op": op.name, "prob": float(op.prob), "level": float(op.level)} for op in sub]
            for sub in policy.subpolicies
        ],
        "meta": dict(policy.meta),
    }


def policy_from_dict(doc: Mapping[str, Any], source: str = "policy") -> Policy:
    """Parse and validate a policy document; errors say which entry is wrong and why."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != POLICY_FORMAT:
        raise ValueError(f"{source}: 'format' must be {POLICY_FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("version") != POLICY_VERSION:
        raise ValueError(
            f"{source}: unsupported version {doc.get('version')!r} (this code reads version {POLICY_VERSION})"
        )
    subs = doc.get("subpolicies")
    if not isinstance(subs, list):
        raise ValueError(f"{source}: 'subpolicies' must be a list of lists of ops")
    meta = doc.get("meta", {})
    if not isinstance(meta, Mapping):
        raise ValueError(f"{source}: 'meta' must be an object")
    parsed: list[SubPolicy] = []
    for i, sub in enumerate(subs):
        if not isinstance(sub, list):
            raise ValueError(f"{source}: sub-policy {i} must be a list of ops, got {type(sub).__name__}")
        ops: SubPolicy = []
        for j, entry in enumerate(sub):
            where = f"{source}: sub-policy {i} op {j}"
            if not isinstance(entry, Mapping) or set(entry) != {"op", "prob", "level"}:
                raise ValueError(f"{where}: expected an object with exactly the keys op, prob, level; got {entry!r}")
            if not isinstance(entry["op"], str):
                raise ValueError(f"{where}: 'op' must be a string, got {entry['op']!r}")
            ops.append(
                OpSpec(
                    entry["op"],
                    _unit_number(entry["prob"], f"{where} prob"),
                    _unit_number(entry["level"], f"{where} level"),
                )
            )
        parsed.append(ops)
    return validate_policy(Policy(parsed, dict(meta)), source)


def save_policy(path: str | os.PathLike[str], policy: Policy) -> None:
    """Write ``policy`` as JSON, atomically (temporary name, then rename)."""
    write_json(path, policy_to_dict(policy))


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file written by :func:`save_policy`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"policy file {p} does not exist: run the search_policy stage (dvc repro).")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON ({exc}); delete it and rerun the search_policy stage.") from exc
    try:
        return policy_from_dict(doc, source=str(p))
    except ValueError as exc:  # a hand-edited or foreign file: say how to get a valid one back
        raise ValueError(f"{exc}; fix that entry, or delete {p} and rerun the search_policy stage.") from None


def remove_duplicate_subpolicies(subpolicies: Iterable[Sequence[OpSpec]]) -> list[SubPolicy]:
    """Keep the first sub-policy of each sequence of op *names* (probabilities and levels ignored).

    This is the reference's ``remove_deplicates`` (fast-autoaugment ``FastAutoAugment/search.py``),
    applied to each top trial's sub-policies before they join the final policy.
    """
    seen: set[tuple[str, ...]] = set()
    kept: list[SubPolicy] = []
    for sub in subpolicies:
        key = tuple(op.name for op in sub)
        if key not in seen:
            seen.add(key)
            kept.append(list(sub))
    return kept


# ---------------------------------------------------------------- batched application


class CompiledPolicy:
    """A policy laid out as tensors on one device; calling it augments a batch.

    Signature ``(x, generator) -> x`` is the training-augmentation one, so a searched policy can be
    handed to the trainer as an extra augmentation. Cost is independent of the number of
    sub-policies: for each op position, one call per distinct op name on the images that drew it.
    """

    def __init__(self, policy: Policy, device: torch.device | str = "cpu") -> None:
        validate_policy(policy)
        self.policy = policy
        names = op_names()
        s = len(policy.subpolicies)
        width = max(len(sub) for sub in policy.subpolicies)
        op_idx = torch.full((s, width), -1, dtype=torch.long)
        prob = torch.zeros(s, width)
        level = torch.zeros(s, width)
        for i, sub in enumerate(policy.subpolicies):
            for j, op in enumerate(sub):
                op_idx[i, j] = names.index(op.name)
                prob[i, j] = op.prob
                level[i, j] = op.level
        self.names = names
        self.op_idx = op_idx.to(device)
        self.device = self.op_idx.device  # resolved: "cuda" becomes "cuda:0", as tensors report it
        self.prob = prob.to(self.device)
        self.level = level.to(self.device)
        # Which op names occur at each position (Python side, so no device sync to find them).
        self.present = [sorted({int(v) for v in op_idx[:, j].tolist() if v >= 0}) for j in range(width)]

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, generator)

    def apply(
        self,
        x: torch.Tensor,
        generator: torch.Generator,
        choice: torch.Tensor | None = None,
        strategy: str = "auto",
    ) -> torch.Tensor:
        """Augment ``x`` [N,C,H,W]: sub-policy ``choice[n]`` for image n (uniform if None).

        ``strategy``: ``subset`` runs each op on the images that drew it (least arithmetic, but
        finding them costs a device sync per op); ``dense`` runs each op on the whole batch and
        keeps the result where drawn (no sync: faster on a GPU, whose time here is launches, not
        arithmetic); ``auto`` is dense on CUDA, subset elsewhere. The distribution is the same.
        """
        if x.device != self.device:
            raise ValueError(f"images are on {x.device} but the policy was compiled for {self.device}")
        if strategy not in ("auto", "subset", "dense"):
            raise ValueError(f"strategy must be auto, subset or dense, got {strategy!r}")
        dense = strategy == "dense" or (strategy == "auto" and x.device.type == "cuda")
        n = x.shape[0]
        if choice is None:
            choice = torch.randint(0, self.op_idx.shape[0], (n,), device=x.device, generator=generator)
        out = x if dense else x.clone()
        for j, present in enumerate(self.present):
            u = torch.rand(n, device=x.device, generator=generator)
            op_j = self.op_idx[choice, j]
            active = (u < self.prob[choice, j]) & (op_j >= 0)  # reference: skip if random() > prob
            level_j = self.level[choice, j]
            for k in present:
                op = FAA_OPS.get(self.names[k])
                hit = active & (op_j == k)
                if dense:
                    out = torch.where(hit[:, None, None, None], run_op(out, op, level_j, generator), out)
                    continue
                idx = hit.nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                out[idx] = run_op(out[idx], op, level_j[idx], generator)
        return out


def apply_policy(x: torch.Tensor, policy: Policy | CompiledPolicy, generator: torch.Generator) -> torch.Tensor:
    """Training-style: each image draws one sub-policy uniformly and applies each op with its prob."""
    compiled = policy if isinstance(policy, CompiledPolicy) else CompiledPolicy(policy, x.device)
    return compiled.apply(x, generator)


def apply_subpolicy(x: torch.Tensor, subpolicy: Sequence[OpSpec], generator: torch.Generator) -> torch.Tensor:
    """Apply one sub-policy to every image, each op drawn with its probability per image."""
    compiled = CompiledPolicy(Policy([list(subpolicy)]), x.device)
    return compiled.apply(x, generator, choice=torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
