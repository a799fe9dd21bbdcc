"""Searches whose records live in a real PostgreSQL server (issue 19, section 3).

The README recommends ``--storage postgresql://...`` for clusters, and a team's MLflow
tracking server usually runs on a database too: each test starts real searches (Ray,
tiny synthetic set) against the session's PostgreSQL server (conftest.py) and reads the
records back, through Optuna / MLflow and straight from PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from dala_search.runs import schema
from dala_search.runs.plan import SearchPlan
from dala_search.search.tuner import plan_search, run_search

pytestmark = pytest.mark.slow


def _db(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _study_rows(postgres, url: str) -> list[tuple]:  # noqa: ANN001
    """(study name, trial state, count) straight from Optuna's tables in PostgreSQL."""
    return sorted(
        postgres.query(
            _db(url),
            "SELECT s.study_name, t.state::text, count(*) FROM trials t "
            "JOIN studies s ON s.study_id = t.study_id GROUP BY 1, 2",
        )
    )


def _cli(*args: str, env: dict) -> subprocess.Popen:  # noqa: ANN202
    return subprocess.Popen(
        [sys.executable, "-m", "dala_search.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_search_study_on_postgres(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    postgres,  # noqa: ANN001
    pg_db: str,
    checked_records: Callable,
) -> None:
    import ray

    plan = plan_search(
        space=str(tiny_space),
        name="pg",
        data_dir=demo_root,
        trials=2,
        epochs=1,
        max_concurrent=1,
        storage=pg_db,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        runs_dir=tmp_path / "runs",
    )
    try:
        (outcome,) = run_search(plan)
    finally:
        ray.shutdown()
    assert outcome.finished == 2 and outcome.completed == 2, outcome
    # the plan (what `resume` and `best` read) names the PostgreSQL study, not a sqlite file
    assert SearchPlan.load(tmp_path / "runs" / "pg").storage == pg_db
    assert not (tmp_path / "runs" / "pg" / "optuna.db").exists()
    trials, runs = checked_records(plan)  # Optuna study loaded from PostgreSQL, MLflow agrees
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.value is not None for t in trials)
    assert _study_rows(postgres, pg_db) == [("pg-40X", "COMPLETE", 2)]


