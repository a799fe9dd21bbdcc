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


def _search_runs(uri: str, name: str) -> list:
    """Every MLflow run of search ``name`` (none while its experiment does not exist)."""
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(schema.experiment_name(name))
    except Exception:  # the driver is still creating the store's tables
        return []
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.mark.timeout(900)
def test_sigterm_to_the_whole_process_group_mid_trial(
    tmp_path: Path, demo_root: Path, tiny_space: Path, checked_records: Callable
) -> None:
    """``timeout``, Slurm and systemd signal the driver's whole process group: Ray's GCS and
    raylet die with it, and the driver used to wait 60 s on them, then exit 1 with every run
    RUNNING (issue 19). Now: out in seconds, nothing RUNNING, and the resume is exact."""
    env = {**os.environ, "DALA_RUNS_DIR": str(tmp_path / "runs")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "driver.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads while we wait
        proc = subprocess.Popen(
            [sys.executable, "-m", "dala_search.cli", "start", "--space", str(tiny_space),
             "--name", "group", "--trials", "2", "--epochs", "2", "--max-concurrent", "1",
             "--data", str(demo_root), "--tracking-uri", uri],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not any(
            r.data.tags.get(schema.TAG_ROLE) == "trial" for r in _search_runs(uri, "group")
        ):
            assert proc.poll() is None, "search ended before a trial ran:\n" + log.read_text()
            assert time.monotonic() < deadline, "no trial started:\n" + log.read_text()
            time.sleep(0.3)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # the driver, Ray's head processes, its agents
        proc.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 130, text
    assert took < 15, f"stopped after {took:.0f} s:\n{text}"
    assert "continue with `dala-search resume group`" in text
    runs = _search_runs(uri, "group")
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags[schema.TAG_ROLE], []).append(r)
    assert [r.info.status for r in by_role["magnification"]] == ["KILLED"]
    cut = [r for r in by_role["trial"] if r.data.tags[schema.TAG_STATE] != "completed"]
    assert cut and all(
        (r.info.status, r.data.tags[schema.TAG_STATE]) == ("KILLED", "interrupted") for r in cut
    )

    resumed = subprocess.run(
        [sys.executable, "-m", "dala_search.cli", "resume", "group"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    from dala_search.runs.plan import SearchPlan

    trials, runs = checked_records(SearchPlan.load(tmp_path / "runs" / "group"))
    assert len(trials) == 2  # exactly the requested trials
    parent = MlflowClient(uri).get_run(runs[0].data.tags[schema.PARENT_TAG])
    assert parent.info.status == "FINISHED"


# `dala-search start` with the study's creation failing: after the search folder, the MLflow
# experiment, the magnification's parent run and Ray exist (the burnt name).
_FAILING_START = """
import sys
from dala_search.search import tuner

def refuse(*args, **kwargs):
    raise RuntimeError("the study storage refused the study (injected)")

tuner.make_searcher = refuse
from dala_search.cli import main
main()
"""


@pytest.mark.timeout(900)
def test_a_start_that_fails_after_creation_is_rolled_back_and_its_name_reusable(
    tmp_path: Path, demo_root: Path, tiny_space: Path, checked_records: Callable
) -> None:
    from dala_search.runs.plan import SearchPlan

    env = {**os.environ, "DALA_RUNS_DIR": str(tmp_path / "runs")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["start", "--space", str(tiny_space), "--name", "again", "--trials", "1",
            "--epochs", "1", "--data", str(demo_root), "--tracking-uri", uri]  # fmt: skip

    def cli(*argv: str, fail: bool = False) -> subprocess.CompletedProcess:
        head = ["-c", _FAILING_START] if fail else ["-m", "dala_search.cli"]
        return subprocess.run(
            [sys.executable, *head, *argv], env=env, capture_output=True, text=True, timeout=600
        )

    failed = cli(*args, fail=True)
    out = failed.stdout + failed.stderr
    assert failed.returncode == 2, out
    assert "search 'again' failed after it started: RuntimeError: the study storage" in out
    assert "dala-search start --name again --overwrite" in out and "Traceback" not in out
    (parent,) = _search_runs(uri, "again")  # no trial began
    assert parent.info.status == "FAILED"
    assert "the study storage refused" in parent.data.tags[schema.TAG_ERROR]
    folder = tmp_path / "runs" / "again"
    assert "RuntimeError" in json.loads((folder / "failed.json").read_text())["traceback"]

    refused = cli(*args)  # the name is taken, and the refusal says how to reuse it
    assert refused.returncode == 2
    assert "its start or resume failed" in refused.stderr and "--overwrite" in refused.stderr

    replaced = cli(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert "--overwrite: removed MLflow experiment 'dala-search/again'" in replaced.stderr
    assert not (folder / "failed.json").exists()
    trials, runs = checked_records(SearchPlan.load(folder))
    assert len(trials) == 1 and runs[0].data.tags[schema.TAG_STATE] == "completed"
    parents = [r for r in _search_runs(uri, "again") if r.info.run_id != runs[0].info.run_id]
    assert [r.info.status for r in parents] == ["FINISHED"]  # the failed one is not in it
    from mlflow.entities import ViewType

    gone = MlflowClient(uri).search_experiments(view_type=ViewType.DELETED_ONLY)
    assert [e.name.split(".replaced-")[0] for e in gone] == ["dala-search/again"]


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
