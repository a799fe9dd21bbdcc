"""MLflow records: one experiment per search, a parent run per magnification, a child run
per trial, and the best configuration per magnification on its parent (and in the registry).

Everything goes through ``MlflowClient`` with explicit run ids: trial processes run on
other nodes, and a global "active run" would be one more piece of hidden state.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dala_search.errors import DalaError

# Tags we set; the MLflow UI can filter on any of them.
TAG_ROLE = "dala.role"  # "search" | "magnification" | "trial"
TAG_MAG = "dala.magnification"
TAG_STATE = "dala.state"  # "running" | "completed" | "pruned" | "failed" | "interrupted"
TAG_RAY_ID = "dala.ray_trial_id"
TAG_OPTUNA_NUMBER = "dala.optuna_trial_number"
TAG_SYNTHETIC = "dala.synthetic_data"
TAG_SEARCH = "dala.search"
TAG_CODE = "dala.code_version"
TAG_HAS_MODEL = "dala.has_model"
TAG_MODEL_URI = "dala.model_uri"  # models:/m-... of the trial's logged model
TAG_PID = "dala.worker_pid"  # the trial's process (reused: it runs trial after trial)
TAG_NODE = "dala.node_id"  # the Ray node of the first attempt; "dala.node_id.2".. of restarts
TAG_GPUS = "dala.gpu_ids"  # the GPU ids Ray gave the trial ("0"; shared under a fraction), "none"
TAG_FOLDER = "dala.search_folder"  # the search's folder: one name, one search
TAG_FAILURE = "dala.failure"  # "exception": the trial raised; it is not retried
TAG_ATTEMPT = "dala.attempt"  # 1, then 2.. when Tune restarted a dead trial process
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag


def experiment_name(search: str) -> str:
    return f"dala-search/{search}"


def model_name(magnification: str) -> str:
    return f"dalaresnet50-{magnification}"


def resolve_tracking_uri(uri: str | None, cwd: Path | None = None) -> str:
    """MLflow's own default (``mlflow.db`` in the working directory), made absolute.

    Ray runs trials in their own folders, so a relative sqlite path would scatter one store
    per trial; the absolute URI is handed to every process.
    """
    base = (cwd or Path.cwd()).resolve()
    if uri is None:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///') :]).resolve()}"
    if "://" not in uri:  # a plain folder or file path
        p = (base / uri).resolve()
        return f"sqlite:///{p}" if p.suffix == ".db" else p.as_uri()
    return uri


def artifact_location(uri: str, search: str) -> str | None:
    """Where a new search experiment keeps its artifacts.

    Beside a local sqlite store: ``<db folder>/<db name>-artifacts/<search>``. MLflow's own
    default for a database store is ``./mlruns/<experiment id>`` in the working directory:
    artifacts would land wherever the command ran, and two stores (whose experiment ids
    both start at 1) would share one folder. None elsewhere: a server decides (its
    ``--artifacts-destination``), a file store keeps them inside itself.
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / f"{db.stem}-artifacts" / search).as_uri()
    return None


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when a tracking server cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise DalaError(f"MLflow tracking server {uri} answered {r.status} to /health")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DalaError(
                f"cannot reach the MLflow tracking server at {uri} ({e}); start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`) or pass another --tracking-uri"
            ) from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir():
            raise DalaError(f"tracking URI {uri}: folder {parent} does not exist")
    elif not uri.startswith(("file:", "databricks")):
        raise DalaError(f"unsupported tracking URI {uri!r} (use sqlite:///, file:, http(s)://)")


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from dala_search import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _client(uri: str):  # noqa: ANN202 - mlflow types stay inside this module
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn, *args: Any, attempts: int = 5, **kwargs: Any) -> Any:  # noqa: ANN001
    """Retry a tracking call through a short outage; re-raise when it does not come back."""
    delay = 0.5
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    return None


def check_experiment_free(uri: str, search: str, folder: str | Path) -> None:
    """Refuse a search whose name is taken in the tracking store by another search folder.

    Two searches with one name (e.g. started from two machines against one server) would
    otherwise write into one experiment and mix their trials.
    """
    exp = _client(uri).get_experiment_by_name(experiment_name(search))
    if exp is None:
        return
    other = exp.tags.get(TAG_FOLDER)
    if other != str(folder):
        raise DalaError(
            f"the MLflow store {uri} already has a search named {search!r} "
            f"(experiment {experiment_name(search)!r}, folder {other or 'unknown'}); "
            "choose another --name"
        )


