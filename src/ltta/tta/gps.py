"""Greedy policy search (GPS): a static TTA policy chosen on a validation split by calibrated log-likelihood.

Molchanov, Lyzhov, Molchanova, Ashukha, Vetrov, *Greedy Policy Search: A Simple Baseline for
Learnable Test-Time Augmentation* (UAI 2020); public code bayesgroup/gps-augment (now
SamsungLabs/gps-augment: ``get_predictions_randaugment.py`` makes the pool's predictions,
``policy-search.py`` the greedy search, ``metrics.py`` the temperature scaling). As there:

- A *pool* of sub-policies; each member's log-softmax on the validation images is computed once,
  from one random draw of the member's augmentation.
- The policy grows one member at a time, *with replacement*. Each step adds the member whose
  ensemble with the members so far (the plain mean of their softmaxes, ``logmeansoftmax``) has the
  highest log-likelihood *after temperature scaling* of the ensemble (the calibrated
  log-likelihood: T fitted on the same split, at every step, for every candidate). Ties go to the
  first member in pool order.
- At test time the policy's views are drawn afresh and averaged; the temperature of the final
  ensemble is applied to it (the paper reports calibrated metrics).

Where this differs, and why:

- The pool. The reference samples RandAugment sub-policies (3 ops, random magnitudes; 500 at
  M=45, 500 at M=20) each followed by the training crop+flip, 100 crop+flip samples and the plain
  image. Here the pool is (1) this pipeline's TTA candidates (``loss_dataset.candidates``), so that
  ``learned``, ``prior`` and ``gps`` choose among the same views, (2) ``crop_flip_samples`` draws of
  the pad-4 crop + flip alone (the reference's M=0), (3) ``random_subpolicies`` sub-policies of
  ``ops_per_subpolicy`` ops drawn uniformly from the Fast AutoAugment op table
  (:mod:`ltta.transforms.ops`, its magnitude ranges), each at a level uniform in [0, 1] and applied
  with probability 1, then the crop + flip. One op table serves FAA and GPS.
- The split: the reference holds 5,000 training images out of the target's training. This
  pipeline's target trains on the whole training set, as the paper being reproduced does, so GPS
  searches on the loss dataset's ``valid_loss`` images, corrupted as the loss predictor's
  validation inputs are (``data/loss/valid.npz``): the split the learned method is validated on.
- The temperature fit is a vectorised bisection (:mod:`ltta.tta.temperature`), not Nelder-Mead:
  the same optimum, all candidates of a step at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import ltta.transforms.functional as TF
from ltta.io import read_json, write_json
from ltta.models.inference import predict_proba
from ltta.transforms.ops import FAA_OPS, op_names
from ltta.transforms.policy import OpSpec, apply_subpolicy
from ltta.tta.candidates import apply_candidate, parse_candidate
from ltta.tta.methods import TTA_METHODS, MethodContext, TTAMethod, method_generator
from ltta.tta.temperature import calibrated_nll, nll_of, scaled_log_probs

GPS_FORMAT = "ltta-gps-policy"
GPS_VERSION = 1


@dataclass(frozen=True)
class GPSMember:
    """One pool member: a TTA candidate (deterministic), or FAA ops at fixed levels (probability 1)
    followed, with ``crop_flip``, by the pad-4 random crop and random flip."""

    candidate: str | None = None
    ops: tuple[tuple[str, float], ...] = ()
    crop_flip: bool = False

    def __post_init__(self) -> None:
        if self.candidate is not None and (self.ops or self.crop_flip):
            raise ValueError("a GPS member is either a candidate or ops (+ crop/flip), not both")
        if self.candidate is None and not (self.ops or self.crop_flip):
            raise ValueError("a GPS member needs a candidate, ops or crop_flip")
        if self.candidate is not None:
            parse_candidate(self.candidate)  # an unknown name fails here
        for name, level in self.ops:
            if name not in FAA_OPS:
                raise ValueError(f"unknown op {name!r} in a GPS member; known ops: {', '.join(op_names())}")
            if not 0.0 <= level <= 1.0:
                raise ValueError(f"op {name} level {level} must lie in [0, 1]")

    def describe(self) -> str:
        if self.candidate is not None:
            return self.candidate
        ops = " > ".join(f"{n}({lv:.2f})" for n, lv in self.ops)
        return " > ".join(p for p in (ops, "crop+flip" if self.crop_flip else "") if p)

    def views(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """This member's view of every image of ``x`` [N,C,H,W] (one batched call per op)."""
        if self.candidate is not None:
            return apply_candidate(x, parse_candidate(self.candidate))
        out = apply_subpolicy(x, [OpSpec(n, 1.0, lv) for n, lv in self.ops], generator) if self.ops else x
        return TF.random_crop_flip(out, generator) if self.crop_flip else out

    def to_dict(self) -> dict[str, Any]:
        if self.candidate is not None:
            return {"candidate": self.candidate}
        return {"ops": [{"op": n, "level": lv} for n, lv in self.ops], "crop_flip": self.crop_flip}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> GPSMember:
        if not isinstance(doc, Mapping) or not (set(doc) <= {"candidate", "ops", "crop_flip"}):
            raise ValueError(f"a GPS member is an object with candidate, or ops and crop_flip; got {doc!r}")
        ops = tuple((str(o["op"]), float(o["level"])) for o in doc.get("ops", []))
        return cls(candidate=doc.get("candidate"), ops=ops, crop_flip=bool(doc.get("crop_flip", False)))


