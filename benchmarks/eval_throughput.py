"""Evaluation throughput of every TTA method against the bare inference ceiling of the same target.

THROUGHPUT ONLY: the target and the loss predictor have random weights and the images are random
noise, so no error rate here means anything. What is measured is the evaluation hot path
(``ltta.evaluation.evaluate_methods`` over ``--sets`` sets of ``--n`` images, with the methods of
``ltta.tta.build_method``), against the ceiling: the target's bare forward pass on a resident
``--batch-size`` batch (bf16 autocast on CUDA, as ``predict_proba`` uses).

Columns: images/s of the method; forward passes per image (the method's declared cost, in target
passes: k views, plus the loss predictor's FLOPs over the target's for ``learned``, k for
``prior`` (a random fixed choice here) and ``gps`` (k random FAA sub-policies + crop/flip), C for
the oracle and the aggregators, forward + backward for ``tent``); and the ratio ``images/s x passes /
ceiling``: 1.0 means the method runs the target as fast as the bare model does, the rest is
overhead (making views, host syncs, small batches).

    python benchmarks/eval_throughput.py --device cpu --arch small_cnn --n 300
    python benchmarks/eval_throughput.py --device cuda --arch wrn_40_2 --n 623 --sets 24
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltta.evaluation import CLEAN, EvalSet, evaluate_methods  # noqa: E402
from ltta.io import write_json  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.runtime import make_generator, resolve_device, synchronize  # noqa: E402
from ltta.tta import build_candidates, build_method  # noqa: E402

NOTE = "random weights and random images: throughput only, the error rates are meaningless"
METHODS = ("none", "flip", "five_crop", "ten_crop", "random", "learned", "prior", "feat_pick", "gps", "agg_aug",
           "agg_class", "bn_adapt", "tent", "oracle")


def fitted_settings(target: torch.nn.Module, candidates: list[Any], k: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """What the methods fitted on validation data read, untrained (their cost does not depend on the fit):
    feat_pick's head, a GPS policy of k random FAA sub-policies + crop/flip, the two aggregators."""
    from ltta.tta.gps import GPSPolicy, gps_pool

    classes = int(target.fc.out_features)
    pool = gps_pool([], random_subpolicies=k, ops_per_subpolicy=3, crop_flip_samples=0,
                    generator=torch.Generator().manual_seed(4))
    head = build_model("feature_head", features=int(target.fc.in_features), classes=classes, num_outputs=len(candidates))
    return {
        "feat_pick": {"predictor": head.to(device).eval()},
        "gps": {"policy": GPSPolicy(pool, [{"nll": 0.0, "temperature": 1.0, "error": 0.0}] * len(pool))},
        **{kind: {"predictor": build_model(kind, views=len(candidates), classes=classes).to(device).eval()}
           for kind in ("agg_aug", "agg_class")},
    }


def _forward_rate(model: torch.nn.Module, device: torch.device, batch: int, seconds: float) -> float:
    x = torch.rand(batch, 3, 32, 32, device=device)
    cuda = device.type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), amp:
        for _ in range(3):
            model(x)
        synchronize(device)
        steps, t0 = 0, time.perf_counter()
        while steps < 3 or time.perf_counter() - t0 < seconds:
            model(x)
            steps += 1
            if cuda and steps % 10 == 0:
                synchronize(device)
        synchronize(device)
        return steps * batch / (time.perf_counter() - t0)


