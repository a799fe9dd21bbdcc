"""What the search tests share: a finished search's records, read back and cross-checked.

Plain helpers behind session fixtures (test modules are imported with
``--import-mode=importlib`` and cannot import one another).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient

from dala_search.runs import schema


def read_records(plan: Any) -> tuple[list, list]:
    """(Optuna trials, MLflow trial runs oldest first) of the plan's only magnification."""
    (mag,) = plan.magnifications
    study = optuna.load_study(study_name=plan.study_name(mag), storage=plan.storage)
    client = MlflowClient(plan.tracking_uri)
    exp = client.get_experiment_by_name(schema.experiment_name(plan.name))
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{schema.TAG_ROLE}` = 'trial'",
        order_by=["attributes.start_time ASC"],
    )
    return study.get_trials(deepcopy=False), runs


def check_consistent(trials: list, runs: list) -> None:
    """One MLflow run per Optuna trial, same state, nothing RUNNING."""
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    assert all(r.info.status != "RUNNING" for r in runs), [r.info.status for r in runs]
    by_number = {int(r.data.tags[schema.TAG_OPTUNA_NUMBER]): r for r in runs}
    assert len(by_number) == len(runs) == len(trials)  # no duplicate, no orphan
    assert len({r.data.tags[schema.TAG_RAY_ID] for r in runs}) == len(runs)
    state = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed"}
    for t in trials:
        assert by_number[t.number].data.tags[schema.TAG_STATE] == state[t.state.name]


@pytest.fixture(scope="session")
def checked_records() -> Callable[[Any], tuple[list, list]]:
    """``checked_records(plan)``: the plan's Optuna trials and MLflow trial runs, which agree."""

    def read_checked(plan: Any) -> tuple[list, list]:
        trials, runs = read_records(plan)
        check_consistent(trials, runs)
        return trials, runs

    return read_checked
