"""The MLflow UI page a search opens on: its experiment's runs table, sorted by the metric
that picks each magnification's best trial (``dala-search ui NAME``).

MLflow 3.17's UI (mlflow/server/js) chooses between its GenAI view (traces) and its
model-training view (runs table) by a ``workflowType`` that the URL's query sets and that
otherwise comes from the browser's last choice, defaulting to GenAI; the experiment's
``mlflow.experimentKind`` tag (set by ``search/tracking.py``) is what other MLflow versions
and clients read. The URL says both, so the page opens on the runs whatever the browser
chose before. ``orderByKey``/``orderByAsc`` are the runs page's own query keys.
"""

from __future__ import annotations

import threading
import time
import urllib.request
import webbrowser
from pathlib import Path
from urllib.parse import urlencode

from dala_search.errors import ConfigError
from dala_search.runs import schema

# MLflow's UI: the model-training view ("machine_learning"; "genai" is the other).
WORKFLOW_TYPE = "machine_learning"


def sort_metric(tune_metric: str) -> str:
    """The trial metric the search ranks trials by (``best_val_balanced_accuracy``): the
    best epoch's validation figure, the key ``best_completed_run`` orders by."""
    return f"best_{tune_metric}"


def runs_page_url(server: str, experiment_id: str, metric: str) -> str:
    """The experiment's runs table on ``server``, best ``metric`` first."""
    query = urlencode(
        {
            "workflowType": WORKFLOW_TYPE,
            "orderByKey": f"metrics.`{metric}`",
            "orderByAsc": "false",
        }
    )
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def search_experiment_id(uri: str, search: str) -> str:
    """The search's experiment id in the store ``uri``; a clear error when it has none.

    A sqlite store that does not exist is not opened (MLflow would create an empty one).
    """
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--tracking-uri: {uri} does not exist (no search was logged there)")
    exp = schema.client(uri).get_experiment_by_name(schema.experiment_name(search))
    if exp is None:
        raise ConfigError(
            f"search {search!r}: the MLflow store {uri} has no experiment "
            f"{schema.experiment_name(search)!r} (is --tracking-uri the search's store?)"
        )
    return exp.experiment_id


def open_when_up(server: str, url: str, timeout: float = 120.0) -> threading.Thread:
    """Open ``url`` in the user's browser once ``server`` answers ``/health`` (the UI that
    ``dala-search ui`` starts takes seconds); a daemon thread, so it never holds the exit."""

    def wait_then_open() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{server.rstrip('/')}/health", timeout=2):
                    webbrowser.open(url)
                    return
            except OSError:
                time.sleep(0.5)

    thread = threading.Thread(target=wait_then_open, daemon=True, name="open-mlflow-ui")
    thread.start()
    return thread
