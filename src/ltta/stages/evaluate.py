"""Stage evaluate: every TTA method on the clean test set and each corruption x severity.

Outputs: ``metrics/tta/<method>.json`` (DVC metrics: one small file per method, so ``dvc metrics
show`` prints a row per method), ``reports/eval.json`` (everything: each corruption x severity, the
set counts), ``reports/results.md`` (the paper's table layout), ``reports/figures/*.png`` and
``plots/eval_severity.csv`` (error by severity per method, wide: one column per method, for
``dvc plots``). When some benchmark corruptions were held out of all
training (the unseen-corruption study, ``conf/unseen/``), the table adds the mean error over the
seen and over the unseen ones.
"""

from __future__ import annotations

import csv
import datetime as _dt
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ltta import tracking
from ltta.config import Params
from ltta.corruptions import BENCHMARK, read_corruption
from ltta.data import subsample_stratified
from ltta.evaluation import (
    CLEAN, EvalSet, evaluate_methods, figures_markdown, method_metrics, results_markdown, severity_plot_rows,
    write_plots,
)
from ltta.io import atomic_dir, atomic_path, write_json, write_text
from ltta.model_io import load_model_source
from ltta.runtime import make_generator, resolve_device, seed_everything, to_float_nchw, to_uint8_nhwc
from ltta.stages.base import Paths, mlflow_stage
from ltta.stages.inputs import labelled_images, load_target_file, model_location, prepared_meta
from ltta.stages.fit_aggregation import aggregator_path
from ltta.transforms.policy import load_policy
from ltta.tta import build_candidates, build_method
from ltta.evaluation.protocols import (
    environment, input_convention, method_batch_sizes, method_streams, protocol_tags, stream_digest,
)
from ltta.tta.aggregation import AGGREGATORS
from ltta.tta.gps import load_gps_policy

STAGE = "evaluate"


def _loader(paths: Paths, name: str, severity: int, idx: Any, device: torch.device) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        x, _ = read_corruption(paths.corrupted, name, severity)
        return to_float_nchw(x[idx] if idx is not None else x, device)

    return load


def eval_sets(paths: Paths, params: Params, meta: dict[str, Any], device: torch.device) -> list[EvalSet]:
    """The clean set plus every corruption present in ``data/corrupted/test`` at the chosen severities."""
    e = params.evaluate
    x_test, y_test = labelled_images(paths.prepared / "test.npz", meta)
    idx = None
    if e.max_images is not None and e.max_images < len(y_test):
        idx = subsample_stratified(y_test, e.max_images, params.seed)
    x_clean, y_clean = (x_test[idx], y_test[idx]) if idx is not None else (x_test, y_test)
    sets = [EvalSet(CLEAN, 0, to_float_nchw(x_clean, device), torch.as_tensor(y_clean, device=device))]
    labels_path = paths.corrupted / "labels.npy"
    if not labels_path.exists():
        raise FileNotFoundError(f"{labels_path} is missing: rerun prepare_data (dvc repro prepare_data)")
    for name in params.corruptions.names:
        _, y_c = read_corruption(paths.corrupted, name, 1)
        cidx = None
        if e.max_images is not None and e.max_images < len(y_c):
            cidx = subsample_stratified(y_c, e.max_images, params.seed)
        y_sel = torch.as_tensor(y_c[cidx] if cidx is not None else y_c, device=device)
        for s in e.severities:
            sets.append(EvalSet(name, s, _loader(paths, name, s, cidx, device), y_sel))
    return sets


def unseen_corruptions(params: Params, evaluated: list[str]) -> list[str]:
    """Evaluated benchmark corruptions that neither the loss predictor's inputs nor the target's
    training images contained (empty unless a study holds some out; the extras are reported apart)."""
    trained = set(params.loss_dataset.corruptions) | set(params.train_target.corruptions)
    return [c for c in BENCHMARK if c in evaluated and c not in trained]


def write_severity_csv(path: Any, rows: list[dict[str, Any]], methods: list[str]) -> None:
    """Wide CSV (severity, then one error column per method) so `dvc plots` draws a line per method."""
    table: dict[int, dict[str, Any]] = {}
    for r in rows:
        table.setdefault(int(r["severity"]), {"severity": int(r["severity"])})[r["method"]] = r["error"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["severity", *methods])
        writer.writeheader()
        for sev in sorted(table):
            writer.writerow(table[sev])


