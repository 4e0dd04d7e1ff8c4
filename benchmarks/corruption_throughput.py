"""Throughput of the 19 CIFAR-C corruptions x 5 severities on one device, per corruption.

Times ``ltta.corruptions.corrupt`` plus the reference's truncating uint8 cast on ``--n`` images
(default 10,000, the size of a CIFAR test set) that are already on the device, one batch per
(corruption, severity) as ``write_corruption_set`` runs them. Every cell is warmed up first on a
small batch (kernel selection, caches, lazy CUDA initialisation), so the figures are steady-state
throughput, not first-call latency. Prints a table of images/s; when a reference timing JSON is
given (``benchmarks/corruption_reference.py --out``, run on the same machine), also the speed
ratio against the reference generator's per-image loop. Writes everything to ``--out`` (JSON).

Needs torch, torchvision and numpy only (no MLflow / DVC / pydantic / Optuna), so it runs on a
bare GPU box:

    PYTHONPATH=src python benchmarks/corruption_throughput.py --device cuda
    PYTHONPATH=src python benchmarks/corruption_throughput.py --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltta.corruptions import ALL_CORRUPTIONS, SEVERITIES, corrupt, derive_seed, truncate_to_uint8  # noqa: E402
from ltta.io import write_json  # noqa: E402
from ltta.runtime import make_generator, to_float_nchw, synchronize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10_dev.npz"
DEFAULT_REFERENCE = ROOT / "benchmarks" / "results" / "corruption_reference_timing_cpu.json"
WARMUP_IMAGES = 64


def load_images(path: Path | None, n: int, seed: int) -> tuple[np.ndarray, str]:
    """``n`` uint8 [n,32,32,3] images: the npz's ``x_train`` tiled to ``n``, or, without a file,
    smooth random images (throughput of spatter and JPEG depends a little on content, so the
    source is recorded)."""
    if path is not None and path.is_file():
        with np.load(path) as d:
            x = d["x_train"]
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3):
            raise ValueError(f"{path}: x_train must be uint8 [N,32,32,3], got {x.dtype} {x.shape}")
        reps = -(-n // len(x))
        return np.concatenate([x] * reps)[:n], str(path)
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (n, 8, 8, 3))
    x = np.kron(low, np.ones((1, 4, 4, 1))) + rng.normal(0, 12, (n, 32, 32, 3))
    return x.clip(0, 255).astype(np.uint8), "synthetic (no --data file)"


def run_cell(x: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    """One (corruption, severity) on the batch, float in, uint8 NHWC out, on ``x``'s device."""
    gen = make_generator(derive_seed(seed, name, severity), x.device)
    return truncate_to_uint8(corrupt(x, name, severity, gen))


def time_corruption(x: torch.Tensor, name: str, severities: list[int], seed: int, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` seconds per severity (the minimum is the least disturbed by other
    jobs on a shared machine), after a warm-up on a small batch."""
    device = x.device
    per_severity: dict[int, float] = {}
    for s in severities:
        run_cell(x[:WARMUP_IMAGES], name, s, seed)
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            run_cell(x, name, s, seed)
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        per_severity[s] = best
    seconds = sum(per_severity.values())
    n = x.shape[0]
    return {
        "corruption": name,
        "seconds": seconds,
        "images": n * len(severities),
        "images_per_s": n * len(severities) / seconds,
        "seconds_per_severity": {str(s): t for s, t in per_severity.items()},
    }


def reference_rates(path: Path | None) -> tuple[dict[str, float], dict[str, Any]]:
    """Images/s of the reference generator per corruption, from corruption_reference.py's JSON
    (its ``summary``; a multi-draw JSON's ``reference_timing`` works too), and where it was run."""
    if path is None or not path.is_file():
        return {}, {}
    import json

    data = json.loads(path.read_text())
    rows = data.get("reference_timing") or data.get("summary") or []
    rates = {r["corruption"]: float(r["ref_images_per_s"]) for r in rows if r.get("ref_images_per_s")}
    meta = data.get("meta", {})
    where = {
        "file": str(path),
        "platform": meta.get("versions", {}).get("platform"),
        "cpu_count": meta.get("cpu_count"),
        "n_eval": meta.get("n_eval"),
    }
    return rates, where


def format_table(rows: list[dict[str, Any]], ref: dict[str, float], total: dict[str, Any]) -> str:
    lines = [f"{'corruption':<20}{'seconds':>9}{'images/s':>12}{'ref img/s':>11}{'ratio':>9}"]
    for r in rows + [total]:
        rr = ref.get(r["corruption"]) if r is not total else total.get("ref_images_per_s")
        ratio = f"{r['images_per_s'] / rr:8.1f}x" if rr else f"{'-':>9}"
        ref_s = f"{rr:11.0f}" if rr else f"{'-':>11}"
        lines.append(f"{r['corruption']:<20}{r['seconds']:9.2f}{r['images_per_s']:12.0f}{ref_s}{ratio}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--n", type=int, default=10000, help="images per (corruption, severity)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="npz with uint8 x_train [N,32,32,3]; synthetic images if missing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--corruptions", nargs="*", default=list(ALL_CORRUPTIONS))
    p.add_argument("--severities", nargs="*", type=int, default=list(SEVERITIES))
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE), help="corruption_reference.py JSON for the speed ratio")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/corruption_throughput_<device>.json)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    unknown = sorted(set(args.corruptions) - set(ALL_CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {', '.join(ALL_CORRUPTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device; run with --device cpu")
    images, source = load_images(Path(args.data) if args.data else None, args.n, args.seed)
    x = to_float_nchw(images, device)
    ref, ref_where = reference_rates(Path(args.reference) if args.reference else None)

    rows = []
    for name in args.corruptions:
        r = time_corruption(x, name, args.severities, args.seed, args.repeats)
        rows.append(r)
        rr = ref.get(name)
        print(f"{name:<20}{r['images_per_s']:12.0f} img/s" + (f"  {r['images_per_s'] / rr:7.1f}x ref" if rr else ""), flush=True)
    seconds = sum(r["seconds"] for r in rows)
    images_total = sum(r["images"] for r in rows)
    total: dict[str, Any] = {"corruption": "all", "seconds": seconds, "images": images_total, "images_per_s": images_total / seconds}
    if ref and all(r["corruption"] in ref for r in rows):
        # the reference is a per-image loop: its time for the same work is images / rate per corruption
        ref_seconds = sum(r["images"] / ref[r["corruption"]] for r in rows)
        total["ref_seconds"] = ref_seconds
        total["ref_images_per_s"] = images_total / ref_seconds
        total["ratio"] = ref_seconds / seconds
    for r in rows:
        if r["corruption"] in ref:
            r["ref_images_per_s"] = ref[r["corruption"]]
            r["ratio"] = r["images_per_s"] / ref[r["corruption"]]
    table = format_table(rows, ref, total)
    print()
    print(table)
    if ref_where:
        print(f"\nreference timings: {ref_where['file']} ({ref_where['platform']}, {ref_where['cpu_count']} CPUs)")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {
        "meta": {
            "device": str(device),
            "device_name": device_name,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "n": args.n,
            "severities": args.severities,
            "repeats": args.repeats,
            "data": source,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "reference": ref_where or None,
        },
        "rows": rows,
        "total": total,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"corruption_throughput_{device.type}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
