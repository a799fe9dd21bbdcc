"""Which completed trial is the best, and which trials log a model (ties included)."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from dala_search.runs import schema
from dala_search.search import tracking

KEY = "best_val_balanced_accuracy"


def _trial(client: MlflowClient, exp: str, parent: str, value: float, model: bool) -> str:
    run = client.create_run(
        exp,
        tags={
            schema.PARENT_TAG: parent,
            schema.TAG_STATE: "completed",
            schema.TAG_HAS_MODEL: str(model).lower(),
        },
    )
    client.log_metric(run.info.run_id, KEY, value)
    return run.info.run_id


def test_best_of_tied_runs_is_the_one_with_a_model(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search = tracking.SearchTracker(uri, "s")
    parent = search.parent_run("40X", tags={})
    client, exp = search.client, search.experiment_id
    assert schema.best_completed_run(client, exp, parent, KEY) is None
    _trial(client, exp, parent, 0.5, model=True)
    first = _trial(client, exp, parent, 0.8333333333333334, model=True)
    _trial(client, exp, parent, 0.8333333333333334, model=False)  # a later tie: no model
    assert schema.best_completed_run(client, exp, parent, KEY).info.run_id == first
    # a run of another state or another parent never counts
    other = client.create_run(exp, tags={schema.PARENT_TAG: parent, schema.TAG_STATE: "pruned"})
    client.log_metric(other.info.run_id, KEY, 0.99)
    assert schema.best_completed_run(client, exp, parent, KEY).info.run_id == first
    better = _trial(client, exp, parent, 0.9, model=False)  # e.g. log_models off
    assert schema.best_completed_run(client, exp, parent, KEY).info.run_id == better


def test_a_trial_logs_a_model_only_when_strictly_better(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from dala_search.search.trainable import _beats_completed

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search = tracking.SearchTracker(uri, "s")
    parent = search.parent_run("40X", tags={})
    ctx = SimpleNamespace(
        metric="val_balanced_accuracy",
        tracking_uri=uri,
        experiment_id=search.experiment_id,
        parent_run_id=parent,
    )

    def result(v: float) -> SimpleNamespace:
        return SimpleNamespace(best={"val_balanced_accuracy": v})

    assert _beats_completed(ctx, result(0.5))  # the first completed trial
    _trial(search.client, search.experiment_id, parent, 0.75, model=True)
    assert not _beats_completed(ctx, result(0.75))  # a tie: that trial holds the model
    assert not _beats_completed(ctx, result(0.7))
    assert _beats_completed(ctx, result(0.76))
    assert not _beats_completed(ctx, result(float("nan")))
