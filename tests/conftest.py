"""Shared fixtures: a small synthetic BreakHis tree, generated once per session."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# MLflow servers the tests start need no GenAI job runner (it forks ~10 huey consumers).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

# Keep every test's caches out of the user's home.
os.environ.setdefault(
    "DALA_CACHE_DIR", str(Path(__file__).parent / ".." / ".pytest_cache" / "dala")
)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 patients x 4 magnifications x 4 images at 96x64: enough for patient splits."""
    from dala_search.data.synthetic import generate_demo

    return generate_demo(
        tmp_path_factory.mktemp("demo") / "breakhis", images_per_mag=4, width=96, height=64
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


TINY_SPACE = """\
name: tiny
description: the smoke space shrunk for tests (32 px, 2 epochs, 3 trials, one magnification)
search:
  metric: balanced_accuracy
  trials: 3
  magnifications: [40X]
  sampler: tpe
  pruner: median
  max_concurrent: 2
fixed:
  pretrained: none
  image_size: 32
  epochs: 2
  batch_size: 16
  freeze_stages: 0
  fc2: 16
params:
  attention:      {type: categorical, choices: [eca, none]}
  fc1:            {type: int, low: 16, high: 32, step: 16}
  lr:             {type: float, low: 1e-3, high: 1e-2, log: true}
  loss_weighting: {type: categorical, choices: [none, focal]}
  focal_gamma:    {type: float, low: 0.5, high: 5.0, condition: {loss_weighting: focal}}
"""


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search space small enough for end-to-end searches in tests (a YAML file)."""
    path = tmp_path_factory.mktemp("spaces") / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return path


@pytest.fixture(scope="session")
def finished_search(
    tmp_path_factory: pytest.TempPathFactory, demo_root: Path, tiny_space: Path
) -> dict:
    """One real finished search (3 trials at 40X, sqlite MLflow store), shared read-only.

    Returns ``{"name", "runs_dir", "tracking_uri", "plan", "outcomes"}``. Tests must not
    change it; a test that needs to mutate a search runs its own.
    """
    import ray

    from dala_search.search.tuner import plan_search, run_search

    root = tmp_path_factory.mktemp("finished")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    plan = plan_search(
        space=str(tiny_space),
        name="tiny",
        data_dir=demo_root,
        tracking_uri=uri,
        runs_dir=root / "runs",
    )
    try:
        outcomes = run_search(plan)
    finally:
        ray.shutdown()
    return {
        "name": plan.name,
        "runs_dir": root / "runs",
        "tracking_uri": uri,
        "plan": plan,
        "outcomes": outcomes,
    }


@pytest.fixture(scope="session")
def write_result_jsons():
    """Writes ``evaluation/<mag>.json`` and ``baselines/<mag>.json`` into a search folder in
    the shapes ``dala-search evaluate`` / ``baselines`` write (for report tests).

    ``write_result_jsons(folder, "40X")`` returns the two payloads; the numbers are
    distinctive so a test can find them in a report.
    """
    from dala_search.runs.documents import (
        BaselineDocument,
        EvaluationDocument,
        MetricSummary,
        ModelRow,
    )

    def ci(estimate: float, lo: float, hi: float, values: tuple = (0.5, 0.6, 0.7)) -> MetricSummary:
        mean = sum(values) / len(values)
        return MetricSummary(estimate, lo, hi, mean=mean, sd=0.05, values=values)

    def write(folder: Path, mag: str) -> tuple[dict, dict]:
        common = dict(
            magnification=mag,
            search=folder.name,
            protocol="folds",
            k=3,
            config={"attention": "eca", "lr": 0.003},
            synthetic=True,
            code_version="0.1.0+test",
            ci="patient-level cluster bootstrap (test)",
            splits=[],
            n_images=300,
            n_patients=24,
        )
        metrics = {
            "accuracy": ci(0.8123, 0.7012, 0.9234, (0.79, 0.81, 0.8369)),
            "f1": ci(0.8456, 0.7345, 0.9567, (0.83, 0.84, 0.8668)),
            "roc_auc": ci(0.9111, 0.8222, 0.9999, (0.9, 0.91, 0.9233)),
        }
        evaluation = EvaluationDocument(**common, best_run_id="run0", metrics=metrics)
        baselines = BaselineDocument(
            **common,
            rows=[
                ModelRow("densenet121", {"accuracy": ci(0.6543, 0.5432, 0.7654)}),
                ModelRow("<b>vgg16</b>", {"f1": ci(0.6111, 0.5111, 0.7111)}),
            ],
            dalaresnet50=ModelRow("dalaresnet50", metrics),
        )
        evaluation.write(folder / "evaluation" / f"{mag}.json")
        baselines.write(folder / "baselines" / f"{mag}.json")
        return evaluation.to_json(), baselines.to_json()

    return write


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    return free_port()


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1: sqlite store (or ``backend_store_uri``, e.g. a
    PostgreSQL database) and artifacts under ``root``, its own process group (its workers
    stop with it), restartable on the same port."""

    def __init__(self, root: Path, backend_store_uri: str | None = None) -> None:
        self.root = root
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 120) -> None:
        """Start and wait for ``/health`` (a cold start on a busy 2-core machine is slow)."""
        self._log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", self.backend_store_uri,
                "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
            ],
            cwd=self.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                pytest.fail(
                    f"mlflow server did not start:\n{(self.root / 'server.log').read_text()}"
                )
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the whole process group (SIGKILL: an abrupt outage); idempotent."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cut_when_trials_log(self, outage: dict[str, float], seconds: float = 6.0) -> None:
        """Once a trial run has logged a validation metric, SIGKILL the server (abrupt: no
        graceful shutdown) and start it again ``seconds`` later on the same port and store;
        ``outage`` gets the monotonic ``start``/``end`` of the gap. Runs in a thread beside
        a search."""
        from mlflow import MlflowClient

        from dala_search.runs import schema

        client = MlflowClient(self.uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()],
                    filter_string=f"tags.`{schema.TAG_ROLE}` = 'trial'",
                )
            except Exception:
                runs = []
            if any("val_balanced_accuracy" in r.data.metrics for r in runs):
                break
            time.sleep(0.3)
        self.stop(signal.SIGKILL)
        outage["start"] = time.monotonic()
        time.sleep(seconds)
        self.start()
        outage["end"] = time.monotonic()


