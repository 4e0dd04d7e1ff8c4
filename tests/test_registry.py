"""The model registry as a team uses it: lineage tags, champion promotion, stages that take a model
by URI, and the one deployable TTA model served by ``mlflow models serve`` on 127.0.0.1.

Everything runs against a real MLflow store (SQLite in a temporary folder) and a real scoring
server; the pipeline's stages run in-process on tiny digits data.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ltta import tracking
from ltta.cli import main as ltta_main
from ltta.config import parse_params
from ltta.model_io import load_model_file
from ltta.promotion import promote
from ltta.runtime import to_float_nchw
from ltta.stages import build_loss_dataset, evaluate, prepare_data, train_predictor, train_target
from ltta.stages.base import Paths
from ltta.tta import build_method
from tests.conftest import free_port, running_server, tiny_params

METHODS = ["none", "learned", "prior"]


def _raw(**evaluate_overrides: object) -> dict:
    return tiny_params(evaluate={"severities": [3], "methods": METHODS, **evaluate_overrides})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Paths, str]]:
    """A tiny pipeline run (no search: no policy method) registering into a fresh SQLite store."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cwd = Path.cwd()
    os.chdir(root)  # the store's artifacts (./mlruns) land in the project, as under dvc repro
    try:
        (root / "dvc.yaml").write_text("stages: {}\n")  # marks the project root for the lineage tags
        params, paths = parse_params(_raw()), Paths(root)
        for stage in (prepare_data, train_target, build_loss_dataset, train_predictor, evaluate):
            stage.run(params, paths)
        yield paths, uri
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def test_registered_versions_trace_back_to_their_dvc_outputs(store: tuple[Paths, str]) -> None:
    paths, uri = store
    client = _client(uri)
    for name, stage, out in (("ltta-target", "train_target", "models/target.pt"),
                             ("ltta-predictor", "train_predictor", "models/predictor.pt")):
        v = client.get_model_version_by_alias(name, "candidate")
        assert v.tags["ltta.dvc_stage"] == stage and v.tags["ltta.dvc_out"] == out
        assert v.tags["ltta.md5"] == tracking.file_md5(paths.root / out)  # dvc.lock's md5 of that output
        assert v.tags["ltta.git_commit"]
    tta = client.get_model_version_by_alias("ltta-tta", "candidate")
    assert tta.tags["ltta.dvc_stage"] == "evaluate" and tta.tags["ltta.dvc_out"] == "reports/eval.json"
    assert tta.tags["ltta.md5"] == tracking.file_md5(paths.reports / "eval.json")
    assert tta.tags["ltta.target_version"] == str(client.get_model_version_by_alias("ltta-target", "candidate").version)
    assert tta.tags["ltta.predictor_md5"] == tracking.file_md5(paths.predictor)
    # The evaluation the version is judged by is its own run's.
    summary = json.loads((paths.reports / "eval.json").read_text())["summary"]
    run = client.get_run(tta.run_id)
    assert run.data.metrics["learned.mean_corruption_error"] == pytest.approx(summary["learned"]["mean_corruption_error"], abs=1e-4)


def _synthetic_version(client, model: str, value: float, metric: str = "learned.mean_corruption_error") -> str:
    """A registered version whose run logged ``metric = value``, with the candidate alias on it."""
    exp = client.get_experiment_by_name("ltta").experiment_id
    run = client.create_run(exp, run_name="evaluate", tags={"ltta.stage": "evaluate"})
    client.log_metric(run.info.run_id, metric, value)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    v = client.create_model_version(model, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                    tags={"ltta.target_version": "1"})
    client.set_registered_model_alias(model, "candidate", v.version)
    return str(v.version)


