"""Does the loss predictor read the image? Its training settings, one at a time, against the prior.

The prior (TTA method ``prior``) is a fixed top-k: the k candidates with the lowest mean training
loss, the same for every image. A learned top-k that does not beat it has learned nothing about the
image. With the dev study's first CPU settings (``dev_study.py``, width 16, 768 rows per step) the
prior won on a real CIFAR sample; this script asks which of the predictor's training settings
decide that. It trains the target and builds the loss dataset once (exactly as ``dev_study.py``
does, same splits and seeds, cached in ``--cache``), then trains one loss predictor per *variant*
of the settings and reports, for each:

- on valid_loss: Spearman rho of its scores against ``-loss``, top-1 agreement with the oracle and
  the mean loss of its top-1 pick, beside the same for the prior (``valid_prior_*``);
- on the training table (a fixed subset of 2,048 rows, uncut inputs): the same rho, so a gap
  between train and valid says over-fitting and two low numbers say under-fitting;
- with ``--eval``: learned top-k's clean error and mean corruption error on the held-out test part
  (the 15 benchmark corruptions x 5 severities by default), beside no TTA and the prior.

A variant is ``NAME:KEY=VALUE,KEY=VALUE`` over :class:`ltta.predictor.trainer.PredictorConfig`'s
fields, ``width`` (the predictor's trunk width) and ``images`` (the share of train_loss images it
is trained on, every copy of each: a learning curve). Unnamed keys keep this script's base setting,
sized for a CPU: width ``--predictor-width`` (16), ``--predictor-epochs`` (30), the public code's
768 rows per step, objective, cutout and EMA (``PredictorConfig``'s defaults). The pipeline's
cifar10 profile trains wider and longer, at 128 rows per step. ``seed=N`` sets the initial weights,
data order and cutout together, so a setting can be repeated over seeds. Needs what ``dev_study.py``
needs.

    python benchmarks/predictor_ablation.py --data cifar10_dev.npz --arch small_cnn --epochs 20 --eval \\
        --variants paper no_cutout:cutout=0 small_batch:batch_size=128 spearman:objective=spearman,rank_temperature=0.1 \\
        half:images=0.5 quarter:images=0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dev_study import DUPLICATION, build_loss_tables, eval_sets, load_sample, train_target  # noqa: E402

from ltta.corruptions import BENCHMARK  # noqa: E402
from ltta.evaluation import evaluate_methods  # noqa: E402
from ltta.evaluation.runner import EvalResults  # noqa: E402
from ltta.io import write_json  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.runtime import resolve_device  # noqa: E402
from ltta.predictor.trainer import PredictorConfig, train_predictor  # noqa: E402
from ltta.predictor.quality import predictor_quality, prior_scores  # noqa: E402
from ltta.training.modes import TRAIN_MODES  # noqa: E402
from ltta.tta import SELECTIONS, build_method, identity_index  # noqa: E402
from ltta.predictor import copies_per_image  # noqa: E402

TRAIN_PROBE_ROWS = 2048  # training-table rows scored for the train-side rho (fixed, seed 0)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One predictor setting: its config, trunk width, and the share of train_loss images it sees."""

    name: str
    cfg: PredictorConfig
    width: int
    images: float = 1.0  # a fixed (seed 0) subset of the train_loss images, every copy of each

    def changes(self) -> str:
        defaults = PredictorConfig()
        skip = ("epochs", "batch_size", "seed")
        changed = [f"{k}={v}" for k, v in dataclasses.asdict(self.cfg).items() if k not in skip and getattr(defaults, k) != v]
        head = [f"width={self.width}", f"epochs={self.cfg.epochs}", f"batch={self.cfg.batch_size}"]
        tail = ([f"images={self.images:g}"] if self.images != 1.0 else []) + ([f"seed={self.cfg.seed}"] if self.cfg.seed else [])
        return ", ".join(head + changed + tail)


