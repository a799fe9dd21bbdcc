"""The driver-side Tune callback of a search: close trial runs in MLflow, show progress.

It holds plain strings and counters only: Ray pickles callbacks into the experiment state
and unpickles them on ``Tuner.restore``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import optuna
from ray.tune import Callback

from dala_search.search import tracking

# Optuna's verdict. TuneController.stop_trial calls the scheduler, then the searcher (which
# tells the study), then callbacks: by the time we look, the study knows.
_STATE_OF = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed"}


class SearchCallback(Callback):
    """Give every trial's MLflow run its final state and print live progress (stderr).

    A trial stopped by the pruner is killed mid-epoch and never closes its own run; a
    crashed trial may not either. The state comes from the Optuna study, the one record
    that knows why a trial ended.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        search: str,
        storage: str,
        study_name: str,
        magnification: str,
        metric: str,
        total: int,
        every_s: float = 15.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.search = search
        self.storage = storage
        self.study_name = study_name
        self.magnification = magnification
        self.metric = metric
        self.total = total
        self.every_s = every_s
        self.start = time.monotonic()
        self.last = 0.0
        self.best = float("-inf")
        self.counts = {"completed": 0, "pruned": 0, "failed": 0}
        self._tracker: tracking.SearchTracker | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.start = time.monotonic()  # elapsed time restarts with the resumed driver

    @property
    def tracker(self) -> tracking.SearchTracker:
        if self._tracker is None:
            self._tracker = tracking.SearchTracker(self.tracking_uri, self.search)
        return self._tracker

    def optuna_state(self, trial: Any) -> str:
        """completed / pruned / failed, as the Optuna study recorded the trial."""
        number = trial.config.get("_optuna_number")
        if number is None:
            return "failed"
        study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        return _STATE_OF.get(states.get(int(number), "FAIL"), "failed")

    # -- Tune hooks -----------------------------------------------------------------------

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and value == value:
            self.best = max(self.best, float(value))
        if time.monotonic() - self.last > self.every_s:
            self.last = time.monotonic()
            self._echo(self.status(trials))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        state = self.optuna_state(trial)
        self.tracker.close_trial(trial.trial_id, state)
        self._finished(trials, trial, state)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        message = None
        if getattr(trial, "error_file", None):
            try:
                with open(trial.error_file) as f:
                    message = f.read()[-4000:]
            except OSError:
                message = None
        self.tracker.close_trial(trial.trial_id, "failed", error=message)
        self._finished(trials, trial, "failed")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune restarts a failed trial (FailureConfig: its process or node died, or it
        # raised): say so, Ray's own console output being hidden (console.py).
        self._echo(
            f"[{self.magnification}] trial {trial.trial_id} ended with an error (failure "
            f"{trial.num_failures}); Tune restarts it (one that raised in its own code "
            "does not train again)"
        )

    # -- progress -------------------------------------------------------------------------

    def status(self, trials: list, ended: Any = None) -> str:
        """One progress line; ``ended``: a trial Tune is ending (still RUNNING to Tune)."""
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not ended)
        done = sum(self.counts.values())
        best = f"{self.best:.4f}" if self.best > float("-inf") else "-"
        minutes = (time.monotonic() - self.start) / 60
        return (
            f"[{self.magnification}] {done}/{self.total} trials done "
            f"({self.counts['completed']} completed, {self.counts['pruned']} pruned, "
            f"{self.counts['failed']} failed), {running} running; best {self.metric} {best}; "
            f"{minutes:.1f} min"
        )

    def _finished(self, trials: list, trial: Any, state: str) -> None:
        self.counts[state] += 1
        last = trial.last_result or {}
        value = last.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, int | float) else "-"
        self._echo(
            f"[{self.magnification}] trial {trial.trial_id} {state} after "
            f"{last.get('training_iteration', 0)} epoch(s); {self.metric} {shown}"
        )
        self._echo(self.status(trials, ended=trial))

    @staticmethod
    def _echo(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
