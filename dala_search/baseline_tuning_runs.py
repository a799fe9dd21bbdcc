"""The MLflow record of ``baselines --tune N`` (``baseline_tuning.py``): every trial a run.

Under the magnification's parent run (the search's), one run ``baselines-tuning-<mag>``
(``dala.role`` = ``baseline_tuning``; reused when the command runs again) with one child
per trial (``dala.role`` = ``baseline_trial``): params ``model``, ``fold``, ``lr``,
``weight_decay``; tags ``dala.baseline.model``, ``dala.baseline.fold``,
``dala.baseline.study`` (the Optuna study in ``baselines/tuning.db``), the Optuna trial
number and ``dala.state``; the validation metrics per epoch (step = epoch) and the test
metrics (``test_<name>``, step 0) once it completed. These runs never count as search
trials: the search picks its best among the magnification run's children tagged
``dala.state`` = ``completed`` (the tuning run has no state; the trials are a level down).
"""

from __future__ import annotations

import math
import time
from typing import Any

from dala_search.evaluate import BestConfig, tracking_client
from dala_search.runs import schema
from dala_search.runs.plan import SearchRef

TAG_MODEL = "dala.baseline.model"
TAG_FOLD = "dala.baseline.fold"
TAG_STUDY = "dala.baseline.study"
ROLE_PARENT = "baseline_tuning"
ROLE_TRIAL = "baseline_trial"


class TuningRuns:
    """One magnification's tuning runs in the search's MLflow store."""

    def __init__(self, ref: SearchRef, best: BestConfig) -> None:
        self.ref, self.best = ref, best
        self.client: Any = tracking_client(ref.tracking_uri)
        self.parent_id = self._parent_run()

    def close(self) -> None:
        schema.retry(self.client.set_terminated, self.parent_id, "FINISHED")

    def _parent_run(self) -> str:
        """``baselines-tuning-<mag>`` under the magnification's run; reused on resume."""
        mag, parent = self.best.magnification, self.best.parent_run_id
        exp = self.client.get_run(parent).info.experiment_id
        found = schema.retry(
            self.client.search_runs,
            [exp],
            filter_string=(
                f"tags.`{schema.TAG_ROLE}` = '{ROLE_PARENT}' and "
                f"tags.`{schema.PARENT_TAG}` = '{parent}'"
            ),
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = schema.retry(
            self.client.create_run,
            exp,
            run_name=f"baselines-tuning-{mag}",
            tags={
                schema.PARENT_TAG: parent,
                schema.TAG_ROLE: ROLE_PARENT,
                schema.TAG_MAG: mag,
                schema.TAG_SEARCH: self.ref.name,
                schema.TAG_CODE: schema.code_version(),
            },
        )
        return run.info.run_id

    def start(self, model: str, fold: int, number: int, study: str, lr: float, wd: float) -> str:
        """A trial's run, RUNNING, with its params; its id."""
        from mlflow.entities import Param

        exp = self.client.get_run(self.parent_id).info.experiment_id
        run = schema.retry(
            self.client.create_run,
            exp,
            run_name=f"{model}-fold{fold}-trial{number}",
            tags={
                schema.PARENT_TAG: self.parent_id,
                schema.TAG_ROLE: ROLE_TRIAL,
                schema.TAG_MAG: self.best.magnification,
                schema.TAG_SEARCH: self.ref.name,
                schema.TAG_STATE: "running",
                schema.TAG_OPTUNA_NUMBER: str(number),
                TAG_MODEL: model,
                TAG_FOLD: str(fold),
                TAG_STUDY: study,
            },
        )
        params = {"model": model, "fold": fold, "lr": lr, "weight_decay": wd}
        batch = [Param(k, str(v)) for k, v in params.items()]
        schema.retry(self.client.log_batch, run.info.run_id, params=batch)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """The finite ``metrics`` at ``step`` (the epoch; 0 for the test figures)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        if batch:
            schema.retry(self.client.log_batch, run_id, metrics=batch)

    def end(self, run_id: str, state: str, status: str, error: str | None = None) -> None:
        """Close a trial's run: ``dala.state`` (completed, pruned, failed, interrupted)."""
        schema.retry(self.client.set_tag, run_id, schema.TAG_STATE, state)
        if error:
            schema.retry(self.client.set_tag, run_id, schema.TAG_ERROR, error[:4000])
        schema.retry(self.client.set_terminated, run_id, status)
