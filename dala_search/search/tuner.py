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

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune

from dala_search.data import breakhis, protocols
from dala_search.data.breakhis import BreakHisIndex
from dala_search.errors import ConfigError, DalaError
from dala_search.faults import ENV_VAR
from dala_search.runs import rollback, schema
from dala_search.runs.plan import SearchPlan
from dala_search.search import console, distributed, ray_internals, stopping, tracking
from dala_search.search.callbacks import SearchCallback
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


def make_searcher(plan: SearchPlan, space: Any, mag: str) -> Any:
    """The searcher of one magnification's study, its sampler seeded with the study seed.

    The study records ``study_seed`` and ``cv`` as user attributes (optuna-dashboard shows
    them). Called by ``_run_magnification`` when a magnification starts (a resumed one
    restores its searcher, sampler state included).
    """
    seed = plan.study_seed(mag)
    searcher = DalaOptunaSearch(
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
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            # No --address: a Ray of our own ("local"), never a `ray start` cluster that
            # happens to run on this host (address=None would join it); "auto" joins one.
            address=plan.address or "local",
            runtime_env={"env_vars": _worker_env(plan)},
            # Data-parallel trials: Ray Train's placement-group cleaner asks the state API,
            # which the dashboard serves (distributed.py frees the workers either way).
            include_dashboard=plan.workers_per_trial > 1,
            log_to_driver=True,
            logging_level="WARNING",
        )
    _check_cluster_tracking(plan)
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
    for key, value in {**_outer_tags(plan), **_protocol_tags(plan)}.items():
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
            import dataclasses

            from dala_search.folds import outer_split

            data = dataclasses.replace(data, split=outer_split(index, data.records, plan.outer))
        budget = None
        if deadline is not None:
            budget = max(1.0, (deadline - time.monotonic()) / (len(plan.magnifications) - i))
        outcome = _run_magnification(plan, space, mag, data, tracker, folder, budget, stop)
        outcomes.append(outcome)
        if outcome.interrupted or (stop.requested and i + 1 < len(plan.magnifications)):
            raise SearchInterrupted(plan.name, outcomes)


def _protocol_tags(plan: SearchPlan) -> dict[str, str]:
    """The split protocol, and whether it leaks, on the experiment and the parent runs."""
    return {
        schema.TAG_PROTOCOL: plan.protocol,
        schema.TAG_LEAKY: str(protocols.is_leaky(plan.protocol)).lower(),
    }


def _outer_tags(plan: SearchPlan) -> dict[str, str]:
    """An inner search of a nested evaluation names its outer search and fold (experiment
    and parent runs); none for an ordinary search."""
    if plan.outer is None:
        return {}
    return {
        schema.TAG_NESTED_OF: str(plan.outer.get("of", "")),
        schema.TAG_OUTER_FOLD: f"{plan.outer['fold']}/{plan.outer['k']}",
    }


