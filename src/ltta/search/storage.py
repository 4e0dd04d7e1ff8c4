"""Optuna RDB storage shared by several search worker processes.

Several ``ltta search-policy --worker`` processes (and the plain ``ltta search-policy``) point at
one RDB URL, e.g. ``sqlite:///policies/faa_search.db``. Three things make that safe:

* SQLite serialises writers with a file lock; ``connect_args={"timeout": ...}`` makes a writer
  wait for it instead of failing at once with "database is locked".
* Every running trial sends a heartbeat (Optuna's heartbeat thread). A trial whose worker was
  killed stops beating; after ``grace_period`` any worker marks it FAIL and
  ``RetryHeartbeatStaleTrialCallback`` enqueues a copy with the same parameters, which the next
  free worker runs. The killed trial is retried, not lost.
* Workers that start at the same moment race to create the schema; creation is retried.

A SQLite file is switched to write-ahead logging with ``synchronous=NORMAL``: readers no longer
block the writer, and a commit no longer waits for the disk (Optuna commits once per suggested
parameter: this makes a trial ~3x cheaper). A killed process still loses nothing; a power cut
may lose the last trials, which are simply rerun. WAL needs the workers on one host (no network
file system): pass ``wal=False`` otherwise.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError, DatabaseError, IntegrityError, NoSuchModuleError, OperationalError, ProgrammingError,
)

DEFAULT_HEARTBEAT_S = 10  # a running trial beats every 10 s ...
DEFAULT_GRACE_S = 60  # ... and counts as dead (its worker killed) after 60 s without a beat
DEFAULT_LOCK_TIMEOUT_S = 60.0  # how long a SQLite writer waits for the database lock
DEFAULT_MAX_RETRY = 3  # retries of one trial whose workers keep dying, before the slot is re-sampled


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, or None (another backend, or in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def default_model_cache(url: str | None) -> Path | None:
    """Where fold models are cached for a storage: ``<db dir>/<db stem>_models`` beside a SQLite file.

    None for no storage or a server database (workers on other machines share no folder with
    it); every worker then trains its own fold models.
    """
    if url is None:
        return None
    path = sqlite_path(url)
    return None if path is None else path.with_name(f"{path.stem}_models")


def make_storage(
    url: str,
    *,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = DEFAULT_GRACE_S,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    max_retry: int | None = DEFAULT_MAX_RETRY,
    wal: bool = True,
    attempts: int = 5,
) -> RDBStorage:
    """An :class:`optuna.storages.RDBStorage` for ``url`` that several processes can share.

    Creates the folder of a SQLite file (in WAL mode unless ``wal=False``).
    ``heartbeat_interval``/``grace_period`` (seconds) set how soon a killed worker's trial is
    failed and retried (``max_retry`` times at most).
    """
    if heartbeat_interval < 1:
        raise ValueError(f"heartbeat_interval must be a positive number of seconds, got {heartbeat_interval}")
    db = sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, object] = {"connect_args": {"timeout": lock_timeout}}
    else:
        engine_kwargs = {"pool_pre_ping": True}

    def create() -> RDBStorage:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; we rely on them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )

    for attempt in range(1, attempts + 1):
        try:
            storage = create()
            break
        except (OperationalError, IntegrityError, ProgrammingError) as exc:
            # Two workers creating the tables at once: SQLite says "table already exists" (an
            # OperationalError), PostgreSQL raises DuplicateTable (a ProgrammingError) or a unique
            # violation on its catalogue (an IntegrityError). Any other ProgrammingError is a real one.
            racing = not isinstance(exc, ProgrammingError) or "already exists" in str(getattr(exc, "orig", exc))
            if attempt == attempts or not racing:
                raise _unusable(url, exc) from exc
            time.sleep(0.2 * attempt)
        except (DatabaseError, ArgumentError, NoSuchModuleError, ImportError) as exc:  # a foreign file, a bad URL
            raise _unusable(url, exc) from exc
    if db is not None and wal:
        event.listen(storage.engine, "connect", _sqlite_wal)
        storage.engine.dispose()  # reopen the pooled connections with the pragmas
    return storage


def _unusable(url: str, exc: Exception) -> ValueError:
    """The storage's error in one line, with the URL and the fix (the params key that sets it)."""
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).splitlines() or [""])[0]
    return ValueError(
        f"search storage {url!r} cannot be used ({type(cause).__name__}: {first}); point search_policy.storage "
        "at a new database file (or delete a damaged one, losing its trials), or install the database's driver"
    )


def _sqlite_wal(dbapi_connection, _record) -> None:  # noqa: ANN001 - SQLAlchemy's DBAPI connection
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
