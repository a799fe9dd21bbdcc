"""Ray Tune wiring of a search: one Optuna study and one Tune experiment per magnification.

``planning.check_search`` (re-exported here with ``plan_search`` and ``check_resume``, the
CLI's entry points) checks everything a search needs before anything starts;
``run_search`` runs the plan in one Ray session, magnification after magnification, and
can pick an interrupted plan up again (``resume``).

A search's folder (``<runs_dir>/<name>/``) holds ``search.json`` (the plan), the Optuna
study (``optuna.db`` unless ``--storage`` names a database) and Ray's experiment state
(``ray/<magnification>/``), which is what ``Tuner.restore`` resumes from.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from dala_search.data import breakhis
from dala_search.data.breakhis import BreakHisIndex
from dala_search.errors import DalaError
from dala_search.folds import outer_split
from dala_search.objectives import cost_metrics_needed
from dala_search.runs import rollback, schema
from dala_search.runs.plan import SearchPlan
from dala_search.search import (
    console,
    distributed,
    ray_internals,
    ray_session,
    stopping,
    tracking,
    warm_start,
)
from dala_search.search.callbacks import SearchCallback
from dala_search.search.magnification_record import (
    MagnificationOutcome,
    inner_folds,
    outer_tags,
    parent_tags,
    protocol_tags,
    summarise,
)
from dala_search.search.multiobjective import MultiObjectiveMixin
from dala_search.search.optuna_search import PruningOptunaSearch
from dala_search.search.planning import CheckedSearch, check_resume, check_search, plan_search
from dala_search.search.pruning import (
    OptunaPruningScheduler,
    PrunedMarkingASHAScheduler,
    make_pruner,
    make_sampler,
)
from dala_search.search.stopping import SearchFailed as SearchFailed  # the CLI's (via tuner)
from dala_search.search.stopping import exit_process as exit_process
from dala_search.search.trainable import TrialContext, run_trial
from dala_search.space_file import load_space
from dala_search.train import prepare_data

# The CLI reaches the search package through this module only (tests/test_architecture.py).
__all__ = [
    "CheckedSearch",
    "MagnificationOutcome",
    "SearchInterrupted",
    "check_resume",
    "check_search",
    "plan_search",
    "run_search",
]


class DalaOptunaSearch(PruningOptunaSearch):
    """Adds the Optuna trial number to each config, so records can cross-reference."""

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        trials = ray_internals.trials(self)
        if config is not None and trial_id in trials:
            config = {**config, "_optuna_number": trials[trial_id].number}
        return config


class DalaMultiObjectiveSearch(MultiObjectiveMixin, DalaOptunaSearch):
    """``DalaOptunaSearch`` with several objectives (``--objective``, ``--constraint``)."""


def make_searcher(plan: SearchPlan, space: Any, mag: str) -> Any:
    """The searcher of one magnification's study, its sampler seeded with the study seed.

    The study records ``study_seed`` and ``cv`` as user attributes (optuna-dashboard shows
    them). Called by ``_run_magnification`` when a magnification starts (a resumed one
    restores its searcher, sampler state included).
    """
    seed = plan.study_seed(mag)
    # Several objectives or constraints: the multi-objective bridge (multiobjective.py).
    cls: Any = DalaMultiObjectiveSearch if plan.objectives else DalaOptunaSearch
    extra = {"objectives": plan.objectives, "constraints": plan.constraints}
    searcher = cls(
        **(extra if plan.objectives else {}),
        space=space.suggest,
        metric=plan.tune_metric,
        mode="max",
        sampler=make_sampler(plan.sampler, seed=seed),
        study_name=plan.study_name(mag),
        storage=plan.storage,
        seed=seed,
        prune_metric=plan.tune_prune_metric,
    )
    searcher.study.set_user_attr("study_seed", seed)
    searcher.study.set_user_attr("cv", plan.cv)
    return searcher


def run_search(
    plan: SearchPlan,
    *,
    resume: bool = False,
    index: BreakHisIndex | None = None,
    verbose: bool = False,
) -> list[MagnificationOutcome]:
    """Run (or continue) every magnification of ``plan``; returns one outcome each.

    ``index``: the data's index when the caller holds it already (``check_search`` or
    ``check_resume`` read it; a nested evaluation runs K searches on one data set), else
    the data folder is indexed here.

    ``verbose``: Ray Tune's own banners too (``console.py``).

    Raises ``SearchInterrupted`` when the driver was interrupted before the plan finished.
    """
    space = load_space(plan.space)
    started_ray = ray_session.init_ray(plan)
    ray_session.check_cluster_tracking(plan)
    # After ray.init, whose own SIGTERM handler exits the process (stopping.py).
    stop = stopping.DriverStop(plan).install()
    outcomes: list[MagnificationOutcome] = []
    created = resume  # from here on, a failure is rolled back (never another search's folder)
    try:
        if resume:
            rollback.clear_failed(plan.folder)
        else:
            plan.save(new=True)
            created = True
        with console.quiet_tune(verbose):
            _run_plan(plan, space, index, stop, outcomes)
    except (SearchInterrupted, KeyboardInterrupt):
        stopping.end_interrupted(plan, stop, started_ray)
        raise SearchInterrupted(plan.name, outcomes) from None
    except Exception as error:
        if not created:
            raise
        raise stopping.roll_back(plan, error, started_ray) from error
    finally:
        stop.uninstall()
    return outcomes


def _run_plan(
    plan: SearchPlan,
    space: Any,
    index: BreakHisIndex | None,
    stop: stopping.DriverStop,
    outcomes: list[MagnificationOutcome],
) -> None:
    """Every magnification of ``plan`` in turn; appends each one's outcome to ``outcomes``."""
    folder = Path(plan.folder)
    stop.check()
    tracker = tracking.SearchTracker(plan.tracking_uri, plan.name, folder=plan.folder)
    for key, value in {**outer_tags(plan), **protocol_tags(plan)}.items():
        tracker.client.set_experiment_tag(tracker.experiment_id, key, value)
    if index is None:
        index = breakhis.index_breakhis(plan.data_dir, progress=True)
    if index.skipped:
        print(
            f"note: {len(index.skipped)} unreadable or non-BreakHis file(s) skipped "
            f"(`dala-search data check {plan.data_dir}` lists them)",
            file=sys.stderr,
        )
    image_size = int(space.fixed.get("image_size", 224))

    deadline = time.monotonic() + plan.time_budget_s if plan.time_budget_s else None
    for i, mag in enumerate(plan.magnifications):
        stop.check()  # the stopping points of the driver outside Tuner.fit (stopping.py)
        data = prepare_data(
            index,
            mag,
            image_size=image_size,
            seed=plan.seed,
            fold=plan.fold,
            progress=True,
            protocol=plan.protocol,
        )
        stop.check()
        if plan.outer is not None:  # an inner search of `evaluate --nested`: its outer fold
            data = dataclasses.replace(data, split=outer_split(index, data.records, plan.outer))
        budget = None
        if deadline is not None:
            budget = max(1.0, (deadline - time.monotonic()) / (len(plan.magnifications) - i))
        outcome = _run_magnification(plan, space, mag, data, tracker, folder, budget, stop)
        outcomes.append(outcome)
        if outcome.interrupted or (stop.requested and i + 1 < len(plan.magnifications)):
            raise SearchInterrupted(plan.name, outcomes)


