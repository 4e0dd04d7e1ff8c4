"""The paper's table on a real CIFAR sample, for targets trained each way, with the library alone.

For each training mode (``--modes``: standard, augmix, policy, auxiliary) this trains the target on
the sample's training part, builds its loss dataset (24 candidates, inputs as the public
dataloader makes them) and trains a loss predictor on it, then evaluates every TTA method (no
TTA, flip, 5-crop, random, the static searched policy, learned top-k, the oracle) on the held-out
part, clean and under all 19 corruptions x 5 severities. It answers, on real images:

* each mode's clean accuracy on a fixed held-out part, and whether AugMix lowers the corruption
  error against standard training (issue 5);
* the paper's claim, for each target: learned top-k has a lower mean corruption error than no
  TTA, flip, 5-crop and random at a similar clean error (issue 6);
* a target trained with a searched policy against standard training on the same split (issue 7,
  ``--policy``: e.g. the policy ``benchmarks/search_wallclock.py`` searched on this split).

Recipes: each mode's is the pipeline's own, ``ltta params profile=cifar10 study=<mode>`` composed
from ``conf/`` (``conf/study/<mode>.yaml``: standard SGD Nesterov lr 0.1 per-step cosine, wd 5e-4,
batch 128; augmix as google-research/augmix ``cifar.py``, cosine to 1e-6; policy as
kakaobrain/fast-autoaugment's WRN-40-2 conf, wd 2e-4, 5-epoch warm-up, cutout 16; auxiliary with
the reference's head settings), with ``--arch``, ``--epochs`` and ``--compile`` from the command
line (the sample is small; a warm-up as long as the run is dropped). The loss predictor is the
profile's too (``train_predictor``: width 48, 60 epochs, 128 loss-dataset rows per step); ``--set``
changes any of it, e.g. ``--set train_predictor.width=16 train_predictor.epochs=30
train_predictor.batch_size=768``, the settings of the committed CPU runs before 2026-11-23.
``--set seed=N`` trains both target and predictor from another seed (initial weights, data order,
augmentation); the split, the predictor's inputs and the corrupted test sets stay fixed, so runs
of several seeds compare like with like.

Needs torch, numpy, scikit-learn (the splits), tqdm, and hydra-core / pydantic for the recipes; no
DVC / MLflow. Prints the tables and writes JSON and Markdown (``--out-dir``).

    python benchmarks/dev_study.py --data cifar10_dev.npz --modes standard augmix --epochs 100 --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltta.compose import compose_params  # noqa: E402
from ltta.corruptions import ALL_CORRUPTIONS, BENCHMARK, EXTRA, corrupt  # noqa: E402
from ltta.data import loss_predictor_split, stratified_holdout  # noqa: E402
from ltta.evaluation import CLEAN, EvalSet, evaluate_methods  # noqa: E402
from ltta.evaluation.report import results_markdown  # noqa: E402
from ltta.io import write_json  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.runtime import make_generator, resolve_device, to_float_nchw, synchronize  # noqa: E402
from ltta.stages.train_predictor import predictor_config  # noqa: E402
from ltta.stages.train_target import train_config  # noqa: E402
from ltta.predictor.trainer import PredictorConfig, train_predictor  # noqa: E402
from ltta.predictor.quality import prior_scores  # noqa: E402
from ltta.training import TrainConfig, evaluate_classifier, train_classifier  # noqa: E402
from ltta.training.modes import TRAIN_MODES  # noqa: E402
from ltta.transforms.policy import CompiledPolicy, load_policy  # noqa: E402
from ltta.tta import SELECTIONS, build_candidates, build_method, identity_index  # noqa: E402
from ltta.predictor import candidate_losses, predictor_training_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DUPLICATION = 3  # copies of each train_loss image in the predictor's inputs (the public num_duplication)


def study_recipe(mode: str, args: argparse.Namespace) -> TrainConfig:
    """The cifar10 profile's trainer settings for ``study=<mode>``, at this run's length and compile."""
    params = compose_params(ROOT / "conf", ["profile=cifar10", f"study={mode}", *args.set])
    cfg = train_config(params.train_target, seed=params.seed)
    warmup = cfg.warmup_epochs if args.epochs > cfg.warmup_epochs else 0
    return dataclasses.replace(cfg, epochs=args.epochs, compile=args.compile, warmup_epochs=warmup)


def predictor_recipe(args: argparse.Namespace) -> tuple[PredictorConfig, int]:
    """The cifar10 profile's loss predictor with this run's ``--set``: (trainer settings, width)."""
    params = compose_params(ROOT / "conf", ["profile=cifar10", *args.set])
    tp = params.train_predictor
    if tp.ranker == "sodeep":
        raise SystemExit("dev_study.py trains no SoDeep sorter: use benchmarks/ranker_comparison.py for that ranker")
    return predictor_config(tp, seed=params.seed), tp.width


def load_sample(path: Path, test_fraction: float, device: torch.device) -> dict[str, Any]:
    """The sample split into a training part and a fixed, stratified held-out test part (seed 0)."""
    with np.load(path) as z:
        x_all, y_all = z["x_train"], z["y_train"].astype(np.int64)
    tr, te = stratified_holdout(y_all, test_fraction, seed=0)
    return {
        "x_tr": to_float_nchw(x_all[tr], device), "y_tr": torch.as_tensor(y_all[tr], device=device),
        "x_te": to_float_nchw(x_all[te], device), "y_te": torch.as_tensor(y_all[te], device=device),
        "y_tr_np": y_all[tr], "classes": int(y_all.max()) + 1, "train_index": tr, "test_index": te,
    }  # fmt: skip


def eval_sets(data: dict[str, Any], corruptions: list[str], severities: list[int], device: torch.device) -> list[EvalSet]:
    """Clean and corrupted test sets as prepare_data stores them: corrupted, then quantised to uint8 levels."""
    gen = make_generator(3, device)
    return [EvalSet(CLEAN, 0, data["x_te"], data["y_te"])] + [
        EvalSet(c, s, corrupt(data["x_te"], c, s, gen).clamp(0, 1).mul(255).floor().div(255), data["y_te"])
        for c in corruptions for s in severities
    ]


def train_target(
    mode: str, args: argparse.Namespace, device: torch.device, data: dict[str, Any], policy: Any
) -> tuple[torch.nn.Module, float, float, list[dict[str, float]]]:
    """The ``mode`` target on the sample's training part: (model, seconds, clean test error, history)."""
    cfg = study_recipe(mode, args)
    torch.manual_seed(cfg.seed)  # initial weights from the run's seed, as the stage's seed_everything
    model = build_model(args.arch, num_classes=data["classes"]).to(device)  # a mode attaches what it needs
    extra = CompiledPolicy(policy, device) if TRAIN_MODES.get(mode).needs_extra_augment else None
    synchronize(device)
    t0 = time.perf_counter()
    hist = train_classifier(model, data["x_tr"], data["y_tr"], cfg, progress=False, extra_augment=extra)
    synchronize(device)
    t_train = time.perf_counter() - t0
    clean = evaluate_classifier(model, data["x_te"], data["y_te"])
    print(f"[{mode}] trained {args.epochs} epochs in {t_train:.1f} s; clean test error {100 * clean['error']:.2f}%", flush=True)
    return model, t_train, float(clean["error"]), hist


