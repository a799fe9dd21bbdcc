"""`dala-search baselines NAME --tune N`: every model its own lr/weight-decay search.

The end-to-end test runs on its own copy of the finished search (conftest's module-scoped
``search_copy``) and reads the trials
back through MLflow and the Optuna studies in ``baselines/tuning.db``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from dala_search.cli import main
from dala_search.comparison import SHARED_RECIPE, baselines_table
from dala_search.errors import DalaError
from dala_search.runs.documents import BaselineDocument

K = 2
TRIALS = 2


def _tuned(search_copy: dict, *extra: str) -> tuple[dict, str, str]:
    args = ["baselines", search_copy["name"], "--models", "resnet50", "--tune", str(TRIALS)]
    args += ["--folds", str(K), "--epochs", "1", *extra, *search_copy["args"]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    path = search_copy["runs_dir"] / search_copy["name"] / "baselines" / "40X.json"
    return json.loads(path.read_text()), result.stdout, result.stderr


def _trial_runs(search_copy: dict) -> tuple[object, list]:
    from mlflow import MlflowClient

    client = MlflowClient(search_copy["tracking_uri"])
    exp = client.get_experiment_by_name(f"dala-search/{search_copy['name']}")
    runs = client.search_runs(
        [exp.experiment_id], filter_string="tags.`dala.role` = 'baseline_trial'", max_results=500
    )
    return client, runs


@pytest.fixture(scope="module")
def tuned(search_copy: dict) -> dict:
    """`baselines tiny --models resnet50 --tune 2 --folds 2 --epochs 1` on the copy, and
    its trial runs read back from MLflow, grouped by (model, fold)."""
    doc, out, _ = _tuned(search_copy)
    client, runs = _trial_runs(search_copy)
    by = defaultdict(list)
    for run in runs:
        by[run.data.tags["dala.baseline.model"], run.data.tags["dala.baseline.fold"]].append(run)
    return {"doc": doc, "out": out, "client": client, "runs": runs, "by": by}


@pytest.mark.slow
def test_tune_gives_each_model_its_own_trials_per_fold_in_mlflow(tuned: dict) -> None:
    doc, client, runs, by = tuned["doc"], tuned["client"], tuned["runs"], tuned["by"]
    assert doc["recipe"] == "tuned" and doc["tuning"]["trials"] == TRIALS
    assert doc["tuning"]["metric"] == "val_balanced_accuracy"
    # dalaresnet50 (the search's architecture) is tuned like the baseline, and first.
    assert [r["model"] for r in doc["rows"]] == ["dalaresnet50", "resnet50"]
    assert sorted(by) == [(m, str(f)) for m in ("dalaresnet50", "resnet50") for f in (1, 2)]
    for fold_runs in by.values():
        # The model's own N trials on this fold, each a different lr and weight decay.
        assert len(fold_runs) == TRIALS
        assert len({float(r.data.params["lr"]) for r in fold_runs}) == TRIALS
        assert len({float(r.data.params["weight_decay"]) for r in fold_runs}) == TRIALS
        assert all(r.data.tags["dala.state"] == "completed" for r in fold_runs)
    # Nested: trial -> baselines-tuning-40X -> the magnification's run.
    (tuning_parent,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert tuning_parent == doc["tuning"]["mlflow_run_id"]
    (mag_parent,) = client.search_runs(
        [runs[0].info.experiment_id], filter_string="tags.`dala.role` = 'magnification'"
    )
    parent = client.get_run(tuning_parent)
    assert parent.data.tags["mlflow.parentRunId"] == mag_parent.info.run_id
    assert parent.data.tags["dala.role"] == "baseline_tuning"
    # Every model started from the same seeded random points (same sampler, same folds).
    lr = {
        (
            r.data.tags["dala.baseline.model"],
            r.data.tags["dala.baseline.fold"],
            r.data.tags["dala.optuna_trial_number"],
        ): r.data.params["lr"]
        for r in runs
    }
    assert all(v == lr["resnet50", f, n] for (m, f, n), v in lr.items() if m == "dalaresnet50")


@pytest.mark.slow
def test_each_fold_chooses_on_validation_and_reports_its_test_figure(tuned: dict) -> None:
    doc, client, by = tuned["doc"], tuned["client"], tuned["by"]
    for row in doc["rows"]:
        assert row["tuned"]["trials"] == TRIALS
        assert [f["fold"] for f in row["tuned"]["folds"]] == [1, 2]
        for choice, split in zip(row["tuned"]["folds"], doc["splits"], strict=True):
            fold_runs = by[row["model"], str(choice["fold"])]
            # The trial with the best validation score (never a test figure); ties (common
            # on tiny data) go to the earliest trial.
            val = {r.info.run_id: r.data.metrics["val_balanced_accuracy"] for r in fold_runs}
            num = {r.info.run_id: int(r.data.tags["dala.optuna_trial_number"]) for r in fold_runs}
            top = max(val.values())
            expected = min((n, i) for i, n in num.items() if val[i] == top)[1]
            assert choice["run_id"] == expected and choice["trial"] == num[expected]
            assert choice["value"] == pytest.approx(top)
            chosen = client.get_run(choice["run_id"])
            assert float(chosen.data.params["lr"]) == pytest.approx(choice["lr"])
            wd = float(chosen.data.params["weight_decay"])
            assert wd == pytest.approx(choice["weight_decay"])
            # The row's fold figure is the chosen trial's test figure on the fold's test
            # patients, who were not among the patients it was chosen on.
            test_acc = row["metrics"]["accuracy"]["values"][choice["fold"] - 1]
            assert test_acc == pytest.approx(chosen.data.metrics["test_accuracy"])
            assert not set(split["test"]["slides"]) & set(split["val"]["slides"])
        for m in row["metrics"].values():
            assert m["ci_low"] is None or 0.0 <= m["ci_low"] <= m["ci_high"] <= 1.0
    # The table says how the rows were trained, and each model's choices.
    out = tuned["out"]
    assert "  recipe: tuned: each model its own lr/weight decay, 2 trial(s) per fold" in out
    assert any(ln.startswith("    resnet50: fold 1 lr ") for ln in out.splitlines())


@pytest.mark.slow
def test_the_same_command_continues_and_counts_out_an_interrupted_trial(
    search_copy: dict, tuned: dict
) -> None:
    import optuna

    doc = tuned["doc"]
    storage = f"sqlite:///{doc['tuning']['storage']}"
    study_name = doc["rows"][1]["tuned"]["folds"][0]["study"]
    # A trial left RUNNING, as a killed run leaves it.
    optuna.load_study(study_name=study_name, storage=storage).ask()
    again, _, err = _tuned(search_copy)
    assert "was interrupted" in err and "fold 1/2 trial" not in err  # nothing trained
    assert [r["tuned"] for r in again["rows"]] == [r["tuned"] for r in doc["rows"]]
    assert len(_trial_runs(search_copy)[1]) == len(tuned["runs"])
    study = optuna.load_study(study_name=study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]


def test_tune_zero_exits_2(tmp_path: Path) -> None:
    args = ["baselines", "x", "--tune", "0", "--runs-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--tune" in result.output, result.output


def test_shared_recipe_is_labelled_and_old_documents_read_as_shared(
    tmp_path: Path, write_result_jsons
) -> None:
    _, baselines = write_result_jsons(tmp_path / "s", "40X")
    assert baselines["recipe"] == "shared" and baselines["tuning"] is None
    # A document written before --tune existed has no recipe, tuning or tuned keys.
    old = {k: v for k, v in baselines.items() if k not in ("recipe", "tuning")}
    old["rows"] = [{k: v for k, v in r.items() if k != "tuned"} for r in old["rows"]]
    doc = BaselineDocument.from_json(old, "old")
    assert doc.recipe == "shared" and doc.tuning is None
    assert BaselineDocument.from_json(baselines, "new") == doc
    doc = dataclasses.replace(doc, config={**doc.config, "lr": 3e-3, "weight_decay": 1e-4})
    assert baselines_table(doc)[-1] == (
        f"  recipe: {SHARED_RECIPE}: lr 3.00e-03, weight decay 1.00e-04 for every model"
    )
    with pytest.raises(DalaError, match="recipe 'tuned' with tuning null"):
        BaselineDocument.from_json({**baselines, "recipe": "tuned"}, "bad")
    with pytest.raises(DalaError, match="expected one of"):
        BaselineDocument.from_json({**baselines, "recipe": "mine"}, "bad")


def test_tuned_table_names_each_models_choices(tmp_path: Path, write_result_jsons) -> None:
    _, baselines = write_result_jsons(tmp_path / "s", "40X")
    choice = {"fold": 1, "trial": 0, "lr": 1.5e-4, "weight_decay": 2e-5, "value": 0.7}
    choice |= {"run_id": "r", "study": "s"}
    rows = [{**r, "tuned": {"trials": 2, "folds": [choice]}} for r in baselines["rows"]]
    tuning = {"trials": 2, "sampler": "TPE", "pruner": "median", "selection": "per fold"}
    doc = BaselineDocument.from_json(
        {**baselines, "recipe": "tuned", "tuning": tuning, "rows": rows}, "t"
    )
    lines = baselines_table(doc)
    # The evaluation's row is named apart from the tuned rows.
    assert lines[2].split("  ")[1] == "dalaresnet50 (evaluate)"
    assert lines[-4].startswith("  recipe: tuned: each model its own lr/weight decay, 2 trial(s)")
    assert lines[-2:] == [
        "    densenet121: fold 1 lr 1.50e-04 wd 2.00e-05",
        "    <b>vgg16</b>: fold 1 lr 1.50e-04 wd 2.00e-05",
    ]
    bad = [{**rows[0], "tuned": {"trials": 2, "folds": [{**choice, "lr": "x"}]}}]
    with pytest.raises(DalaError, match=r"rows\[0\]\.tuned\.folds\[0\]\.lr"):
        BaselineDocument.from_json(
            {**baselines, "recipe": "tuned", "tuning": tuning, "rows": bad}, "t"
        )
