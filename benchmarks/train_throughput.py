"""Target-training throughput per architecture and mode, eager and compiled, against the bare ceiling.

THROUGHPUT ONLY: random images and labels resident on the device, so the losses mean nothing.
For each (architecture, mode, eager | compiled) it runs the real trainer
(``ltta.training.target.train_classifier``: batched augmentation, the mode's loss, fused SGD,
per-step cosine schedule) for ``--epochs`` epochs over ``--n`` images and takes the median
images/s of the epochs after the first (the first pays cudnn autotuning and compilation).

The ceiling is what the GPU can do with the same model and nothing else: bare forward + backward +
SGD step on one resident random batch under the same bf16 autocast and memory format, eager or
compiled to match. A mode that sends ``m`` images through the network per training image (AugMix:
clean + 2 views = 3; Auxiliary Training: clean + one view per family = 5) is compared with the
ceiling at a batch of ``m x batch`` divided by ``m``, run through the module the mode trains (for
Auxiliary Training the classifier with its heads attached, in its grouped one-pass form).

    python benchmarks/train_throughput.py --device cuda                       # WRN-40-2, every mode
    python benchmarks/train_throughput.py --device cuda --archs wrn_40_2 resnet18 --modes standard
    python benchmarks/train_throughput.py --device cpu --archs small_cnn --n 512 --epochs 2 --no-compile

Needs only torch (+ numpy); prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltta.io import write_json  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.runtime import resolve_device, synchronize  # noqa: E402
from ltta.training import TrainConfig, train_classifier  # noqa: E402
from ltta.training.modes import TRAIN_MODES  # noqa: E402
from ltta.transforms.ops import FAA_OPS  # noqa: E402
from ltta.transforms.policy import CompiledPolicy, OpSpec, Policy  # noqa: E402

NOTE = "random images and labels: throughput only"


def random_policy(seed: int, subpolicies: int = 5, ops: int = 2) -> Policy:
    """A random FAA-format policy (the searched one's shape: 5 sub-policies x 2 ops) for timing."""
    gen = torch.Generator().manual_seed(seed)
    names = FAA_OPS.names()
    subs = []
    for _ in range(subpolicies):
        sub = []
        for _ in range(ops):
            name = names[int(torch.randint(len(names), (1,), generator=gen))]
            p, m = torch.rand(2, generator=gen).tolist()
            sub.append(OpSpec(name, p, m))
        subs.append(tuple(sub))
    return Policy([list(s) for s in subs])


def views_per_image(mode: str, cfg: TrainConfig, device: torch.device) -> int:
    """Images the mode sends through the network per training image (1 + its extra views)."""
    views = TRAIN_MODES.get(mode).views
    if views is None:
        return 1
    return 1 + int(views(torch.rand(2, 3, 32, 32, device=device), cfg, torch.Generator(device=device)).shape[1])


def ceiling(
    model: nn.Module, device: torch.device, batch: int, classes: int, compiled: bool, compile_mode: str, seconds: float,
    mode: str, cfg: TrainConfig,
) -> float:
    """Images/s of bare forward+backward+SGD on one resident random batch (the best training can do)."""
    cuda = device.type == "cuda"
    attach = TRAIN_MODES.get(mode).attach
    model = attach(model, cfg) if attach is not None else model
    grouped = getattr(model, "grouped", contextlib.nullcontext)  # Auxiliary Training's one-pass form
    model.train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=cuda)
    net = torch.compile(model, mode=compile_mode) if compiled else model
    x = torch.rand(batch, 3, 32, 32, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda), grouped():
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):  # compile, autotune, graph capture
        step()
    synchronize(device)
    steps, t0 = 0, time.perf_counter()
    while steps < 5 or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
        if steps % 20 == 0:
            synchronize(device)
    synchronize(device)
    return steps * batch / (time.perf_counter() - t0)


def measure(
    arch: str, mode: str, compiled: bool, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=args.classes).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.rand(args.n, 3, 32, 32, device=device, generator=gen)
    y = torch.randint(0, args.classes, (args.n,), device=device, generator=gen)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, mode=mode, compile=compiled,
        compile_mode=args.compile_mode, cutout=16 if mode == "policy" else 0,
    )  # fmt: skip
    extra: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    if TRAIN_MODES.get(mode).needs_extra_augment:
        extra = CompiledPolicy(random_policy(0), device)
    t0 = time.perf_counter()
    history = train_classifier(model, x, y, cfg, progress=False, extra_augment=extra)
    wall = time.perf_counter() - t0
    rates = [h["images_per_s"] for h in history[1:]] or [history[0]["images_per_s"]]
    mult = views_per_image(mode, cfg, device)
    ceil_model = build_model(arch, num_classes=args.classes).to(device)
    ceil = ceiling(ceil_model, device, mult * args.batch_size, args.classes, compiled, args.compile_mode,
                   args.ceiling_seconds, mode, cfg) / mult
    rate = statistics.median(rates)
    return {
        "arch": arch, "mode": mode, "compiled": compiled, "images_per_s": rate, "first_epoch_s": history[0]["seconds"],
        "wall_s": wall, "net_images_per_image": mult, "ceiling_images_per_s": ceil, "ratio_to_ceiling": rate / ceil,
        "epochs_200_of_50k_min": 200 * 50_000 / rate / 60,
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that tests can check gpu_session.sh's invocations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["wrn_40_2"], help="architectures (ltta.models registry)")
    ap.add_argument("--modes", nargs="+", default=None, help="training modes (default: every registered mode)")
    ap.add_argument("--n", type=int, default=12_800, help="training images per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager runs")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--ceiling-seconds", type=float, default=3.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmark_train_throughput.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    modes = args.modes or list(TRAIN_MODES.names())
    variants = [v for v, skip in ((False, args.no_eager), (True, args.no_compile)) if not skip]
    rows = []
    for arch in args.archs:
        for mode in modes:
            for compiled in variants:
                try:
                    row = measure(arch, mode, compiled, args, device)
                except Exception as exc:  # one failing combination must not lose the others' figures
                    row = {"arch": arch, "mode": mode, "compiled": compiled, "error": f"{type(exc).__name__}: {exc}"}
                rows.append(row)
                write_json(args.out, {"note": NOTE, "partial": True, "rows": rows})  # a cut-off run keeps its rows
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    report = {
        "note": NOTE,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "n": args.n, "epochs": args.epochs, "batch_size": args.batch_size,
        "compile_mode": args.compile_mode, "rows": rows,
    }  # fmt: skip
    write_json(args.out, report)
    print(f"\n{report['device']} | torch {report['torch']} | batch {args.batch_size} | {args.n} images x {args.epochs} epochs")
    print(f"{'arch':<16}{'mode':<11}{'variant':<10}{'images/s':>10}{'ceiling':>10}{'ratio':>7}{'x/img':>6}{'200ep@50k':>11}")
    for r in rows:
        variant = "compiled" if r["compiled"] else "eager"
        if "error" in r:
            print(f"{r['arch']:<16}{r['mode']:<11}{variant:<10}  FAILED: {r['error'][:80]}")
            continue
        print(f"{r['arch']:<16}{r['mode']:<11}{variant:<10}{r['images_per_s']:>10.0f}{r['ceiling_images_per_s']:>10.0f}"
              f"{r['ratio_to_ceiling']:>7.2f}{r['net_images_per_image']:>6}{r['epochs_200_of_50k_min']:>9.1f} m")
    print(f"(ratio: trainer images/s over the bare fwd+bwd+SGD ceiling of the same model; wrote {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
