"""Does the learned choice earn its cost? A diagnosis of the paper's predictor and input-aware variants.

On the CIFAR dev sample the paper's learned top-k barely beats ``prior`` (the same k candidates for
every image). This script asks why, and whether a predictor that reads the image better, or a
selection that abstains, does better. For each target (``--modes``; small_cnn trained as
``dev_study.py`` trains it, the same splits, seeds and 24 candidates) it builds, once and cached
in ``--cache``:

- the target, its loss dataset (3 copies x 2 flips of the train_loss images, as the stages) and
  ``--extra-copies`` more copies of the same images (another generator), for the learning curve;
- the paper's trunk predictor (``loss_predictor``, width 16, 30 epochs, 128 rows per step: the
  setting ``predictor_ablation.py`` found best on this sample) at each ``--trunk-seeds``;
- *test tables*: for the clean held-out part and the 15 benchmark corruptions x 5 severities, the
  target's softmax under every candidate [N,C,K], its pooled features and logits on the image,
  and each trunk predictor's flip-ensembled scores.

Every selection rule is then evaluated from the test tables: a method that averages the softmax
of chosen views gets exactly the probabilities it would compute (the views are deterministic),
so many variants and seeds cost seconds, not a target pass each. The best variant is re-run
through the registered TTA method on every set as a check (``check`` in the JSON: the two must
agree).

    python benchmarks/learned_choice.py --data cifar10_dev.npz --prepare-only   # the cached part
    python benchmarks/learned_choice.py --data cifar10_dev.npz                  # diagnosis + variants
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dev_study import DUPLICATION, eval_sets, load_sample  # noqa: E402
from predictor_ablation import Variant, load_or_build, trained_predictor  # noqa: E402

from ltta.corruptions import BENCHMARK  # noqa: E402
from ltta.corruptions.names import FAMILIES  # noqa: E402
from ltta.evaluation import CLEAN, evaluate_methods  # noqa: E402
from ltta.evaluation.metrics import ece, error_rate, nll  # noqa: E402
from ltta.io import write_json  # noqa: E402
from ltta.models import build_model  # noqa: E402
from ltta.predictor.trainer import train_predictor  # noqa: E402
from ltta.predictor.quality import prior_scores  # noqa: E402
from ltta.tta import build_method  # noqa: E402
from ltta.tta.abstain import choose_margin, predicted_gain, select_abstain  # noqa: E402
from ltta.tta.learned_features import head_flops  # noqa: E402
from ltta.tta.learned import flops_per_image  # noqa: E402
from ltta.predictor.scoring import predictor_scores  # noqa: E402
from ltta.data import loss_predictor_split  # noqa: E402
from ltta.runtime import make_generator, resolve_device  # noqa: E402
from ltta.predictor.trainer import PredictorConfig  # noqa: E402
from ltta.models.inference import predict_proba  # noqa: E402
from ltta.tta import apply_candidate, identity_index  # noqa: E402
from ltta.predictor import candidate_losses, flip_ensemble_probs, predictor_training_inputs  # noqa: E402
from ltta.tta.target_features import target_features  # noqa: E402


def trunk_variant(seed: int) -> Variant:
    """The paper's predictor at the setting predictor_ablation.py found best on this sample."""
    return Variant(f"trunk_s{seed}", PredictorConfig(epochs=30, batch_size=128, seed=seed), width=16)


