"""MLflow in one place: where runs go, how a stage run is opened, how models are registered.

Every stage run becomes an MLflow run tagged with the git commit and the DVC stage; when the
Prefect flow drives the pipeline it exports ``LTTA_PARENT_RUN_ID`` so stage runs nest under the
pipeline's run. The default store is a SQLite file at the project root, addressed by an
absolute URI so that ``dvc exp run --temp`` (which runs in a copy under ``.dvc/tmp/exps``) still
logs to the real project; ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

PARENT_RUN_ENV = "LTTA_PARENT_RUN_ID"


#: Prefix of the MLflow tags that carry an evaluation's protocol record (written by the evaluate
#: stage, compared by ``ltta compare``).
PROTOCOL_TAG = "ltta.protocol."

def project_root(start: Path | None = None) -> Path:
    """The project directory: the real one even inside a DVC temporary experiment copy."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts:  # dvc exp run --temp works in <root>/.dvc/tmp/exps/...
        return Path(*parts[: parts.index(".dvc")])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists():
            return candidate
    return here


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI at the project root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root(root) / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """Whether ``uri`` names an HTTP tracking server (else a local store: SQLite, a folder)."""
    return uri.startswith(("http://", "https://"))


class TrackingServerError(RuntimeError):
    """The HTTP tracking server did not answer, or failed, for longer than the stage retries."""


def _reason(exc: BaseException) -> str:
    """A short cause: the HTTP status, a timeout or the connection error, on one line."""
    text = " ".join(str(exc).split())
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    status = re.search(r"too many (\d{3}) error responses|HTTP (?:status code|response)[: ]+(\d{3})|status (\d{3})", text)
    if status:
        return f"HTTP {next(g for g in status.groups() if g)}"
    if "timed out" in text.lower() or isinstance(exc, TimeoutError):
        return "timed out"
    return text[:160]


def ensure_local_store(uri: str) -> None:
    """Create a local SQLite store whole before anything uses it.

    MLflow creates a new store's tables and runs its migrations one statement at a time; a process
    killed meanwhile (SIGKILL, the OOM killer, a cancelled CI job) leaves a database every later run
    refuses ("table span_metrics already exists"), which the kill tests met. So a missing store is
    built under a temporary name and linked into place only once complete (:func:`ltta.io.atomic_create`:
    a store another process made first is kept; dead creators' temporaries are swept). The
    temporary's name is new on every call, which matters: MLflow keeps a store, and its open
    connection, per URI for the process's life.
    """
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if str(path) in ("", ":memory:") or path.exists():
        return
    import mlflow

    from ltta.io import atomic_create

    with atomic_create(path) as tmp:  # SQLite takes the empty temporary as a new database
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp.resolve()}").search_experiments(max_results=1)


def check_reachable(uri: str, retry_seconds: float = 0.0, request_timeout: float = 5.0) -> None:
    """Wait, with exponential backoff, up to ``retry_seconds`` for an HTTP tracking server's /health
    to answer 200; then fail naming the URI, the last cause and the fix. Nothing is logged
    elsewhere meanwhile: a local store in place of the team's server would split its runs. A local
    SQLite store that does not exist yet is created whole (:func:`ensure_local_store`)."""
    if not is_server(uri):
        ensure_local_store(uri)
        return
    deadline = time.monotonic() + retry_seconds
    pause, attempts = 0.5, 0
    while True:
        attempts += 1
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=request_timeout) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (OSError, urllib.error.URLError) as exc:
            last = _reason(exc)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(pause, left))
        pause *= 2
    waited = f"retried for {retry_seconds:g} s ({attempts} attempts, tracking.retry_seconds)" if retry_seconds else "no retries"
    raise TrackingServerError(
        f"MLflow tracking server {uri} is unreachable ({last}; {waited}). Start it (mlflow server ...) or wait until "
        "it is back, then rerun; or unset MLFLOW_TRACKING_URI to log to the local SQLite store"
    )


