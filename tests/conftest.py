"""Shared fixtures: real MLflow and Prefect servers on 127.0.0.1 (once per session), tiny params."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.datasets import load_digits

from tests.served import RangeHandler

ROOT = Path(__file__).resolve().parents[1]

#: This process's pytest-xdist worker ("gw0", ...), None when pytest runs in one process.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
#: Modules that run whole pipelines in subprocesses for minutes: started first, longest first (``-n 2``
#: gives one worker to each while the other runs the rest), each on one worker with its module
#: fixtures. In the slow set the flow's kill test comes before the dvc one: whichever starts first
#: makes the shared reference run, and the team tests (the longest) run beside it.
LONG_FIRST = ("test_team.py", "test_kill_flow.py", "test_kill.py", "test_faults.py", "test_flow.py")

if XDIST_WORKER is None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
else:
    # One thread per worker, and for the stages it starts: workers x threads = cores, not twice as
    # many threads spinning against each other (two workers at 2 threads each ran slower than one).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly without CUDA, whatever -m selects; the long modules go first (under
    ``--dist loadfile`` each module is one unit of work, its module fixtures built once)."""
    items.sort(key=lambda item: LONG_FIRST.index(item.path.name) if item.path.name in LONG_FIRST else len(LONG_FIRST))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(cmd: list[str], ready_url: str, log: Path, *, cwd: Path, env: dict[str, str] | None = None,
                   timeout: float = 120) -> Iterator[subprocess.Popen]:
    """Start ``cmd``, wait until ``ready_url`` answers 200 (its log in the error if it never does), stop it after."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        deadline = time.time() + timeout
        try:
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{' '.join(cmd[:3])} did not start:\n" + log.read_text()[-3000:])
                time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def running_mlflow_server(base: Path, backend_store: str) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 over ``backend_store``, artifacts under ``base``; its URI."""
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_store, "--artifacts-destination", str(base / "artifacts")]
    uri = f"http://127.0.0.1:{port}"
    with running_server(cmd, uri + "/health", base / "server.log", cwd=base):
        yield uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite store) on 127.0.0.1, stopped at the end of the session."""
    base = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(base, f"sqlite:///{base / 'mlflow.db'}") as uri:
        yield uri


#: The PostgreSQL server the tests may use (trust authentication); LTTA_TEST_POSTGRES overrides it.
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh database on :data:`POSTGRES` for one test (or session), dropped after; its URL.

    Skips with the reason where no server answers, unless ``LTTA_REQUIRE_POSTGRES=1`` (CI), where
    a missing server is a failure: the tests that need a server database must not pass by skipping.
    """
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = make_url(os.environ.get("LTTA_TEST_POSTGRES", POSTGRES))
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # noqa: BLE001 - no driver, no server, refused: all mean "none here"
        reason = f"no PostgreSQL at {admin_url.render_as_string(hide_password=True)} ({type(exc).__name__}: " \
                 f"{str(exc).splitlines()[0] if str(exc) else ''}); set LTTA_TEST_POSTGRES to one"
        if os.environ.get("LTTA_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (see :func:`postgres_database`)."""
    with postgres_database("ltta_test") as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_server_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` whose backend store is a PostgreSQL database, as a team runs it."""
    with postgres_database("ltta_mlflow") as db, running_mlflow_server(tmp_path_factory.mktemp("mlflow-server-pg"), db) as uri:
        yield uri


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """Prefect's test harness: a real Prefect API server on 127.0.0.1 with a temporary database."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The server's telemetry heartbeat writes to the same SQLite file as the flow runs and, on two
    # busy cores, logs "database is locked" tracebacks that are noise (and phones home): off.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """300 training and 100 validation digits, upscaled 8x8 -> 32x32 and repeated to RGB, in [0,1]."""
    d = load_digits()
    x = torch.tensor(d.images[:400], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target[:400], dtype=torch.int64)
    return x[:300], y[:300], x[300:], y[300:]


def tiny_params(**overrides: dict) -> dict:
    """The committed params shrunk to seconds: few images, epochs, trials, corruptions."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["device"] = "cpu"
    raw["data"].update(max_train=300, max_test=100)
    raw["corruptions"].update(names=["gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression", "speckle_noise"])
    raw["train_target"].update(epochs=2, batch_size=64)
    raw["loss_dataset"].update(duplication=1, corruptions=["gaussian_noise", "defocus_blur"], candidates="all")
    raw["train_predictor"].update(epochs=2, batch_size=64, width=8)
    raw["train_predictor"]["feature_head"].update(epochs=2)
    raw["search_policy"].update(folds=2, trials=3, top_n=2, max_images=200, epochs=1)
    raw["search_gps"].update(random_subpolicies=6, crop_flip_samples=2, length=4)
    raw["fit_aggregation"].update(epochs=3)
    raw["evaluate"].update(severities=[1, 5], batch_size=256)
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return raw


def _run_tiny_pipeline(root: Path, raw: dict) -> None:
    """Every stage, in process, into ``root`` (its MLflow store ``root/mlflow.db``)."""
    import importlib

    from ltta.config import parse_params
    from ltta.stages import ORDER
    from ltta.stages.base import Paths

    params = parse_params(raw)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        for name in ORDER:
            importlib.import_module(f"ltta.stages.{name}").run(params, Paths(root))
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The stages run once per session, in process, on :func:`tiny_params`: a workspace that
    tests read or copy, never change (its MLflow store is ``mlflow.db`` inside it).

    Under pytest-xdist the first worker that needs it runs it (a file lock), and every worker
    works on its own copy: one pipeline run per session, and no two processes write one SQLite store.
    """
    raw = tiny_params()
    root = tmp_path_factory.mktemp("pipeline")
    if XDIST_WORKER is None:
        _run_tiny_pipeline(root, raw)
        return root, raw
    shared = built_once(tmp_path_factory.getbasetemp().parent / "tiny-pipeline", lambda d: _run_tiny_pipeline(d, raw))
    shutil.copytree(shared, root, dirs_exist_ok=True)
    return root, raw


def built_once(shared: Path, build: Callable[[Path], None]) -> Path:
    """``build(shared)`` once per session across pytest-xdist workers (``shared`` lies beside the
    workers' temp folders): the first to ask builds it under a file lock, the others wait and reuse
    it; a marker says the build finished, so a crashed worker's half-built folder is built again."""
    from filelock import FileLock

    with FileLock(f"{shared}.lock"):
        if not (shared / ".complete").is_file():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir(parents=True)
            build(shared)
            (shared / ".complete").touch()
    return shared


def copy_workspace(root: Path, dest: Path, *leave_out: str) -> Path:
    """A copy of a finished workspace (``tiny_pipeline``'s) at ``dest``, without its checkpoints and
    ``leave_out``, plus the policy files train_target's policy mode reads."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("checkpoints", *leave_out))
    shutil.copytree(ROOT / "conf" / "policies", dest / "conf" / "policies")
    return dest


def make_project(dest: Path, params: dict) -> Path:
    """A DVC project in ``dest`` running the installed ltta: dvc.yaml, the code deps it names, params."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf" / "policies", dest / "conf" / "policies")  # train_target's policy dep
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=dest, check=True)
    subprocess.run([str(dvc), "config", "core.analytics", "false"], cwd=dest, check=True)
    return dest


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 over ``tmp_path/www`` (with Range support): (its base URL, that folder)."""
    root = tmp_path / "www"
    root.mkdir()
    RangeHandler.requests = []
    RangeHandler.honour_range = True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def kill_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The kill tests' uninterrupted run (project, seconds), once per session: ``tests/killing.py``."""
    from tests.killing import reference_run

    return reference_run(tmp_path_factory.getbasetemp().parent / "kill-reference")
