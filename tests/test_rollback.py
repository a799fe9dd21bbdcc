"""runs/rollback.py without Ray: ending a search's open runs, the failed mark, and what
``start --overwrite`` removes (and what it never touches). The end-to-end cases (a real
start failing after creation, a whole process group stopped) are in
tests/search/test_faults.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
from mlflow import MlflowClient
from mlflow.entities import ViewType

from dala_search.runs import rollback, schema
from dala_search.runs.plan import SearchPlan


def _plan(folder: Path, uri: str, storage: str) -> SearchPlan:
    return SearchPlan(
        name=folder.name, space="tiny.yaml", data_dir="/data", magnifications=("40X", "100X"),
        trials=2, epochs=1, metric="balanced_accuracy", sampler="tpe", pruner="median", seed=0,
        cpus_per_trial=1.0, gpus_per_trial=0.0, workers_per_trial=1, max_concurrent=1,
        time_budget_s=None, tracking_uri=uri, storage=storage, address=None, folder=str(folder),
    )  # fmt: skip


def test_open_runs_are_ended_and_the_failed_mark_read_back(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(schema.experiment_name("s"))
    parent = client.create_run(exp, tags={schema.TAG_ROLE: "magnification"}).info.run_id
    trial = client.create_run(exp, tags={schema.TAG_ROLE: "trial"}).info.run_id
    done = client.create_run(exp, tags={schema.TAG_ROLE: "trial"}).info.run_id
    client.set_terminated(done, "FINISHED")

    assert rollback.close_open_runs(uri, "s", error="RuntimeError: boom") == 2
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.tags[schema.TAG_ERROR] == "RuntimeError: boom"
    assert client.get_run(trial).info.status == "KILLED"
    assert client.get_run(trial).data.tags[schema.TAG_STATE] == "interrupted"
    assert client.get_run(done).info.status == "FINISHED"  # a finished run is left alone
    assert rollback.close_open_runs(uri, "s") == 0
    assert rollback.close_open_runs(uri, "no-such-search") == 0

    folder = tmp_path / "s"
    folder.mkdir()
    assert rollback.failure(folder) is None
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        rollback.mark_failed(folder, e)
    assert rollback.failure(folder)["error"] == "RuntimeError: boom"
    assert "its start or resume failed: RuntimeError: boom" in rollback.existing_search_message(
        folder, "s"
    )
    rollback.clear_failed(folder)
    assert rollback.failure(folder) is None


def test_overwrite_removes_folder_experiment_and_outside_studies_only(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'shared-optuna.db'}"  # outside the folder
    folder = tmp_path / "runs" / "old"
    plan = _plan(folder, uri, storage)
    plan.save(new=True)
    optuna.create_study(study_name=plan.study_name("40X"), storage=storage)  # 100X never began
    optuna.create_study(study_name="someone-else-40X", storage=storage)
    client = MlflowClient(uri)
    client.create_experiment(schema.experiment_name("old"), tags={schema.TAG_FOLDER: str(folder)})
    other = dataclasses.replace(plan, name="other", folder=str(tmp_path / "elsewhere" / "other"))
    client.create_experiment(
        schema.experiment_name("other"), tags={schema.TAG_FOLDER: other.folder}
    )

    removed = rollback.replace_search(folder, "old", [uri])
    assert not folder.exists()
    assert any("Optuna study 'old-40X'" in r for r in removed)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"someone-else-40X"}
    assert client.get_experiment_by_name(schema.experiment_name("old")) is None
    (gone,) = client.search_experiments(view_type=ViewType.DELETED_ONLY)
    assert gone.name.startswith("dala-search/old.replaced-")

    # A search of that name whose experiment belongs to another folder is never touched.
    assert rollback.replace_search(tmp_path / "runs" / "other", "other", [uri]) == []
    assert client.get_experiment_by_name(schema.experiment_name("other")) is not None
