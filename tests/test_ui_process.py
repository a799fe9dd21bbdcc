"""``dala-search ui`` ends when told (issue 19, section 2).

A process supervisor or ``timeout`` stops the command with SIGTERM (a terminal with SIGINT):
the MLflow server it started and every worker of that server must end with it, leaving the
port free. The real command runs as a subprocess with MLflow's defaults (its job runner
included); its process tree is read from /proc before the signal and checked after.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)"),
]


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of ``pid``; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return int(fields[1]), fields[0], fields[19]


def _descendants(root: int) -> dict[int, str]:
    """Every living process below ``root``: pid -> start time (tells a reused pid apart)."""
    parent: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parent[int(entry.name)], started[int(entry.name)] = st[0], st[2]
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found[child] = started[child]
                frontier.append(child)
    return found


def _alive(pid: int, started: str) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == started and st[1] != "Z"  # a zombie holds no port


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_with_its_server_and_workers(tmp_path: Path, sig: signal.Signals) -> None:
    port = _free_port()
    # MLflow's own defaults: its job runner and its consumers are among the processes to stop
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}
    env["MLFLOW_WORKERS"] = "2"  # still several workers; 4 take a minute to start on 2 cores
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dala_search.cli", "ui", "--port", str(port),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    tree: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the UI did not come up:\n{(tmp_path / 'ui.log').read_text()}")
            time.sleep(0.5)
        time.sleep(2)  # MLflow starts its job runner after the server
        tree = _descendants(proc.pid)
        assert tree, "the UI runs no server process"

        proc.send_signal(sig)  # to the command alone, as `timeout` and a supervisor do
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10  # a process may take a moment to leave the port
        while time.monotonic() < deadline and (
            _answers(port) or any(_alive(p, t) for p, t in tree.items())
        ):
            time.sleep(0.2)
        assert not _answers(port), f"port {port} still answers after {sig.name}"
        left = [p for p, t in tree.items() if _alive(p, t)]
        assert not left, f"processes of the UI still running after {sig.name}: {left}"
    finally:
        for p, t in tree.items():  # never leave a server behind, even when the test fails
            if _alive(p, t):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