def bound_mlflow_retries(retry_seconds: float, request_timeout: float) -> None:
    """Make MLflow's own HTTP retries (urllib3 backoff 1, 2, 4 ... s) fit in ``retry_seconds``:
    by default it retries 7 times with a 120 s timeout, minutes before a stage could fail."""
    retries = max(1, int(math.log2(retry_seconds + 1))) if retry_seconds > 0 else 0
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(request_timeout)))


@contextlib.contextmanager
def server_errors_named(uri: str, stage: str) -> Iterator[None]:
    """Turn MLflow's failures to reach an HTTP server mid-stage into one error naming the URI."""
    if not is_server(uri):
        yield
        return
    import requests
    from mlflow.exceptions import MlflowException, RestException

    try:
        yield
    except (MlflowException, requests.RequestException) as exc:
        # Only a failure of the server: one MLflow could not reach ("API request to ... failed") or
        # a 5xx answer left after its retries (a RestException, when the last retry got one); a
        # rejected request (a bad metric name, say: a 4xx) is the stage's own error and passes as it is.
        server_side = isinstance(exc, RestException) and exc.get_http_status_code() >= 500
        if isinstance(exc, MlflowException) and "API request to" not in str(exc) and not server_side:
            raise
        raise TrackingServerError(
            f"MLflow tracking server {uri} failed while {stage} logged its run ({_reason(exc)}, after MLflow's "
            "retries within tracking.retry_seconds); with the server back, rerun: DVC reruns the stage (its finished "
            "outputs are rewritten, a trained target resumes from its last checkpoint)"
        ) from exc


