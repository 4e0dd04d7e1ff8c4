"""Does a longer-trained SoDeep sorter rank the loss predictor's softmax outputs, or only its training data?

``benchmarks/ranker_comparison.py`` found the ``gruc`` sorter (800 Adam steps) ranking the
predictor's softmax outputs poorly (rho 0.46) while ranking logits and SoDeep's synthetic
sequences well. Two explanations: too little training (SoDeep's schedule is ~563,000 steps), or a
sorter that only ranks values on the scale of its training data (U(-1, 1), N(0, 1), ramps in
[0, 1]), whereas a softmax over 24 candidates puts every value near 1/24. This trains sorters of
the same schedule shape (SoDeep's ``train.py``: 400 epochs, StepLR every 70 epochs, Adam 1e-3,
batch 256) at several lengths (``--sequences-per-epoch``; steps = 400 x that / 256) and reports
each one's Spearman rho and top-1 (its rank-1 entry is the true maximum) on

- ``synthetic``: SoDeep's own generators (fresh draws, as its validation);
- ``logits s``: N(0, s^2) scores, the predictor's raw outputs at spread s;
- ``softmax s``: the softmax of those logits over the candidates, what the public objective
  (``sodeep_style``) feeds the sorter.

Needs torch only. Prints the table and writes JSON (``--out``); sorters are cached in
``--cache`` (``ltta train-sorter``'s format), so reruns only evaluate.

    PYTHONPATH=src python benchmarks/sorter_scale.py --sequences-per-epoch 512 2560

Result (``results/sorter_scale_cpu_gruc.json``; CPU, 2 cores, torch 2.14.1; 10,000 sequences per
probe; the 800-step sorter is the very file ranker_comparison.py used): rho / top-1

    steps  synthetic      logits 0.1     softmax 0.1    logits 1       softmax 1      logits 3       softmax 3
      800  0.946 / 0.580  0.964 / 0.826  0.211 / 0.043  0.989 / 0.839  0.786 / 0.874  0.967 / 0.506  0.538 / 0.983
     4000  0.985 / 0.796  0.989 / 0.804  0.504 / 0.374  0.992 / 0.738  0.942 / 0.883  0.957 / 0.284  0.656 / 0.961

Both explanations hold in part: five times the training lifts the softmax-scale rho (0.79 -> 0.94
at logit spread 1, 0.21 -> 0.50 at 0.1), but softmax outputs stay ranked worse than the same
logits at every length, most of all when the predictor's outputs are nearly flat (early training).

What it does to the predictor (``ranker_comparison.py``, sodeep_style objective, the digits
profile's loss dataset rebuilt by a fresh ``dvc repro``, 3 seeds; ``results/ranker_comparison_cpu_
sodeep_style_{sorter800,sorter4000,closed_form_rerun}.json``): valid rho 0.123 +- 0.126 with the
800-step sorter, 0.365 +- 0.016 with the 4,000-step one, against 0.399 (pairwise sigmoid) and 0.387
(soft rank) on the same data. A longer-trained sorter closes most of the gap.
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

from ltta.io import write_json  # noqa: E402
from ltta.predictor.sodeep import SorterConfig, ensure_sorter, random_sequences, sorter_quality  # noqa: E402


def probe_sets(seq_len: int, n: int, spreads: list[float], seed: int) -> dict[str, torch.Tensor]:
    """The score sequences each sorter is asked to rank, by name (fixed draws, shared by all sorters)."""
    gen = torch.Generator().manual_seed(seed)
    sets = {"synthetic": random_sequences(n, seq_len, gen)}
    for s in spreads:
        logits = s * torch.randn(n, seq_len, generator=gen)
        sets[f"logits {s:g}"] = logits
        sets[f"softmax {s:g}"] = logits.softmax(dim=1)
    return sets


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences-per-epoch", type=int, nargs="+", default=[512, 2560],
                    help="one sorter per value; steps = epochs x value / batch (SoDeep: 360,000)")
    ap.add_argument("--epochs", type=int, default=SorterConfig.epochs)
    ap.add_argument("--valid-sequences", type=int, default=2000,
                    help="validation sequences per epoch (SoDeep: 40,000; 2,000 as ranker_comparison.py's sorter)")
    ap.add_argument("--model", default=SorterConfig.model)
    ap.add_argument("--seq-len", type=int, default=24, help="candidates ranked (the predictor's outputs)")
    ap.add_argument("--spreads", type=float, nargs="+", default=[0.1, 1.0, 3.0], help="logit standard deviations")
    ap.add_argument("--n", type=int, default=10_000, help="sequences per probe set")
    ap.add_argument("--cache", type=Path, default=Path("models/sorters"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmark_sorter_scale.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sets = probe_sets(args.seq_len, args.n, args.spreads, seed=12_345)
    rows: list[dict[str, Any]] = []
    for per_epoch in args.sequences_per_epoch:
        cfg = SorterConfig(model=args.model, seq_len=args.seq_len, epochs=args.epochs, sequences_per_epoch=per_epoch,
                           valid_sequences=args.valid_sequences)
        t0 = time.perf_counter()
        sorter, path = ensure_sorter(args.cache, cfg)
        steps = cfg.epochs * cfg.steps_per_epoch
        row: dict[str, Any] = {"steps": steps, "sequences_per_epoch": per_epoch, "file": str(path),
                               "seconds_to_get": time.perf_counter() - t0, "probes": {}}
        for name, seqs in sets.items():
            q = sorter_quality(sorter, seqs)
            row["probes"][name] = {"rho": q["rho"], "top1": q["top1"]}
        rows.append(row)

    names = list(sets)
    print(f"\n{args.model} sorter, L={args.seq_len}, {args.n} sequences per probe: Spearman rho / top-1")
    print(f"{'steps':>7}  " + "  ".join(f"{n:>15}" for n in names))
    for row in rows:
        cells = [f"{row['probes'][n]['rho']:6.3f} / {row['probes'][n]['top1']:5.3f}" for n in names]
        print(f"{row['steps']:>7}  " + "  ".join(f"{c:>15}" for c in cells))
    write_json(args.out, {
        "device": "cpu", "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": args.model, "seq_len": args.seq_len, "epochs": args.epochs, "n": args.n, "spreads": args.spreads,
        "rows": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
