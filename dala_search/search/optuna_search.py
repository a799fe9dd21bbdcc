"""Ray's `OptunaSearch`, fixed so the Optuna study tells the truth about every trial.

Ray 2.60's `OptunaSearch` (checked in `ray/tune/search/optuna/optuna_search.py`) gets three
things wrong for a search that prunes:

* a trial that a Tune scheduler stopped early is told COMPLETE with its truncated last value,
  which TPE then treats as a finished (bad) configuration;
* it tells COMPLETE with an explicit state, so a NaN metric makes `study.tell` raise; Ray only
  logs the error and the Optuna trial stays RUNNING forever;
* the study's pruner is a `NopPruner`, so Optuna pruners never run.

`PruningOptunaSearch` keeps Ray's suggestion logic and storage handling and changes only how
trials end: PRUNED when a scheduler (`OptunaPruningScheduler`, or a scheduler that calls
`mark_pruned`) stopped it, FAIL when it errored or never reported, COMPLETE with the best (or
last) value of the metric otherwise. The scheduler installs its pruner as the study's pruner,
so `Trial.should_prune()` runs the real pruner against the same study.

`CloseStoppedOptunaTrials` (in `optuna_study.py`, with the storage and the objectives; from
`end_of_experiment_callback()`) covers the one path where Ray never tells the searcher a
trial ended: trials cut by `time_budget_s` or a stop-all.

Ray's private attributes are reached through `ray_internals.py`. API facts:
docs/ray_optuna_notes.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import cloudpickle
from ray.air.constants import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from dala_search.errors import ConfigError
from dala_search.search import ray_internals
from dala_search.search.optuna_study import (
    OBJECTIVES,
    RAY_TRIAL_ID_ATTR,
    RETRY_OF_ATTR,
    CloseStoppedOptunaTrials,
    resolve_storage,
)

logger = logging.getLogger(__name__)


class PruningOptunaSearch(OptunaSearch):
    """`OptunaSearch` whose study records PRUNED / FAIL / COMPLETE honestly and survives restore.

    Args (besides Ray's `space, metric, mode, points_to_evaluate, sampler, study_name,
    storage, seed, evaluated_rewards`):
        storage: an Optuna storage object or an RDB URL such as ``sqlite:////abs/study.db``.
            The study is created with ``load_if_exists=True``; an existing study whose
            direction differs from ``mode`` is refused with a ConfigError.
        objective: "best" (default) or "last": which per-epoch value a completed trial is
            told with.
        step_key: result key used as Optuna's step for intermediate values. Must match the
            scheduler's ``step_key``; ``training_iteration`` (1-based) by default.
        prune_metric: result key reported as Optuna's intermediate values, which pruners
            judge (default: ``metric``). A completed trial is still told its ``metric``
            value; a pruned trial's value is Optuna's own choice, its last intermediate
            value, so it is in ``prune_metric``'s units (the study's user attribute
            ``prune_metric`` says which).
        fail_orphans_on_restore: after `Tuner.restore`, tell FAIL to RUNNING trials of the
            study that this searcher never handed to Tune (left by a driver killed between
            `ask` and Tune's next experiment checkpoint). Assumes one driver per study.
    """

    def __init__(
        self,
        space: Any = None,
        metric: str | None = None,
        mode: str | None = None,
        points_to_evaluate: list[dict] | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        study_name: str | None = None,
        storage: str | optuna.storages.BaseStorage | None = None,
        seed: int | None = None,
        evaluated_rewards: list | None = None,
        *,
        objective: str = "best",
        step_key: str = TRAINING_ITERATION,
        fail_orphans_on_restore: bool = True,
        prune_metric: str | None = None,
    ) -> None:
        if isinstance(metric, list) or isinstance(mode, list):
            raise ConfigError(
                "PruningOptunaSearch supports one metric; got metric="
                f"{metric!r}, mode={mode!r} (use Ray's OptunaSearch for multi-objective)"
            )
        if mode not in (None, "min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if objective not in OBJECTIVES:
            raise ConfigError(
                f"unknown objective {objective!r}; valid: {', '.join(sorted(OBJECTIVES))}"
            )
        # Set before super().__init__, which may already create the study.
        self._objective = objective
        self._step_key = step_key
        self._prune_metric = prune_metric
        self._fail_orphans_on_restore = fail_orphans_on_restore
        self._values: dict[str, list[float]] = {}  # trial_id -> metric per result, in order
        self._last_step: dict[str, int] = {}  # trial_id -> last step reported to Optuna
        self._pruned: set[str] = set()
        self._failed: set[str] = set()
        self._live: set[str] = set()  # trials suggested (or rerun) and not yet complete
        self._max_concurrent = 0  # 0: no limit here
        super().__init__(
            space=space,
            metric=metric,
            mode=mode,
            points_to_evaluate=points_to_evaluate,
            sampler=sampler,
            study_name=study_name,
            storage=resolve_storage(storage),
            seed=seed,
            evaluated_rewards=evaluated_rewards,
        )

    # ----- study set-up -------------------------------------------------------------------

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        # `create_study(load_if_exists=True)` silently returns an existing study even when its
        # direction is the opposite of `mode`; optimising it would then be backwards.
        wanted = "minimize" if mode == "min" else "maximize"
        actual = self.study.direction.name.lower()
        if actual != wanted:
            raise ConfigError(
                f"Optuna study {ray_internals.study_name(self)!r} in storage already exists "
                f"with direction {actual!r}, but mode={mode!r} asks for {wanted!r}"
            )
        self.study.set_user_attr("prune_metric", self.prune_metric)

    @property
    def study(self) -> optuna.Study:
        """The live Optuna study (None until the search space is known)."""
        return ray_internals.study(self)

    @property
    def prune_metric(self) -> str | None:
        """The result key whose values Optuna's pruner judges (``metric`` unless set)."""
        return self._prune_metric or self.metric

    @property
    def step_key(self) -> str:
        """Result key used as Optuna's step; the scheduler checks it matches its own."""
        return self._step_key

    def use_pruner(self, pruner: optuna.pruners.BasePruner) -> None:
        """Make `pruner` the study's pruner (the scheduler asks on every trial).

        `Trial.should_prune()` asks `study.pruner`, and `HyperbandPruner` (and TPE through
        `_filter_study`) only work when the pruner *is* the study's pruner, so it is installed
        rather than called on the side.
        """
        if self.study is not None and self.study.pruner is not pruner:
            self.study.pruner = pruner

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Called by Ray's `ConcurrencyLimiter` (also the one `max_concurrent_trials` adds).

        Limiting here, and answering True, makes the limiter pass every event straight
        through. Ray's limiter otherwise drops the completion of any trial it does not count
        as live, which is every trial rerun by `Tuner.restore(resume_errored=True)`: its
        Optuna trial would stay RUNNING forever.
        """
        self._max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | None:
        """Called by Ray for each new trial; None while `max_concurrent` trials are running."""
        if self._max_concurrent and len(self._live) >= self._max_concurrent:
            return None
        config = super().suggest(trial_id)
        ray_internals.trials(self)[trial_id].set_user_attr(RAY_TRIAL_ID_ATTR, trial_id)
        self._live.add(trial_id)
        return config

    def end_of_experiment_callback(self) -> CloseStoppedOptunaTrials:
        """A Tune callback for `RunConfig(callbacks=[...])` that closes what Tune left open.
        See `CloseStoppedOptunaTrials`.
        """
        storage = ray_internals.storage(self)
        if storage is None and self.study is not None:
            # An in-memory study: only this process can see it.
            storage = ray_internals.study_storage(self.study)
        return CloseStoppedOptunaTrials(storage, ray_internals.study_name(self))

    # ----- results ------------------------------------------------------------------------

    def _record(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """Remember one result's metric and report its pruning metric to Optuna at its step
        (once per step)."""
        if trial_id not in ray_internals.trials(self):
            return
        if self.metric in result:
            self._values.setdefault(trial_id, []).append(float(result[self.metric]))
        if self.prune_metric not in result:
            return
        value = float(result[self.prune_metric])
        step = result.get(self._step_key)
        if step is None:
            return
        step = int(step)
        # The scheduler reports a result before this searcher sees it, and Optuna warns on a
        # second report at one step: report each step once. A trial Tune restarted from
        # scratch repeats early steps; Optuna keeps the first run's values for those.
        if step <= self._last_step.get(trial_id, -1):
            return
        try:
            self._report_intermediate(trial_id, value, step)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Finished in the study but not here: a restored searcher whose checkpoint is
            # older than the study (driver killed). Keep the study's record; ignore the rerun.
            logger.warning("Optuna trial of %s already finished; ignoring its rerun", trial_id)
            ray_internals.completed(self).add(trial_id)
            self._live.discard(trial_id)
            return
        self._last_step[trial_id] = step

    def _report_intermediate(self, trial_id: str, value: float, step: int) -> None:
        """Give the study one intermediate value (the multi-objective bridge keeps it as a
        user attribute instead: ``multiobjective.py``)."""
        ray_internals.trials(self)[trial_id].report(value, step)

    def _ask_pruner(self, trial_id: str) -> bool:
        """Whether the study's pruner stops ``trial_id`` now (its values reported)."""
        return ray_internals.trials(self)[trial_id].should_prune()

    def _completed_value(self, trial_id: str, values: list[float]) -> float | list[float]:
        """What a completed trial is told: its metric's best (or last) value."""
        return OBJECTIVES[self._objective](values, ray_internals.mode(self))

    def _reopen_if_retried(self, trial_id: str) -> None:
        """Give a trial that Tune runs again after an error a fresh Optuna trial.

        `Tuner.restore(resume_errored=True)` (or `restart_errored`) runs an ERROR trial again
        under the same Tune trial id, but its Optuna counterpart was already told FAIL and a
        finished Optuna trial cannot be reopened. A new Optuna trial with the same parameters
        takes its place, so the rerun's outcome is recorded instead of dropped.
        """
        if trial_id not in self._failed:
            return
        old = ray_internals.trials(self)[trial_id]
        # `ask` pops the *oldest* WAITING trial; with others queued (points_to_evaluate) the
        # rerun would get their parameters. Rare: then leave the rerun unrecorded, as Ray does.
        if self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            logger.warning(
                "Tune retried %s but the study has queued trials: not recorded", trial_id
            )
            self._failed.discard(trial_id)
            return
        self.study.enqueue_trial(old.params, skip_if_exists=False)
        new = self.study.ask(fixed_distributions=old.distributions)
        new.set_user_attr(RETRY_OF_ATTR, old.number)
        new.set_user_attr(RAY_TRIAL_ID_ATTR, trial_id)
        ray_internals.trials(self)[trial_id] = new
        self._live.add(trial_id)
        self._failed.discard(trial_id)
        ray_internals.completed(self).discard(trial_id)
        self._values.pop(trial_id, None)
        self._last_step.pop(trial_id, None)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Called by Ray for every result the scheduler let through."""
        self._reopen_if_retried(trial_id)
        if trial_id in ray_internals.completed(self):
            return
        self._record(trial_id, result)

    def should_prune(
        self, trial_id: str, result: Mapping[str, Any], pruner: optuna.pruners.BasePruner
    ) -> bool:
        """Report `result`, ask `pruner` (as the study's pruner) and mark the trial if pruned.

        The scheduler's `on_trial_result` runs *before* Ray passes the result to this
        searcher (and Ray never passes a result the scheduler answered STOP to), hence the
        report here.
        """
        self._reopen_if_retried(trial_id)
        if trial_id in ray_internals.completed(self) or trial_id not in ray_internals.trials(self):
            return False
        self.use_pruner(pruner)
        self._record(trial_id, result)
        if trial_id not in self._last_step:  # nothing reported yet: nothing to judge
            return False
        if self._ask_pruner(trial_id):
            self._pruned.add(trial_id)
            return True
        return False

    def mark_pruned(self, trial_id: str, result: Mapping[str, Any] | None = None) -> None:
        """Record that a scheduler stopped `trial_id` early, so it ends PRUNED.

        For schedulers other than `OptunaPruningScheduler` (e.g.
        `PrunedMarkingASHAScheduler`), just before they answer STOP; `result` is the result
        they stopped it on, which Ray will not pass to the searcher.
        """
        self._reopen_if_retried(trial_id)
        if trial_id in ray_internals.completed(self):
            return
        if result is not None:
            self._record(trial_id, result)
        self._pruned.add(trial_id)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Called by Ray once per trial end: tell the study PRUNED, FAIL or COMPLETE."""
        self._reopen_if_retried(trial_id)
        if trial_id in ray_internals.completed(self):
            logger.warning("Optuna trial for %s already finished; ignoring completion", trial_id)
            return
        if trial_id not in ray_internals.trials(self):
            return
        if result and not error:
            # A completion result is the last result again (Ray marks it done=True); record
            # it only if it is a step the searcher has not seen.
            step = result.get(self._step_key)
            if step is None or int(step) > self._last_step.get(trial_id, -1):
                self._record(trial_id, result)
        ot_trial = ray_internals.trials(self)[trial_id]
        values = self._values.get(trial_id, [])
        if error:
            state, value = TrialState.FAIL, None
        elif trial_id in self._pruned:
            # Optuna stores the last intermediate value as a pruned trial's value by itself.
            state, value = TrialState.PRUNED, None
        elif not values:
            # Stopped before its first result (e.g. PENDING when the experiment ended): it says
            # nothing about its configuration. FAIL keeps it out of TPE; PRUNED with no value
            # would rank it worst.
            state, value = TrialState.FAIL, None
        else:
            # state=None lets Optuna turn a NaN into FAIL instead of raising.
            state, value = None, self._completed_value(trial_id, values)
        try:
            self.study.tell(ot_trial, value, state=state)
        except ValueError as err:  # e.g. the trial was finished by another process
            logger.warning("Could not tell Optuna trial %s: %s", ot_trial.number, err)
        if error:
            self._failed.add(trial_id)
        ray_internals.completed(self).add(trial_id)
        self._live.discard(trial_id)
        self._values.pop(trial_id, None)

    # ----- checkpointing ------------------------------------------------------------------

    def save(self, checkpoint_path: str) -> None:
        """Called by Ray at every experiment checkpoint: pickle the searcher's state.

        Ray's `save` uses plain `pickle`, which cannot pickle a define-by-run space written as
        a closure or lambda: the checkpoint would fail and end the experiment. cloudpickle
        writes a stream that Ray's `restore` (`pickle.load`) reads back.
        """
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        """Called by Ray on `Tuner.restore`: reload state, then clean up orphaned trials."""
        super().restore(checkpoint_path)
        if self.study is None:
            return
        self._skip_finished()
        if self._fail_orphans_on_restore:
            self._fail_orphans()

    def _skip_finished(self) -> None:
        # A driver killed (not interrupted) restores Tune's last experiment checkpoint, which
        # may predate trials that finished in the study since. Tune reruns them; the study
        # keeps the result it has, and this searcher ignores the rerun.
        for trial_id, ot_trial in ray_internals.trials(self).items():
            if trial_id in ray_internals.completed(self):
                continue
            stored = ray_internals.study_storage(self.study)
            state = stored.get_trial(ray_internals.trial_id(ot_trial)).state
            if state.is_finished():
                logger.warning(
                    "Optuna trial %s finished after the restored checkpoint; ignoring its rerun",
                    ot_trial.number,
                )
                ray_internals.completed(self).add(trial_id)
                self._live.discard(trial_id)

    def _fail_orphans(self) -> None:
        # A driver killed between `study.ask` and Tune's next experiment checkpoint leaves an
        # Optuna trial RUNNING that no Tune trial will ever finish; with constant_liar TPE
        # would keep steering away from its parameters forever.
        known = {ray_internals.trial_id(t) for t in ray_internals.trials(self).values()}
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for frozen in running:
            if ray_internals.trial_id(frozen) in known:
                continue
            logger.warning(
                "Optuna trial %s was RUNNING with no Tune trial after restore; telling FAIL",
                frozen.number,
            )
            self.study.tell(frozen.number, state=TrialState.FAIL)
