"""Faults injected for real and the record checked afterwards (issue: reliability).

Each test runs a real search (Ray, Optuna sqlite study, MLflow store) on the tiny synthetic
set; faults come from ``$DALA_FAULTS`` (dala_search/faults.py), raised inside the real
trial processes. Afterwards: the Optuna study, the MLflow runs and the outcome agree, and
nothing is left RUNNING.
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

import pytest
from mlflow import MlflowClient

from dala_search.runs import schema
from dala_search.search import tracking
from dala_search.search.tuner import plan_search, run_search

pytestmark = pytest.mark.slow


def _search(tmp: Path, demo_root: Path, space: Path, uri: str | None = None, **kw):  # noqa: ANN202
    import ray

    uri = uri or f"sqlite:///{tmp / 'mlflow.db'}"
    plan = plan_search(
        space=str(space), data_dir=demo_root, tracking_uri=uri, runs_dir=tmp / "runs", **kw
    )
    try:
        outcomes = run_search(plan)
    finally:
        ray.shutdown()
    return plan, outcomes


def _faults(monkeypatch: pytest.MonkeyPatch, tmp: Path, *faults: dict) -> None:
    for i, f in enumerate(faults):
        f.setdefault("once", str(tmp / f"token-{i}"))
    monkeypatch.setenv("DALA_FAULTS", json.dumps(list(faults)))


def test_raising_trials_fail_alone_and_are_not_rerun(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    monkeypatch: pytest.MonkeyPatch,
    checked_records: Callable,
) -> None:
    """A bug, an out-of-memory error and a NaN loss, one trial each, in one search."""
    _faults(
        monkeypatch,
        tmp_path,
        {"kind": "raise", "epoch": 1},
        {"kind": "oom", "epoch": 1},
        {"kind": "nan"},
    )
    plan, (outcome,) = _search(tmp_path, demo_root, tiny_space, trials=4, max_retries=2)
    trials, runs = checked_records(plan)
    assert outcome.finished == 4 and outcome.failed == 3 and outcome.completed == 1
    errors = sorted(r.data.tags.get("dala.error", "").split(":")[0] for r in runs)
    assert errors == ["", "NonFiniteLossError", "OutOfMemoryError", "RuntimeError"], errors
    nan_run = next(r for r in runs if r.data.tags.get("dala.error", "").startswith("NonFinite"))
    # The NaN was caught in the first epoch: no epoch was ever reported.
    assert "val_balanced_accuracy" not in nan_run.data.metrics
    # Tune restarted them (max_retries=2) but none trained again: one attempt each.
    assert {r.data.tags[schema.TAG_ATTEMPT] for r in runs} == {"1"}
    # The failed configurations are not proposed again unchanged.
    failed = [t.params for t in trials if t.state.name == "FAIL"]
    others = [t.params for t in trials]
    assert all(others.count(p) == 1 for p in failed)
    # The best is the one completed trial.
    done = next(r for r in runs if r.data.tags[schema.TAG_STATE] == "completed")
    assert outcome.best_run_id == done.info.run_id
    (row,) = schema.best_table(plan.tracking_uri, plan.name)
    assert row["best_run_id"] == done.info.run_id


@pytest.mark.parametrize("retries", [1, 0])
def test_trial_process_killed_mid_epoch(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    monkeypatch: pytest.MonkeyPatch,
    retries: int,
    checked_records: Callable,
) -> None:
    """SIGKILL in the second epoch: restarted into its own run (retries), or failed (0)."""
    _faults(monkeypatch, tmp_path, {"kind": "sigkill", "epoch": 1, "delay_s": 0.2})
    plan, (outcome,) = _search(
        tmp_path, demo_root, tiny_space, trials=2, epochs=3, max_retries=retries
    )
    assert (tmp_path / "token-0").exists()  # the fault really fired
    trials, runs = checked_records(plan)
    attempts = sorted(r.data.tags[schema.TAG_ATTEMPT] for r in runs)
    if retries:
        assert outcome.completed == 2 and outcome.failed == 0
        assert attempts == ["1", "2"]
        killed = next(r for r in runs if r.data.tags[schema.TAG_ATTEMPT] == "2")
        history = MlflowClient(plan.tracking_uri).get_metric_history(
            killed.info.run_id, "val_balanced_accuracy"
        )
        assert max(m.step for m in history) == 3  # trained to the end after the restart
    else:
        assert outcome.completed == 1 and outcome.failed == 1
        assert attempts == ["1", "1"]


def _cli(*args: str, env: dict) -> subprocess.Popen:  # noqa: ANN202
    return subprocess.Popen(
        [sys.executable, "-m", "dala_search.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("sig", "workers", "cv"),
    [(signal.SIGINT, 1, 1), (signal.SIGTERM, 1, 1), (signal.SIGINT, 2, 1), (signal.SIGINT, 1, 2)],
    ids=["SIGINT", "SIGTERM", "SIGINT-ddp", "SIGINT-cv2"],
)
def test_driver_interrupted_then_resumed_completes_exactly(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    sig: signal.Signals,
    workers: int,
    cv: int,
    checked_records: Callable,
) -> None:
    # workers=2: data-parallel trials (Ray Train, gloo), interrupted and resumed the same
    # way; fewer and shorter trials (each starts a process group: ~4x a plain trial's cost)
    # cv=2: cross-validated trials (two fold models each), interrupted and resumed the same way
    # Kept small (the suite's longest tests): one trial done before the signal, the rest
    # (one in flight, lost or kept, and those not started) after the resume.
    n_trials, epochs = (3, 2) if workers == 1 else (2, 1)
    env = {**os.environ, "DALA_RUNS_DIR": str(tmp_path / "runs")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--data", str(demo_root), "--tracking-uri", uri]
    proc = _cli(
        "start",
        "--space",
        str(tiny_space),
        "--name",
        "cut",
        "--trials",
        str(n_trials),
        "--epochs",
        str(epochs),
        "--max-concurrent",
        "1",
        "--workers-per-trial",
        str(workers),
        "--cv",
        str(cv),
        *common,
        env=env,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for one finished trial, then interrupt
        lines.append(line)
        if f"1/{n_trials} trials done" in line:
            break
    else:
        pytest.fail("search ended before it could be interrupted:\n" + "".join(lines))
    sent = time.monotonic()
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert time.monotonic() - sent < 60, "did not stop within a minute"
    assert "dala-search resume cut" in out

    plan_path = tmp_path / "runs" / "cut" / "search.json"
    assert plan_path.is_file()
    resumed = subprocess.run(
        [sys.executable, "-m", "dala_search.cli", "resume", "cut"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    from dala_search.runs.plan import SearchPlan

    plan = SearchPlan.load(plan_path.parent)
    trials, runs = checked_records(plan)
    assert len(trials) == n_trials  # exactly the requested trials, none lost, none duplicated
    assert plan.workers_per_trial == workers  # the resumed search kept its layout
    assert plan.cv == cv and {r.data.tags[schema.TAG_CV] for r in runs} == {str(cv)}
    if cv > 1:  # trials after the resume were scored on the same folds' mean
        for run in runs:
            if run.data.tags[schema.TAG_STATE] == "completed":
                m = run.data.metrics
                folds = [m[f"cv_fold_{k}_val_balanced_accuracy"] for k in (1, 2)]
                assert m["val_balanced_accuracy"] == pytest.approx(sum(folds) / 2)
    client = MlflowClient(uri)
    parent = client.get_run(runs[0].data.tags[schema.PARENT_TAG])
    assert parent.info.status == "FINISHED"
    if workers > 1:
        from dala_search.runs.schema import TAG_WORKERS

        # every trial, before and after the interruption, ran data parallel
        assert {r.data.tags[TAG_WORKERS] for r in runs} == {str(workers)}


def test_mlflow_server_briefly_unreachable(
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    start_mlflow_server,  # noqa: ANN001
    checked_records: Callable,
) -> None:
    """The server goes away mid-trial for a few seconds: nothing recorded is lost."""
    (tmp_path / "server").mkdir()
    server = start_mlflow_server(tmp_path / "server")
    uri = server.uri
    outage: dict[str, float] = {}

    cutter = threading.Thread(target=server.cut_when_trials_log, args=(outage,), daemon=True)
    cutter.start()
    try:
        plan, (outcome,) = _search(
            tmp_path, demo_root, tiny_space, uri=uri, trials=1, epochs=6, max_concurrent=1
        )
        cutter.join(timeout=120)
        assert "end" in outage, "the outage never happened"
        trials, runs = checked_records(plan)
        assert outcome.completed == 1
        (run,) = runs
        history = MlflowClient(uri).get_metric_history(run.info.run_id, "val_balanced_accuracy")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # no gap
        assert run.data.tags[schema.TAG_STATE] == "completed"
    finally:
        server.stop(signal.SIGKILL)


def test_two_searches_with_one_name_are_refused(
    tmp_path: Path, demo_root: Path, tiny_space: Path
) -> None:
    from dala_search.errors import DalaError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = {"space": str(tiny_space), "name": "twin", "data_dir": demo_root, "tracking_uri": uri}
    first = plan_search(runs_dir=tmp_path / "a", **kw)
    rival = plan_search(runs_dir=tmp_path / "a", **kw)  # both pass the check before either saves
    first.save(new=True)
    with pytest.raises(DalaError, match="already exists"):
        rival.save(new=True)  # the race is lost cleanly, the first plan untouched
    assert json.loads((tmp_path / "a" / "twin" / "search.json").read_text()) == json.loads(
        json.dumps(first.__dict__, default=list)
    )
    with pytest.raises(DalaError, match="resume twin"):
        plan_search(runs_dir=tmp_path / "a", **kw)
    # Another folder, same tracking store: the experiment belongs to the first search.
    tracking.SearchTracker(uri, "twin", folder=first.folder)
    with pytest.raises(DalaError, match="already has a search named 'twin'"):
        plan_search(runs_dir=tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()
