"""The benchmark scripts, on CPU with tiny data: they are run on a lent GPU in a few 10-minute calls
(``benchmarks/gpu_session.sh``), where a typo in a flag or a crash after training costs the call.

Two guards: every invocation in gpu_session.sh parses against its script's own command line and
names only registered architectures, modes, corruptions and methods; and the scripts that part
runs go end to end here at toy size, writing their JSON with finite figures.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ltta.config import ParamsError
from ltta.corruptions import ALL_CORRUPTIONS
from ltta.models import MODELS
from ltta.predictor.trainer import PredictorConfig
from ltta.training.modes import TRAIN_MODES
from ltta.tta import TTA_METHODS

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
POLICY = BENCH / "results" / "faa_policy_cifar10dev_h100.json"


def load_script(name: str) -> ModuleType:
    """A benchmark script as a module (they are scripts, not a package; each puts src/ on the path)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # predictor_ablation imports dev_study by name
    spec.loader.exec_module(module)
    return module


def gpu_session_invocations(out: Path, data: Path) -> list[tuple[str, list[str]]]:
    """(script, argv) for every ``python benchmarks/<script>.py ...`` in gpu_session.sh, its shell
    variables ($out, $data, $policy) replaced and continuation lines joined."""
    text = (BENCH / "gpu_session.sh").read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        m = re.search(r"python benchmarks/(\w+)\.py(.*)$", line)
        if not m:
            continue
        args = m.group(2).replace('"$out', f'"{out}').replace('"$data"', str(data)).replace('"$policy"', str(POLICY))
        calls.append((m.group(1), shlex.split(args)))
    return calls


def test_gpu_session_invocations_parse(tmp_path: Path) -> None:
    calls = gpu_session_invocations(tmp_path, tmp_path / "sample.npz")
    scripts = {s for s, _ in calls}
    assert {"train_throughput", "eval_throughput", "corruption_throughput", "dev_study", "predictor_ablation"} <= scripts
    for script, argv in calls:
        module = load_script(script)
        args = module.build_parser().parse_args(argv)  # exits (SystemExit) on an unknown or malformed flag
        for arch in getattr(args, "archs", None) or [getattr(args, "arch", "small_cnn")]:
            assert arch in MODELS.names(), (script, arch)
        for mode in getattr(args, "modes", None) or [getattr(args, "mode", "standard")]:
            assert mode in TRAIN_MODES.names(), (script, mode)
        assert set(getattr(args, "corruptions", [])) <= set(ALL_CORRUPTIONS), script
        assert set(getattr(args, "methods", None) or []) <= set(TTA_METHODS.names()), script
        for variant in getattr(args, "variants", []):
            module.parse_variant(variant, PredictorConfig(), 16)  # raises on an unknown key or value
        if getattr(args, "policy", None) is not None:
            assert Path(args.policy).is_file(), (script, args.policy)
        if script == "dev_study":  # its --set composes into both recipes: a bad key fails here, not after training
            module.predictor_recipe(args)
            for mode in args.modes:
                module.study_recipe(mode, args)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-shaped .npz (uint8 NHWC 32x32, 10 classes): class-dependent colour plus noise, so a
    target learns something in one epoch."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 12)
    base = rng.integers(40, 215, size=(10, 1, 1, 3))
    x = np.clip(base[y] + rng.normal(0, 40, size=(len(y), 32, 32, 3)), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("bench") / "sample.npz"
    np.savez(path, x_train=x, y_train=y)
    return path


def finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_dev_study_end_to_end(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    methods = ["none", "flip", "policy", "learned", "prior", "oracle"]
    rc = load_script("dev_study").main([
        "--data", str(sample), "--arch", "small_cnn", "--epochs", "1", "--modes", "standard",
        "--policy", str(POLICY), "--set", "train_predictor.epochs=1", "train_predictor.width=4",
        "train_predictor.batch_size=64",
        "--corruptions", "gaussian_noise", "fog", "--severities", "1", "--methods", *methods,
        "--device", "cpu", "--out-dir", str(out),
    ])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "dev_study.json").read_text())
    assert set(report["modes"]) == {"standard"}
    assert (report["predictor_config"]["width"], report["predictor_config"]["batch_size"]) == (4, 64)
    for mode, row in report["modes"].items():
        assert (out / f"results_{mode}.md").is_file()
        assert set(row["summary"]) == set(methods)
        for s in row["summary"].values():
            assert finite(s["clean_error"]) and 0 <= s["clean_error"] <= 100
            assert finite(s["mean_corruption_error"])
        assert len(row["prior_candidates"]) == 3
        assert finite(row["predictor"]["valid_spearman_rho"])
        # the oracle takes each image's lowest-loss view, so its NLL is at most any single view's (its
        # error need not be: a view can raise the true class's probability without making it the top one)
        assert row["summary"]["oracle"]["clean_nll"] <= row["summary"]["none"]["clean_nll"]


