"""A real PostgreSQL server for the session (Debian's ``postgresql``; ``.ci/run`` installs it).

``initdb`` into a fresh folder under the system temp dir, ``pg_ctl start`` on a free port of
127.0.0.1 (and a unix socket in that folder), one database per test, ``pg_ctl stop`` at the
end. PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user the
Debian package creates (``nobody`` where it is missing), which owns the folder. pytest's own
tmp folders are private to root, so the server's folder is made outside them.

Where PostgreSQL cannot be started (not installed, no driver) the tests are skipped saying
why; under CI (``CI`` set) they fail instead, so a broken setup cannot pass unnoticed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def unavailable(reason: str) -> None:
    """Skip (fail under CI) with ``reason``."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests cannot run under CI: {reason}")
    pytest.skip(reason)


def _bin_dir() -> Path | None:
    """Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    found_bins = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    # the newest version: "15" < "9" as strings
    found_bins.sort(key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0)
    return found_bins[-1] if found_bins else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One started server: ``url(db)`` names a database on it, ``create(db)`` makes one."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dala-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.user is None:
                unavailable("running as root and neither a 'postgres' nor a 'nobody' user exists")
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kw = {}
        if self.user is not None:  # drop root for the server's own tools
            kw = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
            **kw,
        )

    def start(self) -> None:
        init = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        if init.returncode != 0:
            unavailable(f"initdb failed ({init.returncode}): {init.stdout}{init.stderr}")
        started = self._pg_ctl_start()
        if started.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            unavailable(f"pg_ctl start failed: {started.stdout}{started.stderr}{log}")

    def _pg_ctl_start(self) -> subprocess.CompletedProcess:
        # 127.0.0.1 only; the socket in our folder (not /var/run/postgresql, root's);
        # no fsync: a test server need not survive a power cut
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -F"
        return self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                         "-w", "-t", "60", "start")  # fmt: skip

    def outage(self, seconds: float) -> None:
        """Crash the server (``immediate``: no clean shutdown, clients cut off), keep it down
        ``seconds``, start it again on the same port and data."""
        import time

        down = self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        assert down.returncode == 0, down.stdout + down.stderr
        time.sleep(seconds)
        up = self._pg_ctl_start()
        assert up.returncode == 0, up.stdout + up.stderr + self.log.read_text()

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str) -> str:
        # trust authentication on 127.0.0.1: no password to leak into plans or logs
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create(self, db: str) -> str:
        """CREATE DATABASE ``db``; its URL."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        return self.url(db)

    def query(self, db: str, sql: str) -> list[tuple]:
        """Rows of ``sql`` run on ``db``: read the stored records straight from PostgreSQL."""
        import psycopg

        with psycopg.connect(self.url(db)) as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A started PostgreSQL server, stopped and removed at the end of the session."""
    try:
        # SQLAlchemy 2.1's driver for postgresql:// URLs (Optuna's and MLflow's)
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed (pip install -e '.[dev]')")
    bin_dir = _bin_dir()
    if bin_dir is None:
        unavailable("PostgreSQL's initdb not found (apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_db(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh database for this test (named after it); its URL."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name).lower()[:50]
    return postgres.create(name)
