"""What one magnification of a search records beside its trials: the parent run's tags,
the outer split and ``--cv`` inner folds on it, and, when it ends, the study's counts and
the best trial (``MagnificationOutcome``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from dala_search import pareto
from dala_search.data import protocols
from dala_search.runs import schema
from dala_search.runs.plan import SearchPlan
from dala_search.search import tracking


@dataclass
class MagnificationOutcome:
    magnification: str
    finished: int
    completed: int
    pruned: int
    failed: int
    best_value: float | None
    best_run_id: str | None
    registered_version: str | None
    interrupted: bool


def protocol_tags(plan: SearchPlan) -> dict[str, str]:
    """The split protocol, and whether it leaks, on the experiment and the parent runs."""
    return {
        schema.TAG_PROTOCOL: plan.protocol,
        schema.TAG_LEAKY: str(protocols.is_leaky(plan.protocol)).lower(),
    }


def outer_tags(plan: SearchPlan) -> dict[str, str]:
    """An inner search of a nested evaluation names its outer search and fold (experiment
    and parent runs); none for an ordinary search."""
    if plan.outer is None:
        return {}
    return {
        schema.TAG_NESTED_OF: str(plan.outer.get("of", "")),
        schema.TAG_OUTER_FOLD: f"{plan.outer['fold']}/{plan.outer['k']}",
    }


def parent_tags(plan: SearchPlan, mag: str, data: Any) -> dict[str, str]:
    """The tags of the magnification's parent run: its data, split, space and study seed."""
    return {
        schema.TAG_SYNTHETIC: str(data.synthetic).lower(),
        schema.TAG_DATA_ROOT: plan.data_dir,
        schema.TAG_SPLIT: data.split.description,
        schema.TAG_SPACE: plan.space,
        schema.TAG_CV: str(plan.cv),
        schema.TAG_STUDY_SEED: str(plan.study_seed(mag)),
        **outer_tags(plan),
        **protocol_tags(plan),
    }


def inner_folds(
    plan: SearchPlan, data: Any, tracker: tracking.SearchTracker, parent: str
) -> tuple[Any, ...]:
    """The inner folds every trial of a ``--cv K`` search trains on (empty for K = 1).

    Made once per magnification (seeded with the search seed, so a resumed search makes the
    same) and logged on the parent run as ``inner_folds.json`` (slides per side and fold),
    with the outer split as ``split.json``: the record shows no test patient in any fold.
    """
    schema.retry(tracker.client.log_dict, parent, data.split.to_json(data.records), "split.json")
    if plan.cv < 2:
        return ()
    folds = tuple(
        protocols.protocol_inner_folds(
            data.records, data.split, plan.cv, seed=plan.seed, protocol=plan.protocol
        )
    )
    record = {"cv": plan.cv, "folds": [f.to_json(data.records) for f in folds]}
    schema.retry(tracker.client.log_dict, parent, record, "inner_folds.json")
    return folds


def summarise(
    plan: SearchPlan,
    mag: str,
    parent: str,
    tracker: tracking.SearchTracker,
    budget_s: float | None,
    stopped: bool = False,
) -> MagnificationOutcome:
    """Count the study's trials, write the best onto the parent run, register its model.

    ``stopped``: the driver was told to stop (a search with a time budget is then
    interrupted too, not ended by its budget)."""

    study = optuna.load_study(study_name=plan.study_name(mag), storage=plan.storage)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    finished = sum(s in ("COMPLETE", "PRUNED", "FAIL") for s in states)
    interrupted = finished < plan.trials and (budget_s is None or stopped)
    key = f"best_{plan.tune_metric}"
    best = schema.best_completed_run(tracker.client, tracker.experiment_id, parent, key)
    front = None
    if plan.objectives:  # several objectives: the front on the parent run and its trials
        front = pareto.record_front(
            tracker.client, tracker.experiment_id, parent, plan.storage, plan.study_name(mag), mag
        )
    if front and front[0]["run_id"]:
        # The front's primary best is the best feasible trial by the primary; of trials
        # tied on it, the one not dominated (MLflow's tie-break, the earliest, may be).
        best = tracker.client.get_run(front[0]["run_id"])
    version = None
    if best is not None:
        current = tracker.client.get_run(parent).data.tags.get(schema.TAG_BEST_RUN)
        if current != best.info.run_id:
            version = tracker.record_best(parent, mag, best)
    if front and plan.log_models:  # the other front points: aliases pareto-<i>
        pareto.register_front(tracker.client, tracker.uri, tracker.search, mag, front)
    if interrupted:
        # Trials cut by the interrupt: KILLED, state "interrupted"; `resume` reopens them.
        tracker.close_interrupted(parent)
    tracker.close_parent(parent, "KILLED" if interrupted else "FINISHED")
    return MagnificationOutcome(
        magnification=mag,
        finished=finished,
        completed=states.count("COMPLETE"),
        pruned=states.count("PRUNED"),
        failed=states.count("FAIL"),
        best_value=best.data.metrics.get(key) if best is not None else None,
        best_run_id=best.info.run_id if best is not None else None,
        registered_version=version,
        interrupted=interrupted,
    )