def test_promote_moves_champion_only_on_a_strict_win(store: tuple[Paths, str]) -> None:
    _, uri = store
    client = _client(uri)
    model = "ltta-tta-synthetic"
    with pytest.raises(ValueError, match="no version with alias 'candidate'"):
        promote(client, model=model)
    first = _synthetic_version(client, model, 30.0)
    d = promote(client, model=model)
    assert d.promoted and d.champion_version is None and "first candidate" in d.reason
    assert str(client.get_model_version_by_alias(model, "champion").version) == first
    assert str(client.get_model_version_by_alias("ltta-target", "champion").version) == "1"  # its target follows

    worse = _synthetic_version(client, model, 31.0)
    d = promote(client, model=model)
    assert not d.promoted and (d.candidate_value, d.champion_value) == (31.0, 30.0) and "worse" in d.reason
    assert str(client.get_model_version_by_alias(model, "champion").version) == first
    tags = client.get_model_version(model, worse).tags
    assert tags["ltta.promotion.decision"] == "kept champion" and tags["ltta.promotion.champion_value"] == "30"
    assert "31" in client.get_model_version(model, first).tags["ltta.promotion.last_challenger"]

    tie = _synthetic_version(client, model, 30.0)
    d = promote(client, model=model)
    assert not d.promoted and "tie" in d.reason  # a tie keeps the champion
    better = _synthetic_version(client, model, 29.5)
    d = promote(client, model=model)
    assert d.promoted and d.champion_version == first
    assert str(client.get_model_version_by_alias(model, "champion").version) == better
    assert client.get_model_version(model, better).tags["ltta.promotion.decision"] == "promoted"
    assert tie != better
    # Higher wins in max mode: 31 would now beat 29.5.
    _synthetic_version(client, model, 31.0)
    assert promote(client, model=model, mode="max").promoted

    with pytest.raises(ValueError, match="no metric 'learned.clean_nll'"):
        promote(client, model=model, metric="learned.clean_nll")


def test_evaluate_takes_the_models_from_the_registry(store: tuple[Paths, str], tmp_path: Path, monkeypatch, capsys) -> None:
    """models:/...@champion instead of the files gives the same evaluation; promote then finds a tie."""
    paths, uri = store
    client = _client(uri)
    monkeypatch.chdir(paths.root)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_raw()))
    assert ltta_main(["promote", "--params", str(params_file), "--json", str(tmp_path / "d.json")]) == 0
    first = json.loads((tmp_path / "d.json").read_text())
    assert first["promoted"] and capsys.readouterr().out.startswith("ltta-tta: promoted")

    before = json.loads((paths.reports / "eval.json").read_text())
    by_uri = parse_params(_raw(target="models:/ltta-target@champion", predictor="models:/ltta-predictor@champion"))
    evaluate.run(by_uri, paths)
    after = json.loads((paths.reports / "eval.json").read_text())
    for method in METHODS:
        for key in ("clean_error", "mean_corruption_error", "clean_nll", "forward_passes"):
            assert after["summary"][method][key] == before["summary"][method][key], (method, key)
    again = client.get_model_version_by_alias("ltta-tta", "candidate")
    assert str(again.version) != first["candidate_version"]
    assert again.tags["ltta.target_source"] == "models:/ltta-target@champion"
    assert again.tags["ltta.target_version"] == str(client.get_model_version_by_alias("ltta-target", "champion").version)

    assert ltta_main(["promote", "--params", str(params_file)]) == 0
    line = capsys.readouterr().out
    assert "kept the champion" in line and "a tie" in line  # same figures: a tie keeps the champion

    # build_loss_dataset by URI writes the very table the file gave.
    saved = {s: np.load(paths.loss_data / f"{s}.npz")["losses"] for s in ("train", "valid")}
    build_loss_dataset.run(parse_params(tiny_params(loss_dataset={"target": "models:/ltta-target@champion"})), paths)
    for s, losses in saved.items():
        np.testing.assert_array_equal(np.load(paths.loss_data / f"{s}.npz")["losses"], losses)


def test_a_model_uri_that_does_not_resolve_is_named_with_the_fix(store: tuple[Paths, str]) -> None:
    paths, _ = store
    bad = parse_params(_raw(target="models:/ltta-target@nonexistent"))
    with pytest.raises(ValueError, match="models:/ltta-target@nonexistent cannot be resolved.*promote"):
        evaluate.run(bad, paths)
    with pytest.raises(ValueError, match="neither a model file nor an MLflow model URI"):
        parse_params(_raw(target="s3://bucket/target.pt"))


