"""Numerical check of ltta's CIFAR-C corruptions against the reference generator of CIFAR-10-C.

The reference is hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py`` (Hendrycks &
Dietterich, ICLR 2019). It is *not* part of this repository: the user fetches a checkout and
passes ``--reference-dir`` (the checkout, or its ``ImageNet-C/create_c`` folder). That script runs
its whole CIFAR generation at import time; :mod:`corruption_reference_loader` executes only its
definitions, with compatibility shims for APIs newer libraries dropped. This module is the
comparison and its report.

For every corruption x severity, on the same real images (``--data``: uint8 ``x_train`` [N,32,32,3]),
it runs ours (:func:`ltta.corruptions.corrupt_images`) and the reference (one image at a time, as
its driver does: ``np.uint8(fn(ToPILImage(ToTensor(img)), severity))``) and reports:

* deterministic corruptions: the mean absolute difference in uint8 levels (target < 1, JPEG < 2);
* random corruptions (different random streams, so pixels cannot match): the mean perturbation
  size ``mean |corrupted - clean|`` of each, and the error of one fixed classifier (trained here on
  other images of the same file) on each, with binomial and paired standard errors (target:
  errors within 0.5 points);
* throughput of both on this machine (images/s, the reference single-process as it is written).

Needs, besides ltta: scikit-image, opencv-python(-headless), Wand with ImageMagick's MagickWand
library (Debian: ``libmagickwand-dev``). Without Wand the two corruptions that call ImageMagick
(motion_blur, snow) are skipped and reported as such.

    python benchmarks/corruption_reference.py --reference-dir /tmp/robustness \\
        --data ../shared/data/cifar10_dev.npz --out benchmarks/results/corruption_reference.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from corruption_reference_report import markdown_tables  # noqa: E402
from corruption_reference_loader import SHARED_DRAWS, Reference, load_reference, reference_corrupt  # noqa: E402
from ltta.corruptions import ALL_CORRUPTIONS, corrupt_images, derive_seed  # noqa: E402
from ltta.io import save_torch, write_json, write_text  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.runtime import to_float_nchw  # noqa: E402
from ltta.training import TrainConfig, predict_proba, train_classifier  # noqa: E402

# Corruptions whose output is a deterministic function of the image; all others draw randomness.
DETERMINISTIC: tuple[str, ...] = (
    "defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression", "saturate",
    "gaussian_blur",
)  # fmt: skip
# Mean-absolute-difference targets (uint8 levels) of the issue: JPEG is allowed more, since two
# libjpeg builds (torchvision's vs Pillow's) may round the DCT differently.
MAD_TARGET: dict[str, float] = {name: (2.0 if name == "jpeg_compression" else 1.0) for name in DETERMINISTIC}
ERROR_TARGET_POINTS = 0.5
# Our flag (the issue sets no number): a random corruption's mean perturbation size that differs
# from the reference's by more than this fraction is marked for a look.
PERTURBATION_REL_TOL = 0.05


# ---------------------------------------------------------------- measurements


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def binomial_std_points(error: float, n: int) -> float:
    return 100.0 * math.sqrt(max(error * (1 - error), 0.0) / n)


def paired_std_points(wrong_a: np.ndarray, wrong_b: np.ndarray) -> float:
    """Standard error (points) of err_a - err_b on the same images: from the per-image difference
    of the 0/1 mistakes, so images both get right or both get wrong add no noise."""
    d = wrong_a.astype(np.float64) - wrong_b.astype(np.float64)
    n = d.size
    return 100.0 * float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


@dataclass
class Classifier:
    model: torch.nn.Module
    clean_error: float
    train_seconds: float

    def wrong(self, images_uint8: np.ndarray, labels: np.ndarray) -> np.ndarray:
        x = to_float_nchw(np.ascontiguousarray(images_uint8), "cpu")
        pred = predict_proba(self.model, x, amp=False).argmax(1).numpy()
        return pred != labels


def train_fixed_classifier(
    x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, args: argparse.Namespace
) -> Classifier:
    """Train (or, with ``--classifier-cache`` of the same settings and data, reload) the classifier
    whose error on each generator's images is compared. It only has to be fixed, not good."""
    model = build_model(args.arch, num_classes=int(y.max()) + 1)
    key = {"arch": args.arch, "epochs": args.epochs, "lr": args.lr, "seed": args.seed, "n_train": len(x),
           "data_sum": int(x.astype(np.int64).sum())}  # fmt: skip
    cache = Path(args.classifier_cache) if args.classifier_cache else None
    seconds = 0.0
    cached = torch.load(cache, map_location="cpu") if cache is not None and cache.is_file() else None
    if cached is not None and cached.get("key") == key:
        model.load_state_dict(cached["state_dict"])
    else:
        torch.manual_seed(args.seed)
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, amp=False, channels_last=False, seed=args.seed)
        t0 = time.perf_counter()
        train_classifier(model, to_float_nchw(x, "cpu"), torch.from_numpy(y).long(), cfg, progress=False)
        seconds = time.perf_counter() - t0
        if cache is not None:
            save_torch(cache, {"key": key, "state_dict": model.state_dict()})
    model.eval()
    clf = Classifier(model=model, clean_error=0.0, train_seconds=seconds)
    clf.clean_error = float(clf.wrong(x_eval, y_eval).mean())
    return clf


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def check_cell(
    name: str,
    severity: int,
    ref_fn: Callable[..., Any],
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    clf: Classifier,
    seed: int,
    repeats: int = 1,
) -> dict[str, Any]:
    """One (corruption, severity): both generators on the same images, every statistic.

    A random corruption is drawn ``repeats`` times by each generator (seeds ``seed .. seed+R-1``);
    errors and perturbations are averaged over the draws per image, which shrinks the noise of
    the error difference (the draws, not the images, are what differs between the two sides).
    """
    draws = 1 if name in DETERMINISTIC else repeats
    n = x_eval.shape[0]
    wrong_ours = np.zeros(n)
    wrong_ref = np.zeros(n)
    pert_ours = pert_ref = t_ours = t_ref = 0.0
    per_draw: dict[str, list[float]] = {"error_ours": [], "error_ref": [], "perturbation_ours": [], "perturbation_ref": []}
    for r in range(draws):
        cell_seed = derive_seed(seed + r, name, severity)
        o, dt_o = _timed(lambda: corrupt_images(x_eval, name, severity, seed=cell_seed))
        f, dt_f = _timed(lambda: reference_corrupt(ref_fn, x_eval, severity, cell_seed))
        if r == 0:
            ours, ref = o, f
        w_o, w_f = clf.wrong(o, y_eval), clf.wrong(f, y_eval)
        p_o, p_f = mean_abs_diff(o, x_eval), mean_abs_diff(f, x_eval)
        wrong_ours += w_o / draws
        wrong_ref += w_f / draws
        pert_ours += p_o / draws
        pert_ref += p_f / draws
        t_ours += dt_o
        t_ref += dt_f
        per_draw["error_ours"].append(float(w_o.mean()))
        per_draw["error_ref"].append(float(w_f.mean()))
        per_draw["perturbation_ours"].append(p_o)
        per_draw["perturbation_ref"].append(p_f)
    err_ours, err_ref = float(wrong_ours.mean()), float(wrong_ref.mean())
    shared_mad = None
    if name in SHARED_DRAWS:  # the first draw's reference output, against ours on its draws
        shared_mad = mean_abs_diff(SHARED_DRAWS[name](x_eval, severity, derive_seed(seed, name, severity)), ref)
    row: dict[str, Any] = {
        "corruption": name,
        "severity": severity,
        "kind": "deterministic" if name in DETERMINISTIC else "random",
        "n": n,
        "draws": draws,
        "mad_ours_ref": mean_abs_diff(ours, ref),
        "max_abs_ours_ref": max_abs_diff(ours, ref),
        "frac_pixels_differ": float((ours != ref).mean()),
        "mad_shared_draws": shared_mad,
        "perturbation_ours": pert_ours,
        "perturbation_ref": pert_ref,
        "error_ours": err_ours,
        "error_ref": err_ref,
        "error_diff_points": 100.0 * (err_ours - err_ref),
        "error_binomial_std_points": binomial_std_points(err_ref, n),
        "error_diff_paired_std_points": paired_std_points(wrong_ours, wrong_ref),
        "ours_seconds": t_ours,
        "ref_seconds": t_ref,
        "ours_images_per_s": n * draws / t_ours,
        "ref_images_per_s": n * draws / t_ref,
    }
    row["perturbation_rel_diff"] = (row["perturbation_ours"] - row["perturbation_ref"]) / max(row["perturbation_ref"], 1e-9)
    if name in DETERMINISTIC:
        row["target"] = f"MAD < {MAD_TARGET[name]:g}"
        row["passed"] = row["mad_ours_ref"] < MAD_TARGET[name]
    else:
        row["target"] = f"|d err| <= {ERROR_TARGET_POINTS:g} pt"
        row["passed"] = abs(row["error_diff_points"]) <= ERROR_TARGET_POINTS
        # A miss smaller than two paired standard errors is what sampling alone produces often.
        row["within_2_std"] = abs(row["error_diff_points"]) <= 2 * row["error_diff_paired_std_points"]
        row["perturbation_flag"] = abs(row["perturbation_rel_diff"]) > PERTURBATION_REL_TOL
        row["per_draw"] = per_draw
        if draws >= 2:
            row["draw_spread"] = {
                "error_points": draw_spread(per_draw["error_ours"], per_draw["error_ref"], scale=100.0),
                "perturbation": draw_spread(per_draw["perturbation_ours"], per_draw["perturbation_ref"]),
            }
    return row


