"""Fast AutoAugment search spread over worker processes that share one Optuna storage (SQLite or PostgreSQL).

Run as a script, this file is one search worker (``python tests/test_search_workers.py ...``):
the tests start real worker processes against one storage, kill one in the middle of a trial,
and check that every trial slot completed exactly once, that the killed trial was retried, and
that the merged policy is exactly the one a single in-memory process finds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from ltta.search import SearchSpec, make_storage, run_fold_trials, run_search_worker, search_policy
from ltta.search.faa import logical_trial_number, worker_id
from ltta.transforms.functional import random_crop_flip

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
N_TRIALS = 6
# Two sub-policies of two ops: Optuna commits each suggested parameter, so a small space keeps trials cheap.
SPEC = SearchSpec(num_folds=2, fold_ratio=0.4, num_trials=N_TRIALS, num_policies=2, num_ops=2, top_n=2, seed=0,
                  batch_size=128)
SEARCH = dict(study_name="w", cache_key="tiny-mlp-v1")
# A killed worker's trial is stale ~3-4 s after its last beat (SQLite keeps whole seconds, so the
# grace must exceed two beats for a live trial never to look stale).
BEAT = dict(heartbeat_interval=1, grace_period=3)


def digits(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits upscaled to 32x32 RGB in [0,1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images[:n]).float().div(16.0).unsqueeze(1)
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target[:n]).long()


def tiny_mlp() -> nn.Module:
    """The fold models' architecture (the model cache loads saved state dicts into it)."""
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))


def train_tiny(x: torch.Tensor, y: torch.Tensor, fold: int) -> nn.Module:
    """A real, deterministic (seeded, one thread) training run: full-batch gradient descent on a tiny MLP.

    Plain updates rather than ``torch.optim``, whose first step imports torch._dynamo (seconds
    per worker process). About 90% clean accuracy on held-out digits.
    """
    torch.manual_seed(100 + fold)
    model = tiny_mlp()
    for _ in range(60):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    return model.eval()


