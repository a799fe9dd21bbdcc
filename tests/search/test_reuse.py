"""Trial processes are reused (``reuse_actors``): one process runs trial after trial.

Tune ends a pruned function trial by letting its training thread leave at its next report
(``sys.exit`` in the thread) and hands the process to the next trial. These tests run a
real search whose trials are pruned (ASHA on ROC AUC, a continuous metric, so rung values
do not tie) with one trial at a time, and check that every trial's record is its own: its
epochs, its state, nothing left RUNNING, and that a trial after a pruned one in the same
process trained normally.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dala_search.runs import schema
from dala_search.search.tuner import plan_search, run_search

pytestmark = pytest.mark.slow

EPOCHS = 3


@pytest.fixture(scope="module")
def pruned_search(  # noqa: ANN201
    tmp_path_factory: pytest.TempPathFactory,
    demo_root: Path,
    tiny_space: Path,
    checked_records: Callable,
):
    import ray

    tmp = tmp_path_factory.mktemp("reuse")
    space = tmp / "auc.yaml"
    space.write_text(
        tiny_space.read_text()
        .replace("metric: balanced_accuracy", "metric: roc_auc")
        .replace("max_concurrent: 2", "max_concurrent: 1")
    )
    plan = plan_search(
        space=str(space),
        data_dir=demo_root,
        # trials are deterministic: with the current training code ASHA prunes trial 8
        # (its first-epoch ROC AUC is below the rung's cutoff) and trial 9 runs after it in
        # the same process; a change to training shifts these (the assertions print states)
        trials=9,
        epochs=EPOCHS,
        pruner="asha",
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        runs_dir=tmp / "runs",
    )
    try:
        (outcome,) = run_search(plan)
    finally:
        ray.shutdown()
    # one run per Optuna trial, same state, none RUNNING (runs oldest first)
    trials, runs = checked_records(plan)
    return plan, outcome, trials, runs, MlflowClient(plan.tracking_uri)


def test_pruned_and_completed_trials_share_processes(pruned_search) -> None:  # noqa: ANN001
    plan, outcome, trials, runs, _ = pruned_search
    assert outcome.finished == 9 and outcome.failed == 0
    assert outcome.pruned >= 1 and outcome.completed >= 1, outcome
    pids = [r.data.tags[schema.TAG_PID] for r in runs]
    assert len(set(pids)) < len(runs), pids  # a process ran more than one trial
    # A trial after a pruned one, in the same process, trained to its own end.
    after_pruned = [
        later
        for i, run in enumerate(runs)
        if run.data.tags[schema.TAG_STATE] == "pruned"
        for later in runs[i + 1 :]
        if later.data.tags[schema.TAG_PID] == run.data.tags[schema.TAG_PID]
    ]
    assert after_pruned, [
        (r.data.tags[schema.TAG_STATE], p) for r, p in zip(runs, pids, strict=True)
    ]
    status = {"completed": "FINISHED", "pruned": "KILLED"}  # how the search closes each
    for run in after_pruned:
        assert run.info.status == status[run.data.tags[schema.TAG_STATE]]
        assert plan.tune_metric in run.data.metrics  # it trained and reported


def test_every_record_is_its_own_trial(pruned_search) -> None:  # noqa: ANN001
    plan, _, trials, runs, client = pruned_search
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    by_number = {int(r.data.tags[schema.TAG_OPTUNA_NUMBER]): r for r in runs}
    for t in trials:
        run = by_number[t.number]
        history = client.get_metric_history(run.info.run_id, plan.tune_metric)
        steps = sorted(m.step for m in history if m.step <= EPOCHS)
        # Its own epochs, once each, and the values Optuna was told for them.
        assert steps == list(range(1, len(t.intermediate_values) + 1)), (t.number, steps)
        values = {m.step: m.value for m in history if m.step <= EPOCHS}
        assert values == pytest.approx(t.intermediate_values)
        if t.state.name == "PRUNED":
            assert len(steps) < EPOCHS
        else:
            assert len(steps) == EPOCHS
