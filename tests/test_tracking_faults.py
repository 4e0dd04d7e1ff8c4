"""A tracking server that is down, slow or failing: bounded retries, a clear failure, no lost work.

The stages run in process through ``ltta <stage>`` against a real ``mlflow server`` on 127.0.0.1,
reached through a proxy the test controls (a delay per request, HTTP 500 for the first N
requests or for one endpoint). Nothing falls back to another store: a stage that cannot log
fails, naming the URI; what it had finished (a trained model's checkpoint) is kept for the rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from ltta import cli
from tests.conftest import copy_workspace, free_port, tiny_params

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "content-length", "host"}


@dataclass
class Behaviour:
    """What the proxy does to each request (changed by the tests while it runs)."""

    delay: float = 0.0  # seconds before answering
    fail_status: int | None = None  # answer this instead of forwarding ...
    fail_first: int | None = None  # ... for the first N matching requests only (None: all of them)
    fail_paths: tuple[str, ...] = ()  # ... for requests whose path holds one of these ('': every path)
    seen: int = 0
    failed: int = 0
    paths: list[str] = field(default_factory=list)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        b = self.server.behaviour
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        b.seen += 1
        b.paths.append(self.path)
        if b.delay:
            time.sleep(b.delay)
        matches = any(p in self.path for p in (b.fail_paths or ("",)))
        if b.fail_status is not None and matches and (b.fail_first is None or b.failed < b.fail_first):
            b.failed += 1
            payload = b'{"error_code": "INTERNAL_ERROR", "message": "injected by the test proxy"}'
            self.send_response(b.fail_status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        up = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        up.request(self.command, self.path, body=body or None, headers=headers)
        resp = up.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        up.close()

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward


class _Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urlsplit(upstream)
        self.behaviour = Behaviour()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def proxy(mlflow_server: str) -> Iterator[_Proxy]:
    server = _Proxy(mlflow_server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def workspace(tiny_pipeline: tuple[Path, dict], tmp_path: Path) -> Path:
    """A copy of the session's pipeline workspace without its MLflow store (the tests log to a server)."""
    return copy_workspace(tiny_pipeline[0], tmp_path / "ws", "mlflow.db", "mlruns")


