"""Wall-clock of a reference-sized Fast AutoAugment search, in one process or several workers.

The reference search (kakaobrain/fast-autoaugment ``search.py``; Lim et al. 2019) runs K=5 folds of
reduced CIFAR-10 (4,000 images: 2,400 D_M / 1,600 D_A per fold), trains a WRN-40-2 on each D_M,
then B=200 TPE trials per fold and repeat, T=2 repeats in the paper, and merges the top N=10 of
each; it reports 3.5 GPU-hours on its hardware. This script runs the same search with the library
(``ltta.search``) on real images (``--data``, an .npz with ``x_train``/``y_train``, e.g. the
CIFAR-10 dev sample) and reports where the time goes: fold-model training, trials, merging.

With ``--workers W`` > 1 the search is spread over W processes sharing one Optuna SQLite storage
and one fold-model cache, exactly as ``ltta search-policy --worker`` does (``run_search_worker``):
fold models train concurrently, and TPE's host-side sampling of one process overlaps the GPU
work of the others. The main process then joins as :func:`ltta.search.search_policy` and merges.

    python benchmarks/search_wallclock.py --data cifar10_dev.npz --device cuda --workers 5 --compile
    python benchmarks/search_wallclock.py --data cifar10_dev.npz --device cpu --n 400 --trials 4 \\
        --epochs 1 --folds 2 --arch small_cnn --repeats 1   # a smoke run

Needs torch, numpy, scikit-learn-free ltta.search (optuna, sqlalchemy). Prints a table, writes the
JSON report (``--out``) and the searched policy (``--policy-out``).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import optuna  # noqa: E402

from ltta.io import write_json  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.runtime import resolve_device, to_float_nchw  # noqa: E402
from ltta.search import SearchSpec, search_policy  # noqa: E402
from ltta.search.worker import run_search_worker  # noqa: E402
from ltta.training import TrainConfig, train_classifier  # noqa: E402
from ltta.transforms.policy import save_policy  # noqa: E402


def load_search_set(path: Path, n: int, holdout: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified subset of ``n`` images (all when there are fewer), as FAA's reduced CIFAR-10.

    ``holdout`` > 0 first removes the test part that ``benchmarks/dev_study.py`` holds out (the
    same ``stratified_holdout`` split), so a policy searched here never saw those test images.
    """
    with np.load(path) as z:
        x, y = z["x_train"], z["y_train"].astype(np.int64)
    if holdout > 0:
        from ltta.data import stratified_holdout

        train, _ = stratified_holdout(y, holdout, seed=0)
        x, y = x[train], y[train]
    if n >= len(y):
        return x, y
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    classes = np.unique(y)
    for c in classes:  # proportional per class, so every class keeps its share
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, size=max(1, round(n * len(idx) / len(y))), replace=False))
    sel = np.sort(np.concatenate(keep))[:n]
    return x[sel], y[sel]


def train_fold_model(
    x_dm: torch.Tensor, y_dm: torch.Tensor, fold: int, *, arch: str, classes: int, epochs: int, batch_size: int,
    compile_model: bool, timings: dict[str, float] | None = None,
) -> torch.nn.Module:
    """FAA's fold model: trained on D_M without augmentation, as the search_policy stage does."""
    t0 = time.perf_counter()
    model = build_model(arch, num_classes=classes).to(x_dm.device)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, augment="none", seed=fold, compile=compile_model)
    train_classifier(model, x_dm, y_dm, cfg, progress=False)
    if timings is not None:
        timings[f"fold{fold}_train_s"] = time.perf_counter() - t0
    return model.eval()


def search_spec(args: argparse.Namespace) -> SearchSpec:
    """The search's K, B, T and policy shape from the command line (the same in every process)."""
    return SearchSpec(num_folds=args.folds, fold_ratio=args.fold_ratio, num_trials=args.trials,
                      num_policies=args.policies, num_ops=args.ops, top_n=args.top_n, repeats=args.repeats, seed=0)