def _check_cluster_tracking(plan: SearchPlan) -> None:
    """Trials on other nodes cannot write to a local tracking store: refuse before any
    record exists (``plan_search`` cannot tell what ``--address auto`` joins)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not plan.tracking_uri.startswith(("http://", "https://")):
        ray.shutdown()
        raise ConfigError(
            f"the Ray cluster has {len(nodes)} nodes: trials on other nodes cannot write to "
            f"{plan.tracking_uri}; pass --tracking-uri http://HEAD:5000 (an MLflow server)"
        )


def _worker_env(plan: SearchPlan) -> dict[str, str]:
    """Environment of every trial process: the tracking store, one malloc arena, and the
    fault-injection switch when a test set it (``dala_search/faults.py``).

    One arena: a reused trial process runs each trial in a new thread (Tune's function
    trainables), and glibc gives a new thread a new arena, so every trial faulted in fresh
    pages for its model and batches instead of reusing the last trial's freed memory (the
    cost: bench/README.md). ``$MALLOC_ARENA_MAX`` of the driver, when set, wins.
    """
    env = {
        "MLFLOW_TRACKING_URI": plan.tracking_uri,
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1"),
    }

    if os.environ.get(ENV_VAR):
        env[ENV_VAR] = os.environ[ENV_VAR]
    return env


class SearchInterrupted(DalaError):
    """The driver stopped before the plan finished; ``dala-search resume NAME`` continues."""

    def __init__(self, name: str, outcomes: list[MagnificationOutcome]) -> None:
        super().__init__(
            f"search {name!r} was interrupted; continue it with `dala-search resume {name}`"
        )
        self.outcomes = outcomes


def _resources(plan: SearchPlan) -> dict[str, float]:
    gpus = plan.gpus_per_trial
    if gpus < 0:  # auto: a whole GPU per trial when the cluster has any
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": plan.cpus_per_trial, "gpu": gpus}


def _max_concurrent(plan: SearchPlan, res: dict[str, float]) -> int:
    """Explicit, or what the cluster's resources allow (so TPE isn't asked far ahead)."""
    if plan.max_concurrent:
        return plan.max_concurrent
    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 1) // max(res["cpu"], 1e-9))
    by_gpu = int(total.get("GPU", 0) // res["gpu"]) if res["gpu"] > 0 else by_cpu
    return max(1, min(by_cpu, by_gpu))


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

    study_seed = plan.study_seed(mag)
    parent = tracker.parent_run(
        mag,
        tags={
            schema.TAG_SYNTHETIC: str(data.synthetic).lower(),
            schema.TAG_DATA_ROOT: plan.data_dir,
            schema.TAG_SPLIT: data.split.description,
            schema.TAG_SPACE: plan.space,
            schema.TAG_CV: str(plan.cv),
            schema.TAG_STUDY_SEED: str(study_seed),
            **_outer_tags(plan),
            **_protocol_tags(plan),
        },
    )
    tracker.client.update_run(parent, status="RUNNING")
    folds = _inner_folds(plan, data, tracker, parent)
    res = _resources(plan)
    overrides: dict[str, Any] = {"epochs": plan.epochs, "select_metric": plan.metric}
    if res["gpu"] == 0:
        overrides.update(device="cpu", num_threads=max(1, int(res["cpu"])))
    ctx = TrialContext(
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
    )
    if plan.workers_per_trial > 1:  # data parallel: Ray Train workers (distributed.py)
        layout = distributed.WorkerLayout(plan.workers_per_trial, res["cpu"], res["gpu"])
        cluster = ray.cluster_resources()
        if plan.address is None:  # a Ray of our own cannot grow: refuse what never fits
            distributed.check_fits(layout, cluster)
        trainable = distributed.ddp_trainable(data, ctx, layout)
        max_concurrent = distributed.max_concurrent_trials(plan.max_concurrent, layout, cluster)
        # First: a stopped trial's workers are gone before its MLflow run is closed.
        first_callbacks: list[Any] = [distributed.FreeWorkersCallback()]
    else:
        trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, ctx=ctx), res)
        max_concurrent = _max_concurrent(plan, res)
        first_callbacks = []
    exp_dir = folder / "ray" / mag
    if tune.Tuner.can_restore(str(exp_dir)):
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable, resume_unfinished=True, resume_errored=False
        )
    else:
        epochs = plan.epochs or int(space.fixed.get("epochs", 10))
        searcher = make_searcher(plan, space, mag)
        if plan.pruner == "asha":
            scheduler = PrunedMarkingASHAScheduler(
                time_attr="training_iteration",
                metric=plan.tune_prune_metric,
                mode="max",
                max_t=epochs,
                grace_period=1,
                reduction_factor=3,
            )
        else:
            scheduler = OptunaPruningScheduler(
                make_pruner(plan.pruner), metric=plan.tune_metric, mode="max"
            )
        tuner = tune.Tuner(
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
    with stop.fit():
        tuner.fit()
    return _summarise(plan, mag, parent, tracker, budget_s, stopped=stop.requested)


def _inner_folds(
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


def _summarise(
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
    version = None
    if best is not None:
        current = tracker.client.get_run(parent).data.tags.get(schema.TAG_BEST_RUN)
        if current != best.info.run_id:
            version = tracker.record_best(parent, mag, best)
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