def gps_pool(
    candidates: Sequence[str], random_subpolicies: int, ops_per_subpolicy: int, crop_flip_samples: int,
    generator: torch.Generator,
) -> list[GPSMember]:
    """The search pool: the candidates, then the crop+flip draws, then the random sub-policies (see the module)."""
    names = op_names()
    pool = [GPSMember(candidate=c) for c in candidates]
    pool += [GPSMember(crop_flip=True) for _ in range(crop_flip_samples)]
    for _ in range(random_subpolicies):
        idx = torch.randint(0, len(names), (ops_per_subpolicy,), generator=generator).tolist()
        levels = torch.rand(ops_per_subpolicy, generator=generator, dtype=torch.float64).tolist()
        pool.append(GPSMember(ops=tuple((names[i], round(lv, 4)) for i, lv in zip(idx, levels)), crop_flip=True))
    if not pool:
        raise ValueError("the GPS pool is empty: give candidates, crop_flip_samples or random_subpolicies")
    return pool


@torch.no_grad()
def pool_log_probs(
    target: torch.nn.Module, x: torch.Tensor, pool: Sequence[GPSMember], generator: torch.Generator,
    batch_size: int = 512, amp: bool = True, progress: bool = False,
) -> torch.Tensor:
    """The target's log-softmax [P,N,K] on one draw of each member's views of ``x`` (on ``x``'s device)."""
    rows = []
    for member in tqdm(pool, desc="gps pool", disable=not progress, leave=False):
        probs = predict_proba(target, member.views(x, generator), batch_size=batch_size, amp=amp)
        rows.append(probs.float().clamp_min(torch.finfo(torch.float32).tiny).log())
    return torch.stack(rows)


@dataclass
class GreedyStep:
    """The policy after one more member: its validation NLL (calibrated when searched so), T, error."""

    member: int
    nll: float
    temperature: float
    error: float


