"""The stages run for real on tiny digits data, end to end, and each output follows its inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ltta.config import parse_params
from ltta.evaluation.runner import DVC_METRIC_KEYS
from ltta import tracking
from ltta.stages import build_loss_dataset, evaluate, prepare_data, train_target
from ltta.stages.base import Paths
from tests.conftest import tiny_params



def digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".npz":  # npz zip headers carry timestamps: hash the arrays
            with np.load(f) as z:
                for k in sorted(z.files):
                    h.update(k.encode() + z[k].tobytes())
        else:
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pipeline_run(tiny_pipeline: tuple[Path, dict]) -> tuple[Paths, dict]:
    """The session's tiny pipeline; the stages these tests run log to its MLflow store too."""
    import os

    root, raw = tiny_pipeline
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    return Paths(root), raw


def test_every_stage_writes_its_outputs(pipeline_run: tuple[Paths, dict]) -> None:
    paths, raw = pipeline_run
    for p in [paths.prepared / "train.npz", paths.prepared / "meta.json", paths.corrupted / "labels.npy",
              paths.target, paths.loss_data / "train.npz", paths.predictor, paths.policy, paths.gps_policy,
              paths.root / "models" / "aggregation_aug.pt", paths.root / "models" / "aggregation_class.pt",
              paths.plots / "gps_search.csv", paths.reports / "gps_search.md", paths.reports / "aggregation.md",
              paths.reports / "eval.json", paths.reports / "results.md", paths.plots / "eval_severity.csv"]:
        assert p.exists(), p
    for name in raw["corruptions"]["names"]:
        x = np.load(paths.corrupted / f"{name}.npy", mmap_mode="r")
        assert x.shape[0] == 5 * len(np.load(paths.corrupted / "labels.npy")) // 5 and x.dtype == np.uint8
    report = (paths.reports / "results.md").read_text()
    for method in raw["evaluate"]["methods"]:
        assert f"| {method}" in report
    assert "learned selection" in report and "topk" in report  # how learned picked its views
    metrics = json.loads((paths.reports / "eval.json").read_text())
    assert set(metrics["summary"]) == set(raw["evaluate"]["methods"])
    # The oracle is an upper bound: never worse than no TTA on the clean set.
    assert metrics["summary"]["oracle"]["clean_error"] <= metrics["summary"]["none"]["clean_error"]
    # DVC's view: a small file per method (a row each in `dvc metrics show`), the same numbers under short keys.
    files = sorted(p.name for p in (paths.metrics / "tta").iterdir())
    assert files == sorted(f"{m}.json" for m in raw["evaluate"]["methods"])
    for method in raw["evaluate"]["methods"]:
        row = json.loads((paths.metrics / "tta" / f"{method}.json").read_text())
        assert list(row) == ["clean", "mce", "extra", "c_nll", "c_ece", "passes"], row
        for short, long in DVC_METRIC_KEYS.items():
            if short in row:
                assert row[short] == metrics["summary"][method][long], (method, short)
    assert json.loads((paths.metrics / "target.json").read_text()).keys() == {"test_err"}
    assert json.loads((paths.metrics / "predictor.json").read_text()).keys() == {"rho", "top1"}
    assert json.loads((paths.metrics / "feature_head.json").read_text()).keys() == {"rho", "top1"}
    assert json.loads((paths.metrics / "search.json").read_text()).keys() == {"score"}
    assert sorted(p.name for p in paths.metrics.iterdir()) == ["feature_head.json", "predictor.json", "search.json", "target.json", "tta"]
    assert not list(paths.root.rglob("*.tmp")) and not list(paths.root.rglob(".*.partial"))


def test_every_result_carries_its_protocol_record(pipeline_run: tuple[Paths, dict]) -> None:
    import mlflow
    import torch

    paths, raw = pipeline_run
    record = json.loads((paths.reports / "eval.json").read_text())["protocol"]
    assert record["name"] == "ltta" and record["data"]["source"] == "digits"
    assert record["data"]["test_md5"] == tracking.file_md5(paths.prepared / "test.npz")
    assert record["corrupted"] == {"source": "generated", "seed": raw["seed"]}
    assert record["target"]["md5"] == tracking.file_md5(paths.target) and record["target"]["source"].endswith("target.pt")
    assert record["target"]["origin"] == "trained here"
    assert record["target"]["input"].startswith("RGB float [0,1]") and len(record["target"]["normalisation"]["mean"]) == 3
    assert record["images_per_cell"] == {"clean": 100, "corrupted": 100}
    assert record["severities"] == raw["evaluate"]["severities"] and record["corruptions"] == raw["corruptions"]["names"]
    assert record["methods"]["tent"] == {"batch_size": raw["evaluate"]["batch_size"],
                                         "reset": "model and optimiser before each set"}
    assert record["methods"]["flip"]["reset"] == "stateless"
    assert record["seed"] == raw["seed"] and record["environment"]["device"] == "cpu"
    assert record["environment"]["torch"] == torch.__version__ and len(record["stream_md5"]) == 32
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{paths.root / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(raw["tracking"]["experiment"]).experiment_id],
                             "tags.`ltta.stage` = 'evaluate'", order_by=["attributes.start_time ASC"])[0]  # the pipeline's
    assert run.data.tags["ltta.protocol.corrupted.source"] == "generated"
    assert run.data.tags["ltta.protocol.methods.tent.batch_size"] == str(raw["evaluate"]["batch_size"])
    assert json.loads(run.data.tags["ltta.protocol.severities"]) == raw["evaluate"]["severities"]


