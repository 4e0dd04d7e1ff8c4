"""`ltta compare` on evaluate runs logged to a real MLflow store (SQLite in a temp dir): the long
table keeps a method's runs together, `--by` gives mean ± sd per group, and every selection that
matches nothing says what to do. (The dvc exp grid read back end to end: tests/test_team.py.)"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from ltta.cli import main
from ltta.compare import EvalRun, find_runs, grouped, protocol_differences, render_grouped, render_long

#: (study, dvc exp name, learned's and none's corruption error) of the runs the store holds.
RUNS = [("standard", "s0", 50.0, 60.0), ("standard", "s1", 52.0, 61.0), ("augmix", "a0", 40.0, 45.0)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    import mlflow

    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ltta", artifact_location=str(root / "artifacts"))
    ids = []
    for study, name, learned, none in RUNS:
        run = client.create_run(exp, run_name="evaluate", tags={"ltta.stage": "evaluate", "ltta.study": study,
                                                                "ltta.profile": "digits", "ltta.dvc_exp": name})
        for method, err in (("none", none), ("learned", learned)):
            for key, value in (("mean_corruption_error", err), ("clean_error", err / 10), ("forward_passes", 1.0)):
                client.log_metric(run.info.run_id, f"{method}.{key}", value)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    other = client.create_run(exp, run_name="train_target", tags={"ltta.stage": "train_target"})
    client.set_terminated(other.info.run_id)
    return uri, [*ids, other.info.run_id]


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def test_only_evaluate_runs_are_read_oldest_first(store: tuple[str, list[str]]) -> None:
    uri, ids = store
    runs = find_runs(_client(uri))
    assert [r.run_id for r in runs] == ids[:3]
    assert [r.label for r in runs] == ["s0", "s1", "a0"]
    assert runs[0].metrics["learned"]["mean_corruption_error"] == 50.0


def test_long_table_keeps_a_methods_runs_together(store: tuple[str, list[str]]) -> None:
    text = render_long(find_runs(_client(store[0])), "markdown")
    lines = text.splitlines()
    assert lines[2].startswith("| none | s0 | 6.00 | 60.00 | n/a |") and lines[3].startswith("|  | s1 |")
    assert lines[5].startswith("| learned | s0 | 5.00 | 50.00 |")
    rows = json.loads(render_long(find_runs(_client(store[0])), "json"))
    assert len(rows) == 6 and rows[0]["extra_error"] is None


def test_by_study_gives_mean_and_sample_sd_per_group(store: tuple[str, list[str]]) -> None:
    runs = find_runs(_client(store[0]))
    groups, table = grouped(runs, "study", "mean_corruption_error")
    assert groups == ["standard", "augmix"]
    assert table["learned"]["standard"].mean == 51.0 and table["learned"]["standard"].n == 2
    assert table["learned"]["standard"].sd == pytest.approx(statistics.stdev([50.0, 52.0]))
    assert table["learned"]["augmix"].sd is None
    text = render_grouped(runs, "study", "mean_corruption_error", "markdown")
    assert "| method \\ study | standard (n=2) | augmix (n=1) |" in text and "| learned | 51.00 ± 1.41 | 40.00 |" in text
    csv_text = render_grouped(runs, "study", "mean_corruption_error", "csv")
    assert csv_text.splitlines()[0] == "method,standard_mean,standard_sd,standard_n,augmix_mean,augmix_sd,augmix_n"


def test_selection_by_run_id_and_dvc_exp(store: tuple[str, list[str]]) -> None:
    uri, ids = store
    assert [r.label for r in find_runs(_client(uri), run_ids=[ids[2], ids[0]])] == ["s0", "a0"]
    assert [r.label for r in find_runs(_client(uri), dvc_exps=["a0"])] == ["a0"]
    assert [r.label for r in find_runs(_client(uri), filter_string="tags.`ltta.study` = 'augmix'")] == ["a0"]


@pytest.mark.parametrize("kwargs, says", [
    ({"experiments": ["nope"]}, "no MLflow experiment named 'nope'"),
    ({"dvc_exps": ["missing"]}, "no evaluate run is tagged ltta.dvc_exp='missing'"),
    ({"filter_string": "tags.`ltta.study` = 'none-such'"}, "no evaluate runs match"),
])
def test_a_selection_that_matches_nothing_says_so(store: tuple[str, list[str]], kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        find_runs(_client(store[0]), **kwargs)


def test_a_run_that_is_not_an_evaluation_is_refused(store: tuple[str, list[str]]) -> None:
    uri, ids = store
    with pytest.raises(ValueError, match="is not an evaluate run"):
        find_runs(_client(uri), run_ids=[ids[3]])
    with pytest.raises(ValueError, match="no run has the metric 'nll'"):
        grouped(find_runs(_client(uri)), "study", "nll")


def test_cli_writes_the_table_and_fails_in_one_line(store: tuple[str, list[str]], tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    monkeypatch.chdir(tmp_path)  # no params.yaml here: compare needs none
    assert main(["compare", "--by", "study", "--format", "json", "--out", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["table"]["none"]["augmix"]["mean"] == 45.0
    assert main(["compare", "--dvc-exp", "missing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: compare: no evaluate run is tagged") and len(err.strip().splitlines()) == 1


def _run(label: str, **protocol: str) -> EvalRun:
    return EvalRun(label, label, {f"ltta.protocol.{k.replace('__', '.')}": v for k, v in protocol.items()}, {})


def test_protocol_differences_name_each_field_and_ignore_what_names_the_model() -> None:
    same = {"corrupted__source": "official", "corrupted__md5": "abc", "methods__tent__batch_size": "200"}
    a = _run("a", **same, target__md5="1", target__source="models/target.pt", seed="0")
    b = _run("b", **same, target__md5="2", target__source="torchvision:resnet50", seed="1")
    assert protocol_differences([a, b]) == []  # another target (or seed) is what a comparison compares
    c = _run("c", **{**same, "corrupted__source": "generated", "methods__tent__batch_size": "512"})
    assert protocol_differences([a, c]) == ["corrupted.source: a=official; c=generated",
                                            "methods.tent.batch_size: a=200; c=512"]
    d = _run("d", corrupted__source="official", corrupted__md5="abc")  # evaluated no tent: nothing to disagree on
    assert protocol_differences([a, d]) == []
    old = EvalRun("old", "old", {}, {})  # a run from before the record: every field is unknown for it
    assert "corrupted.md5: a=abc; old=(not recorded)" in protocol_differences([a, old])


def test_cli_warns_on_stderr_when_protocols_differ(tmp_path: Path, monkeypatch, capsys) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ltta", artifact_location=str(tmp_path / "artifacts"))
    for source in ("official", "generated"):
        run = client.create_run(exp, run_name="evaluate", tags={"ltta.stage": "evaluate", "ltta.study": source,
                                                                "ltta.protocol.corrupted.source": source})
        client.log_metric(run.info.run_id, "none.mean_corruption_error", 10.0)
        client.set_terminated(run.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["compare"]) == 0
    captured = capsys.readouterr()
    assert "| none |" in captured.out and "warning: these runs were evaluated under different protocols" in captured.err
    assert "corrupted.source:" in captured.err and "=official" in captured.err and "=generated" in captured.err
