"""Warm starts: configurations put first in every study of a search.

* ``--enqueue paper``: the ``paper`` space's point (its fixed values) for the searched
  parameters of this space; ``--enqueue FILE.yaml``: a list of points (mappings of searched
  parameters to values). Checked when the search is planned (``check_enqueue``).
* ``--warm-start SEARCH[:MAG]``: the ``WARM_START_K`` best completed trials of an earlier
  search's study of the same magnification (or of ``MAG``; this search's own name reads a
  magnification it finished before), best first (for several objectives: its Pareto front,
  best primary first).

A point sets what it can: a searched parameter it leaves out, or whose value lies outside
this space's range or choices, is left to the sampler, and the record says which. Each
point becomes one ``Study.enqueue_trial`` (Optuna's own warm start), which the searcher's
next ``ask`` pops before sampling; what was enqueued is stored as the study's user
attribute ``enqueued`` and logged on the magnification's parent run (``enqueued.json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from dala_search.errors import ConfigError
from dala_search.space import SearchSpace, encode_choice
from dala_search.warm_points import points_in_file

WARM_START_K = 3
ENQUEUED_ATTR = "enqueued"


def _fits(spec: Any, value: Any) -> Any:
    """``value`` as Optuna takes it for ``spec``, or None when outside its range/choices."""
    if spec.type == "categorical":
        encoded = encode_choice(tuple(value) if isinstance(value, list) else value)
        return encoded if encoded in spec.optuna_choices else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if spec.type == "int" and value != int(value):
        return None
    return value if spec.low <= value <= spec.high else None


def point_for_space(values: Mapping[str, Any], space: SearchSpace) -> dict[str, Any]:
    """``{"params": ..., "left_to_sampler": [...]}``: what of ``values`` fits the space."""
    params, left = {}, []
    for name, spec in space.params.items():
        fitted = _fits(spec, values[name]) if name in values else None
        if fitted is None:
            left.append(name)
        else:
            params[name] = fitted
    return {"params": params, "left_to_sampler": left}


def enqueue_points(texts: tuple[str, ...], space: SearchSpace) -> list[dict[str, Any]]:
    """The points of ``--enqueue`` for ``space``; a key that is not a searched parameter
    of it is refused (a typo would silently enqueue nothing)."""
    from dala_search.space_file import load_space

    points = []
    for text in texts:
        if text == "paper":
            points.append({"source": "paper", **point_for_space(load_space("paper").fixed, space)})
            continue
        for i, raw in enumerate(points_in_file(Path(text))):
            unknown = sorted(set(raw) - set(space.params))
            if unknown:
                raise ConfigError(
                    f"--enqueue {text}: point {i + 1}: {', '.join(unknown)} not searched in "
                    f"space {space.name!r} (searched: {', '.join(space.params)})"
                )
            points.append({"source": f"{text}#{i + 1}", **point_for_space(raw, space)})
    return points


def best_trials(study: optuna.Study, k: int = WARM_START_K) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best completed trials, best first (several objectives: the front's)."""
    if len(study.directions) > 1:
        maximise = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        front = sorted(study.best_trials, key=lambda t: t.values[0], reverse=maximise)
        return front[:k]
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: t.value, reverse=maximise)[:k]


def warm_start_points(
    source: str, magnification: str, space: SearchSpace, runs_dir: str | Path
) -> list[dict[str, Any]]:
    """The best configurations of search ``SEARCH[:MAG]`` as points for ``space``."""
    from dala_search.runs.plan import open_search

    name, _, mag = source.partition(":")
    mag = mag or magnification
    plan = open_search(name, runs_dir).plan
    try:
        study = optuna.load_study(study_name=plan.study_name(mag), storage=plan.storage)
    except KeyError:
        raise ConfigError(f"--warm-start {source}: search {name!r} has no study of {mag}") from None
    trials = best_trials(study)
    if not trials:
        raise ConfigError(f"--warm-start {source}: no completed trial at {mag} to start from")
    return [
        {"source": f"{name}:{mag}#{t.number}", **point_for_space(t.params, space)} for t in trials
    ]


def enqueue(study: optuna.Study, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Enqueue each point (those that set at least one parameter); record them on the
    study. Returns what was enqueued."""
    done = [p for p in points if p["params"]]
    for point in done:
        study.enqueue_trial(point["params"], skip_if_exists=False)
    study.set_user_attr(ENQUEUED_ATTR, done)
    return done


def check_plan(plan: Any, space: SearchSpace) -> None:
    """Before anything starts: the ``--enqueue`` points fit the space's parameters, and a
    ``--warm-start`` search exists (this one's own only for a magnification it runs
    earlier)."""
    from dala_search.errors import DalaError
    from dala_search.runs.plan import open_search

    enqueue_points(plan.enqueue, space)
    if not plan.warm_start:
        return
    name, _, mag = plan.warm_start.partition(":")
    if name == plan.name:
        if not mag or mag not in plan.magnifications[:-1]:
            raise ConfigError(
                f"--warm-start {plan.warm_start}: this search can only start from a "
                f"magnification it runs before another ({', '.join(plan.magnifications)})"
            )
        return
    try:
        open_search(name, Path(plan.folder).parent)
    except DalaError as err:
        raise ConfigError(f"--warm-start {plan.warm_start}: {err}") from None


def enqueue_for(
    plan: Any, space: SearchSpace, magnification: str, study: optuna.Study
) -> list[dict[str, Any]]:
    """Enqueue the plan's warm-start points in ``study`` (a new magnification's)."""
    points = enqueue_points(plan.enqueue, space)
    name, _, mag = (plan.warm_start or "").partition(":")
    mags = list(plan.magnifications)
    # This search's own magnification: only once it has run (``check_plan``), so not for
    # itself or those before it.
    own_not_yet = name == plan.name and mags.index(mag) >= mags.index(magnification)
    if plan.warm_start and not own_not_yet:
        runs_dir = Path(plan.folder).parent
        points += warm_start_points(plan.warm_start, magnification, space, runs_dir)
    return enqueue(study, points) if points else []