def register_tta_model(paths: Paths, params: Params, learned: Any, files: dict[str, Path], sources: tuple[str, str],
                       meta_data: dict[str, Any], clean: torch.Tensor) -> str:
    """Log the learned TTA just evaluated as the pyfunc ``ltta-tta`` (alias ``candidate``) in this run.

    Its tags trace it to ``dvc.lock`` (the evaluation's md5) and to the target and predictor
    versions it is built from (found by their files' md5), which ``ltta promote`` moves with it.
    """
    from ltta.serving import log_tta_model, tta_model_config

    e = params.evaluate
    config = tta_model_config(
        [c.name for c in learned.ctx.candidates], k=e.k, selection=e.selection, threshold=e.threshold,
        batch_size=e.batch_size, image_size=int(meta_data["image_size"]), classes=list(meta_data["classes"]),
    )
    example = to_uint8_nhwc(clean[:2]).astype("float32")
    info = log_tta_model(files["target"], files["predictor"], config, example)
    tags = tracking.lineage_tags(STAGE, paths.reports / "eval.json", paths.root)
    for role, name, source in (("target", "ltta-target", sources[0]), ("predictor", "ltta-predictor", sources[1])):
        md5 = tracking.file_md5(files[role])
        tags[f"ltta.{role}_md5"], tags[f"ltta.{role}_source"] = md5, source
        version = tracking.version_by_md5(name, md5)
        if version is not None:
            tags[f"ltta.{role}_version"] = version
    return tracking.register(info.model_uri, "ltta-tta", tags)


def run(params: Params, paths: Paths = Paths()) -> None:
    e = params.evaluate
    device = resolve_device(params.device)
    seed_everything(params.seed)
    meta_data = prepared_meta(paths)
    target_src, predictor_src = model_location(e.target, paths), model_location(e.predictor, paths)
    needs_predictor_file = {"learned", "prior"} & set(e.methods)
    with tempfile.TemporaryDirectory(prefix="ltta-evaluate-") as tmp:
        # The files the learned TTA model is logged with: the very ones evaluated, wherever they came from.
        files = {"target": Path(tmp) / "target.pt", "predictor": Path(tmp) / "predictor.pt"}
        target, target_extra = load_target_file(e.target, paths, meta_data, device, copy_to=files["target"])
        predictor, pextra = (
            load_model_source(predictor_src, device, copy_to=files["predictor"]) if needs_predictor_file else (None, {})
        )
        if "prior" in e.methods and "prior" not in pextra:
            raise ValueError(
                f"evaluate: method 'prior' needs the candidates' mean training losses, which {predictor_src} "
                "does not hold (it predates them); rerun `ltta train-predictor` (or `dvc repro train_predictor`)"
            )
        _check_predictor_candidates(pextra, params.loss_dataset.candidates, predictor_src)
        fitted = _fitted_methods(params, paths, device)
        head = None
        if "feat_pick" in e.methods:
            head_src = model_location(e.feature_head, paths)
            head, hextra = load_model_source(head_src, device)
            _check_predictor_candidates(hextra, params.loss_dataset.candidates, head_src)
            head = (head, hextra)
        if e.selection == "abstain" and "learned" in e.methods and "abstain" not in pextra:
            raise ValueError(f"evaluate: selection 'abstain' needs the margin chosen on valid_loss, which {predictor_src} "
                             "does not hold (it predates it); rerun `ltta train-predictor` (or `dvc repro train_predictor`)")
        # Where the target came from: its file says so for a published one (train_target.source).
        meta_data = {**meta_data, "target_origin": target_extra.get("source", {}).get("source", "trained here")}
        _evaluate(params, paths, meta_data, device, target, predictor, pextra, files, (str(target_src), str(predictor_src)),
                  head, fitted)


def _fitted_methods(params: Params, paths: Paths, device: torch.device) -> dict[str, dict[str, Any]]:
    """What the methods fitted on valid_loss read: gps its policy (search_gps), agg_* their
    aggregators (fit_aggregation), each checked against the loss dataset's candidates."""
    out: dict[str, dict[str, Any]] = {}
    if "gps" in params.evaluate.methods:
        out["gps"] = {"policy": load_gps_policy(paths.gps_policy)}
    for kind in AGGREGATORS:
        if kind in params.evaluate.methods:
            path = aggregator_path(paths, kind)
            model, extra = load_model_source(path, device)
            _check_predictor_candidates(extra, params.loss_dataset.candidates, path)
            out[kind] = {"predictor": model}
    return out