@pytest.fixture(scope="session")
def start_mlflow_server() -> Iterator[Callable[[Path], MlflowServer]]:
    """Factory: ``start_mlflow_server(root, backend_store_uri=None)`` returns a started
    server; all are stopped at the end of the session (tests may stop, restart or stop them
    earlier)."""
    servers: list[MlflowServer] = []

    def start(root: Path, backend_store_uri: str | None = None) -> MlflowServer:
        server = MlflowServer(root, backend_store_uri)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def search_copy(finished_search: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A writable copy of ``finished_search``: runs folder, MLflow db and artifacts."""
    root = tmp_path_factory.mktemp("eval-copy")
    shutil.copytree(finished_search["runs_dir"], root / "runs")
    src_db = Path(finished_search["tracking_uri"][len("sqlite:///") :])
    db = root / "mlflow.db"
    shutil.copy2(src_db, db)
    con = sqlite3.connect(db)
    (location,) = con.execute(
        "select artifact_location from experiments where name = ?",
        (f"dala-search/{finished_search['name']}",),
    ).fetchone()
    src_art = location.removeprefix("file://")
    shutil.copytree(src_art, root / "artifacts")
    for table, column in (
        ("experiments", "artifact_location"),
        ("runs", "artifact_uri"),
        ("logged_models", "artifact_location"),
        ("model_versions", "storage_location"),
    ):
        con.execute(
            f"update {table} set {column} = replace({column}, ?, ?)",
            (src_art, str(root / "artifacts")),
        )
    con.commit()
    con.close()
    # MLflow caches each run's artifact repository by run id, process-wide: the copy's runs
    # keep the original's ids, and the search's driver (same process) already logged to
    # them, so without clearing the evaluation's artifacts would land in the original's
    # store (and, after this module, later tests' in the copy's).
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    mlflow_tracking_utils._artifact_repos_cache.clear()
    yield {
        "name": finished_search["name"],
        "runs_dir": root / "runs",
        "tracking_uri": f"sqlite:///{db}",
        "artifacts": root / "artifacts",
        "source_artifacts": Path(src_art),
        "args": [
            "--runs-dir",
            str(root / "runs"),
            "--tracking-uri",
            f"sqlite:///{db}",
            "--device",
            "cpu",
        ],
    }
    mlflow_tracking_utils._artifact_repos_cache.clear()