def _worker(args: argparse.Namespace, storage: str, cache: str, key: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(args.device)
    x_np, y_np = load_search_set(args.data, args.n, args.holdout)
    x, y = to_float_nchw(x_np, device), torch.as_tensor(y_np, device=device)
    fn = functools.partial(train_fold_model, arch=args.arch, classes=int(y_np.max()) + 1, epochs=args.epochs,
                           batch_size=args.batch_size, compile_model=args.compile)
    run_search_worker(x, y, search_spec(args), train_fn=fn, device=device, storage=storage, model_cache=cache,
                      cache_key=key, wait=False)


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help=".npz with x_train (uint8 NHWC) and y_train")
    ap.add_argument("--n", type=int, default=4000, help="search images (FAA: 4,000 of CIFAR-10)")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="first hold out this test fraction as dev_study.py does (0.15 there); 0: none")
    ap.add_argument("--folds", type=int, default=5, help="K")
    ap.add_argument("--fold-ratio", type=float, default=0.4, help="D_A share of each fold")
    ap.add_argument("--trials", type=int, default=200, help="B, TPE trials per fold and repeat")
    ap.add_argument("--repeats", type=int, default=2, help="T (the paper: 2; the reference code: 1)")
    ap.add_argument("--top-n", type=int, default=10)
    ap.add_argument("--policies", type=int, default=5, help="sub-policies per candidate policy")
    ap.add_argument("--ops", type=int, default=2, help="ops per sub-policy")
    ap.add_argument("--arch", default="wrn_40_2")
    ap.add_argument("--epochs", type=int, default=200, help="epochs of each fold model on D_M")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="torch.compile the fold models (CUDA graphs)")
    ap.add_argument("--workers", type=int, default=1, help="search processes sharing one SQLite storage")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmark_search_wallclock.json"))
    ap.add_argument("--policy-out", type=Path, default=Path("faa_searched.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial would bury the table
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    x_np, y_np = load_search_set(args.data, args.n, args.holdout)
    classes = int(y_np.max()) + 1
    x, y = to_float_nchw(x_np, device), torch.as_tensor(y_np, device=device)
    timings: dict[str, float] = {}
    trial_times: list[float] = []
    key = f"{args.arch}-{args.epochs}-{args.batch_size}"
    with tempfile.TemporaryDirectory(prefix="ltta-search-") as tmp:
        storage = f"sqlite:///{tmp}/search.db" if args.workers > 1 else None
        cache = f"{tmp}/models" if args.workers > 1 else None
        t0 = time.perf_counter()
        procs = []
        if args.workers > 1:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_worker, args=(args, storage, cache, key)) for _ in range(args.workers - 1)]
            for p in procs:
                p.start()
        fn = functools.partial(train_fold_model, arch=args.arch, classes=classes, epochs=args.epochs,
                               batch_size=args.batch_size, compile_model=args.compile, timings=timings)
        policy, history = search_policy(
            x, y, search_spec(args), train_fn=fn, device=device, storage=storage, model_cache=cache, cache_key=key,
            on_trial=lambda fold, trial, score: trial_times.append(time.perf_counter()),
        )
        for p in procs:
            p.join()
        total = time.perf_counter() - t0
    save_policy(args.policy_out, policy)
    scores = [h["score"] for h in history]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "data": str(args.data), "images": len(y_np), "folds": args.folds,
        "fold_ratio": args.fold_ratio, "trials_per_fold_and_repeat": args.trials, "repeats": args.repeats,
        "top_n": args.top_n, "arch": args.arch, "fold_epochs": args.epochs, "compile": args.compile,
        "workers": args.workers, "total_s": total, "trials_completed": len(history),
        "fold_training_s_main_process": {k: v for k, v in timings.items()},
        "trials_in_main_process": len(trial_times), "subpolicies": len(policy.subpolicies),
        "score_mean": float(np.mean(scores)) if scores else None, "score_max": float(np.max(scores)) if scores else None,
        "reference_gpu_hours": 3.5,
    }  # fmt: skip
    write_json(args.out, report)
    print(f"\n{report['device']} | torch {report['torch']} | {args.workers} worker(s) | {args.arch}, {args.epochs} epochs per fold model")
    print(f"search: {len(y_np)} images, K={args.folds}, B={args.trials}, T={args.repeats}, top {args.top_n}")
    print(f"{'wall-clock':<34}{total:>10.1f} s  ({total / 60:.1f} min; reference: 3.5 GPU-h)")
    for k, v in timings.items():
        print(f"{'  ' + k + ' (main process)':<34}{v:>10.1f} s")
    print(f"{'trials completed (all workers)':<34}{len(history):>10d}")
    print(f"{'final policy':<34}{len(policy.subpolicies):>10d} sub-policies  (wrote {args.policy_out})")
    print(f"{'trial score mean / max':<34}{report['score_mean'] or 0:>10.3f} / {report['score_max'] or 0:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
