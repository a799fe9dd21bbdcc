"""Optuna pruners and samplers by name, and a Ray Tune scheduler that makes pruning real.

Ray's `OptunaSearch` gives its study a `NopPruner`, so an Optuna pruner never stops a Ray
trial by itself. `OptunaPruningScheduler` asks the pruner on every result and answers STOP;
`PruningOptunaSearch` (its partner, in `optuna_search.py`) then records the trial as PRUNED.

The scheduler finds the searcher through the controller Ray hands it on each call
(`tune_controller.search_alg`), never through a reference of its own: after
`Tuner.restore` the searcher and scheduler are unpickled as separate objects, and a stored
reference would point at a stale copy (the failure mode of a Tune `Stopper` bridge).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import optuna
from ray.air.constants import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from dala_search.errors import ConfigError
from dala_search.search import ray_internals
from dala_search.search.optuna_search import PruningOptunaSearch

# ----- pruners ------------------------------------------------------------------------------
# Steps are Ray's `training_iteration`, which starts at 1 (Optuna's own examples start at 0):
# `n_warmup_steps=2` means no trial is judged on its first epoch alone, which is mostly noise
# when fine-tuning a pretrained network. `n_startup_trials=3`: a median of fewer than three
# finished trials is too noisy to stop anything in searches of a few dozen trials.

PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner | None]] = {
    "median": lambda **kw: optuna.pruners.MedianPruner(
        **{"n_startup_trials": 3, "n_warmup_steps": 2, **kw}
    ),
    # Optuna's `percentile` is the share of trials *kept* (for either direction): 25 keeps
    # only trials in the top quarter at each step, harsher than the median. percentile=75
    # is the gentle variant (prunes only the bottom quarter).
    "percentile": lambda **kw: optuna.pruners.PercentilePruner(
        **{"percentile": 25.0, "n_startup_trials": 3, "n_warmup_steps": 2, **kw}
    ),
    # min_resource="auto" learns the rung size from the first finished trial's length;
    # reduction_factor=3 keeps a third per rung (Optuna's 4 is harsh for ~10-30 epochs).
    "sha": lambda **kw: optuna.pruners.SuccessiveHalvingPruner(
        **{"min_resource": "auto", "reduction_factor": 3, **kw}
    ),
    "hyperband": lambda **kw: optuna.pruners.HyperbandPruner(
        **{"min_resource": 1, "max_resource": "auto", "reduction_factor": 3, **kw}
    ),
    "none": lambda **kw: None,
}


def make_pruner(name: str, **kwargs: Any) -> optuna.pruners.BasePruner | None:
    """Build the Optuna pruner called `name`; "none" gives None (no pruning).

    `kwargs` override the defaults above and are passed to the Optuna constructor as they
    are.
    """
    if name not in PRUNERS:
        raise ConfigError(f"unknown pruner {name!r}; valid: {', '.join(sorted(PRUNERS))}")
    if name == "none" and kwargs:
        raise ConfigError(f"pruner 'none' takes no options, got {sorted(kwargs)}")
    try:
        return PRUNERS[name](**kwargs)
    except (TypeError, ValueError) as err:  # unknown keyword or a value Optuna refuses
        raise ConfigError(f"pruner {name!r} with options {kwargs}: {err}") from err


# ----- samplers -----------------------------------------------------------------------------


def _tpe(seed: int, **kw: Any) -> optuna.samplers.BaseSampler:
    # Optuna 5 already defaults to multivariate TPE (single objective) and constant_liar=True;
    # both are spelled out so Optuna 4.x behaves the same. constant_liar makes TPE treat the
    # trials Ray is still running as bad, so parallel trials do not all land on one spot.
    return optuna.samplers.TPESampler(
        **{"seed": seed, "multivariate": True, "constant_liar": True, **kw}
    )


def _cmaes(seed: int, **kw: Any) -> optuna.samplers.BaseSampler:
    # Optuna imports `cmaes` lazily and only fails at the first relative sample, mid-search.
    if importlib.util.find_spec("cmaes") is None:
        raise ConfigError("sampler 'cmaes' needs the 'cmaes' package: pip install cmaes")
    return optuna.samplers.CmaEsSampler(**{"seed": seed, **kw})


def _gp(seed: int, **kw: Any) -> optuna.samplers.BaseSampler:
    # GPSampler needs torch and scipy (both dependencies here); without `greenlet` it runs
    # its acquisition optimisation sequentially, which is only slower.
    for module in ("torch", "scipy"):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"sampler 'gp' needs the {module!r} package")
    return optuna.samplers.GPSampler(**{"seed": seed, **kw})


class _PicklableNSGAII(optuna.samplers.NSGAIISampler):
    """NSGA-II whose thread lock is left out of a pickle and made anew on unpickling.

    Optuna 5.1's genetic samplers hold a ``threading.Lock``, which cannot be pickled; Ray
    pickles the searcher (and its sampler) when the Tuner is made and at every experiment
    checkpoint, so the plain sampler ends a search before its first trial (checked).
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import threading

        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": lambda seed, **kw: optuna.samplers.RandomSampler(seed=seed, **kw),
    "cmaes": _cmaes,
    "gp": _gp,
    # Several objectives: NSGA-II (Optuna's default for them); also seeded.
    "nsga2": lambda seed, **kw: _PicklableNSGAII(seed=seed, **kw),
}


