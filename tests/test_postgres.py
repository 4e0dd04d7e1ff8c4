"""The PostgreSQL fixtures: a fresh database per use, dropped after; no server means skip (fail in CI)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import postgres_database

CLOSED = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1


def test_a_fresh_database_is_made_and_dropped(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("create table t (x int)"))
        conn.execute(text("insert into t values (1)"))
        assert conn.execute(text("select count(*) from t")).scalar() == 1
    engine.dispose()


def test_no_server_skips_naming_it_unless_ci_requires_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LTTA_TEST_POSTGRES", CLOSED)
    monkeypatch.delenv("LTTA_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no PostgreSQL at postgresql://postgres@127\.0\.0\.1:1/test"):
        with postgres_database("x"):
            pass
    monkeypatch.setenv("LTTA_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="set LTTA_TEST_POSTGRES to one"):
        with postgres_database("x"):
            pass
