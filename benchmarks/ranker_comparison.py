"""Which differentiable ranking trains the better loss predictor: SoDeep's sorter, the fast soft rank, or the pairwise sigmoid.

Trains the loss predictor once per (ranker, seed) on a loss dataset written by
``build_loss_dataset`` (``data/loss/{train,valid}.npz`` + ``meta.json``; the normalisation comes
from ``data/prepared/meta.json``) with everything else equal, and reports on valid_loss (the EMA
model after the last epoch, as ``train_predictor`` reports it):

- ``rho``: Spearman's rho between the predictor's scores and ``-loss``, mean over images;
- ``top1``: top-1 hit rate against the oracle (the top-scored candidate has the lowest loss);
- ``chosen_loss``: mean loss of the top-scored candidate (oracle and identity beside it);
- ``ranker_rho`` / ``ranker_top1``: how faithfully the ranker itself ranks the scores it is fed in
  training (the trained predictor's softmax on valid_loss for ``sodeep_style``, its outputs for
  ``spearman``): rho of its soft ranks against the exact ranks, and how often its rank-1 entry is
  the true maximum;
- the random-ranking baseline (rho 0 and top-1 1/C in expectation; measured with a seeded draw).

Mean and standard deviation over ``--seeds``. Needs torch only (no MLflow, DVC or pydantic):

    PYTHONPATH=src python benchmarks/ranker_comparison.py --loss-data data/loss --prepared data/prepared \\
        --epochs 8 --batch-size 256 --width 8 --sorter-sequences-per-epoch 512   # the digits profile, CPU
    PYTHONPATH=src python benchmarks/ranker_comparison.py --device cuda --epochs 60 --batch-size 768 --width 16

The SoDeep sorter (``--sorter-*``, defaults SoDeep's ``train.py``) is trained once into
``--sorter-cache`` (or taken from there, or from ``--sorter`` FILE) for the candidate count.

Results (``results/ranker_comparison_cpu_{sodeep_style,spearman}.json``): CPU (2 shared cores),
torch 2.14.1, the digits profile's loss dataset (2,298 train_loss rows, 288 valid_loss images x 24
candidates), predictor width 8, 8 epochs of batch 256, rank_temperature 0.01 (sodeep_style, on
softmax) / 0.1 (spearman, on logits); the gruc sorter trained 800 Adam steps (400 epochs of 512
sequences; SoDeep's schedule is 563k), which ranks fresh synthetic sequences at rho 0.95, top-1 0.58.
Mean ± std over seeds 0, 1, 2; random ranking: rho -0.009 (expectation 0), top-1 0.042 (1/24).

    objective     ranker            rho            top-1          chosen loss    ranker rho
    sodeep_style  pairwise_sigmoid  0.419 ± 0.005  0.074 ± 0.016  0.298 ± 0.009  0.961 ± 0.006
    sodeep_style  soft_rank         0.405 ± 0.009  0.071 ± 0.008  0.319 ± 0.052  0.969 ± 0.019
    sodeep_style  sodeep            0.131 ± 0.135  0.035 ± 0.033  0.748 ± 0.396  0.461 ± 0.038
    spearman      pairwise_sigmoid  0.439 ± 0.004  0.081 ± 0.005  0.289 ± 0.015  0.984 ± 0.002
    spearman      soft_rank         0.436 ± 0.006  0.079 ± 0.018  0.291 ± 0.003  0.913 ± 0.008
    spearman      sodeep            0.429 ± 0.003  0.080 ± 0.006  0.298 ± 0.006  0.902 ± 0.003

(oracle loss 0.159, identity 1.086.) The sorter is scale-bound: it ranks what it was trained on
(U(-1, 1), N(0, 1), ramps in [0, 1]) and the logits, but not softmax probabilities over 24
candidates, which differ by ~1e-3 around 1/24 (ranker rho 0.46 there): fed softmax outputs, as the
public objective does, it barely trains the predictor; fed logits it matches the closed-form rankers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltta.io import write_json  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.predictor.trainer import PredictorConfig, train_predictor  # noqa: E402
from ltta.predictor.ranking import RANKERS, build_ranker, exact_rank  # noqa: E402
from ltta.predictor.scoring import predictor_scores  # noqa: E402
from ltta.predictor.sodeep import SorterConfig, ensure_sorter, load_sorter, random_sequences, sorter_quality  # noqa: E402

REPORTED = ("rho", "top1", "chosen_loss", "ranker_rho", "ranker_top1", "random_rho", "random_top1", "seconds")


def load_split(loss_dir: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 NCHW, losses float [N,C]) of one split of the loss dataset."""
    with np.load(loss_dir / f"{name}.npz", allow_pickle=False) as z:
        return torch.as_tensor(z["x"]).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(z["losses"]).float()


@torch.no_grad()
def ranker_fidelity(ranker: Any, scores: torch.Tensor) -> dict[str, float]:
    """How well ``ranker`` reproduces the exact ranks of ``scores`` [N,C] (ascending ranks on 1..C)."""
    soft = ranker(scores)
    rho = _pearson(soft, exact_rank(scores))
    return {"ranker_rho": float(rho.mean()), "ranker_top1": float((soft.argmax(1) == scores.argmax(1)).float().mean())}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation (the soft ranks are not integers: rho of soft vs exact ranks)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)


