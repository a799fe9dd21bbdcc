"""The Optuna side of a search, apart from Ray's searcher (``optuna_search.py``): the
study's storage (``resolve_storage``), how a completed trial's per-epoch values become its
value (``OBJECTIVES``), the user attributes that link an Optuna trial to its Ray trial, and
``CloseStoppedOptunaTrials``, the Tune callback that ends the Optuna trials Ray never
reports as ended.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune import Callback

from dala_search.errors import ConfigError

logger = logging.getLogger(__name__)

#: User attribute set on an Optuna trial that Tune retried after it had been told FAIL.
RETRY_OF_ATTR = "ray_retry_of_trial"
#: User attribute naming the Ray Tune trial id behind an Optuna trial (links the two, and
#: MLflow runs tagged with the same id).
RAY_TRIAL_ID_ATTR = "ray_trial_id"
#: User attribute of a multi-objective study's trial: the primary objective's (the pruned-on
#: metric's) value per epoch, {"step": value}; Optuna refuses `report` on such a trial.
PRIMARY_INTERMEDIATE_ATTR = "primary_intermediate"


def _best(values: list[float], mode: str) -> float:
    # NaN never wins a comparison, so it only survives when every value is NaN;
    # Optuna then records the trial as FAIL, which is the honest outcome.
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return max(finite) if mode == "max" else min(finite)


def _last(values: list[float], mode: str) -> float:
    return values[-1]


#: How a completed trial's per-epoch metric values become the one value told to Optuna.
#: "best" is what the search optimises (early stopping keeps the best epoch's weights);
#: "last" matches what the model would be if training simply ran to the end.
OBJECTIVES: dict[str, Callable[[list[float], str], float]] = {"best": _best, "last": _last}


def resolve_storage(storage: str | optuna.storages.BaseStorage | None) -> Any:
    """Turn an RDB URL into an Optuna storage object; `None` means in-memory.

    Ray's `OptunaSearch` only accepts a storage
    *object*, and a relative sqlite path would resolve against whatever directory the driver
    runs in when the experiment is restored, so relative sqlite paths become absolute here.
    """
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if not isinstance(storage, str):
        raise ConfigError(f"storage must be an RDB URL string, got {storage!r}")
    prefix = "sqlite:///"
    if storage.startswith(prefix) and not storage.startswith(prefix + "/"):
        rest = storage[len(prefix) :]
        if rest and rest != ":memory:":
            storage = prefix + str(Path(rest).resolve())
    # A database server that restarted (or dropped idle connections) leaves dead connections
    # in the pool: test each on checkout, as Optuna does for MySQL only and MLflow always.
    engine_kwargs = {} if storage.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
    except Exception as err:  # SQLAlchemy raises several unrelated types for a bad URL
        raise ConfigError(f"storage {storage!r} cannot be opened: {err}") from err


class CloseStoppedOptunaTrials(Callback):
    """Tells the study about trials Tune stopped without telling the searcher.

    When an experiment ends on `TuneConfig(time_budget_s=...)` or a stop-all `Stopper`, Ray
    2.60 stops the running trials (status TERMINATED) without calling the searcher's
    `on_trial_complete`, so their Optuna trials stay RUNNING forever (checked). At the end of
    the experiment this callback tells each such trial PRUNED (it was cut short; its
    intermediate values are kept), or FAIL if Tune marked it ERROR or it never reported.
    Trials Tune will resume (RUNNING / PENDING / PAUSED after Ctrl+C) are left alone. At the
    very end Ray's cleanup marks *every* live trial TERMINATED, Ctrl+C or not, after saving
    the experiment state with their true status; so the statuses seen at the last step are
    used, not those handed to `on_experiment_end`.

    Holds the storage and study name, not the searcher: it is pickled with the RunConfig
    and must not depend on being the same object as the searcher after `Tuner.restore`.
    Built by `PruningOptunaSearch.end_of_experiment_callback`; Ray calls `on_experiment_end`.
    """

    def __init__(self, storage: Any, study_name: str) -> None:
        self._storage = storage
        self._study_name = study_name
        self._status_at_last_step: dict[str, str] = {}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Called by Ray after every controller step, after its time-budget / stop-all check."""
        self._status_at_last_step = {t.trial_id: t.status for t in trials}

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Called by Ray once, after the last trial has concluded."""
        status = self._status_at_last_step
        try:
            study = optuna.load_study(study_name=self._study_name, storage=self._storage)
        except (KeyError, ValueError) as err:  # no storage, or the study never got created
            logger.warning("Cannot close stopped Optuna trials: %s", err)
            return
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            tune_status = status.get(frozen.user_attrs.get(RAY_TRIAL_ID_ATTR))
            reported = frozen.intermediate_values or frozen.user_attrs.get(
                PRIMARY_INTERMEDIATE_ATTR
            )
            if tune_status == "TERMINATED" and reported:
                study.tell(frozen.number, state=TrialState.PRUNED)
            elif tune_status in ("TERMINATED", "ERROR"):
                # Errored, or stopped before its first result: says nothing about its
                # configuration (the searcher's rule for a trial that never reported).
                study.tell(frozen.number, state=TrialState.FAIL)
