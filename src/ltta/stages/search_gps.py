"""Stage search_gps: greedy policy search (Molchanov et al., UAI 2020) on the valid_loss images.

The pool (the TTA candidates, crop+flip draws, random FAA-op sub-policies; :mod:`ltta.tta.gps`) is
scored once by the frozen target, then the policy grows greedily by calibrated log-likelihood.
Outputs: ``policies/gps.json`` (members in greedy order, and per prefix its validation NLL,
temperature and error: the ``gps`` method takes the first ``evaluate.k`` and that prefix's
temperature), ``plots/gps_search.csv`` (the same per step, for ``dvc plots``) and
``reports/gps_search.md`` (the policy, readable). The MLflow run has the curve as step metrics.
"""

from __future__ import annotations

import csv

from ltta import tracking
from ltta.config import Params
from ltta.io import atomic_path, write_text
from ltta.runtime import make_generator, resolve_device, seed_everything
from ltta.stages.base import Paths, mlflow_stage
from ltta.stages.inputs import load_target, loss_meta, model_location, prepared_meta, validation_split
from ltta.tta.gps import GPSPolicy, gps_pool, greedy_policy_search, policy_from_search, pool_log_probs, save_gps_policy

STAGE = "search_gps"


def policy_markdown(policy: GPSPolicy) -> str:
    """The searched policy as a table: step, member, validation NLL / T / error of the prefix."""
    calibrated = "calibrated " if policy.meta.get("calibrate") else ""
    lines = [f"# GPS policy ({len(policy.members)} members, greedy order)", "",
             f"Searched on {policy.meta.get('images')} valid_loss images; pool of {policy.meta.get('pool')} members. "
             f"Each row: the policy of the first *step* members, its {calibrated}validation NLL, temperature and error.",
             "", "| step | member | NLL | T | error % |", "| ---: | --- | ---: | ---: | ---: |"]
    for i, (m, s) in enumerate(zip(policy.members, policy.steps), start=1):
        lines.append(f"| {i} | {m.describe()} | {s['nll']:.4f} | {s['temperature']:.3f} | {100 * s['error']:.2f} |")
    return "\n".join(lines) + "\n"


def write_steps_csv(path: object, policy: GPSPolicy) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "nll", "error", "temperature"])
        writer.writeheader()
        for i, s in enumerate(policy.steps, start=1):
            writer.writerow({"step": i, "nll": round(s["nll"], 6), "error": round(s["error"], 6),
                             "temperature": round(s["temperature"], 6)})


def run(params: Params, paths: Paths = Paths()) -> None:
    g = params.search_gps
    device = resolve_device(params.device)
    seed_everything(params.seed)
    meta = prepared_meta(paths)
    candidates = loss_meta(paths)["candidates"]
    target = load_target(g.target, paths, meta, device)
    x, y = validation_split(paths, meta, device)
    with mlflow_stage(STAGE, params, ("search_gps",)):
        pool = gps_pool(candidates, g.random_subpolicies, g.ops_per_subpolicy, g.crop_flip_samples,
                        make_generator(params.seed, "cpu"))
        log_probs = pool_log_probs(target, x, pool, make_generator(params.seed, device), g.batch_size, progress=True)
        steps = greedy_policy_search(log_probs, y, g.length, calibrate=g.calibrate, progress=True)
        policy = policy_from_search(pool, steps, {"method": "gps", "pool": len(pool), "images": int(len(y)),
                                                  "calibrate": g.calibrate, "target": str(model_location(g.target, paths))})
        save_gps_policy(paths.gps_policy, policy)
        write_steps_csv(paths.plots / "gps_search.csv", policy)
        write_text(paths.reports / "gps_search.md", policy_markdown(policy))
        for i, s in enumerate(policy.steps, start=1):
            tracking.log_metrics({"gps_nll": s["nll"], "gps_error": s["error"], "gps_temperature": s["temperature"]}, step=i)
        tracking.log_artifacts([paths.gps_policy, paths.reports / "gps_search.md"])