def draw_spread(ours: list[float], ref: list[float], scale: float = 1.0) -> dict[str, Any]:
    """Draw-to-draw statistics of one quantity measured on K draws of each generator.

    The reference's own draws give the noise a difference has to be judged against: its mean,
    standard deviation (ddof 1) and range, whether our mean lies inside that range, and the
    difference of the means with its standard error ``sqrt(sd_ours^2 / K + sd_ref^2 / K)``
    (two independent sets of draws; ``z`` is the difference over it).
    """
    o = np.asarray(ours, dtype=np.float64) * scale
    f = np.asarray(ref, dtype=np.float64) * scale
    diff = float(o.mean() - f.mean())
    se = math.sqrt(o.var(ddof=1) / len(o) + f.var(ddof=1) / len(f))
    return {
        "draws": len(o),
        "ours_mean": float(o.mean()),
        "ours_std": float(o.std(ddof=1)),
        "ref_mean": float(f.mean()),
        "ref_std": float(f.std(ddof=1)),
        "ref_min": float(f.min()),
        "ref_max": float(f.max()),
        "ours_mean_within_ref_range": bool(f.min() <= o.mean() <= f.max()),
        "diff": diff,
        "diff_se": se,
        "z": diff / se if se > 0 else (0.0 if diff == 0 else math.inf),
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per corruption over its five severities (n x 5 evaluations): the pooled error difference
    has ~1/sqrt(5) of a single cell's noise."""
    out = []
    for name in ALL_CORRUPTIONS:
        cells = [r for r in rows if r["corruption"] == name]
        if not cells:
            continue
        diffs = np.array([r["error_diff_points"] for r in cells])
        stds = np.array([r["error_diff_paired_std_points"] for r in cells])
        ref_s = sum(r["ref_seconds"] for r in cells)
        ours_s = sum(r["ours_seconds"] for r in cells)
        n_img = sum(r["n"] * r["draws"] for r in cells)
        out.append(
            {
                "corruption": name,
                "kind": cells[0]["kind"],
                "max_mad_ours_ref": max(r["mad_ours_ref"] for r in cells),
                "mean_perturbation_ours": float(np.mean([r["perturbation_ours"] for r in cells])),
                "mean_perturbation_ref": float(np.mean([r["perturbation_ref"] for r in cells])),
                "mean_error_diff_points": float(diffs.mean()),
                "mean_error_diff_std_points": float(math.sqrt((stds**2).sum()) / len(stds)),
                "cells_passed": sum(bool(r["passed"]) for r in cells),
                "cells": len(cells),
                "ref_images_per_s": n_img / ref_s,
                "ours_images_per_s": n_img / ours_s,
                "speedup": ref_s / ours_s,
                "draw_spread": pooled_spread(cells),
            }
        )
    return out


def pooled_spread(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Draw-to-draw spread of a corruption's 5-severity means: draw r of every severity pooled,
    giving K values per generator (None unless every cell has 2+ draws)."""
    if not cells or not all(r.get("draw_spread") for r in cells):
        return None

    def pooled(key: str) -> list[float]:
        return [float(v) for v in np.mean([r["per_draw"][key] for r in cells], axis=0)]

    return {
        "error_points": draw_spread(pooled("error_ours"), pooled("error_ref"), scale=100.0),
        "perturbation": draw_spread(pooled("perturbation_ours"), pooled("perturbation_ref")),
    }


# ---------------------------------------------------------------- versions


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("numpy", "scipy", "scikit-image", "opencv-python-headless", "opencv-python", "Wand", "pillow", "torch", "torchvision"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(Exception):
        import wand.version

        out["ImageMagick"] = str(wand.version.MAGICK_VERSION)
    return out


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", required=True, help="checkout of hendrycks/robustness (or its ImageNet-C/create_c)")
    p.add_argument("--data", default=str(root.parent / "shared" / "data" / "cifar10_dev.npz"), help="npz with uint8 x_train [N,32,32,3], y_train")
    p.add_argument("--n-train", type=int, default=3600, help="images the fixed classifier trains on (the first ones)")
    p.add_argument("--n-eval", type=int, default=500, help="held-out images both generators corrupt")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=1,
        help="draws of each random corruption per side (seeds seed..seed+R-1): averaged errors (noise / R) and, "
        "from 2 on, the draw-to-draw spread of both generators",
    )
    p.add_argument("--classifier-cache", default=None, help="save/reload the trained classifier here (keyed by its settings)")
    p.add_argument("--corruptions", nargs="*", default=list(ALL_CORRUPTIONS), help="subset of names (default: all 19)")
    p.add_argument("--severities", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--timing-only", action="store_true",
        help="only time the reference on the --n-eval images (no classifier, no comparison): the "
        "reference_timing JSON that corruption_throughput.py --reference reads",
    )
    p.add_argument("--out", default=None, help="JSON with every cell, the summary and the environment")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    return p


def reference_timing(reference: Reference, images: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Only the reference generator's throughput (its per-image driver loop, images/s per
    corruption over the chosen severities), no classifier and no ours: a quick run to put right
    before ``corruption_throughput.py`` on the same machine, so both see the same load."""
    rows = []
    for name in args.corruptions:
        if name not in reference.functions:
            print(f"{name:18s} skipped: {reference.skipped.get(name)}", flush=True)
            continue
        seconds = 0.0
        for s in args.severities:
            fn = reference.functions[name]
            _, dt = _timed(lambda fn=fn, s=s, name=name: reference_corrupt(fn, images, s, derive_seed(args.seed, name, s)))
            seconds += dt
        n_img = len(images) * len(args.severities)
        rows.append({"corruption": name, "ref_seconds": seconds, "images": n_img, "ref_images_per_s": n_img / seconds})
        print(f"{name:18s} reference {n_img / seconds:8.0f} img/s", flush=True)
    meta = {
        "mode": "timing-only",
        "n_eval": len(images),
        "severities": args.severities,
        "reference_script": str(reference.script),
        "skipped": reference.skipped,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": _versions(),
    }
    result = {"meta": meta, "reference_timing": rows}
    if args.out:
        write_json(args.out, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.corruptions) - set(ALL_CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {', '.join(ALL_CORRUPTIONS)}")
    reference = load_reference(args.reference_dir)
    with np.load(args.data) as d:
        x_all, y_all = d["x_train"], d["y_train"].astype(np.int64)
    if x_all.dtype != np.uint8 or x_all.shape[1:] != (32, 32, 3):
        raise ValueError(f"{args.data}: x_train must be uint8 [N,32,32,3], got {x_all.dtype} {x_all.shape}")
    if args.n_train + args.n_eval > len(x_all):
        raise ValueError(f"--n-train {args.n_train} + --n-eval {args.n_eval} exceeds the {len(x_all)} images in {args.data}")
    x_tr, y_tr = x_all[: args.n_train], y_all[: args.n_train]
    x_ev, y_ev = x_all[args.n_train : args.n_train + args.n_eval], y_all[args.n_train : args.n_train + args.n_eval]

    if args.timing_only:
        return reference_timing(reference, x_ev, args)

    t_start = time.perf_counter()
    clf = train_fixed_classifier(x_tr, y_tr, x_ev, y_ev, args)
    print(f"classifier {args.arch}: clean error {100 * clf.clean_error:.1f}% on {len(x_ev)} images ({clf.train_seconds:.0f} s)", flush=True)

    rows: list[dict[str, Any]] = []
    for name in args.corruptions:
        if name not in reference.functions:
            print(f"{name:18s} skipped: {reference.skipped.get(name)}", flush=True)
            continue
        for s in args.severities:
            r = check_cell(name, s, reference.functions[name], x_ev, y_ev, clf, args.seed, args.repeats)
            rows.append(r)
            print(
                f"{name:18s} s{s} MAD {r['mad_ours_ref']:7.3f}  pert {r['perturbation_ours']:6.2f}/{r['perturbation_ref']:6.2f}  "
                f"err {100 * r['error_ours']:5.1f}/{100 * r['error_ref']:5.1f}  d {r['error_diff_points']:+5.1f}"
                f"±{r['error_diff_paired_std_points']:.1f}  img/s {r['ours_images_per_s']:7.0f}/{r['ref_images_per_s']:6.0f}  "
                f"{'pass' if r['passed'] else 'MISS'}",
                flush=True,
            )
    summary = summarise(rows)
    meta = {
        "data": args.data,
        "n_train": len(x_tr),
        "n_eval": len(x_ev),
        "arch": args.arch,
        "epochs": args.epochs,
        "seed": args.seed,
        "repeats": args.repeats,
        "clean_error": clf.clean_error,
        "classifier_train_seconds": clf.train_seconds,
        "reference_script": str(reference.script),
        "skipped": reference.skipped,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "total_seconds": time.perf_counter() - t_start,
        "versions": _versions(),
        "targets": {"mad": MAD_TARGET, "error_points": ERROR_TARGET_POINTS, "perturbation_rel_flag": PERTURBATION_REL_TOL},
    }
    md = markdown_tables(rows, summary, meta)
    print()
    print(md)
    result = {"meta": meta, "rows": rows, "summary": summary}
    if args.out:
        write_json(args.out, result)
    if args.markdown:
        write_text(args.markdown, md)
    return result


if __name__ == "__main__":
    main()
