"""What a search leaves in MLflow, by name: every tag and metric name it writes, the
experiment and registered-model names, the tracking store's URI, and reading the best
configuration per magnification back.

One experiment per search (``dala-search/<name>``), a parent run per magnification
(``dala.role`` = "magnification"), a child run per trial (``mlflow.parentRunId``); the
parent run holds the best trial's config (``best.<param>`` params), metrics (``best_*``)
and ``dala.best_run_id``. Ray-free: mlflow is imported inside the functions that talk to a
store (it imports slowly, and the names alone need none of it).
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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
TAG_ERROR = "dala.error"  # a failed trial's error (first 4000 characters)
TAG_WORKERS = "dala.workers"  # a data-parallel trial: how many ranks trained it
TAG_MICRO_BATCH = "dala.micro_batch"  # images per forward pass; < batch_size after an OOM
TAG_CV = "dala.cv"  # inner folds per trial (1: one validation split); parent and trial runs
TAG_STUDY_SEED = "dala.study_seed"  # the Optuna sampler seed of the magnification's study
# MLflow 3's UI reads this experiment tag to open a model-training view (runs table and
# metrics) instead of the GenAI overview (traces); value from mlflow/server/js.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The split protocol (data/protocols.py) of a search (experiment and parent runs):
# "patient" | "image" | "eva"; and "true" where the figures come from a leaky (image-level)
# split. An `evaluate`/`baselines --protocol image` on a patient search tags its parent run
# "dala.evaluation.image" / "dala.baselines.image" instead (its search stays patient-level).
TAG_PROTOCOL = "dala.protocol"
TAG_LEAKY = "dala.leaky"
# Parent (magnification) runs: where its data came from, and the best trial.
TAG_DATA_ROOT = "dala.data_root"
TAG_SPLIT = "dala.split"  # the split's description
TAG_SPACE = "dala.space"  # the space YAML's path
TAG_BEST_RUN = "dala.best_run_id"
TAG_BEST_OPTUNA = "dala.best_optuna_trial"
TAG_REGISTERED = "dala.registered_model"  # "<model name>/<version>"
TAG_EVALUATION = "dala.evaluation"  # "<protocol> k=<k>" once `evaluate` ran
# Tags of a registered model version that `evaluate` re-estimated.
TAG_EVAL_PROTOCOL = "dala.eval.protocol"
TAG_EVAL_K = "dala.eval.k"
TAG_EVAL_TEST_PREFIX = "dala.eval.test_"  # + metric name: "mean [ci_low, ci_high]"
# Nested evaluation (`evaluate NAME --nested K`): an inner search's experiment and parent
# runs name the search it re-runs and its outer fold; the outer search's parent run names
# the inner searches ("<K>:<name>,<name>..").
TAG_NESTED_OF = "dala.nested.of"  # the outer search's name
TAG_OUTER_FOLD = "dala.nested.outer_fold"  # "k/K"
TAG_NESTED = "dala.nested"  # on the outer search's parent run: "K=<K> <name>,<name>.."
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag

# The best trial's config and figures on its parent run: params "best.<key>", metrics
# "best_<name>" (a trial's "best_val_*" keep their name).
BEST_PARAM_PREFIX = "best."
BEST_METRIC_PREFIX = "best_"
# Every completed trial's test predictions (search/trainable.py): {"positions": indices of
# the test images in the magnification's records, "slides", "y_true", "y_prob"}.
TEST_PREDICTIONS = "test_predictions.json"


def experiment_name(search: str) -> str:
    return f"dala-search/{search}"


def trial_run_name(magnification: str, optuna_number: object, ray_trial_id: str) -> str:
    """A trial run's name in MLflow's table: ``40X-007`` by its Optuna number (the Ray id
    is the ``dala.ray_trial_id`` tag); ``40X-<ray id>`` for a trial with no number."""
    if optuna_number is None or optuna_number == "":
        return f"{magnification}-{ray_trial_id}"
    return f"{magnification}-{int(optuna_number):03d}"


def model_name(magnification: str) -> str:
    return f"dalaresnet50-{magnification}"


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


def client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``: explicit run ids everywhere, no global active run
    (trials run on other nodes, and an active run would be one more piece of hidden state)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def retry(fn: Callable[..., Any], *args: Any, attempts: int = 5, **kwargs: Any) -> Any:
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


def best_completed_run(client: Any, experiment_id: str, parent_run_id: str, key: str) -> Any:
    """The completed trial run of ``parent_run_id`` with the highest metric ``key``, or None.

    Among runs tied at the top, the one holding a model (trials log a model only when they
    beat every trial completed before them, so of tied runs only the first has one); then
    the earliest.
    """
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TAG_STATE}` = 'completed'"
    top = retry(
        client.search_runs,
        [experiment_id],
        filter_string=flt,
        order_by=[f"metrics.`{key}` DESC", "attributes.start_time ASC"],
        max_results=1,
    )
    if not top or key not in top[0].data.metrics:
        return top[0] if top else None
    value = top[0].data.metrics[key]
    with_model = retry(
        client.search_runs,
        [experiment_id],
        filter_string=f"{flt} and metrics.`{key}` = {value!r} and tags.`{TAG_HAS_MODEL}` = 'true'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return with_model[0] if with_model else top[0]


def run_json(store: Any, run_id: str, path: str) -> Any:
    """The JSON artifact ``path`` of run ``run_id``; a DalaError naming both when missing."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = retry(store.download_artifacts, run_id, path, tmp, attempts=2)
        except Exception as e:
            raise DalaError(f"run {run_id}: cannot read its artifact {path} ({e})") from None
        return json.loads(Path(local).read_text())


def best_table(uri: str, search: str) -> list[dict[str, Any]]:
    """Best configuration and metrics per magnification, read back from MLflow."""
    store = client(uri)
    exp = store.get_experiment_by_name(experiment_name(search))
    if exp is None:
        raise DalaError(f"no search named {search!r} in the MLflow store {uri}")
    rows = []
    parents = store.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'magnification'"
    )
    for run in sorted(parents, key=lambda r: int(r.data.tags[TAG_MAG].rstrip("X"))):
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        rows.append(
            {
                "magnification": t[TAG_MAG],
                "best_run_id": t.get(TAG_BEST_RUN),
                "optuna_trial": t.get(TAG_BEST_OPTUNA),
                "registered_model": t.get(TAG_REGISTERED),
                "synthetic": t.get(TAG_SYNTHETIC) == "true",
                "config": {
                    k[len(BEST_PARAM_PREFIX) :]: v
                    for k, v in p.items()
                    if k.startswith(BEST_PARAM_PREFIX)
                },
                "metrics": {k: v for k, v in m.items()},
            }
        )
    return rows