def _save(path: Path, blob: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def _cached(path: Path, build: Any, label: str) -> Any:
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=False)  # our own cache, written by this script
    t0 = time.perf_counter()
    blob = build()
    _save(path, blob)
    print(f"  {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    return blob


def mode_args(args: argparse.Namespace, mode: str) -> argparse.Namespace:
    """The namespace predictor_ablation.py's cache helpers read (same keys: same cached target)."""
    return argparse.Namespace(data=args.data, arch=args.arch, mode=mode, epochs=args.epochs,
                              test_fraction=args.test_fraction, set=[], compile=False, cache=args.cache)


def extra_copies(model: torch.nn.Module, data: dict[str, Any], tables: dict[str, Any], copies: int) -> dict[str, Any]:
    """More deformed copies of the train_loss images (another generator), with their losses."""
    tl, _ = loss_predictor_split(data["y_tr_np"])
    x = predictor_training_inputs(data["x_tr"][tl], make_generator(11, data["x_tr"].device), duplication=copies,
                                  p_aug=0.4, corruptions=list(BENCHMARK))
    y = data["y_tr"][tl].repeat(x.shape[0] // len(tl))
    losses, _ = candidate_losses(model, x, y, tables["candidates"], batch_size=1024)
    return {"x": (x * 255).round().to(torch.uint8), "losses": losses}


def test_tables(model: torch.nn.Module, data: dict[str, Any], candidates: list[Any], severities: list[int]) -> dict[str, Any]:
    """Per test set: softmax under every candidate [N,C,K] (float16 would lose ties: float32), features, logits."""
    out: dict[str, Any] = {"labels": data["y_te"].cpu(), "sets": {}}
    for s in eval_sets(data, list(BENCHMARK), severities, data["x_te"].device):
        x = s.images()
        probs = torch.stack([predict_proba(model, apply_candidate(x, c), batch_size=1024) for c in candidates], 1)
        feats, logits = target_features(model, x)
        out["sets"][s.label] = {"probs": probs.cpu(), "features": feats.cpu(), "logits": logits.cpu()}
    return out


def trunk_scores(pred: torch.nn.Module, data: dict[str, Any], candidates: list[Any], severities: list[int]) -> dict[str, torch.Tensor]:
    return {s.label: flip_ensemble_probs(pred, s.images(), candidates, 1024).cpu()
            for s in eval_sets(data, list(BENCHMARK), severities, data["x_te"].device)}


def prepare(args: argparse.Namespace, device: torch.device, data: dict[str, Any], mode: str, phase: str) -> dict[str, Any]:
    """Everything expensive for one target, cached: phase "a" (target, tables, trunk seed 0), "b" (the rest)."""
    ns = mode_args(args, mode)
    print(f"[{mode}] phase {phase}", flush=True)
    model, tables, info = load_or_build(ns, device, data)
    cands = tables["candidates"]
    key = f"{args.arch}_{mode}_{args.epochs}ep"
    out: dict[str, Any] = {"model": model, "tables": tables, "info": info, "cache": args.cache, "key": key, "mode": mode}
    out["test"] = _cached(args.cache / f"test_tables_{key}.pt",
                          lambda: test_tables(model, data, cands, args.severities), "test tables")
    seeds = args.trunk_seeds[:1] if phase == "a" else args.trunk_seeds
    out["trunk"] = {}
    for seed in seeds:
        v = trunk_variant(seed)
        pred, hist, secs = trained_predictor(ns, device, tables["x_train"], tables["losses_train"], tables, v,
                                             identity_index(cands))
        out["trunk"][seed] = {
            "predictor": pred, "history": hist, "seconds": secs,
            "scores": _cached(args.cache / f"trunk_scores_{key}_s{seed}.pt",
                              lambda: trunk_scores(pred, data, cands, args.severities), f"trunk s{seed} test scores"),
        }
    needs_extra = mode in args.curve_modes and any(parse_head(h).copies > DUPLICATION for h in args.curve)
    if phase == "b" and args.extra_copies and needs_extra:
        out["extra"] = _cached(args.cache / f"extra_copies_{key}_{args.extra_copies}.pt",
                               lambda: extra_copies(model, data, tables, args.extra_copies), "extra copies")
    return out


# ---------------------------------------------------------------- variants: the feature head


@dataclasses.dataclass(frozen=True)
class HeadSetting:
    """A feature head's training: objective, tau, hidden width, copies of each image used (1..8)."""

    name: str
    objective: str = "listwise"
    tau: float = 1.0
    hidden: int = 128
    copies: int = 3  # duplicates of each train_loss image (x 2 flips): 3 is the loss dataset's
    epochs: int = 30
    lr: float = 0.01


HEADS = {
    "head_listwise": HeadSetting("head_listwise"),
    "head_sodeep": HeadSetting("head_sodeep", objective="sodeep_style"),
}
#: One setting changed at a time from head_listwise, seed 0, on --curve-modes: the learning curve
#: over loss-dataset rows (copies of each image, x 2 flips) and head width, and a sharper target.
CURVE = ["c1:copies=1", "c2:copies=2", "c8:copies=8", "h32:hidden=32", "h512:hidden=512", "tau01:tau=0.1"]


def feature_rows(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features and logits as the head's [N, D + K, 1, 1] inputs."""
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x
    feats, logits = target_features(model, xf)
    return torch.cat([feats, logits], 1)[:, :, None, None]


def training_rows(prep: dict[str, Any], copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(head inputs, losses) of the first ``copies`` duplicates (x 2 flips): the loss dataset's 3, then the extra ones."""
    tables, model = prep["tables"], prep["model"]
    if "rows" not in prep:
        prep["rows"] = feature_rows(model, tables["x_train"])
        if "extra" in prep:
            prep["extra_rows"] = feature_rows(model, prep["extra"]["x"])
    rows, losses = prep["rows"], tables["losses_train"]
    per_copy = rows.shape[0] // DUPLICATION  # 2 flips x images per duplicate, copy-major
    if copies <= DUPLICATION:
        return rows[: copies * per_copy], losses[: copies * per_copy]
    if "extra_rows" not in prep:
        raise SystemExit(f"{copies} copies need --extra-copies >= {copies - DUPLICATION}")
    more = (copies - DUPLICATION) * per_copy
    return torch.cat([rows, prep["extra_rows"][:more]]), torch.cat([losses, prep["extra"]["losses"][:more]])


def valid_rows(prep: dict[str, Any]) -> torch.Tensor:
    """The head's inputs for the valid_loss rows (computed once)."""
    if "valid_rows" not in prep:
        prep["valid_rows"] = feature_rows(prep["model"], prep["tables"]["x_valid"])
    return prep["valid_rows"]


def train_head(prep: dict[str, Any], setting: HeadSetting, seed: int) -> tuple[torch.nn.Module, list[dict[str, float]], float]:
    """A feature head (cached by its target, setting and seed)."""
    fields = dataclasses.asdict(setting)
    fields.pop("name")
    path = prep["cache"] / ("head_" + prep["key"] + "_" + "_".join(f"{k}{v}" for k, v in fields.items()) + f"_s{seed}.pt")
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)  # our own cache
        return blob["head"], blob["history"], blob["seconds"]
    head, hist, secs = _train_head(prep, setting, seed)
    _save(path, {"head": head, "history": hist, "seconds": secs})
    return head, hist, secs


def _train_head(prep: dict[str, Any], setting: HeadSetting, seed: int) -> tuple[torch.nn.Module, list[dict[str, float]], float]:
    x, losses = training_rows(prep, setting.copies)
    cfg = PredictorConfig(epochs=setting.epochs, batch_size=128, lr=setting.lr, objective=setting.objective,
                          tau=setting.tau, cutout=0.0, seed=seed)
    d, k = prep["test"]["sets"][CLEAN]["features"].shape[1], prep["test"]["sets"][CLEAN]["logits"].shape[1]
    torch.manual_seed(seed)
    head = build_model("feature_head", features=d, classes=k, num_outputs=losses.shape[1], hidden=setting.hidden)
    t0 = time.perf_counter()
    head, hist = train_predictor(head, x, losses, valid_rows(prep), prep["tables"]["losses_valid"], cfg,
                                 device="cpu", identity_index=identity_index(prep["tables"]["candidates"]), progress=False)
    return head, hist, time.perf_counter() - t0


def head_scores(head: torch.nn.Module, prep: dict[str, Any]) -> dict[str, torch.Tensor]:
    """softmax(head) per test set (what learned_features selects from)."""
    return {label: predictor_scores(head, torch.cat([t["features"], t["logits"]], 1)[:, :, None, None]).softmax(1)
            for label, t in prep["test"]["sets"].items()}


# ---------------------------------------------------------------- evaluation from the test tables


def averaged(probs: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Mean softmax [N,K] over each image's chosen candidates ``sel`` [N,k] (-1: no view)."""
    valid = sel >= 0
    picked = probs.gather(1, sel.clamp_min(0)[:, :, None].expand(-1, -1, probs.shape[2]))
    return (picked * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True)


def score_sets(prep: dict[str, Any], select: Any, extra_views: float = 0.0, reuse_identity: bool = False) -> dict[str, Any]:
    """Error / NLL / ECE per test set of a selection ``select(label, probs [N,C,K]) -> [N,k]``, and its passes.

    Passes = the views made per image (identity free with ``reuse_identity``) + ``extra_views``.
    """
    y = prep["test"]["labels"]
    ident = identity_index(prep["tables"]["candidates"])
    rows, views, images = {}, 0, 0
    for label, t in prep["test"]["sets"].items():
        sel = select(label, t["probs"])
        p = averaged(t["probs"], sel)
        rows[label] = {"error": error_rate(p, y), "nll": nll(p, y), "ece": ece(p, y)}
        made = (sel >= 0) & ((sel != ident) if reuse_identity else True)
        views += int(made.sum())
        images += sel.shape[0]
    corrupted = [r for lab, r in rows.items() if lab != CLEAN]
    return {
        "clean": rows[CLEAN]["error"], "mce": sum(r["error"] for r in corrupted) / len(corrupted),
        "c_nll": sum(r["nll"] for r in corrupted) / len(corrupted), "clean_nll": rows[CLEAN]["nll"],
        "passes": views / images + extra_views, "per_set": rows,
    }


def true_losses(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The target's loss [N,C] under every candidate."""
    return -probs.gather(2, y[:, None, None].expand(-1, probs.shape[1], 1)).squeeze(2).clamp_min(1e-12).log()


def method_rows(prep: dict[str, Any], scorers: dict[str, dict[str, Any]], k: int) -> dict[str, Any]:
    """Every method of the comparison from the test tables."""
    cands = prep["tables"]["candidates"]
    ident = identity_index(cands)
    y = prep["test"]["labels"]
    prior = prior_scores(prep["tables"]["losses_train"])
    prior_sel = prior.topk(k).indices
    out = {
        "none": score_sets(prep, lambda lab, p: torch.full((p.shape[0], 1), ident)),
        "prior": score_sets(prep, lambda lab, p: prior_sel.expand(p.shape[0], -1)),
        "oracle": score_sets(prep, lambda lab, p: true_losses(p, y).topk(k, 1, largest=False).indices),
    }
    out["oracle"]["passes"] = float(len(cands))
    for name, sc in scorers.items():
        scores, cost, reuse = sc["scores"], sc["cost"], sc["reuse_identity"]
        base = 1.0 if reuse else 0.0  # the feature pass (which also yields identity's prediction)
        out[f"{name}/topk"] = score_sets(prep, lambda lab, p: scores[lab].topk(k, 1).indices, cost + base, reuse)
        m = sc["margin"]["margin"]
        out[f"{name}/abstain"] = score_sets(prep, lambda lab, p: select_abstain(scores[lab], k, ident, m), cost + base, reuse)
        out[f"{name}/abstain"]["margin"] = sc["margin"]
    return out


# ---------------------------------------------------------------- diagnosis


def family_of(label: str) -> str:
    if label == CLEAN:
        return CLEAN
    name = label.split("/")[0]
    return next(f for f, members in FAMILIES.items() if name in members)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation; None where one side is constant (the prior's predicted gain)."""
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return None if r != r else r


def diagnose(prep: dict[str, Any], scores: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    """Per family (and clean): oracle gain recovered by the top-1, help/harm of top-k, top-of-ranking hits, calibration."""
    y = prep["test"]["labels"]
    ident = identity_index(prep["tables"]["candidates"])
    acc: dict[str, dict[str, list[torch.Tensor]]] = {}
    for label, t in prep["test"]["sets"].items():
        fam = family_of(label)
        losses = true_losses(t["probs"], y)
        s = scores[label]
        top1 = s.argmax(1)
        topk = s.topk(k, 1).indices
        oracle1 = losses.argmin(1)
        right = t["probs"].argmax(2) == y[:, None]  # [N,C] each single view correct
        topk_right = averaged(t["probs"], topk).argmax(1) == y
        d = acc.setdefault(fam, {})
        for key, v in {
            "l_id": losses[:, ident], "l_top1": losses.gather(1, top1[:, None]).squeeze(1), "l_orc": losses.min(1).values,
            "e_id": ~right[:, ident], "e_top1": ~right.gather(1, top1[:, None]).squeeze(1), "e_orc": ~right.any(1),
            "e_topk": ~topk_right,
            "oracle_in_topk": (topk == oracle1[:, None]).any(1),
            "top1_right_topk_wrong": right.gather(1, top1[:, None]).squeeze(1) & ~topk_right,
            "harm": right[:, ident] & ~topk_right, "help": ~right[:, ident] & topk_right,
            "pred_gain": predicted_gain(s, ident), "true_gain": losses[:, ident] - losses.gather(1, top1[:, None]).squeeze(1),
            "p_top1": s.max(1).values, "hit": losses.gather(1, top1[:, None]).squeeze(1) <= losses.min(1).values,
        }.items():
            d.setdefault(key, []).append(v.float())
    out = {}
    for fam, d in acc.items():
        c = {key: torch.cat(v) for key, v in d.items()}
        gain_l = float(c["l_id"].mean() - c["l_orc"].mean())
        gain_e = float(c["e_id"].mean() - c["e_orc"].mean())
        order = c["pred_gain"].argsort()
        bins = [order[i * len(order) // 5 : (i + 1) * len(order) // 5] for i in range(5)]  # quintiles of predicted gain
        out[fam] = {
            "images": int(c["l_id"].numel()),
            "loss_recovered": float(c["l_id"].mean() - c["l_top1"].mean()) / gain_l if gain_l else None,
            "error_recovered": float(c["e_id"].mean() - c["e_top1"].mean()) / gain_e if gain_e else None,
            "topk_error_recovered": float(c["e_id"].mean() - c["e_topk"].mean()) / gain_e if gain_e else None,
            "identity_error": 100 * float(c["e_id"].mean()), "top1_error": 100 * float(c["e_top1"].mean()),
            "topk_error": 100 * float(c["e_topk"].mean()), "oracle1_error": 100 * float(c["e_orc"].mean()),
            "top1_hit": float(c["hit"].mean()), "oracle_in_topk": float(c["oracle_in_topk"].mean()),
            "top1_right_topk_wrong": float(c["top1_right_topk_wrong"].mean()),
            "help": float(c["help"].mean()), "harm": float(c["harm"].mean()),
            "calibration": [{"pred_gain": float(c["pred_gain"][b].mean()), "true_gain": float(c["true_gain"][b].mean()),
                             "p_top1": float(c["p_top1"][b].mean()), "top1_hit": float(c["hit"][b].mean())} for b in bins],
            "gain_corr": _corr(c["pred_gain"], c["true_gain"]),
        }
    return out


# ---------------------------------------------------------------- the run


def scorers_for(prep: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every scorer (trunk seeds, head settings x seeds): test scores, cost, validated margin, training facts."""
    model, tables = prep["model"], prep["tables"]
    cands = tables["candidates"]
    ident = identity_index(cands)
    tflops = flops_per_image(model, 32)
    scorers, facts = {}, {}
    for seed, tr in prep["trunk"].items():
        pred = tr["predictor"]
        valid = flip_ensemble_probs(pred, tables["x_valid"], cands, 1024)
        scorers[f"trunk_s{seed}"] = {"scores": tr["scores"], "cost": 2.0 * flops_per_image(pred, 32) / tflops,
                                     "reuse_identity": False, "margin": choose_margin(valid, tables["losses_valid"], ident)}
        facts[f"trunk_s{seed}"] = {"seconds": tr["seconds"], **{k: v for k, v in tr["history"][-1].items() if k.startswith("valid_")}}
    runs = [(h, args.head_seeds) for h in args.heads]
    if prep["mode"] in args.curve_modes:
        runs += [(h, args.head_seeds[:1]) for h in args.curve]
    for hname, seeds in runs:
        setting = HEADS[hname] if hname in HEADS else parse_head(hname)
        for seed in seeds:
            head, hist, secs = train_head(prep, setting, seed)
            valid = predictor_scores(head, valid_rows(prep)).softmax(1)
            d = valid_rows(prep).shape[1]
            scorers[f"{setting.name}_s{seed}"] = {
                "scores": head_scores(head, prep), "cost": head_flops(head, d) / tflops, "reuse_identity": True,
                "margin": choose_margin(valid, tables["losses_valid"], ident), "head": head}
            facts[f"{setting.name}_s{seed}"] = {"seconds": secs, "setting": dataclasses.asdict(setting),
                                                **{k: v for k, v in hist[-1].items() if k.startswith("valid_")}}
            print(f"  {setting.name} s{seed}: {secs:.0f} s, valid rho {hist[-1]['valid_spearman_rho']:.3f} "
                  f"(prior {hist[-1]['valid_prior_rho']:.3f}), chosen loss {hist[-1]['valid_chosen_loss']:.3f} "
                  f"(identity {hist[-1]['valid_identity_loss']:.3f}, prior {hist[-1]['valid_prior_loss']:.3f})", flush=True)
    return scorers, facts


def parse_head(text: str) -> HeadSetting:
    """``NAME:KEY=VALUE,...`` over HeadSetting's fields (e.g. ``h512:hidden=512``, ``c8:copies=8``)."""
    name, _, spec = text.partition(":")
    fields = {f.name: f for f in dataclasses.fields(HeadSetting)}
    changes: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in fields or key == "name":
            raise SystemExit(f"head {text!r}: unknown key {key!r}; known: {', '.join(f for f in fields if f != 'name')}")
        changes[key] = type(getattr(HeadSetting(name), key))(value)
    return dataclasses.replace(HEADS.get(name.split("@")[0], HeadSetting(name)), name=name, **changes)


def pooled(rows: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Mean and sample std over the seeds of ``prefix_s<seed>/<selection>`` rows, per selection."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, r in rows.items():
        base, _, sel = name.partition("/")
        if base.rsplit("_s", 1)[0] == prefix and sel:
            groups.setdefault(sel, []).append(r)
    out = {}
    for sel, rs in groups.items():
        stat = {}
        for key in ("clean", "mce", "c_nll", "passes"):
            v = torch.tensor([r[key] for r in rs], dtype=torch.float64)
            stat[key] = float(v.mean())
            stat[key + "_std"] = float(v.std()) if len(rs) > 1 else 0.0
            stat[key + "_runs"] = [round(float(x), 4) for x in v]
        out[sel] = stat
    return out


def check_against_method(prep: dict[str, Any], head: torch.nn.Module, margin: float, k: int, offline: dict[str, Any]) -> dict[str, Any]:
    """The registered learned_features + abstain on every test set, against the offline numbers."""
    from dev_study import eval_sets as sets_of
    data = prep["data"]
    method = build_method("feat_pick", prep["model"], candidates=prep["tables"]["candidates"], k=k,
                          predictor=head, selection="abstain", threshold=margin, batch_size=1024, device="cpu")
    res = evaluate_methods({"m": method}, sets_of(data, list(BENCHMARK), prep["severities"], data["x_te"].device), progress=False)
    diffs = [abs(r.error - offline["per_set"][r.corruption if r.corruption == CLEAN else f"{r.corruption}/{r.severity}"]["error"])
             for r in res.records]
    summary = res.summary(list(BENCHMARK), [], None)["m"]
    return {"max_error_diff": max(diffs), "method_mce": summary["mean_corruption_error"], "offline_mce": offline["mce"],
            "method_passes": summary["forward_passes"], "offline_passes": offline["passes"]}


def fmt(stat: dict[str, Any], key: str) -> str:
    return f"{stat[key]:.2f} +- {stat[key + '_std']:.2f}" if key + "_std" in stat else f"{stat[key]:.2f}"


def analyse(args: argparse.Namespace, device: torch.device, data: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {"device": platform.processor() or "cpu", "torch": torch.__version__, "arch": args.arch,
                              "epochs": args.epochs, "k": args.k, "heads": args.heads, "head_seeds": args.head_seeds,
                              "trunk_seeds": args.trunk_seeds, "modes": {}}
    for mode in args.modes:
        prep = prepare(args, device, data, mode, "b")
        prep["data"], prep["severities"] = data, args.severities
        print(f"[{mode}] variants", flush=True)
        scorers, facts = scorers_for(prep, args)
        rows = method_rows(prep, scorers, args.k)
        summary = {"none": rows["none"], "prior": rows["prior"], "oracle": rows["oracle"]}
        prefixes = sorted({name.rsplit("_s", 1)[0] for name in scorers})
        for prefix in prefixes:
            for sel, stat in pooled(rows, prefix).items():
                summary[f"{prefix}/{sel}"] = stat
        first = args.head_seeds[0]
        diag = {name: diagnose(prep, sc["scores"], args.k) for name, sc in scorers.items()
                if name in {f"{h}_s{first}" for h in args.heads} or name.startswith("trunk")}
        diag["prior"] = diagnose(prep, {lab: prior_scores(prep["tables"]["losses_train"]).softmax(0).expand(t["probs"].shape[0], -1)
                                        for lab, t in prep["test"]["sets"].items()}, args.k)
        best = min((n for n in summary if n.split("/")[0] in args.heads and n.endswith("/abstain")),
                   key=lambda n: summary[n]["mce"], default=None)
        check = None
        if best is not None and args.check:
            s0 = f"{best.split('/')[0]}_s{args.head_seeds[0]}"
            check = check_against_method(prep, scorers[s0]["head"], scorers[s0]["margin"]["margin"], args.k, rows[f"{s0}/abstain"])
        report["modes"][mode] = {
            "best_abstain": best, "target": prep["info"], "facts": facts, "margins": {n: sc["margin"] for n, sc in scorers.items()},
            "summary": {n: {k: v for k, v in r.items() if k != "per_set"} for n, r in summary.items()},
            "runs": {n: {k: v for k, v in r.items() if k != "per_set"} for n, r in rows.items()},
            "per_set": {n: r["per_set"] for n, r in rows.items()},
            "diagnosis": diag, "check": check,
        }
        one = {**{k: v for k, v in report.items() if k != "modes"}, "mode": mode, **report["modes"][mode]}
        write_json(args.out_dir / f"learned_choice_{mode}.json", one)
        write_markdown(args.out_dir / f"learned_choice_{mode}.md", one, args)
        print_mode(mode, report["modes"][mode])
    return report


def _pm(stat: dict[str, Any], key: str) -> str:
    return f"{stat[key]:.2f} ± {stat[key + '_std']:.2f}" if stat.get(key + "_runs") and len(stat[key + "_runs"]) > 1 else f"{stat[key]:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def write_markdown(path: Path, r: dict[str, Any], args: argparse.Namespace) -> None:
    """The mode's tables: methods, diagnosis per family, calibration, learning curve."""
    t = r["target"]
    lines = [f"# Does the learned choice earn its cost? {r['arch']} target, mode {r['mode']} (dev sample, CPU)", "",
             f"Target: {r['epochs']} epochs, clean test error {100 * t['clean_error']:.2f}%. k = {r['k']}. "
             f"Errors in % on the 623 held-out images; corr. = mean over the 15 benchmark corruptions x 5 severities; "
             f"± = sample std over seeds ({', '.join(map(str, r['head_seeds']))}) of the predictor (the target is fixed); "
             "passes = target forward passes per image, predictors counted by their FLOPs.", "",
             "| method | clean | corr. (15) | corr. NLL | passes |", "|---|---|---|---|---|"]
    names = {"none": "none", "prior": "prior (fixed top-k)", "oracle": "oracle (per-image best k, needs labels)"}
    for name, st in r["summary"].items():
        base, _, sel = name.partition("/")
        if base not in (*names, *args.heads) and not base.startswith("trunk"):
            continue
        label = names.get(name) or ("learned (the paper's trunk predictor)" if base == "trunk" and sel == "topk"
                                    else f"{base} + {sel}")
        lines.append(f"| {label} | {_pm(st, 'clean')} | {_pm(st, 'mce')} | {st['c_nll']:.3f} | {_pm(st, 'passes')} |")
    lines += ["", "`head_*`: issue 22's `feat_pick` (a head on the frozen target's pooled features and logits); "
              "`/topk` its k best, `/abstain` identity alone unless the predicted gain exceeds the margin chosen on "
              "valid_loss. `head_listwise` is trained with the listwise objective (softmin CE, tau 1), `head_sodeep` "
              "with the paper's SoDeep-style objective.", ""]
    if r.get("check"):
        c = r["check"]
        lines += [f"Check: `{r['best_abstain']}` seed {r['head_seeds'][0]} re-run through the registered "
                  f"`feat_pick` + `abstain` on every set: corr. {c['method_mce']:.2f} (tables {c['offline_mce']:.2f}), "
                  f"passes {c['method_passes']:.3f} (tables {c['offline_passes']:.3f}), largest per-set error difference "
                  f"{c['max_error_diff']:.3f} points.", ""]
    fams = [CLEAN, *FAMILIES.keys() - {"extra"}]
    lines += ["## Diagnosis (seed 0): what the top-1 recovers of the oracle's gain, per family", "",
              "loss / error rec. = (identity - top-1 pick) / (identity - oracle's pick), in mean loss and in error; "
              "top-k rec. the same for the top-k average's error; hit = top-1 is the oracle's; in top-k = the oracle's "
              "candidate is among the k picked; help / harm = top-k right where identity is wrong / wrong where identity "
              "is right; 1-right k-wrong = top-1 view right but the k-average wrong; corr = Pearson of predicted vs "
              "realised gain of the top-1 over identity.", "",
              "| scorer | family | loss rec. | error rec. | top-k rec. | hit | in top-k | help | harm | 1-right k-wrong | corr |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for scorer, d in r["diagnosis"].items():
        for fam in fams:
            if fam not in d:
                continue
            f = d[fam]
            corr = "-" if f["gain_corr"] is None else f"{f['gain_corr']:.2f}"
            lines.append(f"| {scorer} | {fam} | {_pct(f['loss_recovered'])} | {_pct(f['error_recovered'])} | "
                         f"{_pct(f['topk_error_recovered'])} | {f['top1_hit']:.3f} | {f['oracle_in_topk']:.3f} | "
                         f"{100 * f['help']:.1f} | {100 * f['harm']:.1f} | {100 * f['top1_right_topk_wrong']:.1f} | {corr} |")
    lines += ["", "## Calibration of the scores (seed 0, all corrupted sets): quintiles of the predicted gain", "",
              "| scorer | quintile | predicted gain | realised loss gain | top-1 score | top-1 hit rate |", "|---|---|---|---|---|---|"]
    for scorer, d in r["diagnosis"].items():
        if scorer == "prior":
            continue
        cal = _pooled_calibration(d)
        for i, b in enumerate(cal):
            lines.append(f"| {scorer} | {i + 1} | {b['pred_gain']:.3f} | {b['true_gain']:.3f} | {b['p_top1']:.3f} | {b['top1_hit']:.3f} |")
    curve = [n for n in r["summary"] if n.split("/")[0] in {c.split(':')[0] for c in args.curve} | {"head_listwise"}]
    if any(n.split("/")[0] != "head_listwise" for n in curve):
        lines += ["", "## Learning curve and width (head_listwise, seed 0 unless pooled)", "",
                  "| setting | valid rho | valid chosen loss | topk clean | topk corr. | abstain clean | abstain corr. | abstain passes |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in ["head_listwise", *(c.split(":")[0] for c in args.curve)]:
            tk, ab = r["summary"].get(f"{name}/topk"), r["summary"].get(f"{name}/abstain")
            fact = r["facts"].get(f"{name}_s{r['head_seeds'][0]}")
            if tk is None or ab is None or fact is None:
                continue
            spec = next((c for c in args.curve if c.split(":")[0] == name), "copies=3, hidden=128, tau=1 (base)")
            lines.append(f"| {name} ({spec.partition(':')[2] or spec}) | {fact['valid_spearman_rho']:.3f} | "
                         f"{fact['valid_chosen_loss']:.3f} | {_pm(tk, 'clean')} | {_pm(tk, 'mce')} | {_pm(ab, 'clean')} | "
                         f"{_pm(ab, 'mce')} | {_pm(ab, 'passes')} |")
    path.write_text("\n".join(lines) + "\n")


def _pooled_calibration(d: dict[str, Any]) -> list[dict[str, float]]:
    """Calibration quintiles averaged over the four corruption families (each family's quintiles are equal-sized)."""
    fams = [f for f in ("noise", "blur", "weather", "digital") if f in d]
    return [{k: sum(d[f]["calibration"][i][k] for f in fams) / len(fams) for k in d[fams[0]]["calibration"][i]}
            for i in range(len(d[fams[0]]["calibration"]))]


def print_mode(mode: str, r: dict[str, Any]) -> None:
    print(f"\n[{mode}] {'method':<28}{'clean':>16}{'corr(15)':>16}{'c-NLL':>8}{'passes':>14}")
    for name, s in r["summary"].items():
        print(f"[{mode}] {name:<28}{fmt(s, 'clean'):>16}{fmt(s, 'mce'):>16}{s['c_nll']:>8.3f}{fmt(s, 'passes'):>14}")
    if r["check"]:
        print(f"[{mode}] check (registered learned_features vs the tables): {r['check']}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help=".npz with x_train (uint8 NHWC 32x32) and y_train")
    ap.add_argument("--modes", nargs="+", default=["standard", "augmix"])
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--epochs", type=int, default=20, help="target epochs")
    ap.add_argument("--test-fraction", type=float, default=0.15)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--trunk-seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--head-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--extra-copies", type=int, default=5, help="copies beyond the 3 of the loss dataset (learning curve to 8)")
    ap.add_argument("--heads", nargs="+", default=["head_listwise", "head_sodeep"],
                    help="feature-head settings: a name of HEADS or NAME:KEY=VALUE,... (hidden, copies, objective, tau, epochs, lr)")
    ap.add_argument("--curve", nargs="*", default=CURVE, help="head settings trained at the first seed on --curve-modes")
    ap.add_argument("--curve-modes", nargs="*", default=["standard"])
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip re-running the best variant through the registered method")
    ap.add_argument("--prepare-only", action="store_true", help="build the cached targets, tables and trunk predictors, then stop")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", type=Path, default=Path("learned_choice/cache"))
    ap.add_argument("--out-dir", type=Path, default=Path("learned_choice"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    args.cache.mkdir(parents=True, exist_ok=True)
    data = load_sample(args.data, args.test_fraction, device)
    if args.prepare_only:
        for phase in ("a", "b"):
            for mode in args.modes:
                prepare(args, device, data, mode, phase)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    analyse(args, device, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
