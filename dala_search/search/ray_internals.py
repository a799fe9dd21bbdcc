"""The private attributes of Ray Tune (and Optuna) this package relies on, in one place.

Ray's ``OptunaSearch`` keeps its study and trials in private attributes, and its ASHA
scheduler its time attribute and budget; ``PruningOptunaSearch`` (optuna_search.py) and the
schedulers (pruning.py) must read and change them to tell the study the truth. Every such
access goes through the functions below. ``missing()`` builds the real Ray objects and
lists what is gone; tests/search/test_ray_internals.py fails on a Ray where anything moved,
naming the attribute and the version. pyproject pins ray below the first minor not checked.

Checked against ray 2.60 (``ray/tune/search/optuna/optuna_search.py``,
``ray/tune/schedulers/async_hyperband.py``) and optuna 4-5.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import optuna
import ray
from ray._private import utils as ray_utils  # get_num_cpus: Ray's count of this machine's CPUs
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

# What is read or written, per class.
OPTUNA_SEARCH_ATTRS = (
    "_ot_study",  # the optuna.Study (None until metric, mode and space are known)
    "_ot_trials",  # Tune trial id -> optuna.Trial
    "_completed_trials",  # Tune trial ids already told to the study
    "_storage",  # the storage object Ray was given (None: in memory)
    "_study_name",
    "_mode",  # "min" | "max"
)
OPTUNA_SEARCH_HOOKS = ("_setup_study",)  # overridden: checks the stored study's direction
ASHA_ATTRS = ("_time_attr", "_max_t")
OPTUNA_STUDY_ATTRS = ("_storage",)  # the in-memory storage of a study without an RDB
OPTUNA_TRIAL_ATTRS = ("_trial_id",)  # storage-wide id (``number`` is per study)


# Where a stopped driver's main thread waits on Ray's processes once everything a resume
# needs is on disk: ``tune.run`` writes its final experiment state, then
# ``TuneController.cleanup`` stops the trial actors (it blocks for a minute when Ray's GCS
# is gone); ``ray.shutdown`` after that. (file name, function name) of those frames.
PARKED_FRAMES = (("tune_controller.py", "cleanup"), ("worker.py", "shutdown"))


class RayInternalsMoved(RuntimeError):
    """An attribute this package reads is gone from the installed Ray or Optuna."""


def _get(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RayInternalsMoved(
            f"{type(obj).__name__}.{name} is gone in ray {ray.__version__} / optuna "
            f"{optuna.__version__}: update dala_search/search/ray_internals.py"
        ) from None


def study(searcher: OptunaSearch) -> optuna.Study | None:
    return _get(searcher, "_ot_study")


def trials(searcher: OptunaSearch) -> dict[str, optuna.Trial]:
    """Tune trial id -> its Optuna trial; the dict itself (changes are Ray's state)."""
    return _get(searcher, "_ot_trials")


def completed(searcher: OptunaSearch) -> set[str]:
    """Tune trial ids told to the study; the set itself (Ray skips their later events)."""
    return _get(searcher, "_completed_trials")


def storage(searcher: OptunaSearch) -> Any:
    return _get(searcher, "_storage")


def study_name(searcher: OptunaSearch) -> str:
    return _get(searcher, "_study_name")


def mode(searcher: OptunaSearch) -> str:
    return _get(searcher, "_mode")


def study_storage(study: optuna.Study) -> Any:
    return _get(study, "_storage")


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    return _get(trial, "_trial_id")


def asha_cut_short(scheduler: ASHAScheduler, result: dict[str, Any]) -> bool:
    """True when ``result`` comes before ASHA's budget (``max_t`` of its time attribute)."""
    return result.get(_get(scheduler, "_time_attr"), 0) < _get(scheduler, "_max_t")


def local_cpus() -> float:
    """The CPUs a Ray started here (``ray.init()`` with no address) would count: Ray's own
    detection (cgroup limits in a container included), before any Ray exists."""
    return float(_get(ray_utils, "get_num_cpus")())


def parked_in_ray(thread_id: int | None) -> bool:
    """True when thread ``thread_id`` is inside one of ``PARKED_FRAMES`` (stopping.py)."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    while frame is not None:
        code = frame.f_code
        if (code.co_filename.rsplit("/", 1)[-1], code.co_name) in PARKED_FRAMES:
            return True
        frame = frame.f_back
    return False


def _parked_frames_moved() -> list[str]:
    """``PARKED_FRAMES`` that no longer name the functions, or a ``tune.run`` that no
    longer writes its final experiment state before it cleans up."""
    from ray._private import worker
    from ray.tune import tune
    from ray.tune.execution.tune_controller import TuneController

    gone = []
    for function, (file, name) in zip(
        (TuneController.cleanup, worker.shutdown), PARKED_FRAMES, strict=True
    ):
        code = inspect.unwrap(function).__code__
        if (code.co_filename.rsplit("/", 1)[-1], code.co_name) != (file, name):
            gone.append(f"{file}:{name}")
    source = inspect.getsource(tune.run)
    final = source.find("runner.checkpoint(force=True")
    if final < 0 or final > source.rfind("runner.cleanup()"):
        gone.append("tune.run: final checkpoint before runner.cleanup()")
    return gone


def missing() -> list[str]:
    """Every attribute above that the installed Ray / Optuna no longer has, as "Class.name"."""

    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("x", 0.0, 1.0)

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        searcher = OptunaSearch(
            space=space,
            metric="m",
            mode="max",
            sampler=optuna.samplers.RandomSampler(seed=0),
        )
        searcher.suggest("probe")  # the study and its first trial exist from here on
    finally:
        optuna.logging.set_verbosity(verbosity)
    ot_study = getattr(searcher, "_ot_study", None)
    asha = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=3)
    objects: list[tuple[Any, tuple[str, ...]]] = [
        (searcher, OPTUNA_SEARCH_ATTRS),
        (asha, ASHA_ATTRS),
    ]
    if ot_study is not None:
        objects += [
            (ot_study, OPTUNA_STUDY_ATTRS),
            (ot_study.ask(), OPTUNA_TRIAL_ATTRS),
            (ot_study.get_trials(deepcopy=False)[0], OPTUNA_TRIAL_ATTRS),
        ]
    gone = [f"{type(o).__name__}.{a}" for o, attrs in objects for a in attrs if not hasattr(o, a)]
    hooks = [h for h in OPTUNA_SEARCH_HOOKS if not callable(getattr(OptunaSearch, h, None))]
    gone += [f"OptunaSearch.{h}" for h in hooks]
    if not callable(getattr(ray_utils, "get_num_cpus", None)):
        gone.append("ray._private.utils.get_num_cpus")
    return gone + _parked_frames_moved()