def parse_variant(text: str, base: PredictorConfig, width: int) -> Variant:
    """``NAME[:KEY=VALUE,...]``: keys of PredictorConfig (values take the field's type), ``width`` and ``images``."""
    name, _, spec = text.partition(":")
    fields = {f.name: f for f in dataclasses.fields(PredictorConfig)}
    changes: dict[str, Any] = {}
    images = 1.0
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {text!r}: {item!r} is not KEY=VALUE")
        if key == "width":
            width = int(value)
        elif key == "images":
            images = float(value)
            if not 0.0 < images <= 1.0:
                raise SystemExit(f"variant {text!r}: images is a share of the train_loss images, in (0, 1]")
        elif key in fields:
            changes[key] = type(getattr(base, key))(value)
        else:
            raise SystemExit(f"variant {text!r}: unknown key {key!r}; known: width, images, {', '.join(fields)}")
    return Variant(name, dataclasses.replace(base, **changes), width, images)


def kept_rows(n_rows: int, n_images: int, share: float, device: torch.device) -> torch.Tensor:
    """Rows of the copy-major training table (row k*N + i is copy k of image i) for a share of its images."""
    images = torch.randperm(n_images, generator=torch.Generator().manual_seed(0))[: max(1, round(share * n_images))]
    keep = torch.zeros(n_images, dtype=torch.bool)
    keep[images] = True
    return torch.nonzero(keep.repeat(n_rows // n_images)).squeeze(1).to(device)


def cache_key(args: argparse.Namespace) -> str:
    """Names the target and loss tables a run builds (the same settings build the same, seeded)."""
    overrides = "_".join(args.set).replace("/", "-")
    return f"{Path(args.data).stem}_{args.arch}_{args.mode}_{args.epochs}ep_tf{args.test_fraction}{'_' + overrides if overrides else ''}"


def load_or_build(args: argparse.Namespace, device: torch.device, data: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The target and its loss tables, from ``--cache`` when a run with the same settings stored them."""
    path = args.cache / f"{cache_key(args)}.pt"
    model = build_model(args.arch, num_classes=data["classes"]).to(device)
    if path.exists():
        blob = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(blob["target"])
        print(f"target and loss tables from {path}", flush=True)
        return model.eval(), blob["tables"], blob["info"]
    model, t_train, clean_error, _ = train_target(args.mode, args, device, data, policy=None)
    tables = build_loss_tables(model, data, device)
    info = {"train_seconds": t_train, "clean_error": clean_error, "loss_dataset_seconds": tables["seconds"]}
    args.cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"target": model.state_dict(), "tables": tables, "info": info}, tmp)
    tmp.replace(path)
    return model.eval(), tables, info


def trained_predictor(
    args: argparse.Namespace, device: torch.device, x: torch.Tensor, losses: torch.Tensor, tables: dict[str, Any],
    variant: Variant, ident: int,
) -> tuple[torch.nn.Module, list[dict[str, float]], float]:
    """(EMA predictor, history, training seconds), from ``--cache`` when this target and setting were trained."""
    extra = {"images": variant.images} if variant.images != 1.0 else {}
    key = json.dumps({"target": cache_key(args), "width": variant.width, **extra, **dataclasses.asdict(variant.cfg),
                      "init": "seeded"}, sort_keys=True)  # "init": weights from the seed, not the run's history
    path = args.cache / f"predictor_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    torch.manual_seed(variant.cfg.seed)  # the initial weights depend on the variant's seed alone, not on the order
    predictor = build_model("loss_predictor", num_outputs=len(tables["candidates"]), width=variant.width)
    if path.exists():
        blob = torch.load(path, map_location=device, weights_only=False)
        predictor.load_state_dict(blob["state"])
        return predictor.to(device).eval(), blob["history"], blob["seconds"]
    t0 = time.perf_counter()
    pred, hist = train_predictor(predictor, x, losses, tables["x_valid"], tables["losses_valid"], variant.cfg,
                                 device=device, identity_index=ident, progress=False)
    seconds = time.perf_counter() - t0
    tmp = path.with_suffix(".tmp")
    torch.save({"state": pred.state_dict(), "history": hist, "seconds": seconds, "key": key}, tmp)
    tmp.replace(path)
    return pred, hist, seconds


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help=".npz with x_train (uint8 NHWC 32x32) and y_train")
    ap.add_argument("--mode", default="standard", help="the target's training mode (not policy: no policy is searched here)")
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--epochs", type=int, default=20, help="target epochs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the target's training")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides, as dev_study.py")
    ap.add_argument("--test-fraction", type=float, default=0.15)
    ap.add_argument("--predictor-epochs", type=int, default=30)
    ap.add_argument("--predictor-width", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=["paper"], metavar="NAME[:KEY=VALUE,...]")
    ap.add_argument("--eval", action="store_true", help="also evaluate learned top-k on the held-out test part")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--selections", nargs="+", default=["topk"], choices=SELECTIONS.names(),
                    help="how learned picks its k views; each is evaluated (--eval)")
    ap.add_argument("--corruptions", nargs="+", default=list(BENCHMARK))
    ap.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", type=Path, default=Path("predictor_ablation/cache"))
    ap.add_argument("--out-dir", type=Path, default=Path("predictor_ablation"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if TRAIN_MODES.get(args.mode).needs_extra_augment:
        ap.error(f"mode {args.mode!r} trains with a searched policy; use dev_study.py --policy for it")
    base = PredictorConfig(epochs=args.predictor_epochs, batch_size=768, seed=0)
    variants = [parse_variant(v, base, args.predictor_width) for v in args.variants]
    device = resolve_device(args.device)

    data = load_sample(args.data, args.test_fraction, device)
    model, tables, info = load_or_build(args, device, data)
    candidates = tables["candidates"]
    ident = identity_index(candidates)
    prior = prior_scores(tables["losses_train"])
    n_rows = tables["x_train"].shape[0]
    n_images = n_rows // copies_per_image(DUPLICATION, "both")  # build_loss_tables' copies x 2 flips
    probe_order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(0)).to(device)

    sets, baseline = None, None
    if args.eval:
        sets = eval_sets(data, args.corruptions, args.severities, device)
        fixed = {m: build_method(m, model, candidates=candidates, k=args.k, prior=prior, batch_size=1024, device=device)
                 for m in ("none", "prior")}  # fmt: skip
        baseline = evaluate_methods(fixed, sets, batch_size=None, progress=False)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "data": str(args.data), "arch": args.arch, "mode": args.mode,
        "epochs": args.epochs, "target": info, "k": args.k, "train_rows": int(tables["x_train"].shape[0]),
        "valid_images": int(tables["x_valid"].shape[0]), "selections": args.selections, "variants": {},
    }  # fmt: skip
    if baseline is not None:
        report["baseline"] = baseline.summary(args.corruptions, [], "none")
    for variant in variants:
        name = variant.name
        rows = kept_rows(n_rows, n_images, variant.images, device)
        x_fit, l_fit = tables["x_train"][rows], tables["losses_train"][rows]
        pred, hist, seconds = trained_predictor(args, device, x_fit, l_fit, tables, variant, ident)
        kept = torch.zeros(n_rows, dtype=torch.bool, device=device)
        kept[rows] = True
        probe = probe_order[kept[probe_order]][:TRAIN_PROBE_ROWS]  # rows it was trained on
        row: dict[str, Any] = {
            "config": dataclasses.asdict(variant.cfg), "width": variant.width, "images": variant.images,
            "changes": variant.changes(), "train_rows": int(rows.numel()), "seconds": seconds,
            "valid": {k: v for k, v in hist[-1].items() if k.startswith("valid_")},
            "valid_rho_by_epoch": [h["valid_spearman_rho"] for h in hist],
            "train_probe": predictor_quality(pred, tables["x_train"][probe], tables["losses_train"][probe],
                                             identity_index=ident, prior=prior_scores(l_fit)),
        }  # fmt: skip
        if sets is not None and baseline is not None:
            row["eval"] = {}
            for selection in args.selections:
                learned = build_method("learned", model, candidates=candidates, k=args.k, predictor=pred,
                                       batch_size=1024, device=device, selection=selection)
                both = EvalResults(baseline.records + evaluate_methods({"learned": learned}, sets, progress=False).records)
                row["eval"][selection] = both.summary(args.corruptions, [], "none")["learned"]
        report["variants"][name] = row
        write_json(args.out_dir / "predictor_ablation.json", report)  # after each variant: a cut-off run keeps it
        v, t = row["valid"], row["train_probe"]
        line = (f"[{name}] {row['seconds']:.0f} s | valid rho {v['valid_spearman_rho']:.3f} (prior {v['valid_prior_rho']:.3f})"
                f" top-1 {v['valid_top1_agreement']:.3f} (prior {v['valid_prior_top1_agreement']:.3f})"
                f" chosen loss {v['valid_chosen_loss']:.3f} (prior {v['valid_prior_loss']:.3f})"
                f" | train rho {t['spearman_rho']:.3f} (prior {t['prior_rho']:.3f})")
        for selection, e in row.get("eval", {}).items():
            line += f" | learned ({selection}) clean {e['clean_error']:.2f} corr {e['mean_corruption_error']:.2f}"
        print(line, flush=True)

    write_markdown(args.out_dir / "predictor_ablation.md", report)
    print((args.out_dir / "predictor_ablation.md").read_text())
    return 0


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """One row per variant: ranking quality on valid_loss and on the training table, and the TTA errors."""
    evaluated = "baseline" in report
    selections = report.get("selections", []) if evaluated else []
    head = "| variant | changes | valid rho | train rho | valid top-1 | valid top-1 loss |"
    rule = "|---|---|---|---|---|---|"
    for selection in selections:
        head += f" clean ({selection}) | corr. ({selection}) |"
        rule += "---|---|"
    lines = [f"# Loss predictor ablation: {report['arch']} target ({report['mode']}, {report['epochs']} epochs), "
             f"{report['train_rows']} training rows, {report['valid_images']} valid_loss images", "",
             f"{report['device']}, torch {report['torch']}, data {report['data']}, k = {report['k']}.", "", head, rule]
    first = next(iter(report["variants"].values()), None)
    if first is not None:
        v, t = first["valid"], first["train_probe"]
        row = (f"| prior (no predictor) | - | {v['valid_prior_rho']:.3f} | {t['prior_rho']:.3f} | "
               f"{v['valid_prior_top1_agreement']:.3f} | {v['valid_prior_loss']:.3f} |")
        b = report.get("baseline", {})
        lines.append(row + "".join(f" {b['prior']['clean_error']:.2f} | {b['prior']['mean_corruption_error']:.2f} |"
                                   for _ in selections))
        if evaluated:
            lines.append(f"| no TTA | - | - | - | - | {v['valid_identity_loss']:.3f} |"
                         + "".join(f" {b['none']['clean_error']:.2f} | {b['none']['mean_corruption_error']:.2f} |"
                                   for _ in selections))
    for name, r in report["variants"].items():
        v, t = r["valid"], r["train_probe"]
        row = (f"| {name} | {r['changes']} | {v['valid_spearman_rho']:.3f} | {t['spearman_rho']:.3f} | "
               f"{v['valid_top1_agreement']:.3f} | {v['valid_chosen_loss']:.3f} |")
        for selection in selections:
            e = r.get("eval", {}).get(selection)
            row += f" {e['clean_error']:.2f} | {e['mean_corruption_error']:.2f} |" if e else " - | - |"
        lines.append(row)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
