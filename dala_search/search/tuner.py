"""Ray Tune wiring of a search: one Optuna study and one Tune experiment per magnification.

``plan_search`` checks everything a search needs (space, data, names, tracking store)
before anything starts; ``run_search`` runs the plan in one Ray session, magnification
after magnification, and can pick an interrupted plan up again (``resume``).

A search's folder (``<runs_dir>/<name>/``) holds ``search.json`` (the plan), the Optuna
study (``optuna.db`` unless ``--storage`` names a database) and Ray's experiment state
(``ray/<magnification>/``), which is what ``Tuner.restore`` resumes from.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune

from dala_search.config import SELECT_METRICS
from dala_search.data import breakhis, protocols
from dala_search.data.breakhis import BreakHisIndex
from dala_search.data.demo import ensure_demo_data
from dala_search.data.preflight import check_search_data
from dala_search.errors import ConfigError, DalaError
from dala_search.faults import ENV_VAR
from dala_search.runs import schema
from dala_search.runs.plan import (
    PLAN_FILE,
    SearchPlan,
    check_name,
    parse_duration,
    parse_magnifications,
    runs_folder,
)
from dala_search.search import distributed, ray_internals, tracking
from dala_search.search.callbacks import SearchCallback
from dala_search.search.optuna_search import PruningOptunaSearch
from dala_search.search.pruning import (
    OptunaPruningScheduler,
    PrunedMarkingASHAScheduler,
    make_pruner,
    make_sampler,
)
from dala_search.search.trainable import TrialContext, run_trial
from dala_search.space_file import load_space
from dala_search.train import prepare_data


def plan_search(
    *,
    space: str,
    name: str | None = None,
    data_dir: str | Path | None = None,
    magnifications: str | None = None,
    trials: int | None = None,
    epochs: int | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    prune_on: str | None = None,
    seed: int = 0,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float | None = None,
    workers_per_trial: int = 1,
    max_concurrent: int | None = None,
    time_budget: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    runs_dir: str | Path | None = None,
    fold: int | None = None,
    max_retries: int = 2,
    cv: int | None = None,
    protocol: str = "patient",
) -> SearchPlan:
    """Resolve and check a search before anything starts (no run, no folder, no Ray)."""
    protocols.check_fold_protocol(fold, protocol)
    sp = load_space(space)
    s = sp.settings
    if "image_size" in sp.params:
        raise ConfigError(
            f"{sp.path}: key 'image_size' must be fixed, not searched "
            "(the decoded-image cache is built once per size)"
        )
    name = name or f"{sp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_name(name, "--name")
    folder = runs_folder(runs_dir) / name
    if (folder / PLAN_FILE).exists():
        raise DalaError(
            f"a search named {name!r} already exists in {folder}; continue it "
            f"with `dala-search resume {name}` or choose another --name"
        )
    mags = parse_magnifications(magnifications or s.magnifications)
    protocols.check_magnifications(protocol, mags)
    trials = s.trials if trials is None else trials
    if trials < 1:
        raise ConfigError(f"--trials: {trials} must be at least 1")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs: {epochs} must be at least 1")
    sampler = sampler or s.sampler
    pruner = pruner or s.pruner
    prune_on = prune_on or s.prune_on
    if prune_on is not None and prune_on not in SELECT_METRICS:
        raise ConfigError(
            f"--prune-on: unknown metric {prune_on!r}; valid: {', '.join(SELECT_METRICS)}"
        )
    if prune_on == s.metric:
        prune_on = None  # the searched metric itself
    make_sampler(sampler, seed=seed)  # raises ConfigError naming a bad one
    if pruner != "asha":
        make_pruner(pruner)
    if cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial: {cpus_per_trial} must be positive")
    if gpus_per_trial is not None and gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial: {gpus_per_trial} must be >= 0")
    if max_retries < 0:
        raise ConfigError(f"--max-retries: {max_retries} must be >= 0")
    if workers_per_trial < 1:
        raise ConfigError(f"--workers-per-trial: {workers_per_trial} must be at least 1")
    cv = s.cv if cv is None else cv
    if isinstance(cv, bool) or not isinstance(cv, int) or cv < 1:
        raise ConfigError(f"--cv: {cv!r} must be an integer >= 1 (1: one validation split)")
    if cv > 1 and workers_per_trial > 1:
        raise ConfigError(
            f"--cv {cv} with --workers-per-trial {workers_per_trial}: a cross-validated trial "
            "trains its folds in one process; use one worker per trial (concurrent trials "
            "already spread over the GPUs)"
        )
    max_concurrent = s.max_concurrent if max_concurrent is None else max_concurrent
    if max_concurrent < 0:
        raise ConfigError(f"--max-concurrent: {max_concurrent} must be >= 0")
    uri = schema.resolve_tracking_uri(tracking_uri)
    if address and address != "auto" and not uri.startswith(("http://", "https://")):
        raise ConfigError(
            "a Ray cluster (--address) needs an MLflow tracking server "
            "(--tracking-uri http://HEAD:5000): trials on other nodes cannot "
            f"write to {uri}"
        )
    schema.check_tracking_uri(uri)
    tracking.check_experiment_free(uri, name, folder)
    if data_dir is None:
        data_path = ensure_demo_data()
    else:
        data_path = Path(data_dir).expanduser().resolve()
        if not data_path.is_dir():
            raise DalaError(f"--data {data_dir}: no such directory")
    # The data must be searchable before the search folder, the MLflow experiment or Ray
    # exist: a folder without images, an empty magnification or a bad split fails here.

    _PREFLIGHT_INDEX[str(data_path)] = check_search_data(
        data_path, mags, seed=seed, fold=fold, cv=cv, protocol=protocol
    )
    return SearchPlan(
        name=name,
        space=str(sp.path),
        data_dir=str(data_path),
        magnifications=mags,
        trials=trials,
        epochs=epochs,
        metric=s.metric,
        sampler=sampler,
        pruner=pruner,
        seed=seed,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=-1.0 if gpus_per_trial is None else gpus_per_trial,  # -1: auto
        workers_per_trial=workers_per_trial,
        max_concurrent=max_concurrent,
        time_budget_s=parse_duration(time_budget),
        tracking_uri=uri,
        storage=storage or f"sqlite:///{folder / 'optuna.db'}",
        address=address,
        folder=str(folder),
        fold=fold,
        max_retries=max_retries,
        prune_on=prune_on,
        cv=cv,
        protocol=protocol,
    )


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


# plan_search's data preflight indexes (and verifies) every PNG; run_search in the same
# process takes that index instead of reading the whole data set a second time.
_PREFLIGHT_INDEX: dict[str, BreakHisIndex] = {}


def search_index(plan: SearchPlan) -> BreakHisIndex:
    """The data index ``run_search`` uses: the one ``plan_search`` just built in this
    process (taken once), else a fresh ``index_breakhis`` (e.g. on resume)."""
    index = _PREFLIGHT_INDEX.pop(plan.data_dir, None)
    return index if index is not None else breakhis.index_breakhis(plan.data_dir, progress=True)


def run_search(
    plan: SearchPlan, *, resume: bool = False, index: BreakHisIndex | None = None
) -> list[MagnificationOutcome]:
    """Run (or continue) every magnification of ``plan``; returns one outcome each.

    ``index``: the data's index when the caller holds it already (a nested evaluation runs
    K searches on one data set), else ``search_index``.

    Raises ``SearchInterrupted`` when the driver was interrupted before the plan finished.
    """
    space = load_space(plan.space)
    folder = Path(plan.folder)
    if not ray.is_initialized():
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
        _stop_on_sigterm()
    _check_cluster_tracking(plan)
    if not resume:
        plan.save(new=True)
    tracker = tracking.SearchTracker(plan.tracking_uri, plan.name, folder=plan.folder)
    for key, value in {**_outer_tags(plan), **_protocol_tags(plan)}.items():
        tracker.client.set_experiment_tag(tracker.experiment_id, key, value)
    index = index if index is not None else search_index(plan)
    if index.skipped:
        print(
            f"note: {len(index.skipped)} unreadable or non-BreakHis file(s) skipped "
            f"(`dala-search data check {plan.data_dir}` lists them)",
            file=sys.stderr,
        )
    image_size = int(space.fixed.get("image_size", 224))

    deadline = time.monotonic() + plan.time_budget_s if plan.time_budget_s else None
    outcomes = []
    for i, mag in enumerate(plan.magnifications):
        data = prepare_data(
            index,
            mag,
            image_size=image_size,
            seed=plan.seed,
            fold=plan.fold,
            progress=True,
            protocol=plan.protocol,
        )
        if plan.outer is not None:  # an inner search of `evaluate --nested`: its outer fold
            import dataclasses

            from dala_search.folds import outer_split

            data = dataclasses.replace(data, split=outer_split(index, data.records, plan.outer))
        budget = None
        if deadline is not None:
            budget = max(1.0, (deadline - time.monotonic()) / (len(plan.magnifications) - i))
        outcome = _run_magnification(plan, space, mag, data, tracker, folder, budget)
        outcomes.append(outcome)
        if outcome.interrupted:
            raise SearchInterrupted(plan.name, outcomes)
    return outcomes


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


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler, ``kill``, a preempted node) stops the search like Ctrl+C.

    Ray Tune's SIGINT handler saves the experiment state and the driver says how to
    resume. Installed after ``ray.init``, whose own SIGTERM handler aborts the process.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


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
    tuner.fit()
    return _summarise(plan, mag, parent, tracker, budget_s)


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
    plan: SearchPlan, mag: str, parent: str, tracker: tracking.SearchTracker, budget_s: float | None
) -> MagnificationOutcome:
    """Count the study's trials, write the best onto the parent run, register its model."""

    study = optuna.load_study(study_name=plan.study_name(mag), storage=plan.storage)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    finished = sum(s in ("COMPLETE", "PRUNED", "FAIL") for s in states)
    interrupted = finished < plan.trials and budget_s is None
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