def build_loss_tables(model: torch.nn.Module, data: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The loss dataset as the stages make it: the paper's train_loss / valid_loss split of the training
    part, the predictor's inputs (3 copies x 2 flips, deformed and corrupted with p = 0.4 as the public
    dataloader) and the target's loss under each of the 24 candidates."""
    x_tr, y_tr = data["x_tr"], data["y_tr"]
    candidates = build_candidates("all")
    tl, vl = loss_predictor_split(data["y_tr_np"])
    gen = make_generator(1, device)
    x_in = predictor_training_inputs(x_tr[tl], gen, duplication=DUPLICATION, p_aug=0.4, corruptions=list(BENCHMARK))
    y_in = y_tr[tl].repeat(x_in.shape[0] // len(tl))
    x_v = predictor_training_inputs(x_tr[vl], gen, duplication=1, p_aug=0.4, corruptions=list(BENCHMARK),
                                    deform=False, flips="none")
    t0 = time.perf_counter()
    l_tr, _ = candidate_losses(model, x_in, y_in, candidates, batch_size=1024)
    l_v, _ = candidate_losses(model, x_v, y_tr[vl], candidates, batch_size=1024)
    synchronize(device)
    return {"candidates": candidates, "x_train": x_in, "losses_train": l_tr, "x_valid": x_v, "losses_valid": l_v,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def run_mode(
    mode: str, args: argparse.Namespace, device: torch.device, data: dict[str, Any], sets: list[EvalSet],
    policy: Any, predictor_settings: tuple[PredictorConfig, int],
) -> dict[str, Any]:
    model, t_train, clean_error, hist = train_target(mode, args, device, data, policy)
    candidates = build_candidates("all")
    pred, prior, t_loss, t_pred, pvalid = None, None, 0.0, 0.0, {}
    if {"learned", "prior"} & set(args.methods):  # the loss dataset and predictor, as the stages make them
        tables = build_loss_tables(model, data, device)
        candidates, t_loss = tables["candidates"], tables["seconds"]
        pcfg, width = predictor_settings
        torch.manual_seed(pcfg.seed)  # initial weights from the predictor's seed, as the stage's seed_everything
        predictor = build_model("loss_predictor", num_outputs=len(candidates), width=width)
        t0 = time.perf_counter()
        pred, phist = train_predictor(predictor, tables["x_train"], tables["losses_train"], tables["x_valid"],
                                      tables["losses_valid"], pcfg, device=device,
                                      identity_index=identity_index(candidates), progress=False)
        t_pred = time.perf_counter() - t0
        pvalid = {k: v for k, v in phist[-1].items() if k.startswith("valid_")}
        prior = prior_scores(tables["losses_train"])

    names = [m for m in args.methods if m != "policy" or policy is not None]
    methods = {m: build_method(m, model, candidates=candidates, k=args.k, predictor=pred, prior=prior, policy=policy,
                               generator=make_generator(2, device), batch_size=1024, device=device,
                               selection=args.selection) for m in names}
    t0 = time.perf_counter()
    results = evaluate_methods(methods, sets, batch_size=None, progress=False)
    synchronize(device)
    t_eval = time.perf_counter() - t0
    bench = [c for c in BENCHMARK if c in args.corruptions]
    extras = [c for c in EXTRA if c in args.corruptions]
    summary = results.summary(bench, extras, "none")
    table = results_markdown(results, title=f"{args.arch}, mode {mode}, {args.epochs} epochs (dev sample)",
                             meta={"data": str(args.data), "mode": mode, "epochs": args.epochs,
                                   "train images": len(data["y_tr_np"]), "test images": int(data["y_te"].shape[0])},
                             benchmark=bench, extra=extras, baseline_method="none")
    return {
        "mode": mode, "train_seconds": t_train, "clean_error": clean_error,
        "train_images_per_s": float(np.median([h["images_per_s"] for h in hist[1:]] or [hist[0]["images_per_s"]])),
        "loss_dataset_seconds": t_loss, "predictor_seconds": t_pred, "eval_seconds": t_eval,
        "predictor": pvalid, "summary": summary, "markdown": table,
        "prior_candidates": methods["prior"].chosen_names if "prior" in methods else None,
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help=".npz with x_train (uint8 NHWC 32x32) and y_train")
    ap.add_argument("--modes", nargs="+", default=["standard", "augmix"])
    ap.add_argument("--policy", type=Path, default=None, help="searched policy: trains mode policy, and TTA 'policy'")
    ap.add_argument("--arch", default="wrn_40_2")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="overrides of the composed recipes (target and predictor), as `ltta params` takes them "
                         "(e.g. train_target.aux_merge_start=1.0 train_predictor.width=16)")
    ap.add_argument("--test-fraction", type=float, default=0.15)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--selection", default="topk", choices=SELECTIONS.names(), help="how learned picks its k views")
    ap.add_argument("--corruptions", nargs="+", default=list(ALL_CORRUPTIONS),
                    help="corruptions evaluated (default: all 19; fewer for a quick smoke run)")
    ap.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--methods", nargs="+", default=["none", "flip", "five_crop", "random", "policy", "learned", "prior", "oracle"],
                    help="TTA methods evaluated ('policy' needs --policy; without 'learned' or 'prior' no predictor is trained)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", type=Path, default=Path("dev_study"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for mode in args.modes:
        if TRAIN_MODES.get(mode).needs_extra_augment and args.policy is None:
            ap.error(f"mode {mode!r} trains with a policy: pass --policy PATH (a searched policy JSON)")
    policy = load_policy(args.policy) if args.policy is not None else None
    predictor_settings = predictor_recipe(args)  # before any training: a bad --set stops the run here

    data = load_sample(args.data, args.test_fraction, device)
    tr, te = data["train_index"], data["test_index"]
    sets = eval_sets(data, args.corruptions, args.severities, device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "arch": args.arch, "epochs": args.epochs, "n_train": len(tr), "n_test": len(te),
        "policy": str(args.policy) if args.policy else None, "overrides": args.set,
        "predictor_config": {**dataclasses.asdict(predictor_settings[0]), "width": predictor_settings[1]}, "modes": {},
    }  # fmt: skip
    for mode in args.modes:
        row = run_mode(mode, args, device, data, sets, policy, predictor_settings)
        (args.out_dir / f"results_{mode}.md").write_text(row.pop("markdown"))
        report["modes"][mode] = row
        write_json(args.out_dir / "dev_study.json", report)  # after each mode: a cut-off run keeps what it did

    print(f"\n{report['device']} | torch {report['torch']} | {args.arch}, {args.epochs} epochs | "
          f"train {len(tr)} / test {len(te)} images")
    pc = report["predictor_config"]
    print(f"predictor: width {pc['width']}, {pc['epochs']} epochs, {pc['batch_size']} rows per step, "
          f"{pc['objective']} / {pc['ranker']}, cutout {pc['cutout']:g}")
    print(f"{'mode':<11}{'method':<11}{'clean':>8}{'corr(15)':>10}{'extra(4)':>10}{'NLL':>7}{'ECE':>7}{'passes':>8}")
    for mode, row in report["modes"].items():
        for m, s in row["summary"].items():
            def f(v: Any) -> str:
                return f"{v:.2f}" if isinstance(v, (int, float)) else "n/a"
            print(f"{mode:<11}{m:<11}{f(s.get('clean_error')):>8}{f(s.get('mean_corruption_error')):>10}"
                  f"{f(s.get('extra_error')):>10}{f(s.get('corruption_nll')):>7}{f(s.get('corruption_ece')):>7}"
                  f"{f(s.get('forward_passes')):>8}")
        p = row["predictor"]
        print(f"{mode:<11}train {row['train_seconds']:.0f} s ({row['train_images_per_s']:.0f} img/s), "
              f"loss dataset {row['loss_dataset_seconds']:.0f} s, predictor {row['predictor_seconds']:.0f} s, "
              f"eval {row['eval_seconds']:.0f} s; predictor valid: "
              + ", ".join(f"{k} {v:.3f}" for k, v in p.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