def _worker_main(role: str, url: str, cache: str, data: str, sync: str) -> None:
    """One ``--worker`` process. ``victim`` completes one trial, then hangs inside its next one."""
    torch.set_num_threads(1)
    arrays = np.load(data)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    Path(sync, f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(Path(sync).glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # start together, so that both workers share the folds
    completed: list[int] = []

    def post_augment(view: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if role == "victim" and completed:
            Path(sync, "victim-in-trial").touch()
            time.sleep(600)  # killed here, in the middle of a trial
        return random_crop_flip(view, generator)

    run_search_worker(x, y, SPEC, train_fn=train_tiny, storage=make_storage(url, **BEAT), model_cache=cache,
                      build_fn=tiny_mlp, on_trial=lambda fold, trial, score: completed.append(trial), post_augment=post_augment,
                      wait=False, poll_interval=0.05, **SEARCH)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only spin; one thread also makes training bitwise reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spawn(role: str, *args: Path | str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, role, *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(path: Path, procs: list[subprocess.Popen[str]], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError(f"{path.name} never appeared: " + " | ".join(p.communicate()[0][-2000:] for p in procs))
        time.sleep(0.02)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One SQLite file (workers on one host), or a PostgreSQL database (workers on several machines)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'search.db'}"
    return request.getfixturevalue("postgres_url")


def test_two_workers_and_a_killed_trial_give_the_single_process_search(tmp_path: Path, storage_url: str) -> None:
    """Separate worker processes share one study in the storage (a file, or a server database)."""
    x, y = digits()
    data, sync, cache = tmp_path / "data.npz", tmp_path / "sync", tmp_path / "models"
    np.savez(data, x=x.numpy(), y=y.numpy())
    sync.mkdir()
    url = storage_url

    worker, victim = _spawn("worker", url, cache, data, sync), _spawn("victim", url, cache, data, sync)
    _wait_for(sync / "victim-in-trial", [worker, victim])
    # The other worker runs every other slot, then leaves: the victim's trial is alive (beating).
    out = worker.communicate(timeout=120)[0]
    assert worker.returncode == 0, out
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    # The plain search joins: it retries the killed trial (heartbeat gone) and merges.
    trained: list[int] = []
    seen: list[tuple[int, int]] = []

    def counted_train(xs: torch.Tensor, ys: torch.Tensor, fold: int) -> nn.Module:
        trained.append(fold)
        return train_tiny(xs, ys, fold)

    storage = make_storage(url, **BEAT)
    policy, history = search_policy(x, y, SPEC, train_fn=counted_train, storage=storage, model_cache=cache,
                                    build_fn=tiny_mlp, on_trial=lambda f, t, s: seen.append((f, t)),
                                    poll_interval=0.05, **SEARCH)
    assert trained == []  # both fold models came from the workers' cache
    assert len(seen) == 1  # only the killed trial was left

    pids = {str(worker.pid), str(victim.pid)}
    ran_by: set[str] = set()
    failed = []
    for fold in range(2):
        study = optuna.load_study(study_name=f"w-r0-f{fold}", storage=storage)
        trials = study.get_trials()
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(logical_trial_number(t) for t in done) == list(range(N_TRIALS))  # none lost, none twice
        assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
        assert all(t.user_attrs.get("surplus") for t in trials if t.state == optuna.trial.TrialState.PRUNED)
        ran_by |= {t.user_attrs["worker"].split(":")[-1] for t in done}
        for bad in (t for t in trials if t.state == optuna.trial.TrialState.FAIL):
            retry = [t for t in done if t.system_attrs.get("failed_trial") == bad.number]
            assert len(retry) == 1 and retry[0].params == bad.params and retry[0].number > bad.number
            failed.append((fold, bad.number))
    assert len(failed) == 1 and seen == [failed[0]]  # the killed trial, retried under its own number
    assert pids <= ran_by and str(os.getpid()) in ran_by  # both workers and the coordinator ran trials

    # One process, in memory, no workers: the same trials, scores and policy.
    ref_policy, ref_history = search_policy(x, y, SPEC, train_fn=train_tiny, storage=None, **SEARCH)
    assert history == ref_history
    assert policy == ref_policy and policy.meta == ref_policy.meta


def test_racing_workers_never_overshoot_the_trial_budget(tmp_path) -> None:
    """Four workers (threads, one study handle each) race for the last slots of one SQLite study."""
    storage = make_storage(f"sqlite:///{tmp_path / 'race.db'}", **BEAT)
    n = 7
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def evaluate(policy, trial_number: int) -> float:
        time.sleep(0.03)  # trials end together, so workers reach the budget check together
        return float(trial_number % 3)

    def work() -> None:
        try:
            study = optuna.create_study(study_name="race", storage=storage, direction="maximize", load_if_exists=True)
            start.wait()
            run_fold_trials(study, evaluate, n, num_policies=1, num_ops=1, poll_interval=0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    trials = optuna.load_study(study_name="race", storage=storage).get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in done) == list(range(n))
    assert {t.value for t in done} == {0.0, 1.0, 2.0}
    for t in trials:  # anything else is a surplus trial, stopped before it sampled a policy
        assert t.state == optuna.trial.TrialState.COMPLETE or (t.user_attrs.get("surplus") and not t.params)
    assert {t.user_attrs["worker"] for t in done} == {worker_id()}


if __name__ == "__main__":
    _worker_main(*sys.argv[1:])


def test_a_schema_race_is_retried_and_other_database_errors_are_not(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Workers that open an empty storage together race to create Optuna's tables; on PostgreSQL the
    loser gets DuplicateTable, a ProgrammingError (seen in CI: the two-worker test above, its worker
    died at start). That one is retried; a ProgrammingError of another kind is reported at once."""
    from sqlalchemy.exc import ProgrammingError

    from ltta.search import storage as storage_module

    real = storage_module.RDBStorage
    calls: list[int] = []

    def racing(*args, **kwargs):  # noqa: ANN002, ANN003 - RDBStorage's own signature
        calls.append(1)
        if len(calls) == 1:
            raise ProgrammingError("CREATE TABLE studies", {}, Exception('relation "studies" already exists'))
        return real(*args, **kwargs)

    monkeypatch.setattr(storage_module, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    assert make_storage(url, **BEAT) is not None and len(calls) == 2

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise ProgrammingError("SELECT", {}, Exception("permission denied for table studies"))

    monkeypatch.setattr(storage_module, "RDBStorage", broken)
    with pytest.raises(ValueError, match="permission denied for table studies"):
        make_storage(url, **BEAT)
