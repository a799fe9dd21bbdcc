"""Done-when of issue 23: ``start --space smoke --objective val_balanced_accuracy:max
--objective latency_ms:min`` end to end (one tiny search shared by the module's tests).

The pruner is a real Optuna pruner subclass that records what it was shown and prunes
trial 2 at its first epoch: the test then checks what was judged (the primary's values,
kept as the user attribute ``primary_intermediate``, in a single-direction view) and that
the pruned trial ends PRUNED in the study and MLflow and never on the front.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import ray
from click.testing import CliRunner
from mlflow import MlflowClient

from dala_search import pareto
from dala_search.cli import main
from dala_search.runs import schema
from dala_search.runs.plan import SearchPlan
from dala_search.search import tuner

pytestmark = pytest.mark.slow


class RecordingPruner(optuna.pruners.BasePruner):
    """Records (direction, trial number, intermediate values) it judged; prunes trial 2."""

    seen: list[tuple[str, int, dict[int, float]]] = []

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.seen.append((study.direction.name, trial.number, dict(trial.intermediate_values)))
        return trial.number == 2 and trial.last_step == 1


@pytest.fixture(scope="module")
def mo_search(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict:
    root = tmp_path_factory.mktemp("mo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setattr(tuner, "make_pruner", lambda name, **kw: RecordingPruner())
    args = ["start", "--space", "smoke", "--data", str(demo_root), "--name", "mo", "-m", "40X"]
    args += ["--objective", "val_balanced_accuracy:max", "--objective", "latency_ms:min"]
    args += ["--trials", "4", "--epochs", "2", "--max-concurrent", "1", "--tracking-uri", uri]
    args += ["--runs-dir", str(root / "runs"), "--gpus-per-trial", "0", "--enqueue", "paper"]
    try:
        out = CliRunner().invoke(main, args)
    finally:
        ray.shutdown()
        mp.undo()
    assert out.exit_code == 0, out.output + repr(out.exception)
    plan = SearchPlan.load(root / "runs" / "mo")
    study = optuna.load_study(study_name=plan.study_name("40X"), storage=plan.storage)
    return {"plan": plan, "study": study, "uri": uri, "runs": root / "runs"}


def test_the_study_reads_as_two_directions_through_optuna(mo_search) -> None:
    study, plan = mo_search["study"], mo_search["plan"]
    assert plan.sampler == "nsga2" and plan.metric == "balanced_accuracy"
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_balanced_accuracy", "latency_ms"]
    assert study.user_attrs["objectives"] == ["val_balanced_accuracy:max", "latency_ms:min"]
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    client = MlflowClient(mo_search["uri"])
    for t in study.trials:
        run = _run_of(client, plan, t.number)
        history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        # the primary's per-epoch values, kept in the study as a user attribute
        kept = t.user_attrs["primary_intermediate"]
        assert kept == {str(m.step): m.value for m in history}
        assert t.intermediate_values == {}  # Optuna's own report is refused here
        if t.state.name == "COMPLETE":
            assert t.values[0] == max(m.value for m in history)
            assert t.values[1] == run.data.metrics["latency_ms"] > 0
        else:
            assert t.values is None and run.data.tags[schema.TAG_STATE] == "pruned"


def test_enqueue_paper_made_trial_0_the_papers_point(mo_search) -> None:
    study = mo_search["study"]
    (point,) = study.user_attrs["enqueued"]
    assert point["source"] == "paper" and point["params"]["attention"] == "eca"
    trial0 = study.trials[0]
    assert {k: trial0.params[k] for k in point["params"]} == point["params"]
    client = MlflowClient(mo_search["uri"])
    parent = _run_of(client, mo_search["plan"], 0).data.tags["mlflow.parentRunId"]
    recorded = client.download_artifacts(parent, "enqueued.json")
    assert json.loads(Path(recorded).read_text())["enqueued"] == [point]


def test_the_pruner_judged_the_primary_in_a_single_direction_view(mo_search) -> None:
    study = mo_search["study"]
    judged = list(RecordingPruner.seen)
    assert judged and {d for d, _, _ in judged} == {"MAXIMIZE"}
    for _, number, values in judged:
        kept = study.trials[number].user_attrs["primary_intermediate"]
        assert values == {int(k): v for k, v in kept.items() if int(k) <= max(values)}
    assert any(n == 2 and set(v) == {1} for _, n, v in judged)  # trial 2 judged at epoch 1


def test_best_json_mlflow_and_the_front_leave_the_pruned_trial_out(mo_search) -> None:
    plan, uri = mo_search["plan"], mo_search["uri"]
    out = CliRunner().invoke(
        main, ["best", "mo", "--json", "--runs-dir", str(mo_search["runs"]), "--tracking-uri", uri]
    )
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.output)["magnifications"]
    front = row["pareto"]
    optuna_front = {t.number for t in mo_search["study"].best_trials}
    assert front and {r["trial"] for r in front} == optuna_front and 2 not in optuna_front
    assert sum(r["primary_best"] for r in front) == 1
    client = MlflowClient(uri)
    for t in mo_search["study"].trials:
        tag = _run_of(client, plan, t.number).data.tags.get(pareto.TAG_PARETO)
        assert tag == ({"true"} if t.number in optuna_front else {"false", None}).pop() or (
            t.state.name == "PRUNED" and tag is None
        )
    parent = client.get_run(front[0]["run_id"]).data.tags["mlflow.parentRunId"]
    table = client.download_artifacts(parent, pareto.FRONT_TABLE)
    assert json.loads(Path(table).read_text())["front"] == front
    assert pareto.FRONT_PLOT.split("/")[-1] in {
        Path(f.path).name for f in client.list_artifacts(parent, "figures")
    }
    text = CliRunner().invoke(
        main, ["best", "mo", "--runs-dir", str(mo_search["runs"]), "--tracking-uri", uri]
    )
    assert "Pareto front" in text.output


def _run_of(client: MlflowClient, plan: SearchPlan, number: int):
    exp = client.get_experiment_by_name(schema.experiment_name(plan.name))
    (run,) = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{schema.TAG_OPTUNA_NUMBER}` = '{number}'",
    )
    return run


def test_the_report_shows_the_front_with_the_papers_point(mo_search, tmp_path) -> None:
    from dala_search.report import build_report

    assert pareto.paper_trial(mo_search["study"]).number == 0  # trial 0 ran the paper point
    html = build_report(
        "mo",
        runs_dir=mo_search["runs"],
        out=tmp_path / "r.html",
        gradcam_per_class=0,
        log_gradcam=False,
        progress=False,
    )
    page = html.read_text()
    assert "Pareto front" in page
    assert (tmp_path / "r_figures" / "40X_optuna_pareto.png").stat().st_size > 1000


def test_every_front_model_is_registered_best_and_pareto_aliases(mo_search) -> None:
    """Every completed trial logged its model (the pruned one none); the front's primary
    best is the registered ``best``, each other front point ``pareto-<i>``."""
    plan, uri, study = mo_search["plan"], mo_search["uri"], mo_search["study"]
    client = MlflowClient(uri)
    for t in study.trials:
        tag = _run_of(client, plan, t.number).data.tags.get(schema.TAG_HAS_MODEL)
        assert (tag == "true") == (t.state.name == "COMPLETE"), (t.number, tag)
    exp = client.get_experiment_by_name(schema.experiment_name(plan.name))
    front = pareto.read_front(
        plan.storage, plan.study_name("40X"), client, exp.experiment_id, "40X"
    )
    name = schema.model_name("40X")
    assert client.get_model_version_by_alias(name, "best").run_id == front[0]["run_id"]
    wanted = {f"pareto-{i}": row["run_id"] for i, row in enumerate(front) if i > 0}
    aliases = client.get_registered_model(name).aliases
    assert set(aliases) == {"best", *wanted}
    for alias, run_id in wanted.items():
        assert client.get_model_version_by_alias(name, alias).run_id == run_id
    # a second summary (a resumed search) registers nothing new and keeps the aliases
    versions = len(client.search_model_versions(f"name = '{name}'"))
    again = pareto.register_front(client, uri, plan.name, "40X", front)
    assert {a: str(v) for a, v in again.items()} == {a: str(aliases[a]) for a in wanted}
    assert len(client.search_model_versions(f"name = '{name}'")) == versions
