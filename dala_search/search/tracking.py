"""MLflow records: one experiment per search, a parent run per magnification, a child run
per trial, and the best configuration per magnification on its parent (and in the registry).

Everything goes through ``MlflowClient`` with explicit run ids: trial processes run on
other nodes, and a global "active run" would be one more piece of hidden state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dala_search.errors import DalaError
from dala_search.runs.schema import (
    BEST_METRIC_PREFIX,
    BEST_PARAM_PREFIX,
    EXPERIMENT_KIND,
    PARENT_TAG,
    TAG_ATTEMPT,
    TAG_BEST_OPTUNA,
    TAG_BEST_RUN,
    TAG_CODE,
    TAG_ERROR,
    TAG_EXPERIMENT_KIND,
    TAG_FAILURE,
    TAG_FOLDER,
    TAG_GPUS,
    TAG_HAS_MODEL,
    TAG_MAG,
    TAG_MODEL_URI,
    TAG_NODE,
    TAG_OPTUNA_NUMBER,
    TAG_PID,
    TAG_RAY_ID,
    TAG_REGISTERED,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_STATE,
    client,
    code_version,
    experiment_name,
    model_name,
    retry,
)
from dala_search.search import system_metrics


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


def check_experiment_free(uri: str, search: str, folder: str | Path) -> None:
    """Refuse a search whose name is taken in the tracking store by another search folder.

    Two searches with one name (e.g. started from two machines against one server) would
    otherwise write into one experiment and mix their trials.
    """
    exp = client(uri).get_experiment_by_name(experiment_name(search))
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
    """Driver-side records of one search: the experiment and its parent runs."""

    def __init__(self, uri: str, search: str, folder: str | None = None) -> None:
        self.uri = uri
        self.search = search
        self.client = client(uri)
        name = experiment_name(search)
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if folder is not None:
                check_experiment_free(uri, search, folder)
            self.experiment_id = exp.experiment_id
            if exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:  # made by an older version
                self.client.set_experiment_tag(
                    self.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND
                )
        else:
            tags = {
                TAG_SEARCH: search,
                TAG_EXPERIMENT_KIND: EXPERIMENT_KIND,
                **({TAG_FOLDER: str(folder)} if folder else {}),
            }
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
            run_name=magnification,  # the experiment is named by the search
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
                retry(self.client.set_tag, run.info.run_id, TAG_STATE, state)
                if error:
                    retry(self.client.set_tag, run.info.run_id, TAG_ERROR, error[:4000])
                if run.info.status == "RUNNING":
                    retry(self.client.set_terminated, run.info.run_id, status)

    def close_interrupted(self, parent_run_id: str) -> None:
        """Mark the trial runs an interrupted driver left RUNNING as KILLED/interrupted."""
        for run in self.trial_runs(parent_run_id):
            if run.info.status == "RUNNING":
                retry(self.client.set_tag, run.info.run_id, TAG_STATE, "interrupted")
                retry(self.client.set_terminated, run.info.run_id, "KILLED")

    def close_parent(self, parent_run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_run_id, status)

    def record_best(self, parent_run_id: str, magnification: str, best_run: Any) -> str | None:
        """Copy the best trial's config and metrics onto the parent run; register its model.

        Returns the registered model version, or None when the best run logged no model.
        """
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        params = [
            Param(f"{BEST_PARAM_PREFIX}{k}", str(v)[:6000]) for k, v in best_run.data.params.items()
        ]
        metrics = [
            Metric(
                f"{BEST_METRIC_PREFIX}{k}" if not k.startswith(BEST_METRIC_PREFIX) else k, v, now, 0
            )
            for k, v in best_run.data.metrics.items()
            if k.startswith(("test_", BEST_METRIC_PREFIX))
        ]
        tags = [
            RunTag(TAG_BEST_RUN, best_run.info.run_id),
            RunTag(TAG_BEST_OPTUNA, best_run.data.tags.get(TAG_OPTUNA_NUMBER, "")),
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
            parent_run_id, TAG_REGISTERED, f"{model_name(magnification)}/{version.version}"
        )
        return version.version


def _gpu_ids(tags: Mapping[str, str]) -> list[str]:
    """The GPU ids Ray gave the trial, from its ``dala.gpu_ids`` tag ("none": none)."""
    return [g for g in tags.get(TAG_GPUS, "none").split(",") if g not in ("", "none")]


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
        self.client = client(uri)
        from mlflow.entities import Param

        # A trial Tune restarted (its process or node died) keeps its one run: no duplicate.
        previous = self._previous_run(experiment_id, parent_run_id, tags.get(TAG_RAY_ID))
        if previous is not None:
            self.run_id = previous.info.run_id
            ptags = previous.data.tags
            if ptags.get(TAG_FAILURE) == "exception":
                raise TrialFailedBefore(
                    f"trial {tags.get(TAG_RAY_ID)} raised before and is not retried: "
                    f"{ptags.get(TAG_ERROR, '')[:300]}"
                )
            attempt = int(ptags.get(TAG_ATTEMPT, "1")) + 1
            retry(self.client.update_run, self.run_id, status="RUNNING")
            retry(self.client.set_tag, self.run_id, TAG_ATTEMPT, str(attempt))
            for key in (TAG_NODE, TAG_PID, TAG_GPUS):  # where this attempt runs (may move)
                if tags.get(key):
                    retry(self.client.set_tag, self.run_id, f"{key}.{attempt}", tags[key])
            retry(self.client.set_tag, self.run_id, TAG_STATE, "running")
            self.system = system_metrics.start(uri, self.run_id, _gpu_ids(tags), resume=True)
            return
        run = retry(
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
            retry(self.client.log_batch, self.run_id, params=items[i : i + 100])
        # CPU, memory and the trial's GPUs, sampled while it trains (system_metrics.py)
        self.system = system_metrics.start(uri, self.run_id, _gpu_ids(tags))

    def _previous_run(
        self, experiment_id: str, parent_run_id: str, ray_trial_id: str | None
    ) -> Any | None:
        if not ray_trial_id:
            return None
        found = retry(
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
        retry(self.client.log_batch, self.run_id, metrics=batch)

    def set_tag(self, key: str, value: str) -> None:
        retry(self.client.set_tag, self.run_id, key, value)

    def log_dict(self, d: Mapping[str, Any], path: str) -> None:
        retry(self.client.log_dict, self.run_id, dict(d), path)

    def log_figure(self, fig: Any, path: str) -> None:
        retry(self.client.log_figure, self.run_id, fig, path)

    def log_model(self, model: Any, config: Mapping[str, Any], magnification: str) -> None:
        """Log the model as the image pyfunc (``pyfunc_model.py``; ``config`` and
        ``magnification`` travel with it). Ends the run as FINISHED (``start_run`` as a
        context does), so call it just before ``finish``."""
        import mlflow

        from dala_search.pyfunc_model import log_image_model

        mlflow.set_tracking_uri(self.client.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            info = log_image_model(model, config, magnification)
        # MLflow 3 stores it as a LoggedModel (models:/m-...), not under the run's artifacts.
        retry(self.client.set_tag, self.run_id, TAG_MODEL_URI, info.model_uri)
        retry(self.client.set_tag, self.run_id, TAG_HAS_MODEL, "true")

    def finish(self, state: str, error: str | None = None, raised: bool = False) -> None:
        """Close the run. ``raised``: the trial raised (not retried if Tune restarts it)."""
        status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[state]
        system_metrics.stop(self.system)  # its last samples, while the run is open
        retry(self.client.set_tag, self.run_id, TAG_STATE, state)
        if raised:
            retry(self.client.set_tag, self.run_id, TAG_FAILURE, "exception")
        if error:
            retry(self.client.set_tag, self.run_id, TAG_ERROR, error[:4000])
        retry(self.client.set_terminated, self.run_id, status)
