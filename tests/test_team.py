"""The pipeline as a team runs it, with the real tools on 127.0.0.1: a Prefect deployment on a
process work pool whose worker runs the whole flow (every stage through DVC, nested MLflow runs,
promotion, the results table as an artifact); a `dvc exp run` grid over two studies read back by
`ltta compare`; the GPU runner's script (`pipeline/gpu_job.sh`) pushing to a DVC remote that a
second clone pulls from and finds up to date.

One tiny project (a git repo, `conf/` with a `tiny` profile) serves the three, in this order (each
builds on the one before, so the pipeline runs once in full): the worker's run is the baseline
commit; the grid changes one evaluate setting (std: only evaluate reruns) and the study (aug); the
runner's job finds the committed aug experiment up to date and pushes it.
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


def _tiny_profile() -> dict:
    raw = tiny_params(evaluate={"severities": [3]})
    raw.update(profile="tiny")
    raw["tracking"] = {"experiment": EXPERIMENT, "register_models": True}
    for group_key in ("study", "unseen"):  # set by their groups, composed after the profile
        raw.pop(group_key)
    return raw


@pytest.fixture(scope="module")
def env(mlflow_server: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(MLFLOW_TRACKING_URI=mlflow_server, PATH=f"{BIN}{os.pathsep}{out.get('PATH', '')}", GIT_AUTHOR_NAME="t",
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
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gpu-test", "--type", "process",
                                   "--limit", "1"], cwd=project, env=worker_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            done = _wait_for(flow_run.id, timeout=700)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
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
