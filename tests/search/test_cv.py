"""A cross-validated objective (``--cv K``) and per-magnification study seeds.

Fast tests check the plan (refusals before anything starts, the saved plan, the space key)
and the study seeds; the slow one runs ``start --cv 3`` end to end and reads the records
back through MLflow and Optuna.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import ray

from dala_search.errors import ConfigError, DataError
from dala_search.runs import schema
from dala_search.runs.plan import PLAN_FILE, SearchPlan, study_seed
from dala_search.search import tuner

# The forced pruner is shipped to Tune by value (this file is not importable by workers).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _plan(tmp_path: Path, demo_root: Path, space: Path, name: str, **kw) -> SearchPlan:
    return tuner.plan_search(
        space=str(space),
        name=name,
        data_dir=demo_root,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        runs_dir=tmp_path / "runs",
        **kw,
    )


def test_cv_is_checked_before_anything_starts(tmp_path, demo_root, tiny_space) -> None:
    with pytest.raises(ConfigError, match=r"--cv: 0 must be an integer >= 1"):
        _plan(tmp_path, demo_root, tiny_space, "zero", cv=0)
    with pytest.raises(ConfigError, match=r"--cv 2 with --workers-per-trial 2"):
        _plan(tmp_path, demo_root, tiny_space, "ddp", cv=2, workers_per_trial=2)
    with pytest.raises(DataError, match=r"--cv 40: .*magnification 40X.*benign"):
        _plan(tmp_path, demo_root, tiny_space, "many", cv=40)
    assert not (tmp_path / "runs").exists()  # nothing was created
    plan = _plan(tmp_path, demo_root, tiny_space, "three", cv=3)
    assert plan.cv == 3
    plan.save(new=True)
    assert SearchPlan.load(Path(plan.folder)).cv == 3
    # a search.json written before --cv existed loads as one validation split
    raw = json.loads((Path(plan.folder) / PLAN_FILE).read_text())
    del raw["cv"]
    (Path(plan.folder) / PLAN_FILE).write_text(json.dumps(raw))
    assert SearchPlan.load(Path(plan.folder)).cv == 1


def test_space_key_search_cv(tmp_path, demo_root, tiny_space) -> None:
    from dala_search.space_file import load_space

    text = tiny_space.read_text().replace("  max_concurrent: 2\n", "  max_concurrent: 2\n  cv: 2\n")
    path = tmp_path / "cv.yaml"
    path.write_text(text)
    assert load_space(str(path)).settings.cv == 2
    assert _plan(tmp_path, demo_root, path, "fromspace").cv == 2
    assert _plan(tmp_path, demo_root, path, "flagwins", cv=1).cv == 1
    path.write_text(text.replace("cv: 2", "cv: 0"))
    with pytest.raises(ConfigError, match=r"search\.cv"):
        load_space(str(path))


def test_study_seed_formula() -> None:
    assert [study_seed(7, m) for m in ("40X", "100X", "200X", "400X")] == [
        7000,
        7001,
        7002,
        7003,
    ]
    with pytest.raises(DataError):
        study_seed(0, "50X")


def _first_configs(plan: SearchPlan, space, mag: str, n: int = 3) -> list[dict]:
    Path(plan.folder).mkdir(parents=True, exist_ok=True)  # where the study's sqlite file goes
    searcher = tuner.make_searcher(plan, space, mag)
    configs = [searcher.suggest(f"t{i}") for i in range(n)]
    return [{k: v for k, v in c.items() if k != "_optuna_number"} for c in configs]


def test_each_magnification_explores_on_its_own(tmp_path, demo_root, tiny_space) -> None:
    from dala_search.space_file import load_space

    space = load_space(str(tiny_space))
    a = _plan(tmp_path, demo_root, tiny_space, "a", magnifications="40X,100X", seed=3)
    at40, at100 = _first_configs(a, space, "40X"), _first_configs(a, space, "100X")
    assert at40[0] != at100[0]  # different first proposals
    study = optuna.load_study(study_name=a.study_name("100X"), storage=a.storage)
    assert study.user_attrs["study_seed"] == 3001 and study.user_attrs["cv"] == 1
    # re-planned with the same seed (a new search): the same sequences again
    b = _plan(tmp_path, demo_root, tiny_space, "b", magnifications="40X,100X", seed=3)
    assert _first_configs(b, space, "40X") == at40
    assert _first_configs(b, space, "100X") == at100


class PruneSecondTrial(optuna.pruners.BasePruner):
    """Prunes Optuna trial 1 at its first step, whatever its value: a forced, known prune."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1 and trial.last_step == 1


