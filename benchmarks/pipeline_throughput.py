"""Throughput of every hot path of the pipeline against the hardware's ceiling, plus a small real run.

Runs the library directly (no DVC / MLflow), so it needs only torch, torchvision, numpy,
scikit-learn and tqdm. On a real CIFAR sample (``--data x.npz`` with ``x_train, y_train``) it:

1. measures the ceiling: the model's bare bf16 forward+backward (training) and forward (inference)
   throughput on random tensors already on the device, the best any pipeline step can do;
2. trains the target (standard crop+flip) and reports images/s and the ratio to the ceiling;
3. generates all 19 corruptions x 5 severities for ``--corrupt-n`` images (images/s);
4. builds the loss dataset (the target under all 24 candidates) and trains the loss predictor;
5. evaluates none / flip / five_crop / random / learned / oracle on the clean and corrupted
   held-out images and prints the paper's table (mean corruption error over the 15 benchmark
   corruptions).

Prints a table; writes everything to ``--out`` (JSON).

    python benchmarks/pipeline_throughput.py --data cifar10_dev.npz --arch wrn_40_2 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltta.corruptions import ALL_CORRUPTIONS, BENCHMARK, EXTRA, corrupt  # noqa: E402
from ltta.data import loss_predictor_split, stratified_holdout  # noqa: E402
from ltta.evaluation import CLEAN, EvalSet, evaluate_methods  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.runtime import make_generator, resolve_device, to_float_nchw, synchronize  # noqa: E402
from ltta.predictor.trainer import PredictorConfig, train_predictor  # noqa: E402
from ltta.training import TrainConfig, evaluate_classifier, train_classifier  # noqa: E402
from ltta.tta import build_candidates, build_method, identity_index  # noqa: E402
from ltta.predictor import candidate_losses, predictor_training_inputs  # noqa: E402


def timed(fn: Any, device: torch.device, repeats: int = 1) -> tuple[Any, float]:
    synchronize(device)
    t0 = time.perf_counter()
    out = None
    for _ in range(repeats):
        out = fn()
    synchronize(device)
    return out, (time.perf_counter() - t0) / repeats


def ceilings(arch: str, num_classes: int, device: torch.device, batch: int, steps: int) -> dict[str, float]:
    """Bare bf16 forward+backward and forward throughput on random data resident on the device."""
    model = build_model(arch, num_classes=num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step() -> None:
        with amp:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        train_step()
    _, t = timed(train_step, device, steps)
    model.eval()

    @torch.no_grad()
    def infer() -> None:
        with amp:
            model(x)

    for _ in range(3):
        infer()
    _, ti = timed(infer, device, steps)
    return {"train_images_per_s": batch / t, "infer_images_per_s": batch / ti, "batch": batch}


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help=".npz with x_train (uint8 NHWC 32x32) and y_train")
    ap.add_argument("--arch", default="wrn_40_2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--test-fraction", type=float, default=0.15)
    ap.add_argument("--corrupt-n", type=int, default=10000, help="images for the corruption throughput run")
    ap.add_argument("--predictor-epochs", type=int, default=30)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmark_pipeline.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    with np.load(args.data) as z:
        x_all, y_all = z["x_train"], z["y_train"].astype(np.int64)
    num_classes = int(y_all.max()) + 1
    tr, te = stratified_holdout(y_all, args.test_fraction, seed=0)
    x_tr, y_tr = to_float_nchw(x_all[tr], device), torch.as_tensor(y_all[tr], device=device)
    x_te, y_te = to_float_nchw(x_all[te], device), torch.as_tensor(y_all[te], device=device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "arch": args.arch, "n_train": len(tr), "n_test": len(te),
    }

    ceil = ceilings(args.arch, num_classes, device, batch=512 if device.type == "cuda" else 64, steps=20 if device.type == "cuda" else 3)
    report["ceiling"] = ceil

    # -- target training --------------------------------------------------------------------
    model = build_model(args.arch, num_classes=num_classes).to(device)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.1, weight_decay=5e-4, seed=0)
    hist, t_train = timed(lambda: train_classifier(model, x_tr, y_tr, cfg, x_val=x_te, y_val=y_te, progress=False), device)
    steady = [h["images_per_s"] for h in hist[1:]] or [hist[0]["images_per_s"]]
    clean = evaluate_classifier(model, x_te, y_te)
    report["train"] = {
        "seconds": t_train, "epochs": args.epochs, "images_per_s": float(np.median(steady)),
        "ratio_to_ceiling": float(np.median(steady)) / ceil["train_images_per_s"], "test_error": clean["error"],
    }

    # -- corruptions --------------------------------------------------------------------------
    reps = -(-args.corrupt_n // len(te))
    x_big = x_te.repeat(reps, 1, 1, 1)[: args.corrupt_n]
    gen = make_generator(0, device)
    per_corruption: dict[str, float] = {}
    total = 0.0
    for name in ALL_CORRUPTIONS:
        t_name = 0.0
        for s in range(1, 6):
            _, t = timed(lambda: corrupt(x_big, name, s, gen), device)
            t_name += t
        per_corruption[name] = 5 * args.corrupt_n / t_name
        total += t_name
    report["corruptions"] = {"images": args.corrupt_n * 5 * len(ALL_CORRUPTIONS), "seconds": total,
                             "images_per_s": args.corrupt_n * 5 * len(ALL_CORRUPTIONS) / total, "per_corruption": per_corruption}

    # -- loss dataset + predictor -------------------------------------------------------------
    candidates = build_candidates("all")
    ident = identity_index(candidates)
    tl, vl = loss_predictor_split(y_all[tr])
    gen = make_generator(1, device)
    x_in = predictor_training_inputs(x_tr[tl], gen, duplication=3, p_aug=0.4, corruptions=list(BENCHMARK))
    y_in = y_tr[tl].repeat(x_in.shape[0] // len(tl))
    x_v = predictor_training_inputs(x_tr[vl], gen, duplication=1, p_aug=0.4, corruptions=list(BENCHMARK), deform=False, flips="none")
    (l_tr, _), t_loss = timed(lambda: candidate_losses(model, x_in, y_in, candidates, batch_size=1024), device)
    l_v, _ = candidate_losses(model, x_v, y_tr[vl], candidates, batch_size=1024)
    rate = x_in.shape[0] * len(candidates) / t_loss
    report["loss_dataset"] = {"rows": int(x_in.shape[0]), "candidates": len(candidates), "seconds": t_loss,
                              "image_candidates_per_s": rate, "ratio_to_inference_ceiling": rate / ceil["infer_images_per_s"]}
    predictor = build_model("loss_predictor", num_outputs=len(candidates), width=16)
    pcfg = PredictorConfig(epochs=args.predictor_epochs, batch_size=768, seed=0)
    (pred, phist), t_pred = timed(lambda: train_predictor(predictor, x_in, l_tr, x_v, l_v, pcfg, device=device, identity_index=ident, progress=False), device)
    report["predictor"] = {"seconds": t_pred, **{k: phist[-1][k] for k in phist[-1] if k.startswith("valid_")}}

    # -- evaluation ---------------------------------------------------------------------------
    methods = {m: build_method(m, model, candidates=candidates, k=args.k, predictor=pred, generator=make_generator(2, device),
                               batch_size=1024, device=device) for m in ("none", "flip", "five_crop", "random", "learned", "oracle")}
    gen = make_generator(3, device)
    sets = [EvalSet(CLEAN, 0, x_te, y_te)] + [
        EvalSet(c, s, corrupt(x_te, c, s, gen).clamp(0, 1).mul(255).floor().div(255), y_te) for c in ALL_CORRUPTIONS for s in range(1, 6)
    ]
    results, t_eval = timed(lambda: evaluate_methods(methods, sets, batch_size=None, progress=False), device)
    summary = results.summary(list(BENCHMARK), list(EXTRA), "none")
    report["evaluate"] = {"seconds": t_eval, "summary": summary}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))

    print(f"\n{report['device']} | torch {report['torch']} | {args.arch} | train {len(tr)} / test {len(te)} images")
    print(f"{'step':<28}{'throughput':>18}{'ceiling':>14}{'ratio':>8}{'seconds':>10}")
    print(f"{'target training':<28}{report['train']['images_per_s']:>14.0f} i/s{ceil['train_images_per_s']:>10.0f} i/s{report['train']['ratio_to_ceiling']:>8.2f}{t_train:>10.1f}")
    print(f"{'loss dataset (img x cand)':<28}{rate:>14.0f} i/s{ceil['infer_images_per_s']:>10.0f} i/s{rate / ceil['infer_images_per_s']:>8.2f}{t_loss:>10.1f}")
    print(f"{'corruptions (19 x 5)':<28}{report['corruptions']['images_per_s']:>14.0f} i/s{'':>14}{'':>8}{total:>10.1f}")
    print(f"{'predictor training':<28}{'':>18}{'':>14}{'':>8}{t_pred:>10.1f}")
    print(f"{'evaluation (96 sets)':<28}{'':>18}{'':>14}{'':>8}{t_eval:>10.1f}")
    print(f"\nclean test error {clean['error'] * 100:.2f}%; predictor valid rho "
          f"{report['predictor'].get('valid_spearman_rho', float('nan')):.3f} (random {report['predictor'].get('valid_random_rho', float('nan')):.3f}), "
          f"top-1 agreement {report['predictor'].get('valid_top1_agreement', float('nan')):.3f}")
    print(f"\n{'method':<12}{'clean err':>10}{'corr err (15)':>15}{'extra err':>11}{'mCE':>8}{'NLL':>8}{'ECE':>8}{'passes':>8}")
    for m, row in summary.items():
        def f(v: Any) -> str:
            return f"{v:.2f}" if isinstance(v, (int, float)) else "n/a"
        print(f"{m:<12}{f(row.get('clean_error')):>10}{f(row.get('mean_corruption_error')):>15}{f(row.get('extra_error')):>11}"
              f"{f(row.get('mce_vs_baseline')):>8}{f(row.get('corruption_nll')):>8}{f(row.get('corruption_ece')):>8}{f(row.get('forward_passes')):>8}")
    per = sorted(per_corruption.items(), key=lambda kv: kv[1])
    print("\nslowest corruptions (images/s):", ", ".join(f"{k} {v:.0f}" for k, v in per[:5]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