class SearchInterrupted(DalaError):
    """The driver stopped before the plan finished; ``dala-search resume NAME`` continues."""

    def __init__(self, name: str, outcomes: list[MagnificationOutcome]) -> None:
        super().__init__(
            f"search {name!r} was interrupted; continue it with `dala-search resume {name}`"
        )
        self.outcomes = outcomes


def _run_magnification(
    plan: SearchPlan,
    space: Any,
    mag: str,
    data: Any,
    tracker: tracking.SearchTracker,
    folder: Path,
    budget_s: float | None,
    stop: stopping.DriverStop,
) -> MagnificationOutcome:
    """One magnification's Tune experiment, new or restored from ``ray/<mag>/``, to its end."""
    parent = tracker.parent_run(mag, tags=parent_tags(plan, mag, data))
    tracker.client.update_run(parent, status="RUNNING")
    folds = inner_folds(plan, data, tracker, parent)
    res = ray_session.resources(plan)
    ctx = _trial_context(plan, space, mag, data, tracker, parent, folds, res)
    trainable, max_concurrent, first_callbacks = _trainable(plan, data, ctx, res)
    exp_dir = folder / "ray" / mag
    if tune.Tuner.can_restore(str(exp_dir)):
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable, resume_unfinished=True, resume_errored=False
        )
    else:
        searcher = make_searcher(plan, space, mag)
        enqueued = warm_start.enqueue_for(plan, space, mag, searcher.study)
        if enqueued:  # what was tried first, on the parent run (also the study's user attr)
            schema.retry(tracker.client.log_dict, parent, {"enqueued": enqueued}, "enqueued.json")
        tuner = _new_tuner(
            plan, space, mag, folder, trainable, max_concurrent, first_callbacks, budget_s, searcher
        )
    with stop.fit():
        tuner.fit()
    return summarise(plan, mag, parent, tracker, budget_s, stopped=stop.requested)