def git_commit(root: Path | None = None) -> str:
    """The current commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _param_value(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def flatten(d: Mapping[str, Any], prefix: str = "", leaf: Callable[[Any], Any] = _param_value) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, each value through ``leaf``: by default lists become their
    string form (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + ".", leaf))
        else:
            out[key] = leaf(v)
    return out


def open_experiment(uri: str, experiment: str) -> None:
    """``mlflow.set_experiment``, with a database store that cannot be read named, and the fix."""
    import mlflow
    from sqlalchemy.exc import DatabaseError

    try:
        mlflow.set_experiment(experiment)
    except DatabaseError as exc:
        first = str(exc.orig if exc.orig is not None else exc).splitlines()[0]
        raise RuntimeError(
            f"the MLflow store {uri} cannot be read ({first}). Move the damaged database aside (a new one is "
            "created), or point MLFLOW_TRACKING_URI at another store."
        ) from exc


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], *, experiment: str, tags: Mapping[str, str] | None = None,
              retry_seconds: float = 0.0, request_timeout: float = 5.0) -> Iterator[Any]:
    """Open an MLflow run for one DVC stage (nested under the pipeline's run when there is one).

    An HTTP server that is down, slow or failing is retried for ``retry_seconds`` (before the
    run opens, and by MLflow's own requests during it); then the stage fails naming the URI.
    """
    import mlflow

    # MLflow draws a bar for every artifact it downloads while logging a model (the input-example
    # check): a dozen one-item bars per stage in the `dvc repro` log. The stage has its own bar.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    check_reachable(uri, retry_seconds, request_timeout)
    bound_mlflow_retries(retry_seconds, request_timeout)
    with server_errors_named(uri, stage):
        mlflow.set_tracking_uri(uri)
        open_experiment(uri, experiment)
        with _run(stage, params, tags) as run:
            yield run


@contextlib.contextmanager
def _run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None) -> Iterator[Any]:
    import mlflow

    parent = os.environ.get(PARENT_RUN_ENV)
    all_tags = {
        "ltta.stage": stage,
        "dvc.stage": stage,
        "mlflow.source.git.commit": git_commit(),
        **(dict(tags) if tags else {}),
    }
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        flat = flatten(params)
        # MLflow caps a batch at 100 params; log in chunks.
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        yield run


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run (non-numbers are skipped)."""
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def set_tags(tags: Mapping[str, str]) -> None:
    """Tag the active run: provenance that filters runs in the UI (which corrupted set, which target)."""
    import mlflow

    mlflow.set_tags(dict(tags))


def log_child_run(name: str, series: Mapping[str, Sequence[tuple[int, float]]], *, tags: Mapping[str, str] | None = None,
                  summary: Mapping[str, float] | None = None) -> str:
    """A run nested under the active one holding metric series (``name -> [(step, value)]``).

    Used for what a stage does many times over, e.g. one child run per search fold with its trial
    scores as steps, so the MLflow UI charts each fold's search on its own. Logged in batches of
    1,000 (MLflow's cap per call). Returns the child's run id.
    """
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    with mlflow.start_run(run_name=name, nested=True, tags=dict(tags or {})) as child:
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, int(step)) for key, points in series.items() for step, v in points]
        metrics += [Metric(key, float(v), now, 0) for key, v in (summary or {}).items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(child.info.run_id, metrics=metrics[i : i + 1000])
        return str(child.info.run_id)


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    """Attach files (plots, reports, metrics) to the active run."""
    import mlflow

    for p in paths:
        if Path(p).exists():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes: what ``dvc.lock`` records for a file output (DVC 3)."""
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lineage_tags(stage: str, file: str | Path, root: Path | None = None) -> dict[str, str]:
    """Tags that trace a registered version back to ``dvc.lock``: the commit, the DVC stage that
    wrote the file, the file's path as dvc.yaml names it (from the project ``root``, found from the
    file when not given), and its md5 (``dvc.lock``'s ``md5`` for that output)."""
    path = Path(file).resolve()
    root = Path(root).resolve() if root is not None else project_root(path.parent)
    try:
        out = path.relative_to(root).as_posix()
    except ValueError:
        out = path.as_posix()
    return {"ltta.git_commit": git_commit(root), "ltta.dvc_stage": stage, "ltta.dvc_out": out, "ltta.md5": file_md5(path)}


def register(model_uri: str, name: str, tags: Mapping[str, str], alias: str = "candidate") -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``tags`` and point ``alias`` at it."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=dict(tags))
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def version_by_md5(name: str, md5: str) -> str | None:
    """The newest registered version of ``name`` whose file has this md5 (None: none registered)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.MlflowClient().search_model_versions(f"name = '{name}' and tags.`ltta.md5` = '{md5}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in found)) if found else None


def log_and_register_model(model: Any, name: str, example_input: Any, *, register_as: Mapping[str, str] | None,
                           model_file: Path, alias: str = "candidate") -> str | None:
    """Log a torch model with a signature inferred from numpy in/out; register it and set ``alias``.

    ``model_file`` (the DVC-tracked ``models/*.pt``) travels with the logged model as an extra
    file, so a stage can take the model from the registry (``models:/name@champion``) and rebuild
    it exactly as from the file (:func:`ltta.model_io.load_model_source`). ``register_as``: the
    version's lineage tags (:func:`lineage_tags`), or None not to register. Returns the
    registered version (as a string) or None.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = model.eval()
    with torch.no_grad():
        x = torch.as_tensor(example_input)
        device = next(model.parameters()).device
        y = model(x.to(device)).float().cpu().numpy()
    signature = infer_signature(np.asarray(example_input), y)
    info = mlflow.pytorch.log_model(
        pytorch_model=model,
        name=name,
        signature=signature,
        # pt2: torch.export's traced graph, loadable without this package's code.
        input_example=np.asarray(example_input),
        serialization_format="pt2",
        extra_files=[str(model_file)],
        # Explicit requirements: inferring them imports and inspects the whole environment (slow).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    if register_as is None:
        return None
    return register(info.model_uri, name, register_as, alias)