class SearchTracker:
    """Driver-side records of one search. Called by ``search/tuner.py``."""

    def __init__(self, uri: str, search: str, folder: str | None = None) -> None:
        self.uri = uri
        self.search = search
        self.client = _client(uri)
        name = experiment_name(search)
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if folder is not None:
                check_experiment_free(uri, search, folder)
            self.experiment_id = exp.experiment_id
        else:
            tags = {TAG_SEARCH: search, **({TAG_FOLDER: str(folder)} if folder else {})}
            self.experiment_id = self.client.create_experiment(
                name, artifact_location=artifact_location(uri, search), tags=tags
            )

    def parent_run(self, magnification: str, tags: Mapping[str, str]) -> str:
        """The magnification's parent run: reused on resume, created otherwise."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`{TAG_ROLE}` = 'magnification' and tags.`{TAG_MAG}` = '{magnification}'"
            ),
        )
        if found:
            return found[0].info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.search}-{magnification}",
            tags={
                TAG_ROLE: "magnification",
                TAG_MAG: magnification,
                TAG_SEARCH: self.search,
                TAG_CODE: code_version(),
                **tags,
            },
        )
        return run.info.run_id

    def trial_runs(self, parent_run_id: str) -> list[Any]:
        return list(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                max_results=5000,
            )
        )

    def close_trial(self, ray_trial_id: str, state: str, error: str | None = None) -> None:
        """Close a trial's run from the driver (a stopped trial's process was killed)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_RAY_ID}` = '{ray_trial_id}'"
        )
        status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[state]
        for run in runs:
            if run.info.status == "RUNNING" or run.data.tags.get(TAG_STATE) != state:
                _retry(self.client.set_tag, run.info.run_id, TAG_STATE, state)
                if error:
                    _retry(self.client.set_tag, run.info.run_id, "dala.error", error[:4000])
                if run.info.status == "RUNNING":
                    _retry(self.client.set_terminated, run.info.run_id, status)

    def close_interrupted(self, parent_run_id: str) -> None:
        """Mark the trial runs an interrupted driver left RUNNING as KILLED/interrupted."""
        for run in self.trial_runs(parent_run_id):
            if run.info.status == "RUNNING":
                _retry(self.client.set_tag, run.info.run_id, TAG_STATE, "interrupted")
                _retry(self.client.set_terminated, run.info.run_id, "KILLED")

    def close_parent(self, parent_run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_run_id, status)

    def record_best(self, parent_run_id: str, magnification: str, best_run: Any) -> str | None:
        """Copy the best trial's config and metrics onto the parent run; register its model.

        Returns the registered model version, or None when the best run logged no model.
        """
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        params = [Param(f"best.{k}", str(v)[:6000]) for k, v in best_run.data.params.items()]
        metrics = [
            Metric(f"best_{k}" if not k.startswith("best_") else k, v, now, 0)
            for k, v in best_run.data.metrics.items()
            if k.startswith(("test_", "best_"))
        ]
        tags = [
            RunTag("dala.best_run_id", best_run.info.run_id),
            RunTag("dala.best_optuna_trial", best_run.data.tags.get(TAG_OPTUNA_NUMBER, "")),
        ]
        existing = self.client.get_run(parent_run_id).data.params
        params = [p for p in params if p.key not in existing]  # params are write-once
        for i in range(0, len(params), 100):
            self.client.log_batch(parent_run_id, params=params[i : i + 100])
        self.client.log_batch(parent_run_id, metrics=metrics, tags=tags)
        if best_run.data.tags.get(TAG_HAS_MODEL) != "true":
            return None
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        version = mlflow.register_model(
            best_run.data.tags.get(TAG_MODEL_URI, f"runs:/{best_run.info.run_id}/model"),
            model_name(magnification),
            tags={TAG_SEARCH: self.search, TAG_MAG: magnification},
        )
        self.client.set_registered_model_alias(model_name(magnification), "best", version.version)
        self.client.set_tag(
            parent_run_id, "dala.registered_model", f"{model_name(magnification)}/{version.version}"
        )
        return version.version


def best_completed_run(client: Any, experiment_id: str, parent_run_id: str, key: str) -> Any:
    """The completed trial run of ``parent_run_id`` with the highest metric ``key``, or None.

    Among runs tied at the top, the one holding a model (trials log a model only when they
    beat every trial completed before them, so of tied runs only the first has one); then
    the earliest. Called by the tuner's summary (the best to register) and by the trials
    (whether to log a model).
    """
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TAG_STATE}` = 'completed'"
    top = _retry(
        client.search_runs,
        [experiment_id],
        filter_string=flt,
        order_by=[f"metrics.`{key}` DESC", "attributes.start_time ASC"],
        max_results=1,
    )
    if not top or key not in top[0].data.metrics:
        return top[0] if top else None
    value = top[0].data.metrics[key]
    with_model = _retry(
        client.search_runs,
        [experiment_id],
        filter_string=f"{flt} and metrics.`{key}` = {value!r} and tags.`{TAG_HAS_MODEL}` = 'true'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return with_model[0] if with_model else top[0]


def best_table(uri: str, search: str) -> list[dict[str, Any]]:
    """Best configuration and metrics per magnification, read back from MLflow."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment_name(search))
    if exp is None:
        raise DalaError(f"no search named {search!r} in the MLflow store {uri}")
    rows = []
    parents = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'magnification'"
    )
    for run in sorted(parents, key=lambda r: int(r.data.tags[TAG_MAG].rstrip("X"))):
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        rows.append(
            {
                "magnification": t[TAG_MAG],
                "best_run_id": t.get("dala.best_run_id"),
                "optuna_trial": t.get("dala.best_optuna_trial"),
                "registered_model": t.get("dala.registered_model"),
                "synthetic": t.get(TAG_SYNTHETIC) == "true",
                "config": {k[len("best.") :]: v for k, v in p.items() if k.startswith("best.")},
                "metrics": {k: v for k, v in m.items()},
            }
        )
    return rows


class TrialFailedBefore(RuntimeError):
    """Tune restarted a trial that had raised: a bug or NaN repeats, so it is not rerun."""


class TrialTracker:
    """Trial-side records: a nested child run, per-epoch metrics, final figures.

    Created inside the trial process (wherever Ray placed it) from plain strings.
    """

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> None:
        self.client = _client(uri)
        from mlflow.entities import Param

        # A trial Tune restarted (its process or node died) keeps its one run: no duplicate.
        previous = self._previous_run(experiment_id, parent_run_id, tags.get(TAG_RAY_ID))
        if previous is not None:
            self.run_id = previous.info.run_id
            ptags = previous.data.tags
            if ptags.get(TAG_FAILURE) == "exception":
                raise TrialFailedBefore(
                    f"trial {tags.get(TAG_RAY_ID)} raised before and is not retried: "
                    f"{ptags.get('dala.error', '')[:300]}"
                )
            attempt = int(ptags.get(TAG_ATTEMPT, "1")) + 1
            _retry(self.client.update_run, self.run_id, status="RUNNING")
            _retry(self.client.set_tag, self.run_id, TAG_ATTEMPT, str(attempt))
            for key in (TAG_NODE, TAG_PID, TAG_GPUS):  # where this attempt runs (may move)
                if tags.get(key):
                    _retry(self.client.set_tag, self.run_id, f"{key}.{attempt}", tags[key])
            _retry(self.client.set_tag, self.run_id, TAG_STATE, "running")
            return
        run = _retry(
            self.client.create_run,
            experiment_id,
            run_name=run_name,
            tags={
                PARENT_TAG: parent_run_id,
                TAG_ROLE: "trial",
                TAG_STATE: "running",
                TAG_ATTEMPT: "1",
                **tags,
            },
        )
        self.run_id = run.info.run_id
        items = [
            Param(k, json.dumps(v) if isinstance(v, list | tuple) else str(v))
            for k, v in params.items()
        ]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def _previous_run(
        self, experiment_id: str, parent_run_id: str, ray_trial_id: str | None
    ) -> Any | None:
        if not ray_trial_id:
            return None
        found = _retry(
            self.client.search_runs,
            [experiment_id],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                f"tags.`{TAG_RAY_ID}` = '{ray_trial_id}'"
            ),
            max_results=1,
        )
        return found[0] if found else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)
        ]
        _retry(self.client.log_batch, self.run_id, metrics=batch)

    def log_dict(self, d: Mapping[str, Any], path: str) -> None:
        _retry(self.client.log_dict, self.run_id, dict(d), path)

    def log_figure(self, fig: Any, path: str) -> None:
        _retry(self.client.log_figure, self.run_id, fig, path)

    def log_model(self, model: Any) -> None:
        """Log the model (pickle format: pt2 would need a traced example). Ends the run as
        FINISHED (``start_run`` as a context does), so call it just before ``finish``."""
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.client.tracking_uri)
        # mlflow.pytorch warns about pickle on every call; our own models are what it loads.
        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    serialization_format="pickle",
                    pip_requirements=["torch", "torchvision", "dala-search"],
                )
        finally:
            quiet.setLevel(level)
        # MLflow 3 stores it as a LoggedModel (models:/m-...), not under the run's artifacts.
        _retry(self.client.set_tag, self.run_id, TAG_MODEL_URI, info.model_uri)
        _retry(self.client.set_tag, self.run_id, TAG_HAS_MODEL, "true")

    def finish(self, state: str, error: str | None = None, raised: bool = False) -> None:
        """Close the run. ``raised``: the trial raised (not retried if Tune restarts it)."""
        status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[state]
        _retry(self.client.set_tag, self.run_id, TAG_STATE, state)
        if raised:
            _retry(self.client.set_tag, self.run_id, TAG_FAILURE, "exception")
        if error:
            _retry(self.client.set_tag, self.run_id, "dala.error", error[:4000])
        _retry(self.client.set_terminated, self.run_id, status)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
