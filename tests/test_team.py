"""The pipeline as a team runs it, with the real tools on 127.0.0.1: a Prefect deployment on a
process work pool whose worker runs the whole flow (every stage through DVC, nested MLflow runs,
promotion, the results table as an artifact); a `dvc exp run` grid over two studies read back by
`ltta compare`; the GPU runner's script (`pipeline/gpu_job.sh`) pushing to a DVC remote that a
second clone pulls from and finds up to date.

One tiny project (a git repo, `conf/` with a `tiny` profile) serves the three, in this order (each
builds on the one before, so the pipeline runs once in full): the worker's run is the baseline
commit; the grid changes one evaluate setting (std: only evaluate reruns) and the study (aug); the
runner's job finds the committed aug experiment up to date and pushes it.

Slow (three pipeline runs in subprocesses, minutes on 2 cores): ``pytest -m slow tests/test_team.py``;
``.ci/run`` runs it beside the kill tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_params

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
EXPERIMENT = "team-grid"
STUDIES = {"std": "standard", "aug": "augmix"}
#: The grid's evaluate setting, other than the baseline's: the std experiment reruns only evaluate.
GRID_OVERRIDE = "evaluate.max_images=80"


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


#: One method per stage that feeds evaluate (and the baseline and the oracle), and four corruptions
#: (one of them an extra, for the "extra" column): the team's tools are under test here, not the
#: methods (conftest's ``tiny_pipeline`` evaluates all of them), and each method and corruption
#: costs seconds in each of the three evaluate runs and in prepare_data.
TEAM_METHODS = ["none", "flip", "policy", "learned", "feat_pick", "gps", "agg_class", "oracle"]


def _tiny_profile() -> dict:
    raw = tiny_params(evaluate={"severities": [3], "methods": TEAM_METHODS},
                      corruptions={"names": ["gaussian_noise", "defocus_blur", "contrast", "speckle_noise"]})
    raw.update(profile="tiny")
    raw["tracking"] = {"experiment": EXPERIMENT, "register_models": True}
    for group_key in ("study", "unseen"):  # set by their groups, composed after the profile
        raw.pop(group_key)
    return raw


@pytest.fixture(scope="module")
def env(mlflow_server_postgres: str) -> dict[str, str]:
    """The team's environment: its tracking server keeps runs and the registry in PostgreSQL."""
    out = dict(os.environ)
    out.update(MLFLOW_TRACKING_URI=mlflow_server_postgres, PATH=f"{BIN}{os.pathsep}{out.get('PATH', '')}", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """A git + DVC project with Hydra composition, a local remote and nothing run yet."""
    base = tmp_path_factory.mktemp("team")
    project = base / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    for folder in ("src", "conf", "pipeline"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    profile = "# @package _global_\n" + yaml.safe_dump(_tiny_profile(), sort_keys=False)
    (project / "conf" / "profile" / "tiny.yaml").write_text(profile)
    (project / ".gitignore").write_text("/checkpoints/\n/job-artifacts/\n/mlruns/\n/mlflow.db\n")
    _run(["git", "init", "-q", "-b", "main"], project, env)
    _run([str(BIN / "ltta"), "params", "profile=tiny"], project, env)
    _run([DVC, "init", "-q"], project, env)
    for key, value in (("core.analytics", "false"), ("hydra.enabled", "true")):
        _run([DVC, "config", key, value], project, env)
    _run([DVC, "remote", "add", "-d", "shared", str(base / "remote")], project, env)
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")  # dvc.yaml's plot templates
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-q", "-m", "tiny project"], project, env)
    return project


def _experiments(shown: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` (DVC 3): each named experiment's entry, with its params and metrics."""
    out = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    out[rev["name"]] = rev
    return out


def _client(env: dict[str, str]):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def _wait_for(flow_run_id, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.time() > deadline:
                return run
            time.sleep(2)


@pytest.mark.timeout(900)
def test_deployment_runs_the_flow_on_a_worker_and_publishes_the_table(project: Path, env: dict[str, str],
                                                                       prefect_server: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from pipeline.deploy import DeploymentSpec, deploy
    from pipeline.flow import STAGES, ltta_pipeline

    spec = DeploymentSpec(project_dir=project, name="team-test", pool="gpu-test", queue="gpu", cron="0 3 * * *",
                          profile="tiny")
    deploy(spec)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("ltta-pipeline/team-test")
        pool = client.read_work_pool("gpu-test")
        queue = client.read_work_queue_by_name("gpu", work_pool_name="gpu-test")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.work_queue_name == "gpu" and pool.type == "process"
    assert pool.concurrency_limit == 1 and queue.concurrency_limit == 1
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    assert deployment.parameters["profile"] == "tiny" and deployment.parameters["project_dir"] == str(project)

    # A run with a tiny override (what the UI's "Custom run" sends), picked up by a process worker.
    flow_run = run_deployment("ltta-pipeline/team-test", parameters={"overrides": ["evaluate.max_images=60"]}, timeout=0)
    worker_env = {**env, "PREFECT_API_URL": PREFECT_API_URL.value()}
    # --run-once, as a CI-style runner starts it: one poll, then the worker waits for the run it took
    # and exits by itself (a SIGTERM'd worker's graceful shutdown sat idle for its whole minute here).
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gpu-test", "--type", "process",
                                   "--limit", "1", "--run-once"], cwd=project, env=worker_env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            worker.wait(timeout=700)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=30)
    done = _wait_for(flow_run.id, timeout=30)
    assert done.state is not None and done.state.is_completed(), (done.state, (tmp_path / "worker.log").read_text()[-4000:])
    assert yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["max_images"] == 60
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert subprocess.run([DVC, "status", "--quiet"], cwd=project, env=env).returncode == 0, "a stage is stale after the run"

    with get_client(sync_client=True) as client:
        # Every field given: Prefect 3.8.8's client sends the missing ones as null, which its server refuses.
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(), flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
            task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC, limit=50, offset=0,
        )
    table = next(a for a in artifacts if a.key == "ltta-results")
    assert "**MLflow parent run:** [" in table.data and "| learned |" in table.data and "**Promotion:** ltta-tta: " in table.data

    # Every stage's MLflow run nests under the flow's parent run, in the params' experiment.
    client = _client(env)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ltta.flow") == "ltta-pipeline")
    assert parent.info.run_id in table.data
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["dvc.stage"] for r in children} == set(STAGES)
    target_run = next(r for r in children if r.data.tags["dvc.stage"] == "train_target")
    assert "train_target.epochs" in target_run.data.params and "test_error" in target_run.data.metrics
    assert target_run.data.tags["ltta.study"] == "standard" and len(target_run.data.tags["mlflow.source.git.commit"]) > 0
    assert client.get_model_version_by_alias("ltta-tta", "champion")

    # A second run, here in-process: DVC finds every stage up to date and runs nothing.
    again = ltta_pipeline(project_dir=str(project), promote=False)
    for stage in STAGES:
        text = again[stage]
        assert "didn't change, skipping" in text or "is cached" in text or "up to date" in text.lower(), (stage, text)
    listing = _run([sys.executable, "-m", "pipeline.deploy", "--name", "team-test", "--list"], project, worker_env)
    print(listing)
    assert " COMPLETED " in listing.splitlines()[1] and "evaluate.max_images=60" in listing
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-q", "-m", "baseline: the deployment's run"], project, env)


def _mlflow_rest(uri: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """One call of the tracking server's REST API, the one its UI pages make."""
    import urllib.parse
    import urllib.request

    url = f"{uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


# The evaluate run's metric keys per method (MLflow's run page and `ltta compare` read these).
SUMMARY_KEYS = {"clean_error", "clean_nll", "clean_ece", "mean_corruption_error", "extra_error", "corruption_nll",
                "corruption_ece", "forward_passes", "images_per_s"}
OPTIONAL_KEYS = {"mce_vs_baseline", "seen_error", "unseen_error"}  # None (not logged) where undefined


@pytest.mark.timeout(300)
def test_mlflow_pages_show_the_evaluation_under_stable_keys(project: Path, env: dict[str, str]) -> None:
    """Through the REST API the UI uses: the flow's parent run and its six stage runs, the evaluate
    run's summary metrics under ``<method>.<key>``, its report, JSON and figures as artifacts."""
    import urllib.request

    uri = env["MLFLOW_TRACKING_URI"]
    exp = _mlflow_rest(uri, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = _mlflow_rest(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 200})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parent = next(rid for rid, t in tags.items() if t.get("ltta.flow") == "ltta-pipeline")
    children = {t["dvc.stage"]: rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == parent}
    assert set(children) >= {"prepare_data", "train_target", "build_loss_dataset", "train_predictor",
                             "search_policy", "evaluate"}, sorted(children)

    run = _mlflow_rest(uri, "runs/get", run_id=children["evaluate"])["run"]
    methods = yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["methods"]
    logged: dict[str, set[str]] = {}
    for metric in run["data"]["metrics"]:
        method, _, key = metric["key"].partition(".")
        logged.setdefault(method, set()).add(key)
    assert set(logged) == set(methods), sorted(logged)
    for method, keys in logged.items():
        assert SUMMARY_KEYS <= keys <= SUMMARY_KEYS | OPTIONAL_KEYS, (method, sorted(keys))
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["evaluate.k"] == str(yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["k"])

    listed = _mlflow_rest(uri, "artifacts/list", run_id=children["evaluate"]).get("files", [])
    names = {f["path"] for f in listed}
    assert {"results.md", "eval.json", "eval_severity.csv", "error_by_severity.png", "corruption_heatmap.png",
            "accuracy_vs_cost.png"} <= names, sorted(names)
    # The file the UI's artifact pane opens is the committed report.
    url = f"{uri}/get-artifact?path=results.md&run_uuid={children['evaluate']}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read().decode() == (project / "reports" / "results.md").read_text()


@pytest.mark.timeout(600)
def test_what_a_user_sees_fits_a_terminal_and_every_plot_renders(project: Path, env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """`dvc metrics show` fits 120 columns with a row per method; every plot dvc.yaml declares is
    drawn with its title, axis labels and one series per method or curve (in Chromium if installed)."""
    from tests import rendering

    shown = _run([DVC, "metrics", "show"], project, {**env, "COLUMNS": "120"})
    print(shown)
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120, max(map(len, lines))
    methods = yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["methods"]
    assert lines[0].split()[0] == "Path"
    assert {"clean", "mce", "extra", "c_nll", "c_ece", "passes", "test_err", "rho", "top1", "score"} <= set(lines[0].split())
    assert {line.split()[0] for line in lines[1:]} == (
        {f"metrics/tta/{m}.json" for m in methods} | {f"metrics/{s}.json" for s in ("target", "predictor", "feature_head", "search")}
    )

    declared = {k: v for p in yaml.safe_load((project / "dvc.yaml").read_text())["plots"] if isinstance(p, dict)
                for k, v in p.items()}
    data = json.loads(_run([DVC, "plots", "show", "--json"], project, env))["data"]
    specs = {name: data[name][0]["content"] for name in declared}
    expected: dict[str, list[str]] = {}
    for name, spec in specs.items():
        d = declared[name]
        assert spec["title"]["text"] == d["title"], name
        (columns,) = d["y"].values()
        if columns == "${evaluate.methods}":
            columns = methods  # one line per evaluated method
        elif isinstance(columns, str):
            columns = [columns]
        series = {v.get("field") for v in spec["data"]["values"]}
        if len(columns) > 1:
            assert series == set(columns), (name, series)
        expected[name] = [d["title"], d["x_label"], d["y_label"], *(columns if len(columns) > 1 else [])]

    if rendering.chromium():
        template = rendering.offline_template(tmp_path / "offline.html")
        out = tmp_path / "plots"
        _run([DVC, "plots", "show", "--html-template", str(template), "-o", str(out)], project, env)
        html = out / "index.html"
        texts = set(rendering.svg_texts(rendering.rendered_dom(html)))
        for name, wanted in expected.items():
            assert set(wanted) <= texts, (name, sorted(set(wanted) - texts))
        png = rendering.screenshot(html, tmp_path / "plots.png")
        assert rendering.ink_fraction(png.read_bytes()) > 0.02
        print(f"rendered in {rendering.chromium()}: {png}")
    else:
        print("chromium is not installed (Debian package `chromium`): drawing the specs with vl-convert")
        for name, (svg, png_bytes) in rendering.render_specs(specs).items():
            assert set(expected[name]) <= set(rendering.svg_texts(svg)), name
            assert rendering.ink_fraction(png_bytes) > 0.02, name


@pytest.mark.timeout(900)
def test_compare_reads_a_dvc_exp_grid_as_the_papers_table(project: Path, env: dict[str, str]) -> None:
    from ltta.compare import find_runs
    from ltta.evaluation.runner import DVC_METRIC_KEYS

    for name, study in STUDIES.items():
        _run([DVC, "exp", "run", "-n", name, "-S", "profile=tiny", "-S", f"study={study}", "-S", GRID_OVERRIDE],
             project, env, timeout=900)
    by_name = _experiments(json.loads(_run([DVC, "exp", "show", "--json"], project, env)))
    assert set(STUDIES) <= set(by_name), sorted(by_name)

    runs = find_runs(_client(env), experiments=[EXPERIMENT], dvc_exps=list(STUDIES))
    assert [r.group("study") for r in runs] == list(STUDIES.values())
    for run, name in zip(runs, STUDIES):
        # The numbers MLflow holds for the run are the ones DVC committed for the experiment (4 decimals).
        dvc_metrics = by_name[name]["data"]["metrics"]
        methods = [p.removeprefix("metrics/tta/").removesuffix(".json") for p in dvc_metrics if p.startswith("metrics/tta/")]
        assert set(methods) == set(run.metrics), (name, methods)
        for method in methods:
            for short, value in dvc_metrics[f"metrics/tta/{method}.json"]["data"].items():
                if value is not None:
                    key = DVC_METRIC_KEYS[short]
                    assert run.metrics[method][key] == pytest.approx(value, abs=5.01e-5), (name, method, key)

    cli = [str(BIN / "ltta"), "compare", "--experiment", EXPERIMENT, "--dvc-exp", "std", "--dvc-exp", "aug"]
    long = _run(cli, project, env)
    assert long.splitlines()[0].startswith("| method | run | clean err % | corruption err %")
    assert "| learned | std |" in long and "|  | aug |" in long
    table = _run([*cli, "--by", "study"], project, env)
    print(long, table, sep="\n")
    assert "| method \\ study | standard (n=1) | augmix (n=1) |" in table
    learned = next(line for line in table.splitlines() if line.startswith("| learned |"))
    aug = by_name["aug"]["data"]["metrics"]["metrics/tta/learned.json"]["data"]["mce"]
    assert learned.split("|")[3].strip() == f"{aug:.2f}"
    as_json = json.loads(_run([*cli, "--by", "study", "--format", "json"], project, env))
    assert as_json["table"]["learned"]["augmix"]["mean"] == pytest.approx(aug, abs=5.01e-5)


@pytest.mark.timeout(600)
def test_gpu_job_pushes_what_a_second_clone_pulls_up_to_date(project: Path, env: dict[str, str], tmp_path: Path) -> None:
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-q", "-m", "the aug experiment"], project, env)
    summary = tmp_path / "summary.md"
    job_env = {**env, "LTTA_GPU_TESTS": "0", "LTTA_JOB_OVERRIDES": f"study=augmix {GRID_OVERRIDE}",
               "LTTA_JOB_OUT": str(tmp_path / "job"), "GITHUB_STEP_SUMMARY": str(summary)}
    log = _run(["bash", str(ROOT / "pipeline" / "gpu_job.sh"), "tiny"], project, job_env)
    print(log)
    assert "GPU tests skipped" in log and "Running stage" not in log, "the committed experiment was not up to date"
    assert "ltta-tta: " in (tmp_path / "job" / "promotion.txt").read_text()
    assert (tmp_path / "job" / "reports" / "results.md").exists()
    assert "| learned |" in summary.read_text() and "**Promotion:**" in summary.read_text()
    _run(["git", "commit", "-q", "-a", "--allow-empty", "-m", "params as ltta params writes them"], project, env)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / "models" / "target.pt").exists()
    _run([DVC, "pull"], clone, env)
    assert (clone / "models" / "target.pt").read_bytes() == (project / "models" / "target.pt").read_bytes()
    assert subprocess.run([DVC, "status", "--quiet"], cwd=clone, env=env).returncode == 0
    repro = _run([DVC, "repro"], clone, env)
    assert "Running stage" not in repro, repro