def _params(ws: Path, **tracking: float) -> None:
    raw = tiny_params(train_target={"epochs": 2}, tracking={"experiment": "faults", **tracking})
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _run(command: str, ws: Path, uri: str, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capsys.readouterr()
    t0 = time.monotonic()
    with contextlib.chdir(ws):
        code = cli.main([command])
    return code, capsys.readouterr().err, time.monotonic() - t0


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.read_bytes())
    return h.hexdigest()


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_server_that_is_down_is_retried_for_the_set_time_then_named(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _params(workspace, retry_seconds=3, request_timeout=2)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    before = _digest(workspace / "data" / "prepared")
    code, err, seconds = _run("prepare-data", workspace, uri, monkeypatch, capsys)
    line = _error_line(err)
    assert code == cli.EXIT_FAILURE
    assert uri in line and "retried for 3 s" in line and "tracking.retry_seconds" in line, line
    assert "start it" in line.lower() or "Start it" in line, line
    assert 3 <= seconds < 20
    assert _digest(workspace / "data" / "prepared") == before
    assert not (workspace / "mlflow.db").exists() and not (workspace / "mlruns").exists(), "fell back to a local store"


@pytest.mark.parametrize(("behaviour", "cause"), [({"fail_status": 500}, "HTTP 500"), ({"delay": 3.0}, "timed out")],
                         ids=["answers-500", "slower-than-the-timeout"])
def test_a_failing_or_too_slow_server_is_retried_then_named_with_the_cause(
        behaviour: dict, cause: str, proxy: _Proxy, workspace: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _params(workspace, retry_seconds=2, request_timeout=1)
    for key, value in behaviour.items():
        setattr(proxy.behaviour, key, value)
    code, err, seconds = _run("prepare-data", workspace, proxy.uri, monkeypatch, capsys)
    line = _error_line(err)
    assert code == cli.EXIT_FAILURE and proxy.uri in line and cause in line, line
    assert proxy.behaviour.seen >= 2  # retried, not given up at the first answer
    assert seconds < 30


def test_transient_500s_and_a_slow_server_are_ridden_out(proxy: _Proxy, workspace: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _params(workspace, retry_seconds=30, request_timeout=10)
    proxy.behaviour.fail_status, proxy.behaviour.fail_first = 503, 3
    proxy.behaviour.delay = 0.05
    code, err, _ = _run("prepare-data", workspace, proxy.uri, monkeypatch, capsys)
    assert code == 0, err
    assert proxy.behaviour.failed == 3 and proxy.behaviour.seen > 10


def test_a_server_failing_at_the_end_of_training_costs_no_retraining(proxy: _Proxy, workspace: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The run's closing call fails: the stage fails naming the URI, its checkpoint stays, and the
    rerun with the server back resumes after the last epoch instead of training again."""
    from ltta.model_io import load_model_file

    _params(workspace, retry_seconds=2, request_timeout=5)
    proxy.behaviour.fail_status, proxy.behaviour.fail_paths = 500, ("/runs/update",)
    code, err, _ = _run("train-target", workspace, proxy.uri, monkeypatch, capsys)
    assert code == cli.EXIT_FAILURE and proxy.uri in _error_line(err), err
    assert list((workspace / "checkpoints").glob("target-*.pt")), "the finished training's checkpoint was dropped"
    _, first = load_model_file(workspace / "models" / "target.pt")

    proxy.behaviour.fail_status = None
    code, err, _ = _run("train-target", workspace, proxy.uri, monkeypatch, capsys)
    assert code == 0, err
    _, second = load_model_file(workspace / "models" / "target.pt")
    assert second["history"] == first["history"]  # the same epochs, timings included: none was rerun
    assert not list((workspace / "checkpoints").glob("target-*.pt"))


@pytest.mark.parametrize("code, named", [("INTERNAL_ERROR", True), ("TEMPORARILY_UNAVAILABLE", True),
                                         ("INVALID_PARAMETER_VALUE", False)])
def test_a_5xx_answer_left_after_mlflows_retries_names_the_server(code: str, named: bool) -> None:
    """Whether MLflow's last retry got a 5xx answer (a RestException) or no answer ("API request
    to ... failed") depends on timing; both are the server's failure. A 4xx is the stage's own error."""
    from mlflow.exceptions import RestException

    from ltta.tracking import TrackingServerError, server_errors_named

    uri = "http://127.0.0.1:9"
    expected = TrackingServerError if named else RestException
    with pytest.raises(expected) as caught, server_errors_named(uri, "train-target"):
        raise RestException({"error_code": code, "message": "injected"})
    assert (uri in str(caught.value)) is named


def test_a_local_store_is_created_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed while MLflow creates a new SQLite store's tables left a store every later run
    refused ("table span_metrics already exists"; the kill tests met it): the store is built under a
    temporary name and appears whole, a dead creator's partial store is swept, a rival's store is kept."""
    import subprocess
    import sys

    import mlflow

    from ltta import tracking

    store = tmp_path / "ws" / "mlflow.db"
    uri = f"sqlite:///{store}"
    real_search = mlflow.MlflowClient.search_experiments

    def dies(self, *args, **kwargs):  # the creating process dies half way through
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.MlflowClient, "search_experiments", dies)
    with pytest.raises(KeyboardInterrupt):
        tracking.ensure_local_store(uri)
    assert not store.exists()  # nothing under the final name; a rerun starts afresh
    monkeypatch.setattr(mlflow.MlflowClient, "search_experiments", real_search)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = store.with_name(f".mlflow.db.{dead.stdout.strip()}.0a1b2c3d.tmp")  # as ltta.io names temporaries
    partial.write_bytes(b"half a database")
    tracking.check_reachable(uri)  # what every stage calls first
    assert [e.name for e in mlflow.MlflowClient(tracking_uri=uri).search_experiments()] == ["Default"]
    assert sorted(p.name for p in store.parent.iterdir()) == ["mlflow.db"]

    rival = tmp_path / "rival" / "mlflow.db"
    import ltta.io

    real_link = ltta.io.os.link

    def rival_first(src, dst):  # another process links its store in between
        Path(dst).write_bytes(b"theirs")
        return real_link(src, dst)

    monkeypatch.setattr(ltta.io.os, "link", rival_first)
    tracking.ensure_local_store(f"sqlite:///{rival}")
    assert rival.read_bytes() == b"theirs" and sorted(p.name for p in rival.parent.iterdir()) == ["mlflow.db"]