def _chunk_rows(n: int, k: int, budget: int = 1 << 24) -> int:
    return max(1, budget // max(1, n * k))


def greedy_policy_search(
    log_probs: torch.Tensor, y: torch.Tensor, length: int, calibrate: bool = True, progress: bool = False,
) -> list[GreedyStep]:
    """GPS's greedy search over pool members ``log_probs`` [P,N,K] (log-softmax on the validation split).

    Step s adds the member whose ensemble with the s members so far (mean softmax) has the lowest NLL,
    after fitting its temperature when ``calibrate`` (the reference's default; ``--no_select_ts`` off).
    Members may repeat. Vectorised over the pool in chunks that bound memory.
    """
    if log_probs.dim() != 3 or log_probs.shape[1] != y.shape[0]:
        raise ValueError(f"log_probs must be [P,N,K] with N = len(y), got {tuple(log_probs.shape)} and {len(y)} labels")
    if length < 1:
        raise ValueError(f"the policy length must be >= 1, got {length}")
    yd = y.to(log_probs.device).long()
    chunk = _chunk_rows(log_probs.shape[1], log_probs.shape[2])
    current: torch.Tensor | None = None
    steps: list[GreedyStep] = []
    for s in tqdm(range(length), desc="gps search", disable=not progress, leave=False):
        scores, temps = [], []
        for start in range(0, log_probs.shape[0], chunk):
            ens = _ensemble(current, log_probs[start : start + chunk], s)
            nll, t = calibrated_nll(ens, yd) if calibrate else (nll_of(ens, yd), torch.ones(ens.shape[0], device=ens.device))
            scores.append(nll)
            temps.append(t)
        score, temp = torch.cat(scores), torch.cat(temps)
        best = int(torch.argmin(score))  # the first of equal scores
        current = _ensemble(current, log_probs[best : best + 1], s)[0]
        error = float((current.argmax(1) != yd).float().mean())
        steps.append(GreedyStep(best, float(score[best]), float(temp[best]), error))
    return steps


def _ensemble(current: torch.Tensor | None, new: torch.Tensor, members: int) -> torch.Tensor:
    """log of the mean softmax of ``members`` earlier views (``current``, log of their mean) and one new view each."""
    if current is None:
        return new
    return torch.logaddexp(current + math.log(members / (members + 1)), new + math.log(1 / (members + 1)))


@dataclass
class GPSPolicy:
    """A searched GPS policy: its members in greedy order and, per prefix length, NLL, T and error."""

    members: list[GPSMember]
    steps: list[dict[str, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.members or len(self.steps) != len(self.members):
            raise ValueError(f"a GPS policy needs members and one step record each, got {len(self.members)} and {len(self.steps)}")
        for i, step in enumerate(self.steps):
            t = step.get("temperature")
            if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"GPS step {i}: temperature must be a positive number, got {t!r}")

    def temperature(self, k: int) -> float:
        """The temperature fitted to the ensemble of the first ``k`` members."""
        return float(self.steps[k - 1]["temperature"])


def policy_from_search(pool: Sequence[GPSMember], steps: Sequence[GreedyStep], meta: Mapping[str, Any]) -> GPSPolicy:
    return GPSPolicy(
        [pool[s.member] for s in steps],
        [{"nll": s.nll, "temperature": s.temperature, "error": s.error, "pool_index": s.member} for s in steps],
        dict(meta),
    )


def save_gps_policy(path: str | Path, policy: GPSPolicy) -> None:
    """Write the policy as JSON, atomically."""
    write_json(path, {"format": GPS_FORMAT, "version": GPS_VERSION, "members": [m.to_dict() for m in policy.members],
                      "steps": policy.steps, "meta": policy.meta})


def load_gps_policy(path: str | Path) -> GPSPolicy:
    """Read and check a file written by :func:`save_gps_policy`; errors name the file and the fix."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"GPS policy {p} does not exist: run the search_gps stage (dvc repro search_gps)")
    doc = read_json(p)
    try:
        if not isinstance(doc, Mapping) or doc.get("format") != GPS_FORMAT or doc.get("version") != GPS_VERSION:
            raise ValueError(f"not a {GPS_FORMAT} version {GPS_VERSION} file")
        return GPSPolicy([GPSMember.from_dict(m) for m in doc["members"]], list(doc["steps"]), dict(doc.get("meta", {})))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{p}: {exc}; delete it and rerun the search_gps stage (dvc repro search_gps)") from None


@TTA_METHODS.register("gps")
class GPSTTA(TTAMethod):
    """A searched GPS policy's first k members, views drawn afresh, softmaxes averaged, then the
    ensemble's temperature (fitted on the validation split for that prefix) applied."""

    name = "gps"

    family = "fitted"

    merges_views = False

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if not isinstance(ctx.policy, GPSPolicy):
            raise ValueError("method 'gps' needs policy= a GPSPolicy (policies/gps.json from the search_gps stage)")
        if len(ctx.policy.members) < ctx.k:
            raise ValueError(f"method 'gps' with k={ctx.k} needs a policy of at least k members, it has "
                             f"{len(ctx.policy.members)}; raise search_gps.length")
        self.members = ctx.policy.members[: ctx.k]
        self.temperature = ctx.policy.temperature(ctx.k)
        self.generator = method_generator(ctx)

    @property
    def forward_passes(self) -> float:
        return float(self.ctx.k)

    def _predict_chunk(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        mean = self._mean_over_views([m.views(x, self.generator) for m in self.members])
        return scaled_log_probs(mean.float().log(), self.temperature).exp()  # log 0 = -inf: clamped there
