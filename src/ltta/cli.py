"""``ltta <command>``: one subcommand per DVC stage, plus ``ltta params`` to compose params.yaml.

Every command validates params.yaml before it touches anything, and turns expected failures
(bad params, missing or corrupt files, unreachable servers, NaN losses) into one clear line on
stderr and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from ltta.config import ParamsError, load_params
from ltta.locking import stage_lock

# command -> (module under ltta.stages, help). The module's ``run(params)`` does the work.
STAGE_COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("prepare_data", "load/download the dataset, split, validate, generate the corruption benchmark"),
    "train-target": ("train_target", "train the target classifier (checkpointed, resumable)"),
    "build-loss-dataset": ("build_loss_dataset", "the target's loss for each image under every candidate transform"),
    "train-predictor": ("train_predictor", "train the loss predictor with a differentiable Spearman ranking loss"),
    "train-sorter": ("train_sorter", "train SoDeep's sorter for ranker sodeep ahead of train-predictor (cached, not a DVC stage)"),
    "search-policy": ("search_policy", "Fast AutoAugment search (density matching, TPE): a static policy"),
    "search-gps": ("search_gps", "greedy policy search (Molchanov et al. 2020): a TTA policy by calibrated likelihood"),
    "fit-aggregation": ("fit_aggregation", "learned aggregation of the candidate views (Shanmugam et al. 2021)"),
    "evaluate": ("evaluate", "every TTA method on clean and corrupted test sets: metrics, table, plots"),
}

#: Commands that may run as several processes under ``torchrun`` (data-parallel training).
DISTRIBUTED_COMMANDS = frozenset({"train-target"})

#: Write failures of a full or over-quota disk: errno -> what the message calls it.
DISK_ERRORS: dict[int, str] = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltta",
        description="Learned test-time augmentation pipeline (Kim et al., NeurIPS 2020). "
        "Stages are normally run by `dvc repro`; each can also be run alone.",
    )
    parser.add_argument(
        "--debug", action="store_true", default=os.environ.get("LTTA_DEBUG", "") not in ("", "0"),
        help="print the traceback of an unexpected error (also LTTA_DEBUG=1, e.g. under dvc repro)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in STAGE_COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
        if name == "search-policy":
            sp.add_argument("--worker", action="store_true",
                            help="only run trials against search_policy.storage (start several, then the plain command)")
    cp = sub.add_parser(
        "params",
        help="compose params.yaml from conf/ (profiles and overrides), validate, write it",
        description="Compose conf/config.yaml with Hydra overrides (e.g. profile=cifar100 train_target.epochs=5), "
        "validate the result and write params.yaml; the same composition `dvc exp run -S` does.",
    )
    cp.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=cifar10")
    cp.add_argument("--conf", type=Path, default=Path("conf"), help="config directory (default: conf)")
    cp.add_argument("--out", type=Path, default=Path("params.yaml"), help="file to write (default: params.yaml)")
    cp.add_argument("--check", action="store_true", help="only check that --out equals the composition; exit 1 if not")
    vp = sub.add_parser("check-params", help="validate params.yaml and exit", description="Validate params.yaml and exit.")
    vp.add_argument("--params", type=Path, default=Path("params.yaml"))
    pp = sub.add_parser(
        "promote",
        help="move the registry alias champion to the candidate if it wins on promote.metric",
        description="Compare the registered ltta-tta@candidate (the last evaluate run's learned TTA) with "
        "ltta-tta@champion on promote.metric (params.yaml) and move champion, on it and on its target and "
        "predictor versions, only when the candidate is strictly better; the first candidate becomes champion. "
        "The figures and the decision are tagged on both versions. Exit 0 either way.",
    )
    pp.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    pp.add_argument("--json", type=Path, default=None, help="also write the decision as JSON to this file")
    from ltta.compare import COLUMNS, GROUP_KEYS

    xp = sub.add_parser(
        "compare",
        help="the paper's table for several evaluate runs side by side (from MLflow)",
        description="Read the evaluate runs from MLflow (MLFLOW_TRACKING_URI, else the project's mlflow.db) and "
        "print the paper's table: one row per method and run, or with --by one column per study/profile/... "
        "(mean ± sd of --metric over its runs). Runs are chosen by --run-id, --dvc-exp, or --experiment and "
        "--filter (default: every evaluate run of experiment ltta).",
    )
    xp.add_argument("--experiment", action="append", default=[], help="MLflow experiment name (repeatable; default: ltta)")
    xp.add_argument("--run-id", action="append", default=[], help="an evaluate run's id (repeatable)")
    xp.add_argument("--dvc-exp", action="append", default=[], help="a `dvc exp run` experiment's name (repeatable; its newest run)")
    xp.add_argument("--filter", default=None, help="MLflow search filter ANDed with ltta.stage=evaluate, "
                    "e.g. \"tags.`ltta.profile` = 'cifar10'\"")
    xp.add_argument("--by", choices=GROUP_KEYS, default=None, help="one column per value of this tag/param")
    xp.add_argument("--metric", default="mean_corruption_error",
                    help=f"the summary key tabulated with --by (default mean_corruption_error; the paper's: {', '.join(COLUMNS)})")
    xp.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown", help="output format (default markdown)")
    xp.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    return parser


def _promote(args: argparse.Namespace) -> int:
    """``ltta promote``: one line saying what moved and why."""
    import mlflow

    from ltta import tracking
    from ltta.io import write_json
    from ltta.promotion import promote

    params = load_params(args.params)
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    cfg = params.promote
    decision = promote(mlflow.MlflowClient(), model=cfg.model, metric=cfg.metric, mode=cfg.mode)
    print(decision.line())
    if args.json is not None:
        write_json(args.json, decision.to_json())
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``ltta compare``: the table on stdout (or ``--out``)."""
    import mlflow

    from ltta import tracking
    from ltta.compare import find_runs, protocol_differences, render_grouped, render_long
    from ltta.io import write_text

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    runs = find_runs(mlflow.MlflowClient(tracking_uri=uri), experiments=args.experiment, run_ids=args.run_id,
                     filter_string=args.filter, dvc_exps=args.dvc_exp)
    text = render_long(runs, args.format) if args.by is None else render_grouped(runs, args.by, args.metric, args.format)
    differences = protocol_differences(runs)
    if differences:  # on stderr: the table stays machine-readable, the warning still reaches the reader
        print(f"warning: these runs were evaluated under different protocols ({len(differences)} fields differ); "
              "their numbers are not directly comparable:", file=sys.stderr)
        for line in differences:
            print(f"  {line}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_text(args.out, text)
        print(f"wrote {args.out} ({len(runs)} runs)")
    return 0


#: Commands that are not stages: name -> handler(args) -> exit code (each reads params.yaml only if it needs it).
TOOL_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"promote": _promote, "compare": _compare}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "params":
            from ltta.compose import compose_params, write_params

            composed = compose_params(args.conf, list(args.overrides))
            if args.check:
                current = load_params(args.out)
                if current != composed:
                    print(f"error: {args.out} differs from the composition of {args.conf} {args.overrides}; "
                          f"run `ltta params {' '.join(args.overrides)}`", file=sys.stderr)
                    return EXIT_FAILURE
                print(f"{args.out} matches {args.conf}")
                return 0
            write_params(args.out, composed)
            print(f"wrote {args.out} (profile {composed.profile})")
            return 0
        if args.command in TOOL_COMMANDS:
            return TOOL_COMMANDS[args.command](args)
        params = load_params(args.params)
        if args.command == "check-params":
            print(f"{args.params}: valid (profile {params.profile})")
            return 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in DISTRIBUTED_COMMANDS:
            # Every process would run the whole stage and race on its outputs.
            print(f"error: {args.command} runs as one process; only {', '.join(sorted(DISTRIBUTED_COMMANDS))} "
                  f"runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}). Run `ltta {args.command}` directly.",
                  file=sys.stderr)
            return EXIT_USAGE
        module = importlib.import_module(f"ltta.stages.{STAGE_COMMANDS[args.command][0]}")
        worker = getattr(args, "worker", False)
        # Search workers run side by side by design, and torchrun's ranks share one run: rank 0 locks.
        locked = not worker and os.environ.get("RANK", "0") == "0"
        with stage_lock(args.command) if locked else contextlib.nullcontext():
            module.run(params, **({"worker": True} if worker else {}))
        return 0
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        print(f"error: {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"interrupted: {args.command} (rerun resumes from its last checkpoint where it has one)", file=sys.stderr)
        return 130
    except Exception as exc:  # not one of ours: still one line, the traceback on request
        if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
            # Outputs are written to a temporary name and renamed: the failed write left the old ones.
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"error: {args.command}: {DISK_ERRORS[exc.errno]}{where}; free space (or raise the quota) and "
                  f"rerun: the outputs of the last successful run are unchanged", file=sys.stderr)
            return EXIT_FAILURE
        if args.debug:
            traceback.print_exc()
        print(f"error: {args.command}: unexpected {type(exc).__name__}: {exc}"
              + ("" if args.debug else " (LTTA_DEBUG=1 or `ltta --debug` prints the traceback)"), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