def _check_predictor_candidates(pextra: dict[str, Any], configured: str | list[str], source: object) -> None:
    """The predictor scores the candidates of the loss dataset it was trained on, column by column:
    a predictor trained on another list (a stale file, another run's registered model) would rank
    the wrong transforms, so the two lists must be the same, in the same order."""
    if "candidates" not in pextra:
        return
    theirs, ours = list(pextra["candidates"]), [c.name for c in build_candidates(configured)]
    if theirs != ours:
        column, (their, our) = next((i, pair) for i, pair in enumerate(itertools.zip_longest(theirs, ours))
                                    if pair[0] != pair[1])
        raise ValueError(
            f"{source} was trained on {len(theirs)} candidates but loss_dataset.candidates gives {len(ours)} "
            f"(first difference at column {column}: {their!r} vs {our!r}); retrain it on this loss dataset (dvc repro "
            f"train_predictor) or set loss_dataset.candidates to its list"
        )


def _method_settings(params: Params, pextra: dict[str, Any], head: tuple[torch.nn.Module, dict[str, Any]] | None
                     ) -> dict[str, dict[str, Any]]:
    """What differs from method to method: feat_pick reads its own head with its selection, and
    an ``abstain`` selection takes the margin train_predictor chose on valid_loss (not a param)."""
    e = params.evaluate
    out: dict[str, dict[str, Any]] = {}
    if e.selection == "abstain":
        out["learned"] = {"threshold": float(pextra["abstain"]["margin"])}
    if head is not None:
        model, extra = head
        out["feat_pick"] = {"predictor": model, "selection": e.feature_selection,
                                   "threshold": float(extra["abstain"]["margin"]) if e.feature_selection == "abstain" else 0.0}
    return out


def _protocol_record(params: Params, paths: Paths, meta_data: dict[str, Any], target: torch.nn.Module, target_file: Path,
                     target_source: str, sets: list[EvalSet], batches: dict[str, int], adapting: list[str],
                     device: torch.device) -> dict[str, Any]:
    """Everything a published number's protocol fixes, as evaluated here (see :mod:`ltta.evaluation.protocols`)."""
    e = params.evaluate
    corrupted = [s for s in sets if s.corruption != CLEAN]
    return {
        "name": e.protocol,
        "data": {"source": meta_data["source"], "test_md5": tracking.file_md5(paths.prepared / "test.npz"),
                 "test_images": int(meta_data["n_test"])},
        "corrupted": dict(meta_data.get("corrupted", {"source": "generated"})),
        "target": {"source": target_source, "origin": meta_data["target_origin"], "md5": tracking.file_md5(target_file),
                   **input_convention(target, int(meta_data["image_size"]))},
        "images_per_cell": {"clean": int(len(sets[0].y)), "corrupted": int(len(corrupted[0].y)) if corrupted else 0},
        "corruptions": list(dict.fromkeys(s.corruption for s in corrupted)),
        "severities": list(e.severities),
        "methods": method_streams(batches, adapting),
        "stream_order": "the test split's order" + (f", a stratified {e.max_images} (seed {params.seed})"
                                                    if e.max_images is not None else ""),
        "stream_md5": stream_digest([(s.corruption, s.severity, s.y) for s in sets]),
        "seed": params.seed,
        "environment": environment(device),
    }