def test_dev_study_refuses_bad_predictor_settings_before_training(sample: Path, tmp_path: Path) -> None:
    study = load_script("dev_study")
    with pytest.raises(SystemExit, match="SoDeep"):
        study.main(["--data", str(sample), "--set", "train_predictor.ranker=sodeep", "--out-dir", str(tmp_path / "a")])
    with pytest.raises(ParamsError, match="train_predictor.batch_size"):
        study.main(["--data", str(sample), "--set", "train_predictor.batch_size=0", "--out-dir", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dev_study_seed_reaches_target_and_predictor(sample: Path) -> None:
    study = load_script("dev_study")
    for seed in (0, 3):
        args = study.build_parser().parse_args(["--data", str(sample), "--set", f"seed={seed}"])
        assert study.study_recipe("standard", args).seed == seed
        assert study.predictor_recipe(args)[0].seed == seed


def test_predictor_ablation_end_to_end(sample: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "ablation", tmp_path / "cache"
    argv = [
        "--data", str(sample), "--epochs", "1", "--predictor-epochs", "1", "--predictor-width", "4",
        "--variants", "paper", "small:batch_size=64,cutout=0", "--eval", "--selections", "topk", "eval_l2t",
        "--corruptions", "gaussian_noise", "--severities", "1", "--device", "cpu", "--cache", str(cache),
        "--out-dir", str(out),
    ]  # fmt: skip
    ablation = load_script("predictor_ablation")
    assert ablation.main(argv) == 0
    first = json.loads(next(out.glob("*.json")).read_text())
    cached = sorted(p.name for p in cache.iterdir())
    assert ablation.main(argv) == 0  # the second run takes the target and both predictors from the cache
    assert sorted(p.name for p in cache.iterdir()) == cached
    again = json.loads(next(out.glob("*.json")).read_text())
    for name, row in first["variants"].items():  # same predictors, so the same figures (only timings differ)
        assert again["variants"][name]["valid"] == row["valid"]
        assert again["variants"][name]["seconds"] == row["seconds"]  # the training time stored in the cache
        for sel, ev in row["eval"].items():
            assert again["variants"][name]["eval"][sel]["clean_error"] == ev["clean_error"]


def test_predictor_ablation_refuses_policy_mode(sample: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        load_script("predictor_ablation").main(["--data", str(sample), "--mode", "policy", "--out-dir", str(tmp_path)])
    assert exc.value.code == 2


def test_throughput_scripts_end_to_end(tmp_path: Path) -> None:
    train_json, eval_json = tmp_path / "train.json", tmp_path / "eval.json"
    assert load_script("train_throughput").main([
        "--archs", "small_cnn", "--n", "64", "--epochs", "2", "--batch-size", "32", "--no-compile",
        "--ceiling-seconds", "0.2", "--device", "cpu", "--out", str(train_json),
    ]) == 0  # fmt: skip
    rows = json.loads(train_json.read_text())["rows"]
    assert {r["mode"] for r in rows} == set(TRAIN_MODES.names())
    for r in rows:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["ceiling_images_per_s"] > 0
    assert load_script("eval_throughput").main([
        "--n", "32", "--sets", "1", "--batch-size", "32", "--predictor-width", "4", "--ceiling-seconds", "0.2",
        "--device", "cpu", "--out", str(eval_json),
    ]) == 0  # fmt: skip
    methods = json.loads(eval_json.read_text())["methods"]
    assert {"none", "learned", "oracle"} <= set(methods)
    assert all(m["images_per_s"] > 0 for m in methods.values())