def run_one(
    ranker_name: str, seed: int, data: dict[str, Any], args: argparse.Namespace, sorter: torch.nn.Module | None
) -> dict[str, float]:
    cfg = PredictorConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, objective=args.objective, ranker=ranker_name,
        rank_temperature=args.rank_temperature, cutout=args.cutout, seed=seed,
    )
    torch.manual_seed(seed)
    model = build_model("loss_predictor", num_outputs=data["C"], width=args.width, mean=data["mean"], std=data["std"])
    t0 = time.time()
    ema, history = train_predictor(
        model, data["x_train"], data["l_train"], data["x_valid"], data["l_valid"], cfg, device=args.device,
        identity_index=data["identity_index"], sorter=sorter if ranker_name == "sodeep" else None, progress=False,
    )
    seconds = time.time() - t0
    last = history[-1]
    logits = predictor_scores(ema, data["x_valid"].to(args.device), cfg.eval_batch_size).float()
    fed = torch.softmax(logits, 1) if args.objective == "sodeep_style" else logits
    ranker = build_ranker(ranker_name, args.rank_temperature, sorter)
    return {
        "rho": last["valid_spearman_rho"], "top1": last["valid_top1_agreement"], "chosen_loss": last["valid_chosen_loss"],
        "oracle_loss": last["valid_oracle_loss"], "identity_loss": last["valid_identity_loss"],
        "random_rho": last["valid_random_rho"], "random_top1": last["valid_random_top1_agreement"],
        **ranker_fidelity(ranker, fed), "seconds": seconds,
    }


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = runs[0].keys()
    return {k: {"mean": statistics.fmean(r[k] for r in runs),
                "std": statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else 0.0} for k in keys}


def table(results: dict[str, dict[str, dict[str, float]]], c: int) -> str:
    head = "| ranker | " + " | ".join(REPORTED) + " |"
    lines = [head, "|" + "---|" * (len(REPORTED) + 1)]
    for name, s in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in REPORTED) + " |")
    lines.append(f"| random (expectation) | 0 | {1 / c:.3f} (1/C) | | | | | | |")
    return "\n".join(lines)


def get_sorter(args: argparse.Namespace, c: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    if args.sorter:
        sorter, cfg, _ = load_sorter(args.sorter, args.device)
        path = Path(args.sorter)
    else:
        cfg = SorterConfig(model=args.sorter_model, seq_len=c, epochs=args.sorter_epochs,
                           sequences_per_epoch=args.sorter_sequences_per_epoch, valid_sequences=args.sorter_valid_sequences)
        sorter, path = ensure_sorter(args.sorter_cache, cfg, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(12345)
    quality = sorter_quality(sorter, random_sequences(5000, c, gen, args.device))
    return sorter, {"file": str(path), "config": asdict(cfg), "synthetic_quality": quality}


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = PredictorConfig()
    ap.add_argument("--loss-data", type=Path, default=Path("data/loss"))
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="for meta.json (mean, std)")
    ap.add_argument("--rankers", nargs="+", default=RANKERS.names(), choices=RANKERS.names())
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--objective", default=defaults.objective, choices=["sodeep_style", "spearman"])
    ap.add_argument("--epochs", type=int, default=defaults.epochs)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--rank-temperature", type=float, default=defaults.rank_temperature)
    ap.add_argument("--cutout", type=float, default=defaults.cutout)
    sd = SorterConfig()
    ap.add_argument("--sorter", type=Path, default=None, help="a trained sorter file (else trained into --sorter-cache)")
    ap.add_argument("--sorter-cache", type=Path, default=Path("models/sorters"))
    ap.add_argument("--sorter-model", default=sd.model)
    ap.add_argument("--sorter-epochs", type=int, default=sd.epochs)
    ap.add_argument("--sorter-sequences-per-epoch", type=int, default=sd.sequences_per_epoch)
    ap.add_argument("--sorter-valid-sequences", type=int, default=sd.valid_sequences)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default benchmarks/results/ranker_comparison_<device>_<objective>.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    meta = json.loads((args.loss_data / "meta.json").read_text())
    prep = json.loads((args.prepared / "meta.json").read_text())
    x_train, l_train = load_split(args.loss_data, "train")
    x_valid, l_valid = load_split(args.loss_data, "valid")
    c = l_train.shape[1]
    data = {"x_train": x_train, "l_train": l_train, "x_valid": x_valid, "l_valid": l_valid, "C": c,
            "identity_index": int(meta["identity_index"]), "mean": tuple(prep["mean"]), "std": tuple(prep["std"])}
    sorter, sorter_info = get_sorter(args, c) if "sodeep" in args.rankers else (None, {})
    if sorter_info:
        print(f"sorter: {sorter_info['file']}; on fresh synthetic sequences {sorter_info['synthetic_quality']}")

    per_run: dict[str, list[dict[str, float]]] = {}
    for name in args.rankers:
        per_run[name] = []
        for seed in args.seeds:
            r = run_one(name, seed, data, args, sorter)
            per_run[name].append(r)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
    results = {name: summarise(runs) for name, runs in per_run.items()}
    print(f"\nvalid_loss: {len(l_valid)} images x {c} candidates; train_loss: {len(l_train)} rows; "
          f"objective {args.objective}; mean ± std over seeds {args.seeds}\n")
    print(table(results, c))

    name = f"ranker_comparison_{torch.device(args.device).type}_{args.objective}.json"
    out = args.out or Path(__file__).resolve().parent / "results" / name
    write_json(out, {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": args.device,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None},
        "data": {"loss_data": str(args.loss_data), "train_rows": len(l_train), "valid_rows": len(l_valid), "candidates": c},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sorter": sorter_info,
        "summary": results,
        "runs": per_run,
    })
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