@pytest.mark.slow
def test_start_cv3_end_to_end(tmp_path, demo_root, tiny_space, monkeypatch, checked_records):
    from mlflow import MlflowClient
    from mlflow.artifacts import load_dict

    from dala_search.cli import main

    # the driver builds the pruner (tuner imports make_pruner by name)
    monkeypatch.setattr(tuner, "make_pruner", lambda name, **kw: PruneSecondTrial())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from click.testing import CliRunner

    args = ["start", "--space", str(tiny_space), "--data", str(demo_root), "--name", "cv3"]
    args += ["--cv", "3", "--trials", "3", "--epochs", "2", "--tracking-uri", uri]
    args += ["--runs-dir", str(tmp_path / "runs"), "--max-concurrent", "1"]
    try:
        out = CliRunner().invoke(main, args)
    finally:
        ray.shutdown()
    assert out.exit_code == 0, out.output + repr(out.exception)
    # A console that is ours (search/console.py): our lines, no Ray Tune banner
    assert "[40X] 3/3 trials done" in out.output
    for banner in ("Configuration for experiment", "View detailed results here", "tensorboard"):
        assert banner not in out.output, out.output
    plan = SearchPlan.load(tmp_path / "runs" / "cv3")
    assert plan.cv == 3
    trials, runs = checked_records(plan)
    assert [t.state.name for t in trials].count("PRUNED") == 1
    client = MlflowClient(uri)
    metric = plan.tune_metric
    names = ["val_balanced_accuracy", "val_roc_auc", "val_patient_accuracy"]
    by_number = {int(r.data.tags[schema.TAG_OPTUNA_NUMBER]): r for r in runs}
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags[schema.TAG_CV] == "3"
        history = {
            name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
            for name in names
            + [f"cv_fold_{k}_{n}" for k in (1, 2, 3) for n in names]
            + [f"{n}_std" for n in names]
        }
        steps = sorted(history[metric])
        assert steps == ([1] if t.state.name == "PRUNED" else [1, 2])
        for step in steps:
            for name in names:
                folds = [history[f"cv_fold_{k}_{name}"][step] for k in (1, 2, 3)]
                mean, value = float(np.mean(folds)), history[name][step]
                assert value == mean or (math.isnan(value) and math.isnan(mean)), (name, step)
                assert history[f"{name}_std"][step] == pytest.approx(float(np.std(folds)))
        # the pruner judged (Optuna's intermediate values are) the fold means
        assert t.intermediate_values == {s: history[metric][s] for s in steps}
        if t.state.name == "COMPLETE":
            assert t.value == max(history[metric].values())
    pruned = next(t for t in trials if t.state.name == "PRUNED")
    assert pruned.number == 1
    assert by_number[1].data.tags[schema.TAG_STATE] == "pruned"
    assert by_number[1].info.status == "KILLED"

    # the record of the folds: no test patient in any inner fold
    (parent,) = client.search_runs(
        [runs[0].info.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'magnification'"
    )
    assert parent.data.tags[schema.TAG_CV] == "3"
    assert parent.data.tags[schema.TAG_STUDY_SEED] == str(plan.study_seed("40X"))
    split = load_dict(f"{parent.info.artifact_uri}/split.json")
    folds = load_dict(f"{parent.info.artifact_uri}/inner_folds.json")["folds"]
    test = set(split["test"]["slides"])
    non_test = set(split["train"]["slides"]) | set(split["val"]["slides"])
    assert len(folds) == 3 and test
    validated = []
    for fold in folds:
        assert set(fold["test"]["slides"]) == test
        assert not (set(fold["train"]["slides"]) | set(fold["val"]["slides"])) & test
        validated += fold["val"]["slides"]
    assert sorted(validated) == sorted(non_test)
    study = optuna.load_study(study_name=plan.study_name("40X"), storage=plan.storage)
    assert study.user_attrs["cv"] == 3

    # the best trial's registered model is the ensemble of its three fold models
    import mlflow

    from dala_search.model.ensemble import ProbabilityEnsemble
    from dala_search.pyfunc_model import load_image_model

    best_id = parent.data.tags[schema.TAG_BEST_RUN]
    best = client.get_run(best_id)
    mlflow.set_tracking_uri(uri)
    image_model = load_image_model(best.data.tags[schema.TAG_MODEL_URI])
    model = image_model.model
    assert isinstance(model, ProbabilityEnsemble) and len(model.members) == 3
    # the ensemble is what the pyfunc applies; the config it travels with is the trial's
    assert image_model.meta["config"]["fc1"] == int(best.data.params["fc1"])