def _evaluate(params: Params, paths: Paths, meta_data: dict[str, Any], device: torch.device, target: torch.nn.Module,
              predictor: torch.nn.Module | None, pextra: dict[str, Any], files: dict[str, Path],
              sources: tuple[str, str], head: tuple[torch.nn.Module, dict[str, Any]] | None = None,
              fitted: dict[str, dict[str, Any]] | None = None) -> None:
    e = params.evaluate
    candidates = build_candidates(pextra.get("candidates", params.loss_dataset.candidates))
    policy = load_policy(paths.policy) if "policy" in e.methods else None

    with mlflow_stage(STAGE, params, ("evaluate",)):
        common = {"candidates": candidates, "k": e.k, "predictor": predictor, "prior": pextra.get("prior"), "policy": policy,
                  "batch_size": e.batch_size, "device": device, "selection": e.selection, "threshold": e.threshold,
                  "bn_prior": e.bn_prior}
        per_method = {**_method_settings(params, pextra, head), **(fitted or {})}
        batches = method_batch_sizes(e.protocol, e.methods, e.batch_size, e.batch_sizes)  # the test stream's, per method
        methods = {
            name: build_method(name, target, generator=make_generator(params.seed, device),
                               **{**common, "batch_size": batches[name], **per_method.get(name, {})})
            for name in e.methods
        }
        sets = eval_sets(paths, params, meta_data, device)
        results = evaluate_methods(methods, sets, batch_size=e.batch_size, method_batch_sizes=batches)
        unseen = unseen_corruptions(params, results.corruptions())
        meta = {
            "dataset": meta_data["source"],
            "profile": params.profile,
            "study": f"{params.study} (unseen family: {params.unseen})",
            "target": (f"{params.train_target.arch} ({params.train_target.mode}, {params.train_target.epochs} epochs)"
                       if meta_data["target_origin"] == "trained here" else f"{meta_data['target_origin']} (not trained here)"),
            "test images": meta_data["n_test"] if e.max_images is None else min(e.max_images, meta_data["n_test"]),
            "candidates": len(candidates),
            "k": e.k,
            **({"learned selection": e.selection + (f" (threshold {e.threshold})" if e.threshold else "")}
               if "learned" in methods else {}),
            **({"prior's candidates": ", ".join(methods["prior"].chosen_names)} if "prior" in methods else {}),
            **({"feat_pick": f"the target's own features, selection {e.feature_selection}"
                + (f" (margin {per_method['feat_pick']['threshold']:.3g} from valid_loss)" if e.feature_selection == "abstain" else "")}
               if "feat_pick" in methods else {}),
            **({"gps": f"the first {e.k} of {len(per_method['gps']['policy'].members)} members searched on valid_loss "
                       f"(temperature {per_method['gps']['policy'].temperature(e.k):.3g} applied)"} if "gps" in methods else {}),
            **({"agg_aug / agg_class": "weights over all candidate views' logits, fitted on valid_loss"}
               if {"agg_aug", "agg_class"} & set(methods) else {}),
            **({"test-time adaptation": ", ".join(f"{n} (batches of {batches[n]})" for n, m in methods.items()
                                                  if m.adapts_on_test_stream)
                + f": adapt on the test stream, reset before each set, protocol {e.protocol}; not TTA"}
               if any(m.adapts_on_test_stream for m in methods.values()) else {}),
            "device": str(device),
            "date": _dt.date.today().isoformat(),
            "git commit": tracking.git_commit()[:12],
        }
        summary = results.summary(baseline_method=e.baseline, unseen=unseen)
        record = _protocol_record(params, paths, meta_data, target, files["target"], sources[0], sets, batches,
                                  [n for n, m in methods.items() if m.adapts_on_test_stream], device)
        write_json(paths.reports / "eval.json",
                   {"protocol": record, **results.to_json(baseline_method=e.baseline, unseen=unseen)})
        tracking.set_tags(protocol_tags(record))
        with atomic_dir(paths.metrics / "tta") as tta_dir:
            for method, row in method_metrics(summary).items():
                write_json(tta_dir / f"{method}.json", row)
        with atomic_dir(paths.reports / "figures") as fig_dir:
            figures = write_plots(results, fig_dir)
        table = results_markdown(
            results, title=f"ltta results: {params.profile}", meta=meta, baseline_method=e.baseline, unseen=unseen
        )
        write_text(paths.reports / "results.md", table + "\n" + figures_markdown([f.name for f in figures]))
        write_severity_csv(paths.plots / "eval_severity.csv", severity_plot_rows(results), list(e.methods))
        tracking.log_metrics({f"{m}.{k}": v for m, row in summary.items() for k, v in row.items() if v is not None})
        tracking.log_artifacts(
            [paths.reports / "results.md", paths.reports / "eval.json", paths.plots / "eval_severity.csv"]
            + [paths.reports / "figures" / f.name for f in figures],
        )
        if "learned" in methods and params.tracking.register_models:
            register_tta_model(paths, params, methods["learned"], files, sources, meta_data, sets[0].x)