def inference_ceiling(model: torch.nn.Module, device: torch.device, batch_size: int, seconds: float) -> float:
    """Images/s of the bare forward pass on a resident batch (no views, no copies, no syncs in between).

    The best over batch sizes up to ``batch_size`` (64, 128, 256, ..., ``batch_size``): a GPU is
    fastest at the largest, a CPU often at a smaller one that fits its caches.
    """
    sizes = sorted({b for b in (64, 128, 256, 512, 1024) if b < batch_size} | {batch_size})
    return max(_forward_rate(model, device, b, seconds / len(sizes)) for b in sizes)


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="small_cnn", help="target architecture (ltta.models), e.g. small_cnn, wrn_40_2")
    ap.add_argument("--depth", type=int, default=None, help="WRN depth for --arch wrn (e.g. 10 = one block per stage)")
    ap.add_argument("--n", type=int, default=300, help="images per evaluation set")
    ap.add_argument("--sets", type=int, default=6, help="evaluation sets (timed); one more is run first as warm-up")
    ap.add_argument("--k", type=int, default=3, help="views per image of random / learned")
    ap.add_argument("--candidates", default="all", help="candidate set: all (24) or paper (12)")
    ap.add_argument("--predictor-width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=512, help="images per target forward pass")
    ap.add_argument("--eval-batch-size", type=int, default=None, help="evaluate_methods batch_size (None: whole set)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--ceiling-seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("benchmark_eval_throughput.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    arch_kw: dict[str, Any] = {"depth": args.depth} if args.depth is not None else {}
    target = build_model(args.arch, num_classes=10, **arch_kw).to(device).eval()
    if device.type == "cuda":
        target = target.to(memory_format=torch.channels_last)
    candidates = build_candidates(args.candidates)
    predictor = build_model("loss_predictor", num_outputs=len(candidates), width=args.predictor_width).to(device).eval()

    prior = torch.randn(len(candidates), generator=torch.Generator().manual_seed(3))  # any fixed top-k costs the same
    ceiling = inference_ceiling(target, device, args.batch_size, args.ceiling_seconds)

    gen = torch.Generator(device=device).manual_seed(1)
    sets = [
        EvalSet(CLEAN if i == 0 else "gaussian_noise", 0 if i == 0 else 1,
                torch.rand(args.n, 3, 32, 32, device=device, generator=gen),
                torch.randint(0, 10, (args.n,), device=device, generator=gen))
        for i in range(args.sets + 1)
    ]
    per_method = fitted_settings(target, candidates, args.k, device)
    common = {"candidates": candidates, "k": args.k, "predictor": predictor, "prior": prior, "batch_size": args.batch_size,
              "device": device}
    methods = {m: build_method(m, target, generator=make_generator(2, device), **{**common, **per_method.get(m, {})})
               for m in args.methods}
    evaluate_methods(methods, sets[:1], batch_size=args.eval_batch_size, progress=False)  # warm-up (allocator, cudnn)
    synchronize(device)
    t0 = time.perf_counter()
    results = evaluate_methods(methods, sets[1:], batch_size=args.eval_batch_size, progress=False)
    total_s = time.perf_counter() - t0
    summary = results.summary([], [])

    rows = {}
    for m in args.methods:
        ips, passes = float(summary[m]["images_per_s"]), float(summary[m]["forward_passes"])
        rows[m] = {"images_per_s": ips, "forward_passes": passes, "ratio_to_ceiling": ips * passes / ceiling}
    report = {
        "note": NOTE,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "arch": args.arch, "depth": args.depth,
        "n": args.n, "sets": args.sets, "k": args.k, "candidates": len(candidates), "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size, "inference_ceiling_images_per_s": ceiling,
        "evaluate_seconds": total_s, "methods": rows,
    }
    write_json(args.out, report)

    print(f"\n{report['device']} | torch {report['torch']} | {torch.get_num_threads()} threads | {args.arch} | "
          f"{args.sets} sets x {args.n} images | {len(candidates)} candidates, k={args.k}")
    print(f"NOTE: {NOTE}")
    print(f"inference ceiling: {ceiling:.0f} images/s (bare forward, batch {args.batch_size}); "
          f"evaluation took {total_s:.1f} s")
    print(f"{'method':<12}{'images/s':>12}{'passes/img':>12}{'ratio':>8}")
    for m, r in rows.items():
        print(f"{m:<12}{r['images_per_s']:>12.1f}{r['forward_passes']:>12.3f}{r['ratio_to_ceiling']:>8.2f}")
    print(f"(ratio = images/s x passes / ceiling; wrote {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
