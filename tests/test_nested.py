"""``dala-search evaluate NAME --nested K``: the inner searches, their data and the estimate.

Fast tests check what is refused before anything starts, the inner plans, the outer split
and the documents; the slow one runs a tiny ``--cv 2`` search, ``evaluate --folds 2``, and
``evaluate --nested 2`` interrupted after its first inner search and run again, and reads
the inner searches' records back through MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dala_search.cli import main
from dala_search.data.breakhis import index_breakhis
from dala_search.errors import ConfigError, DataError
from dala_search.evaluate import EVAL_METRICS, with_nested
from dala_search.folds import fold_splits, outer_split
from dala_search.nested import check_outer_folds, inner_plan
from dala_search.runs import schema
from dala_search.runs.documents import EvaluationDocument, MetricSummary, NestedEstimate
from dala_search.runs.plan import SearchPlan, SearchRef, nested_seed, study_seed

K = 2


def _ref(tmp_path: Path, demo_root: Path, **kw) -> SearchRef:
    folder = tmp_path / "runs" / "s"
    plan = SearchPlan(
        name="s",
        space="tiny.yaml",
        data_dir=str(demo_root),
        magnifications=("40X",),
        trials=2,
        epochs=1,
        metric="balanced_accuracy",
        sampler="tpe",
        pruner="median",
        seed=kw.pop("seed", 3),
        cpus_per_trial=1.0,
        gpus_per_trial=0.0,
        workers_per_trial=1,
        max_concurrent=1,
        time_budget_s=None,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        storage=f"sqlite:///{folder / 'optuna.db'}",
        address=None,
        folder=str(folder),
        **kw,
    )
    return SearchRef(name="s", folder=folder, plan=plan, tracking_uri=plan.tracking_uri)


def test_inner_plan_is_the_search_on_one_outer_fold(tmp_path: Path, demo_root: Path) -> None:
    ref = _ref(tmp_path, demo_root, cv=2, fold=1)
    plan = inner_plan(ref, 3, 2, ("40X",))
    assert plan.name == "s.nested3.outer2"
    assert plan.folder == str(ref.folder / "nested3" / "outer2")
    assert plan.seed == nested_seed(3, 2) == 3002
    assert plan.storage == f"sqlite:///{ref.folder / 'nested3' / 'outer2' / 'optuna.db'}"
    assert plan.outer == {"protocol": "folds", "k": 3, "fold": 2, "of": "s", "seed": 3}
    assert plan.fold is None and plan.log_models is False
    same = ("space", "trials", "epochs", "sampler", "pruner", "cv", "metric", "tracking_uri")
    assert all(getattr(plan, f) == getattr(ref.plan, f) for f in same)
    # its studies' seeds are none of the outer search's
    assert study_seed(plan.seed, "40X") not in {study_seed(3, m) for m in ("40X", "100X")}
    # a search.json without "outer" (older than --nested) loads as an ordinary search
    plan.save(new=True)
    assert SearchPlan.load(Path(plan.folder)) == plan
    raw = json.loads((Path(plan.folder) / "search.json").read_text())
    del raw["outer"]
    (Path(plan.folder) / "search.json").write_text(json.dumps(raw))
    assert SearchPlan.load(Path(plan.folder)).outer is None


def test_outer_split_is_evaluates_fold(demo_root: Path) -> None:
    index = index_breakhis(demo_root, verify=False)
    records = index.select("40X")
    splits = fold_splits(index, records, "folds", K, seed=3)
    for k in (1, 2):
        outer = {"protocol": "folds", "k": K, "fold": k, "of": "s", "seed": 3}
        assert outer_split(index, records, outer) == splits[k - 1]
    with pytest.raises(ConfigError, match="fold 3 is not in 1..2"):
        outer_split(index, records, {"protocol": "folds", "k": 2, "fold": 3, "seed": 0})


def test_too_many_outer_folds_refused_naming_nested(tmp_path: Path, demo_root: Path) -> None:
    index = index_breakhis(demo_root, verify=False)
    benign = len({r.slide for r in index.select("40X") if r.label == "benign"})
    with pytest.raises(DataError, match=rf"magnification 40X: --nested {benign + 1}: .*benign"):
        check_outer_folds(_ref(tmp_path, demo_root), index, ("40X",), benign + 1)
    # the search's --cv must fit the outer-training side of every fold
    with pytest.raises(DataError, match=r"--nested 2 with the search's --cv 40: .*outer fold 1"):
        check_outer_folds(_ref(tmp_path, demo_root, cv=40), index, ("40X",), 2)
    check_outer_folds(_ref(tmp_path, demo_root, cv=2), index, ("40X",), 2)


def test_bad_nested_input_exits_2_naming_the_option(tmp_path: Path) -> None:
    runs = ["--runs-dir", str(tmp_path / "runs")]
    out = CliRunner().invoke(main, ["evaluate", "s", "--nested", "1", *runs])
    assert out.exit_code == 2 and "--nested 1: needs at least 2" in out.stderr
    out = CliRunner().invoke(main, ["evaluate", "s", "--nested", "2", "--folds", "3", *runs])
    assert out.exit_code == 2 and "--nested 2 with --folds" in out.stderr
    out = CliRunner().invoke(main, ["evaluate", "nothere", "--nested", "2", *runs])
    assert out.exit_code == 2 and "no search named 'nothere'" in out.stderr
    assert not (tmp_path / "runs").exists()


def _summary(estimate: float | None) -> MetricSummary:
    return MetricSummary(
        estimate=estimate,
        ci_low=None if estimate is None else max(0.0, estimate - 0.1),
        ci_high=None if estimate is None else min(1.0, estimate + 0.1),
        mean=estimate,
        sd=None,
        values=(estimate, estimate),
    )


def _doc(metrics: dict[str, MetricSummary]) -> EvaluationDocument:
    return EvaluationDocument(
        magnification="40X",
        search="s",
        protocol="folds",
        k=2,
        config={},
        synthetic=True,
        code_version="0",
        ci="patient-level cluster bootstrap (test)",
        splits=[],
        n_images=10,
        n_patients=4,
        best_run_id="r",
        metrics=metrics,
    )


def _nested(metrics: dict[str, MetricSummary]) -> NestedEstimate:
    return NestedEstimate(
        k=2,
        cv=1,
        searches=["s.nested2.outer1", "s.nested2.outer2"],
        seeds=[1, 2],
        best_run_ids=["a", "b"],
        configs=[{}, {}],
        splits=[{}, {}],
        n_images=10,
        n_patients=4,
        ci="patient-level cluster bootstrap (test)",
        metrics=metrics,
    )


def test_selection_optimism_is_non_nested_minus_nested(tmp_path: Path) -> None:
    doc = with_nested(
        _doc({"accuracy": _summary(0.9), "roc_auc": _summary(None)}),
        _nested({"accuracy": _summary(0.7), "roc_auc": _summary(0.6)}),
    )
    assert doc.selection_optimism == {"accuracy": pytest.approx(0.2), "roc_auc": None}
    assert "pooled estimate of `evaluate` (folds k=2)" in doc.nested.optimism_of
    path = doc.write(tmp_path / "40X.json")
    assert EvaluationDocument.read(path, "40X") == doc
    # without a non-nested evaluation: no optimism, and a note saying why
    alone = with_nested(_doc({}), _nested({"accuracy": _summary(0.7)}))
    assert alone.selection_optimism is None and "no non-nested evaluation" in (
        alone.nested.optimism_note or ""
    )
    assert EvaluationDocument.read(alone.write(tmp_path / "a.json"), "40X") == alone
    # a document written before --nested (no such keys) still reads; unknown keys are refused
    raw = _doc({"accuracy": _summary(0.9)}).to_json()
    del raw["nested"], raw["selection_optimism"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    assert EvaluationDocument.read(tmp_path / "old.json").nested is None
    bad = doc.to_json()
    bad["nested"]["extra"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(Exception, match=r"nested.*unknown key\(s\) \['extra'\]"):
        EvaluationDocument.read(tmp_path / "bad.json")


# ---- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, tiny_space: Path):
    """A tiny --cv 2 search (2 trials, 1 epoch), `evaluate --folds 2`, then `evaluate
    --nested 2` interrupted after its first inner search and run again."""
    import ray

    from dala_search.search import tuner

    root = tmp_path_factory.mktemp("nested")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = ["--runs-dir", str(root / "runs"), "--tracking-uri", uri]
    plan = tuner.plan_search(
        space=str(tiny_space),
        name="tiny",
        data_dir=demo_root,
        tracking_uri=uri,
        runs_dir=root / "runs",
        trials=2,
        epochs=1,
        cv=2,
        seed=1,
    )
    real_run_search = tuner.run_search
    calls: list[str] = []

    def interrupt_second(p: SearchPlan, **kw):  # noqa: ANN202
        calls.append(p.name)
        if len(calls) == 2:  # as Ctrl+C between the inner searches
            raise tuner.SearchInterrupted(p.name, [])
        return real_run_search(p, **kw)

    try:
        tuner.run_search(plan)
        runner = CliRunner()
        ev = runner.invoke(main, ["evaluate", "tiny", "--folds", "2", "--epochs", "1", *args])
        assert ev.exit_code == 0, ev.output + repr(ev.exception)
        tuner.run_search = interrupt_second
        try:
            first = runner.invoke(main, ["evaluate", "tiny", "--nested", "2", "--json", *args])
        finally:
            tuner.run_search = real_run_search
        store = schema.client(uri)
        outer1 = store.get_experiment_by_name(schema.experiment_name("tiny.nested2.outer1"))
        runs_before = {r.info.run_id for r in store.search_runs([outer1.experiment_id])}
        second = runner.invoke(main, ["evaluate", "tiny", "--nested", "2", "--json", *args])
        # a later non-nested evaluate keeps the nested part and recomputes the optimism
        again = runner.invoke(
            main, ["evaluate", "tiny", "--seeds", "2", "--epochs", "1", "--json", *args]
        )
    finally:
        ray.shutdown()
    return {
        "root": root,
        "uri": uri,
        "first": first,
        "second": second,
        "again": again,
        "calls": calls,
        "runs_before": runs_before,
        "folder": root / "runs" / "tiny",
    }


@pytest.mark.slow
def test_nested_interrupted_then_continued(nested_run: dict) -> None:
    first, second = nested_run["first"], nested_run["second"]
    assert first.exit_code == 130, first.output
    assert "continue with `dala-search evaluate tiny --nested 2`" in first.stderr
    assert nested_run["calls"] == ["tiny.nested2.outer1", "tiny.nested2.outer2"]
    assert second.exit_code == 0, second.output + repr(second.exception)
    assert "inner search tiny.nested2.outer1 finished before; skipped" in second.stderr
    assert "starting inner search tiny.nested2.outer2" in second.stderr
    # the finished inner search was not redone: no new run in its experiment
    store = schema.client(nested_run["uri"])
    outer1 = store.get_experiment_by_name(schema.experiment_name("tiny.nested2.outer1"))
    assert {r.info.run_id for r in store.search_runs([outer1.experiment_id])} == nested_run[
        "runs_before"
    ]


@pytest.mark.slow
def test_nested_estimate_written_with_selection_optimism(nested_run: dict) -> None:
    (doc,) = json.loads(nested_run["second"].stdout)["magnifications"]
    nested = doc["nested"]
    assert nested["k"] == K and nested["cv"] == 2
    assert nested["searches"] == ["tiny.nested2.outer1", "tiny.nested2.outer2"]
    assert nested["seeds"] == [1001, 1002]
    assert set(nested["metrics"]) == set(EVAL_METRICS)
    for name, m in nested["metrics"].items():
        assert len(m["values"]) == K, name
        for part in ("estimate", "ci_low", "ci_high", "mean"):
            if m[part] is not None:
                assert 0.0 <= m[part] <= 1.0, (name, part)
        if m["ci_low"] is not None:
            assert m["ci_low"] <= m["ci_high"]
    assert nested["metrics"]["accuracy"]["ci_low"] is not None
    # every patient tested once across the outer folds
    tests = [set(s["test"]["slides"]) for s in nested["splits"]]
    assert not tests[0] & tests[1] and nested["n_patients"] == len(tests[0] | tests[1])
    # optimism = the non-nested pooled estimate minus the nested one
    for name, opt in doc["selection_optimism"].items():
        ours, theirs = nested["metrics"][name]["estimate"], doc["metrics"][name]["estimate"]
        if ours is None or theirs is None:
            assert opt is None
        else:
            assert opt == pytest.approx(theirs - ours), name
    # the parent run of the outer search carries it too
    store = schema.client(nested_run["uri"])
    exp = store.get_experiment_by_name(schema.experiment_name("tiny"))
    (parent,) = store.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'magnification'"
    )
    m = parent.data.metrics
    acc = nested["metrics"]["accuracy"]
    assert m["nested_test_accuracy_estimate"] == pytest.approx(acc["estimate"])
    assert m["nested_test_accuracy_ci_low"] == pytest.approx(acc["ci_low"])
    assert m["selection_optimism_accuracy"] == pytest.approx(doc["selection_optimism"]["accuracy"])
    assert parent.data.tags[schema.TAG_NESTED].startswith("K=2 tiny.nested2.outer1")
    # no inner search registered a model version
    assert not [
        v for v in store.search_model_versions() if v.tags.get(schema.TAG_SEARCH, "") != "tiny"
    ]


@pytest.mark.slow
def test_no_outer_test_patient_in_its_inner_search(nested_run: dict) -> None:
    (doc,) = json.loads(nested_run["second"].stdout)["magnifications"]
    store = schema.client(nested_run["uri"])
    for k, name in enumerate(doc["nested"]["searches"], start=1):
        outer_test = set(doc["nested"]["splits"][k - 1]["test"]["slides"])
        plan = SearchPlan.load(nested_run["folder"] / f"nested2/outer{k}")
        assert plan.outer["fold"] == k and plan.cv == 2
        exp = store.get_experiment_by_name(schema.experiment_name(name))
        assert exp.tags[schema.TAG_NESTED_OF] == "tiny"
        (parent,) = store.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'magnification'"
        )
        assert parent.data.tags[schema.TAG_OUTER_FOLD] == f"{k}/2"
        split = schema.run_json(store, parent.info.run_id, "split.json")
        assert set(split["test"]["slides"]) == outer_test
        assert not outer_test & (set(split["train"]["slides"]) | set(split["val"]["slides"]))
        folds = schema.run_json(store, parent.info.run_id, "inner_folds.json")
        assert folds["cv"] == 2 and len(folds["folds"]) == 2
        for f in folds["folds"]:
            assert not outer_test & (set(f["train"]["slides"]) | set(f["val"]["slides"]))
            assert set(f["test"]["slides"]) == outer_test
        # the pooled predictions are the best trial's, on exactly the outer-test patients
        best = doc["nested"]["best_run_ids"][k - 1]
        preds = schema.run_json(store, best, schema.TEST_PREDICTIONS)
        assert set(preds["slides"]) == outer_test
        assert store.get_run(best).data.tags[schema.PARENT_TAG] == parent.info.run_id


@pytest.mark.slow
def test_report_and_table_show_both_figures(nested_run: dict) -> None:
    from dala_search.evaluate import evaluation_table
    from dala_search.report import build_report

    (doc,) = json.loads(nested_run["second"].stdout)["magnifications"]
    lines = evaluation_table(doc)
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  nested, 2 outer folds"))
    (acc,) = [ln for ln in lines[start:] if ln.split()[0] == "accuracy"]
    opt = doc["selection_optimism"]["accuracy"]
    assert f"{opt:+.4f}" in acc
    html = build_report(
        "tiny",
        runs_dir=nested_run["root"] / "runs",
        tracking_uri=nested_run["uri"],
        gradcam_per_class=0,
        log_gradcam=False,
        progress=False,
    ).read_text()
    assert "Nested evaluation (2 outer folds)" in html
    assert "mean of 2\npatient-grouped inner folds (<code>--cv 2</code>)" in html  # a --cv search
    assert "optimistic by the selection" in html and "tiny.nested2.outer2" in html
    # The report reads the document as it is now: the fixture's later `evaluate --seeds 2`
    # recomputed the optimism against its own pooled estimate.
    now = json.loads((nested_run["folder"] / "evaluation" / "40X.json").read_text())
    assert f"{now['selection_optimism']['accuracy']:+.4f}" in html


@pytest.mark.slow
def test_a_later_evaluate_keeps_the_nested_estimate(nested_run: dict) -> None:
    again = nested_run["again"]
    assert again.exit_code == 0, again.output + repr(again.exception)
    (doc,) = json.loads(again.stdout)["magnifications"]
    (before,) = json.loads(nested_run["second"].stdout)["magnifications"]
    path = nested_run["folder"] / "evaluation" / "40X.json"
    assert json.loads(path.read_text()) == doc  # the file holds both parts
    assert doc["protocol"] == "seeds" and before["protocol"] == "folds"
    assert doc["nested"]["metrics"] == before["nested"]["metrics"]
    assert "(seeds k=2)" in doc["nested"]["optimism_of"]
    for name, opt in doc["selection_optimism"].items():
        ours, theirs = doc["nested"]["metrics"][name]["estimate"], doc["metrics"][name]["estimate"]
        assert opt == (None if ours is None or theirs is None else pytest.approx(theirs - ours))