def test_outputs_follow_inputs(pipeline_run: tuple[Paths, dict], tmp_path: Path) -> None:
    """No stage is a stub: change a stage's params and its output changes."""
    paths, raw = pipeline_run
    import shutil

    other = Paths(tmp_path)
    shutil.copytree(paths.prepared, other.prepared)
    shutil.copytree(paths.corrupted, other.corrupted)
    changed = tiny_params(train_target={"epochs": 1}, loss_dataset={"p_aug": 0.0})
    params = parse_params(changed)
    train_target.run(params, other)
    assert digest(other.target) != digest(paths.target)
    build_loss_dataset.run(params, other)
    assert digest(other.loss_data) != digest(paths.loss_data)


def test_prepare_data_follows_the_seed(pipeline_run: tuple[Paths, dict], tmp_path: Path) -> None:
    paths, _ = pipeline_run
    other = Paths(tmp_path)
    prepare_data.run(parse_params(tiny_params(seed=1)), other)
    assert digest(other.prepared) != digest(paths.prepared)
    assert digest(other.corrupted) != digest(paths.corrupted)


def test_policy_mode_trains_with_the_searched_policy(pipeline_run: tuple[Paths, dict], tmp_path: Path) -> None:
    """train_target.mode policy reads train_target.policy (here the search's output) and changes the target."""
    import shutil

    from ltta.config import ParamsError

    paths, _ = pipeline_run
    other = Paths(tmp_path)
    shutil.copytree(paths.prepared, other.prepared)
    other.policy.parent.mkdir(parents=True)
    shutil.copy(paths.policy, other.policy)
    policy_params = {"mode": "policy", "policy": "policies/faa.json", "cutout": 8}
    train_target.run(parse_params(tiny_params(train_target=policy_params)), other)
    assert digest(other.target) != digest(paths.target)
    with pytest.raises(ParamsError, match="train_target.policy"):
        parse_params(tiny_params(train_target={"mode": "policy"}))
    other.policy.unlink()
    with pytest.raises(FileNotFoundError, match="search_policy"):
        train_target.run(parse_params(tiny_params(train_target=policy_params)), other)


def test_search_logs_one_child_run_per_fold(pipeline_run: tuple[Paths, dict]) -> None:
    """search_policy: a child MLflow run per fold holding its trial scores as steps, and the score figure."""
    import mlflow

    paths, raw = pipeline_run
    assert (paths.plots / "search_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient(f"sqlite:///{paths.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(raw["tracking"]["experiment"])
    children = client.search_runs([exp.experiment_id], "tags.`ltta.stage` = 'search_policy' and tags.`ltta.fold` != ''")
    folds = raw["search_policy"]["folds"]
    assert sorted(r.data.tags["ltta.fold"] for r in children) == [str(f) for f in range(folds)]
    parent_ids = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(parent_ids) == 1  # all under the stage's run
    history = client.get_metric_history(children[0].info.run_id, "score")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(raw["search_policy"]["trials"]))


def test_prior_method_reads_the_predictors_training_means(pipeline_run: tuple[Paths, dict], tmp_path: Path) -> None:
    """train_predictor stores each candidate's mean training loss; evaluate's 'prior' refuses a file without it."""
    import shutil

    import torch

    from ltta.model_io import load_model_file, save_model_file
    from ltta.predictor.quality import prior_scores

    paths, raw = pipeline_run
    predictor, extra = load_model_file(paths.predictor)
    with np.load(paths.loss_data / "train.npz") as z:
        expected = prior_scores(torch.as_tensor(z["losses"]))
    assert torch.allclose(torch.tensor(extra["prior"]), expected)
    assert "prior" in raw["evaluate"]["methods"]  # in the default table, so the pipeline run above scored it
    other = Paths(tmp_path)
    for src, dst in ((paths.prepared, other.prepared), (paths.corrupted, other.corrupted)):
        shutil.copytree(src, dst)
    for src, dst in ((paths.target, other.target), (paths.policy, other.policy)):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    blob = torch.load(paths.predictor, weights_only=False)
    old = {k: v for k, v in extra.items() if k != "prior"}
    save_model_file(other.predictor, predictor, blob["arch"], blob["kwargs"], extra=old)
    with pytest.raises(ValueError, match="rerun `ltta train-predictor`"):
        evaluate.run(parse_params(tiny_params()), other)
    assert not (other.reports / "eval.json").exists() and not (other.metrics / "tta").exists()
