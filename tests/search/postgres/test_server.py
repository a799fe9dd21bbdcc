"""The session's PostgreSQL server is real, local and ours (conftest.py)."""

from __future__ import annotations


def test_server_is_postgresql_on_localhost_only(postgres, pg_db: str) -> None:  # noqa: ANN001
    db = pg_db.rsplit("/", 1)[1]
    [(version,)] = postgres.query(db, "SELECT version()")
    assert version.startswith("PostgreSQL ")
    assert postgres.query(db, "SHOW listen_addresses") == [("127.0.0.1",)]
    assert postgres.query(db, "SHOW port") == [(str(postgres.port),)]
    [(owner,)] = postgres.query(db, "SELECT current_database()")
    assert owner == db
