"""The Optuna storage of a search, checked before anything is created (no Optuna import).

Optuna opens its storage only when a study starts, after the search folder, the MLflow
experiment and Ray exist; and opening it creates tables. These checks read only: a sqlite
file's folder must exist and be writable, any other database must accept a connection, and
a new search's study names must be free there. Nothing is written to the storage.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dala_search.errors import ConfigError

EXAMPLES = "e.g. sqlite:////abs/path/optuna.db or postgresql://user:pass@host/db"


def check_storage_url(value: Any) -> str:
    """``value`` when it parses as a database URL whose SQLAlchemy dialect is installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not isinstance(value, str):
        raise ConfigError(f"{value!r} is not a database URL; {EXAMPLES}")
    try:
        url = make_url(value)
        url.get_dialect()  # NoSuchModuleError (an ArgumentError): unknown dialect or driver
    except ArgumentError as e:
        raise ConfigError(
            f"{value!r} is not a database URL Optuna can use ({e}); {EXAMPLES}"
        ) from None
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError(
            f"{value!r} is an in-memory database: a study there is lost with the process "
            f"and unseen by the search's other connections; name a file, {EXAMPLES}"
        )
    return value


def check_storage(url: str, studies: Sequence[str], *, new: bool) -> None:
    """Refuse (ConfigError) a storage a search cannot use, reading only.

    sqlite: the file's folder exists and is writable, and an existing file is a writable
    sqlite database. Other URLs: a connection opens. ``new``: none of ``studies`` exists
    there yet (a new search's study names; a resumed search continues its own).
    """
    from sqlalchemy.engine import make_url

    check_storage_url(url)
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        taken = _sqlite_studies(Path(parsed.database or ""), shown, studies)
    else:
        taken = _server_studies(url, shown, studies)
    if new and taken:
        raise ConfigError(
            f"{shown} already holds Optuna stud{'ies' if len(taken) > 1 else 'y'} "
            f"{', '.join(map(repr, taken))}: another search used this name; choose another "
            "--name (or another --storage)"
        )


def _sqlite_studies(path: Path, shown: str, studies: Sequence[str]) -> list[str]:
    path = path.expanduser().absolute()
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(
            f"{shown}: folder {folder} does not exist; create it, or leave --storage out "
            "(the study then lives in the search folder)"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{shown}: folder {folder} is not writable")
    if not path.exists():
        return []
    if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"{shown}: {path} is not a readable and writable file")
    try:  # read-only: checking must not create or change anything
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("select name from sqlite_master")}
            if not studies or "studies" not in tables:
                return []
            marks = ",".join("?" * len(studies))
            query = f"select study_name from studies where study_name in ({marks})"
            return sorted(r[0] for r in db.execute(query, list(studies)))
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"{shown}: {path} is not a usable sqlite database ({e})") from None


def _server_studies(url: str, shown: str, studies: Sequence[str]) -> list[str]:
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, connect_args=_timeout(url))
    try:
        with engine.connect() as conn:
            # No names to look for (a resumed search): the connection was the check. An
            # empty IN list also renders as an integer subquery PostgreSQL refuses.
            if not studies or not inspect(conn).has_table("studies"):
                return []
            rows = conn.execute(
                text("select study_name from studies where study_name in :names").bindparams(
                    _expanding("names")
                ),
                {"names": list(studies)},
            )
            return sorted(r[0] for r in rows)
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise ConfigError(f"cannot connect to the Optuna storage {shown}: {reason}") from None
    finally:
        engine.dispose()


def _expanding(name: str) -> Any:
    from sqlalchemy import bindparam

    return bindparam(name, expanding=True)


def _timeout(url: str) -> dict[str, Any]:
    """Fail in seconds on an unreachable server (psycopg and PyMySQL take these keys)."""
    return {"connect_timeout": 5} if url.startswith(("postgresql", "mysql")) else {}