def _trial_context(
    plan: SearchPlan,
    space: Any,
    mag: str,
    data: Any,
    tracker: tracking.SearchTracker,
    parent: str,
    folds: tuple[Any, ...],
    res: dict[str, float],
) -> TrialContext:
    """What every trial of the magnification needs besides its config and the data."""
    overrides: dict[str, Any] = {"epochs": plan.epochs, "select_metric": plan.metric}
    if res["gpu"] == 0:
        overrides.update(device="cpu", num_threads=max(1, int(res["cpu"])))
    return TrialContext(
        search=plan.name,
        magnification=mag,
        tracking_uri=plan.tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=parent,
        metric=plan.tune_metric,
        space=space,
        overrides=overrides,
        synthetic=data.synthetic,
        code_version=schema.code_version(),
        log_models=plan.log_models,
        folds=folds,
        costs=cost_metrics_needed(plan.objectives, plan.constraints),
        log_every_model=len(plan.objectives) > 1,  # the front's models are registered
    )


def _trainable(
    plan: SearchPlan, data: Any, ctx: TrialContext, res: dict[str, float]
) -> tuple[Any, int, list[Any]]:
    """The Tune trainable of one trial, how many run at once, and the callbacks that must
    come before the search's own (a data-parallel trial's worker cleanup)."""
    if plan.workers_per_trial > 1:  # data parallel: Ray Train workers (distributed.py)
        layout = distributed.WorkerLayout(plan.workers_per_trial, res["cpu"], res["gpu"])
        cluster = ray.cluster_resources()
        if plan.address is None:  # a Ray of our own cannot grow: refuse what never fits
            distributed.check_fits(layout, cluster)
        trainable = distributed.ddp_trainable(data, ctx, layout)
        max_concurrent = distributed.max_concurrent_trials(plan.max_concurrent, layout, cluster)
        # First: a stopped trial's workers are gone before its MLflow run is closed.
        return trainable, max_concurrent, [distributed.FreeWorkersCallback()]
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, ctx=ctx), res)
    return trainable, ray_session.max_concurrent(plan, res), []


def _scheduler(plan: SearchPlan, space: Any) -> Any:
    """ASHA, or the Optuna pruner of ``--pruner`` judging each reported epoch."""
    if plan.pruner == "asha":
        epochs = plan.epochs or int(space.fixed.get("epochs", 10))
        return PrunedMarkingASHAScheduler(
            time_attr="training_iteration",
            metric=plan.tune_prune_metric,
            mode="max",
            max_t=epochs,
            grace_period=1,
            reduction_factor=3,
        )
    return OptunaPruningScheduler(make_pruner(plan.pruner), metric=plan.tune_metric, mode="max")


def _new_tuner(
    plan: SearchPlan,
    space: Any,
    mag: str,
    folder: Path,
    trainable: Any,
    max_concurrent: int,
    first_callbacks: list[Any],
    budget_s: float | None,
    searcher: Any,
) -> tune.Tuner:
    """A new Tune experiment for the magnification, in ``<folder>/ray/<mag>/``, asking
    ``searcher`` (``make_searcher``, warm-start points already enqueued)."""
    scheduler = _scheduler(plan, space)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=plan.trials,
            max_concurrent_trials=max_concurrent,
            time_budget_s=budget_s,
            # One trial process per concurrent slot, reused by the next trial: a fresh
            # process per trial re-imports torch, MLflow and this package (seconds per
            # trial). Not for data-parallel trials, whose Ray Train workers are their own.
            reuse_actors=plan.workers_per_trial == 1,
        ),
        run_config=tune.RunConfig(
            name=mag,
            storage_path=str(folder / "ray"),
            failure_config=tune.FailureConfig(max_failures=plan.max_retries, fail_fast=False),
            callbacks=[
                *first_callbacks,
                # Closes Optuna trials Tune left open (e.g. cut by the time budget).
                searcher.end_of_experiment_callback(),
                SearchCallback(
                    tracking_uri=plan.tracking_uri,
                    search=plan.name,
                    storage=plan.storage,
                    study_name=plan.study_name(mag),
                    magnification=mag,
                    metric=plan.tune_metric,
                    total=plan.trials,
                ),
            ],
            verbose=0,
        ),
    )