@pytest.mark.timeout(900)
def test_two_searches_at_once_share_one_server(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    postgres,  # noqa: ANN001
    pg_db: str,
    checked_records: Callable,
) -> None:
    """Two `dala-search start` processes, one PostgreSQL database for both studies."""
    env = {**os.environ, "DALA_RUNS_DIR": str(tmp_path / "runs")}
    counts = {"a": 2, "b": 3}  # different counts: a study that took the other's trials shows
    procs = {}
    for name, n in counts.items():
        procs[name] = _cli(
            "start", "--space", str(tiny_space), "--name", name, "--trials", str(n),
            "--epochs", "1", "--max-concurrent", "1", "--data", str(demo_root),
            "--storage", pg_db, "--tracking-uri", f"sqlite:///{tmp_path / name}-mlflow.db",
            env=env,
        )  # fmt: skip
    outs = {name: p.communicate(timeout=800)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{outs[name]}"

    windows = {}
    for name, n in counts.items():
        plan = SearchPlan.load(tmp_path / "runs" / name)
        assert plan.storage == pg_db
        trials, _ = checked_records(plan)
        assert len(trials) == n and {t.state.name for t in trials} == {"COMPLETE"}
        assert [t.number for t in trials] == list(range(n))  # each study numbers its own
        windows[name] = (
            min(t.datetime_start for t in trials),
            max(t.datetime_complete for t in trials),
        )
    assert _study_rows(postgres, pg_db) == [
        ("a-40X", "COMPLETE", 2),
        ("b-40X", "COMPLETE", 3),
    ]
    # they really ran at once: each search's trials began before the other's ended
    (a0, a1), (b0, b1) = windows["a"], windows["b"]
    assert a0 < b1 and b0 < a1, windows


@pytest.mark.timeout(900)
def test_interrupted_search_on_postgres_resumes_exactly(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    postgres,  # noqa: ANN001
    pg_db: str,
    checked_records: Callable,
) -> None:
    n_trials = 3
    env = {**os.environ, "DALA_RUNS_DIR": str(tmp_path / "runs")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _cli(
        "start", "--space", str(tiny_space), "--name", "cut", "--trials", str(n_trials),
        "--epochs", "2", "--max-concurrent", "1", "--data", str(demo_root),
        "--storage", pg_db, "--tracking-uri", uri,
        env=env,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # one trial recorded, then a scheduler's SIGTERM
        lines.append(line)
        if f"1/{n_trials} trials done" in line:
            break
    else:
        pytest.fail("search ended before it could be interrupted:\n" + "".join(lines))
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "dala-search resume cut" in out
    interrupted = _study_rows(postgres, pg_db)
    assert ("cut-40X", "COMPLETE", 1) in interrupted, interrupted

    resumed = subprocess.run(
        [sys.executable, "-m", "dala_search.cli", "resume", "cut"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    plan = SearchPlan.load(tmp_path / "runs" / "cut")
    assert plan.storage == pg_db
    trials, runs = checked_records(plan)
    assert len(trials) == n_trials  # exactly the requested trials, none lost, none duplicated
    # the interrupted trial (if any) was finished in the study: none left RUNNING there
    rows = _study_rows(postgres, pg_db)
    assert sum(c for _, _, c in rows) == n_trials and all(s != "RUNNING" for _, s, _ in rows)
    parent = MlflowClient(uri).get_run(runs[0].data.tags[schema.PARENT_TAG])
    assert parent.info.status == "FINISHED"


@pytest.mark.timeout(900)
def test_mlflow_server_on_postgres_receives_runs_through_a_restart(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    postgres,  # noqa: ANN001
    start_mlflow_server,  # noqa: ANN001
    checked_records: Callable,
) -> None:
    """A team's setup: `mlflow server --backend-store-uri postgresql://...`, the Optuna study
    in the same PostgreSQL server. The tracking server is killed while the first trial logs
    and restarted 6 s later; the search goes on and every record arrives."""
    import ray

    studies = postgres.create("t_restart_optuna")
    store = postgres.create("t_restart_mlflow")
    (tmp_path / "server").mkdir()
    server = start_mlflow_server(tmp_path / "server", store)
    uri = server.uri
    outage: dict[str, float] = {}

    cutter = threading.Thread(target=server.cut_when_trials_log, args=(outage,), daemon=True)
    cutter.start()
    plan = plan_search(
        space=str(tiny_space),
        name="team",
        data_dir=demo_root,
        trials=2,
        epochs=4,
        max_concurrent=1,
        storage=studies,
        tracking_uri=uri,
        runs_dir=tmp_path / "runs",
    )
    try:
        try:
            (outcome,) = run_search(plan)
        finally:
            ray.shutdown()
        cutter.join(timeout=120)
        assert "end" in outage, "the outage never happened"
        assert outcome.completed == 2 and outcome.registered_version is not None, outcome
        trials, runs = checked_records(plan)
        client = MlflowClient(uri)
        for run in runs:
            tags = run.data.tags
            assert tags[schema.TAG_STATE] == "completed"
            assert tags[schema.TAG_MAG] == "40X"
            assert tags[schema.TAG_SEARCH] == "team"
            assert run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
            assert sorted(m.step for m in history) == [1, 2, 3, 4]  # no gap, no duplicate
        assert sorted(int(r.data.tags[schema.TAG_OPTUNA_NUMBER]) for r in runs) == [0, 1]
        # the runs are in PostgreSQL (the server keeps nothing of its own), none RUNNING
        [(n_trial_runs,)] = postgres.query(
            "t_restart_mlflow",
            f"SELECT count(*) FROM tags WHERE key = '{schema.TAG_ROLE}' AND value = 'trial'",
        )
        assert n_trial_runs == 2
        assert postgres.query("t_restart_mlflow", "SELECT run_uuid FROM runs WHERE "
                              "status = 'RUNNING'") == []  # fmt: skip
        assert not (tmp_path / "server" / "mlflow.db").exists()
        assert _study_rows(postgres, studies) == [("team-40X", "COMPLETE", 2)]
        assert optuna.load_study(study_name="team-40X", storage=studies).best_trial is not None
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.timeout(900)
def test_postgres_restart_mid_trial(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    postgres,  # noqa: ANN001
    pg_db: str,
    checked_records: Callable,
) -> None:
    """The database of the Optuna study crashes (``pg_ctl stop -m immediate``) while the
    first trial trains, and is back 6 s later, before the trial's next report: the search
    goes on and records every epoch. The trial waits after its first epoch (a ``barrier``
    fault the test releases once the server is back), so the restart falls between two
    reports every time; before pool_pre_ping the driver then died on the pool's dead
    connection (StorageInternalError) and left the trial RUNNING."""
    arrivals = tmp_path / "arrivals"
    fault = {"kind": "barrier", "epoch": 1, "once": str(tmp_path / "token"),
             "dir": str(arrivals), "count": 2, "timeout_s": 300}  # fmt: skip
    outage: dict[str, float] = {}

    def restart_while_the_trial_waits() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                [(n,)] = postgres.query(
                    _db(pg_db), "SELECT count(*) FROM trial_intermediate_values"
                )
            except Exception:
                n = 0
            if n and arrivals.is_dir() and any(arrivals.iterdir()):
                break
            time.sleep(0.3)
        postgres.outage(6)
        outage["end"] = time.monotonic()
        (arrivals / "released").touch()  # the trial goes on to its next epoch

    env = {
        **os.environ,
        "DALA_RUNS_DIR": str(tmp_path / "runs"),
        "DALA_FAULTS": json.dumps([fault]),
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cutter = threading.Thread(target=restart_while_the_trial_waits, daemon=True)
    cutter.start()
    first = subprocess.run(
        [sys.executable, "-m", "dala_search.cli", "start", "--space", str(tiny_space),
         "--name", "pgcut", "--trials", "2", "--epochs", "3", "--max-concurrent", "1",
         "--data", str(demo_root), "--storage", pg_db, "--tracking-uri", uri],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    cutter.join(timeout=120)
    assert "end" in outage, "the outage never happened"
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    plan = SearchPlan.load(tmp_path / "runs" / "pgcut")
    trials, runs = checked_records(plan)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [sorted(t.intermediate_values) for t in trials] == [[1, 2, 3], [1, 2, 3]]
    assert _study_rows(postgres, pg_db) == [("pgcut-40X", "COMPLETE", 2)]
