"""``start``'s check of a PostgreSQL Optuna storage, on a real server: it connects, finds a
study name taken, and reads only (no table created in an empty database)."""

from __future__ import annotations

import optuna
import pytest

from dala_search.errors import ConfigError
from dala_search.runs.storage import check_storage


def test_a_taken_study_name_is_refused_and_nothing_is_written(postgres, pg_db: str) -> None:
    tables = "select count(*) from information_schema.tables where table_schema = 'public'"
    db = pg_db.rsplit("/", 1)[1]
    check_storage(pg_db, ["a-40X"], new=True)  # an empty database: free, and left empty
    assert postgres.query(db, tables) == [(0,)]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="taken-40X", storage=pg_db)
    before = postgres.query(db, tables)
    with pytest.raises(ConfigError, match=r"already holds Optuna study 'taken-40X'.*--name"):
        check_storage(pg_db, ["taken-40X", "taken-100X"], new=True)
    check_storage(pg_db, ["free-40X"], new=True)
    check_storage(pg_db, ["taken-40X"], new=False)  # a resumed search continues its own
    check_storage(pg_db, [], new=False)  # resume checks the connection only (no names)
    assert postgres.query(db, tables) == before


def test_a_server_that_does_not_answer_is_refused(postgres) -> None:
    url = postgres.url("postgres").replace(f":{postgres.port}/", ":1/")
    with pytest.raises(ConfigError, match="cannot connect to the Optuna storage"):
        check_storage(url, ["x-40X"], new=True)
