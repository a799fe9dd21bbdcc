"""What a finished search leaves behind: the Optuna study, the MLflow records, the
registered model, and the CLI that reads them back (`best`, `spaces`, `data ...`).

Uses the session's ``finished_search`` (a real 3-trial search at 40X, read-only).
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from dala_search.cli import main
from dala_search.runs import schema
from dala_search.runs.plan import SearchPlan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(finished_search: dict) -> dict:
    client = MlflowClient(finished_search["tracking_uri"])
    exp = client.get_experiment_by_name(schema.experiment_name(finished_search["name"]))
    runs = client.search_runs([exp.experiment_id])
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get(schema.TAG_ROLE, "?"), []).append(r)
    return {"client": client, "exp": exp, "runs": by_role, **finished_search}


def test_one_experiment_one_parent_per_magnification_one_child_per_trial(records) -> None:
    plan: SearchPlan = records["plan"]
    (parent,) = records["runs"]["magnification"]
    trials = records["runs"]["trial"]
    assert parent.data.tags[schema.TAG_MAG] == "40X"
    assert parent.info.status == "FINISHED"
    assert len(trials) == 3
    assert {t.data.tags[schema.PARENT_TAG] for t in trials} == {parent.info.run_id}
    study = optuna.load_study(study_name=plan.study_name("40X"), storage=plan.storage)
    numbers = {t.number for t in study.get_trials()}
    assert {int(t.data.tags[schema.TAG_OPTUNA_NUMBER]) for t in trials} == numbers
    assert records["exp"].tags[schema.TAG_FOLDER] == plan.folder


def test_artifacts_live_beside_the_sqlite_store(records) -> None:
    # MLflow's default for a database store is ./mlruns in the working directory, shared by
    # every store whose experiment ids start at 1; a search keeps them beside its store.
    db = Path(records["tracking_uri"][len("sqlite:///") :])
    expected = db.parent / f"{db.stem}-artifacts" / records["name"]
    assert records["exp"].artifact_location == expected.as_uri()
    run = records["runs"]["trial"][0]
    assert run.info.artifact_uri.startswith(expected.as_uri() + "/")
    assert any(expected.rglob("trial_config.json"))  # the files really are there


def test_trial_runs_carry_params_epochs_tags_and_artifacts(records) -> None:
    client: MlflowClient = records["client"]
    for run in records["runs"]["trial"]:
        tags, params = run.data.tags, run.data.params
        for key in (
            schema.TAG_MAG,
            schema.TAG_RAY_ID,
            schema.TAG_OPTUNA_NUMBER,
            schema.TAG_STATE,
            schema.TAG_SYNTHETIC,
            schema.TAG_CODE,
        ):
            assert tags.get(key), key
        assert tags[schema.TAG_SYNTHETIC] == "true"  # the demo data says what it is
        assert tags[schema.TAG_STATE] == "completed" and run.info.status == "FINISHED"
        # Every TrialConfig field is a param, sampled and fixed alike.
        for key in ("attention", "fc1", "lr", "loss_weighting", "image_size", "epochs"):
            assert key in params, key
        assert params["image_size"] == "32" and params["epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        assert sorted(m.step for m in history) == [1, 2]
        for key in ("test_accuracy", "test_f1", "test_gmean", "test_iba", "train_loss"):
            assert key in run.data.metrics, key
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "trial_config.json" in files
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert {
            "figures/test_confusion_matrix.png",
            "figures/test_roc_curve.png",
            "figures/learning_curves.png",
        } <= figures


def test_best_is_on_the_parent_and_registered(records) -> None:
    import mlflow

    client: MlflowClient = records["client"]
    (parent,) = records["runs"]["magnification"]
    trials = records["runs"]["trial"]
    best = max(trials, key=lambda r: r.data.metrics["best_val_balanced_accuracy"])
    best_value = best.data.metrics["best_val_balanced_accuracy"]
    chosen = parent.data.tags["dala.best_run_id"]
    chosen_run = next(t for t in trials if t.info.run_id == chosen)
    assert chosen_run.data.metrics["best_val_balanced_accuracy"] == best_value
    assert parent.data.params["best.fc1"] == chosen_run.data.params["fc1"]
    assert parent.data.metrics["best_test_accuracy"] == chosen_run.data.metrics["test_accuracy"]
    version = client.get_model_version_by_alias(schema.model_name("40X"), "best")
    assert version.run_id == chosen
    # Registered from the trial's own LoggedModel (MLflow 3), not a guessed artifact path.
    assert version.source == chosen_run.data.tags[schema.TAG_MODEL_URI]
    assert version.source.startswith("models:/m-")
    # The registered model loads and classifies a batch of the right shape.
    import torch

    mlflow.set_tracking_uri(records["tracking_uri"])
    from dala_search.pyfunc_model import load_torch_model

    model = load_torch_model(f"models:/{schema.model_name('40X')}@best")
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 2)


def test_best_command_reads_the_table_back(records) -> None:
    res = CliRunner().invoke(
        main, ["best", records["name"], "--runs-dir", str(records["runs_dir"]), "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    (row,) = out["magnifications"]
    (parent,) = records["runs"]["magnification"]
    assert row["magnification"] == "40X"
    assert row["best_run_id"] == parent.data.tags["dala.best_run_id"]
    assert row["synthetic"] is True
    assert row["config"]["image_size"] == "32"
    plain = CliRunner().invoke(main, ["best", "--runs-dir", str(records["runs_dir"])])
    assert plain.exit_code == 0, plain.output
    assert "40X" in plain.output and "SYNTHETIC" in plain.output


def test_best_of_an_unknown_search_exits_2(records) -> None:
    res = CliRunner().invoke(
        main, ["best", "nope", "--tracking-uri", records["tracking_uri"], "--json"]
    )
    assert res.exit_code == 2
    assert "nope" in res.output