def make_sampler(name: str, *, seed: int, **kwargs: Any) -> optuna.samplers.BaseSampler:
    """Build the Optuna sampler called `name`, seeded with `seed`.

    `kwargs` go to the Optuna constructor (e.g. `n_startup_trials`).
    """
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    try:
        return SAMPLERS[name](seed, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sampler {name!r} with options {kwargs}: {err}") from err


# ----- schedulers ---------------------------------------------------------------------------


def find_optuna_searcher(search_alg: Any) -> PruningOptunaSearch:
    """Unwrap Ray's searcher wrappers down to the `PruningOptunaSearch`.

    Ray wraps the searcher given to `TuneConfig` (SearchGenerator -> ConcurrencyLimiter /
    Repeater -> searcher), each wrapper exposing the next as `.searcher`.
    """
    current = search_alg
    while not isinstance(current, PruningOptunaSearch):
        inner = getattr(current, "searcher", None)
        if inner is None:
            raise ConfigError(
                "Optuna pruning needs TuneConfig(search_alg=PruningOptunaSearch(...)), possibly "
                f"wrapped in a ConcurrencyLimiter; got {type(search_alg).__name__}"
            )
        current = inner
    return current


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


# A result with this key true is the trial's last epoch (set by ``trainable.record_trial``).
# No pruner is asked then: stopping a trial that has used its whole budget saves nothing,
# and it would drop a fully trained trial from the completed ones (e.g. successive halving
# with rungs at 1, 3, 9 epochs and a 9-epoch budget would "prune" trials at epoch 9).
FINAL_EPOCH_KEY = "final_epoch"


class OptunaPruningScheduler(FIFOScheduler):
    """Asks an Optuna pruner, on every result, whether to stop the Ray trial; marks it PRUNED.

    Runs trials first-in first-out like `FIFOScheduler`. On each result it reports the
    metric to the trial's Optuna counterpart, installs `pruner` as the study's pruner and asks
    `Trial.should_prune()`; True answers STOP and the searcher tells the study PRUNED.
    `pruner=None` never stops anything (pruner "none"), and no trial is stopped on a result
    that says it is its last (``FINAL_EPOCH_KEY``).

    `metric`, `mode` and `step_key` must match the `PruningOptunaSearch` (checked on first
    use); pass them here rather than to `TuneConfig`, which would refuse a second metric.
    """

    def __init__(
        self,
        pruner: optuna.pruners.BasePruner | None,
        *,
        metric: str,
        mode: str = "max",
        step_key: str = TRAINING_ITERATION,
    ) -> None:
        super().__init__()
        self._pruner = pruner
        self._metric = metric
        self._mode = _check_mode(mode)
        self._step_key = step_key

    @property
    def pruner(self) -> optuna.pruners.BasePruner | None:
        """The Optuna pruner asked on every result (None: never prune)."""
        return self._pruner

    def _searcher(self, tune_controller: Any) -> PruningOptunaSearch:
        searcher = find_optuna_searcher(tune_controller.search_alg)
        ours = (self._metric, self._mode, self._step_key)
        theirs = (searcher.metric, searcher.mode, searcher.step_key)
        if ours != theirs:
            raise ConfigError(
                "OptunaPruningScheduler (metric, mode, step_key)="
                f"{ours} differs from the searcher's {theirs}"
            )
        return searcher

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        """Called by Ray when a trial is created: install the pruner early.

        TPE and Hyperband look at `study.pruner` when sampling (Hyperband brackets), so the
        pruner should be in place before most trials are asked for. The very first trial is
        suggested before this runs; TPE samples it at random anyway.
        """
        if self._pruner is not None:
            self._searcher(tune_controller).use_pruner(self._pruner)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """Called by Ray on each result, before the searcher sees it: STOP if Optuna prunes."""
        if self._pruner is None or result.get(FINAL_EPOCH_KEY):
            return TrialScheduler.CONTINUE  # the searcher still records the result
        searcher = self._searcher(tune_controller)
        if searcher.should_prune(trial.trial_id, result, self._pruner):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        """Shown by Ray's progress reporter."""
        return f"Using Optuna pruning ({type(self._pruner).__name__}) with FIFO scheduling."


class PrunedMarkingASHAScheduler(ASHAScheduler):
    """Ray's ASHA, telling the Optuna study PRUNED for the trials it stops early.

    With plain ASHA the searcher cannot tell "stopped by ASHA" from "finished": both end
    with a done result, and the truncated value would be told COMPLETE, which misleads TPE.
    A STOP before `max_t` is an early stop, so the trial is marked pruned; a STOP at `max_t`
    is ASHA ending a trial that used its whole budget, which is COMPLETE.

    Takes ASHA's arguments (`time_attr`, `metric`, `mode`, `max_t`, `grace_period`,
    `reduction_factor`, `brackets`, `stop_last_trials`). Called by Ray like any scheduler.
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """Called by Ray on each result: ASHA's decision, recording early stops as pruned."""
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and ray_internals.asha_cut_short(self, result):
            find_optuna_searcher(tune_controller.search_alg).mark_pruned(trial.trial_id, result)
        return decision