def _post(url: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def served(store: tuple[Paths, str]) -> Iterator[str]:
    """``mlflow models serve -m models:/ltta-tta@champion`` on 127.0.0.1 (the current interpreter's env)."""
    paths, uri = store
    client = _client(uri)
    try:
        client.get_model_version_by_alias("ltta-tta", "champion")
    except Exception:
        client.set_registered_model_alias("ltta-tta", "champion", client.get_model_version_by_alias("ltta-tta", "candidate").version)
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe), "models", "serve", "-m", "models:/ltta-tta@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    base = f"http://127.0.0.1:{port}"
    with running_server(cmd, base + "/ping", paths.root / "serve.log", cwd=paths.root, env=dict(os.environ, MLFLOW_TRACKING_URI=uri,
                            PATH=f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}")):  # uvicorn beside mlflow
        yield base


@pytest.mark.timeout(300)
def test_served_model_answers_what_evaluate_computes(store: tuple[Paths, str], served: str) -> None:
    paths, uri = store
    client = _client(uri)
    x = np.load(paths.prepared / "test.npz")["x"][:40]  # uint8 [N,32,32,3], the prepared test images
    status, body = _post(served + "/invocations", {"inputs": x.astype(int).tolist()})
    assert status == 200, body
    out = body["predictions"]

    # The learned method exactly as the evaluate stage builds it, on the files of the champion's version.
    champion = client.get_model_version_by_alias("ltta-tta", "champion")
    assert champion.tags["ltta.target_md5"] == tracking.file_md5(paths.target)
    params = parse_params(_raw())
    target, _ = load_model_file(paths.target)
    predictor, pextra = load_model_file(paths.predictor)
    method = build_method("learned", target, candidates=pextra["candidates"], k=params.evaluate.k, predictor=predictor,
                          batch_size=params.evaluate.batch_size, device="cpu", selection=params.evaluate.selection)
    xt = to_float_nchw(x)
    expected = method.predict(xt).numpy()
    np.testing.assert_allclose(np.asarray(out["probabilities"], dtype=np.float32), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["label"]), expected.argmax(1))
    np.testing.assert_array_equal(np.asarray(out["candidates"]), method.selection(xt).numpy())
    # [0,1] floats give the same answer as levels.
    status, unit = _post(served + "/invocations", {"inputs": (x[:5] / 255.0).tolist()})
    assert status == 200 and unit["predictions"]["candidates"] == out["candidates"][:5]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"inputs": np.zeros((2, 16, 32, 3)).tolist()}, "shape"),
        ({"inputs": []}, ""),
        ({"inputs": [[[["a", "b", "c"]]]]}, ""),
        ({"inputs": np.full((1, 32, 32, 3), 300.0).tolist()}, "outside [0, 255]"),
        ({"inputs": np.zeros((1, 32, 32, 3)).tolist(), "params": {"scale": "bogus"}}, "scale 'bogus'"),
    ],
    ids=["wrong-shape", "empty-batch", "strings", "out-of-range", "unknown-scale"],
)
def test_a_bad_request_gets_a_400_with_a_message(served: str, body: dict, says: str) -> None:
    status, answer = _post(served + "/invocations", body)
    assert 400 <= status < 500, (status, answer)
    assert answer.get("message") and says in answer["message"]
    assert "Traceback" not in answer["message"]


def test_the_deployable_model_rebuilds_from_the_registry_in_process(store: tuple[Paths, str]) -> None:
    """mlflow.pyfunc.load_model of the registered URI: no checkout needed, the files travel with it."""
    import mlflow.pyfunc

    paths, uri = store
    import mlflow

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/ltta-tta@candidate")
    x = np.load(paths.prepared / "test.npz")["x"][:4].astype(np.float32)
    out = model.predict(x)
    assert out["probabilities"].shape[0] == 4 and torch.allclose(torch.as_tensor(out["probabilities"]).sum(1), torch.ones(4))
    assert out["candidates"].shape == (4, parse_params(_raw()).evaluate.k)
    sig = model.metadata.signature
    assert sig.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 32, 32, 3)
    assert {o["name"] for o in sig.outputs.to_dict()} == {"probabilities", "label", "candidates"}


@pytest.mark.timeout(300)
def test_the_served_model_takes_a_burst_of_concurrent_requests_without_an_error_or_a_wrong_answer(
        store: tuple[Paths, str], served: str) -> None:
    """32 requests of 4 images, 8 at a time, against the served champion: every answer 200 and equal to
    the in-process model's; latencies are recorded by benchmarks/serving_load.py, not judged here."""
    import mlflow
    import mlflow.pyfunc

    from tests.test_benchmarks import load_script

    paths, uri = store
    mlflow.set_tracking_uri(uri)
    load = load_script("serving_load")
    model = mlflow.pyfunc.load_model("models:/ltta-tta@champion")
    images = np.load(paths.prepared / "test.npz")["x"]
    row = load.run_load(served, model, images, requests=32, concurrency=8, batch=4)
    assert row["errors"] == 0 and row["wrong"] == 0, row
    assert row["requests"] == 32 and row["p99_ms"] >= row["p50_ms"] > 0
